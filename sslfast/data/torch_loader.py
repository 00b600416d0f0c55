"""The `torch` backend: a `torch.utils.data.DataLoader` whose worker processes decode with PIL and augment one
sample at a time on the CPU — the pipeline lightly and solo-learn users run today, kept as the baseline.

    loader = sf.data.SSLLoader("/data/train", preset="byol", batch_size=256, backend="torch", num_workers=8)

Sampling, batching and sharding are `SSLLoader`'s (`shard_indices(epoch)` cut into batches), so the three
backends see the same images in the same batches. The batch sampler hands each worker (epoch, index) pairs;
a worker builds a whole batch (`__getitems__`), so a bad file's slot is filled by another image of its batch
as on the native backend, and reports the bad files back with the batch (workers are processes).

Per sample and view (`sample_params`, then `augment_sample`), torchvision's transforms written with torch
ops on CPU tensors (torchvision is not needed):

    RandomResizedCrop(size, scale, ratio, antialias=True)   up to 10 attempts: area ~ U(scale)·H·W,
                                                             log aspect ~ U(log ratio), position uniform;
                                                             else the central crop, ratio clamped
    RandomHorizontalFlip(flip_p)
    RandomApply(ColorJitter(b, c, s, h), jitter_p)          factors U(max(0, 1 − x), 1 + x), hue U(−h, h),
                                                             the four ops in a uniformly random order
    RandomGrayscale(gray_p)                                  .2989 r + .587 g + .114 b on all channels
    RandomApply(GaussianBlur(kernel, sigma), blur_p)         sigma ~ U(blur_sigma), reflect padding
    RandomSolarize(threshold, solarize_p)                    x ↦ 1 − x where x ≥ threshold
    Normalize(mean, std)

The pixel math is `sslfast.ops._torch.augment`'s torchvision ops (values stay float between ops, as on the other
backends); `ViewParams.as_row()` gives the parameter row in its `FIELDS` layout, so one sample can be checked
against the float64 oracle `sslfast.reference.augment.augment_one`.

Determinism: every sample's generator is seeded from (seed, epoch, index) alone — not from the worker, the
shard or the batch — so any `num_workers`, and a resumed run (`set_epoch`), give the same views. A slot whose
file is bad keeps its own seed (its views differ from the replacement image's own views).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral

import numpy as np
import torch

from ..ops._torch import augment as pixel
from . import datasets as D
from .loader import SSLLoader, _mix
from .native import BadSample, decode_pil, read_image_bytes

_RRC_ATTEMPTS = 10  # torchvision RandomResizedCrop.get_params
_DRAWS = 4 * _RRC_ATTEMPTS + 15  # uniforms per view: 4 per crop attempt, flip, jitter (coin, 4 factors,
# 4 order keys), gray, blur (coin, sigma), solarize
_SAMPLE_SALT = 0x70C4


@dataclass(frozen=True)
class ViewParams:
    """One view's random draws for one image (crop box in source pixels; op order: 0 brightness, 1 contrast,
    2 saturation, 3 hue). Factors are drawn even when `jitter` is off; they are then unused."""

    top: int
    left: int
    height: int
    width: int
    flip: bool
    jitter: bool
    brightness: float
    contrast: float
    saturation: float
    hue: float
    order: tuple[int, int, int, int]
    gray: bool
    blur: bool
    sigma: float
    solarize: bool
    threshold: float

    def as_row(self) -> list[float]:
        """The parameter row in `sslfast.ops.augment.FIELDS` layout."""
        return [
            float(v)
            for v in (
                self.top,
                self.left,
                self.height,
                self.width,
                self.flip,
                self.jitter,
                self.brightness,
                self.contrast,
                self.saturation,
                self.hue,
                *self.order,
                self.order.index(1),
                self.gray,
                self.blur,
                self.sigma,
                self.solarize,
                self.threshold,
            )
        ]


def _crop_box(u, height: int, width: int, scale, ratio) -> tuple[int, int, int, int]:
    """torchvision RandomResizedCrop.get_params from 4 uniforms per attempt (iterator `u`)."""
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(_RRC_ATTEMPTS):
        target = area * (scale[0] + (scale[1] - scale[0]) * next(u))
        aspect = math.exp(log_lo + (log_hi - log_lo) * next(u))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        u_top, u_left = next(u), next(u)
        if 0 < w <= width and 0 < h <= height:
            return int(u_top * (height - h + 1)), int(u_left * (width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        h, w = height, round(height * max(ratio))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def sample_params(spec, generator: torch.Generator, height: int, width: int) -> ViewParams:
    """One view's parameters for an image of `height` × `width` pixels, drawn from `spec` (a `ViewSpec`) with
    `generator` (a CPU `torch.Generator`; exactly `_DRAWS` float64 uniforms are consumed per call, so the
    next view's draws do not depend on which branches this one took).

    Distributions: the crop is torchvision's RandomResizedCrop(scale, ratio); flip, jitter, gray, blur and
    solarize are Bernoulli(p); jitter factors b, c, s ~ U(max(0, 1 − x), 1 + x), hue ~ U(−h, h); the jitter
    order is the argsort of 4 uniforms (a uniform permutation); sigma ~ U(blur_sigma)."""
    if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
        raise TypeError(f"generator must be a CPU torch.Generator, got {generator!r}")
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, Integral):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    u = iter(torch.rand(_DRAWS, generator=generator, dtype=torch.float64).tolist())
    top, left, h, w = _crop_box(u, int(height), int(width), spec.scale, spec.ratio)

    def coin(p: float) -> bool:
        return next(u) < p

    def between(lo: float, hi: float) -> float:
        return lo + (hi - lo) * next(u)

    flip = coin(spec.flip_p)
    jitter = coin(spec.jitter_p) and spec.has_jitter
    factors = [between(max(0.0, 1.0 - x), 1.0 + x) for x in (spec.brightness, spec.contrast, spec.saturation)]
    hue = between(-spec.hue, spec.hue)
    keys = [next(u) for _ in range(4)]
    order = tuple(sorted(range(4), key=keys.__getitem__))
    gray = coin(spec.gray_p)
    blur = coin(spec.blur_p)
    sigma = between(*spec.blur_sigma)
    solarize = coin(spec.solarize_p)
    return ViewParams(
        top, left, h, w, flip, jitter, *factors, hue, order, gray, blur, sigma, solarize, float(spec.solarize_threshold)
    )


def _shifted_sum(x: torch.Tensor, taps: list[float], dim: int, n: int) -> torch.Tensor:
    """Σ_j taps[j] · x[j : j + n] along `dim` (x already padded by len(taps) − 1)."""
    out = x.narrow(dim, 0, n) * taps[0]
    for j in range(1, len(taps)):
        out.add_(x.narrow(dim, j, n), alpha=taps[j])
    return out


def _blur(x: torch.Tensor, kernel_size: int, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of [C, H, W] (torchvision's weights; reflect padding folded as often as needed,
    so a kernel wider than the view works): rows, then columns, as sums of shifted copies."""
    _, h, w = x.shape
    taps = pixel.gaussian_kernel1d(kernel_size, sigma, torch.float64).tolist()
    r = kernel_size // 2
    x = _shifted_sum(x[:, :, pixel.reflect_index(torch.arange(-r, w + r), w)], taps, 2, w)
    return _shifted_sum(x[:, pixel.reflect_index(torch.arange(-r, h + r), h), :], taps, 1, h)


def augment_sample(img: torch.Tensor, p: ViewParams, spec, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One view [3, size, size] in [0, 1] (before normalization) of a uint8 [3, H, W] image, computed in
    `dtype`: resized crop (bilinear, antialiased), flip, jitter in `p.order`, gray, blur, solarize."""
    x = (
        pixel.resized_crop(img, p.top, p.left, p.height, p.width, spec.size, spec.size, antialias=True, dtype=dtype)
        / 255.0
    )
    if p.flip:
        x = x.flip(-1)
    if p.jitter:
        strengths = (spec.brightness, spec.contrast, spec.saturation, spec.hue)
        factors = (p.brightness, p.contrast, p.saturation, p.hue)
        for op in p.order:
            if strengths[op]:  # torchvision leaves out an op whose strength is 0 (an identity)
                x = pixel.JITTER_OPS[op](x, factors[op])
    if p.gray:
        x = pixel.rgb_to_grayscale(x).expand(3, -1, -1)
    if p.blur and spec.blur_kernel > 0:
        x = _blur(x, spec.blur_kernel, p.sigma)
    if p.solarize:
        x = pixel.solarize(x, p.threshold)
    return x


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of sample `index`'s generator in `epoch` (all its views draw from it, in view order)."""
    return _mix(seed, epoch, index, _SAMPLE_SALT)


class TorchViews(torch.utils.data.Dataset):
    """Map-style data set of whole batches: items are (epoch, index) pairs; `__getitems__` returns
    (views, bad) — one [B, 3, S, S] tensor per view and {index: reason} of the batch's bad files."""

    def __init__(self, source, preset, seed: int, dtype: torch.dtype, bad=()):
        self.source = source
        self.preset = preset
        self.specs = preset.expanded()
        self.seed = int(seed)
        self.dtype = dtype
        self.bad = set(bad)  # known bad indices (a snapshot taken when an epoch starts)
        self.files = isinstance(source, D.FileSource)
        self.mean = torch.tensor(preset.mean).view(3, 1, 1)
        self.std = torch.tensor(preset.std).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.source)

    def image(self, i: int) -> torch.Tensor:
        """uint8 [3, H, W] of sample i; BadSample when it cannot be read or decoded."""
        if i in self.bad:
            raise BadSample("known bad")
        arr = decode_pil(read_image_bytes(self.source, i)) if self.files else self.source.get(i)
        return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)

    def views(self, img: torch.Tensor, epoch: int, index: int) -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(sample_seed(self.seed, epoch, index))
        out = []
        for spec in self.specs:
            p = sample_params(spec, gen, img.shape[1], img.shape[2])
            x = augment_sample(img, p, spec)
            out.append(((x - self.mean) / self.std).to(self.dtype))
        return out

    def __getitem__(self, item):
        return self.__getitems__([item])

    def __getitems__(self, items):
        images, bad = [], {}
        for epoch, i in items:
            try:
                images.append(self.image(i))
            except BadSample as err:
                bad[i] = str(err)
                images.append(None)
        if all(im is None for im in images):
            images[0] = self._rescue(items[0][1], bad)
        filled = SSLLoader._fill_decoded(images)
        per_sample = [self.views(im, epoch, i) for im, (epoch, i) in zip(filled, items)]
        views = [torch.stack(v) for v in zip(*per_sample)]
        return views, {i: why for i, why in bad.items() if i not in self.bad}

    def _rescue(self, start: int, bad: dict) -> torch.Tensor:
        """The first readable image after `start` (cyclically) for a batch in which nothing decodes."""
        n = len(self.source)
        for k in range(1, n + 1):
            i = (start + k) % n
            if i in bad or i in self.bad:
                continue
            try:
                return self.image(i)
            except BadSample as err:
                bad[i] = str(err)
        raise RuntimeError(
            f"none of the {n} images of the source could be read and decoded; first failures: {sorted(bad.items())[:3]}"
        )


