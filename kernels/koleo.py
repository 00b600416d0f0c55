"""KoLeo: a tiled nearest-neighbour search and the exact gradient, no N×N buffer.

Math in `sslfast.reference.koleo`: x̂_i = r_i x_i with r_i = 1/max(‖x_i‖, ε), n(i) = argmax_{j≠i} x̂_i·x̂_j,
δ_i = x̂_i − x̂_{n(i)} + p·𝟙 (p = 1e-8), d_i = ‖δ_i‖, loss = −(1/N) Σ log(d_i + ε).

    forward   r [N]                                                            (_rnorm_kernel)
              per block of rows i, a sweep over blocks of rows j: the similarities x_i·x_j·r_j as tl.dot
              tiles accumulated over D chunks, a running (max, argmax) with j = i excluded; then δ_i and
              d_i from x_i and the gathered x_{n(i)}                            (_neighbour_kernel)
              loss = −Σ log(d_i + ε)/N in a fixed order                         (_loss_kernel)
    backward  with w_i = −g / (N d_i (d_i + ε)), per row j:
              ĝ_j = w_j δ_j − Σ_{i: n(i) = j} w_i δ_i   (the i with n(i) = j read from a stable sort of n,
              so the sum's order is fixed: no atomics), then
              ∂loss/∂x_j = r_j (ĝ_j − [‖x_j‖ > ε] x̂_j (x̂_j·ĝ_j))              (_grad_kernel)

Memory: O(N·D) (the inputs and the gradient) plus a few N-vectors. The similarity dots run in the input dtype
(fp32 ones in IEEE precision, not TF32, so the argmax agrees with float64 up to real near-ties), accumulated in
fp32; everything else is fp32 arithmetic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._backend import interpreting
from ._common import cdiv, empty, next_pow2, upcast_dots
from ._launch import cached_launch

PDIST_EPS = 1e-8


@cached_launch
@triton.jit
def _rnorm_kernel(X, R, N, D, stride_x, eps, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    # Grid (cdiv(N, BLOCK_M),): Σ x² of BLOCK_M rows over D chunks, r = 1/max(‖x‖, ε).
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        mask = row_ok[:, None] & (dd < D)[None, :]
        x = tl.load(X + rows.to(tl.int64)[:, None] * stride_x + dd[None, :], mask=mask, other=0.0).to(tl.float32)
        sq += tl.sum(x * x, axis=1)
    tl.store(R + rows, 1.0 / tl.maximum(tl.sqrt(sq), eps), mask=row_ok)


@triton.jit
def _unit(X, R, row, dd, ok, stride_x):
    """x̂ of one row at columns dd (0 where not ok), fp32."""
    x = tl.load(X + row.to(tl.int64) * stride_x + dd, mask=ok, other=0.0).to(tl.float32)
    return x * tl.load(R + row)


@cached_launch
@triton.jit
def _neighbour_kernel(
    X,
    R,
    NN,
    DIST,
    N,
    D,
    stride_x,
    p,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
):
    # Grid (cdiv(N, BLOCK_M),): rows i of one block against every block of rows j, [BLOCK_M, BLOCK_N] tiles of
    # dots over D chunks; only the running best (value, index) per row i is kept.
    ii = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    i_ok = ii < N
    best = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    arg = tl.where(ii == 0, 1, 0)  # a valid j ≠ i, kept only if every similarity is NaN
    for j0 in range(0, N, BLOCK_N):
        jj = j0 + tl.arange(0, BLOCK_N)
        j_ok = jj < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            d_ok = (dd < D)[None, :]
            a = tl.load(X + ii.to(tl.int64)[:, None] * stride_x + dd[None, :], mask=i_ok[:, None] & d_ok, other=0.0)
            b = tl.load(X + jj.to(tl.int64)[:, None] * stride_x + dd[None, :], mask=j_ok[:, None] & d_ok, other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            if IEEE:
                acc = tl.dot(a, tl.trans(b), acc, input_precision="ieee")
            else:
                acc = tl.dot(a, tl.trans(b), acc)
        r_j = tl.load(R + jj, mask=j_ok, other=0.0)
        sim = tl.where(j_ok[None, :] & (ii[:, None] != jj[None, :]), acc * r_j[None, :], float("-inf"))
        tile_best = tl.max(sim, axis=1)
        tile_arg = tl.min(tl.where(sim == tile_best[:, None], jj[None, :], N), axis=1)
        take = tile_best > best  # strict: the earlier j wins a tie across tiles
        arg = tl.where(take, tile_arg, arg)
        best = tl.where(take, tile_best, best)
    tl.store(NN + ii, arg.to(tl.int64), mask=i_ok)
    sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    r_i = tl.load(R + ii, mask=i_ok, other=0.0)
    r_n = tl.load(R + arg, mask=i_ok, other=0.0)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        mask = i_ok[:, None] & (dd < D)[None, :]
        xi = tl.load(X + ii.to(tl.int64)[:, None] * stride_x + dd[None, :], mask=mask, other=0.0).to(tl.float32)
        xn = tl.load(X + arg.to(tl.int64)[:, None] * stride_x + dd[None, :], mask=mask, other=0.0).to(tl.float32)
        delta = tl.where(mask, xi * r_i[:, None] - xn * r_n[:, None] + p, 0.0)
        sq += tl.sum(delta * delta, axis=1)
    tl.store(DIST + ii, tl.sqrt(sq), mask=i_ok)


@cached_launch
@triton.jit
def _loss_kernel(DIST, LOSS, N, eps, BLOCK: tl.constexpr):
    # Grid (1,): loss = −Σ log(d_i + ε) / N in a fixed order.
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, N, BLOCK):
        i = start + tl.arange(0, BLOCK)
        d = tl.load(DIST + i, mask=i < N, other=1.0)
        acc += tl.where(i < N, tl.log(d + eps), 0.0)
    tl.store(LOSS, -tl.sum(acc, axis=0) / N)


@triton.jit
def _weight(DIST, row, coef, eps):
    d = tl.load(DIST + row)
    return tl.where(d > 0, coef / (d * (d + eps)), 0.0)


@triton.jit
def _unit_grad(X, R, NN, DIST, ORDER, START, j, dd, ok, stride_x, coef, p, eps):
    """ĝ_j at columns dd: w_j δ_j − Σ_{i: n(i) = j} w_i δ_i, and x̂_j there."""
    u_j = _unit(X, R, j, dd, ok, stride_x)
    g = _weight(DIST, j, coef, eps) * tl.where(ok, u_j - _unit(X, R, tl.load(NN + j), dd, ok, stride_x) + p, 0.0)
    for e in range(tl.load(START + j), tl.load(START + j + 1)):
        i = tl.load(ORDER + e)
        g -= _weight(DIST, i, coef, eps) * tl.where(ok, _unit(X, R, i, dd, ok, stride_x) - u_j + p, 0.0)
    return g, u_j


@cached_launch
@triton.jit
def _grad_kernel(
    X, R, NN, DIST, ORDER, START, GRAD, DX, D, stride_x, stride_dx, inv_n, p, eps, inv_eps, BLOCK_D: tl.constexpr
):
    # Grid (N,): row j, two sweeps over D chunks: x̂_j·ĝ_j, then the gradient (ĝ_j recomputed: it reads the
    # few rows i with n(i) = j, cheaper than keeping an [N, D] fp32 buffer).
    j = tl.program_id(0)
    coef = -tl.load(GRAD).to(tl.float32) * inv_n
    r_j = tl.load(R + j)
    radial = tl.sum(tl.zeros((BLOCK_D,), dtype=tl.float32), axis=0)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        g, u_j = _unit_grad(X, R, NN, DIST, ORDER, START, j, dd, dd < D, stride_x, coef, p, eps)
        radial += tl.sum(g * u_j, axis=0)
    radial = tl.where(r_j < inv_eps, radial, 0.0)  # ‖x_j‖ ≤ ε: the clamped norm passes no gradient
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        ok = dd < D
        g, u_j = _unit_grad(X, R, NN, DIST, ORDER, START, j, dd, ok, stride_x, coef, p, eps)
        dx = r_j * (g - u_j * radial)
        tl.store(DX + j.to(tl.int64) * stride_dx + dd, dx.to(DX.dtype.element_ty), mask=ok)


# --------------------------------------------------------------------------------------------- launchers
def _warps() -> int:
    return 1 if interpreting() else 4


def _block_d(D: int, cap: int) -> int:
    return min(next_pow2(D), 16 if interpreting() else cap)


def koleo_forward(x: torch.Tensor, eps: float):
    """(loss [] fp32, neighbours [N] int64, distances [N] fp32, inverse norms [N] fp32); x [N, D] row-major."""
    N, D = x.shape
    r = empty((N,), dtype=torch.float32, device=x.device)
    bm = 16 if interpreting() else 64
    _rnorm_kernel[(cdiv(N, bm),)](
        x, r, N, D, x.stride(0), eps, BLOCK_M=bm, BLOCK_D=_block_d(D, 128), num_warps=_warps()
    )
    nn = empty((N,), dtype=torch.int64, device=x.device)
    dist = empty((N,), dtype=torch.float32, device=x.device)
    # [64, 64] similarity tiles over 64-column chunks: 16 KB of operands per chunk in fp32, 8 KB in 16-bit
    bt = 16 if interpreting() else 64
    _neighbour_kernel[(cdiv(N, bt),)](
        x,
        r,
        nn,
        dist,
        N,
        D,
        x.stride(0),
        PDIST_EPS,
        BLOCK_M=bt,
        BLOCK_N=bt,
        BLOCK_D=max(16, _block_d(D, 64)),
        UPCAST=upcast_dots(),
        IEEE=x.dtype == torch.float32,
        num_warps=_warps(),
    )
    loss = empty((), dtype=torch.float32, device=x.device)
    _loss_kernel[(1,)](dist, loss, N, eps, BLOCK=64 if interpreting() else 1024, num_warps=_warps())
    return loss, nn, dist, r


def koleo_backward(grad, x, nn, dist, rnorm, eps):
    """∂loss/∂x in x's dtype for the upstream gradient `grad` (0-d); the rest from `koleo_forward`."""
    N, D = x.shape
    order = torch.argsort(nn, stable=True)  # rows i grouped by their neighbour n(i), in index order
    start = torch.zeros(N + 1, dtype=torch.int64, device=x.device)
    torch.cumsum(torch.bincount(nn, minlength=N), 0, out=start[1:])
    dx = empty((N, D), dtype=x.dtype, device=x.device)
    _grad_kernel[(N,)](
        x,
        rnorm,
        nn,
        dist,
        order,
        start,
        grad,
        dx,
        D,
        x.stride(0),
        dx.stride(0),
        1.0 / N,
        PDIST_EPS,
        eps,
        1.0 / eps,
        BLOCK_D=_block_d(D, 1024),
        num_warps=_warps(),
    )
    return dx
