"""sslfast.data: presets, SSLLoader on both backends (native: the CPU path and the fused kernel under the
interpreter; DALI: its real CPU graph), view statistics, determinism, sharding. Sources and bad files:
tests/test_data_sources.py."""

import dataclasses
import math

import numpy as np
import pytest
import torch

import sslfast as sf
from sslfast.data import presets as P
from sslfast.data import synthetic as S
from data_helpers import check_views, dali_or_skip


# ------------------------------------------------------------------------------------------- presets
def test_presets_match_the_papers():
    want = {
        "simclr": [224] * 2,
        "moco_v2": [224] * 2,
        "byol": [224] * 2,
        "barlow": [224] * 2,
        "vicreg": [224] * 2,
        "dino": [224] * 2 + [96] * 8,
        "mae": [224],
        "swav": [224] * 2 + [96] * 6,
    }
    for name, sizes in want.items():
        p = P.get_preset(name)
        assert p.sizes() == sizes and p.sources, name
    byol = P.byol()
    assert [v.blur_p for v in byol.views] == [1.0, 0.1] and [v.solarize_p for v in byol.views] == [0.0, 0.2]
    s = P.simclr().views[0]
    assert (s.brightness, s.contrast, s.saturation, s.hue, s.jitter_p, s.gray_p, s.blur_p) == (
        0.8,
        0.8,
        0.8,
        0.2,
        0.8,
        0.2,
        0.5,
    )
    assert P.moco_v2().views[0].scale == (0.2, 1.0) and P.moco_v2().views[0].saturation == 0.4
    d = P.dino()
    assert [v.scale for v in d.views] == [(0.4, 1.0), (0.4, 1.0), (0.05, 0.4)]
    assert [v.blur_p for v in d.views] == [1.0, 0.1, 0.5] and [v.solarize_p for v in d.views] == [0, 0.2, 0]
    m = P.mae().views[0]
    assert m.scale == (0.2, 1.0) and not m.has_jitter and m.gray_p == 0 and m.blur_p == 0 and m.flip_p == 0.5
    assert P.get_preset("dino", 16).sizes() == [16, 16] + [7] * 8
    assert P.dino(local_crops=10).num_views == 12
    with pytest.raises(ValueError, match="preset"):
        P.get_preset("nope")


# ------------------------------------------------------------------------------------------- loader: shapes
@pytest.mark.parametrize("name", sorted(P.PRESETS))
def test_views_shapes_dtypes_ranges(loader_backend, jpeg_root, name):
    ld = sf.data.SSLLoader(
        jpeg_root, preset=name, batch_size=4, backend=loader_backend, device="cpu", image_size=16, num_workers=2
    )
    batches = list(ld)
    assert len(batches) == len(ld) == 2  # 10 images, drop_last
    for views in batches:
        check_views(views, ld.preset, 4, torch.float32)
    assert ld.skipped == 0  # notes.txt is not an image file: never listed


@pytest.mark.parametrize("name", ["byol", "dino"])
def test_views_through_the_fused_kernel(backend, jpeg_root, name):
    """The native loader on the Triton kernels under the interpreter (backend fixture), bf16 views."""
    ld = sf.data.SSLLoader(
        jpeg_root,
        preset=name,
        batch_size=2,
        backend="native",
        device="cpu",
        image_size=12,
        dtype=torch.bfloat16,
        num_workers=1,
    )
    views = next(iter(ld))
    check_views(views, ld.preset, 2, torch.bfloat16)


def test_dali_bf16_and_partial_last_batch(jpeg_root):
    dali_or_skip()
    ld = sf.data.SSLLoader(
        jpeg_root,
        preset="simclr",
        batch_size=4,
        backend="dali",
        device="cpu",
        image_size=8,
        drop_last=False,
        dtype=torch.bfloat16,
    )
    batches = list(ld)
    assert [b[0].shape[0] for b in batches] == [4, 4, 2] and len(ld) == 3
    check_views(batches[-1], ld.preset, 2, torch.bfloat16)


def test_native_partial_last_batch_and_shards(jpeg_root):
    ld = sf.data.SSLLoader(jpeg_root, preset="mae", batch_size=4, device="cpu", image_size=8, drop_last=False)
    assert [b[0].shape[0] for b in ld] == [4, 4, 2]
    shards = [
        sf.data.SSLLoader(jpeg_root, preset="mae", batch_size=2, device="cpu", image_size=8, shard_id=r, num_shards=3)
        for r in range(3)
    ]
    idx = [s.shard_indices(5) for s in shards]
    assert all(len(i) == 3 for i in idx) and len(set(sum(idx, []))) == 9  # 10 // 3 each, disjoint
    assert all(len(s) == 1 for s in shards)
    padded = [
        sf.data.SSLLoader(
            jpeg_root, preset="mae", batch_size=2, device="cpu", image_size=8, shard_id=r, num_shards=3, drop_last=False
        ).shard_indices(5)
        for r in range(3)
    ]
    assert all(len(i) == 4 for i in padded) and set(sum(padded, [])) == set(range(10))


def test_shard_defaults_to_torch_distributed(jpeg_root, monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 1)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    ld = sf.data.SSLLoader(jpeg_root, preset="mae", batch_size=2, device="cpu", image_size=8)
    assert (ld.shard_id, ld.num_shards) == (1, 2) and len(ld) == 2
    other = sf.data.SSLLoader(jpeg_root, preset="mae", batch_size=2, device="cpu", image_size=8, shard_id=0)
    assert other.num_shards == 2 and not set(ld.shard_indices(0)) & set(other.shard_indices(0))


