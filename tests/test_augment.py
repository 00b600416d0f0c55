"""Fused multi-view augmentation and Gaussian blur: kernel (interpreter) and CPU path against the float64
reference of the same per-sample parameters; parameter distributions; bad input; GPU compile and runs."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from helpers import assert_close, rel_err, tol
from sslfast.data import presets as P
from sslfast.ops import augment as aug
from sslfast.ops._torch import augment as pt
from sslfast.reference import augment as ref

MEAN, STD = P.IMAGENET_MEAN, P.IMAGENET_STD
# Every branch likely within a few samples: jitter always, the rest often.
BUSY = P.ViewSpec(
    jitter_p=1.0,
    brightness=0.6,
    contrast=0.6,
    saturation=0.6,
    hue=0.3,
    gray_p=0.3,
    blur_p=0.5,
    solarize_p=0.5,
    flip_p=0.5,
    scale=(0.1, 1.0),
)


def _images(shapes, seed, chw):
    g = torch.Generator().manual_seed(seed)
    imgs = [torch.randint(0, 256, (3, h, w) if chw else (h, w, 3), generator=g, dtype=torch.uint8) for h, w in shapes]
    return aug.pack_images(imgs, chw=chw)


def _params(spec, sizes, count, seed):
    p = aug.sample_view_params(spec, sizes, count=count, generator=torch.Generator().manual_seed(seed))
    rows = p.view(-1, aug.NUM_FIELDS)
    n = rows.shape[0]
    k = torch.arange(n)
    # Force both values of every flag across the rows, whatever the draw.
    rows[:, pt.F_FLIP] = (k % 2).float()
    rows[:, pt.F_JITTER] = (k % 3 != 2).float()
    rows[:, pt.F_GRAY] = (k % 4 == 1).float()
    rows[:, pt.F_BLUR] = (k % 3 == 0).float()
    rows[:, pt.F_SOLAR] = (k % 2 == 0).float()
    return p


def _compare(out, want, params, out_dtype, device="cpu", what=""):
    """‖out − ref‖/‖ref‖ except at pixels that sit within 1e-4 of a solarize threshold, where fp32 and fp64
    may legitimately land on different sides."""
    out, want = out.double().cpu(), want.double().cpu()
    m = torch.tensor(MEAN, dtype=torch.float64).view(1, 1, 3, 1, 1)
    s = torch.tensor(STD, dtype=torch.float64).view(1, 1, 3, 1, 1)
    x = want * s + m
    p = params.cpu().double()
    thr = p[..., pt.F_THRESH][..., None, None, None]
    sol = p[..., pt.F_SOLAR][..., None, None, None] > 0.5
    near = sol & (((x - thr).abs() < 1e-4) | ((1 - x - thr).abs() < 1e-4))
    keep = ~near
    assert keep.float().mean() > 0.99
    assert torch.isfinite(out).all(), f"{what}: non-finite values (an element was never written)"
    assert_close(out[keep], want[keep], tol(out_dtype, device), what)


def test_kernel_fields_match_reference():
    from sslfast.kernels import augment as K

    assert K.FIELDS == aug.FIELDS == pt.FIELDS


@pytest.mark.parametrize(
    "chw,out_dtype,blur", [(False, torch.float32, 23), (True, torch.float32, 7), (False, torch.bfloat16, 0)]
)
def test_augment_views_matches_reference(backend, seed, chw, out_dtype, blur):
    # Odd image sizes (one smaller than the view), non-square view, crossing a 256-pixel tile under the kernel.
    flat, offs, sizes = _images([(21, 17), (9, 30), (33, 26)], seed, chw)
    out_hw = (19, 15) if blur else (13, 11)
    params = _params(BUSY, sizes, 2, seed)
    out = aug.augment_views(flat, offs, sizes, params, out_hw, chw=chw, dtype=out_dtype, blur_kernel=blur)
    assert out.shape == (2, 3, 3, *out_hw) and out.dtype == out_dtype
    want = ref.augment_views_literal(flat, offs, sizes, params, *out_hw, chw, torch.float64, MEAN, STD, blur)
    _compare(out, want, params, out_dtype, what=f"seed={seed} {backend} chw={chw} {out_dtype} blur={blur}")


@pytest.mark.parametrize("antialias", [True, False])
def test_cpu_path_in_chunks(monkeypatch, seed, antialias):
    """The PyTorch path's chunks of (view, sample) rows (`CHUNK_ELEMS`, here 2 rows, the last chunk partial)
    give the one-chunk result exactly, and the oracle's."""
    monkeypatch.setenv("SSLFAST_BACKEND", "reference")
    flat, offs, sizes = _images([(21, 17), (9, 30), (33, 26)], seed, False)
    params = _params(BUSY, sizes, 3, seed)  # 9 rows

    def run():
        return aug.augment_views(flat, offs, sizes, params, (9, 7), blur_kernel=5, antialias=antialias)

    whole = run()
    monkeypatch.setattr(pt, "CHUNK_ELEMS", 2 * 3 * 9 * 7)
    chunked = run()
    assert torch.equal(chunked, whole), f"seed={seed}: chunked rows differ from one chunk"
    want = ref.augment_views_literal(
        flat, offs, sizes, params, 9, 7, False, torch.float64, MEAN, STD, 5, antialias=antialias
    )
    _compare(chunked, want, params, torch.float32, what=f"seed={seed} chunks antialias={antialias}")


