"""sslfast: fused kernels for self-supervised pretraining under a thin PyTorch API.

Losses (CUDA tensors: fused kernels; CPU tensors: memory-safe PyTorch; see `sslfast._backend`):
`nt_xent_loss`, `info_nce_loss`, `clip_loss`, `siglip_loss`, `barlow_twins_loss`, `vicreg_loss`, `dino_loss`;
DINOv2 / SwAV pieces: `sinkhorn_knopp`, `koleo_loss`.
MAE masking ops in `sslfast.mae`; teacher EMA in `ema_update_` / `EMA` (fused optimizer steps in
`sslfast.optim`); modules in `sslfast.nn`; augmentation and loaders in `sslfast.data`; backbones and recipes in
`sslfast.models` / `sslfast.methods`.

In eager training the contrastive and MAE losses compute their input gradients in the forward pass and hand
them out in the backward; `separate_backward()` makes them wait for the backward pass instead (needed to run
backward through such a loss twice, e.g. with retain_graph=True).
"""

from . import data, mae, methods, models, nn, ops
from ._custom_op import separate_backward
from .nn.ema import EMA
from .ops.barlow import barlow_twins_loss, vicreg_loss
from .ops.dino import dino_loss
from .ops.ema import ema_update_
from .ops.ibot import ibot_patch_loss, ibot_patch_loss_masked
from .ops.infonce import clip_loss, info_nce_loss, nt_xent_loss
from .ops.koleo import koleo_loss
from .ops.prototype_ce import prototype_cross_entropy, prototype_teacher_probs
from .ops.siglip import siglip_loss
from .ops.sinkhorn import sinkhorn_knopp
from .ops.swav import swav_loss

__version__ = "0.1.0"

__all__ = [
    "barlow_twins_loss",
    "clip_loss",
    "data",
    "dino_loss",
    "EMA",
    "ema_update_",
    "ibot_patch_loss",
    "ibot_patch_loss_masked",
    "info_nce_loss",
    "koleo_loss",
    "mae",
    "methods",
    "models",
    "nn",
    "nt_xent_loss",
    "ops",
    "prototype_cross_entropy",
    "prototype_teacher_probs",
    "separate_backward",
    "siglip_loss",
    "sinkhorn_knopp",
    "swav_loss",
    "vicreg_loss",
    "__version__",
]
