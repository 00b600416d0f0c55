"""KoLeo: loss and gradient against DINOv2's literal `KoLeoLoss.forward` differentiated in float64."""

import pytest
import torch

import sslfast as sf
from sslfast._custom_op import DoubleBackwardError
from sslfast.ops import koleo as ops_koleo
from sslfast.ops._torch import koleo as T
from sslfast.reference import koleo as R
from tests.aot_compile import check_compiles
from tests.helpers import assert_close, assert_loss_close, leaf, tol


def _literal(x, eps=1e-8):
    x64 = leaf(x, torch.float64)
    loss = R.koleo_loss_literal(x64, eps)
    (g,) = torch.autograd.grad(loss, x64)
    return loss, g


def _check(x, seed, eps=1e-8, grad_bound=None):
    ref, gref = _literal(x, eps)
    xl = leaf(x)
    out = sf.koleo_loss(xl, eps)
    (g,) = torch.autograd.grad(out, xl)
    fp64 = x.dtype == torch.float64
    assert out.dtype == (torch.float64 if fp64 else torch.float32) and out.shape == ()
    assert_loss_close(out, ref, 1e-12 if fp64 else tol(torch.float32), f"loss, seed {seed}")
    assert g.dtype == x.dtype
    assert_close(g, gref, grad_bound or (1e-10 if fp64 else tol(x.dtype)), f"grad, seed {seed}")


