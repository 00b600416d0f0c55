"""VICReg (Bardes, Ponce & LeCun, 2022, "VICReg: Variance-Invariance-Covariance Regularization for
Self-Supervised Learning", arXiv:2105.04906; facebookresearch/vicreg).

Expander: 3 layers of 8192 (BN + ReLU on the hidden ones); loss `sslfast.vicreg_loss` with the paper's
coefficients 25 (invariance) / 25 (variance) / 1 (covariance), over the global batch with `gather_distributed`.

RECIPE (§4.1 / main_vicreg.py): LARS, base lr 0.2 · B/256, weight decay 1e-6, 10 warm-up epochs, cosine.
SMALL: expander 512 → 512, lr 0.5, 1 warm-up epoch.
"""

from __future__ import annotations

from ..models.layers import mlp
from .base import Method, check_views, loss_region


class VICReg(Method):
    """VICReg: invariance, variance and covariance terms on the expanded embeddings of two views.

    Args:
        backbone: the trunk (`num_features` wide).
        hidden_dim: the expander's hidden width.
        out_dim: the embedding width.
        sim_coeff: the invariance weight.
        std_coeff: the variance weight.
        cov_coeff: the covariance weight.
        gather_distributed: variance and covariance over the global batch (all ranks).
    """

    name = "vicreg"
    preset = "vicreg"
    min_batch_per_rank = 2
    RECIPE = dict(optimizer="lars", lr=0.2, weight_decay=1e-6, warmup_epochs=10, momentum=0.9)
    SMALL = dict(hidden_dim=512, out_dim=512, lr=0.5, warmup_epochs=1)

    def __init__(
        self,
        backbone,
        *,
        hidden_dim: int = 8192,
        out_dim: int = 8192,
        sim_coeff: float = 25.0,
        std_coeff: float = 25.0,
        cov_coeff: float = 1.0,
        gather_distributed: bool = False,
    ):
        super().__init__(backbone, gather_distributed=gather_distributed)
        self.coeffs = (sim_coeff, std_coeff, cov_coeff)
        self.projector = mlp(self.feature_dim, hidden_dim, out_dim, 3)

    def forward(self, views):
        from ..ops.barlow import vicreg_loss

        check_views(self.name, views, 2)
        z1, z2 = (self.projector(self.backbone(v)) for v in views[:2])
        with loss_region(z1):
            return vicreg_loss(z1, z2, *self.coeffs, gather_distributed=self.gather_distributed)
