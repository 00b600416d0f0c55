"""SwAV swapped-prediction loss against the literal facebookresearch/swav main_swav.py loop (float64 oracle)."""

import contextlib

import pytest
import torch

import sslfast as sf
from sslfast.ops._torch import swav as T
from sslfast.reference import swav as R
from tests.aot_compile import check_compiles
from tests.distributed_harness import run_ranks
from tests.helpers import assert_close, assert_loss_close, leaf, tol


def _inputs(G, V, B, K, dtype=torch.float32):
    """Scores of V crops and codes of the G global crops: rows of probabilities rescaled by 0.9-1.1, so a path
    that assumes Σ_k q = 1 (as DINO's teacher softmax) fails."""
    s = torch.randn(V * B, K, dtype=torch.float64) * 3
    q = torch.softmax(torch.randn(G * B, K, dtype=torch.float64) * 2, -1)
    q = q * (0.9 + 0.2 * torch.rand(G * B, 1, dtype=torch.float64))
    return s.to(dtype), q.to(dtype)


def _literal(s, q, temperature, G):
    s64 = leaf(s, torch.float64)
    loss = R.swav_loss_literal(s64, q.double(), temperature, G)
    (g,) = torch.autograd.grad(loss, s64)
    return loss, g


@pytest.mark.parametrize("G,V", [(2, 2), (2, 4), (2, 8), (1, 3), (3, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("separate", [False, True], ids=["grad_in_forward", "separate_backward"])
def test_matches_literal(backend, seed, G, V, dtype, separate, monkeypatch):
    """Odd B, K; fp64 on the reference path only; the gradient computed in the forward and in a separate
    backward."""
    if dtype == torch.float64 and backend == "triton":
        pytest.skip("float64 runs on the reference path only")
    B, K = 7, 53
    s, q = _inputs(G, V, B, K, dtype)
    temperature = 0.1 + 0.05 * torch.rand(()).item()
    ref, gref = _literal(s, q, temperature, G)
    monkeypatch.setattr(T, "CHUNK_ELEMS", K * (2 * V + G) * 3)  # several chunks of images
    x = leaf(s)
    with sf.separate_backward() if separate else contextlib.nullcontext():
        out = sf.swav_loss(x, q, temperature=temperature, num_global_crops=G)
    (g,) = torch.autograd.grad(out, x)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_loss_close(out, ref, 1e-12 if dtype == torch.float64 else tol(dtype), f"loss, seed {seed}")
    assert g.dtype == dtype
    assert_close(g, gref, 1e-10 if dtype == torch.float64 else tol(dtype), f"grad, seed {seed}")


def test_lists_of_crops(backend, seed):
    """Lists of per-crop tensors (scores and codes) are the same loss as the concatenated tensors, and each crop
    of the list gets its own gradient; the codes get none."""
    G, V, B, K = 2, 4, 5, 19
    s, q = _inputs(G, V, B, K)
    ref, gref = _literal(s, q, 0.1, G)
    crops = [leaf(c) for c in s.chunk(V)]
    codes = [leaf(c) for c in q.chunk(G)]
    out = sf.swav_loss(crops, codes, num_global_crops=G)
    out.backward()
    assert_loss_close(out, ref, tol(torch.float32), f"loss, seed {seed}")
    assert_close(torch.cat([c.grad for c in crops]), gref, tol(torch.float32), f"grad, seed {seed}")
    assert all(c.grad is None for c in codes)


def test_sinkhorn_codes_end_to_end(backend, seed):
    """SwAV's step: codes = Sinkhorn of the detached global crops' scores, then the loss."""
    G, V, B, K = 2, 4, 6, 11
    s, _ = _inputs(G, V, B, K)
    codes = torch.cat([sf.sinkhorn_knopp(c, 0.05, 3) for c in s[: G * B].chunk(G)])
    ref, gref = _literal(s, codes, 0.1, G)
    x = leaf(s)
    out = sf.swav_loss(x, codes, num_global_crops=G)
    (g,) = torch.autograd.grad(out, x)
    assert_loss_close(out, ref, tol(torch.float32), f"loss, seed {seed}")
    assert_close(g, gref, tol(torch.float32), f"grad, seed {seed}")


@pytest.mark.parametrize("separate", [False, True], ids=["grad_in_forward", "separate_backward"])
def test_double_backward(backend, separate):
    """create_graph=True: a true second derivative on the reference path (gradgradcheck in float64), sslfast's
    DoubleBackwardError on the kernels, never a detached gradient."""
    s, q = _inputs(2, 3, 2, 5, torch.float64 if backend == "reference" else torch.float32)

    def loss(x):
        with sf.separate_backward() if separate else contextlib.nullcontext():
            return sf.swav_loss(x, q, temperature=0.5)

    if backend == "reference":
        assert torch.autograd.gradgradcheck(loss, (leaf(s),))
    else:
        x = leaf(s)
        with pytest.raises(sf.ops.DoubleBackwardError, match="swav_loss"):
            torch.autograd.grad(loss(x), x, create_graph=True)


def test_non_finite_propagates(backend):
    s, q = _inputs(2, 3, 4, 8)
    s[-1, 3] = float("nan")
    assert torch.isnan(sf.swav_loss(s, q))


def _bad(**kwargs):
    base = dict(scores=torch.randn(4 * 3, 8), codes=torch.rand(2 * 3, 8))
    return dict(base, **kwargs)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (_bad(codes=torch.rand(5, 8)), ValueError, "codes"),  # not G·B rows
        (_bad(codes=[torch.rand(3, 8)] * 3), ValueError, "codes"),  # 3 codes for G = 2
        (_bad(codes=[torch.rand(3, 8), torch.rand(4, 8)]), ValueError, "codes"),  # crops of unequal shape
        (_bad(scores=torch.randn(12, 7)), ValueError, "scores"),  # K mismatch
        (_bad(scores=torch.randn(13, 8)), ValueError, "scores"),  # not V·B rows
        (_bad(scores=torch.randn(3, 8)), ValueError, "scores"),  # V = 1 < G
        (_bad(scores=[torch.randn(6, 8)] * 4), ValueError, "scores"),  # list crops of 2·B rows
        (_bad(scores=[torch.randn(3, 8), torch.randn(3, 9)]), ValueError, "scores"),  # list crops of unequal shape
        (_bad(scores=[]), ValueError, "scores"),
        (_bad(scores=torch.randn(12)), ValueError, "scores"),
        (_bad(scores=torch.ones(12, 8, dtype=torch.long)), TypeError, "scores"),
        (_bad(codes=[[1.0]]), TypeError, "codes"),
        (_bad(codes=torch.rand(6, 8, device="meta")), ValueError, "codes"),  # another device
        (_bad(scores=[torch.randn(3, 8), torch.randn(3, 8, dtype=torch.float64)]), TypeError, "scores"),
        (_bad(temperature=0.0), ValueError, "temperature"),
        (_bad(temperature=-0.1), ValueError, "temperature"),
        (_bad(temperature="0.1"), TypeError, "temperature"),
        (_bad(num_global_crops=0), ValueError, "num_global_crops"),
        (_bad(num_global_crops=2.0), TypeError, "num_global_crops"),
        (_bad(scores=torch.randn(3, 8), codes=torch.rand(3, 8), num_global_crops=1), ValueError, "scores"),  # V = 1
    ],
)
def test_bad_input(kwargs, error, match):
    with pytest.raises(error, match=match):
        sf.swav_loss(**kwargs)


def test_memory_frugal_backward_saves_no_softmax(backend):
    """With a separate backward, the graph keeps the inputs and the [2, V·B] row statistics only."""
    G, V, B, K = 2, 4, 3, 500
    s, q = _inputs(G, V, B, K)
    x = leaf(s)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda z: saved.append(z) or z, lambda z: z), sf.separate_backward():
        sf.swav_loss(x, q)
    extra = sum(z.numel() for z in saved if z.data_ptr() not in (x.data_ptr(), q.data_ptr()))
    assert extra <= 2 * V * B, f"saved {extra} extra elements"


