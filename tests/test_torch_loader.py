"""SSLLoader(backend="torch"): the DataLoader baseline — shapes and normalization, the per-sample math against
the float64 oracle, the statistics of `sample_params` against each preset's distributions, the loader's batch
order and sharding, determinism across worker counts and shards, bad files."""

import dataclasses
import math
import os

import numpy as np
import pytest
import torch

import sslfast as sf
from sslfast.data import presets as P
from sslfast.data import synthetic as S
from sslfast.data import torch_loader as T
from sslfast.ops._torch import augment as pt
from sslfast.reference import augment as ref


@pytest.fixture(autouse=True)
def _one_thread():
    """Per-sample ops are tiny: intra-op threads only contend (DataLoader workers run single-threaded too)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def jpeg_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("jpegs")
    S.write_jpeg_folder(root, 11, size=(27, 19), classes=2, seed=8)
    return root


def _unnormalize(v, preset):
    m = torch.tensor(preset.mean, dtype=torch.float64).view(1, 3, 1, 1)
    s = torch.tensor(preset.std, dtype=torch.float64).view(1, 3, 1, 1)
    return v.double() * s + m


def _ks(samples, cdf) -> float:
    """Kolmogorov–Smirnov statistic of `samples` against the CDF `cdf` (vectorized callable)."""
    x = np.sort(np.asarray(samples, dtype=np.float64))
    n = len(x)
    c = cdf(x)
    return float(max((np.arange(1, n + 1) / n - c).max(), (c - np.arange(n) / n).max()))


def _uniform_cdf(lo, hi):
    return lambda x: np.clip((x - lo) / (hi - lo), 0.0, 1.0)


def _ks_bound(n: int) -> float:
    return 1.95 / math.sqrt(n)  # α = 0.001


def _draw(spec, n, height, width, seed):
    g = torch.Generator().manual_seed(seed)
    return [T.sample_params(spec, g, height, width) for _ in range(n)]


def _rate_ok(hits, p, n, what):
    rate = sum(hits) / n
    band = 4.5 * math.sqrt(p * (1 - p) / n) + 1e-12
    assert abs(rate - p) <= band, f"{what}: rate {rate:.4f}, p {p}"


# ------------------------------------------------------------------------------------------- statistics
@pytest.mark.parametrize("name", sorted(P.PRESETS))
def test_event_rates_match_each_preset(name, seed):
    """Flip, jitter, gray, blur and solarize rates of every view of every preset within 4.5σ of its p (exact at
    p = 0 and 1); the views of one sample draw independently."""
    n = 1500
    for k, spec in enumerate(P.get_preset(name).views):
        ps = _draw(spec, n, 375, 500, seed + k)
        jitter_p = spec.jitter_p if spec.has_jitter else 0.0
        for what, p in (
            ("flip", spec.flip_p),
            ("jitter", jitter_p),
            ("gray", spec.gray_p),
            ("blur", spec.blur_p),
            ("solarize", spec.solarize_p),
        ):
            _rate_ok([getattr(q, what) for q in ps], p, n, f"{name} view {k} {what} (seed {seed})")
        assert all(q.threshold == spec.solarize_threshold for q in ps)
    g = torch.Generator().manual_seed(seed)
    spec = P.get_preset(name).views[0]
    pairs = [(T.sample_params(spec, g, 64, 64).flip, T.sample_params(spec, g, 64, 64).flip) for _ in range(n)]
    _rate_ok([a == b for a, b in pairs], 0.5, n, f"{name}: two views flip together")


def test_distinct_probabilities_land_in_their_fields(seed):
    """Five different probabilities, so a draw wired to the wrong field cannot pass."""
    spec = P.ViewSpec(flip_p=0.3, jitter_p=0.7, gray_p=0.15, blur_p=0.45, solarize_p=0.6)
    n = 2000
    ps = _draw(spec, n, 50, 70, seed)
    for what in ("flip", "jitter", "gray", "blur", "solarize"):
        _rate_ok([getattr(q, what) for q in ps], getattr(spec, f"{what}_p"), n, f"{what} (seed {seed})")


def test_crop_area_follows_random_resized_crop(seed):
    """Area fraction of the box: with scale (0.08, 1) on a square image, torchvision's rejection (a box wider
    or taller than the image is redrawn) gives the density ∝ P(accept | a) on [0.08, 1], where
    P(accept | a) = 1 for a ≤ 3/4 and −ln a / ln(4/3) above; KS against that CDF. The box stays inside."""
    n, side = 3000, 4096
    spec = P.ViewSpec(scale=(0.08, 1.0))
    ps = _draw(spec, n, side, side, seed)
    area = np.array([q.height * q.width / side**2 for q in ps])
    assert all(0 <= q.top and q.top + q.height <= side and 0 <= q.left and q.left + q.width <= side for q in ps)
    assert area.min() >= 0.08 - 1e-3 and area.max() <= 1.0
    grid = np.linspace(0.08, 1.0, 20001)
    dens = np.where(grid <= 0.75, 1.0, -np.log(grid) / math.log(4 / 3))
    cum = np.concatenate([[0.0], np.cumsum((dens[1:] + dens[:-1]) / 2 * np.diff(grid))])
    cum /= cum[-1]
    d = _ks(area, lambda x: np.interp(x, grid, cum))
    assert d < _ks_bound(n), f"KS {d:.4f} (seed {seed})"
    # uniform area (no rejection) is far from it: the test can tell
    assert _ks(area, _uniform_cdf(0.08, 1.0)) > 3 * _ks_bound(n)


def test_crop_area_aspect_position_uniform_without_rejection(seed):
    """DINO's local crops (scale (0.05, 0.4)) never overflow: area ~ U(0.05, 0.4), log aspect ~ U(log 3/4,
    log 4/3), and the position uniform over the free range (KS each)."""
    n, h_img, w_img = 2500, 3001, 4093
    spec = P.dino().views[2]
    assert spec.scale == (0.05, 0.4)
    ps = _draw(spec, n, h_img, w_img, seed)
    area = [q.height * q.width / (h_img * w_img) for q in ps]
    log_aspect = [math.log(q.width / q.height) for q in ps]
    top = [(q.top + 0.5) / (h_img - q.height + 1) for q in ps]
    left = [(q.left + 0.5) / (w_img - q.width + 1) for q in ps]
    for what, x, cdf in (
        ("area", area, _uniform_cdf(0.05, 0.4)),
        ("aspect", log_aspect, _uniform_cdf(math.log(3 / 4), math.log(4 / 3))),
        ("top", top, _uniform_cdf(0, 1)),
        ("left", left, _uniform_cdf(0, 1)),
    ):
        d = _ks(x, cdf)
        assert d < _ks_bound(n), f"{what}: KS {d:.4f} (seed {seed})"


def test_jitter_factors_order_and_sigma(seed):
    """Brightness ~ U(max(0, 1 − b), 1 + b) (b > 1 clips the low end at 0), contrast/saturation likewise, hue
    ~ U(−h, h), sigma ~ U(blur_sigma) (KS each); each op at each order position with rate 1/4, and all 24
    orders occur."""
    n = 2500
    spec = P.ViewSpec(brightness=1.5, contrast=0.8, saturation=0.3, hue=0.2, blur_sigma=(0.3, 1.7))
    ps = _draw(spec, n, 40, 30, seed)
    for what, lo, hi in (
        ("brightness", 0.0, 2.5),
        ("contrast", 0.2, 1.8),
        ("saturation", 0.7, 1.3),
        ("hue", -0.2, 0.2),
        ("sigma", 0.3, 1.7),
    ):
        d = _ks([getattr(q, what) for q in ps], _uniform_cdf(lo, hi))
        assert d < _ks_bound(n), f"{what}: KS {d:.4f} (seed {seed})"
    for pos in range(4):
        for op in range(4):
            _rate_ok([q.order[pos] == op for q in ps], 0.25, n, f"op {op} at position {pos} (seed {seed})")
    assert len({q.order for q in ps}) == 24 and all(sorted(q.order) == [0, 1, 2, 3] for q in ps)


def test_fallback_central_crop():
    """An image too elongated for any attempt gets the central crop with the ratio clamped (torchvision)."""
    g = torch.Generator().manual_seed(0)
    spec = P.ViewSpec(scale=(0.9, 1.0))
    q = T.sample_params(spec, g, 10, 200)  # ratio 20: every box of area ≥ 0.9 is too tall
    assert (q.height, q.width) == (10, round(10 * 4 / 3)) and q.top == 0 and q.left == (200 - 13) // 2
    q = T.sample_params(spec, g, 300, 7)
    assert (q.height, q.width) == (round(7 / 0.75), 7) and q.left == 0 and q.top == (300 - 9) // 2


def test_sample_params_argument_errors():
    spec = P.ViewSpec()
    with pytest.raises(TypeError, match="generator"):
        T.sample_params(spec, None, 10, 10)
    with pytest.raises(ValueError, match="height"):
        T.sample_params(spec, torch.Generator(), 0, 10)
    with pytest.raises(TypeError, match="width"):
        T.sample_params(spec, torch.Generator(), 10, 10.0)


# ------------------------------------------------------------------------------------------- pixel math
@pytest.mark.parametrize("kernel", [5, 23])
def test_augment_sample_matches_the_float64_oracle(seed, kernel):
    """`augment_sample` (float32, the loader's math) against `reference.augment.augment_one` (float64) on the
    same parameter row, every op forced on in turn; a 23-tap blur on an 11-pixel view folds the reflection."""
    g = torch.Generator().manual_seed(seed)
    img = torch.randint(0, 256, (3, 23, 31), generator=g, dtype=torch.uint8)
    spec = P.ViewSpec(
        size=11,
        scale=(0.1, 1.0),
        jitter_p=1.0,
        brightness=0.6,
        contrast=0.5,
        saturation=0.7,
        hue=0.3,
        gray_p=0.3,
        blur_p=0.7,
        blur_kernel=kernel,
        solarize_p=0.5,
        solarize_threshold=0.45,
    )
    for _ in range(12):
        p = T.sample_params(spec, g, 23, 31)
        got = T.augment_sample(img, p, spec)
        want = ref.augment_one(img, p.as_row(), 11, 11, kernel, torch.float64)
        assert got.dtype == torch.float32 and got.shape == (3, 11, 11)
        err = (got.double() - want).abs().max().item()
        assert err < 1e-4, f"{p} (seed {seed}): max error {err:.3g}"
    # a strength-0 op is left out, as torchvision does (an identity)
    off = dataclasses.replace(spec, hue=0.0, gray_p=0.0, blur_p=0.0, solarize_p=0.0)
    p = dataclasses.replace(T.sample_params(off, g, 23, 31), hue=0.25)
    row = p.as_row()
    row[pt.F_HUE] = 0.0
    want = ref.augment_one(img, row, 11, 11, kernel, torch.float64)
    assert (T.augment_sample(img, p, off).double() - want).abs().max().item() < 1e-4


# ------------------------------------------------------------------------------------------- loader
@pytest.mark.parametrize("name", ["simclr", "dino"])
def test_shapes_dtypes_normalization(name, jpeg_root):
    """Every view [B, 3, S, S] in the loader's dtype with values inside the normalized [0, 1] range; on
    constant-colour images with no colour op, every pixel is exactly (c/255 − mean)/std."""
    for dtype in (torch.float32, torch.bfloat16):
        ld = sf.data.SSLLoader(
            jpeg_root,
            preset=name,
            batch_size=4,
            backend="torch",
            device="cpu",
            image_size=12,
            num_workers=0,
            dtype=dtype,
        )
        batches = list(ld)
        assert len(batches) == len(ld) == 2
        for views in batches:
            assert len(views) == ld.preset.num_views
            for v, size in zip(views, ld.preset.sizes()):
                assert v.shape == (4, 3, size, size) and v.dtype == dtype
                x = _unnormalize(v, ld.preset)
                slack = 1e-5 if dtype == torch.float32 else 2e-2
                assert x.min() >= -slack and x.max() <= 1 + slack
    colours = np.array([[200, 30, 90], [7, 250, 128], [64, 64, 64]], np.uint8)
    images = np.broadcast_to(colours[:, None, None, :], (3, 17, 13, 3)).copy()
    plain = P.get_preset(name, 8).replace_views(jitter_p=0.0, gray_p=0.0, solarize_p=0.0)
    ld = sf.data.SSLLoader(
        images, preset=plain, batch_size=3, backend="torch", device="cpu", shuffle=False, num_workers=0
    )
    want = (torch.from_numpy(colours).double() / 255 - torch.tensor(plain.mean)) / torch.tensor(plain.std)
    for v in next(iter(ld)):
        assert (v.double() - want[:, :, None, None]).abs().max() < 1e-5


def _index_probe(n):
    """n constant images whose colour spells their index."""
    i = np.arange(n)
    colours = np.stack([i, 255 - i, (7 * i) % 256], axis=1).astype(np.uint8)
    return np.broadcast_to(colours[:, None, None, :], (n, 9, 11, 3)).copy()


def _decoded_indices(views, preset):
    x = _unnormalize(views[0], preset)[:, :, 0, 0]
    return torch.round(x[:, 0] * 255).long().tolist()


def test_batch_order_and_sharding_match_the_other_backend():
    """Same images in the same batches as the native backend: shard 1 of 2, shuffled, two epochs, the last
    partial batch kept; each batch holds `shard_indices(epoch)` in order."""
    n, b = 37, 5
    preset = P.mae(6)
    kw = dict(preset=preset, batch_size=b, device="cpu", seed=3, shard_id=1, num_shards=2, drop_last=False)
    torch_ld = sf.data.SSLLoader(_index_probe(n), backend="torch", num_workers=0, **kw)
    native_ld = sf.data.SSLLoader(_index_probe(n), backend="native", num_workers=1, **kw)
    for epoch in range(2):
        shard = torch_ld.shard_indices(epoch)
        want = [shard[k : k + b] for k in range(0, len(shard), b)]
        got = [_decoded_indices(v, preset) for v in torch_ld]
        assert got == want == [_decoded_indices(v, preset) for v in native_ld]


def test_deterministic_across_workers_shards_and_resume(jpeg_root):
    """Views depend on (seed, epoch, index) only: 0 or 2 worker processes, one shard or two, and a replay with
    `set_epoch` give the same views for the same image; another seed or epoch gives others."""
    kw = dict(preset="byol", batch_size=3, backend="torch", device="cpu", image_size=10)

    def epoch_views(ld, epoch):
        ld.set_epoch(epoch)
        rows = {}
        for views, idx in zip(ld, [ld.shard_indices(epoch)[k : k + 3] for k in range(0, 3 * len(ld), 3)]):
            for r, i in enumerate(idx):
                rows[i] = torch.cat([v[r].flatten() for v in views])
        return rows

    base = sf.data.SSLLoader(jpeg_root, seed=4, num_workers=0, **kw)
    a = epoch_views(base, 1)
    b = epoch_views(sf.data.SSLLoader(jpeg_root, seed=4, num_workers=2, **kw), 1)
    assert a.keys() == b.keys() and all(torch.equal(a[i], b[i]) for i in a)
    half = epoch_views(sf.data.SSLLoader(jpeg_root, seed=4, num_workers=2, shard_id=1, num_shards=2, **kw), 1)
    assert half and all(torch.equal(half[i], a[i]) for i in half.keys() & a.keys())
    assert all(torch.equal(x, a[i]) for i, x in epoch_views(base, 1).items())  # resume: exact replay
    other_epoch = epoch_views(base, 2)
    other_seed = epoch_views(sf.data.SSLLoader(jpeg_root, seed=5, num_workers=0, **kw), 1)
    for other in (other_epoch, other_seed):
        assert not any(torch.equal(x, a[i]) for i, x in other.items() if i in a)


def test_digits_through_worker_processes():
    src = sf.data.digits(16)
    ld = sf.data.SSLLoader(
        src, preset="simclr", batch_size=7, backend="torch", device="cpu", num_workers=2, image_size=12, seed=2
    )
    it = iter(ld)
    views = [next(it) for _ in range(3)]
    del it
    assert all(v[0].shape == (7, 3, 12, 12) for v in views) and ld.skipped == 0
    assert not torch.equal(views[0][0], views[0][1])  # two random views of one batch differ


def test_bad_files_skipped_counted_and_remembered(tmp_path):
    paths = S.write_jpeg_folder(tmp_path, 6, size=(20, 18), classes=1, seed=4)
    good = open(paths[0], "rb").read()
    (tmp_path / "class_0" / "a_text.jpg").write_bytes(b"not an image")
    (tmp_path / "class_0" / "b_truncated.jpg").write_bytes(good[: len(good) // 2])
    ld = sf.data.SSLLoader(
        tmp_path, preset="simclr", batch_size=8, backend="torch", device="cpu", image_size=8, num_workers=2
    )
    ((v1, v2),) = list(ld)
    assert v1.shape == v2.shape == (8, 3, 8, 8) and torch.isfinite(v1).all()
    assert ld.skipped == 2 and {os.path.basename(p) for p, _ in ld.bad_files} == {"a_text.jpg", "b_truncated.jpg"}
    list(ld)
    assert ld.skipped == 2


def test_all_bad_source_is_an_error(tmp_path):
    for i in range(3):
        (tmp_path / f"x{i}.jpg").write_bytes(b"garbage")
    for workers in (0, 1):
        ld = sf.data.SSLLoader(
            tmp_path, preset="mae", batch_size=2, backend="torch", device="cpu", image_size=8, num_workers=workers
        )
        with pytest.raises(RuntimeError, match="could be read and decoded"):
            next(iter(ld))


def test_num_workers_validation(jpeg_root):
    kw = dict(preset="mae", batch_size=2, device="cpu", image_size=8)
    with pytest.raises(ValueError, match="num_workers"):
        sf.data.SSLLoader(jpeg_root, backend="torch", num_workers=-1, **kw)
    with pytest.raises(ValueError, match="num_workers"):
        sf.data.SSLLoader(jpeg_root, backend="native", num_workers=0, **kw)
    with pytest.raises(TypeError, match="num_workers"):
        sf.data.SSLLoader(jpeg_root, backend="torch", num_workers=1.5, **kw)


@pytest.mark.gpu
def test_gpu_views_on_the_device(jpeg_root):
    ld = sf.data.SSLLoader(
        jpeg_root,
        preset="dino",
        batch_size=4,
        backend="torch",
        device="cuda",
        image_size=16,
        num_workers=2,
        dtype=torch.bfloat16,
    )
    cpu = sf.data.SSLLoader(
        jpeg_root,
        preset="dino",
        batch_size=4,
        backend="torch",
        device="cpu",
        image_size=16,
        num_workers=0,
        dtype=torch.bfloat16,
    )
    for a, b in zip(ld, cpu):
        assert all(x.is_cuda and torch.equal(x.cpu(), y) for x, y in zip(a, b))
