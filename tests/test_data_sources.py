"""sslfast.data: sources (arrays, the embedded digits, folder layouts, file lists) and bad input (missing
folders, undecodable files skipped and counted, argument errors) on both loader backends."""

import os

import numpy as np
import pytest
import torch

import sslfast as sf
from sslfast.data import datasets as D
from sslfast.data import synthetic as S
from data_helpers import check_views, dali_or_skip


# ------------------------------------------------------------------------------------------- bad input
def test_missing_and_empty_folders(tmp_path, loader_backend):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sf.data.SSLLoader(tmp_path / "nope", backend=loader_backend, device="cpu")
    (tmp_path / "empty" / "class_a").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images found"):
        sf.data.SSLLoader(tmp_path / "empty", backend=loader_backend, device="cpu")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sf.data.SSLLoader([str(tmp_path / "missing.jpg")], backend=loader_backend, device="cpu")


def test_bad_files_are_skipped_and_counted(tmp_path, loader_backend):
    """A text file named .jpg, a truncated JPEG and a JPEG whose header is garbage (passes the cheap check,
    fails in the decoder: DALI invalidates its pipeline, the loader rebuilds it) are each skipped and counted;
    every batch keeps its size; later epochs do not read them again."""
    paths = S.write_jpeg_folder(tmp_path, 8, size=(20, 18), classes=1, seed=4)
    good = open(paths[0], "rb").read()
    bad = {
        tmp_path / "class_0" / "a_text.jpg": b"this is not an image",
        tmp_path / "class_0" / "b_truncated.jpg": good[: len(good) // 2],
        tmp_path / "class_0" / "c_garbage.jpg": good[:4] + bytes(range(256)) * 2 + b"\xff\xd9",
    }
    for p, data in bad.items():
        p.write_bytes(data)
    ld = sf.data.SSLLoader(
        tmp_path, preset="simclr", batch_size=11, backend=loader_backend, device="cpu", image_size=8, num_workers=2
    )
    views = next(iter(ld))
    check_views(views, ld.preset, 11, torch.float32)
    assert ld.skipped == 3, ld.bad_files
    assert {os.path.basename(p) for p, _ in ld.bad_files} == {p.name for p in bad}
    if loader_backend == "dali":
        assert ld._backend._builds == 2  # the garbage JPEG reached DALI, which was rebuilt once
    list(ld)
    assert ld.skipped == 3


def test_dali_isolates_a_file_only_it_cannot_decode(tmp_path, monkeypatch):
    """If PIL decodes every file of a failing batch, the culprit is found by single-image DALI runs."""
    dali_or_skip()
    from sslfast.data import dali

    paths = S.write_jpeg_folder(tmp_path, 5, size=(16, 16), classes=1, seed=7)
    good = open(paths[0], "rb").read()
    (tmp_path / "class_0" / "zz.jpg").write_bytes(good[:4] + bytes(300) + b"\xff\xd9")
    monkeypatch.setattr(dali, "_pil_ok", lambda data: True)
    ld = sf.data.SSLLoader(tmp_path, preset="mae", batch_size=6, backend="dali", device="cpu", image_size=8)
    (views,) = next(iter(ld))
    assert views.shape[0] == 6 and ld.skipped == 1 and ld.bad_files[0][0].endswith("zz.jpg")


def test_non_image_in_file_list_is_counted(tmp_path, loader_backend):
    paths = S.write_jpeg_folder(tmp_path, 4, size=(16, 16), classes=1, seed=5)
    txt = tmp_path / "readme.txt"
    txt.write_text("hello")
    ld = sf.data.SSLLoader(
        paths + [str(txt)],
        preset="mae",
        batch_size=5,
        backend=loader_backend,
        device="cpu",
        image_size=8,
        shuffle=False,
    )
    (views,) = next(iter(ld))
    assert views.shape[0] == 5 and ld.skipped == 1 and ld.bad_files[0][0] == str(txt)


def test_native_device_decode_path(tmp_path, monkeypatch):
    """The CUDA decode branch (batched JPEG decode into [3, H, W], PIL fallback, skip) with a stand-in for
    nvJPEG so that it runs on the CPU: decodes in PIL, and refuses one file as nvJPEG would."""
    from sslfast.data import native

    paths = S.write_jpeg_folder(tmp_path, 6, size=(21, 17), classes=1, seed=6)
    (tmp_path / "class_0" / "zz_bad.jpg").write_bytes(b"\xff\xd8\xff" + bytes(64) + b"\xff\xd9")
    refused = open(paths[1], "rb").read()

    def fake_decode_gpu(datas, device):
        out = []
        for d in datas:
            try:
                assert d != refused
                out.append(torch.from_numpy(native.decode_pil(d)).permute(2, 0, 1).contiguous())
            except (AssertionError, native.BadSample):
                out.append(None)
        return out

    monkeypatch.setattr(native, "decode_gpu", fake_decode_gpu)
    ld = sf.data.SSLLoader(tmp_path, preset="byol", batch_size=7, device="cpu", image_size=10, shuffle=False)
    ld._backend.gpu_decode = True
    views = next(iter(ld))
    check_views(views, ld.preset, 7, torch.float32)
    assert ld.skipped == 1 and ld.bad_files[0][0].endswith("zz_bad.jpg")  # paths[1] went to PIL and decoded


def test_all_bad_source_is_an_error(tmp_path):
    for i in range(3):
        (tmp_path / f"x{i}.jpg").write_bytes(b"garbage")
    ld = sf.data.SSLLoader(tmp_path, preset="mae", batch_size=2, device="cpu", image_size=8)
    with pytest.raises(RuntimeError, match="could be read and decoded"):
        next(iter(ld))


def test_loader_argument_errors(jpeg_root):
    with pytest.raises(ValueError, match="backend"):
        sf.data.SSLLoader(jpeg_root, backend="ffcv", device="cpu")
    with pytest.raises(ValueError, match="batch_size"):
        sf.data.SSLLoader(jpeg_root, batch_size=64, device="cpu")
    with pytest.raises(ValueError, match="batch_size"):
        sf.data.SSLLoader(jpeg_root, batch_size=0, device="cpu")
    with pytest.raises(ValueError, match="shard_id"):
        sf.data.SSLLoader(jpeg_root, batch_size=2, device="cpu", shard_id=2, num_shards=2)
    with pytest.raises(TypeError, match="dtype"):
        sf.data.SSLLoader(jpeg_root, batch_size=2, device="cpu", dtype=torch.int8)
    with pytest.raises(TypeError, match="source"):
        sf.data.SSLLoader(12345, device="cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            sf.data.SSLLoader(jpeg_root, batch_size=2, device="cuda")


# ------------------------------------------------------------------------------------------- sources
def test_array_sources(loader_backend):
    rng = np.random.default_rng(0)
    same = rng.integers(0, 256, (6, 14, 18, 3), dtype=np.uint8)
    mixed = [rng.integers(0, 256, s, dtype=np.uint8) for s in [(10, 12, 3), (20, 9, 3), (15, 15)]]
    for src, b in ((same, 3), (torch.from_numpy(same), 2), (mixed, 3)):
        ld = sf.data.SSLLoader(
            src, preset="dino", batch_size=b, backend=loader_backend, device="cpu", image_size=10, num_workers=1
        )
        check_views(next(iter(ld)), ld.preset, b, torch.float32)


def test_embedded_digits():
    images, labels = sf.data.load_digits(image_size=24)
    assert images.shape == (1797, 24, 24, 3) and images.dtype == np.uint8 and labels.shape == (1797,)
    assert set(labels.tolist()) == set(range(10)) and images.max() > 200
    src = sf.data.digits(16)
    assert len(src) == 1797 and src.labels[:3] == labels[:3].tolist()
    ld = sf.data.SSLLoader(src, preset="simclr", batch_size=4, device="cpu", image_size=12)
    check_views(next(iter(ld)), ld.preset, 4, torch.float32)


def test_folder_layouts_and_file_list(tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    paths = S.write_jpeg_folder(tmp_path / "tmp", 3, size=(10, 10), classes=1)
    for p in paths:
        os.replace(p, flat / os.path.basename(p))
    src = D.resolve_source(flat)
    assert len(src) == 3 and src.classes == []
    lst = tmp_path / "list.txt"
    lst.write_text("\n".join(str(flat / os.path.basename(p)) for p in paths) + "\n")
    assert len(D.resolve_source(lst)) == 3
    tree = tmp_path / "tree"
    S.write_jpeg_folder(tree, 6, size=(10, 10), classes=3)
    src = D.resolve_source(tree)
    assert src.classes == ["class_0", "class_1", "class_2"] and sorted(set(src.labels)) == [0, 1, 2]


def test_bench_cases_registered():
    import sslfast.bench.augment  # noqa: F401  (registers its cases)
    from sslfast import bench

    cases = [c for c in bench.REGISTRY if c.op == "augment"]
    assert {"cuda", "cpu"} <= {d for c in cases for d in c.device_types}
    assert any("dino" in c.name for c in cases) and any("simclr" in c.name for c in cases)
