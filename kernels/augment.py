"""Fused multi-view augmentation: packed uint8 images in, normalized NCHW views out, in one pass.

The math and the order of operations are those of `sslfast.reference.augment` (its module doc is the
specification); `FIELDS` below must equal the parameter layout `sslfast.ops.augment.FIELDS`, which the tests
check. Images are packed in one flat uint8 buffer: image b starts at OFFS[b], is SIZES[b] = (H, W) and is
stored [3, H, W] (CHW, GPU decode) or [H, W, 3] (HWC, PIL / numpy). Per-(view, sample) parameters are a row
of PARAMS [G, B, NUM_FIELDS] (fp32), drawn on the device by `sslfast.ops.augment.sample_view_params`.

_augment_kernel, grid (B, G): one program per (sample, view) walks its out_h × out_w view BLOCK pixels at
a time. Each pixel is sampled straight from its image (crop box + resize, flip folded into the output
coordinate), then the colour ops run in registers in the sample's random order. The resize (ANTIALIAS) is
torchvision v2's antialiased bilinear: per axis, a triangle filter of half-width s = max(crop/out, 1)
centred at c = (o + ½)·crop/out, taps clipped to the crop and renormalized; each pixel sums the product of
the two axes' windows, ⌈2s_y⌉ × ⌈2s_x⌉ taps (the most that can carry weight), a loop bound that each
program takes from its own sample's crop. Otherwise it is PyTorch's plain bilinear (half-pixel rule,
2 × 2 taps). Contrast needs the mean gray of the view *as it stands right before the contrast
op* (torchvision's adjust_contrast takes the mean of the image it adjusts), so for jittered samples a first
sweep recomputes crop, resize and the ops that precede contrast and reduces their grayscale in fp32; the
second sweep writes. Samples to be blurred write their [0, 1] values (before solarize and normalization) in
fp32 to SCRATCH instead of OUT; the two blur passes finish them.

_blur_rows_kernel, grid (cdiv(C·H, ROWS), B, G): horizontal Gaussian pass over ROWS whole rows (reflect
index, weights exp(−x²/2σ²)/Σ as torchvision). In the fused path it runs in place on SCRATCH: each program
owns its rows, loads every tap, then a barrier, then stores.
_blur_cols_kernel, grid (cdiv(C·H, ROWS), B, G): vertical pass from SCRATCH to OUT, fused with the epilogue
(solarize, normalize, cast). Samples whose blur flag is 0 exit at once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._backend import interpreting
from ._common import cdiv, empty, next_pow2
from ._launch import cached_launch

FIELDS = (
    "top",
    "left",
    "height",
    "width",
    "flip",
    "jitter",
    "brightness",
    "contrast",
    "saturation",
    "hue",
    "order0",
    "order1",
    "order2",
    "order3",
    "contrast_pos",
    "gray",
    "blur",
    "sigma",
    "solarize",
    "threshold",
)
NF = tl.constexpr(len(FIELDS))
F_TOP = tl.constexpr(FIELDS.index("top"))
F_LEFT = tl.constexpr(FIELDS.index("left"))
F_HEIGHT = tl.constexpr(FIELDS.index("height"))
F_WIDTH = tl.constexpr(FIELDS.index("width"))
F_FLIP = tl.constexpr(FIELDS.index("flip"))
F_JITTER = tl.constexpr(FIELDS.index("jitter"))
F_BRIGHT = tl.constexpr(FIELDS.index("brightness"))
F_CONTRAST = tl.constexpr(FIELDS.index("contrast"))
F_SAT = tl.constexpr(FIELDS.index("saturation"))
F_HUE = tl.constexpr(FIELDS.index("hue"))
F_ORDER = tl.constexpr(FIELDS.index("order0"))
F_CPOS = tl.constexpr(FIELDS.index("contrast_pos"))
F_GRAY = tl.constexpr(FIELDS.index("gray"))
COL_BLUR, COL_SIGMA, COL_SOLAR, COL_THRESH = (FIELDS.index(f) for f in ("blur", "sigma", "solarize", "threshold"))
F_BLUR = tl.constexpr(COL_BLUR)
F_SOLAR = tl.constexpr(COL_SOLAR)
F_THRESH = tl.constexpr(COL_THRESH)


# --------------------------------------------------------------------------------------------- helpers
@triton.jit
def _clamp01(x):
    return tl.minimum(tl.maximum(x, 0.0), 1.0)


@triton.jit
def _gray(r, g, b):
    return 0.2989 * r + 0.587 * g + 0.114 * b


@triton.jit
def _adjust_hue(r, g, b, shift):
    """torchvision adjust_hue: RGB -> HSV (its _rgb2hsv), h <- (h + shift) mod 1, HSV -> RGB (_hsv2rgb)."""
    maxc = tl.maximum(tl.maximum(r, g), b)
    minc = tl.minimum(tl.minimum(r, g), b)
    eqc = maxc == minc
    cr = maxc - minc
    s = cr / tl.where(eqc, 1.0, maxc)
    crd = tl.where(eqc, 1.0, cr)
    rc = (maxc - r) / crd
    gc = (maxc - g) / crd
    bc = (maxc - b) / crd
    hr = tl.where(maxc == r, bc - gc, 0.0)
    hg = tl.where((maxc == g) & (maxc != r), 2.0 + rc - bc, 0.0)
    hb = tl.where((maxc != g) & (maxc != r), 4.0 + gc - rc, 0.0)
    h = (hr + hg + hb) / 6.0 + 1.0
    h = h - tl.floor(h)  # fmod(h, 1) for h > 0
    h = h + shift
    h = h - tl.floor(h)  # remainder(h, 1)
    h6 = h * 6.0
    fi = tl.floor(h6)
    f = h6 - fi
    i = fi.to(tl.int32) % 6
    v = maxc
    p = _clamp01(v * (1.0 - s))
    q = _clamp01(v * (1.0 - s * f))
    t = _clamp01(v * (1.0 - s * (1.0 - f)))
    r2 = tl.where(i == 0, v, tl.where(i == 1, q, tl.where(i == 2, p, tl.where(i == 3, p, tl.where(i == 4, t, v)))))
    g2 = tl.where(i == 0, t, tl.where(i == 1, v, tl.where(i == 2, v, tl.where(i == 3, q, tl.where(i == 4, p, p)))))
    b2 = tl.where(i == 0, p, tl.where(i == 1, p, tl.where(i == 2, t, tl.where(i == 3, v, tl.where(i == 4, v, q)))))
    return r2, g2, b2


@triton.jit
def _jitter(r, g, b, P, n_ops, mean):
    """The first n_ops colour ops of this sample's order (torchvision ColorJitter, blend + clamp each)."""
    fb = tl.load(P + F_BRIGHT)
    fc = tl.load(P + F_CONTRAST)
    fs = tl.load(P + F_SAT)
    fh = tl.load(P + F_HUE)
    for k in tl.static_range(4):
        if k < n_ops:
            op = tl.load(P + F_ORDER + k).to(tl.int32)
            if op == 0:
                r = _clamp01(fb * r)
                g = _clamp01(fb * g)
                b = _clamp01(fb * b)
            elif op == 1:
                r = _clamp01(fc * r + (1.0 - fc) * mean)
                g = _clamp01(fc * g + (1.0 - fc) * mean)
                b = _clamp01(fc * b + (1.0 - fc) * mean)
            elif op == 2:
                gr = _gray(r, g, b)
                r = _clamp01(fs * r + (1.0 - fs) * gr)
                g = _clamp01(fs * g + (1.0 - fs) * gr)
                b = _clamp01(fs * b + (1.0 - fs) * gr)
            else:
                r, g, b = _adjust_hue(r, g, b, fh)
    return r, g, b


