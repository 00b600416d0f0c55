"""`nn.Module` drop-ins over the fused ops (names follow lightly)."""
from .contrastive import CLIPLoss, InfoNCELoss, NTXentLoss

__all__ = ["CLIPLoss", "InfoNCELoss", "NTXentLoss"]
