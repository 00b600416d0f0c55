"""Multi-view augmentation's PyTorch implementation (the contract `sslfast.ops.augment.AugmentImpl`): the CPU path
of `sslfast.ops.augment` and the pixel math of the `torch` data-loading backend (`sslfast.data.torch_loader`).

The specification (order of operations, resize and blur formulas) is the module doc of `sslfast.reference.augment`,
whose float64 oracle runs these same torchvision functional ops one sample at a time. Here:

* the parameter layout `FIELDS` (one fp32 row per (view, sample), drawn by
  `sslfast.ops.augment.sample_view_params`) and its column indices;
* torchvision's functional *tensor* ops (v0.15+) on [..., 3, H, W]: `rgb_to_grayscale`, `adjust_brightness`,
  `adjust_contrast`, `adjust_saturation`, `adjust_hue` (`JITTER_OPS` in op-code order), `solarize`,
  `gaussian_kernel1d`, `gaussian_blur_image` (reflect padding, `reflect_index`) and `resized_crop`;
* `augment_views`: that math vectorized over (view, sample) rows in chunks of `CHUNK_ELEMS` output values, and
  `gaussian_blur`, the standalone per-sample blur.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Per-(view, sample) parameter row, fp32. Integers (crop box, op order) are stored exactly as floats.
FIELDS = (
    "top",
    "left",
    "height",
    "width",  # crop box in source pixels
    "flip",  # 1: horizontal flip
    "jitter",  # 1: apply the colour jitter below
    "brightness",
    "contrast",
    "saturation",
    "hue",  # factors (hue: shift in turns, [-0.5, 0.5])
    "order0",
    "order1",
    "order2",
    "order3",  # op at each position: 0 bright, 1 contrast, 2 sat, 3 hue
    "contrast_pos",  # position of the contrast op in the order (0..3)
    "gray",  # 1: grayscale
    "blur",
    "sigma",  # 1: Gaussian blur with this sigma (pixels)
    "solarize",
    "threshold",  # 1: solarize at this threshold (fraction of full scale)
)
NUM_FIELDS = len(FIELDS)
(
    F_TOP,
    F_LEFT,
    F_HEIGHT,
    F_WIDTH,
    F_FLIP,
    F_JITTER,
    F_BRIGHT,
    F_CONTRAST,
    F_SAT,
    F_HUE,
    F_ORDER,
    _,
    _,
    _,
    F_CPOS,
    F_GRAY,
    F_BLUR,
    F_SIGMA,
    F_SOLAR,
    F_THRESH,
) = range(NUM_FIELDS)

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision rgb_to_grayscale


# ----------------------------------------------------------------------------- torchvision functional ops
def rgb_to_grayscale(x: torch.Tensor) -> torch.Tensor:
    """[..., 3, H, W] -> [..., 1, H, W]."""
    r, g, b = x.unbind(dim=-3)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(-3)


def blend(img1: torch.Tensor, img2, ratio: float) -> torch.Tensor:
    return (ratio * img1 + (1.0 - ratio) * img2).clamp(0.0, 1.0)


def adjust_brightness(x: torch.Tensor, factor: float) -> torch.Tensor:
    return blend(x, torch.zeros_like(x), factor)


def adjust_contrast(x: torch.Tensor, factor: float) -> torch.Tensor:
    mean = rgb_to_grayscale(x).mean(dim=(-3, -2, -1), keepdim=True)
    return blend(x, mean, factor)


def adjust_saturation(x: torch.Tensor, factor: float) -> torch.Tensor:
    return blend(x, rgb_to_grayscale(x), factor)


def rgb2hsv(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(dim=-3)
    maxc = torch.max(x, dim=-3).values
    minc = torch.min(x, dim=-3).values
    eqc = maxc == minc
    cr = maxc - minc
    ones = torch.ones_like(maxc)
    s = cr / torch.where(eqc, ones, maxc)
    cr_divisor = torch.where(eqc, ones, cr)
    rc = (maxc - r) / cr_divisor
    gc = (maxc - g) / cr_divisor
    bc = (maxc - b) / cr_divisor
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    h = torch.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0)
    return torch.stack((h, s, maxc), dim=-3)


def hsv2rgb(x: torch.Tensor) -> torch.Tensor:
    h, s, v = x.unbind(dim=-3)
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.to(torch.int32) % 6
    p = (v * (1.0 - s)).clamp(0.0, 1.0)
    q = (v * (1.0 - s * f)).clamp(0.0, 1.0)
    t = (v * (1.0 - s * (1.0 - f))).clamp(0.0, 1.0)
    mask = (i.unsqueeze(-3) == torch.arange(6, device=i.device).view(-1, 1, 1)).to(x.dtype)
    a1 = torch.stack((v, q, p, p, t, v), dim=-3)
    a2 = torch.stack((t, v, v, q, p, p), dim=-3)
    a3 = torch.stack((p, p, t, v, v, q), dim=-3)
    return torch.einsum("...ijk, ...xijk -> ...xjk", mask, torch.stack((a1, a2, a3), dim=-4))


def adjust_hue(x: torch.Tensor, shift: float) -> torch.Tensor:
    h, s, v = rgb2hsv(x).unbind(dim=-3)
    h = torch.remainder(h + shift, 1.0)
    return hsv2rgb(torch.stack((h, s, v), dim=-3))


JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def solarize(x: torch.Tensor, threshold: float) -> torch.Tensor:
    return torch.where(x >= threshold, 1.0 - x, x)


def reflect_index(i: torch.Tensor, n: int) -> torch.Tensor:
    """Reflect padding without repeating the edge (… 2 1 | 0 1 2 … n−1 | n−2 …), folded as often as needed."""
    period = max(2 * n - 2, 1)
    i = torch.remainder(i.abs(), period)
    return torch.where(i >= n, period - i, i)


def gaussian_kernel1d(kernel_size: int, sigma: float, dtype=torch.float64) -> torch.Tensor:
    """torchvision `_get_gaussian_kernel1d`: pdf at integer offsets, normalized to sum 1."""
    half = (kernel_size - 1) * 0.5
    x = torch.linspace(-half, half, kernel_size, dtype=dtype)
    pdf = torch.exp(-0.5 * (x / sigma).pow(2))
    return pdf / pdf.sum()


def gaussian_blur_image(x: torch.Tensor, kernel_size: int, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of [C, H, W] (rows, then columns), reflect padding."""
    _, h, w = x.shape
    k = gaussian_kernel1d(kernel_size, sigma, x.dtype).to(x.device)
    r = kernel_size // 2
    offs = torch.arange(kernel_size, device=x.device) - r
    cols = reflect_index(torch.arange(w, device=x.device)[:, None] + offs[None, :], w)  # [W, K]
    x = (x[:, :, cols] * k).sum(-1)
    rows = reflect_index(torch.arange(h, device=x.device)[:, None] + offs[None, :], h)  # [H, K]
    return (x[:, rows, :] * k[None, None, :, None]).sum(2)


