"""SSL backbones: ResNet-18/50 (and a tiny CPU ResNet), ViT micro/tiny/small/base, timm models by name.

    net = sslfast.models.build_backbone("resnet50", image_size=224)   # net(x) -> [B, net.num_features]

Names: `resnet_tiny`, `resnet18`, `resnet50`, `vit_micro`, `vit_tiny`, `vit_small`, `vit_base` (optionally
`vit_small/8` for the patch size), or `timm:<name>` / any timm model name when timm is installed (created
with `num_classes=0`, no pretrained weights).
"""

from __future__ import annotations

from torch import nn

from .layers import SyncBatchNorm, convert_sync_batchnorm, mlp
from .resnet import ResNet, resnet18, resnet50, resnet_tiny
from .vit import VisionTransformer, default_patch_size, vit

_RESNETS = {"resnet_tiny": resnet_tiny, "resnet18": resnet18, "resnet50": resnet50}
VIT_NAMES = ("vit_micro", "vit_tiny", "vit_small", "vit_base")

__all__ = [
    "ResNet",
    "SyncBatchNorm",
    "VisionTransformer",
    "build_backbone",
    "check_backbone",
    "convert_sync_batchnorm",
    "default_patch_size",
    "is_vit",
    "list_backbones",
    "mlp",
    "resnet18",
    "resnet50",
    "resnet_tiny",
    "vit",
]


def list_backbones() -> list[str]:
    """The built-in backbone names (ResNets, then ViTs; timm models are not listed).

    Returns:
        A new list of names `build_backbone` accepts.
    """
    return [*_RESNETS, *VIT_NAMES]


def is_vit(name: str) -> bool:
    """Whether a backbone name is a built-in ViT (`vit_small`, `vit_small/8`, ...).

    Args:
        name: a backbone name.

    Returns:
        True for the names of `VIT_NAMES`, with or without a "/patch" suffix.
    """
    return name.split("/")[0] in VIT_NAMES


def _timm():
    try:
        import timm
    except ImportError:
        return None
    return timm


def check_backbone(name: str) -> None:
    """Checks that `build_backbone` can make `name`.

    Args:
        name: a built-in name (optionally "vit_*/<patch>") or a timm model name ("timm:<name>" or bare).

    Raises:
        ValueError: an unknown name (the message lists the built-in ones), or a non-integer ViT patch size.
    """
    base, _, patch = name.partition("/")
    if name in _RESNETS or (base in VIT_NAMES and (not patch or patch.isdigit())):
        return
    timm = _timm()
    if timm is not None and (name.startswith("timm:") or name in timm.list_models()):
        return
    if base in VIT_NAMES:
        raise ValueError(f"backbone {name!r}: the patch size after '/' must be an integer")
    hint = "" if timm is not None else " (timm is not installed, so timm model names are unavailable)"
    raise ValueError(f"unknown backbone {name!r}; choose one of {list_backbones()} or a timm model name{hint}")


def build_backbone(name: str, *, image_size: int = 224, in_chans: int = 3, **kw) -> nn.Module:
    """A backbone whose forward returns pooled features [B, num_features].

    Args:
        name: a name `check_backbone` accepts.
        image_size: the training resolution (ResNets pick their stem from it, ViTs their patch grid).
        in_chans: input channels.
        **kw: further constructor arguments (`ResNet`, `VisionTransformer` or the timm model's).

    Returns:
        The module, with its feature width in `num_features`.

    Raises:
        ValueError: an unknown name (`check_backbone`).
    """
    check_backbone(name)
    if name in _RESNETS:
        return _RESNETS[name](image_size=image_size, in_chans=in_chans, **kw)
    base, _, patch = name.partition("/")
    if base in VIT_NAMES:
        return vit(base, image_size=image_size, patch_size=int(patch) if patch else None, in_chans=in_chans, **kw)
    timm_name = name[5:] if name.startswith("timm:") else name
    try:
        return _timm().create_model(
            timm_name, pretrained=False, num_classes=0, in_chans=in_chans, img_size=image_size, **kw
        )
    except TypeError:  # convnets take no img_size
        return _timm().create_model(timm_name, pretrained=False, num_classes=0, in_chans=in_chans, **kw)
