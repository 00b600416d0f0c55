"""DINO loss: the one-op multi-crop loss against the literal facebookresearch/dino code (float64 oracle)."""

import contextlib

import pytest
import torch

import sslfast as sf
from sslfast.nn import DINOLoss
from sslfast.ops._torch import dino as T
from sslfast.reference import dino as R

from aot_compile import check_compiles
from helpers import assert_close, assert_loss_close, leaf, tol


def _inputs(G, V, B, K, dtype=torch.float32):
    s = torch.randn(V * B, K, dtype=torch.float64) * 3
    t = torch.randn(G * B, K, dtype=torch.float64) * 2
    c = torch.randn(1, K, dtype=torch.float64) * 0.3
    return s.to(dtype), t.to(dtype), c.to(dtype)


def _literal(s, t, c, st, tt, G):
    s64 = leaf(s, torch.float64)
    loss = R.dino_loss_literal(s64, t.double(), c.double(), st, tt, G)
    (g,) = torch.autograd.grad(loss, s64)
    return loss, g


# (2, 10, 7, 40): 70 student rows, more than the loss kernel's interpreted block of 64
@pytest.mark.parametrize("G,V,B,K", [(2, 6, 5, 37), (2, 2, 3, 48), (1, 3, 7, 11), (3, 5, 2, 64), (2, 10, 7, 40)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("separate", [False, True], ids=["grad_in_forward", "separate_backward"])
def test_matches_literal(backend, seed, G, V, B, K, dtype, separate, monkeypatch):
    """Both paths (the Triton kernels take fp32/bf16/fp16, fp64 stays on the reference path), with the
    gradient computed in the forward and in a separate backward."""
    s, t, c = _inputs(G, V, B, K, dtype)
    st, tt = 0.1, 0.04 + 0.03 * torch.rand(()).item()
    ref, gref = _literal(s, t, c, st, tt, G)
    monkeypatch.setattr(T, "CHUNK_ELEMS", K * (V + G + 2) * 2)  # several chunks of images
    x = leaf(s)
    with sf.separate_backward() if separate else contextlib.nullcontext():
        out = sf.dino_loss(x, t, c, st, tt, num_global_crops=G)
    (g,) = torch.autograd.grad(out, x)
    bound = 1e-12 if dtype == torch.float64 else tol(dtype)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_loss_close(out, ref, bound, f"loss, seed {seed}")
    assert g.dtype == dtype
    assert_close(g, gref, 1e-10 if dtype == torch.float64 else tol(dtype), f"grad, seed {seed}")


def test_center_update_matches_dino(seed):
    G, V, B, K = 2, 4, 6, 33
    s, t, c = _inputs(G, V, B, K)
    center = c.clone()
    ref, _ = _literal(s, t, c, 0.1, 0.04, G)
    out = sf.dino_loss(leaf(s), t, center, 0.1, 0.04, num_global_crops=G, center_momentum=0.9)
    assert_loss_close(out, ref, tol(torch.float32), f"loss, seed {seed}")  # the center from before the update
    want = c * 0.9 + t.mean(0, keepdim=True) * 0.1
    assert_close(center, want, 1e-6, "center")


@pytest.mark.parametrize(
    "center_dtype,out_dtype",
    [
        (torch.float32, torch.float32),
        (torch.float32, torch.bfloat16),
        (torch.bfloat16, torch.float32),
        (torch.float64, torch.float64),
    ],
)
def test_update_center_is_dino(seed, center_dtype, out_dtype):
    """DINOLoss.update_center: c ← m·c + (1 − m)·batch mean, against float64, for [1, K] and [K] centers."""
    K = 11
    out = torch.randn(9, K).to(out_dtype)
    for shape in ((1, K), (K,)):
        center = torch.randn(shape).to(center_dtype)
        want = center.double() * 0.9 + out.double().mean(0).reshape(shape) * 0.1
        sf.ops.update_center_(center, out, 0.9)
        assert center.dtype == center_dtype and center.shape == shape
        assert_close(center, want, 1e-12 if center_dtype == torch.float64 else tol(center_dtype), "center")


@pytest.mark.parametrize(
    "args,exc,match",
    [
        ((torch.zeros(1, 10), torch.randn(9, 11)), ValueError, "center"),
        ((torch.zeros(1, 11), torch.randn(11)), ValueError, "teacher_output"),
        ((torch.zeros(1, 11), torch.randn(0, 11)), ValueError, "teacher_output"),
        ((torch.zeros(1, 11), torch.randn(9, 11), 1.5), ValueError, "momentum"),
        ((torch.zeros(1, 11), torch.randn(9, 11), float("nan")), ValueError, "momentum"),
        ((torch.zeros(1, 11), torch.randn(9, 11), "0.9"), TypeError, "momentum"),
        (([0.0] * 11, torch.randn(9, 11)), TypeError, "center"),
        ((torch.zeros(1, 11, dtype=torch.long), torch.randn(9, 11)), TypeError, "center"),
    ],
)
def test_update_center_bad_input(args, exc, match):
    center = args[0]
    before = center.clone() if isinstance(center, torch.Tensor) else None
    with pytest.raises(exc, match=match):
        sf.ops.update_center_(*args)
    assert before is None or torch.equal(center, before), "nothing may be updated on bad input"


@pytest.mark.parametrize("separate", [False, True], ids=["grad_in_forward", "separate_backward"])
def test_backward_uses_pre_update_center(seed, separate):
    s, t, c = _inputs(2, 3, 4, 20)
    center = c.clone()
    x = leaf(s)
    with sf.separate_backward() if separate else contextlib.nullcontext():
        loss = sf.dino_loss(x, t, center, num_global_crops=2, center_momentum=0.5)
    (g,) = torch.autograd.grad(loss, x)
    _, gref = _literal(s, t, c, 0.1, 0.04, 2)
    assert_close(g, gref, 1e-5, "grad")


def test_module_schedule_and_lists(seed):
    G, V, B, K = 2, 4, 3, 16
    s, t, c = _inputs(G, V, B, K)
    crit = DINOLoss(output_dim=K, warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=10)
    assert crit.teacher_temperature(0) == pytest.approx(0.04)
    warm = 0.04 + 5 * (0.07 - 0.04) / 9  # main_dino.py: np.linspace(0.04, 0.07, 10)[5]
    assert crit.teacher_temperature(5) == pytest.approx(warm)
    assert crit.teacher_temperature(None) == pytest.approx(0.07)
    crit.center.copy_(c)
    out = crit(list(t.chunk(G)), list(s.chunk(V)), epoch=5)
    ref, _ = _literal(s, t, c, 0.1, warm, G)
    assert_loss_close(out, ref, tol(torch.float32), f"loss, seed {seed}")
    assert not torch.equal(crit.center, c.float())  # training mode: center moved
    crit.eval()
    before = crit.center.clone()
    crit(t, s)
    assert torch.equal(crit.center, before)  # eval mode: untouched


@pytest.mark.parametrize("where", ["student", "teacher", "center"])
def test_non_finite_propagates(backend, where):
    s, t, c = _inputs(2, 3, 4, 8, torch.float32)
    {"student": s, "teacher": t, "center": c}[where][-1, 3] = float("nan")
    assert torch.isnan(sf.dino_loss(s, t, c))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(student_output=torch.randn(12, 8), teacher_output=torch.randn(5, 8)), "teacher_output"),
        (dict(student_output=torch.randn(12, 7), teacher_output=torch.randn(6, 8)), "student_output"),
        (dict(student_output=torch.randn(3, 8), teacher_output=torch.randn(6, 8)), "student_output"),
        (dict(student_output=torch.randn(12, 8), teacher_output=torch.randn(6, 8), center=torch.zeros(2, 8)), "center"),
        (dict(student_output=torch.randn(12, 8), teacher_output=torch.randn(6, 8), student_temp=0.0), "student_temp"),
        (dict(student_output=torch.randn(12, 8), teacher_output=torch.randn(6, 8), teacher_temp=-1.0), "teacher_temp"),
        (
            dict(student_output=torch.randn(12, 8), teacher_output=torch.randn(6, 8), num_global_crops=0),
            "num_global_crops",
        ),
        (dict(student_output=torch.randn(12), teacher_output=torch.randn(6, 8)), "student_output"),
    ],
)
def test_bad_input(kwargs, match):
    kwargs.setdefault("center", torch.zeros(1, 8))
    with pytest.raises(ValueError, match=match):
        sf.dino_loss(**kwargs)