def test_augment_views_each_op_alone(backend, seed):
    """One op at a time, so an error cannot hide behind another (flip only, then each jitter op, gray, blur)."""
    flat, offs, sizes = _images([(16, 14), (11, 19)], seed, False)
    base = aug.sample_view_params(BUSY, sizes, count=1, generator=torch.Generator().manual_seed(seed))
    rows = []
    for op in range(4):
        p = base.clone()
        p[..., pt.F_FLIP] = 1.0
        for f in (pt.F_GRAY, pt.F_BLUR, pt.F_SOLAR):
            p[..., f] = 0.0
        p[..., pt.F_JITTER] = 1.0
        p[..., pt.F_BRIGHT] = 1.3 if op == 0 else 1.0
        p[..., pt.F_CONTRAST] = 0.6 if op == 1 else 1.0
        p[..., pt.F_SAT] = 0.4 if op == 2 else 1.0
        p[..., pt.F_HUE] = -0.27 if op == 3 else 0.0
        rows.append(p)
    params = torch.cat(rows)
    out = aug.augment_views(flat, offs, sizes, params, 8, blur_kernel=0)
    want = ref.augment_views_literal(flat, offs, sizes, params, 8, 8, False, torch.float64, MEAN, STD, 0)
    for g in range(4):
        assert_close(out[g], want[g], 1e-5, f"seed={seed} {backend} op {g}")


def test_contrast_uses_mean_after_preceding_ops(backend, seed):
    """Contrast after brightness must blend with the mean of the brightened view (torchvision semantics)."""
    flat, offs, sizes = _images([(12, 12)], seed, False)
    p = aug.sample_view_params(BUSY, sizes, count=2, generator=torch.Generator().manual_seed(seed))
    p[..., pt.F_JITTER] = 1.0
    p[..., pt.F_BRIGHT] = 0.5
    p[..., pt.F_CONTRAST] = 0.3
    p[..., pt.F_SAT] = 1.0
    p[..., pt.F_HUE] = 0.0
    for f in (pt.F_GRAY, pt.F_BLUR, pt.F_SOLAR, pt.F_FLIP):
        p[..., f] = 0.0
    p[0, :, pt.F_ORDER : pt.F_ORDER + 4] = torch.tensor([0.0, 1.0, 2.0, 3.0])  # brightness, then contrast
    p[1, :, pt.F_ORDER : pt.F_ORDER + 4] = torch.tensor([1.0, 0.0, 2.0, 3.0])  # contrast first
    p[0, :, pt.F_CPOS] = 1.0
    p[1, :, pt.F_CPOS] = 0.0
    out = aug.augment_views(flat, offs, sizes, p, 10, blur_kernel=0)
    want = ref.augment_views_literal(flat, offs, sizes, p, 10, 10, False, torch.float64, MEAN, STD, 0)
    assert_close(out, want, 1e-5, f"seed={seed} {backend}")
    assert rel_err(want[0], want[1]) > 1e-3  # the order matters


