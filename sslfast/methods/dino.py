"""DINO (Caron et al., 2021, "Emerging Properties in Self-Supervised Vision Transformers", arXiv:2104.14294;
facebookresearch/dino).

Student: backbone → head (3-layer MLP 2048 wide with GELU, no BN, to a 256-d bottleneck, L2-normalized, then a
weight-normalized bias-free linear layer to K = 65536 prototypes whose norm is fixed, "norm_last_layer").
Teacher: an EMA of backbone + head (`sslfast.EMA`, 0.996 → 1 on a cosine). Multi-crop: the student sees every
crop (2 global + the local ones, each resolution batched through the backbone once), the teacher the 2 global
ones. Loss: the centered, sharpened cross-entropy over all (global, other crop) pairs with the center EMA
(momentum 0.9, the `center` buffer of `sslfast.nn.DINOLoss`, which also holds the τ_t warm-up), τ_s = 0.1,
τ_t = 0.04:

* `fused_head=True` (the default): the head's last layer and the loss in one op. The teacher's targets come
  from its normalized bottleneck features and prototypes (`sf.prototype_teacher_probs`, which also updates the
  center), the student's cross-entropy from its features and prototypes (`sf.prototype_cross_entropy`, through
  `sslfast.nn.heads.multicrop_prototype_loss`): the [V·B, K] student logits, their softmax and their gradient
  are never stored (only per-row statistics; the backward recomputes the logits tile by tile). The teacher's
  [G·B, K] targets remain. Same loss, center update and gradients as the materialized path (up to rounding).
* `fused_head=False`: the materialized path, `head(x)` → [V·B, K] logits → `sslfast.dino_loss`.

Both keep the parameters and buffers (`head.last_layer.weight`, `criterion.center`): checkpoints load either way.

RECIPE (main_dino.py defaults): AdamW lr 5e-4 · B/256, weight decay 0.04 (DINO raises it to 0.4 on a cosine;
kept constant here), 10 warm-up epochs, cosine; the last layer frozen during the first epoch. Gradient
clipping (3.0 in DINO) is not applied. The teacher is the evaluated network. SMALL: head 256 → 64 → 1024
prototypes with BN in the head (DINO's `use_bn_in_head`, its ConvNet option: without it the tiny CPU
backbone's near-identical initial outputs are centered away and the outputs collapse to uniform), EMA from
0.99, lr 2e-3, 1 warm-up epoch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..models.layers import SyncBatchNorm
from ..nn.dino import DINOLoss
from ..nn.ema import EMA
from ..nn.heads import multicrop_prototype_loss, multicrop_rows
from ..ops.prototype_ce import prototype_teacher_probs
from .base import BenchStep, Method, check_views, loss_region


class NormedLinear(nn.Module):
    """Bias-free linear layer with rows of unit norm: weight_norm(Linear) with its gain fixed at 1."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_dim, in_dim))
        nn.init.trunc_normal_(self.weight, std=0.02)

    def forward(self, x):
        return F.linear(x, F.normalize(self.weight, dim=1))


