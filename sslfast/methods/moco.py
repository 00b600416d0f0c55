"""MoCo v2 and v3: a query encoder trained by InfoNCE against the keys of an EMA key encoder.

MoCo v2 (Chen, Fan, Girshick, He, 2020, "Improved Baselines with Momentum Contrastive Learning",
arXiv:2003.04297; facebookresearch/moco): projector MLP 2048 → 128 without BN, a queue of 65536 keys
(`sslfast.nn.InfoNCELoss`, keys gathered over ranks with `gather_distributed`), τ = 0.2, key-encoder momentum
0.999 (constant). RECIPE: SGD lr 0.03 · B/256, momentum 0.9, weight decay 1e-4, cosine. Shuffling BN is not
implemented (the key encoder runs with its batch statistics on each rank). SMALL: queue 1024, momentum 0.99,
projector 256 → 64 with BN after both layers (affine-free at the output, as MoCo v3: without it the tiny
CPU backbone starts with nearly identical outputs and the stop-gradient keys give no signal), lr 0.3.

MoCo v3 (Chen, Xie, He, 2021, "An Empirical Study of Training Self-Supervised Vision Transformers",
arXiv:2104.02057; facebookresearch/moco-v3): projector 3 layers 4096 → 256 and predictor 2 layers 4096 → 256,
BN throughout with an affine-free last BN; symmetric loss ctr(q1, k2) + ctr(q2, k1) with
ctr = 2τ · InfoNCE over the (global) batch (`sslfast.info_nce_loss`, no queue); momentum 0.99 → 1 (cosine).
RECIPE (ResNet-50): LARS lr 0.6 · B/256, weight decay 1e-6, τ = 1.0, 10 warm-up epochs; for a ViT backbone
the ViT recipe: AdamW lr 1.5e-4 · B/256, weight decay 0.1, τ = 0.2, 40 warm-up epochs. SMALL: heads 256 → 64,
τ = 0.2, 1 warm-up epoch.
"""

from __future__ import annotations

import torch

from ..models import VisionTransformer
from ..models.layers import mlp
from ..nn.infonce import InfoNCELoss
from ..nn.ema import EMA
from ..ops.infonce import info_nce_loss
from .base import BenchStep, Method, check_views, loss_region


class MoCoV2(Method):
    """MoCo v2: InfoNCE of the query against its key (EMA encoder) and a queue of past keys.

    Args:
        backbone: the trunk (`num_features` wide).
        hidden_dim: the projector's hidden width.
        out_dim: the projection (key) width.
        temperature: InfoNCE's τ.
        queue_size: keys kept in the queue.
        momentum: the key encoder's EMA momentum (constant).
        batch_norm: BN after both projector layers (SMALL's setting).
        gather_distributed: enqueue the keys of all ranks.
    """

    name = "mocov2"
    preset = "moco_v2"
    RECIPE = dict(optimizer="sgd", lr=0.03, weight_decay=1e-4, warmup_epochs=0, momentum=0.9)
    graph_refusal = (
        "mocov2's queue position is a host-side ring index; a captured step would enqueue into one slot "
        "forever (use --compile)"
    )
    SMALL = dict(hidden_dim=256, out_dim=64, queue_size=1024, momentum=0.99, batch_norm=True, lr=0.3)
    # a queue filled within one step of a short run: the 1024 keys of SMALL take queue_size / batch steps to
    # replace the random initial queue, whose easy negatives make the loss rise first
    short_run = dict(queue_size=128)

    def __init__(
        self,
        backbone,
        *,
        hidden_dim: int = 2048,
        out_dim: int = 128,
        temperature: float = 0.2,
        queue_size: int = 65536,
        momentum: float = 0.999,
        batch_norm: bool = False,
        gather_distributed: bool = False,
    ):
        super().__init__(backbone, gather_distributed=gather_distributed)
        self.projector = mlp(
            self.feature_dim,
            hidden_dim,
            out_dim,
            2,
            batch_norm=batch_norm,
            last_batch_norm=batch_norm,
            last_affine=False,
        )
        # the EMA follows backbone + projector (a Sequential kept unregistered: no duplicate state-dict keys)
        self.ema = EMA(torch.nn.Sequential(self.backbone, self.projector), momentum=momentum, final_momentum=momentum)
        self.criterion = InfoNCELoss(temperature, queue_size, out_dim, gather_distributed=gather_distributed)

    def forward(self, views):
        check_views(self.name, views, 2)
        q = self.ema.student(views[0])
        with torch.no_grad():
            k = self.ema.teacher(views[1])
        with loss_region(q):
            return self.criterion(q, k)


