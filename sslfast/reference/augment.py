"""Multi-view SSL augmentation in plain PyTorch: the float64 oracle of the fused kernel and its CPU path.

The oracle is written as torchvision's functional *tensor* ops (v0.15+) compute them, one sample at a time,
so a reader can check each line against torchvision (a test does where torchvision is installed):
`F.resized_crop` (bilinear, antialiased on downscale as torchvision v2 by default, or plain), `F.hflip`,
`ColorJitter` (four ops in a random per-sample order), `F.rgb_to_grayscale`, `F.gaussian_blur` (reflect
padding), `F.solarize`, `F.normalize`. The views take the per-sample parameters
as a tensor (layout `FIELDS`, drawn by `sslfast.ops.augment.sample_view_params`), so the kernel and this
reference run the very same random draws.

This module is the float64 oracle: `augment_one` / `augment_views_literal` apply the ops one sample at a time,
`gaussian_blur_batch` blurs one sample at a time, and `antialias_weights` / `resize_antialias_literal` write the
antialiased resize as a matrix. The torchvision functional ops themselves (`rgb_to_grayscale`, `adjust_*`,
`gaussian_blur_image`, `resized_crop`, ...) and the layout `FIELDS` live in `sslfast.ops._torch.augment`, whose
`augment_views` (the CPU path of `sslfast.ops.augment`) vectorizes the same math over samples in chunks.

Images arrive packed: a flat uint8 buffer, each image's start offset (elements) and its (H, W); `chw`
says whether images are stored [3, H, W] (GPU decode) or [H, W, 3] (PIL, numpy).

Order of operations for one view of one sample (fixed, as in every preset's source):

    x   = resized_crop(img, top, left, height, width, (out_h, out_w)) / 255     bilinear, see below
    x   = hflip(x)                                              if flip
    for op in order (a permutation of brightness, contrast, saturation, hue):   if jitter
        brightness: x = clamp(b·x, 0, 1)
        contrast:   x = clamp(c·x + (1 − c)·mean(gray(x)), 0, 1)   mean over the whole view as it is here
        saturation: x = clamp(s·x + (1 − s)·gray(x), 0, 1)
        hue:        x = hsv2rgb((h(x) + δ) mod 1, s(x), v(x))      torchvision's RGB↔HSV
    x   = gray(x) repeated to 3 channels                        if grayscale     gray = .2989 r + .587 g + .114 b
    x   = gaussian_blur(x, kernel_size, σ)                      if blur          reflect padding, weights Σ=1
    x   = where(x >= threshold, 1 − x, x)                       if solarize
    out = (x − mean) / std

The resize, per axis of the crop (`in` source pixels to `out`, scale = in/out, separable: rows, then
columns). With `antialias` (the default, torchvision v2's RandomResizedCrop, PIL's and
`F.interpolate(mode="bilinear", antialias=True)`'s triangle filter) output pixel o is centred at
c = (o + ½)·scale in crop coordinates and

    x[o] = Σ_k w_k·img[k] / Σ_k w_k,    w_k = max(0, 1 − |k + ½ − c| / s),   s = max(scale, 1),

over the crop's pixels k ∈ [0, in) (taps outside the crop are dropped, the rest renormalized): the support
widens with the downscale factor, and upscaling (s = 1) is ordinary bilinear. `antialias_weights` writes
this [out, in] matrix literally. Without it: PyTorch's plain bilinear (align_corners=False: src =
(dst + ½)·scale − ½ clamped at 0, two taps), which aliases when downscaling.

Deviations from torchvision (the kernel and this reference agree to rounding): values stay in float between
ops (PIL rounds to uint8 after each op; the papers' PIL code resizes bicubic), and the blur's reflect index
folds repeatedly so a kernel wider than the view still works (torchvision raises there).
"""

from __future__ import annotations

import torch

from ..ops._torch.augment import (
    F_BLUR,
    F_BRIGHT,
    F_CONTRAST,
    F_FLIP,
    F_GRAY,
    F_HEIGHT,
    F_HUE,
    F_JITTER,
    F_LEFT,
    F_ORDER,
    F_SAT,
    F_SIGMA,
    F_SOLAR,
    F_THRESH,
    F_TOP,
    F_WIDTH,
    JITTER_OPS,
    gaussian_blur_image,
    resized_crop,
    rgb_to_grayscale,
    solarize,
    unpack_image,
)