# ------------------------------------------------------------------------------------------- statistics
def _probe_source(n):
    """One 16×16 image, n times: top half a dark red horizontal ramp (flip: slope sign; never solarized),
    bottom half a bright constant (solarize: turns dark)."""
    img = np.zeros((16, 16, 3), np.uint8)
    img[:8, :, 0] = np.linspace(20, 110, 16).astype(np.uint8)[None, :]
    img[:8, :, 1:] = 10
    img[8:] = (235, 215, 200)
    return np.repeat(img[None], n, axis=0)


@pytest.mark.parametrize("name", sorted(P.PRESETS))
def test_flip_gray_solarize_rates(loader_backend, name):
    """Per preset and view, measured on the output pixels: flip, grayscale and solarize rates within 4.5σ of
    the preset's probabilities (exact when p is 0 or 1). Full-image crops and no jitter/blur so that each effect
    is readable from the pixels; the probabilities under test are the preset's own."""
    n = 240
    base = P.get_preset(name, 16)
    probe = base.replace_views(scale=(1.0, 1.0), ratio=(1.0, 1.0), jitter_p=0.0, blur_p=0.0)
    ld = sf.data.SSLLoader(
        _probe_source(n), preset=probe, batch_size=n, backend=loader_backend, device="cpu", seed=11, shuffle=False
    )
    views = next(iter(ld))
    m = torch.tensor(probe.mean).view(1, 3, 1, 1)
    s = torch.tensor(probe.std).view(1, 3, 1, 1)
    for k, (v, spec) in enumerate(zip(views, probe.expanded())):
        x = v.float() * s + m  # back to [0, 1]
        gray = (x[:, 0] - x[:, 1]).abs().amax((1, 2)) < 2e-3
        lum = x[:, 0] * 0.2989 + x[:, 1] * 0.587 + x[:, 2] * 0.114
        top = lum[:, 2:6]
        flipped = top[:, :, :4].mean((1, 2)) > top[:, :, -4:].mean((1, 2))
        solarized = lum[:, 10:14].mean((1, 2)) < 0.5
        for what, hits, p in (
            ("flip", flipped, spec.flip_p),
            ("gray", gray, spec.gray_p),
            ("solarize", solarized, spec.solarize_p),
        ):
            rate = hits.float().mean().item()
            band = 4.5 * math.sqrt(p * (1 - p) / n) + 1e-9
            assert abs(rate - p) <= band, f"{name} view {k} {what}: rate {rate:.3f}, p {p}"


# ------------------------------------------------------------------------------------------- determinism
def test_same_seed_same_views(loader_backend, jpeg_root):
    def run(seed, epoch=None):
        ld = sf.data.SSLLoader(
            jpeg_root,
            preset="byol",
            batch_size=4,
            backend=loader_backend,
            device="cpu",
            image_size=12,
            seed=seed,
            num_workers=2,
        )
        if epoch is not None:
            ld.set_epoch(epoch)
        return [torch.cat(v) for v in ld], ld

    a, ld = run(5)
    b, _ = run(5)
    c, _ = run(6)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    # Iterating again is the next epoch (new permutation and views); set_epoch replays one.
    e1 = [torch.cat(v) for v in ld]
    assert not all(torch.equal(x, y) for x, y in zip(a, e1))
    if loader_backend == "native":  # DALI's random operators keep their stream across epochs
        ld.set_epoch(1)
        assert all(torch.equal(x, torch.cat(y)) for x, y in zip(e1, ld))


# ------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("name", ["simclr", "dino"])
def test_gpu_native_loader_from_jpegs(tmp_path, name):
    """The native GPU path: nvJPEG decode (torchvision) or PIL, the fused kernel, views on the GPU; a corrupt
    file is skipped; same seed, same views."""
    S.write_jpeg_folder(tmp_path, 40, size=(500, 375), classes=2, seed=1)
    (tmp_path / "class_0" / "zz_bad.jpg").write_bytes(b"\xff\xd8\xff" + bytes(100) + b"\xff\xd9")

    def run():
        ld = sf.data.SSLLoader(tmp_path, preset=name, batch_size=16, device="cuda", dtype=torch.bfloat16, seed=3)
        return [v for b in ld for v in b], ld

    a, ld = run()
    b, _ = run()
    assert len(a) == 2 * ld.preset.num_views
    for views in (a[: ld.preset.num_views],):
        check_views(views, ld.preset, 16, torch.bfloat16, "cuda")
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert ld.skipped <= 1  # the bad file is counted when its epoch position falls in the 32 used


@pytest.mark.gpu
def test_gpu_dali_loader():
    dali_or_skip()
    images = np.random.default_rng(0).integers(0, 256, (32, 64, 48, 3), dtype=np.uint8)
    ld = sf.data.SSLLoader(images, preset="byol", batch_size=8, backend="dali", device="cuda", image_size=32)
    for views in ld:
        check_views(views, ld.preset, 8, torch.float32, "cuda")


def test_dataclass_specs_are_hashable():
    assert len({P.ViewSpec(), dataclasses.replace(P.ViewSpec(), size=96)}) == 2