def resized_crop(
    img: torch.Tensor,
    top: int,
    left: int,
    height: int,
    width: int,
    out_h: int,
    out_w: int,
    antialias: bool,
    dtype=torch.float64,
) -> torch.Tensor:
    """torchvision `F.resized_crop` of a [3, H, W] image (bilinear; see the module doc), in `dtype`, 0..255."""
    crop = img[:, top : top + height, left : left + width].to(dtype)
    return F.interpolate(crop[None], size=(out_h, out_w), mode="bilinear", align_corners=False, antialias=antialias)[0]


def unpack_image(images: torch.Tensor, offset: int, h: int, w: int, chw: bool) -> torch.Tensor:
    """One packed uint8 image as [3, H, W]."""
    flat = images[offset : offset + 3 * h * w]
    return flat.view(3, h, w) if chw else flat.view(h, w, 3).permute(2, 0, 1)


def _axis_taps(out_n: int, start: torch.Tensor, length: torch.Tensor, flip, ct):
    """Bilinear taps along one axis for rows [N]: (i0, i1, weight of i1), each [N, out_n], in source pixels.
    PyTorch's rule (align_corners=False): src = (dst + ½)·len/out − ½ clamped at 0, far tap clamped to the box."""
    o = torch.arange(out_n, device=start.device, dtype=ct).expand(start.shape[0], out_n)
    if flip is not None:
        o = torch.where(flip[:, None], out_n - 1 - o, o)
    src = ((o + 0.5) * (length.to(ct) / out_n)[:, None] - 0.5).clamp_min(0.0)
    i0 = src.long()
    lam = src - i0.to(ct)
    i1 = i0 + (i0 < (length - 1)[:, None]).long()
    return i0 + start[:, None], i1 + start[:, None], lam


