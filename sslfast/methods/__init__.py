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
from .base import BenchStep, Method
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
    trainer, the CLI, the tests and the benches need comes from the class's traits (`Method`'s docstring lists
    them).

    Args:
        cls: the `Method` subclass; its `name` is lower case, `default_backbone` has the keys "small" and
            "paper", `bench_step` is a `BenchStep` or None.

    Returns:
        `cls` itself.

    Raises:
        TypeError: `cls` is not a `Method` subclass, or its `bench_step` is neither a `BenchStep` nor None.
        ValueError: another class is already registered under that name, the name is empty or not lower case,
            or `default_backbone` lacks a profile.
    """
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise TypeError(f"register_method needs a Method subclass, got {cls!r}")
    if not (isinstance(cls.name, str) and cls.name and cls.name == cls.name.lower()):
        raise ValueError(f"{cls.__name__}.name must be a non-empty lower-case string, got {cls.name!r}")
    if not {"small", "paper"} <= set(cls.default_backbone):
        raise ValueError(
            f"{cls.__name__}.default_backbone needs the keys 'small' and 'paper', got {sorted(cls.default_backbone)}"
        )
    if cls.bench_step is not None and not isinstance(cls.bench_step, BenchStep):
        raise TypeError(f"{cls.__name__}.bench_step must be a BenchStep or None, got {type(cls.bench_step).__name__}")
    if METHODS.get(cls.name, cls) is not cls:
        raise ValueError(f"a method named {cls.name!r} is already registered ({METHODS[cls.name].__name__})")
    METHODS[cls.name] = cls
    return cls


register_method(SimCLR)
register_method(MoCoV2)
register_method(MoCoV3)
register_method(BYOL)
register_method(SimSiam)
register_method(BarlowTwins)
register_method(VICReg)
register_method(MAE)
register_method(DINO)
register_method(SwAV)
register_method(DINOv2)

__all__ = [
    "BYOL",
    "BarlowTwins",
    "BenchStep",
    "DINO",
    "DINOHead",
    "DINOv2",
    "MAE",
    "METHODS",
    "Method",
    "MoCoV2",
    "MoCoV3",
    "SimCLR",
    "SimSiam",
    "SwAV",
    "VICReg",
    "build_method",
    "get_method",
    "register_method",
]


def get_method(name: str) -> type[Method]:
    """The registered class of a method name.

    Args:
        name: a registered name, any case (`sslfast.methods.METHODS`).

    Returns:
        The `Method` subclass.

    Raises:
        ValueError: `name` is not registered (the message lists the names that are).
    """
    try:
        return METHODS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHODS)}") from None


def build_method(
    name: str, backbone: nn.Module, *, profile: str = "paper", gather_distributed: bool = False, **overrides
) -> Method:
    """The method `name` on `backbone`, with its paper's heads or the CPU-sized ones.

    Args:
        name: a registered method name (`get_method`).
        backbone: the trunk (e.g. `sslfast.models.build_backbone(...)`).
        profile: "paper" (the constructor's defaults) or "small" (the class's SMALL head settings).
        gather_distributed: compute the batch-wide loss terms over all ranks.
        **overrides: constructor keyword arguments replacing the profile's.

    Returns:
        The `Method` instance.

    Raises:
        ValueError: an unknown `profile` or `name`, or a constructor's own argument checks.
    """
    if profile not in ("paper", "small"):
        raise ValueError(f"profile must be 'paper' or 'small', got {profile!r}")
    cls = get_method(name)
    kwargs = {**cls.head_config(profile), **overrides}
    return cls(backbone, gather_distributed=gather_distributed, **kwargs)
