"""Multi-view augmentation ops: per-sample parameters drawn on the device, the fused augmentation of packed
uint8 images into normalized NCHW views, and a per-sample separable Gaussian blur.

    sizes = ...                                   # [B, 2] int32 (H, W) on the device
    params = sample_view_params(spec, sizes, count=2, generator=g)   # [2, B, NUM_FIELDS] fp32, no host sync
    views = augment_views(flat, offsets, sizes, params, 224, dtype=torch.bfloat16)   # [2, B, 3, 224, 224]

`augment_batch` strings these together for a list of view specs (a preset). Math: `sslfast.reference.augment`;
parameter layout: `FIELDS`. CUDA tensors run the Triton kernels (`sslfast.kernels.augment`), CPU tensors the
PyTorch path in fp32 (`sslfast.ops._torch.augment`), chosen by `FAMILY` (`sslfast.ops._family`).
"""

from __future__ import annotations

from numbers import Integral
from typing import Protocol

import torch

from .. import _validate as V
from .._custom_op import custom_op
from ._family import Family
from ._torch.augment import FIELDS, NUM_FIELDS
from .augment_params import _int_tensor, pack_images, sample_view_params

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

__all__ = [
    "FAMILY",
    "FIELDS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "NUM_FIELDS",
    "AugmentImpl",
    "augment_batch",
    "augment_views",
    "gaussian_blur",
    "pack_images",
    "sample_view_params",
]


class AugmentImpl(Protocol):
    """What `kernels.augment` and `ops._torch.augment` both define."""

    def augment_views(
        self, images, offsets, sizes, params, out_h, out_w, chw, out_dtype, mean, std, blur_kernel, *, antialias=True
    ):
        """[G, B, 3, out_h, out_w] normalized views in out_dtype from packed uint8 images and parameter rows
        params [G, B, NUM_FIELDS]; samples with the blur flag are blurred with `blur_kernel` taps (0: no blur)."""

    def gaussian_blur(self, x, sigma, kernel_size):
        """[B, C, H, W] blurred per sample with sigma [B] fp32 (`kernel_size` taps, reflect padding), x's dtype."""


FAMILY = Family("augment", AugmentImpl)
_impl = FAMILY.impl


# ------------------------------------------------------------------------------------------- custom ops
def _fake_views(images, offsets, sizes, params, out_h, out_w, chw, out_dtype, mean, std, blur_kernel, antialias):
    return images.new_empty((params.shape[0], params.shape[1], 3, out_h, out_w), dtype=out_dtype)


@custom_op("augment_views", fake=_fake_views)
def _augment_views_op(
    images: torch.Tensor,
    offsets: torch.Tensor,
    sizes: torch.Tensor,
    params: torch.Tensor,
    out_h: int,
    out_w: int,
    chw: bool,
    out_dtype: torch.dtype,
    mean: list[float],
    std: list[float],
    blur_kernel: int,
    antialias: bool,
) -> torch.Tensor:
    return _impl(images, params).augment_views(
        images, offsets, sizes, params, out_h, out_w, chw, out_dtype, mean, std, blur_kernel, antialias=antialias
    )


@custom_op("gaussian_blur", fake=lambda x, sigma, kernel_size: torch.empty_like(x))
def _gaussian_blur_op(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    return _impl(x, sigma).gaussian_blur(x, sigma, kernel_size)


# ------------------------------------------------------------------------------------------- validation
def _size2(name: str, value) -> tuple[int, int]:
    if isinstance(value, Integral) and not isinstance(value, bool):
        value = (value, value)
    if (
        not isinstance(value, (tuple, list))
        or len(value) != 2
        or not all(isinstance(v, Integral) and not isinstance(v, bool) for v in value)
    ):
        raise TypeError(f"{name} must be an int or a pair of ints (H, W), got {value!r}")
    if min(value) < 1:
        raise ValueError(f"{name} must be positive, got {tuple(value)}")
    return int(value[0]), int(value[1])


def _kernel_size(value) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"blur_kernel must be an odd int (or 0 for no blur), got {type(value).__name__}")
    if value < 0 or (value and value % 2 == 0):
        raise ValueError(f"blur_kernel must be an odd positive int (or 0 for no blur), got {value}")
    return int(value)


def _flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def _triple(name: str, value) -> list[float]:
    vals = [float(v) for v in value]
    if len(vals) != 3:
        raise ValueError(f"{name} must have 3 values (one per RGB channel), got {len(vals)}")
    return vals


