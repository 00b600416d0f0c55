"""Tiled pairwise sigmoid loss (SigLIP) without the N x N logits.

With x̂_i = x_i/‖x_i‖ (rows of the "row" matrix, e.g. images), ŷ_j = y_j/‖y_j‖ (the "columns", e.g. texts),
t = logit_scale, b = logit_bias and the positive of row i at column i + pos_off:

    c_ij = x̂_i·ŷ_j,   s_ij = t·c_ij + b,   z_ij = +1 if j = i + pos_off else −1
    ℓ_ij = −log σ(z_ij s_ij) = softplus(u_ij),   u_ij = −z_ij s_ij
    softplus(u) = max(u, 0) + log1p(e^{−|u|})                  (finite for every finite u)

Backward, for a weight w (upstream gradient / number of rows of the loss):

    g_ij        = w · ∂ℓ_ij/∂s_ij = −w · z_ij · σ(u_ij)        σ(u) = [u ≥ 0 ? 1 : e^{−|u|}] / (1 + e^{−|u|})
    ∂L/∂x̂_i     = t · Σ_j g_ij ŷ_j                              (this kernel, rows of x)
    ∂L/∂ŷ_j     = t · Σ_i g_ij x̂_i                              (the same kernel with the roles swapped and
                                                                 pos_off negated: s is symmetric in the roles)
    ∂L/∂t       = Σ_ij g_ij c_ij,     ∂L/∂b = Σ_ij g_ij
    ∂L/∂x_i     = (∂L/∂x̂_i − x̂_i (x̂_i·∂L/∂x̂_i)) / ‖x_i‖       (`sslfast.kernels.infonce.row_normalize_backward`)

Unlike a softmax loss, g_ij depends on s_ij alone (no row or column statistic), so one sweep over a row
block's column tiles yields its loss terms, its rows' gradients and the scalar gradients together: an eager
training step is one row pass (loss, ∂L/∂x̂, ∂L/∂t, ∂L/∂b) plus one column pass (∂L/∂ŷ).

Operands. Tiles multiply the raw inputs (fp32 accumulation) and scale by the inverse row norms, as the InfoNCE
kernels do. The second product Σ_j g_ij ŷ_j runs with g_ij·rn_j (|σ| <= 1) as a bf16 operand for bf16 inputs
(bf16 has fp32's exponent range, so tiny σ do not underflow) and in fp32 otherwise (fp16's range would flush
σ(u) < 6e-8 to zero); w·t multiplies the fp32 accumulator once at the end. The interpreter upcasts every dot
operand to fp32 (`UPCAST`: its bf16 dots are wrong).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._backend import interpreting
from ._common import TL_LN2, TL_LOG2E, cdiv, empty, next_pow2, upcast_dots
from ._launch import cached_launch
from .infonce import row_normalize_backward, row_rnorm  # noqa: F401  (the normalization, shared with InfoNCE)


@triton.jit
def _softplus_and_sigmoid(u):
    """(softplus(u), σ(u)) for any finite u, from one exponential e = e^{−|u|} ∈ (0, 1]; log1p(e) is
    log(1 + e)·e/((1 + e) − 1), exact where 1 + e rounds (Goldberg), and e itself where it rounds to 1."""
    e = tl.exp2(-tl.abs(u) * TL_LOG2E)
    v = 1.0 + e
    log1p = tl.where(v == 1.0, e, tl.log2(v) * TL_LN2 * (e / (v - 1.0)))
    softplus = tl.maximum(u, 0.0) + log1p
    sigmoid = tl.where(u >= 0.0, 1.0, e) / v
    return softplus, sigmoid


@triton.jit
def _load_tile(X, rows, row_ok, dk, D, stride, UPCAST: tl.constexpr):
    x = tl.load(X + rows[:, None] * stride + dk[None, :], mask=row_ok[:, None] & (dk[None, :] < D), other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@cached_launch
@triton.jit
def _siglip_rows_kernel(
    R,
    C,
    RN_R,
    RN_C,
    SCALE,
    BIAS,
    WEIGHT,
    LOSS,
    DR,
    DSCALE,
    DBIAS,
    M,
    NC,
    D,
    stride_r,
    stride_c,
    stride_dr,
    pos_off,
    WANT_LOSS: tl.constexpr,
    WANT_GRAD: tl.constexpr,
    WANT_SCALARS: tl.constexpr,
    G_FP32: tl.constexpr,
    ONE_CHUNK: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DO: tl.constexpr,
):
    # Grid (cdiv(M, BLOCK_M), cdiv(D, BLOCK_DO) with WANT_GRAD else 1): a row block sweeps every column tile
    # (BLOCK_N wide), the logits of a tile from BLOCK_D-wide chunks of D (one resident chunk with ONE_CHUNK).
    # Program (i, o) accumulates output columns [o·BLOCK_DO, (o+1)·BLOCK_DO) of ∂L/∂r̂; programs with o = 0
    # also write the per-row loss sums and the per-row partials of ∂L/∂t and ∂L/∂b.
    pid_m = tl.program_id(0)
    pid_o = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    rows64 = rows.to(tl.int64)
    rn_r = tl.load(RN_R + rows, mask=row_ok, other=0.0)
    t = tl.load(SCALE).to(tl.float32)
    b = tl.load(BIAS).to(tl.float32)
    if ONE_CHUNK:
        r_res = _load_tile(R, rows64, row_ok, tl.arange(0, BLOCK_D), D, stride_r, UPCAST)
    do = pid_o * BLOCK_DO + tl.arange(0, BLOCK_DO)
    acc = tl.zeros((BLOCK_M, BLOCK_DO), dtype=tl.float32)
    loss = tl.zeros((BLOCK_M,), dtype=tl.float32)
    g_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    gc_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for c0 in range(0, NC, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        col_ok = cols < NC
        cols64 = cols.to(tl.int64)
        rn_c = tl.load(RN_C + cols, mask=col_ok, other=0.0)
        if ONE_CHUNK:
            dots = tl.dot(r_res, tl.trans(_load_tile(C, cols64, col_ok, tl.arange(0, BLOCK_D), D, stride_c, UPCAST)))
        else:
            dots = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, D, BLOCK_D):
                dk = k0 + tl.arange(0, BLOCK_D)
                dots = tl.dot(
                    _load_tile(R, rows64, row_ok, dk, D, stride_r, UPCAST),
                    tl.trans(_load_tile(C, cols64, col_ok, dk, D, stride_c, UPCAST)),
                    dots,
                )
        cos = dots * rn_r[:, None] * rn_c[None, :]
        s = t * cos + b
        pos = cols[None, :] == rows[:, None] + pos_off
        valid = row_ok[:, None] & col_ok[None, :]
        u = tl.where(pos, -s, s)
        softplus, sigmoid = _softplus_and_sigmoid(u)
        if WANT_LOSS:
            loss += tl.sum(tl.where(valid, softplus, 0.0), axis=1)
        g = tl.where(valid, tl.where(pos, -sigmoid, sigmoid), 0.0)  # ∂ℓ/∂s, without w
        if WANT_SCALARS:
            g_sum += tl.sum(g, axis=1)
            gc_sum += tl.sum(g * cos, axis=1)
        if WANT_GRAD:
            y = _load_tile(C, cols64, col_ok, do, D, stride_c, UPCAST)
            gy = g * rn_c[None, :]
            if G_FP32:
                acc = tl.dot(gy, y.to(tl.float32), acc)
            else:
                acc = tl.dot(gy.to(y.dtype), y, acc)
    w = tl.load(WEIGHT).to(tl.float32)
    first = row_ok & (pid_o == 0)
    if WANT_LOSS:
        tl.store(LOSS + rows, loss, mask=first)
    if WANT_SCALARS:
        tl.store(DBIAS + rows, g_sum * w, mask=first)
        tl.store(DSCALE + rows, gc_sum * w, mask=first)
    if WANT_GRAD:
        tl.store(
            DR + rows64[:, None] * stride_dr + do[None, :], acc * (w * t), mask=row_ok[:, None] & (do[None, :] < D)
        )


# Tiles on a GPU (not tuned yet). A row block of up to 256 features stays resident (ONE_CHUNK); wider rows are
# walked in 64-wide chunks. The backward's output columns are split over the grid's second axis in BLOCK_DO
# chunks, each recomputing the logits of its tiles: wide rows take 64-row blocks and 256-wide output chunks
# (a 64 x 256 fp32 accumulator), so D = 768 recomputes them three times.
GPU_TILES = {
    True: dict(BLOCK_M=128, BLOCK_N=64, BLOCK_DO=128, num_warps=8, num_stages=2),
    False: dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=64, BLOCK_DO=256, num_warps=8, num_stages=2),
}
MAX_RESIDENT_D = 256


def _tiles(d: int) -> dict:
    """Tile shapes. Under the interpreter they are small (its time grows with the loop trips), yet odd sizes
    cross tile edges, and D > 32 takes the chunked path with several output chunks."""
    if interpreting():
        one = d <= 32
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_D=32, ONE_CHUNK=one, BLOCK_DO=32, num_warps=1, num_stages=1)
    one = d <= MAX_RESIDENT_D
    tiles = dict(GPU_TILES[one], ONE_CHUNK=one)
    if one:
        bd = max(16, next_pow2(d))
        tiles.update(BLOCK_D=bd, BLOCK_DO=min(bd, tiles["BLOCK_DO"]))
    return tiles


def siglip_rows(
    r, c, rn_r, rn_c, scale, bias, weight, pos_off: int, *, want_loss: bool, want_grad: bool, want_scalars: bool
):
    """One sweep of the rows of r against the columns c (see the module doc): (Σ_ij ℓ_ij or None,
    ∂L/∂r̂ [M, D] fp32 or None, ∂L/∂t or None, ∂L/∂b or None), all fp32; the gradients carry the weight w
    (a device scalar). r, c are [M, D], [NC, D] with unit stride along D; rn_r, rn_c their fp32 inverse norms."""
    m, d = r.shape
    nc = c.shape[0]
    cfg = _tiles(d)
    f32 = dict(dtype=torch.float32, device=r.device)
    loss = empty((m,), **f32) if want_loss else None
    dr = empty((m, d), **f32) if want_grad else None
    ds, db = (empty((m,), **f32), empty((m,), **f32)) if want_scalars else (None, None)
    dummy = rn_r
    grid = (cdiv(m, cfg["BLOCK_M"]), cdiv(d, cfg["BLOCK_DO"]) if want_grad else 1)
    _siglip_rows_kernel[grid](
        r,
        c,
        rn_r,
        rn_c,
        scale,
        bias,
        weight,
        dummy if loss is None else loss,
        dummy if dr is None else dr,
        dummy if ds is None else ds,
        dummy if db is None else db,
        m,
        nc,
        d,
        r.stride(0),
        c.stride(0),
        d if want_grad else 0,
        pos_off,
        WANT_LOSS=want_loss,
        WANT_GRAD=want_grad,
        WANT_SCALARS=want_scalars,
        G_FP32=r.dtype != torch.bfloat16,
        UPCAST=upcast_dots(),
        **cfg,
    )
    return (
        None if loss is None else loss.sum(),
        dr,
        None if ds is None else ds.sum(),
        None if db is None else db.sum(),
    )
