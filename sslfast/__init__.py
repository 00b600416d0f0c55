"""sslfast: fused kernels for self-supervised pretraining under a thin PyTorch API."""
from . import nn, ops
from .ops.infonce import clip_loss, info_nce_loss, nt_xent_loss

__version__ = "0.1.0"

__all__ = ["clip_loss", "info_nce_loss", "nt_xent_loss", "nn", "ops", "__version__"]

from . import mae  # noqa: E402  (MAE: sf.mae.random_masking, gather_patches, unshuffle, masked_mse_loss, ...)

__all__ += ["mae"]

from .nn.ema import EMA  # noqa: E402  (teacher EMA: sf.ema_update_, sf.EMA; fused steps in sslfast.optim)
from .ops.ema import ema_update_  # noqa: E402

__all__ += ["EMA", "ema_update_"]

from .ops.barlow import barlow_twins_loss, vicreg_loss  # noqa: E402  (Barlow Twins, VICReg: no D x D matrix)

__all__ += ["barlow_twins_loss", "vicreg_loss"]

from . import data  # noqa: E402  (multi-view augmentation: sf.data.SSLLoader, presets, datasets)

__all__ += ["data"]

from .ops.dino import dino_loss  # noqa: E402  (DINO: all crop pairs + center EMA in one op)
from . import methods, models  # noqa: E402  (SSL recipes and backbones behind `sslfast pretrain`)

__all__ += ["dino_loss", "methods", "models"]