def _check_packed(images, offsets, sizes) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8:
        raise TypeError(
            "images must be a flat uint8 tensor of packed images (see pack_images), got "
            f"{type(images).__name__ if not isinstance(images, torch.Tensor) else images.dtype}"
        )
    images = images.reshape(-1).contiguous()
    offsets = _int_tensor("offsets", offsets, "[B]", 1, torch.int64)
    sizes = _int_tensor("sizes", sizes, "[B, 2] (H, W)", 2, torch.int32)
    if sizes.shape != (offsets.shape[0], 2):
        raise ValueError(
            f"sizes must be [B, 2] with B = {offsets.shape[0]} (offsets' length), got {tuple(sizes.shape)}"
        )
    V.same_device(images=images, offsets=offsets, sizes=sizes)
    if not images.is_cuda and offsets.numel():
        ends = offsets + 3 * sizes[:, 0].long() * sizes[:, 1].long()
        if int(sizes.min()) < 1 or int(offsets.min()) < 0 or int(ends.max()) > images.numel():
            raise ValueError(
                "offsets and sizes must describe images inside the flat images buffer "
                f"({images.numel()} bytes) with H, W >= 1"
            )
    return images, offsets, sizes


def _check_params(params, batch: int) -> torch.Tensor:
    params = V.tensor("params", params, ndim=3, shape_hint=f"[G, B, {NUM_FIELDS}]", dtypes=(torch.float32,))
    if params.shape[1] != batch or params.shape[2] != NUM_FIELDS:
        raise ValueError(f"params must be [G, B, {NUM_FIELDS}] with B = {batch}, got {tuple(params.shape)}")
    return params


# ------------------------------------------------------------------------------------------- public API
def augment_views(
    images: torch.Tensor,
    offsets: torch.Tensor,
    sizes: torch.Tensor,
    params: torch.Tensor,
    out_size,
    *,
    chw: bool = False,
    dtype: torch.dtype = torch.float32,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    blur_kernel: int = 23,
    antialias: bool = True,
) -> torch.Tensor:
    """[G, B, 3, H, W] normalized views in `dtype` from packed uint8 images (`pack_images`) and per-(view,
    sample) parameters [G, B, NUM_FIELDS] (`sample_view_params`). One fused pass per view, plus a separable
    blur pass over the samples whose blur flag is set when `blur_kernel` > 0 (odd; 0 skips blur).

    `antialias` (default, as torchvision v2's RandomResizedCrop): the crop is resized with the triangle
    filter whose support grows with the downscale factor (PIL's, `F.interpolate(antialias=True)`'s; plain
    bilinear when upscaling); False: plain two-tap bilinear. Formula: `sslfast.reference.augment`.

    Args:
        images: the flat uint8 buffer of packed images.
        offsets: int [B], each image's first element in `images`.
        sizes: int [B, 2], each image's (H, W).
        params: fp32 [G, B, NUM_FIELDS], one row per (view, sample) in the layout `FIELDS`.
        out_size: the views' size, an int or (H, W).
        chw: images stored [3, H, W] (True) or [H, W, 3] (False).
        dtype: the views' dtype: float32, bfloat16 or float16.
        mean: per-channel mean of the normalization (3 values).
        std: per-channel std (3 positive values).
        blur_kernel: the blur's taps (odd), or 0 for no blur pass.
        antialias: the antialiased resize (True) or plain bilinear.

    Returns:
        [G, B, 3, H, W] views in `dtype`.

    Raises:
        TypeError: images not uint8, integer tensors of another kind, params not fp32, dtype not a float dtype,
            a non-bool flag, a non-int size or kernel.
        ValueError: shapes that disagree, images outside the buffer (checked off CUDA), a non-positive size or
            std, an even blur kernel, tensors on different devices.
    """
    antialias = _flag("antialias", antialias)
    images, offsets, sizes = _check_packed(images, offsets, sizes)
    params = _check_params(params, offsets.shape[0])
    V.same_device(images=images, params=params)
    out_h, out_w = _size2("out_size", out_size)
    if dtype not in V.FLOAT_DTYPES:
        raise TypeError(f"dtype must be one of float32, bfloat16, float16, got {dtype}")
    std = _triple("std", std)
    if min(std) <= 0:
        raise ValueError(f"std must be positive, got {std}")
    return _augment_views_op(
        images,
        offsets,
        sizes,
        params,
        out_h,
        out_w,
        bool(chw),
        dtype,
        _triple("mean", mean),
        std,
        _kernel_size(blur_kernel),
        antialias,
    )


