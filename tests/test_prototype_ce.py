"""Prototype-head cross-entropy: loss and gradients (features and prototypes) against the materialized formula in
float64, on both CPU paths; the op's memory against the materialized version's."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from sslfast._custom_op import DoubleBackwardError
from sslfast.ops import prototype_ce as ops_pce
from sslfast.ops._torch import prototype_ce as T
from sslfast.ops.prototype_ce import prototype_cross_entropy
from sslfast.reference import prototype_ce as R
from tests.aot_compile import check_compiles
from tests.helpers import assert_close, assert_loss_close, leaf, tol


def _inputs(B, K, D, dtype, *, scale=1.0, probs_dtype=None):
    """DINO-like inputs: unit-norm features (the head's normalized bottleneck) times `scale`, unit-norm
    prototypes (weight norm with g = 1), and teacher rows whose mass varies in [0.5, 1.5] (one row 0, one 3)."""
    x = F.normalize(torch.randn(B, D, dtype=torch.float64), dim=1) * scale
    w = F.normalize(torch.randn(K, D, dtype=torch.float64), dim=1)
    p = torch.softmax(torch.randn(B, K, dtype=torch.float64) * 2, dim=1) * (0.5 + torch.rand(B, 1, dtype=torch.float64))
    p[0] *= 3.0
    if B > 2:
        p[B // 2] = 0.0
    return x.to(dtype), w.to(dtype), p.to(probs_dtype or dtype)


def _literal(x, w, p, temp):
    """Loss and gradients of the materialized formula in float64 on the same (rounded) inputs."""
    x64, w64 = leaf(x, torch.float64), leaf(w, torch.float64)
    loss = R.prototype_cross_entropy_literal(x64, w64, p.double(), temp)
    gx, gw = torch.autograd.grad(loss, (x64, w64))
    return loss, gx, gw


def _check(x, w, p, temp, what, bound=None):
    ref, gx_ref, gw_ref = _literal(x, w, p, temp)
    xl, wl = leaf(x), leaf(w)
    out = prototype_cross_entropy(xl, wl, p, student_temp=temp)
    gx, gw = torch.autograd.grad(out, (xl, wl))
    fp64 = x.dtype == torch.float64
    bound = bound or (1e-10 if fp64 else tol(x.dtype))
    assert out.shape == () and out.dtype == (torch.float64 if fp64 else torch.float32)
    assert gx.dtype == x.dtype and gw.dtype == w.dtype
    assert_loss_close(out, ref, bound, f"loss, {what}")
    assert_close(gx, gx_ref, bound, f"d student_feats, {what}")
    assert_close(gw, gw_ref, bound, f"d weight, {what}")


# (37, 53, 48) and (5, 130, 33): odd sizes crossing the interpreted kernels' 16-wide tiles, D walked in chunks
# over two output blocks; (19, 40, 24): a resident row block (ONE_CHUNK).
SHAPES = [(37, 53, 48), (5, 130, 33), (19, 40, 24)]


@pytest.mark.parametrize("B,K,D", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("temp", [0.1, 0.04])
def test_matches_float64(backend, seed, monkeypatch, B, K, D, dtype, temp):
    """bf16 features take fp32 teacher probabilities (the usual mix), the others their own dtype; the CPU path
    runs in blocks of 2 rows × 8 prototypes so its accumulation across blocks is exercised."""
    monkeypatch.setattr(T, "ROW_BLOCK", 2)
    monkeypatch.setattr(T, "CHUNK_ELEMS", 16)
    x, w, p = _inputs(B, K, D, dtype, probs_dtype=torch.float32 if dtype == torch.bfloat16 else dtype)
    _check(x, w, p, temp, f"{dtype} τ={temp} seed {seed}")


def test_extreme_logits(backend, seed):
    """Features ×30 at τ = 0.04: logits up to 750, far past exp's fp32 range, so only a max-shifted log-sum-exp
    stays finite. fp32 rounding of logits that large perturbs the softmax by ~|s|·2^-24 ≈ 5e-5 relative
    whatever the implementation, hence 1e-3 rather than 1e-5."""
    x, w, p = _inputs(37, 53, 48, torch.float32, scale=30.0)
    _check(x, w, p, 0.04, f"seed {seed}", bound=1e-3)


def test_one_input_wants_grad(backend, seed):
    """Frozen prototypes (or features): only the wanted gradient is computed and returned."""
    x, w, p = _inputs(21, 35, 20, torch.float32)
    _, gx_ref, gw_ref = _literal(x, w, p, 0.1)
    xl = leaf(x)
    prototype_cross_entropy(xl, w, p, student_temp=0.1).backward()
    assert_close(xl.grad, gx_ref, tol(torch.float32), f"d student_feats, seed {seed}")
    wl = leaf(w)
    prototype_cross_entropy(x, wl, p, student_temp=0.1).backward()
    assert_close(wl.grad, gw_ref, tol(torch.float32), f"d weight, seed {seed}")


def test_upstream_gradient_scales(backend, seed):
    x, w, p = _inputs(9, 17, 12, torch.float32)
    _, gx_ref, gw_ref = _literal(x, w, p, 0.1)
    xl, wl = leaf(x), leaf(w)
    (prototype_cross_entropy(xl, wl, p, student_temp=0.1) * -2.5).backward()
    assert_close(xl.grad, -2.5 * gx_ref, tol(torch.float32), f"seed {seed}")
    assert_close(wl.grad, -2.5 * gw_ref, tol(torch.float32), f"seed {seed}")


def test_non_contiguous_inputs(backend, seed):
    x, w, p = _inputs(11, 19, 13, torch.float32)
    ref = _literal(x, w, p, 0.1)[0]
    out = prototype_cross_entropy(x.T.contiguous().T, w.T.contiguous().T, p.T.contiguous().T, student_temp=0.1)
    assert_loss_close(out, ref, tol(torch.float32), f"seed {seed}")


@pytest.mark.parametrize("where", ["student_feats", "weight", "teacher_probs"])
def test_non_finite_propagates(backend, where):
    x, w, p = _inputs(7, 9, 5, torch.float32)
    {"student_feats": x, "weight": w, "teacher_probs": p}[where][1, 2] = float("nan")
    assert torch.isnan(prototype_cross_entropy(x, w, p, student_temp=0.1))


def test_no_bxk_saved(backend):
    """The graph keeps the inputs and two B-vectors: no B×K logits, softmax or gradient."""
    B, K, D = 12, 40, 6
    x, w, p = _inputs(B, K, D, torch.float32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss = prototype_cross_entropy(leaf(x), leaf(w), p, student_temp=0.1)
    assert saved and all(t.numel() < B * K or t.data_ptr() == p.data_ptr() for t in saved), [
        tuple(t.shape) for t in saved
    ]
    loss.backward()


def test_float64_gradcheck(seed, monkeypatch):
    monkeypatch.setattr(T, "CHUNK_ELEMS", 8)
    monkeypatch.setattr(T, "ROW_BLOCK", 2)
    x, w, p = _inputs(5, 7, 4, torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: prototype_cross_entropy(a, b, p, student_temp=0.3), (leaf(x), leaf(w)))


def test_double_backward_raises(backend):
    """The gradients are not differentiable again: create_graph=True says so instead of returning constants."""
    x, w, p = _inputs(5, 9, 4, torch.float32)
    xl = leaf(x)
    loss = prototype_cross_entropy(xl, leaf(w), p, student_temp=0.1)
    with pytest.raises(DoubleBackwardError, match="prototype_cross_entropy"):
        torch.autograd.grad(loss, xl, create_graph=True)


def test_opcheck(seed):
    x, w, p = _inputs(6, 11, 5, torch.float32)
    torch.library.opcheck(ops_pce._prototype_ce.custom_op, (leaf(x), leaf(w), p, 0.1))
    _, lse, rsum = ops_pce._prototype_ce(x, w, p, 0.1)
    torch.library.opcheck(
        ops_pce._prototype_ce_backward.custom_op, (torch.tensor(1.0), x, w, p, lse, rsum, 0.1, True, False)
    )


def test_torch_compile_fullgraph(backend, seed):
    def step(x, w, p):
        return prototype_cross_entropy(x, w, p, student_temp=0.1) * 2.0

    x, w, p = _inputs(13, 21, 10, torch.float32)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    a, b = leaf(x), leaf(w)
    got = compiled(a, b, p)
    got.backward()
    a0, b0 = leaf(x), leaf(w)
    want = step(a0, b0, p)
    want.backward()
    assert_loss_close(got, want, 1e-6, "compiled loss")
    assert_close(a.grad, a0.grad, 1e-6, "compiled d student_feats")
    assert_close(b.grad, b0.grad, 1e-6, "compiled d weight")


def _good():
    x, w, p = _inputs(4, 6, 3, torch.float32)
    return dict(student_feats=x, weight=w, teacher_probs=p, student_temp=0.1)


@pytest.mark.parametrize(
    "change,error,match",
    [
        (dict(student_feats=torch.randn(4, 3, 1)), ValueError, "student_feats"),
        (dict(student_feats=torch.randn(0, 3), teacher_probs=torch.rand(0, 6)), ValueError, "student_feats"),
        (dict(weight=torch.randn(6)), ValueError, "weight"),
        (dict(weight=torch.randn(6, 4)), ValueError, "weight"),
        (dict(weight=torch.randn(0, 3), teacher_probs=torch.rand(4, 0)), ValueError, "weight"),
        (dict(teacher_probs=torch.rand(4, 7)), ValueError, "teacher_probs"),
        (dict(teacher_probs=torch.rand(5, 6)), ValueError, "teacher_probs"),
        (dict(teacher_probs=torch.rand(24)), ValueError, "teacher_probs"),
        (dict(student_feats=torch.ones(4, 3, dtype=torch.int64)), TypeError, "student_feats"),
        (dict(teacher_probs=torch.ones(4, 6, dtype=torch.int32)), TypeError, "teacher_probs"),
        (dict(weight=torch.randn(6, 3, dtype=torch.bfloat16)), TypeError, "weight"),
        (dict(teacher_probs=[[0.5]]), TypeError, "teacher_probs"),
        (dict(weight=torch.randn(6, 3, device="meta")), ValueError, "weight"),
        (dict(student_temp=0.0), ValueError, "student_temp"),
        (dict(student_temp=-0.1), ValueError, "student_temp"),
        (dict(student_temp=float("nan")), ValueError, "student_temp"),
        (dict(student_temp=float("inf")), ValueError, "student_temp"),
        (dict(student_temp="0.1"), TypeError, "student_temp"),
    ],
)
def test_bad_input(backend, change, error, match):
    with pytest.raises(error, match=match):
        prototype_cross_entropy(**{**_good(), **change})


def test_student_temp_is_keyword_only():
    args = _good()
    with pytest.raises(TypeError):
        prototype_cross_entropy(args["student_feats"], args["weight"], args["teacher_probs"], 0.1)


# ------------------------------------------------------------------------------------------------ memory
_MEMORY_SCRIPT = textwrap.dedent("""
    import json, os, sys, time
    import torch
    import torch.nn.functional as F
    os.environ["SSLFAST_BACKEND"] = "reference"
    from sslfast.ops.prototype_ce import prototype_cross_entropy
    from sslfast.reference.prototype_ce import prototype_cross_entropy_literal

    B, K, D, mode = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]

    def kib(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))

    def step(x, w, p):
        if mode == "fused":
            loss = prototype_cross_entropy(x, w, p, student_temp=0.1)
        else:
            loss = prototype_cross_entropy_literal(x, w, p, 0.1)
        loss.backward()

    step(torch.randn(8, D, requires_grad=True), torch.randn(16, D, requires_grad=True), torch.rand(8, 16))  # warm-up
    x = F.normalize(torch.randn(B, D), dim=1).requires_grad_()
    w = F.normalize(torch.randn(K, D), dim=1).requires_grad_()
    p = torch.rand(B, K)
    p.div_(p.sum(1, keepdim=True))  # in place: the 1 GiB input is allocated once, before the baseline
    base = kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak resident set (VmHWM) to the current one
    t = time.perf_counter()
    step(x, w, p)
    print(json.dumps({"peak_extra": (kib("VmHWM") - base) * 1024, "seconds": time.perf_counter() - t}))