class _Batches(torch.utils.data.Sampler):
    """The loader's batches of one epoch as lists of (epoch, index)."""

    def __init__(self, batches: list[list[int]], epoch: int):
        self.batches, self.epoch = batches, epoch

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        for b in self.batches:
            yield [(self.epoch, i) for i in b]


def _identity(batch):
    return batch


class TorchBackend:
    """`SSLLoader(backend="torch")`: one DataLoader per epoch (worker processes started and joined with it)."""

    def __init__(self, loader):
        self.loader = loader

    def iterate(self, batches: list[list[int]], epoch: int):
        ld = self.loader
        data = TorchViews(ld.source, ld.preset, ld.seed, ld.dtype, bad=ld._bad)
        workers = ld.num_workers
        cuda = ld.device.type == "cuda"
        dl = torch.utils.data.DataLoader(
            data,
            batch_sampler=_Batches(batches, epoch),
            num_workers=workers,
            collate_fn=_identity,
            pin_memory=cuda,
            prefetch_factor=ld.prefetch if workers else None,
        )
        it = iter(dl)
        try:
            for views, bad in it:
                for i, why in bad.items():
                    ld._mark_bad(i, why)
                yield [v.to(ld.device, non_blocking=True) for v in views] if cuda else views
        finally:
            shutdown = getattr(it, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