def gaussian_blur(x: torch.Tensor, sigma, kernel_size: int = 23) -> torch.Tensor:
    """Separable Gaussian blur of [B, C, H, W] with a per-sample sigma (float or [B] tensor), torchvision's
    `gaussian_blur` semantics (weights exp(−x²/2σ²)/Σ over `kernel_size` taps, reflect padding). Same dtype.

    Args:
        x: floating [B, C, H, W].
        sigma: a positive float, or a [B] (or one-element) tensor of positive values (checked off CUDA).
        kernel_size: the taps, an odd positive int.

    Returns:
        The blurred [B, C, H, W] in x's dtype.

    Raises:
        TypeError: x not a floating tensor, kernel_size not an int.
        ValueError: x not 4-d, an even or zero kernel_size, sigma not positive or of the wrong length.
    """
    x = V.tensor("x", x, ndim=4, shape_hint="[B, C, H, W]")
    k = _kernel_size(kernel_size)
    if k == 0:
        raise ValueError("kernel_size must be an odd positive int, got 0")
    if isinstance(sigma, torch.Tensor):
        sigma = sigma.to(device=x.device, dtype=torch.float32).reshape(-1)
        if sigma.numel() == 1:
            sigma = sigma.expand(x.shape[0])
        if sigma.shape != (x.shape[0],):
            raise ValueError(f"sigma must be a float or a [B] tensor with B = {x.shape[0]}, got {tuple(sigma.shape)}")
        if not sigma.is_cuda and not bool((sigma > 0).all()):
            raise ValueError("sigma must be > 0")
    else:
        sigma = torch.full((x.shape[0],), V.positive("sigma", sigma), dtype=torch.float32, device=x.device)
    return _gaussian_blur_op(x, sigma.contiguous(), k)


def _group_views(specs, antialias: bool) -> list[tuple[tuple[int, int, bool], list[int]]]:
    """Output views grouped by (size, blur kernel, antialias): one launch per group. A spec's own `antialias`
    attribute, where it has one, overrides the call's."""
    groups: dict[tuple[int, int, bool], list[int]] = {}
    for i, s in enumerate(specs):
        key = (s.size, s.blur_kernel if s.blur_p > 0 else 0, _flag("antialias", getattr(s, "antialias", antialias)))
        groups.setdefault(key, []).append(i)
    return list(groups.items())


def augment_batch(
    images,
    offsets,
    sizes,
    views,
    *,
    chw: bool = False,
    dtype: torch.dtype = torch.float32,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    generator: torch.Generator | None = None,
    antialias: bool = True,
) -> list[torch.Tensor]:
    """All views of one batch: `views` is a sequence of view specs (e.g. `preset.views`, each with a `count`);
    returns one [B, 3, size, size] tensor per output view, in order. Parameters are drawn on the images'
    device (`sample_view_params`); views that share a size, blur kernel and resize mode share one launch.
    `antialias` as in `augment_views`, for every spec without an `antialias` attribute of its own.

    Args:
        images, offsets, sizes: the packed images (`pack_images`).
        views: view specs (each with `size`, `blur_kernel`, the fields `sample_view_params` reads, and
            optionally `count` and `antialias`).
        chw, dtype, mean, std: as in `augment_views`.
        generator: a `torch.Generator` on the images' device; None: that device's default generator.
        antialias: the resize mode of specs without their own.

    Returns:
        One [B, 3, size, size] tensor in `dtype` per output view, in the order of `views` (a spec with count n
        gives n consecutive views).

    Raises:
        TypeError, ValueError: as `augment_views` and `sample_view_params`, for bad images, specs or flags.
    """
    antialias = _flag("antialias", antialias)
    specs = [s for s in views for _ in range(getattr(s, "count", 1))]
    groups = _group_views(specs, antialias)
    params = []
    for s in views:
        params.append(sample_view_params(s, sizes, count=getattr(s, "count", 1), generator=generator))
    params = torch.cat(params, dim=0)
    out: list[torch.Tensor | None] = [None] * len(specs)
    for (size, kernel, aa), idx in groups:
        if idx == list(range(idx[0], idx[-1] + 1)):  # presets list same-size views together: a slice
            group = params[idx[0] : idx[-1] + 1]
        else:
            group = params.index_select(0, torch.tensor(idx, device=params.device))
        res = augment_views(
            images,
            offsets,
            sizes,
            group,
            size,
            chw=chw,
            dtype=dtype,
            mean=mean,
            std=std,
            blur_kernel=kernel,
            antialias=aa,
        )
        for j, i in enumerate(idx):
            out[i] = res[j]
    return out
