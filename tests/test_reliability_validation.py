"""Reliability checks: momentum validation, the EMA plan cache's layout keys, fp64 DINO centers, symlink cycles
in image folders, an unavailable masking device, and the Triton interpreter's numpy noise."""

import math
import os
import warnings

import pytest
import torch

import sslfast as sf
from sslfast.data import datasets as D
from sslfast.ops import ema as ops

NAN = float("nan")


def _pairs(shapes, dtype=torch.float32):
    return [torch.randn(s, dtype=dtype) for s in shapes], [torch.randn(s, dtype=dtype) for s in shapes]


# ------------------------------------------------------------------------------------------ 1. momenta
@pytest.mark.parametrize(
    "make",
    [
        lambda t, s: sf.ema_update_(t, s, NAN),
        lambda t, s: sf.ema_update_(t, s, torch.tensor(1.5)),  # would extrapolate
        lambda t, s: sf.ema_update_(t, s, torch.tensor(NAN, dtype=torch.float64)),
        lambda t, s: sf.ema_update_(t, s, torch.tensor([-0.25])),
        lambda t, s: sf.ops.update_center_(t[0], s[1], NAN),
        lambda t, s: sf.ops.adamw_ema_step_(
            t,
            s,
            [torch.zeros_like(x) for x in t],
            [torch.zeros_like(x) for x in t],
            [torch.zeros(()) for _ in t],
            lr=NAN,
        ),
        lambda t, s: sf.dino_loss(torch.randn(6, 5), torch.randn(4, 5), t[0], num_global_crops=2, center_momentum=NAN),
    ],
)
def test_nan_and_out_of_range_momenta_are_refused(seed, make):
    teacher, student = _pairs([(5,), (4, 5), (3, 2, 3)])
    before = [t.clone() for t in teacher]
    with pytest.raises(ValueError, match="momentum|lr"):
        make(teacher, student)
    assert all(torch.equal(a, b) for a, b in zip(teacher, before)), f"seed {seed}: updated on bad input"


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"momentum": NAN}, "momentum"),
        ({"final_momentum": NAN}, "final_momentum"),
        ({"momentum": math.inf}, "momentum"),
        ({"final_momentum": 1.5}, "final_momentum"),
    ],
)
def test_ema_module_refuses_bad_momenta(kwargs, name):
    with pytest.raises(ValueError, match=name):
        sf.EMA(torch.nn.Linear(3, 2), **kwargs)
    ema = sf.EMA(torch.nn.Linear(3, 2))
    state = ema.get_extra_state()
    state.update(kwargs)
    with pytest.raises(ValueError, match=name):
        ema.set_extra_state(state)
    assert ema.base_momentum == 0.996 and ema.final_momentum == 1.0, "a refused state must change nothing"


def test_cpu_tensor_momentum_in_range_still_works(seed):
    teacher, student = _pairs([(7, 3), (5,)])
    want = [t.double().lerp(s.double(), 1 - 0.25) for t, s in zip(teacher, student)]
    sf.ema_update_(teacher, student, torch.tensor(0.25, dtype=torch.float64))
    for t, w in zip(teacher, want):
        torch.testing.assert_close(t.double(), w, rtol=1e-6, atol=1e-6, msg=f"seed {seed}")


# ------------------------------------------------------------------------------------------ 2. plan cache
def test_plan_cache_sees_in_place_resizes_transposes_and_dtype_swaps(seed):
    teacher, student = _pairs([(4, 4), (3, 5), (9,)])
    m = 0.75
    sf.ema_update_(teacher, student, m)
    key = (tuple(map(id, teacher)), tuple(map(id, student)))
    plan = ops._EMA_PLANS.plans[key]
    assert plan.matches((teacher, student))

    student[1].resize_(1, 5)  # same storage, new shape: must be refused, never broadcast into the teacher
    assert not plan.matches((teacher, student))
    before = teacher[1].clone()
    with pytest.raises(ValueError, match=r"student_tensors\[1\]"):
        sf.ema_update_(teacher, student, m)
    assert torch.equal(teacher[1], before)
    student[1].resize_(3, 5)

    student[0].t_()  # same storage and shape, new strides: the plan is rebuilt and the result is right
    want = [t.double().lerp(s.double(), 1 - m) for t, s in zip(teacher, student)]
    sf.ema_update_(teacher, student, m)
    assert ops._EMA_PLANS.plans[key] is not plan
    for t, w in zip(teacher, want):
        torch.testing.assert_close(t.double(), w, rtol=1e-6, atol=1e-6, msg=f"seed {seed}")

    plan = ops._EMA_PLANS.plans[key]
    student[2].data = student[2].data.view(torch.int32)  # same pointer, another dtype
    assert not plan.matches((teacher, student))
    with pytest.raises(TypeError, match=r"student_tensors\[2\]"):
        sf.ema_update_(teacher, student, m)


