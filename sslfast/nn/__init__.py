"""`nn.Module` drop-ins over the fused ops (names follow lightly)."""
from .contrastive import CLIPLoss, InfoNCELoss, NTXentLoss

__all__ = ["CLIPLoss", "InfoNCELoss", "NTXentLoss"]

from .ema import EMA  # noqa: E402

__all__ += ["EMA"]

from .redundancy import BarlowTwinsLoss, VICRegLoss  # noqa: E402

__all__ += ["BarlowTwinsLoss", "VICRegLoss"]

from .dino import DINOLoss  # noqa: E402

__all__ += ["DINOLoss"]