@triton.jit
def _sample(
    IMG, base, H, W, pix, out_w, flip, top, left, ch, cw, scale_y, scale_x, CHW: tl.constexpr, ANTIALIAS: tl.constexpr
):
    """RGB in [0, 1] (fp32) at output pixels `pix` of the crop box resized to the view (flip folded in)."""
    oy = pix // out_w
    ox = pix % out_w
    ox = tl.where(flip, out_w - 1 - ox, ox)
    if CHW:
        cs = H * W
        step = 1
    else:
        cs = 1
        step = 3
    if ANTIALIAS:
        r, g, b = _resize_antialias(IMG + base, W, cs, step, oy, ox, top, left, ch, cw, scale_y, scale_x)
    else:
        r, g, b = _resize_bilinear(IMG + base, W, cs, step, oy, ox, top, left, ch, cw, scale_y, scale_x)
    return r / 255.0, g / 255.0, b / 255.0


@triton.jit
def _aa_window(o, scale, n):
    """Antialiased filter of output coordinates o along an axis of n crop pixels: centre c = (o + ½)·scale and
    window [lo, hi) = [⌊c − s + ½⌋, ⌊c + s + ½⌋) ∩ [0, n), s = max(scale, 1) (torch's _upsample_bilinear2d_aa)."""
    c = (o.to(tl.float32) + 0.5) * scale
    s = tl.maximum(scale, 1.0)
    lo = tl.maximum(tl.floor(c - s + 0.5), 0.0).to(tl.int32)
    hi = tl.minimum(tl.floor(c + s + 0.5).to(tl.int32), n)
    return c, lo, hi