def test_fused_plan_rebuilds_and_refuses_a_resized_param(seed):
    params = [torch.randn(6, 3), torch.randn(5)]
    grads = [torch.randn_like(p) for p in params]
    avgs, sqs = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    steps = [torch.zeros(()) for _ in params]
    sf.ops.adamw_ema_step_(params, grads, avgs, sqs, steps, lr=1e-2)
    params[0].resize_(2, 3)
    with pytest.raises(ValueError, match=r"exp_avgs\[0\]"):
        sf.ops.adamw_ema_step_(params, [torch.randn_like(p) for p in params], avgs, sqs, steps, lr=1e-2)


# ------------------------------------------------------------------------------------------ 3. fp64 center
@pytest.mark.parametrize("center_shape", [(1, 13), (13,)])
def test_dino_center_update_accepts_float64(seed, center_shape):
    out = torch.randn(10, 13, dtype=torch.float64)
    center = torch.randn(center_shape, dtype=torch.float64)
    want = center * 0.9 + out.mean(0).reshape(center_shape) * 0.1
    sf.ops.update_center_(center, out, 0.9)
    torch.testing.assert_close(center, want, rtol=1e-12, atol=1e-12, msg=f"seed {seed}")

    s, t = torch.randn(15, 13, dtype=torch.float64), torch.randn(10, 13, dtype=torch.float64)
    c = torch.zeros(1, 13, dtype=torch.float64)
    loss = sf.dino_loss(s, t, c, num_global_crops=2, center_momentum=0.8)
    assert loss.dtype == torch.float64 and math.isfinite(float(loss))
    torch.testing.assert_close(c, 0.2 * t.mean(0, keepdim=True), rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------ 4. symlinks
def _touch(path, data=b"\xff\xd8\xff img \xff\xd9"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_find_images_survives_symlink_cycles_and_lists_each_file_once(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    for rel in ("a/1.jpg", "a/2.JPG", "b/3.png", "b/deep/4.jpg"):
        _touch(root / rel)
    _touch(outside / "sub" / "5.jpg")
    _touch(outside / "6.jpg")
    try:
        os.symlink("..", root / "a" / "self")  # a cycle back to the root
        os.symlink("../b", root / "a" / "to_b")  # a link into another class
        os.symlink(outside, root / "b" / "ext")  # a legit folder outside the tree
        os.symlink(outside / "6.jpg", root / "a" / "6.jpg")  # a legit file outside the tree
        os.symlink(root / "b" / "3.png", root / "b" / "deep" / "3-again.png")  # the same file twice
    except (OSError, NotImplementedError):
        pytest.skip("symbolic links are not available here")
    src = D.find_images(root)
    got = [(os.path.relpath(p, root), label) for p, label in zip(src.paths, src.labels)]
    assert got == [
        ("a/1.jpg", 0),
        ("a/2.JPG", 0),
        ("a/6.jpg", 0),
        ("b/3.png", 1),
        ("b/deep/4.jpg", 1),
        ("b/ext/sub/5.jpg", 1),
    ]
    assert src.classes == ["a", "b"]
    assert len({os.path.realpath(p) for p in src.paths}) == len(src.paths)


# ------------------------------------------------------------------------------------------ 5. device
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:0", torch.device("cuda")])
def test_random_masking_on_missing_cuda_names_device(device):
    with pytest.raises(ValueError, match="device.*CUDA is not available"):
        sf.mae.random_masking(3, 16, 0.75, device=device)


# ------------------------------------------------------------------------------------------ 6. interpreter
def test_interpreted_launches_emit_no_interpreter_warnings(seed, monkeypatch):
    from sslfast._backend import interpreting, triton_available

    if not (interpreting() and triton_available()):
        pytest.skip("needs triton and TRITON_INTERPRET=1")
    s, t = torch.randn(15, 11), torch.randn(10, 11)
    c = torch.randn(1, 11) * 0.1
    monkeypatch.setenv("SSLFAST_BACKEND", "reference")
    want = sf.dino_loss(s.double(), t.double(), c.double(), num_global_crops=2)
    monkeypatch.setenv("SSLFAST_BACKEND", "triton")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = sf.dino_loss(s, t, c, num_global_crops=2)
    noisy = [
        f"{w.category.__name__}: {w.message}"
        for w in caught
        if os.path.join("triton", "runtime", "interpreter") in w.filename
    ]
    assert not noisy, noisy[:3]
    assert abs(float(got) - float(want)) <= 1e-5 * max(1.0, abs(float(want))), f"seed {seed}"


@pytest.mark.parametrize("bad", [float("nan"), 1.5, -0.1])
def test_dino_loss_checks_center_momentum_before_the_loss(bad, monkeypatch):
    """A bad center_momentum is refused up front, naming the argument, before the loss runs."""
    import sslfast.ops.dino as dino_ops

    s, t, c = torch.randn(6, 11), torch.randn(4, 11), torch.zeros(1, 11)
    calls = []
    monkeypatch.setattr(dino_ops, "_impl", lambda *a: calls.append(a) or dino_ops.FAMILY.torch)
    with pytest.raises(ValueError, match="center_momentum"):
        sf.dino_loss(s, t, c, center_momentum=bad)
    assert not calls, "the loss ran before the argument was checked"
