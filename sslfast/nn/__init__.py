"""`nn.Module` drop-ins over the fused ops (names follow lightly)."""

from .infonce import CLIPLoss, InfoNCELoss, NTXentLoss
from .dino import DINOLoss
from .ema import EMA
from .barlow import BarlowTwinsLoss, VICRegLoss
from .siglip import SigLIPLoss
from .heads import PrototypeHead, PrototypeLoss

__all__ = [
    "BarlowTwinsLoss",
    "CLIPLoss",
    "DINOLoss",
    "EMA",
    "InfoNCELoss",
    "NTXentLoss",
    "PrototypeHead",
    "PrototypeLoss",
    "SigLIPLoss",
    "VICRegLoss",
]
