"""Antialiased resize of the fused augmentation (torchvision v2 RandomResizedCrop, antialias=True): the literal
float64 weights-matrix oracle against torch's interpolate, the kernel (interpreter) and the CPU path against the
oracle for downscales, upscales, mixed and integer scales, per-sample crop sizes in one launch; the plain
bilinear mode kept behind antialias=False; the flag's plumbing and validation."""

import dataclasses
import types

import pytest
import torch
import torch.nn.functional as F

from helpers import assert_close, rel_err, tol
from sslfast.data import presets as P
from sslfast.ops import augment as aug
from sslfast.ops._torch import augment as pt
from sslfast.reference import augment as ref

UNIT = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))  # outputs are the resized values in [0, 1]

# (crop H, crop W) -> (out H, out W)
RESIZES = [
    ((37, 29), (8, 8)),
    ((50, 41), (13, 11)),
    ((7, 5), (16, 16)),
    ((5, 31), (12, 7)),
    ((29, 4), (13, 11)),
    ((39, 33), (13, 11)),
    ((13, 11), (13, 11)),
    ((1, 1), (4, 3)),
    ((61, 9), (3, 5)),
]


@pytest.mark.parametrize("crop,out", RESIZES)
def test_oracle_is_torch_antialiased_bilinear(seed, crop, out):
    """The literal formula is torch's (hence torchvision v2's) antialiased bilinear resize; upscaling along
    both axes, it is also the plain bilinear resize."""
    x = torch.rand(3, *crop, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    got = ref.resize_antialias_literal(x, *out)
    want = F.interpolate(x[None], size=out, mode="bilinear", align_corners=False, antialias=True)[0]
    assert_close(got, want, 1e-12, f"seed={seed} {crop}->{out}")
    w = ref.antialias_weights(crop[1], out[1])
    assert w.shape == (out[1], crop[1]) and torch.allclose(w.sum(1), torch.ones(out[1], dtype=torch.float64))
    if crop[0] <= out[0] and crop[1] <= out[1]:
        plain = F.interpolate(x[None], size=out, mode="bilinear", align_corners=False, antialias=False)[0]
        assert_close(got, plain, 1e-12, f"seed={seed} upscale {crop}->{out}")


def _crops(crop_sizes, seed, chw):
    """One image per crop size with random margins, and params [2, B, NUM_FIELDS] that crop exactly that box
    (random offset) with no colour op; view 1 flipped. Returns (images [3, H, W], flat, offsets, sizes, params)."""
    g = torch.Generator().manual_seed(seed)

    def rint(n):
        return int(torch.randint(0, n, (1,), generator=g))

    imgs, boxes = [], []
    for h, w in crop_sizes:
        top, left = rint(4), rint(3)
        imgs.append(torch.randint(0, 256, (3, h + top + rint(3), w + left + rint(3)), generator=g, dtype=torch.uint8))
        boxes.append((top, left, h, w))
    flat, offs, sizes = aug.pack_images([im if chw else im.permute(1, 2, 0) for im in imgs], chw=chw)
    params = torch.zeros(2, len(imgs), aug.NUM_FIELDS)
    params[:, :, [pt.F_TOP, pt.F_LEFT, pt.F_HEIGHT, pt.F_WIDTH]] = torch.tensor(boxes, dtype=torch.float32)
    params[1, :, pt.F_FLIP] = 1.0
    return imgs, boxes, flat, offs, sizes, params


def _oracle(img, box, out_hw, flip):
    top, left, h, w = box
    x = ref.resize_antialias_literal(img[:, top : top + h, left : left + w].double() / 255.0, *out_hw)
    return x.flip(-1) if flip else x


# One launch per case: every sample has its own crop, hence its own scale and tap count.
CASES = {
    "down_up_mixed_8x8": ([(37, 29), (7, 5), (5, 31), (60, 45), (8, 8)], (8, 8)),
    "odd_13x11": ([(50, 41), (29, 4), (39, 33), (13, 11), (3, 40)], (13, 11)),
}


@pytest.mark.parametrize(
    "case,chw,out_dtype",
    [
        ("down_up_mixed_8x8", False, torch.float32),
        ("odd_13x11", True, torch.float32),
        ("odd_13x11", False, torch.bfloat16),
    ],
)
def test_antialiased_views_match_oracle(backend, seed, case, chw, out_dtype):
    crop_sizes, out_hw = CASES[case]
    imgs, boxes, flat, offs, sizes, params = _crops(crop_sizes, seed, chw)
    out = aug.augment_views(
        flat, offs, sizes, params, out_hw, chw=chw, dtype=out_dtype, blur_kernel=0, antialias=True, **UNIT
    )
    assert out.shape == (2, len(imgs), 3, *out_hw) and out.dtype == out_dtype
    for g in range(2):
        for b, (img, box) in enumerate(zip(imgs, boxes)):
            want = _oracle(img, box, out_hw, flip=g == 1)
            assert_close(out[g, b], want, tol(out_dtype), f"seed={seed} {backend} crop {box[2:]} view {g}")


def test_plain_bilinear_kept_behind_flag(backend, seed):
    """antialias=False is the old two-tap bilinear (torch's antialias=False); it differs from the antialiased
    resize on a downscale and agrees with it on an upscale."""
    imgs, boxes, flat, offs, sizes, params = _crops([(37, 29), (5, 4)], seed, False)
    plain = aug.augment_views(flat, offs, sizes, params, (8, 7), blur_kernel=0, antialias=False, **UNIT)
    smooth = aug.augment_views(flat, offs, sizes, params, (8, 7), blur_kernel=0, antialias=True, **UNIT)
    for g in range(2):
        for b, (img, (top, left, h, w)) in enumerate(zip(imgs, boxes)):
            crop = img[None, :, top : top + h, left : left + w].double() / 255.0
            want = F.interpolate(crop, size=(8, 7), mode="bilinear", align_corners=False, antialias=False)[0]
            want = want.flip(-1) if g else want
            assert_close(plain[g, b], want, 1e-5, f"seed={seed} {backend} plain crop {h}x{w} view {g}")
    assert rel_err(plain[:, 0], smooth[:, 0]) > 1e-2  # 37x29 -> 8x7: the filters differ
    assert_close(plain[:, 1], smooth[:, 1], 1e-5, "upscale")  # 5x4 -> 8x7: both are bilinear


def test_full_pipeline_with_and_without_antialias(backend, seed):
    """Colour ops, gray, blur and solarize after either resize: the op against the float64 literal reference."""
    imgs, boxes, flat, offs, sizes, _ = _crops([(23, 19), (6, 9)], seed, True)
    spec = P.ViewSpec(jitter_p=1.0, gray_p=0.5, blur_p=1.0, solarize_p=0.0, scale=(0.3, 1.0))
    params = aug.sample_view_params(spec, sizes, count=2, generator=torch.Generator().manual_seed(seed))
    for aa in (True, False):
        out = aug.augment_views(flat, offs, sizes, params, (9, 7), chw=True, blur_kernel=5, antialias=aa)
        want = ref.augment_views_literal(
            flat, offs, sizes, params, 9, 7, True, torch.float64, P.IMAGENET_MEAN, P.IMAGENET_STD, 5, antialias=aa
        )
        assert_close(out, want, 1e-5, f"seed={seed} {backend} antialias={aa}")


def test_augment_batch_passes_the_flag(seed):
    """augment_batch: the call's flag reaches every view, a spec's own `antialias` attribute overrides it, and
    views that differ only in the flag get separate launches."""
    _, _, flat, offs, sizes, _ = _crops([(30, 26), (28, 31)], seed, False)
    spec = P.ViewSpec(size=6, scale=(0.5, 1.0), blur_p=0.0)
    plain_spec = types.SimpleNamespace(**dataclasses.asdict(spec), antialias=False)

    def params_of(views):
        gen = torch.Generator().manual_seed(seed)
        return [aug.sample_view_params(v, sizes, count=v.count, generator=gen) for v in views]

    def views_of(p, aa):
        return aug.augment_views(flat, offs, sizes, p, 6, blur_kernel=0, antialias=aa)[0]

    for flag in (True, False):
        got = aug.augment_batch(
            flat, offs, sizes, [spec], generator=torch.Generator().manual_seed(seed), antialias=flag
        )
        assert torch.equal(got[0], views_of(params_of([spec])[0], flag)), flag
    got = aug.augment_batch(flat, offs, sizes, [spec, plain_spec], generator=torch.Generator().manual_seed(seed))
    p0, p1 = params_of([spec, plain_spec])
    assert torch.equal(got[0], views_of(p0, True)) and torch.equal(got[1], views_of(p1, False))


def test_bad_antialias_names_the_argument():
    _, _, flat, offs, sizes, params = _crops([(6, 5)], 0, False)
    with pytest.raises(TypeError, match="antialias"):
        aug.augment_views(flat, offs, sizes, params, 4, antialias="yes")
    with pytest.raises(TypeError, match="antialias"):
        aug.augment_batch(flat, offs, sizes, [P.ViewSpec(size=4)], antialias=1)
    bad = types.SimpleNamespace(**dataclasses.asdict(P.ViewSpec(size=4)), antialias=None)
    with pytest.raises(TypeError, match="antialias"):
        aug.augment_batch(flat, offs, sizes, [bad])


@pytest.mark.gpu
@pytest.mark.parametrize("chw", [True, False])
def test_gpu_large_downscales_match_oracle(seed, chw):
    """Realistic crops at the launchers' GPU tile shapes: 500×375 and 333×500 images down to 224 and to 32
    (up to ~16 taps per axis), a 60×50 crop up to 224."""
    dev = torch.device("cuda")
    for crop_sizes, out_hw in (([(375, 500), (500, 333), (60, 50)], (224, 224)), ([(375, 500), (200, 40)], (32, 32))):
        imgs, boxes, flat, offs, sizes, params = _crops(crop_sizes, seed, chw)
        out = aug.augment_views(
            flat.to(dev),
            offs.to(dev),
            sizes.to(dev),
            params.to(dev),
            out_hw,
            chw=chw,
            blur_kernel=0,
            antialias=True,
            **UNIT,
        ).cpu()
        for g in range(2):
            for b, (img, box) in enumerate(zip(imgs, boxes)):
                assert_close(out[g, b], _oracle(img, box, out_hw, g == 1), 1e-5, f"seed={seed} {box} -> {out_hw}")
