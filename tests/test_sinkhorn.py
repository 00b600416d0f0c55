"""Sinkhorn-Knopp teacher targets against DINOv2's literal `sinkhorn_knopp_teacher` run in float64."""

import pytest
import torch

import sslfast as sf
from sslfast.reference import sinkhorn as R
from tests.aot_compile import check_compiles
from tests.distributed_harness import run_ranks
from tests.helpers import assert_close, tol

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _logits(B, K, dtype=torch.float32, scale=1.0):
    return (torch.randn(B, K, dtype=torch.float64) * scale).to(dtype)


def _want(x, temperature, n_iters):
    """DINOv2's literal code in float64 on the logits shifted per prototype to max_b x[b, k] = 0.

    The literal's first steps are Q /= Σ Q, then each prototype row Q[k, :] /= its sum, so a per-prototype
    shift x[:, k] + c_k is an exact invariance of its output. The shift keeps float64 exact where the raw
    literal is not: after Q /= Σ Q a prototype whose scores lie > ~708 below the global maximum is in float64's
    subnormals (its row sum loses digits) and > ~745 below it underflows to 0 (row 0/0 = NaN)."""
    x = x.double()
    return R.sinkhorn_knopp_literal(x - x.amax(dim=0, keepdim=True), temperature, n_iters)


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("temperature", [0.05, 0.1])
@pytest.mark.parametrize("n_iters", [1, 3])
def test_matches_literal(backend, seed, dtype, temperature, n_iters):
    """Odd B, K (several tiles of the interpreted kernels along both axes); the math is fp32 whatever the
    input dtype, so every dtype meets the fp32 bound against float64 on the same (rounded) logits."""
    if dtype == torch.float64 and backend == "triton":
        pytest.skip("float64 runs on the reference path only")
    x = _logits(37, 53, dtype, scale=2.0)
    q = sf.sinkhorn_knopp(x, temperature, n_iters)
    assert q.shape == (37, 53) and q.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close(
        q,
        _want(x, temperature, n_iters),
        1e-12 if dtype == torch.float64 else 3 * tol(torch.float32),
        f"Q, seed {seed}",
    )


@pytest.mark.parametrize("drop", [25.0, 50.0])
def test_extreme_scores(backend, seed, drop):
    """exp(logits/τ) overflows fp32 (scores up to ~330) and one prototype's scores lie ~20·drop below the rest:
    DINOv2's fp32 code returns NaN (the op matches the float64 oracle). At drop = 25 the prototype lies ~700
    below the maximum score, at the edge of float64's exp range (where the raw float64 literal loses digits in
    subnormals, or is NaN on ~1% of seeds, hence `_want`'s shift); at drop = 50 it is beyond it on every seed.

    Bound: the fp32 scores s = x/τ and the potentials u, v reach S = max|s|, so each exponent s_bk + u_k + v_b
    of Q is a sum of terms of size S rounded at 2^-24 relative: the unit of error fp32 can resolve is 2^-24·S
    (~4e-5 at drop 25, ~7e-5 at drop 50), and the bound allows 2 units of relative (normwise) error. Both paths
    stay below 0.14 units on seeds 0..50; scores, or potentials, rounded through 16-bit floats exceed it."""
    x = _logits(21, 19, scale=4.0)
    x[:, 5] -= drop
    assert torch.isnan(R.sinkhorn_knopp_literal(x, 0.05, 3)).any()  # the case is extreme for the literal code
    if drop == 50.0:
        assert torch.isnan(R.sinkhorn_knopp_literal(x.double(), 0.05, 3)).any()  # float64's literal too
    q = sf.sinkhorn_knopp(x, 0.05, 3)
    want = _want(x, 0.05, 3)
    assert want[:, 5].sum() > 0.1  # the far-below prototype still gets its share of the mass
    s_max = x.abs().max().item() / 0.05
    assert_close(q, want, 2 * 2**-24 * s_max, f"Q, seed {seed}")


def test_oracle_shift_invariance(seed):
    """`_want`'s per-prototype shift is an exact invariance of the literal: on logits inside float64's range both
    agree to rounding, and another shift (the column means) gives the same oracle on the extreme case."""
    x = _logits(23, 17, scale=2.0)
    assert_close(_want(x, 0.1, 3), R.sinkhorn_knopp_literal(x.double(), 0.1, 3), 1e-13, f"seed {seed}")
    x[:, 3] -= 40.0
    xm = x.double() - x.double().mean(dim=0, keepdim=True)
    assert_close(_want(x, 0.05, 3), R.sinkhorn_knopp_literal(xm, 0.05, 3), 1e-12, f"seed {seed}")