@pytest.mark.parametrize("kernel_size,shape", [(7, (3, 2, 13, 17)), (23, (2, 3, 24, 26))])
def test_gaussian_blur_matches_torchvision_formula(backend, seed, kernel_size, shape):
    """Against an independent torchvision-style blur: reflect pad + two conv2d passes."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g) + 0.1
    sigma = 0.1 + 1.9 * torch.rand(shape[0], generator=g)
    out = aug.gaussian_blur(x, sigma, kernel_size)
    r = kernel_size // 2
    want = []
    for b in range(shape[0]):
        k = pt.gaussian_kernel1d(kernel_size, float(sigma[b]))
        xb = F.pad(x[b : b + 1].double(), (r, r, r, r), mode="reflect")
        c = shape[1]
        xb = F.conv2d(xb, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
        xb = F.conv2d(xb, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
        want.append(xb[0])
    assert_close(out, torch.stack(want), 1e-5, f"seed={seed} {backend}")


def test_gaussian_blur_bf16_and_scalar_sigma(backend, seed):
    x = torch.rand(2, 3, 9, 12, generator=torch.Generator().manual_seed(seed)) + 0.1
    out = aug.gaussian_blur(x.bfloat16(), 1.5, 5)
    assert out.dtype == torch.bfloat16
    want = ref.gaussian_blur_batch(x.bfloat16().double(), torch.full((2,), 1.5), 5)
    assert_close(out, want, 1e-2, f"seed={seed} {backend}")


def test_same_generator_seed_same_views(backend, seed):
    flat, offs, sizes = _images([(14, 20), (20, 14)], seed, False)
    views = dataclasses.replace(BUSY, size=9, count=2), dataclasses.replace(BUSY, size=5, blur_p=0.0)
    a = aug.augment_batch(flat, offs, sizes, views, generator=torch.Generator().manual_seed(seed))
    b = aug.augment_batch(flat, offs, sizes, views, generator=torch.Generator().manual_seed(seed))
    c = aug.augment_batch(flat, offs, sizes, views, generator=torch.Generator().manual_seed(seed + 1))
    assert [tuple(v.shape) for v in a] == [(2, 3, 9, 9), (2, 3, 9, 9), (2, 3, 5, 5)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


# ------------------------------------------------------------------------------------------- reference
def test_reference_ops_sanity(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(3, 7, 9, generator=g, dtype=torch.float64)
    assert_close(pt.adjust_hue(x, 0.0), x, 1e-12, "hue 0")
    assert_close(pt.hsv2rgb(pt.rgb2hsv(x)), x, 1e-12, "hsv round trip")
    y = pt.adjust_hue(pt.adjust_hue(x, 0.3), -0.3)
    assert_close(y, x, 1e-12, "hue +0.3 -0.3")
    gray = pt.rgb_to_grayscale(x)
    assert_close(pt.adjust_saturation(x, 0.0), gray.expand(3, -1, -1), 1e-12, "saturation 0 = gray")
    assert torch.allclose(pt.gaussian_kernel1d(23, 1.3).sum(), torch.tensor(1.0, dtype=torch.float64))
    i = torch.arange(-12, 20)
    r = pt.reflect_index(i, 5)
    assert r.min() >= 0 and r.max() <= 4
    assert r[12:17].tolist() == [0, 1, 2, 3, 4] and r[11].item() == 1 and r[17].item() == 3


# ------------------------------------------------------------------------------------------- parameters
@pytest.mark.parametrize("name", sorted(P.PRESETS))
def test_sample_view_params_distribution(name):
    """Per preset and view: flip, jitter, grayscale, blur and solarize rates (binomial 5σ), crop boxes inside
    the image with area and ratio in range, factors in range, the op order a permutation."""
    n = 4000
    gen = torch.Generator().manual_seed(1234)
    sizes = torch.tensor([[375, 500], [500, 375], [64, 64], [30, 300]] * (n // 4), dtype=torch.int32)
    for spec in P.get_preset(name).views:
        p = aug.sample_view_params(spec, sizes, count=1, generator=gen)[0].double()
        checks = [
            (pt.F_FLIP, spec.flip_p),
            (pt.F_JITTER, spec.jitter_p if spec.has_jitter else 0.0),
            (pt.F_GRAY, spec.gray_p),
            (pt.F_BLUR, spec.blur_p),
            (pt.F_SOLAR, spec.solarize_p),
        ]
        for col, prob in checks:
            rate = p[:, col].mean().item()
            sd = math.sqrt(prob * (1 - prob) / n)
            assert abs(rate - prob) <= 5 * sd + 1e-12, f"{name} {pt.FIELDS[col]}: rate {rate:.3f} vs p {prob}"
        top, left, h, w = (p[:, f] for f in (pt.F_TOP, pt.F_LEFT, pt.F_HEIGHT, pt.F_WIDTH))
        H, W = sizes[:, 0].double(), sizes[:, 1].double()
        assert (top >= 0).all() and (left >= 0).all() and (h >= 1).all() and (w >= 1).all()
        assert (top + h <= H).all() and (left + w <= W).all()
        regular = (H == W) | (W / H <= 4 / 3) & (W / H >= 3 / 4)
        area = (h * w / (H * W))[regular]
        ratio = (w / h)[regular & (h > 20)]
        assert area.min() > spec.scale[0] * 0.8 and area.max() <= 1.0
        assert ratio.min() > spec.ratio[0] * 0.9 and ratio.max() < spec.ratio[1] * 1.1
        if spec.has_jitter:
            for col, x in ((pt.F_BRIGHT, spec.brightness), (pt.F_CONTRAST, spec.contrast), (pt.F_SAT, spec.saturation)):
                assert p[:, col].min() >= max(0, 1 - x) - 1e-6 and p[:, col].max() <= 1 + x + 1e-6
            assert p[:, pt.F_HUE].abs().max() <= spec.hue + 1e-6
        order = p[:, pt.F_ORDER : pt.F_ORDER + 4]
        assert (order.sort(dim=1).values == torch.arange(4.0, dtype=torch.float64)).all()
        cpos = p[:, pt.F_CPOS].long()
        assert (order.gather(1, cpos[:, None])[:, 0] == 1).all()
        if spec.blur_p > 0:
            s = p[:, pt.F_SIGMA]
            assert s.min() >= spec.blur_sigma[0] - 1e-6 and s.max() <= spec.blur_sigma[1] + 1e-6
        assert torch.allclose(p[:, pt.F_THRESH], torch.tensor(spec.solarize_threshold, dtype=torch.float64))


def test_random_resized_crop_fallback_is_central():
    """An extreme aspect ratio with a large minimum area never fits: torchvision's fallback, the central crop
    with the ratio clamped to 4/3."""
    spec = P.ViewSpec(scale=(0.95, 1.0))
    sizes = torch.tensor([[10, 200]] * 64, dtype=torch.int32)
    p = aug.sample_view_params(spec, sizes, generator=torch.Generator().manual_seed(0))[0]
    box = p[:, [pt.F_TOP, pt.F_LEFT, pt.F_HEIGHT, pt.F_WIDTH]]
    want = torch.tensor([0.0, (200 - 13) // 2, 10.0, 13.0])
    assert (box == want).all(), box[:3]


# ------------------------------------------------------------------------------------------- bad input
def test_bad_input_names_the_argument():
    flat, offs, sizes = _images([(8, 8), (9, 7)], 0, False)
    params = aug.sample_view_params(BUSY, sizes, count=1)
    with pytest.raises(TypeError, match="images"):
        aug.augment_views(flat.float(), offs, sizes, params, 4)
    with pytest.raises(ValueError, match="params"):
        aug.augment_views(flat, offs, sizes, params[:, :1], 4)
    with pytest.raises(TypeError, match="params"):
        aug.augment_views(flat, offs, sizes, params.double(), 4)
    with pytest.raises(ValueError, match="out_size"):
        aug.augment_views(flat, offs, sizes, params, 0)
    with pytest.raises(ValueError, match="blur_kernel"):
        aug.augment_views(flat, offs, sizes, params, 4, blur_kernel=4)
    with pytest.raises(ValueError, match="sizes"):
        aug.augment_views(flat, offs, sizes[:1], params, 4)
    with pytest.raises(ValueError, match="offsets"):
        aug.augment_views(flat[:100], offs, sizes, params, 4)
    with pytest.raises(TypeError, match="dtype"):
        aug.augment_views(flat, offs, sizes, params, 4, dtype=torch.int32)
    with pytest.raises(ValueError, match="x"):
        aug.gaussian_blur(torch.rand(3, 8, 8), 1.0)
    with pytest.raises(ValueError, match="sigma"):
        aug.gaussian_blur(torch.rand(1, 3, 8, 8), -1.0)
    with pytest.raises(ValueError, match="sigma"):
        aug.gaussian_blur(torch.rand(2, 3, 8, 8), torch.ones(3))
    with pytest.raises(ValueError, match="images"):
        aug.pack_images([torch.zeros(4, 4, 4, dtype=torch.uint8)])


# ------------------------------------------------------------------------------------------- GPU compile
_COMPILE_SM90 = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from sslfast.kernels import augment as K

def compile_sm90(fn, signature, constexprs, num_warps):
    sig = {**signature, **{k: "constexpr" for k in constexprs}}
    c = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs),
                       target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    assert c.asm.get("cubin"), fn

f = "fp32"
norm = dict(m0=f, m1=f, m2=f, is0=f, is1=f, is2=f)
for chw, out, aa in ((True, "*bf16", True), (False, "*fp32", True), (False, "*fp32", False)):
    compile_sm90(K._augment_kernel, dict(IMG="*u8", OFFS="*i64", SIZES="*i32", PARAMS="*fp32", OUT=out,
                                         SCRATCH="*fp32", out_h="i32", out_w="i32", **norm),
                 dict(CHW=chw, HAS_SCRATCH=int(chw), ANTIALIAS=aa, BLOCK=1024), 8)
compile_sm90(K._blur_rows_kernel, dict(SRC="*fp32", DST="*fp32", PARAMS="*fp32", pstride="i32", flag_col="i32",
                                       sigma_col="i32", n_rows="i32", w="i32"),
             dict(KSIZE=23, ROWS=4, BLOCK_W=256, SYNC=True), 4)
compile_sm90(K._blur_cols_kernel, dict(SRC="*fp32", OUT="*bf16", PARAMS="*fp32", pstride="i32", flag_col="i32",
                                       sigma_col="i32", solar_col="i32", thresh_col="i32", C="i32", h="i32", w="i32",
                                       **norm),
             dict(KSIZE=23, ROWS=2, BLOCK_W=256, EPILOGUE=True), 4)
print("compiled")
"""