""")


def _peak_extra_bytes(mode: str, B: int, K: int, D: int) -> dict:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT, str(B), str(K), str(D), mode],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=root,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_cpu_peak_memory_vs_materialized():
    """At B=4096, K=65536, D=256 (fp32), forward + backward on the CPU: the op's peak resident memory above its
    inputs stays under 1/20 of the materialized formula's (logits, log-softmax and their gradients, ~4 GiB;
    the op: gradient outputs plus a few 16 MiB blocks). Each runs once in its own process; the peak is the
    kernel's VmHWM, reset after the inputs exist."""
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak resident set")
    B, K, D = 4096, 65536, 256
    fused = _peak_extra_bytes("fused", B, K, D)
    literal = _peak_extra_bytes("literal", B, K, D)
    print(
        f"peak extra memory: fused {fused['peak_extra'] / 2**20:.0f} MiB in {fused['seconds']:.1f} s, "
        f"materialized {literal['peak_extra'] / 2**20:.0f} MiB in {literal['seconds']:.1f} s"
    )
    assert literal["peak_extra"] > 3 * B * K * 4 * 0.9, literal  # the measurement sees the B×K buffers
    assert fused["peak_extra"] < literal["peak_extra"] / 20, (fused, literal)


# ------------------------------------------------------------------------------------------------ GPU
def test_kernels_compile_for_sm90():
    """The kernels compile ahead of time to sm_90 at the launchers' GPU tiles (resident D=256 and chunked
    D=512), without register spills."""
    out = check_compiles("""
import sslfast.kernels.prototype_ce as K

for dt in ("bf16", "fp32"):
    ptrs = dict(X="*" + dt, W="*" + dt, P="*fp32", M_OUT="*fp32", L_OUT="*fp32", PS_OUT="*fp32", R_OUT="*fp32",
                LSE="*fp32", RSUM="*fp32", G="*fp32", DXP="*fp32", DW="*" + dt, inv_temp="fp32", grad_scale="fp32")
    for one, bd, bdo in ((True, 256, 256), (False, 64, 128)):
        for kind, fn in (("fwd", K._fwd_kernel), ("dx", K._dx_kernel), ("dw", K._dw_kernel)):
            t = dict(K.GPU_TILES[(kind, one)])
            warps, stages = t.pop("num_warps"), t.pop("num_stages")
            consts = dict(t, BLOCK_D=bd, ONE_CHUNK=one, UPCAST=False, **({} if kind == "fwd" else dict(BLOCK_DO=bdo)))
            build(fn, ptrs, consts, num_warps=warps, num_stages=stages,
                  aligned=("stride_x", "stride_w", "stride_p", "D"))
build(K._merge_kernel, dict(M_IN="*fp32", L_IN="*fp32", PS_IN="*fp32", R_IN="*fp32", LSE="*fp32", RSUM="*fp32",
                            ROW_LOSS="*fp32"), dict(BLOCK=128, BLOCK_S=16))
""")
    built = [line for line in out.splitlines() if line.startswith('{"kernel"')]
    assert len(built) == 13, out
    spills = [line for line in built if '"spills": 0,' not in line]
    assert not spills, "register spills:\n" + "\n".join(spills)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_dino_head_size(seed, dtype):
    """B=512, K=65536, D=256 on the real kernels (bf16 tensor cores; fp32 as TF32) against float64."""
    x, w, p = _inputs(512, 65536, 256, dtype, probs_dtype=torch.float32)
    ref, gx_ref, gw_ref = _literal(x, w, p, 0.1)
    xl, wl = leaf(x.cuda()), leaf(w.cuda())
    out = prototype_cross_entropy(xl, wl, p.cuda(), student_temp=0.1)
    gx, gw = torch.autograd.grad(out, (xl, wl))
    bound = tol(dtype, "cuda")
    assert_loss_close(out, ref, bound, f"loss, seed {seed}")
    assert_close(gx, gx_ref, bound, f"d student_feats, seed {seed}")
    assert_close(gw, gw_ref, bound, f"d weight, seed {seed}")