def test_marginals(backend, seed):
    """What holds after n_iters: the last step normalized the samples, so every row sums to 1 exactly and the
    total is B; the prototype marginals Σ_b Q[b, k] only approach B/K, closer with more iterations."""
    B, K = 29, 13
    x = _logits(B, K, scale=0.5)
    gaps = []
    for n_iters in (1, 4, 40):
        q = sf.sinkhorn_knopp(x, 0.5, n_iters).double()
        assert_close(q.sum(1), torch.ones(B, dtype=torch.float64), 1e-6, f"row sums, n_iters {n_iters}")
        gaps.append(((q.sum(0) - B / K).norm() / (B / K)).item())
    assert gaps[0] > 1e-2 and gaps[2] < 1e-4 and gaps[2] < gaps[1] < gaps[0], f"prototype marginals {gaps}"


def test_no_gradient(backend):
    x = _logits(6, 9).requires_grad_(True)
    with torch.enable_grad():
        q = sf.sinkhorn_knopp(x, 0.1)
    assert not q.requires_grad and q.grad_fn is None


def test_non_contiguous(backend, seed):
    x = _logits(11, 7).t()  # [7, 11], strides (1, 7)
    assert_close(sf.sinkhorn_knopp(x, 0.07, 2), _want(x, 0.07, 2), 3 * tol(torch.float32), f"Q, seed {seed}")


def test_non_finite_propagates(backend):
    x = _logits(5, 8)
    x[2, 3] = float("nan")
    assert not torch.isfinite(sf.sinkhorn_knopp(x, 0.1)).all()


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(teacher_logits=torch.randn(8)), ValueError, "teacher_logits"),
        (dict(teacher_logits=torch.randn(2, 3, 4)), ValueError, "teacher_logits"),
        (dict(teacher_logits=torch.randn(0, 4)), ValueError, "teacher_logits"),
        (dict(teacher_logits=torch.ones(3, 4, dtype=torch.long)), TypeError, "teacher_logits"),
        (dict(teacher_logits=[[1.0, 2.0]]), TypeError, "teacher_logits"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(temperature=-0.1), ValueError, "temperature"),
        (dict(temperature=float("nan")), ValueError, "temperature"),
        (dict(n_iters=0), ValueError, "n_iters"),
        (dict(n_iters=2.0), TypeError, "n_iters"),
        (dict(n_iters=True), TypeError, "n_iters"),
        (dict(gather_distributed=1), TypeError, "gather_distributed"),
    ],
)
def test_bad_input(kwargs, error, match):
    kwargs = dict(dict(teacher_logits=torch.randn(3, 4), temperature=0.1), **kwargs)
    with pytest.raises(error, match=match):
        sf.sinkhorn_knopp(**kwargs)


# ------------------------------------------------------------------------------------------ distributed
SHARDS = (3, 6)  # unequal shards: nothing in the op needs B_rank to agree across ranks


def _logits_of(seed):
    torch.manual_seed(seed)
    return _logits(sum(SHARDS), 11, scale=2.0)


def _rank_targets(rank, world, seed):
    lo = sum(SHARDS[:rank])
    return sf.sinkhorn_knopp(_logits_of(seed)[lo : lo + SHARDS[rank]], 0.05, 3, gather_distributed=True)


@pytest.mark.slow
def test_gather_distributed_matches_single_process(backend, seed):
    """Each rank's targets are its rows of the single-process targets of the concatenated batch (and differ
    from the targets of its shard alone, so the test sees the all-gather)."""
    ranks = run_ranks(len(SHARDS), _rank_targets, seed)
    x = _logits_of(seed)
    want = _want(x, 0.05, 3)
    assert_close(torch.cat(ranks), want, 3 * tol(torch.float32), f"Q, seed {seed}")
    lo = SHARDS[0]
    assert (_want(x[lo:], 0.05, 3) - want[lo:]).abs().max() > 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_dinov2_size(seed, dtype):
    """The real kernels at DINOv2's head size (K = 65536 prototypes, 2 x 64 global crops per GPU)."""
    x = _logits(128, 65536, dtype, scale=2.0).cuda()
    assert_close(sf.sinkhorn_knopp(x, 0.07, 3), _want(x, 0.07, 3), tol(dtype, "cuda"), f"Q, seed {seed}")


def test_kernels_compile_for_sm90():
    """The Sinkhorn kernels compile ahead of time to sm_90 at the launchers' GPU tiles, without register spills."""
    out = check_compiles("""
import sslfast.kernels.sinkhorn as K

for dt in ("bf16", "fp16", "fp32"):
    ptrs = dict(X="*" + dt, V="*fp32", U="*fp32", OUT="*fp32", Q="*fp32", s2="fp32")
    build(K._column_kernel, ptrs, dict(BLOCK_B=32, BLOCK_K=128), aligned=("K", "stride_x"))
    build(K._row_kernel, ptrs, dict(BLOCK_K=1024), aligned=("K", "stride_x"))
    build(K._softmax_kernel, ptrs, dict(BLOCK_K=1024), aligned=("K", "stride_x", "stride_q"))
""")
    built = [line for line in out.splitlines() if line.startswith('{"kernel"')]
    assert len(built) == 9, out
    spills = [line for line in built if '"spills": 0,' not in line]
    assert not spills, "register spills:\n" + "\n".join(spills)