def test_kernels_compile_for_sm90():
    """The interpreter accepts code that a GPU compile rejects (non-constexpr globals, shapes): compile every
    kernel ahead of time for sm_90 with the launchers' GPU tile shapes. No GPU needed (Triton's bundled
    ptxas); run in a fresh interpreter because TRITON_INTERPRET replaces the jit functions in this one."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _COMPILE_SM90], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "compiled" in r.stdout, r.stderr[-3000:]


# ------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("chw,out_dtype", [(True, torch.bfloat16), (False, torch.float32)])
def test_gpu_augment_views_realistic(seed, chw, out_dtype):
    """224-pixel views of 500×375 and 333×500 images, blur on, against the float64 reference on the CPU."""
    dev = torch.device("cuda")
    shapes = [(375, 500), (500, 333), (375, 500), (256, 256)]
    flat, offs, sizes = _images(shapes, seed, chw)
    params = _params(BUSY, sizes, 2, seed)
    out = aug.augment_views(flat.to(dev), offs.to(dev), sizes.to(dev), params.to(dev), 224, chw=chw, dtype=out_dtype)
    torch.cuda.synchronize()
    want = ref.augment_views_literal(flat, offs, sizes, params, 224, 224, chw, torch.float64, MEAN, STD, 23)
    _compare(out, want, params, out_dtype, "cuda", f"seed={seed} chw={chw} {out_dtype}")


@pytest.mark.gpu
def test_gpu_gaussian_blur_and_params_on_device(seed):
    dev = torch.device("cuda")
    x = torch.rand(4, 3, 96, 224, device=dev) + 0.1
    sigma = torch.tensor([0.1, 0.7, 1.3, 2.0], device=dev)
    out = aug.gaussian_blur(x, sigma, 23)
    want = ref.gaussian_blur_batch(x.double().cpu(), sigma.cpu(), 23)
    assert_close(out, want, 1e-5, "blur")
    sizes = torch.tensor([[375, 500]] * 1024, dtype=torch.int32, device=dev)
    p = aug.sample_view_params(
        P.byol().views[1], sizes, count=2, generator=torch.Generator(device=dev).manual_seed(seed)
    )
    assert p.is_cuda and p.shape == (2, 1024, aug.NUM_FIELDS)
    assert abs(p[..., pt.F_SOLAR].mean().item() - 0.2) < 0.05


@pytest.mark.gpu
@pytest.mark.parametrize("antialias", [True, False])
def test_reference_matches_torchvision(seed, antialias):
    """The reference's ops are torchvision's: each view of `ref.augment_one` equals the same parameters run
    through torchvision.transforms.v2.functional in float64 (GPU machines usually have torchvision; CPU CI does not)."""
    TF = pytest.importorskip("torchvision.transforms.v2.functional")
    from torchvision.transforms import InterpolationMode

    flat, offs, sizes = _images([(61, 47), (40, 70)], seed, True)
    params = _params(BUSY, sizes, 3, seed)
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    for b in range(2):
        h, w = sizes[b].tolist()
        img = pt.unpack_image(flat, int(offs[b]), h, w, True)
        for g in range(3):
            p = params[g, b].double().tolist()
            top, left, ch, cw = (int(p[i]) for i in (pt.F_TOP, pt.F_LEFT, pt.F_HEIGHT, pt.F_WIDTH))
            x = TF.resized_crop(
                img.double() / 255,
                top,
                left,
                ch,
                cw,
                [40, 40],
                interpolation=InterpolationMode.BILINEAR,
                antialias=antialias,
            )
            if p[pt.F_FLIP]:
                x = TF.horizontal_flip(x)
            if p[pt.F_JITTER]:
                factors = (p[pt.F_BRIGHT], p[pt.F_CONTRAST], p[pt.F_SAT], p[pt.F_HUE])
                for k in range(4):
                    op = int(p[pt.F_ORDER + k])
                    x = ops[op](x, factors[op])
            if p[pt.F_GRAY]:
                x = TF.rgb_to_grayscale(x, num_output_channels=3)
            if p[pt.F_BLUR]:
                x = TF.gaussian_blur(x, [23, 23], [p[pt.F_SIGMA]] * 2)
            if p[pt.F_SOLAR]:
                x = TF.solarize(x, p[pt.F_THRESH])
            want = ref.augment_one(img, p, 40, 40, 23, antialias=antialias)
            assert_close(want, x, 1e-6, f"seed={seed} sample {b} view {g}")
