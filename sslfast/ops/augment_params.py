"""The inputs of the augmentation ops: `pack_images` packs uint8 images of any sizes into one flat buffer with
their offsets and sizes, and `sample_view_params` draws each view's parameters (crop box, flip, color jitter,
grayscale, blur σ, solarize; layout `sslfast.ops._torch.augment.FIELDS`) on the images' device, with
torchvision's distributions and no host sync. `sslfast.ops.augment` re-exports both.
"""

from __future__ import annotations

import math

import torch


_RRC_ATTEMPTS = 10  # torchvision RandomResizedCrop.get_params


def _int_tensor(name: str, t, shape_hint: str, ndim: int, dtype: torch.dtype) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {shape_hint}, got {type(t).__name__}")
    if t.dtype not in (torch.int32, torch.int64) or t.dim() != ndim:
        raise ValueError(f"{name} must be an integer {shape_hint} tensor, got {t.dtype} of shape {tuple(t.shape)}")
    return t.to(dtype).contiguous()


# ------------------------------------------------------------------------------------------- packing
def pack_images(images, *, chw: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(flat uint8, offsets int64 [B], sizes int32 [B, 2]) from a list of uint8 images ([3, H, W] when `chw`,
    else [H, W, 3]) or a uint8 batch [B, 3, H, W] / [B, H, W, 3] (packed without a copy). Tensors stay on
    their device; the small offsets/sizes tensors are built on the host and moved there.

    Args:
        images: a sequence of uint8 images, or a uint8 batch tensor.
        chw: the images are [3, H, W] (True) or [H, W, 3] (False).

    Returns:
        (flat uint8 buffer, offsets int64 [B], sizes int32 [B, 2]) on the images' device.

    Raises:
        ValueError: an empty sequence, an image or batch that is not uint8 of the expected layout.
    """
    if isinstance(images, torch.Tensor):
        if images.dim() != 4 or images.dtype != torch.uint8:
            raise ValueError(
                f"images must be a uint8 [B, 3, H, W] or [B, H, W, 3] batch, got {images.dtype} of "
                f"shape {tuple(images.shape)}"
            )
        images = images.contiguous()
        batch = images.shape[0]
        h, w = (images.shape[2], images.shape[3]) if chw else (images.shape[1], images.shape[2])
        per = 3 * h * w
        offsets = torch.arange(batch, dtype=torch.int64) * per
        sizes = torch.tensor([[h, w]], dtype=torch.int32).expand(batch, 2).contiguous()
        flat = images.reshape(-1)
    else:
        images = list(images)
        if not images:
            raise ValueError("images must hold at least one image")
        shapes = []
        for i, im in enumerate(images):
            if (
                not isinstance(im, torch.Tensor)
                or im.dtype != torch.uint8
                or im.dim() != 3
                or im.shape[0 if chw else 2] != 3
            ):
                want = "[3, H, W]" if chw else "[H, W, 3]"
                raise ValueError(
                    f"images[{i}] must be a uint8 {want} tensor, got "
                    f"{getattr(im, 'dtype', type(im).__name__)} {tuple(getattr(im, 'shape', ()))}"
                )
            shapes.append((im.shape[1], im.shape[2]) if chw else (im.shape[0], im.shape[1]))
        lengths = [3 * h * w for h, w in shapes]
        offsets = torch.tensor([0] + lengths[:-1], dtype=torch.int64).cumsum(0)
        sizes = torch.tensor(shapes, dtype=torch.int32)
        flat = torch.cat([im.reshape(-1) for im in images])
    dev = flat.device
    return flat, offsets.to(dev, non_blocking=True), sizes.to(dev, non_blocking=True)


# ------------------------------------------------------------------------------------------- parameters
def _uniform(gen, shape, lo: float, hi: float, device, dtype=torch.float32) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(shape, generator=gen, device=device, dtype=dtype)


def _random_resized_crop(sizes: torch.Tensor, scale, ratio, gen, count: int) -> torch.Tensor:
    """[count, B, 4] (top, left, height, width): torchvision RandomResizedCrop.get_params, vectorized — up to 10
    attempts of area ~ U(scale)·H·W and log-ratio ~ U(log ratio), the first that fits wins, else the central
    crop with the ratio clamped."""
    dev = sizes.device
    h_img = sizes[:, 0].to(torch.float64)[None, :, None]
    w_img = sizes[:, 1].to(torch.float64)[None, :, None]
    shape = (count, sizes.shape[0], _RRC_ATTEMPTS)
    area = h_img * w_img * _uniform(gen, shape, scale[0], scale[1], dev, torch.float64)
    aspect = torch.exp(_uniform(gen, shape, math.log(ratio[0]), math.log(ratio[1]), dev, torch.float64))
    w = torch.round(torch.sqrt(area * aspect))
    h = torch.round(torch.sqrt(area / aspect))
    fits = (w > 0) & (w <= w_img) & (h > 0) & (h <= h_img)
    top = torch.floor(torch.rand(shape, generator=gen, device=dev, dtype=torch.float64) * (h_img - h + 1))
    left = torch.floor(torch.rand(shape, generator=gen, device=dev, dtype=torch.float64) * (w_img - w + 1))
    attempt = torch.arange(_RRC_ATTEMPTS, device=dev)
    first = torch.where(fits, attempt, _RRC_ATTEMPTS - 1).amin(dim=2, keepdim=True)  # first that fits
    box = torch.stack([top, left, h, w], dim=-1).gather(2, first[..., None].expand(-1, -1, -1, 4)).squeeze(2)
    # Fallback: central crop, ratio clamped to the range.
    hi_, wi_ = h_img[..., 0], w_img[..., 0]
    in_ratio = wi_ / hi_
    lo_r, hi_r = min(ratio), max(ratio)
    fw = torch.where(in_ratio < lo_r, wi_, torch.where(in_ratio > hi_r, torch.round(hi_ * hi_r), wi_))
    fh = torch.where(in_ratio < lo_r, torch.round(wi_ / lo_r), hi_)
    fallback = torch.stack([torch.floor((hi_ - fh) / 2), torch.floor((wi_ - fw) / 2), fh, fw], dim=-1)
    return torch.where(fits.any(dim=2)[..., None], box, fallback.expand_as(box))


def sample_view_params(
    spec, sizes: torch.Tensor, *, count: int = 1, generator: torch.Generator | None = None
) -> torch.Tensor:
    """[count, B, NUM_FIELDS] fp32 parameters for `count` views of `spec` (a `sslfast.data.ViewSpec` or any
    object with its fields) of images of `sizes` [B, 2] (H, W), drawn on sizes' device from `generator`
    (that device's default generator when None). No host synchronization.

    Distributions (torchvision's): the crop as RandomResizedCrop(scale, ratio); flip, jitter, gray, blur and
    solarize are Bernoulli(p); jitter factors b, c, s ~ U(max(0, 1 − x), 1 + x), hue ~ U(−h, h); the op
    order is a uniform random permutation (ColorJitter's randperm); sigma ~ U(blur_sigma).

    Args:
        spec: the view's distributions (scale, ratio, flip_p, jitter_p, brightness, contrast, saturation, hue,
            gray_p, blur_p, blur_sigma, solarize_p, solarize_threshold).
        sizes: int32 or int64 [B, 2], the images' (H, W).
        count: views drawn per image.
        generator: a `torch.Generator` on sizes' device; None: that device's default generator.

    Returns:
        fp32 [count, B, NUM_FIELDS] in the layout `FIELDS`.

    Raises:
        TypeError: sizes not a tensor.
        ValueError: sizes not an integer [B, 2] tensor.
    """
    sizes = _int_tensor("sizes", sizes, "[B, 2] (H, W)", 2, torch.int32)
    dev = sizes.device
    shape = (int(count), sizes.shape[0])
    f32 = dict(device=dev, dtype=torch.float32)

    def coin(p):
        if p <= 0:
            return torch.zeros(shape, **f32)
        return (torch.rand(shape, generator=generator, **f32) < p).float()

    def factor(x):
        return _uniform(generator, shape, max(0.0, 1.0 - x), 1.0 + x, dev)

    box = _random_resized_crop(sizes, spec.scale, spec.ratio, generator, shape[0]).float()
    has_jitter = spec.jitter_p > 0 and any((spec.brightness, spec.contrast, spec.saturation, spec.hue))
    jitter = coin(spec.jitter_p if has_jitter else 0.0)
    order = torch.argsort(torch.rand(shape + (4,), generator=generator, **f32), dim=-1)
    cpos = (order == 1).to(torch.int8).argmax(dim=-1)
    cols = [
        box[..., 0],
        box[..., 1],
        box[..., 2],
        box[..., 3],
        coin(spec.flip_p),
        jitter,
        factor(spec.brightness),
        factor(spec.contrast),
        factor(spec.saturation),
        _uniform(generator, shape, -spec.hue, spec.hue, dev),
        *order.float().unbind(-1),
        cpos.float(),
        coin(spec.gray_p),
        coin(spec.blur_p),
        _uniform(generator, shape, spec.blur_sigma[0], spec.blur_sigma[1], dev),
        coin(spec.solarize_p),
        torch.full(shape, float(spec.solarize_threshold), **f32),
    ]
    return torch.stack(cols, dim=-1).contiguous()
