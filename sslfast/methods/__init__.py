"""SSL recipes on the fused ops: each method is an `nn.Module` whose `forward(views)` returns the training loss.

    backbone = sslfast.models.build_backbone("resnet50")
    method = sslfast.methods.build_method("byol", backbone)          # paper heads and hyperparameters
    loss = method(views); loss.backward(); opt.step()                 # teacher: method.ema (sslfast.EMA)

Names: simclr, mocov2, mocov3, byol, simsiam, barlowtwins, vicreg, mae, dino. Each module documents its paper,
heads, loss and training recipe (`Method.RECIPE`), and the CPU-sized `SMALL` profile of the digits demo.
"""
from __future__ import annotations

from torch import nn

from .barlow_twins import BarlowTwins
from .base import Method
from .byol import BYOL
from .dino import DINO, DINOHead
from .mae import MAE
from .moco import MoCoV2, MoCoV3
from .simclr import SimCLR
from .simsiam import SimSiam
from .vicreg import VICReg

METHODS: dict[str, type[Method]] = {m.name: m for m in (SimCLR, MoCoV2, MoCoV3, BYOL, SimSiam, BarlowTwins, VICReg,
                                                        MAE, DINO)}

__all__ = ["BYOL", "BarlowTwins", "DINO", "DINOHead", "MAE", "METHODS", "Method", "MoCoV2", "MoCoV3", "SimCLR",
           "SimSiam", "VICReg", "build_method", "get_method"]


def get_method(name: str) -> type[Method]:
    try:
        return METHODS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHODS)}") from None


def build_method(name: str, backbone: nn.Module, *, profile: str = "paper", gather_distributed: bool = False,
                 **overrides) -> Method:
    """The method `name` on `backbone`, with its paper's heads (`profile="paper"`) or the CPU-sized ones
    (`"small"`); `overrides` replace constructor arguments."""
    if profile not in ("paper", "small"):
        raise ValueError(f"profile must be 'paper' or 'small', got {profile!r}")
    cls = get_method(name)
    kwargs = {**cls.head_config(profile), **overrides}
    return cls(backbone, gather_distributed=gather_distributed, **kwargs)
