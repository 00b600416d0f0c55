"""Op families: validation, dispatch (Triton / csrc / reference) and `torch.library` custom ops."""
from .infonce import clip_loss, info_nce_loss, nt_xent_loss

__all__ = ["clip_loss", "info_nce_loss", "nt_xent_loss"]

from . import mae  # noqa: E402
from .mae import (MaskInfo, bert_masking, gather_patches, gather_tokens, masked_mse_loss, patchify,  # noqa: E402
                  random_masking, unshuffle)

__all__ += ["mae", "MaskInfo", "bert_masking", "gather_patches", "gather_tokens", "masked_mse_loss", "patchify",
            "random_masking", "unshuffle"]