@triton.jit
def _aa_weight(k, c, hi, inv_s):
    """Unnormalized triangle weight max(0, 1 − |k + ½ − c|/s) of crop pixel k; 0 from the window's end hi on."""
    w = tl.maximum(1.0 - tl.abs(k.to(tl.float32) + 0.5 - c) * inv_s, 0.0)
    return tl.where(k < hi, w, 0.0)


@triton.jit
def _resize_antialias(src, W, cs, step, oy, ox, top, left, ch, cw, scale_y, scale_x):
    """Σ_ky Σ_kx wy·wx·img / (Σ wy · Σ wx) (0..255, fp32) over the windows of `_aa_window`. Weights carry at
    most ⌈2s⌉ taps per axis from lo on (the open interval |k + ½ − c| < s), the loop bounds; taps past the
    window are clamped into the crop for the load and weigh 0."""
    cy, ylo, yhi = _aa_window(oy, scale_y, ch)
    cx, xlo, xhi = _aa_window(ox, scale_x, cw)
    sy = tl.maximum(scale_y, 1.0)
    sx = tl.maximum(scale_x, 1.0)
    inv_y = 1.0 / sy
    inv_x = 1.0 / sx
    ny = tl.ceil(2.0 * sy).to(tl.int32)
    nx = tl.ceil(2.0 * sx).to(tl.int32)
    tot_x = cx * 0.0
    for tx in range(0, nx):
        tot_x += _aa_weight(xlo + tx, cx, xhi, inv_x)
    tot_y = cy * 0.0
    r = cy * 0.0
    g = cy * 0.0
    b = cy * 0.0
    for ty in range(0, ny):
        yk = ylo + ty
        wy = _aa_weight(yk, cy, yhi, inv_y)
        tot_y += wy
        row = (tl.minimum(yk, ch - 1) + top) * W + left
        rr = cx * 0.0
        gg = cx * 0.0
        bb = cx * 0.0
        for tx in range(0, nx):
            xk = xlo + tx
            wx = _aa_weight(xk, cx, xhi, inv_x)
            p = (row + tl.minimum(xk, cw - 1)) * step
            rr += wx * tl.load(src + p).to(tl.float32)
            gg += wx * tl.load(src + cs + p).to(tl.float32)
            bb += wx * tl.load(src + 2 * cs + p).to(tl.float32)
        r += wy * rr
        g += wy * gg
        b += wy * bb
    norm = 1.0 / (tot_y * tot_x)
    return r * norm, g * norm, b * norm


