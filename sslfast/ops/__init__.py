"""Op families: validation, dispatch (Triton / csrc / reference) and `torch.library` custom ops."""
from .infonce import clip_loss, info_nce_loss, nt_xent_loss

__all__ = ["clip_loss", "info_nce_loss", "nt_xent_loss"]

from . import mae  # noqa: E402
from .mae import (MaskInfo, bert_masking, gather_patches, gather_tokens, masked_mse_loss, patchify,  # noqa: E402
                  random_masking, unshuffle)

__all__ += ["mae", "MaskInfo", "bert_masking", "gather_patches", "gather_tokens", "masked_mse_loss", "patchify",
            "random_masking", "unshuffle"]

from . import ema  # noqa: E402
from .ema import adamw_ema_step_, ema_update_, lars_ema_step_, update_center_  # noqa: E402

__all__ += ["ema", "adamw_ema_step_", "ema_update_", "lars_ema_step_", "update_center_"]

from . import barlow  # noqa: E402
from .barlow import barlow_twins_loss, vicreg_loss  # noqa: E402

__all__ += ["barlow", "barlow_twins_loss", "vicreg_loss"]

from . import dino  # noqa: E402
from .dino import dino_loss  # noqa: E402

__all__ += ["dino", "dino_loss"]