# ------------------------------------------------------------------------------------------ distributed
WORLD, G_D, V_D, B_RANK, D_D, K_D = 2, 2, 4, 3, 5, 13


def _global_inputs(seed):
    """Features of every crop of the global batch [V·W·B_rank, D], the prototypes [K, D] (the parameter DDP
    averages) and the codes of the global batch (as SwAV's distributed Sinkhorn gives them)."""
    torch.manual_seed(seed)
    _, q = _inputs(G_D, V_D, WORLD * B_RANK, K_D)
    return torch.randn(V_D * WORLD * B_RANK, D_D, dtype=torch.float64), torch.randn(K_D, D_D, dtype=torch.float64), q


def _shard(x, n_crops, rank):
    """Rank `rank`'s images of every crop of a crop-major [n_crops·B_global, ...] tensor."""
    return x.view(n_crops, WORLD, B_RANK, -1)[:, rank].reshape(n_crops * B_RANK, -1)


def _rank_grad(rank, world, seed):
    """One DDP step: the local loss of this rank's images, the prototypes' gradient averaged over ranks."""
    feats, protos, q = _global_inputs(seed)
    p = leaf(protos, torch.float32)
    loss = sf.swav_loss(_shard(feats, V_D, rank).float() @ p.t(), _shard(q, G_D, rank).float(), num_global_crops=G_D)
    loss.backward()
    torch.distributed.all_reduce(p.grad)
    return loss.detach(), p.grad / world