@triton.jit
def _resize_bilinear(src, W, cs, step, oy, ox, top, left, ch, cw, scale_y, scale_x):
    """PyTorch's plain bilinear (0..255, fp32; align_corners=False: src = (dst + ½)·in/out − ½, clamped at 0;
    the far neighbour clamped to the box)."""
    sy = tl.maximum((oy.to(tl.float32) + 0.5) * scale_y - 0.5, 0.0)
    sx = tl.maximum((ox.to(tl.float32) + 0.5) * scale_x - 0.5, 0.0)
    y0 = sy.to(tl.int32)
    x0 = sx.to(tl.int32)
    ly = sy - y0.to(tl.float32)
    lx = sx - x0.to(tl.float32)
    y1 = y0 + (y0 < ch - 1).to(tl.int32) + top
    x1 = x0 + (x0 < cw - 1).to(tl.int32) + left
    y0 = y0 + top
    x0 = x0 + left
    p00 = (y0 * W + x0) * step
    p01 = (y0 * W + x1) * step
    p10 = (y1 * W + x0) * step
    p11 = (y1 * W + x1) * step
    hy = 1.0 - ly
    hx = 1.0 - lx
    r = hy * (hx * tl.load(src + p00).to(tl.float32) + lx * tl.load(src + p01).to(tl.float32)) + ly * (
        hx * tl.load(src + p10).to(tl.float32) + lx * tl.load(src + p11).to(tl.float32)
    )
    g = hy * (hx * tl.load(src + cs + p00).to(tl.float32) + lx * tl.load(src + cs + p01).to(tl.float32)) + ly * (
        hx * tl.load(src + cs + p10).to(tl.float32) + lx * tl.load(src + cs + p11).to(tl.float32)
    )
    b = hy * (
        hx * tl.load(src + 2 * cs + p00).to(tl.float32) + lx * tl.load(src + 2 * cs + p01).to(tl.float32)
    ) + ly * (hx * tl.load(src + 2 * cs + p10).to(tl.float32) + lx * tl.load(src + 2 * cs + p11).to(tl.float32))
    return r, g, b


@triton.jit
def _reflect(i, n):
    """Reflect padding without edge repeat, folded as often as needed (sslfast.ops._torch.augment.reflect_index)."""
    period = tl.maximum(2 * n - 2, 1)
    i = tl.abs(i) % period
    return tl.where(i >= n, period - i, i)


