"""The teacher side of the prototype head, `prototype_teacher_probs`: DINO's centered softmax (and its center EMA)
and the Sinkhorn-Knopp targets, from features and prototypes, against the materialized logits' formulas in
float64 on both CPU paths, with tiny temperatures; the center's all-reduce over 2 gloo ranks."""

import pytest
import torch
import torch.nn.functional as F

from sslfast.ops import prototype_ce as ops_pce
from sslfast.ops._torch import prototype_ce as T
from sslfast.ops.prototype_ce import prototype_teacher_probs
from sslfast.reference import prototype_ce as R
from aot_compile import check_compiles
from distributed_harness import run_ranks
from helpers import assert_close

# (37, 53, 48) and (5, 130, 33): odd sizes across the interpreted kernels' 16-wide tiles, D walked in chunks;
# (19, 40, 24): a resident row block.
SHAPES = [(37, 53, 48), (5, 130, 33), (19, 40, 24)]
BOUND = {torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5, torch.float64: 1e-12}


def _inputs(B, K, D, dtype, *, scale=1.0):
    """Unit-norm features (DINO's normalized bottleneck) times `scale`, unit-norm prototypes and a center of the
    logits' size, rounded to `dtype` (the center stays fp32)."""
    f = F.normalize(torch.randn(B, D, dtype=torch.float64), dim=1) * scale
    w = F.normalize(torch.randn(K, D, dtype=torch.float64), dim=1)
    c = 0.3 * torch.randn(1, K)
    return f.to(dtype), w.to(dtype), c


def _bound(dtype, temp):
    """The targets' relative error is |t|·ε of the working precision, t = z/τ_t up to 1/τ_t (fp32 accumulation
    for every input dtype: bf16 and fp16 products are exact in fp32)."""
    return BOUND[dtype] * max(1.0, 0.04 / temp) * 4


