"""Barlow Twins (Zbontar et al., 2021, "Barlow Twins: Self-Supervised Learning via Redundancy Reduction",
arXiv:2103.03230; facebookresearch/barlowtwins).

Projector: 3 layers of 8192 (BN + ReLU on the hidden ones, a bias-free output layer); loss
`sslfast.barlow_twins_loss` (batch-standardized cross-correlation, λ = 0.0051; over the global batch with
`gather_distributed`).

RECIPE (§4 / main.py): LARS, lr 0.2 · B/256 for the weights and 0.0048 · B/256 for biases and BN parameters
(`lr_scale` 0.024 on that group), weight decay 1.5e-6 (not on biases / BN), 10 warm-up epochs, cosine.
SMALL: projector 512 → 512, lr 0.5, 1 warm-up epoch.
"""

from __future__ import annotations

from ..models.layers import mlp
from .base import Method, check_views, loss_region


class BarlowTwins(Method):
    """Barlow Twins: the cross-correlation of the standardized projections of two views driven to identity.

    Args:
        backbone: the trunk (`num_features` wide).
        hidden_dim: the projector's hidden width.
        out_dim: the projection width.
        lambd: the weight λ of the off-diagonal terms.
        gather_distributed: the cross-correlation over the global batch (all ranks).
    """

    name = "barlowtwins"
    preset = "barlow"
    min_batch_per_rank = 2
    RECIPE = dict(optimizer="lars", lr=0.2, weight_decay=1.5e-6, warmup_epochs=10, momentum=0.9)
    SMALL = dict(hidden_dim=512, out_dim=512, lr=0.5, warmup_epochs=1)

    def __init__(
        self,
        backbone,
        *,
        hidden_dim: int = 8192,
        out_dim: int = 8192,
        lambd: float = 0.0051,
        gather_distributed: bool = False,
    ):
        super().__init__(backbone, gather_distributed=gather_distributed)
        self.lambd = lambd
        self.projector = mlp(self.feature_dim, hidden_dim, out_dim, 3, bias=False)

    def param_groups(self):
        """`Method.param_groups` with the biases / BN group at lr_scale 0.0048 / 0.2 (the paper's two lrs)."""
        groups = super().param_groups()
        for g in groups:
            if g.get("weight_decay_scale") == 0.0:
                g["lr_scale"] = 0.0048 / 0.2
        return groups

    def forward(self, views):
        from ..ops.barlow import barlow_twins_loss

        check_views(self.name, views, 2)
        z1, z2 = (self.projector(self.backbone(v)) for v in views[:2])
        with loss_region(z1):
            return barlow_twins_loss(z1, z2, self.lambd, gather_distributed=self.gather_distributed)