@triton.jit
def _gauss_sum(sigma, KSIZE: tl.constexpr):
    total = sigma * 0.0
    for k in tl.static_range(KSIZE):
        d = (k - KSIZE // 2) / sigma
        total += tl.exp(-0.5 * d * d)
    return total


# --------------------------------------------------------------------------------------------- kernels
@cached_launch
@triton.jit
def _augment_kernel(
    IMG,
    OFFS,
    SIZES,
    PARAMS,
    OUT,
    SCRATCH,
    out_h,
    out_w,
    m0,
    m1,
    m2,
    is0,
    is1,
    is2,
    CHW: tl.constexpr,
    HAS_SCRATCH: tl.constexpr,
    ANTIALIAS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # Grid (B, G): program (b, g) writes view g of sample b, [3, out_h, out_w], BLOCK pixels per step.
    pid_b = tl.program_id(0)
    pid_v = tl.program_id(1)
    row = pid_v * tl.num_programs(0) + pid_b
    P = PARAMS + row * NF
    base = tl.load(OFFS + pid_b)
    H = tl.load(SIZES + 2 * pid_b)
    W = tl.load(SIZES + 2 * pid_b + 1)
    top = tl.load(P + F_TOP).to(tl.int32)
    left = tl.load(P + F_LEFT).to(tl.int32)
    ch = tl.load(P + F_HEIGHT).to(tl.int32)
    cw = tl.load(P + F_WIDTH).to(tl.int32)
    flip = tl.load(P + F_FLIP) > 0.5
    jitter = tl.load(P + F_JITTER) > 0.5
    gray = tl.load(P + F_GRAY) > 0.5
    solar = tl.load(P + F_SOLAR) > 0.5
    thr = tl.load(P + F_THRESH)
    defer = (tl.load(P + F_BLUR) * HAS_SCRATCH) > 0.5
    scale_y = ch.to(tl.float32) / out_h
    scale_x = cw.to(tl.float32) / out_w
    npix = out_h * out_w
    lanes = tl.arange(0, BLOCK)

    # Sweep 1 (jittered samples only): mean gray of the view right before its contrast op.
    mean = scale_y * 0.0
    if jitter:
        cpos = tl.load(P + F_CPOS).to(tl.int32)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for p0 in range(0, npix, BLOCK):
            pix = p0 + lanes
            ok = pix < npix
            pix = tl.minimum(pix, npix - 1)
            r, g, b = _sample(IMG, base, H, W, pix, out_w, flip, top, left, ch, cw, scale_y, scale_x, CHW, ANTIALIAS)
            r, g, b = _jitter(r, g, b, P, cpos, mean)
            acc += tl.where(ok, _gray(r, g, b), 0.0)
        mean = tl.sum(acc, axis=0) / npix

    # Sweep 2: every pixel, written once.
    obase = row.to(tl.int64) * 3 * npix
    for p0 in range(0, npix, BLOCK):
        pix = p0 + lanes
        ok = pix < npix
        pix = tl.minimum(pix, npix - 1)
        r, g, b = _sample(IMG, base, H, W, pix, out_w, flip, top, left, ch, cw, scale_y, scale_x, CHW, ANTIALIAS)
        if jitter:
            r, g, b = _jitter(r, g, b, P, 4, mean)
        if gray:
            lum = _gray(r, g, b)
            r = lum
            g = lum
            b = lum
        if defer:
            tl.store(SCRATCH + obase + pix, r, mask=ok)
            tl.store(SCRATCH + obase + npix + pix, g, mask=ok)
            tl.store(SCRATCH + obase + 2 * npix + pix, b, mask=ok)
        else:
            if solar:
                r = tl.where(r >= thr, 1.0 - r, r)
                g = tl.where(g >= thr, 1.0 - g, g)
                b = tl.where(b >= thr, 1.0 - b, b)
            tl.store(OUT + obase + pix, ((r - m0) * is0).to(OUT.dtype.element_ty), mask=ok)
            tl.store(OUT + obase + npix + pix, ((g - m1) * is1).to(OUT.dtype.element_ty), mask=ok)
            tl.store(OUT + obase + 2 * npix + pix, ((b - m2) * is2).to(OUT.dtype.element_ty), mask=ok)


@cached_launch
@triton.jit
def _blur_rows_kernel(
    SRC,
    DST,
    PARAMS,
    pstride,
    flag_col,
    sigma_col,
    n_rows,
    w,
    KSIZE: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_W: tl.constexpr,
    SYNC: tl.constexpr,
):
    # Grid (cdiv(n_rows, ROWS), B, G), n_rows = C·H: ROWS rows of image (g, b), BLOCK_W columns per step.
    # SYNC (in place): one column step covers the row, and a barrier separates the loads from the stores.
    pid_r = tl.program_id(0)
    row = tl.program_id(2) * tl.num_programs(1) + tl.program_id(1)
    flag = tl.load(PARAMS + row * pstride + flag_col)
    if flag > 0.5:
        sigma = tl.load(PARAMS + row * pstride + sigma_col)
        inv_total = 1.0 / _gauss_sum(sigma, KSIZE)
        ys = pid_r * ROWS + tl.arange(0, ROWS)
        yok = ys < n_rows
        img = row.to(tl.int64) * n_rows * w
        for x0 in range(0, w, BLOCK_W):
            xs = x0 + tl.arange(0, BLOCK_W)
            mask = yok[:, None] & (xs[None, :] < w)
            acc = tl.zeros([ROWS, BLOCK_W], dtype=tl.float32)
            for k in tl.static_range(KSIZE):
                d = (k - KSIZE // 2) / sigma
                wk = tl.exp(-0.5 * d * d) * inv_total
                xk = _reflect(xs + (k - KSIZE // 2), w)
                v = tl.load(SRC + img + ys[:, None] * w + xk[None, :], mask=mask, other=0.0)
                acc += wk * v.to(tl.float32)
            if SYNC:
                tl.debug_barrier()
            tl.store(DST + img + ys[:, None] * w + xs[None, :], acc, mask=mask)


@cached_launch
@triton.jit
def _blur_cols_kernel(
    SRC,
    OUT,
    PARAMS,
    pstride,
    flag_col,
    sigma_col,
    solar_col,
    thresh_col,
    C,
    h,
    w,
    m0,
    m1,
    m2,
    is0,
    is1,
    is2,
    KSIZE: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_W: tl.constexpr,
    EPILOGUE: tl.constexpr,
):
    # Grid (cdiv(C·h, ROWS), B, G): ROWS output rows (c, y) of image (g, b), rows of all channels stacked.
    # EPILOGUE: solarize and normalize (3 channels) before the cast; otherwise a plain cast.
    rs = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row = tl.program_id(2) * tl.num_programs(1) + tl.program_id(1)
    flag = tl.load(PARAMS + row * pstride + flag_col)
    if flag > 0.5:
        sigma = tl.load(PARAMS + row * pstride + sigma_col)
        inv_total = 1.0 / _gauss_sum(sigma, KSIZE)
        rok = rs < C * h
        c = rs // h
        y = rs % h
        img = row.to(tl.int64) * C * h * w
        for x0 in range(0, w, BLOCK_W):
            xs = x0 + tl.arange(0, BLOCK_W)
            mask = rok[:, None] & (xs[None, :] < w)
            acc = tl.zeros([ROWS, BLOCK_W], dtype=tl.float32)
            for k in tl.static_range(KSIZE):
                d = (k - KSIZE // 2) / sigma
                wk = tl.exp(-0.5 * d * d) * inv_total
                src_row = c * h + _reflect(y + (k - KSIZE // 2), h)
                v = tl.load(SRC + img + src_row[:, None] * w + xs[None, :], mask=mask, other=0.0)
                acc += wk * v.to(tl.float32)
            if EPILOGUE:
                if tl.load(PARAMS + row * pstride + solar_col) > 0.5:
                    thr = tl.load(PARAMS + row * pstride + thresh_col)
                    acc = tl.where(acc >= thr, 1.0 - acc, acc)
                mc = tl.where(c == 0, m0, tl.where(c == 1, m1, m2))
                isc = tl.where(c == 0, is0, tl.where(c == 1, is1, is2))
                acc = (acc - mc[:, None]) * isc[:, None]
            tl.store(OUT + img + rs[:, None] * w + xs[None, :], acc.to(OUT.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------- launchers
def _augment_cfg(npix: int) -> dict:
    if interpreting():  # one tile per sweep for small test views (each tile costs ~300 numpy calls)
        return dict(BLOCK=min(next_pow2(npix), 256), num_warps=1)
    return dict(BLOCK=1024, num_warps=8)


def _blur_cfg(rows: int, w: int, in_place: bool) -> dict:
    """Tiles of the blur passes over `rows` rows of width w. In place (the horizontal pass of the fused path),
    one column step must cover the row. ~4 fp32 per thread: the 23 unrolled taps keep their loads in flight
    without spilling (ptxas, sm_90). Under the interpreter one program takes all rows of an image."""
    if interpreting():
        return dict(ROWS=next_pow2(rows), BLOCK_W=next_pow2(w), num_warps=1)
    if in_place:
        bw = next_pow2(w)
        return dict(ROWS=max(1, 1024 // bw), BLOCK_W=bw, num_warps=8 if bw >= 2048 else 4)
    bw = min(next_pow2(w), 256)
    return dict(ROWS=max(1, 512 // bw), BLOCK_W=bw, num_warps=4)


def _norm_args(mean, std) -> list[float]:
    return [float(m) for m in mean] + [1.0 / float(s) for s in std]


def augment_views(
    images, offsets, sizes, params, out_h, out_w, chw, out_dtype, mean, std, blur_kernel, *, antialias=True
):
    """[G, B, 3, out_h, out_w] in `out_dtype` (see the module doc). `blur_kernel` (odd, or 0 for no blur
    pass): samples with the blur flag are blurred with that many taps before solarize and normalization.
    `antialias`: the antialiased resize, else plain bilinear."""
    g_views, batch = params.shape[0], params.shape[1]
    dev = images.device
    out = empty((g_views, batch, 3, out_h, out_w), dtype=out_dtype, device=dev)
    if batch == 0 or g_views == 0:
        return out
    blur = blur_kernel > 0
    scratch = (
        empty(out.shape, dtype=torch.float32, device=dev) if blur else torch.zeros(1, dtype=torch.float32, device=dev)
    )
    norm = _norm_args(mean, std)
    _augment_kernel[(batch, g_views)](
        images,
        offsets,
        sizes,
        params,
        out,
        scratch,
        out_h,
        out_w,
        *norm,
        CHW=bool(chw),
        HAS_SCRATCH=int(blur),
        ANTIALIAS=bool(antialias),
        **_augment_cfg(out_h * out_w),
    )
    if blur:
        _blur(
            scratch,
            scratch,
            out,
            params,
            COL_BLUR,
            COL_SIGMA,
            COL_SOLAR,
            COL_THRESH,
            3,
            out_h,
            out_w,
            batch,
            g_views,
            blur_kernel,
            norm,
            epilogue=True,
        )
    return out


def _blur(
    src, tmp, out, params, flag_col, sigma_col, solar_col, thresh_col, c, h, w, batch, g_views, ksize, norm, epilogue
):
    pstride = params.shape[-1]
    in_place = src.data_ptr() == tmp.data_ptr()
    cfg = _blur_cfg(c * h, w, in_place)
    _blur_rows_kernel[(cdiv(c * h, cfg["ROWS"]), batch, g_views)](
        src, tmp, params, pstride, flag_col, sigma_col, c * h, w, KSIZE=ksize, SYNC=in_place, **cfg
    )
    cfg = _blur_cfg(c * h, w, False)
    _blur_cols_kernel[(cdiv(c * h, cfg["ROWS"]), batch, g_views)](
        tmp,
        out,
        params,
        pstride,
        flag_col,
        sigma_col,
        solar_col,
        thresh_col,
        c,
        h,
        w,
        *norm,
        KSIZE=ksize,
        EPILOGUE=epilogue,
        **cfg,
    )


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Per-sample separable Gaussian blur of [B, C, H, W] (any float dtype), sigma [B] fp32; out in x.dtype."""
    b, c, h, w = x.shape
    out = empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return out
    params = torch.stack([torch.ones_like(sigma), sigma], dim=1).contiguous()  # (flag, sigma) per sample
    tmp = empty(x.shape, dtype=torch.float32, device=x.device)
    _blur(x, tmp, out, params, 0, 1, 0, 0, c, h, w, b, 1, kernel_size, [0.0] * 3 + [1.0] * 3, epilogue=False)
    return out
