"""sslfast: fused kernels for self-supervised pretraining under a thin PyTorch API."""
from . import nn, ops
from .ops.infonce import clip_loss, info_nce_loss, nt_xent_loss

__version__ = "0.1.0"

__all__ = ["clip_loss", "info_nce_loss", "nt_xent_loss", "nn", "ops", "__version__"]

from . import mae  # noqa: E402  (MAE: sf.mae.random_masking, gather_patches, unshuffle, masked_mse_loss, ...)

__all__ += ["mae"]
