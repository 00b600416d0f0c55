"""SSL recipes on the fused ops: each method is an `nn.Module` whose `forward(views)` returns the training loss.

    backbone = sslfast.models.build_backbone("resnet50")
    method = sslfast.methods.build_method("byol", backbone)          # paper heads and hyperparameters
    loss = method(views); loss.backward(); opt.step()                 # teacher: method.ema (sslfast.EMA)

Names: simclr, mocov2, mocov3, byol, simsiam, barlowtwins, vicreg, mae, dino, dinov2, swav. Each module documents
its paper, heads, loss and training recipe (`Method.RECIPE`), and the CPU-sized `SMALL` profile of the digits demo.
A new method is one module and one `register_method` line (CONTRIBUTING.md, "Adding a method").
"""
from __future__ import annotations

from torch import nn

from .barlow_twins import BarlowTwins
from .base import Method
from .byol import BYOL
from .dino import DINO, DINOHead
from .dinov2 import DINOv2
from .mae import MAE
from .moco import MoCoV2, MoCoV3
from .simclr import SimCLR
from .simsiam import SimSiam
from .swav import SwAV
from .vicreg import VICReg

METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Adds a `Method` subclass to the registry under `cls.name` (usable as a class decorator). Everything the
    trainer needs comes from the class's traits (`Method`'s docstring lists them).

    Raises:
        TypeError: `cls` is not a `Method` subclass.
        ValueError: another class is already registered under that name.
    """
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise TypeError(f"register_method needs a Method subclass, got {cls!r}")
    if METHODS.get(cls.name, cls) is not cls:
        raise ValueError(f"a method named {cls.name!r} is already registered ({METHODS[cls.name].__name__})")
    METHODS[cls.name] = cls
    return cls


for _cls in (SimCLR, MoCoV2, MoCoV3, BYOL, SimSiam, BarlowTwins, VICReg, MAE, DINO):
    register_method(_cls)
register_method(SwAV)
register_method(DINOv2)

__all__ = ["BYOL", "BarlowTwins", "DINO", "DINOHead", "DINOv2", "MAE", "METHODS", "Method", "MoCoV2", "MoCoV3",
           "SimCLR", "SimSiam", "SwAV", "VICReg", "build_method", "get_method", "register_method"]


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