def _crop_resize_rows(images, base, hgt, wid, p, out_h, out_w, chw: bool, ct) -> torch.Tensor:
    """[N, 3, out_h, out_w] in [0, 1]: the crop boxes of rows p [N, NUM_FIELDS] resized (and flipped)."""
    box = p[:, [F_TOP, F_LEFT, F_HEIGHT, F_WIDTH]].long()
    y0, y1, ly = _axis_taps(out_h, box[:, 0], box[:, 2], None, ct)
    x0, x1, lx = _axis_taps(out_w, box[:, 1], box[:, 3], p[:, F_FLIP] > 0.5, ct)
    c = torch.arange(3, device=images.device)[None, :, None, None]
    b4, w4 = base[:, None, None, None], wid[:, None, None, None]

    def tap(y, x):
        y, x = y[:, None, :, None], x[:, None, None, :]
        idx = b4 + c * (hgt[:, None, None, None] * w4) + y * w4 + x if chw else b4 + (y * w4 + x) * 3 + c
        return images[idx].to(ct)

    ly, lx = ly[:, None, :, None], lx[:, None, None, :]
    hy, hx = 1.0 - ly, 1.0 - lx
    return (hy * (hx * tap(y0, x0) + lx * tap(y0, x1)) + ly * (hx * tap(y1, x0) + lx * tap(y1, x1))) / 255.0


def _crop_resize_rows_antialiased(images, base, hgt, wid, p, out_h, out_w, chw: bool, ct) -> torch.Tensor:
    """`_crop_resize_rows` with the antialiased resize: one `resized_crop` per row (the crop sizes, hence the
    filter supports, differ per row)."""
    boxes = p[:, [F_TOP, F_LEFT, F_HEIGHT, F_WIDTH]].long().tolist()
    flips = (p[:, F_FLIP] > 0.5).tolist()
    views = []
    for box, flip, b, h, w in zip(boxes, flips, base.tolist(), hgt.tolist(), wid.tolist()):
        x = resized_crop(unpack_image(images, b, h, w, chw), *box, out_h, out_w, antialias=True, dtype=ct)
        views.append(x.flip(-1) if flip else x)
    return torch.stack(views) / 255.0