def gaussian_blur_batch(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """[B, C, H, W] blurred per sample with sigma[b] in x's dtype (the standalone blur's oracle)."""
    return torch.stack([gaussian_blur_image(x[b], kernel_size, float(sigma[b])) for b in range(x.shape[0])])


def antialias_weights(in_n: int, out_n: int, dtype=torch.float64) -> torch.Tensor:
    """[out_n, in_n] weights of the antialiased bilinear resize along one axis (the module doc's formula):
    W[o, k] = max(0, 1 − |k + ½ − c_o| / s) / Σ_k (…), c_o = (o + ½)·in/out, s = max(in/out, 1)."""
    scale = in_n / out_n
    c = (torch.arange(out_n, dtype=dtype) + 0.5) * scale
    k = torch.arange(in_n, dtype=dtype) + 0.5
    w = (1.0 - (k[None, :] - c[:, None]).abs() / max(scale, 1.0)).clamp_min(0.0)
    return w / w.sum(dim=1, keepdim=True)


def resize_antialias_literal(x: torch.Tensor, out_h: int, out_w: int) -> torch.Tensor:
    """[..., H, W] -> [..., out_h, out_w] as Wy · x · Wxᵀ with `antialias_weights` per axis (in x.dtype)."""
    wy = antialias_weights(x.shape[-2], out_h, x.dtype).to(x.device)
    wx = antialias_weights(x.shape[-1], out_w, x.dtype).to(x.device)
    return wy @ x @ wx.T


def augment_one(
    img: torch.Tensor,
    p: list[float],
    out_h: int,
    out_w: int,
    blur_kernel: int,
    dtype=torch.float64,
    *,
    antialias: bool = True,
) -> torch.Tensor:
    """One view of one uint8 [3, H, W] image with parameter row `p` (list of floats, layout FIELDS):
    values in [0, 1] after solarize, before normalization."""
    box = (int(p[i]) for i in (F_TOP, F_LEFT, F_HEIGHT, F_WIDTH))
    x = resized_crop(img, *box, out_h, out_w, antialias=antialias, dtype=dtype) / 255.0
    if p[F_FLIP]:
        x = x.flip(-1)
    if p[F_JITTER]:
        factors = (p[F_BRIGHT], p[F_CONTRAST], p[F_SAT], p[F_HUE])
        for k in range(4):
            op = int(p[F_ORDER + k])
            x = JITTER_OPS[op](x, factors[op])
    if p[F_GRAY]:
        x = rgb_to_grayscale(x).expand(3, -1, -1)
    if p[F_BLUR] and blur_kernel > 0:  # blur_kernel 0: no blur pass at all
        x = gaussian_blur_image(x, blur_kernel, p[F_SIGMA])
    if p[F_SOLAR]:
        x = solarize(x, p[F_THRESH])
    return x


def augment_views_literal(
    images: torch.Tensor,
    offsets: torch.Tensor,
    sizes: torch.Tensor,
    params: torch.Tensor,
    out_h: int,
    out_w: int,
    chw: bool,
    out_dtype: torch.dtype,
    mean,
    std,
    blur_kernel: int,
    compute_dtype: torch.dtype = torch.float64,
    *,
    antialias: bool = True,
) -> torch.Tensor:
    """The float64 test oracle: [G, B, 3, out_h, out_w] views, one `augment_one` per (view g, sample b).
    params [G, B, NUM_FIELDS], sizes [B, 2] (H, W) and offsets [B] into the flat uint8 `images`; computed in
    `compute_dtype`, returned in `out_dtype`."""
    g_views, batch = params.shape[0], params.shape[1]
    rows = params.detach().to("cpu", torch.float64).tolist()
    offs = offsets.tolist()
    hw = sizes.tolist()
    m = torch.tensor(mean, dtype=compute_dtype, device=images.device).view(3, 1, 1)
    s = torch.tensor(std, dtype=compute_dtype, device=images.device).view(3, 1, 1)
    out = torch.empty((g_views, batch, 3, out_h, out_w), dtype=out_dtype, device=images.device)
    for b in range(batch):
        img = unpack_image(images, offs[b], hw[b][0], hw[b][1], chw)
        for g in range(g_views):
            x = augment_one(img, rows[g][b], out_h, out_w, blur_kernel, compute_dtype, antialias=antialias)
            out[g, b] = ((x - m) / s).to(out_dtype)
    return out


def output_range(mean, std) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel bounds of a normalized view: ((0 − mean)/std, (1 − mean)/std)."""
    m = torch.tensor(mean, dtype=torch.float64)
    s = torch.tensor(std, dtype=torch.float64)
    return -m / s, (1 - m) / s