def test_bad_dtype():
    with pytest.raises(TypeError, match="student_output"):
        sf.dino_loss(torch.ones(12, 8, dtype=torch.long), torch.randn(6, 8), torch.zeros(8))


def test_memory_frugal_backward_saves_no_softmax(backend):
    """With a separate backward, the autograd graph keeps the inputs and the [(V + G)·B] row LSEs, not a
    [V·B, K] softmax per pair. (With the gradient computed in the forward it keeps that gradient only.)"""
    G, V, B, K = 2, 6, 4, 1000
    s, t, c = _inputs(G, V, B, K)
    x = leaf(s)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda z: saved.append(z) or z, lambda z: z), sf.separate_backward():
        sf.dino_loss(x, t, c)
    extra = sum(z.numel() for z in saved if z.data_ptr() not in (x.data_ptr(), t.data_ptr()))
    assert extra <= K + (V + G) * B, f"saved {extra} extra elements"


def test_kernels_compile_for_sm90():
    """The DINO kernels compile ahead of time to sm_90 at the launchers' GPU tiles, without register spills."""
    out = check_compiles("""
import sslfast.kernels.dino as K

for dt, bk in (("bf16", 256), ("fp16", 256), ("fp32", 128)):  # the launchers' 8 KB student tiles
    ptrs = dict(S="*" + dt, T="*" + dt, C="*fp32", PART_T="*fp32", LSE_T="*fp32", LSE_S="*fp32", PART="*fp32",
                GRAD="*fp32", DS="*" + dt, t2="fp32", s2="fp32", coef="fp32")
    build(K._teacher_stats_kernel, ptrs, dict(BLOCK_K=4 * bk), aligned=("K", "stride_t", "k_per_split"))
    build(K._forward_kernel, ptrs, dict(BLOCK_K=bk, BLOCK_V=16, BLOCK_G=2, BLOCK_SP=64),
          aligned=("K", "stride_s", "stride_t", "k_per_split"))
    build(K._backward_kernel, ptrs, dict(BLOCK_K=bk, BLOCK_V=16, BLOCK_G=2),
          aligned=("K", "stride_s", "stride_t", "stride_ds"))
build(K._loss_kernel, dict(PART="*fp32", LSE_S="*fp32", LOSS="*fp32", inv_pairs="fp32"),
      dict(BLOCK_SP=16, BLOCK=256))
""")
    built = [line for line in out.splitlines() if line.startswith('{"kernel"')]
    assert len(built) == 10, out
    spills = [line for line in built if '"spills": 0,' not in line]
    assert not spills, "register spills:\n" + "\n".join(spills)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_kernels_at_dino_size(seed, dtype):
    """The real kernels at DINO's head size (K = 65536, 2 global + 8 local crops) against the float64 literal."""
    G, V, B, K = 2, 10, 8, 65536
    s, t, c = (x.cuda() for x in _inputs(G, V, B, K, dtype))
    ref, gref = _literal(s, t, c, 0.1, 0.04, G)
    x = leaf(s)
    out = sf.dino_loss(x, t, c, 0.1, 0.04, num_global_crops=G)
    (g,) = torch.autograd.grad(out, x)
    assert_loss_close(out, ref, tol(dtype, "cuda"), f"loss, seed {seed}")
    assert_close(g, gref, tol(dtype, "cuda"), f"grad, seed {seed}")