def _blur_rows(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """[n, C, H, W] blurred with per-row sigma [n]: reflect index padding, then two grouped conv2d passes."""
    n, c, h, w = x.shape
    half = (kernel_size - 1) * 0.5
    t = torch.linspace(-half, half, kernel_size, dtype=x.dtype, device=x.device)
    pdf = torch.exp(-0.5 * (t[None, :] / sigma.to(x.dtype)[:, None]).pow(2))
    k = (pdf / pdf.sum(1, keepdim=True)).repeat_interleave(c, 0)  # [n·C, K]
    r = kernel_size // 2
    cols = reflect_index(torch.arange(-r, w + r, device=x.device), w)
    x = F.conv2d(x[..., cols].reshape(1, n * c, h, w + 2 * r), k.view(n * c, 1, 1, -1), groups=n * c)
    rows = reflect_index(torch.arange(-r, h + r, device=x.device), h)
    x = F.conv2d(x[:, :, rows], k.view(n * c, 1, -1, 1), groups=n * c)
    return x.view(n, c, h, w)


def _rows_where(x: torch.Tensor, mask: torch.Tensor, fn) -> torch.Tensor:
    idx = mask.nonzero()[:, 0]
    if idx.numel():
        x[idx] = fn(x[idx], idx)
    return x


CHUNK_ELEMS = 1 << 21  # output values per chunk of the batched CPU path (gather indices: 4 × 16 MiB)


def augment_views(
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
    *,
    antialias: bool = True,
) -> torch.Tensor:
    """The CPU path: the math of `sslfast.reference.augment.augment_views_literal` in `out_dtype` (computed in
    fp32), vectorized over (view, sample) rows in chunks —
    gathers for the plain bilinear crop (one `F.interpolate` per row when `antialias`), masked sub-batches for
    each op (the jitter per order position and op), grouped convolutions for the per-sample blur."""
    g_views, batch = params.shape[0], params.shape[1]
    ct = torch.float32
    out = torch.empty((g_views, batch, 3, out_h, out_w), dtype=out_dtype, device=images.device)
    rows_p = params.reshape(-1, NUM_FIELDS).to(ct)
    n_rows = rows_p.shape[0]
    sample = torch.arange(n_rows, device=images.device) % batch
    base_all, hgt_all, wid_all = offsets.long()[sample], sizes[sample, 0].long(), sizes[sample, 1].long()
    m = torch.tensor(mean, dtype=ct, device=images.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=ct, device=images.device).view(1, 3, 1, 1)
    flat_out = out.view(n_rows, 3, out_h, out_w)
    step = max(1, CHUNK_ELEMS // (3 * out_h * out_w))
    for r0 in range(0, n_rows, step):
        sl = slice(r0, min(n_rows, r0 + step))
        p = rows_p[sl]
        crop_resize = _crop_resize_rows_antialiased if antialias else _crop_resize_rows
        x = crop_resize(images, base_all[sl], hgt_all[sl], wid_all[sl], p, out_h, out_w, chw, ct)
        jitter = p[:, F_JITTER] > 0.5
        factors = [
            p[:, F_BRIGHT].view(-1, 1, 1, 1),
            p[:, F_CONTRAST].view(-1, 1, 1, 1),
            p[:, F_SAT].view(-1, 1, 1, 1),
            p[:, F_HUE].view(-1, 1, 1),
        ]
        for k in range(4):
            op_k = p[:, F_ORDER + k].long()
            for op in range(4):
                x = _rows_where(x, jitter & (op_k == op), lambda v, i, op=op: JITTER_OPS[op](v, factors[op][i]))
        x = _rows_where(x, p[:, F_GRAY] > 0.5, lambda v, i: rgb_to_grayscale(v).expand(-1, 3, -1, -1))
        if blur_kernel > 0:
            x = _rows_where(x, p[:, F_BLUR] > 0.5, lambda v, i: _blur_rows(v, p[i, F_SIGMA], blur_kernel))
        sol = (p[:, F_SOLAR] > 0.5).view(-1, 1, 1, 1) & (x >= p[:, F_THRESH].view(-1, 1, 1, 1))
        x = torch.where(sol, 1.0 - x, x)
        flat_out[sl] = ((x - m) / s).to(out_dtype)
    return out


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Per-sample separable Gaussian blur of [B, C, H, W] (any float dtype) with sigma [B], computed in fp32 one
    sample at a time (`gaussian_blur_image`); out in x's dtype."""
    work = x.float()
    return torch.stack([gaussian_blur_image(work[b], kernel_size, float(sigma[b])) for b in range(x.shape[0])]).to(
        x.dtype
    )