@pytest.mark.parametrize("B,K,D", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("temp", [0.04, 0.01])
def test_centering_matches_float64(backend, seed, monkeypatch, B, K, D, dtype, temp):
    """The PyTorch path in blocks of 2 rows × 8 prototypes, so the merge of row LSEs across blocks runs."""
    monkeypatch.setattr(T, "ROW_BLOCK", 2)
    monkeypatch.setattr(T, "CHUNK_ELEMS", 16)
    f, w, c = _inputs(B, K, D, dtype)
    want = R.prototype_teacher_probs_literal(f.double(), w.double(), temp, center=c.double())
    got = prototype_teacher_probs(f, w, teacher_temp=temp, center=c)
    assert got.shape == (B, K) and got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert not got.requires_grad
    assert_close(got, want, _bound(dtype, temp), f"{dtype} τ={temp} seed {seed}")
    assert_close(got.sum(1), torch.ones(B), _bound(dtype, temp), "row sums")


@pytest.mark.parametrize(
    "center_shape,center_dtype", [((1, 53), torch.float32), ((53,), torch.bfloat16), ((53,), torch.float64)]
)
def test_center_update(backend, seed, center_shape, center_dtype):
    """c ← m·c + (1 − m)·mean_i f_i Wᵀ in place, in the center's dtype and shape; the targets use the old c."""
    f, w, _ = _inputs(37, 53, 48, torch.float32)
    center = (0.3 * torch.randn(center_shape)).to(center_dtype)
    before = center.clone()
    got = prototype_teacher_probs(f, w, teacher_temp=0.04, center=center, center_momentum=0.9)
    want = R.prototype_teacher_probs_literal(f.double(), w.double(), 0.04, center=before.double().reshape(1, -1))
    assert_close(got, want, _bound(torch.float32, 0.04), f"targets, seed {seed}")
    new = R.updated_center_literal(before.double(), f.double(), w.double(), 0.9)
    assert center.shape == center_shape and center.dtype == center_dtype
    bound = 1e-2 if center_dtype == torch.bfloat16 else 1e-6
    assert_close(center, new, bound, f"center, seed {seed}")
    assert (center.double() - before.double()).abs().max() > 1e-3  # it moved


def test_no_center_and_momentum_bounds(backend, seed):
    f, w, _ = _inputs(9, 17, 12, torch.float32)
    want = R.prototype_teacher_probs_literal(f.double(), w.double(), 0.02)
    assert_close(prototype_teacher_probs(f, w, teacher_temp=0.02), want, _bound(torch.float32, 0.02), f"seed {seed}")
    center = torch.randn(17)
    for m, expect in ((1.0, center.clone()), (0.0, (f.double() @ w.double().T).mean(0).float())):
        c = center.clone()
        prototype_teacher_probs(f, w, teacher_temp=0.02, center=c, center_momentum=m)
        assert_close(c, expect, 1e-6, f"momentum {m}")


def test_extreme_logits(backend, seed):
    """Features ×30 at τ = 0.01: logits up to 3000, only a max-shifted softmax stays finite."""
    f, w, c = _inputs(21, 40, 24, torch.float32, scale=30.0)
    want = R.prototype_teacher_probs_literal(f.double(), w.double(), 0.01, center=c.double())
    got = prototype_teacher_probs(f, w, teacher_temp=0.01, center=c)
    assert_close(got, want, 1e-3, f"seed {seed}")


@pytest.mark.parametrize("iters", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_sinkhorn_matches_float64(backend, seed, iters, dtype):
    """DINOv2's SinkhornKnoppTeacher / SwAV's distributed_sinkhorn (ε = 0.05, also 0.02) on f Wᵀ. fp64 is
    `sinkhorn_knopp`'s PyTorch path only: the kernels' backend refuses it, naming the features."""
    f, w, _ = _inputs(37, 53, 48, dtype)
    if dtype == torch.float64 and backend == "triton":
        with pytest.raises(TypeError, match="teacher_feats"):
            prototype_teacher_probs(f, w, teacher_temp=0.05, mode="sinkhorn")
        return
    for temp in (0.05, 0.02):
        want = R.prototype_teacher_probs_literal(f.double(), w.double(), temp, mode="sinkhorn", sinkhorn_iters=iters)
        got = prototype_teacher_probs(f, w, teacher_temp=temp, mode="sinkhorn", sinkhorn_iters=iters)
        assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and not got.requires_grad
        assert_close(got, want, _bound(dtype, temp), f"{dtype} τ={temp} iters {iters} seed {seed}")


def test_inputs_requiring_grad_get_none(backend):
    f, w, c = _inputs(7, 11, 5, torch.float32)
    fl, wl = f.clone().requires_grad_(), w.clone().requires_grad_()
    for mode, kw in (("centering", dict(center=c)), ("sinkhorn", {})):
        out = prototype_teacher_probs(fl, wl, teacher_temp=0.04, mode=mode, **kw)
        assert not out.requires_grad and out.grad_fn is None


def test_non_finite_propagates(backend):
    f, w, c = _inputs(7, 9, 5, torch.float32)
    f[2, 1] = float("nan")
    out = prototype_teacher_probs(f, w, teacher_temp=0.04, center=c)
    assert torch.isnan(out[2]).all() and torch.isfinite(out[torch.arange(7) != 2]).all()


def test_opcheck(seed):
    f, w, c = _inputs(6, 11, 5, torch.float32)
    torch.library.opcheck(ops_pce._teacher_softmax.custom_op, (f, w, c.reshape(-1), 0.04))
    torch.library.opcheck(ops_pce._teacher_logits.custom_op, (f, w))


def test_torch_compile_fullgraph(backend, seed):
    f, w, c = _inputs(13, 21, 10, torch.float32)

    def step(f, w, c):
        return prototype_teacher_probs(f, w, teacher_temp=0.04, center=c) * 2.0

    got = torch.compile(step, fullgraph=True, backend="aot_eager")(f, w, c)
    assert_close(got, step(f, w, c), 1e-6, "compiled targets")


def _good():
    f, w, c = _inputs(4, 6, 3, torch.float32)
    return dict(teacher_feats=f, weight=w, teacher_temp=0.04, center=c)


@pytest.mark.parametrize(
    "change,error,match",
    [
        (dict(teacher_feats=torch.randn(4, 3, 1)), ValueError, "teacher_feats"),
        (dict(teacher_feats=torch.randn(0, 3)), ValueError, "teacher_feats"),
        (dict(teacher_feats=torch.ones(4, 3, dtype=torch.int64)), TypeError, "teacher_feats"),
        (dict(weight=torch.randn(6, 4)), ValueError, "weight"),
        (dict(weight=torch.randn(0, 3), center=None), ValueError, "weight"),
        (dict(weight=torch.randn(6, 3, dtype=torch.bfloat16)), TypeError, "weight"),
        (dict(weight=torch.randn(6, 3, device="meta")), ValueError, "weight"),
        (dict(center=torch.zeros(2, 6)), ValueError, "center"),
        (dict(center=torch.zeros(7)), ValueError, "center"),
        (dict(center=torch.zeros(6, dtype=torch.int32)), TypeError, "center"),
        (dict(center=[0.0] * 6), TypeError, "center"),
        (dict(center=torch.zeros(6, device="meta")), ValueError, "center"),
        (dict(center=None, center_momentum=0.9), ValueError, "center_momentum"),
        (dict(center_momentum=1.5), ValueError, "center_momentum"),
        (dict(center_momentum=float("nan")), ValueError, "center_momentum"),
        (dict(center_momentum="0.9"), TypeError, "center_momentum"),
        (dict(teacher_temp=0.0), ValueError, "teacher_temp"),
        (dict(teacher_temp=float("inf")), ValueError, "teacher_temp"),
        (dict(mode="softmax"), ValueError, "mode"),
        (dict(mode="sinkhorn"), ValueError, "center"),
        (dict(mode="sinkhorn", center=None, sinkhorn_iters=0), ValueError, "sinkhorn_iters"),
        (dict(mode="sinkhorn", center=None, sinkhorn_iters=2.0), TypeError, "sinkhorn_iters"),
        (dict(mode="sinkhorn", center=None, gather_distributed=1), TypeError, "gather_distributed"),
    ],
)
def test_bad_input(backend, change, error, match):
    args = {**_good(), **change}
    before = args["center"].clone() if isinstance(args["center"], torch.Tensor) else None
    with pytest.raises(error, match=match):
        prototype_teacher_probs(**args)
    if before is not None and before.device.type != "meta":
        assert torch.equal(args["center"], before)  # nothing was updated before the error


def test_arguments_after_weight_are_keyword_only():
    args = _good()
    with pytest.raises(TypeError):
        prototype_teacher_probs(args["teacher_feats"], args["weight"], 0.04)


# ------------------------------------------------------------------------------------------------ 2 ranks
def _rank_teacher(rank, world, feats, w, center):
    rows = slice(rank * feats.shape[0] // world, (rank + 1) * feats.shape[0] // world)
    c = center.clone()
    probs = prototype_teacher_probs(feats[rows], w, teacher_temp=0.03, center=c, center_momentum=0.8)
    codes = prototype_teacher_probs(
        feats[rows], w, teacher_temp=0.05, mode="sinkhorn", sinkhorn_iters=3, gather_distributed=True
    )
    return probs, c, codes


@pytest.mark.slow
def test_two_ranks(backend, seed):
    """Each rank's targets are its rows of the single-process ones; the center update is the same on every rank
    and uses the global batch's mean logits (DINO's all-reduce); Sinkhorn normalizes over the global batch."""
    f, w, c = _inputs(2 * 7, 23, 10, torch.float32)
    ranks = run_ranks(2, _rank_teacher, f, w, c)
    probs_want = R.prototype_teacher_probs_literal(f.double(), w.double(), 0.03, center=c.double())
    codes_want = R.prototype_teacher_probs_literal(f.double(), w.double(), 0.05, mode="sinkhorn")
    center_want = R.updated_center_literal(c.double(), f.double(), w.double(), 0.8)
    for rank, (probs, center, codes) in enumerate(ranks):
        rows = slice(rank * 7, (rank + 1) * 7)
        assert_close(probs, probs_want[rows], 1e-5, f"rank {rank} targets (seed {seed})")
        assert_close(center, center_want, 1e-6, f"rank {rank} center (seed {seed})")
        assert_close(codes, codes_want[rows], 1e-5, f"rank {rank} Sinkhorn codes (seed {seed})")


# ------------------------------------------------------------------------------------------------ GPU
def test_teacher_kernels_compile_for_sm90():
    """Both passes compile ahead of time to sm_90 at the launchers' GPU tiles (resident D=256 and chunked
    D=512), the second pass in softmax and logits form, without register spills."""
    out = check_compiles("""
import sslfast.kernels.prototype_ce as K

for dt in ("bf16", "fp32"):
    ptrs = dict(X="*" + dt, W="*" + dt, C="*fp32", M_OUT="*fp32", L_OUT="*fp32", M_IN="*fp32", L_IN="*fp32",
                OUT="*fp32", scale2="fp32")
    for one, bd in ((True, 256), (False, 64)):
        t = dict(K.GPU_TILES[("teacher", one)])
        warps, stages = t.pop("num_warps"), t.pop("num_stages")
        consts = dict(t, BLOCK_D=bd, ONE_CHUNK=one, UPCAST=False)
        build(K._teacher_lse_kernel, ptrs, consts, num_warps=warps, num_stages=stages,
              aligned=("stride_x", "stride_w", "D"))
        for softmax in (True, False):
            build(K._teacher_out_kernel, ptrs, dict(consts, BLOCK_S=8, SOFTMAX=softmax), num_warps=warps,
                  num_stages=stages, aligned=("stride_x", "stride_w", "D"))
""")
    built = [line for line in out.splitlines() if line.startswith('{"kernel"')]
    assert len(built) == 12, out
    spills = [line for line in built if '"spills": 0,' not in line]
    assert not spills, "register spills:\n" + "\n".join(spills)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_dino_head_size(seed, dtype):
    """B=512, K=65536, D=256 on the real kernels against float64 (fp32 dots as TF32 on the GPU)."""
    f, w, c = _inputs(512, 65536, 256, dtype)
    want = R.prototype_teacher_probs_literal(f.double(), w.double(), 0.04, center=c.double())
    got = prototype_teacher_probs(f.cuda(), w.cuda(), teacher_temp=0.04, center=c.cuda())
    assert_close(got, want, 1e-2 if dtype == torch.bfloat16 else 1e-3, f"seed {seed}")
