"""Op families: validation, dispatch (`_family.Family`: Triton / csrc / PyTorch) and `torch.library` custom ops."""

from .._custom_op import DoubleBackwardError
from . import augment, barlow, dino, ema, fused_optim, infonce, mae
from .barlow import barlow_twins_loss, vicreg_loss
from .dino import dino_loss, update_center_
from .ema import ema_update_
from .fused_optim import adamw_ema_step_, lars_ema_step_
from .ibot import ibot_patch_loss, ibot_patch_loss_masked
from .infonce import clip_loss, info_nce_loss, nt_xent_loss
from .koleo import koleo_loss
from .prototype_ce import prototype_cross_entropy, prototype_teacher_probs
from .siglip import siglip_loss
from .sinkhorn import sinkhorn_knopp
from .swav import swav_loss
from .mae import (
    MaskInfo,
    bert_masking,
    gather_patches,
    gather_tokens,
    masked_mse_loss,
    patchify,
    random_masking,
    unshuffle,
)

__all__ = [
    "adamw_ema_step_",
    "augment",
    "barlow",
    "barlow_twins_loss",
    "bert_masking",
    "clip_loss",
    "dino",
    "dino_loss",
    "DoubleBackwardError",
    "ema",
    "ema_update_",
    "fused_optim",
    "gather_patches",
    "gather_tokens",
    "ibot_patch_loss",
    "ibot_patch_loss_masked",
    "info_nce_loss",
    "infonce",
    "koleo_loss",
    "lars_ema_step_",
    "mae",
    "masked_mse_loss",
    "MaskInfo",
    "nt_xent_loss",
    "patchify",
    "prototype_cross_entropy",
    "prototype_teacher_probs",
    "random_masking",
    "siglip_loss",
    "sinkhorn_knopp",
    "swav_loss",
    "unshuffle",
    "update_center_",
    "vicreg_loss",
]
