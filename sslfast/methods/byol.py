"""BYOL (Grill et al., 2020, "Bootstrap Your Own Latent", arXiv:2006.07733; google-deepmind/deepmind-research).

Online network: backbone → projector (4096, BN, ReLU → 256) → predictor (same shape); target network: an EMA
of backbone + projector (`sslfast.EMA`, τ 0.996 → 1 on a cosine, §3.3). Loss: the symmetrized normalized MSE
2 − 2·cos(p_i, sg(z'_j)) over both view orders, batch mean.

RECIPE (App. C): LARS lr 0.2 · B/256, weight decay 1.5e-6 (biases and BN excluded from decay and
adaptation), 10 warm-up epochs, cosine. SMALL: heads 256 → 64, EMA from 0.99, lr 1.0, 1 warm-up epoch.
"""

from __future__ import annotations

import torch

from ..models.layers import mlp
from ..nn.ema import EMA
from .base import Method, check_views, negative_cosine


class BYOL(Method):
    """BYOL: the online network's predictions regress the EMA target's projections of the other view.

    Args:
        backbone: the trunk (`num_features` wide).
        hidden_dim: the projector's and predictor's hidden width.
        out_dim: the projection width.
        momentum: the target's initial EMA momentum (→ 1 on a cosine).
        gather_distributed: unused (the loss is per sample; the heads' BN spans all ranks by itself).
    """

    name = "byol"
    preset = "byol"
    min_batch_per_rank = 2
    RECIPE = dict(optimizer="lars", lr=0.2, weight_decay=1.5e-6, warmup_epochs=10, momentum=0.9)
    SMALL = dict(hidden_dim=256, out_dim=64, momentum=0.99, lr=1.0, warmup_epochs=1)

    def __init__(
        self,
        backbone,
        *,
        hidden_dim: int = 4096,
        out_dim: int = 256,
        momentum: float = 0.996,
        gather_distributed: bool = False,
    ):
        super().__init__(backbone, gather_distributed=gather_distributed)
        self.projector = mlp(self.feature_dim, hidden_dim, out_dim, 2)
        self.predictor = mlp(out_dim, hidden_dim, out_dim, 2)
        # the target follows backbone + projector (a Sequential kept unregistered: no duplicate state-dict keys)
        self.ema = EMA(torch.nn.Sequential(self.backbone, self.projector), momentum=momentum, final_momentum=1.0)

    def forward(self, views):
        check_views(self.name, views, 2)
        p1, p2 = (self.predictor(self.ema.student(v)) for v in views[:2])
        with torch.no_grad():
            z1, z2 = (self.ema.teacher(v) for v in views[:2])
        return 4 + 2 * (negative_cosine(p1, z2) + negative_cosine(p2, z1))
