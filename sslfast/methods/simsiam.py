"""SimSiam (Chen & He, 2021, "Exploring Simple Siamese Representation Learning", arXiv:2011.10566;
facebookresearch/simsiam).

Projector: 3 layers of 2048 with BN on every layer, the output one included (affine-free, no ReLU); predictor:
2 layers with a 512 bottleneck (BN + ReLU on the hidden layer only). Loss: D(p1, sg(z2))/2 + D(p2, sg(z1))/2
with D the negative cosine; no teacher, no negatives.

RECIPE (§4 / App.): SGD lr 0.05 · B/256, momentum 0.9, weight decay 1e-4, cosine schedule, the predictor at a
fixed lr (not scheduled, "fix_pred_lr"). SMALL: projector 256, predictor bottleneck 64, lr 0.5.
"""

from __future__ import annotations

from ..models.layers import mlp
from .base import Method, check_views, negative_cosine


class SimSiam(Method):
    """SimSiam: symmetric negative cosine between predictions and the stop-gradient projections.

    Args:
        backbone: the trunk (`num_features` wide).
        dim: the projector's width (hidden and output).
        pred_dim: the predictor's bottleneck width.
        gather_distributed: unused (the loss is per sample; the heads' BN spans all ranks by itself).
    """

    name = "simsiam"
    preset = "moco_v2"  # "the same as MoCo v2" (§4)
    min_batch_per_rank = 2
    RECIPE = dict(optimizer="sgd", lr=0.05, weight_decay=1e-4, warmup_epochs=0, momentum=0.9)
    SMALL = dict(dim=256, pred_dim=64, lr=0.5)

    def __init__(self, backbone, *, dim: int = 2048, pred_dim: int = 512, gather_distributed: bool = False):
        super().__init__(backbone, gather_distributed=gather_distributed)
        self.projector = mlp(self.feature_dim, dim, dim, 3, last_batch_norm=True, last_affine=False)
        self.predictor = mlp(dim, pred_dim, dim, 2)

    def param_groups(self):
        """`Method.param_groups`, each split in the rest and the predictor, the latter with `fixed_lr`."""
        pred = {id(p) for p in self.predictor.parameters()}
        groups = []
        for g in super().param_groups():
            body = [p for p in g["params"] if id(p) not in pred]
            head = [p for p in g["params"] if id(p) in pred]
            groups += [dict(g, params=body), dict(g, params=head, fixed_lr=True)]
        return [g for g in groups if g["params"]]

    def forward(self, views):
        check_views(self.name, views, 2)
        z1, z2 = (self.projector(self.backbone(v)) for v in views[:2])
        p1, p2 = self.predictor(z1), self.predictor(z2)
        return (negative_cosine(p1, z2) + negative_cosine(p2, z1)) / 2
