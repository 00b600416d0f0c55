"""SimCLR (Chen et al., 2020, "A Simple Framework for Contrastive Learning of Visual Representations",
arXiv:2002.05709; google-research/simclr).

Two views, a projector MLP (2 layers, hidden = 2048 with BN, output 128; §B.1 and the v1 code), NT-Xent over
the 2N projections (`sslfast.nt_xent_loss`, global over ranks with `gather_distributed`).

RECIPE (ImageNet, §B.1): LARS, lr = 0.3 · B/256, weight decay 1e-6, 10 warm-up epochs then cosine,
temperature 0.1 (the batch-4096 optimum, Table 5). SMALL (CPU digits demo): temperature 0.5 (the CIFAR-10
setting of §B.9), projector 256 → 64, LARS lr 2.0 · B/256, 1 warm-up epoch.
"""

from __future__ import annotations

import torch

from ..models.layers import mlp
from ..ops.infonce import nt_xent_loss
from .base import Method, check_views, loss_region


class SimCLR(Method):
    """SimCLR: NT-Xent between the projections of two views.

    Args:
        backbone: the trunk (`num_features` wide).
        hidden_dim: the projector's hidden width.
        out_dim: the projection width.
        temperature: NT-Xent's τ.
        gather_distributed: negatives from the global batch (all ranks).
    """

    name = "simclr"
    preset = "simclr"
    min_batch_per_rank = 2
    RECIPE = dict(optimizer="lars", lr=0.3, weight_decay=1e-6, warmup_epochs=10, momentum=0.9)
    SMALL = dict(temperature=0.5, hidden_dim=256, out_dim=64, lr=2.0, warmup_epochs=1)

    def __init__(
        self,
        backbone,
        *,
        hidden_dim: int = 2048,
        out_dim: int = 128,
        temperature: float = 0.1,
        gather_distributed: bool = False,
    ):
        super().__init__(backbone, gather_distributed=gather_distributed)
        self.temperature = temperature
        self.projector = mlp(self.feature_dim, hidden_dim, out_dim, 2)

    def forward(self, views):
        check_views(self.name, views, 2)
        z1, z2 = self.projector(self.backbone(torch.cat(views[:2]))).chunk(2)  # one pass, BN over 2N (as the v1 code)
        with loss_region(z1):
            return nt_xent_loss(z1, z2, self.temperature, gather_distributed=self.gather_distributed)
