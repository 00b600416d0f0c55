"""Op families: validation, dispatch (Triton / csrc / reference) and `torch.library` custom ops."""
from . import barlow, dino, ema, infonce, mae
from .barlow import barlow_twins_loss, vicreg_loss
from .dino import dino_loss
from .ema import adamw_ema_step_, ema_update_, lars_ema_step_, update_center_
from .infonce import clip_loss, info_nce_loss, nt_xent_loss
from .siglip import siglip_loss
from .sinkhorn import sinkhorn_knopp
from .mae import (MaskInfo, bert_masking, gather_patches, gather_tokens, masked_mse_loss, patchify, random_masking,
                  unshuffle)

__all__ = ["MaskInfo", "adamw_ema_step_", "barlow", "barlow_twins_loss", "bert_masking", "clip_loss", "dino",
           "dino_loss", "ema", "ema_update_", "gather_patches", "gather_tokens", "info_nce_loss", "infonce",
           "lars_ema_step_", "mae", "masked_mse_loss", "nt_xent_loss", "patchify", "random_masking", "siglip_loss",
           "unshuffle", "update_center_", "vicreg_loss"]