class DINOHead(nn.Module):
    """DINO's projection head: a 3-layer MLP (GELU, optional BN) to an L2-normalized bottleneck, then a
    `NormedLinear` to the prototypes.

    Args:
        in_dim: the input (feature) width.
        out_dim: the number of prototypes K.
        hidden_dim: the MLP's hidden width.
        bottleneck_dim: the bottleneck width.
        use_bn: `SyncBatchNorm` after the two hidden layers (DINO's `use_bn_in_head`).
    """

    def __init__(
        self, in_dim: int, out_dim: int = 65536, hidden_dim: int = 2048, bottleneck_dim: int = 256, use_bn: bool = False
    ):
        super().__init__()
        norm = (lambda: SyncBatchNorm(hidden_dim)) if use_bn else nn.Identity
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            norm(),
            nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim),
            norm(),
            nn.GELU(),
            nn.Linear(hidden_dim, bottleneck_dim),
        )
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = NormedLinear(bottleneck_dim, out_dim)

    def forward(self, x):
        """The materialized logits [N, K] of inputs x [N, in_dim]."""
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The L2-normalized bottleneck features [N, bottleneck_dim] of x [N, in_dim] (`forward`'s last layer input)."""
        return F.normalize(self.mlp(x), dim=-1)

    def prototypes(self) -> torch.Tensor:
        """The last layer's effective weight [K, bottleneck_dim]: its rows scaled to unit norm, so that
        `forward(x)` = features(x) · prototypes()ᵀ."""
        return F.normalize(self.last_layer.weight, dim=1)


def _multicrop(backbone: nn.Module, crops) -> torch.Tensor:
    """Backbone features of every crop, [sum of B, D], each run of same-size crops in one batch (in order)."""
    out, i = [], 0
    while i < len(crops):
        j = i
        while j < len(crops) and crops[j].shape[-2:] == crops[i].shape[-2:]:
            j += 1
        out.append(backbone(torch.cat(list(crops[i:j]))))
        i = j
    return torch.cat(out)


class DINO(Method):
    """DINO: the student's multi-crop outputs match the centered, sharpened outputs of the EMA teacher on the
    global crops.

    Args:
        backbone: the trunk (`num_features` wide).
        out_dim: the number of prototypes K.
        hidden_dim: the head MLP's hidden width.
        bottleneck_dim: the head's bottleneck width.
        momentum: the teacher's initial EMA momentum (→ 1 on a cosine).
        student_temp: τ_s.
        teacher_temp: τ_t after its warm-up.
        warmup_teacher_temp: τ_t at the start of its warm-up.
        warmup_teacher_temp_epochs: epochs of the linear τ_t warm-up (0: none).
        center_momentum: the center's EMA momentum.
        num_global_crops: the leading views the teacher sees.
        freeze_last_layer: epochs during which the prototypes get no update.
        use_bn_in_head: BN in the head MLP.
        gather_distributed: the center over the global batch (all ranks).
        fused_head: the last layer and the loss fused, without the student logits (module docstring); False:
            the materialized logits and `sslfast.dino_loss`.
    """

    name = "dino"
    preset = "dino"
    default_backbone = {"small": "resnet_tiny", "paper": "vit_small"}  # the paper is ViT-first
    bench_step = BenchStep(batch=64)  # the per-GPU batch of main_dino.py's ViT-S runs, 2 × 224 + 8 × 96 crops
    # SMALL's BN in the head follows biased linears: their gradients are rounding noise around an exact zero,
    # which AdamW scales to full lr-sized steps, different on 2 ranks and on 1 process
    exact_across_ranks = False
    graph_refusal = (
        "dino's teacher temperature and its last-layer freeze follow the step count on the host; a captured "
        "step would keep their capture-time values (use --compile)"
    )
    RECIPE = dict(optimizer="adamw", lr=5e-4, weight_decay=0.04, warmup_epochs=10, betas=(0.9, 0.999))
    SMALL = dict(
        out_dim=1024, hidden_dim=256, bottleneck_dim=64, use_bn_in_head=True, momentum=0.99, lr=2e-3, warmup_epochs=1
    )

    def __init__(
        self,
        backbone,
        *,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        momentum: float = 0.996,
        student_temp: float = 0.1,
        teacher_temp: float = 0.04,
        warmup_teacher_temp: float = 0.04,
        warmup_teacher_temp_epochs: int = 0,
        center_momentum: float = 0.9,
        num_global_crops: int = 2,
        freeze_last_layer: int = 1,
        use_bn_in_head: bool = False,
        gather_distributed: bool = False,
        fused_head: bool = True,
    ):
        if not isinstance(fused_head, bool):
            raise TypeError(f"fused_head must be a bool, got {type(fused_head).__name__}")
        super().__init__(backbone, gather_distributed=gather_distributed)
        self.fused_head = fused_head
        self.head = DINOHead(self.feature_dim, out_dim, hidden_dim, bottleneck_dim, use_bn_in_head)
        # the teacher follows backbone + head (a Sequential kept unregistered: no duplicate state-dict keys)
        self.ema = EMA(nn.Sequential(self.backbone, self.head), momentum=momentum, final_momentum=1.0)
        self.criterion = DINOLoss(
            output_dim=out_dim,
            warmup_teacher_temp=warmup_teacher_temp,
            teacher_temp=teacher_temp,
            warmup_teacher_temp_epochs=warmup_teacher_temp_epochs,
            student_temp=student_temp,
            center_momentum=center_momentum,
            num_global_crops=num_global_crops,
        )
        self.num_global_crops = num_global_crops
        self.freeze_last_layer = freeze_last_layer

    def forward(self, views):
        G = self.num_global_crops
        check_views(self.name, views, G + (1 if G == 1 else 0))
        if self.fused_head:
            return self._fused_loss(views)
        student = self.head(_multicrop(self.backbone, views))
        with torch.no_grad():
            teacher = self.ema.teacher[1](_multicrop(self.ema.teacher[0], views[:G]))
        with loss_region(student):
            return self.criterion(teacher, student, epoch=self.epoch_float)

    def _fused_loss(self, views) -> torch.Tensor:
        """The loss from the heads' features and prototypes (module docstring), the center updated in training."""
        G, crit = self.num_global_crops, self.criterion
        student = self.head.features(_multicrop(self.backbone, views))
        t_head = self.ema.teacher[1]
        with torch.no_grad():
            teacher = t_head.features(_multicrop(self.ema.teacher[0], views[:G]))
            t_weight = t_head.prototypes()
        multicrop_rows(student.shape[0], teacher.shape[0], num_global_crops=G)  # before the center update
        with loss_region(student):
            q = prototype_teacher_probs(
                teacher,
                t_weight.to(teacher.dtype),
                teacher_temp=crit.teacher_temperature(self.epoch_float),
                center=crit.center,
                center_momentum=crit.center_momentum if crit.training else None,
            )
            return multicrop_prototype_loss(
                student, self.head.prototypes().to(student.dtype), q, num_global_crops=G, student_temp=crit.student_temp
            )

    def before_optimizer_step(self):
        if self.steps_per_epoch and self.epoch_float < self.freeze_last_layer:
            for p in self.head.last_layer.parameters():
                p.grad = None

    def eval_backbone(self):
        return self.ema.teacher[0]