# (37, 48): three 16-row tiles and three 16-column chunks of the interpreted kernels; (19, 3): in 3-D many rows
# share a nearest neighbour (the scattered part of the gradient); (2, 5): each row the other's neighbour.
@pytest.mark.parametrize("N,D", [(37, 48), (19, 3), (2, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_matches_literal(backend, seed, monkeypatch, N, D, dtype):
    """The math is fp32 whatever the input dtype, so the loss meets the fp32 bound against float64 on the same
    (rounded) inputs; 16-bit gradients are rounded to their dtype."""
    if dtype == torch.float64 and backend == "triton":
        pytest.skip("float64 runs on the reference path only")
    monkeypatch.setattr(T, "CHUNK_ELEMS", 2 * N)  # the CPU path's search in chunks of two rows
    x = (torch.randn(N, D, dtype=torch.float64) * 3).to(dtype)
    _check(x, seed)


def test_shared_neighbours_and_scale(backend, seed):
    """Rows of very different norms (normalization removes them) and a hub: one row that is the nearest
    neighbour of several others, so its gradient sums their contributions."""
    x = torch.randn(23, 6, dtype=torch.float64)
    # Rows 1-7 around row 0, each in its own direction orthogonal to it (±q1, ±q2, ±q3, q4) at angles
    # 0.05-0.08 rad: each is nearer to row 0 than to any other (orthogonal: sqrt(r_i² + r_j²); opposite:
    # r_i + r_j), and no two distances tie. (Random offsets of growing size made a chain instead of a hub at
    # some seeds.)
    q = torch.linalg.qr(torch.cat([x[:1].T, torch.randn(6, 4, dtype=torch.float64)], 1))[0][:, 1:]
    directions = torch.stack([q[:, 0], -q[:, 0], q[:, 1], -q[:, 1], q[:, 2], -q[:, 2], q[:, 3]])
    radii = 0.05 * (1 + 0.1 * torch.arange(7, dtype=torch.float64)) * x[0].norm()
    x[1:8] = x[0] + radii[:, None] * directions
    x *= torch.logspace(-3, 3, 23, dtype=torch.float64)[:, None]
    x = x.float()
    with torch.no_grad():
        nn = T.nearest_neighbours(torch.nn.functional.normalize(x.double()))
    assert torch.bincount(nn, minlength=23)[0] == 7
    _check(x, seed)


def test_norm_below_eps(backend, seed):
    """A row with ‖x‖ < ε is divided by ε, not normalized, and its gradient is the clamped one (g/ε)."""
    x = torch.randn(9, 7, dtype=torch.float64)
    x[4] *= 1e-9
    x[6] *= 1e4
    _check(x.float(), seed, eps=1e-8)
    _check(x.float(), seed, eps=0.5)


def test_non_finite_propagates(backend):
    x = torch.randn(7, 5)
    x[3, 1] = float("nan")
    assert torch.isnan(sf.koleo_loss(x))


def test_no_nxn_saved(backend):
    """The autograd graph keeps the input and three N-vectors, no N×N similarities."""
    N, D = 40, 3
    x = leaf(torch.randn(N, D))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda z: saved.append(z) or z, lambda z: z):
        sf.koleo_loss(x)
    extra = sum(z.numel() for z in saved if z.data_ptr() != x.data_ptr())
    assert extra <= 3 * N, f"saved {extra} extra elements"


def test_double_backward(backend, seed):
    """create_graph=True: the reference path differentiates again (a Hessian-vector product equal to the
    literal's); the kernels' gradient is not differentiable again and says so."""
    x = torch.randn(11, 4, dtype=torch.float64 if backend == "reference" else torch.float32)
    v = torch.randn_like(x)
    xl = leaf(x)
    if backend == "triton":
        with pytest.raises(DoubleBackwardError, match="koleo_loss"):
            torch.autograd.grad(sf.koleo_loss(xl), xl, create_graph=True)
        return
    (g,) = torch.autograd.grad(sf.koleo_loss(xl), xl, create_graph=True)
    (hv,) = torch.autograd.grad((g * v).sum(), xl)
    x64 = leaf(x)
    (g64,) = torch.autograd.grad(R.koleo_loss_literal(x64), x64, create_graph=True)
    (want,) = torch.autograd.grad((g64 * v).sum(), x64)
    assert_close(hv, want, 1e-10, f"Hessian-vector product, seed {seed}")


def test_opcheck(seed):
    torch.library.opcheck(ops_koleo._koleo.custom_op, (torch.randn(7, 5, requires_grad=True), 1e-8))


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(x=torch.randn(8)), ValueError, "x"),
        (dict(x=torch.randn(2, 3, 4)), ValueError, "x"),
        (dict(x=torch.randn(1, 4)), ValueError, "x needs at least 2 rows"),
        (dict(x=torch.randn(0, 4)), ValueError, "x"),
        (dict(x=torch.randn(3, 0)), ValueError, "x"),
        (dict(x=torch.ones(3, 4, dtype=torch.long)), TypeError, "x"),
        (dict(x=[[1.0, 2.0], [3.0, 4.0]]), TypeError, "x"),
        (dict(eps=0.0), ValueError, "eps"),
        (dict(eps=-1e-8), ValueError, "eps"),
        (dict(eps=float("nan")), ValueError, "eps"),
        (dict(eps="1e-8"), TypeError, "eps"),
    ],
)
def test_bad_input(kwargs, error, match):
    kwargs = dict(dict(x=torch.randn(3, 4)), **kwargs)
    with pytest.raises(error, match=match):
        sf.koleo_loss(**kwargs)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_dinov2_size(seed, dtype):
    """The real kernels at a DINOv2 per-GPU batch of class tokens (N = 300 with a ragged last tile, ViT-L's
    D = 1024) against the float64 literal."""
    x = torch.randn(300, 1024, dtype=torch.float64).to(dtype).cuda()
    ref, gref = _literal(x)
    xl = leaf(x)
    out = sf.koleo_loss(xl)
    (g,) = torch.autograd.grad(out, xl)
    assert_loss_close(out, ref, tol(dtype, "cuda"), f"loss, seed {seed}")
    assert_close(g, gref, tol(dtype, "cuda"), f"grad, seed {seed}")


def test_kernels_compile_for_sm90():
    """The KoLeo kernels compile ahead of time to sm_90 at the launchers' GPU tiles, without register spills."""
    out = check_compiles("""
import sslfast.kernels.koleo as K

for dt in ("bf16", "fp16", "fp32"):
    ptrs = dict(X="*" + dt, DX="*" + dt, R="*fp32", NN="*i64", DIST="*fp32", ORDER="*i64", START="*i64",
                GRAD="*fp32", LOSS="*fp32", eps="fp32", p="fp32", inv_n="fp32", inv_eps="fp32")
    build(K._rnorm_kernel, ptrs, dict(BLOCK_M=64, BLOCK_D=128), aligned=("stride_x",))
    build(K._neighbour_kernel, ptrs, dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=64, UPCAST=False, IEEE=dt == "fp32"),
          aligned=("stride_x",))
    build(K._grad_kernel, ptrs, dict(BLOCK_D=1024), aligned=("stride_x", "stride_dx"))
build(K._loss_kernel, dict(DIST="*fp32", LOSS="*fp32", eps="fp32"), dict(BLOCK=1024))
""")
    built = [line for line in out.splitlines() if line.startswith('{"kernel"')]
    assert len(built) == 10, out
    spills = [line for line in built if '"spills": 0,' not in line]
    assert not spills, "register spills:\n" + "\n".join(spills)