@pytest.mark.slow
def test_ddp_average_equals_single_process(backend, seed):
    """The loss is a per-rank mean needing no collective: with the global batch's codes, the mean of the ranks'
    losses and DDP's average of their prototype gradients equal the single-process loss and gradient on the
    whole batch."""
    ranks = run_ranks(WORLD, _rank_grad, seed)
    feats, protos, q = _global_inputs(seed)
    p = leaf(protos)
    ref = R.swav_loss_literal(feats @ p.t(), q, 0.1, G_D)
    (gref,) = torch.autograd.grad(ref, p)
    assert_loss_close(sum(loss for loss, _ in ranks) / WORLD, ref, tol(torch.float32), f"loss, seed {seed}")
    for rank, (_, grad) in enumerate(ranks):
        assert_close(grad, gref, tol(torch.float32), f"prototype grad of rank {rank}, seed {seed}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_kernels_at_swav_size(seed, dtype):
    """The real kernels at SwAV's ImageNet setting (K = 3000 prototypes, 2 x 224 + 6 x 96 crops, 64 images per
    GPU) against the float64 literal."""
    G, V, B, K = 2, 8, 64, 3000
    s, q = (x.cuda() for x in _inputs(G, V, B, K, dtype))
    ref, gref = _literal(s, q, 0.1, G)
    x = leaf(s)
    out = sf.swav_loss(x, q.float(), num_global_crops=G)
    (g,) = torch.autograd.grad(out, x)
    assert_loss_close(out, ref, tol(dtype, "cuda"), f"loss, seed {seed}")
    assert_close(g, gref, tol(dtype, "cuda"), f"grad, seed {seed}")


def test_kernels_compile_for_sm90():
    """The SwAV kernels compile ahead of time to sm_90 at the launchers' GPU tiles, without register spills."""
    out = check_compiles("""
import sslfast.kernels.swav as K

for dt, bk in (("bf16", 256), ("fp16", 256), ("fp32", 128)):  # DINO's 8 KB score tiles at V = 8..16
    ptrs = dict(S="*" + dt, Q="*fp32", PART="*fp32", STATS="*fp32", GRAD="*fp32", DS="*" + dt, s2="fp32",
                coef="fp32")
    build(K._forward_kernel, ptrs, dict(BLOCK_K=bk, BLOCK_V=16), aligned=("K", "stride_s", "stride_q", "k_per_split"))
    build(K._backward_kernel, ptrs, dict(BLOCK_K=bk, BLOCK_V=16), aligned=("K", "stride_s", "stride_q", "stride_ds"))
build(K._loss_kernel, dict(PART="*fp32", STATS="*fp32", LOSS="*fp32", inv_pairs="fp32"), dict(BLOCK_SP=16, BLOCK=256))
""")
    built = [line for line in out.splitlines() if line.startswith('{"kernel"')]
    assert len(built) == 7, out
    spills = [line for line in built if '"spills": 0,' not in line]
    assert not spills, "register spills:\n" + "\n".join(spills)