class MoCoV3(Method):
    """MoCo v3: symmetric InfoNCE between predicted queries and the EMA encoder's keys, in-batch negatives.

    Args:
        backbone: the trunk (`num_features` wide); a `VisionTransformer` gets the ViT heads and τ.
        hidden_dim: the projector's and predictor's hidden width.
        out_dim: the projection width.
        temperature: InfoNCE's τ; None: 0.2 on a ViT, 1.0 otherwise.
        momentum: the key encoder's initial EMA momentum (→ 1 on a cosine).
        gather_distributed: negatives from the global batch (all ranks).
    """

    name = "mocov3"
    preset = "byol"  # MoCo v3 uses BYOL's augmentations (§4)
    min_batch_per_rank = 2
    RECIPE = dict(optimizer="lars", lr=0.6, weight_decay=1e-6, warmup_epochs=10, momentum=0.9)
    RECIPE_VIT = dict(optimizer="adamw", lr=1.5e-4, weight_decay=0.1, warmup_epochs=40, betas=(0.9, 0.999))
    SMALL = dict(hidden_dim=256, out_dim=64, temperature=0.2, warmup_epochs=1)
    bench_step = BenchStep(backbone="vit_small")  # the paper's ViT study

    def __init__(
        self,
        backbone,
        *,
        hidden_dim: int = 4096,
        out_dim: int = 256,
        temperature: float | None = None,
        momentum: float = 0.99,
        gather_distributed: bool = False,
    ):
        super().__init__(backbone, gather_distributed=gather_distributed)
        vit = isinstance(backbone, VisionTransformer)
        self.temperature = temperature if temperature is not None else (0.2 if vit else 1.0)
        self.projector = mlp(
            self.feature_dim, hidden_dim, out_dim, 3 if vit else 2, last_batch_norm=True, last_affine=False
        )
        self.predictor = mlp(out_dim, hidden_dim, out_dim, 2, last_batch_norm=True, last_affine=False)
        # the EMA follows backbone + projector (a Sequential kept unregistered: no duplicate state-dict keys)
        self.ema = EMA(torch.nn.Sequential(self.backbone, self.projector), momentum=momentum, final_momentum=1.0)

    @classmethod
    def recipe(cls, profile: str = "paper", *, vit: bool = False) -> dict:
        """`Method.recipe`, with the ViT recipe (RECIPE_VIT; SMALL's warm-up for "small") when `vit`."""
        out = super().recipe(profile)
        if vit:
            out.update(cls.RECIPE_VIT)
            if profile == "small":
                out["warmup_epochs"] = cls.SMALL["warmup_epochs"]
        return out

    def _ctr(self, q, k):
        with loss_region(q):
            return (
                2
                * self.temperature
                * info_nce_loss(q, k, None, self.temperature, gather_distributed=self.gather_distributed)
            )

    def forward(self, views):
        check_views(self.name, views, 2)
        q1, q2 = (self.predictor(self.ema.student(v)) for v in views[:2])
        with torch.no_grad():
            k1, k2 = (self.ema.teacher(v) for v in views[:2])
        return self._ctr(q1, k2) + self._ctr(q2, k1)
