"""Fused prototype-head cross-entropy (DINO / DINOv2 / SwAV heads): soft targets against softmax(x Wᵀ/τ),
without ever storing the B×K student logits, their softmax or their gradient.

With student features x [B, D], the prototype (last-layer) weight W [K, D], teacher probabilities p [B, K]
(no gradient; rows need not sum to 1) and s = x Wᵀ/τ:

    lse_i   = log Σ_k exp(s_ik)                  (online (max, sum) over K tiles, base 2)
    r_i     = Σ_k p_ik
    loss_i  = r_i·lse_i − Σ_k p_ik s_ik          (= −Σ_k p_ik log softmax(s_i)_k)
    loss    = mean_i loss_i

Backward, for an upstream gradient g of the loss, with P = softmax(s) recomputed tile by tile from lse:

    dS_ik   = g·(r_i·P_ik − p_ik)/B
    dX      = dS W/τ                             (`_dx_kernel`: a row block sweeps K tiles)
    dW      = dSᵀ X/τ                            (`_dw_kernel`: a prototype block sweeps row tiles)

Two kernels, no atomics (flash-attention style): each recomputes its tiles of s, so the backward executes
4·B·K·D FLOPs of dots next to the forward's 2·B·K·D. p is an input and is read in every pass.

Splits. A row block alone is too little work to fill the GPU at DINO's batch sizes (B = 4096: 64 row blocks),
so the forward splits K over the grid's second axis into partial (max, sum, Σ p·s, Σ p) per row, merged by
`_merge_kernel`; `_dx_kernel` does the same with per-split fp32 [B, D] slices that are summed afterwards.
`_dw_kernel` has K/BLOCK_N programs, enough already.

Teacher side (no gradient), with teacher features f [B, D], the teacher's W and center c [K]:

    t_ik    = (f_i·w_k − c_k)/τ_t,   probs = softmax(t) per row
    pass 1  `_teacher_lse_kernel`: online base-2 (max, sum) of each row over K tiles, split over K as the forward
    pass 2  `_teacher_out_kernel`: merges the splits' partials, recomputes each tile of t and writes 2^(t − lse)

so the [B, K] result is the only B×K tensor (recomputing a tile costs 2·D FLOPs per element, less than writing
and re-reading fp32 logits at D <= 256). Without SOFTMAX, pass 2 writes the plain logits f Wᵀ (Sinkhorn's input).

Tiles multiply the inputs in their dtype (fp32 accumulate; bf16 products are exact in fp32); a row block of
up to 256 features stays resident (ONE_CHUNK), wider ones are walked in BLOCK_D chunks and the backward's
outputs split over the grid's last axis in BLOCK_DO columns.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._backend import interpreting
from ._common import (
    LOG2E,
    TL_LN2,
    TL_LOG2E,
    cdiv,
    empty,
    merged_lse2,
    next_pow2,
    num_sms,
    online_lse2,
    upcast_dots,
)
from ._launch import cached_launch

FWD_WAVES = 4  # forward splits over K: row blocks × splits fill about this many waves of the machine
DX_WAVES = 2  # dX splits: fewer, each writes an fp32 [B, D] slice


# --------------------------------------------------------------------------------------------- helpers
@triton.jit
def _load(X, rows, row_ok, dk, D, stride, UPCAST: tl.constexpr):
    """Rows `rows` of X [*, D], columns dk: [len(rows), len(dk)]."""
    x = tl.load(
        X + rows[:, None].to(tl.int64) * stride + dk[None, :], mask=row_ok[:, None] & (dk[None, :] < D), other=0.0
    )
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _load_t(X, rows, row_ok, dk, D, stride, UPCAST: tl.constexpr):
    """The same rows transposed, [len(dk), len(rows)]: the right operand of a dot."""
    x = tl.load(
        X + rows[None, :].to(tl.int64) * stride + dk[:, None], mask=row_ok[None, :] & (dk[:, None] < D), other=0.0
    )
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _dots(
    X,
    W,
    rows,
    row_ok,
    cols,
    col_ok,
    D,
    stride_x,
    stride_w,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """x_i·w_k of a [BLOCK_M, BLOCK_N] tile (fp32), D walked in BLOCK_D chunks."""
    s = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dk = d0 + tl.arange(0, BLOCK_D)
        s = tl.dot(
            _load(X, rows, row_ok, dk, D, stride_x, UPCAST), _load_t(W, cols, col_ok, dk, D, stride_w, UPCAST), s
        )
    return s


@triton.jit
def _row_block(
    X,
    pid_m,
    B,
    D,
    stride_x,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ONE_CHUNK: tl.constexpr,
    UPCAST: tl.constexpr,
):
    # Rows of block pid_m, their mask and, when ONE_CHUNK, the block itself (resident for the whole K sweep).
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < B
    x_res = 0.0
    if ONE_CHUNK:
        x_res = _load(X, rows, row_ok, tl.arange(0, BLOCK_D), D, stride_x, UPCAST)
    return rows, row_ok, x_res


@triton.jit
def _logit_tile(
    X,
    W,
    x_res,
    rows,
    row_ok,
    cols,
    col_ok,
    D,
    stride_x,
    stride_w,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ONE_CHUNK: tl.constexpr,
    UPCAST: tl.constexpr,
):
    # x Wᵀ on one [BLOCK_M, BLOCK_N] tile, fp32: from the resident row block, or walking D in BLOCK_D chunks.
    if ONE_CHUNK:
        s = tl.dot(x_res, _load_t(W, cols, col_ok, tl.arange(0, BLOCK_D), D, stride_w, UPCAST))
    else:
        s = _dots(X, W, rows, row_ok, cols, col_ok, D, stride_x, stride_w, BLOCK_M, BLOCK_N, BLOCK_D, UPCAST)
    return s


@triton.jit
def _probs_tile(P, rows, row_ok, cols, col_ok, stride_p):
    ok = row_ok[:, None] & col_ok[None, :]
    return tl.load(P + rows[:, None].to(tl.int64) * stride_p + cols[None, :], mask=ok, other=0.0).to(tl.float32), ok


@triton.jit
def _grad_logits(s2, lse2, r, p, ok):
    """r_i·P_ik − p_ik from base-2 logits and log-sum-exps (0 off the problem)."""
    return tl.where(ok, r[:, None] * tl.exp2(s2 - lse2[:, None]) - p, 0.0)


# --------------------------------------------------------------------------------------------- kernels
@cached_launch
@triton.jit
def _fwd_kernel(
    X,
    W,
    P,
    M_OUT,
    L_OUT,
    PS_OUT,
    R_OUT,
    B,
    K,
    D,
    stride_x,
    stride_w,
    stride_p,
    per,
    inv_temp,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ONE_CHUNK: tl.constexpr,
    UPCAST: tl.constexpr,
):
    # Grid (row blocks, splits): rows [BLOCK_M] against prototypes [pid_s·per, (pid_s + 1)·per) in BLOCK_N tiles;
    # writes the split's base-2 (max, sum of 2^(s − max)), Σ p·s and Σ p per row to [splits, B].
    pid_m, pid_s = tl.program_id(0), tl.program_id(1)
    rows, row_ok, x_res = _row_block(X, pid_m, B, D, stride_x, BLOCK_M, BLOCK_D, ONE_CHUNK, UPCAST)
    m = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l = tl.zeros((BLOCK_M,), dtype=tl.float32)
    ps = tl.zeros((BLOCK_M,), dtype=tl.float32)
    r = tl.zeros((BLOCK_M,), dtype=tl.float32)
    k_lo = pid_s * per
    k_hi = tl.minimum(K, k_lo + per)
    for c0 in range(k_lo, k_hi, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        col_ok = cols < k_hi
        s = _logit_tile(
            X, W, x_res, rows, row_ok, cols, col_ok, D, stride_x, stride_w, BLOCK_M, BLOCK_N, BLOCK_D, ONE_CHUNK, UPCAST
        )
        s = s * inv_temp
        p, _ = _probs_tile(P, rows, row_ok, cols, col_ok, stride_p)
        ps += tl.sum(p * s, axis=1)
        r += tl.sum(p, axis=1)
        s2 = tl.where(col_ok[None, :], s * TL_LOG2E, float("-inf"))
        m, l = online_lse2(m, l, s2, 1)
    out = pid_s * B + rows
    tl.store(M_OUT + out, m, mask=row_ok)
    tl.store(L_OUT + out, l, mask=row_ok)
    tl.store(PS_OUT + out, ps, mask=row_ok)
    tl.store(R_OUT + out, r, mask=row_ok)


@cached_launch
@triton.jit
def _merge_kernel(M_IN, L_IN, PS_IN, R_IN, LSE, RSUM, ROW_LOSS, B, splits, BLOCK: tl.constexpr, BLOCK_S: tl.constexpr):
    # Grid (cdiv(B, BLOCK),): the splits' partials of BLOCK rows -> lse (natural log), r, loss_i = r·lse − Σ p·s.
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    sp = tl.arange(0, BLOCK_S)
    ok = (sp[:, None] < splits) & (rows[None, :] < B)
    at = sp[:, None] * B + rows[None, :]
    m = tl.load(M_IN + at, mask=ok, other=float("-inf"))
    l = tl.load(L_IN + at, mask=ok, other=0.0)
    lse = merged_lse2(m, l, 0) * TL_LN2
    r = tl.sum(tl.load(R_IN + at, mask=ok, other=0.0), axis=0)
    ps = tl.sum(tl.load(PS_IN + at, mask=ok, other=0.0), axis=0)
    row_ok = rows < B
    tl.store(LSE + rows, lse, mask=row_ok)
    tl.store(RSUM + rows, r, mask=row_ok)
    tl.store(ROW_LOSS + rows, r * lse - ps, mask=row_ok)


@cached_launch
@triton.jit
def _dx_kernel(
    X,
    W,
    P,
    LSE,
    RSUM,
    G,
    DXP,
    B,
    K,
    D,
    stride_x,
    stride_w,
    stride_p,
    stride_part,
    per,
    inv_temp,
    grad_scale,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DO: tl.constexpr,
    ONE_CHUNK: tl.constexpr,
    UPCAST: tl.constexpr,
):
    # Grid (row blocks, splits, output column blocks): Σ_k dS_ik w_k over the split's prototypes for BLOCK_M rows
    # and BLOCK_DO output features (all D when ONE_CHUNK, which then reuses each W tile for both dots), times
    # g/(B·τ), stored to the split's fp32 slice DXP[pid_s].
    pid_m, pid_s, pid_d = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows, row_ok, x_res = _row_block(X, pid_m, B, D, stride_x, BLOCK_M, BLOCK_D, ONE_CHUNK, UPCAST)
    do = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    lse2 = tl.load(LSE + rows, mask=row_ok, other=0.0) * TL_LOG2E
    r = tl.load(RSUM + rows, mask=row_ok, other=0.0)
    scale2 = inv_temp * TL_LOG2E
    acc = tl.zeros((BLOCK_M, BLOCK_DO), dtype=tl.float32)
    k_lo = pid_s * per
    k_hi = tl.minimum(K, k_lo + per)
    for c0 in range(k_lo, k_hi, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        col_ok = cols < k_hi
        if ONE_CHUNK:
            w = _load(W, cols, col_ok, do, D, stride_w, UPCAST)
            s = tl.dot(x_res, tl.trans(w))
        else:
            s = _dots(X, W, rows, row_ok, cols, col_ok, D, stride_x, stride_w, BLOCK_M, BLOCK_N, BLOCK_D, UPCAST)
            w = _load(W, cols, col_ok, do, D, stride_w, UPCAST)
        p, ok = _probs_tile(P, rows, row_ok, cols, col_ok, stride_p)
        ds = _grad_logits(s * scale2, lse2, r, p, ok)
        acc = tl.dot(ds.to(w.dtype), w, acc)
    g = tl.load(G).to(tl.float32)
    out = DXP + pid_s * stride_part + rows[:, None].to(tl.int64) * D + do[None, :]
    tl.store(out, acc * (g * grad_scale), mask=row_ok[:, None] & (do[None, :] < D))


@cached_launch
@triton.jit
def _dw_kernel(
    X,
    W,
    P,
    LSE,
    RSUM,
    G,
    DW,
    B,
    K,
    D,
    stride_x,
    stride_w,
    stride_p,
    inv_temp,
    grad_scale,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DO: tl.constexpr,
    ONE_CHUNK: tl.constexpr,
    UPCAST: tl.constexpr,
):
    # Grid (prototype blocks, output column blocks): Σ_i dS_ik x_i over every row tile for BLOCK_N prototypes
    # and BLOCK_DO output features (ONE_CHUNK: all of them, each X tile serving both dots), times g/(B·τ),
    # stored in W's dtype.
    pid_k, pid_d = tl.program_id(0), tl.program_id(1)
    cols = pid_k * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < K
    do = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    w_res = 0.0
    if ONE_CHUNK:  # the prototype block stays resident for the whole sweep
        w_res = _load_t(W, cols, col_ok, tl.arange(0, BLOCK_D), D, stride_w, UPCAST)
    scale2 = inv_temp * TL_LOG2E
    acc = tl.zeros((BLOCK_N, BLOCK_DO), dtype=tl.float32)
    for r0 in range(0, B, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        row_ok = rows < B
        if ONE_CHUNK:
            x = _load(X, rows, row_ok, do, D, stride_x, UPCAST)
            s = tl.dot(x, w_res)
        else:
            s = _dots(X, W, rows, row_ok, cols, col_ok, D, stride_x, stride_w, BLOCK_M, BLOCK_N, BLOCK_D, UPCAST)
            x = _load(X, rows, row_ok, do, D, stride_x, UPCAST)
        lse2 = tl.load(LSE + rows, mask=row_ok, other=0.0) * TL_LOG2E
        r = tl.load(RSUM + rows, mask=row_ok, other=0.0)
        p, ok = _probs_tile(P, rows, row_ok, cols, col_ok, stride_p)
        ds = _grad_logits(s * scale2, lse2, r, p, ok)
        acc = tl.dot(tl.trans(ds.to(x.dtype)), x, acc)
    g = tl.load(G).to(tl.float32)
    out = DW + cols[:, None].to(tl.int64) * D + do[None, :]
    tl.store(out, (acc * (g * grad_scale)).to(DW.dtype.element_ty), mask=col_ok[:, None] & (do[None, :] < D))


@cached_launch
@triton.jit
def _teacher_lse_kernel(
    X,
    W,
    C,
    M_OUT,
    L_OUT,
    B,
    K,
    D,
    stride_x,
    stride_w,
    per,
    scale2,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ONE_CHUNK: tl.constexpr,
    UPCAST: tl.constexpr,
):
    # Grid (row blocks, splits): the split's base-2 (max, sum of 2^(t − max)) per row of t = (x Wᵀ − c)/τ over
    # prototypes [pid_s·per, (pid_s + 1)·per), to [splits, B]; scale2 = log2(e)/τ.
    pid_m, pid_s = tl.program_id(0), tl.program_id(1)
    rows, row_ok, x_res = _row_block(X, pid_m, B, D, stride_x, BLOCK_M, BLOCK_D, ONE_CHUNK, UPCAST)
    m = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l = tl.zeros((BLOCK_M,), dtype=tl.float32)
    k_lo = pid_s * per
    k_hi = tl.minimum(K, k_lo + per)
    for c0 in range(k_lo, k_hi, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        col_ok = cols < k_hi
        s = _logit_tile(
            X, W, x_res, rows, row_ok, cols, col_ok, D, stride_x, stride_w, BLOCK_M, BLOCK_N, BLOCK_D, ONE_CHUNK, UPCAST
        )
        c = tl.load(C + cols, mask=col_ok, other=0.0)
        t2 = tl.where(col_ok[None, :], (s - c[None, :]) * scale2, float("-inf"))
        m, l = online_lse2(m, l, t2, 1)
    out = pid_s * B + rows
    tl.store(M_OUT + out, m, mask=row_ok)
    tl.store(L_OUT + out, l, mask=row_ok)


@cached_launch
@triton.jit
def _teacher_out_kernel(
    X,
    W,
    C,
    M_IN,
    L_IN,
    OUT,
    B,
    K,
    D,
    stride_x,
    stride_w,
    splits,
    scale2,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
    ONE_CHUNK: tl.constexpr,
    UPCAST: tl.constexpr,
    SOFTMAX: tl.constexpr,
):
    # Grid (row blocks, prototype blocks): one [BLOCK_M, BLOCK_N] tile of the result. SOFTMAX: 2^(t2 − lse2)
    # with t2 = (x Wᵀ − c)·scale2 and lse2 merged from pass 1's [splits, B] partials; else x Wᵀ.
    pid_m, pid_k = tl.program_id(0), tl.program_id(1)
    rows, row_ok, x_res = _row_block(X, pid_m, B, D, stride_x, BLOCK_M, BLOCK_D, ONE_CHUNK, UPCAST)
    cols = pid_k * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < K
    s = _logit_tile(
        X, W, x_res, rows, row_ok, cols, col_ok, D, stride_x, stride_w, BLOCK_M, BLOCK_N, BLOCK_D, ONE_CHUNK, UPCAST
    )
    if SOFTMAX:
        sp = tl.arange(0, BLOCK_S)
        ok = (sp[:, None] < splits) & row_ok[None, :]
        at = sp[:, None] * B + rows[None, :]
        lse2 = merged_lse2(tl.load(M_IN + at, mask=ok, other=float("-inf")), tl.load(L_IN + at, mask=ok, other=0.0), 0)
        c = tl.load(C + cols, mask=col_ok, other=0.0)
        s = tl.exp2((s - c[None, :]) * scale2 - lse2[:, None])
    out = OUT + rows[:, None].to(tl.int64) * K + cols[None, :]
    tl.store(out, s, mask=row_ok[:, None] & col_ok[None, :])


# --------------------------------------------------------------------------------------------- launchers
# GPU tiles per pass for a resident row block (D <= 256) and for wider rows walked in 64-feature chunks. Not
# yet tuned on a GPU: chosen so that every pass compiles for sm_90 without register spills (tests).
GPU_TILES = {
    ("fwd", True): dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
    ("fwd", False): dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2),
    ("dx", True): dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=2),
    ("dx", False): dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=2),
    ("dw", True): dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=2),
    ("dw", False): dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=2),
    ("teacher", True): dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
    ("teacher", False): dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2),
}


def _tiles(D: int, kind: str) -> dict:
    """Tiles of pass `kind` in {"fwd", "dx", "dw", "teacher"}. Under the interpreter they are tiny so odd sizes cross
    many tile edges, and D > 32 already takes the chunked path (two output blocks from D > 32 on)."""
    if interpreting():
        one = D <= 32
        bd = next_pow2(D) if one else 16
        tiles = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_D=bd, ONE_CHUNK=one, num_warps=1, num_stages=1)
        return tiles if kind in ("fwd", "teacher") else dict(tiles, BLOCK_DO=bd if one else 32)
    one = D <= 256
    bd = max(16, next_pow2(D)) if one else 64
    tiles = dict(GPU_TILES[(kind, one)], BLOCK_D=bd, ONE_CHUNK=one)
    return tiles if kind in ("fwd", "teacher") else dict(tiles, BLOCK_DO=bd if one else 128)


def _k_splits(n_row_blocks: int, K: int, block_n: int, device, waves: int) -> tuple[int, int]:
    """(splits, prototypes per split) so that row blocks × splits fill about `waves` waves of the machine."""
    k_tiles = cdiv(K, block_n)
    want = max(1, min(k_tiles, waves * num_sms(device) // n_row_blocks))
    per = cdiv(k_tiles, want) * block_n
    return cdiv(K, per), per


def prototype_ce_forward(x: torch.Tensor, w: torch.Tensor, p: torch.Tensor, student_temp: float):
    """(loss, lse [B], r [B]), fp32: the mean loss, each row's log-sum-exp of s = x Wᵀ/τ and Σ_k p_ik.
    x [B, D] and w [K, D] share a dtype; p [B, K] any floating dtype; all contiguous."""
    B, D = x.shape
    K = w.shape[0]
    cfg = _tiles(D, "fwd")
    n_rb = cdiv(B, cfg["BLOCK_M"])
    splits, per = _k_splits(n_rb, K, cfg["BLOCK_N"], x.device, FWD_WAVES)
    f32 = dict(dtype=torch.float32, device=x.device)
    parts = empty((4, splits, B), **f32)
    _fwd_kernel[(n_rb, splits)](
        x,
        w,
        p,
        parts[0],
        parts[1],
        parts[2],
        parts[3],
        B,
        K,
        D,
        x.stride(0),
        w.stride(0),
        p.stride(0),
        per,
        1.0 / student_temp,
        UPCAST=upcast_dots(),
        **cfg,
    )
    lse, rsum, row_loss = (empty((B,), **f32) for _ in range(3))  # separate: op outputs may not alias
    block_s = next_pow2(splits)
    block = max(1, (256 if interpreting() else 2048) // block_s)
    _merge_kernel[(cdiv(B, block),)](
        parts[0],
        parts[1],
        parts[2],
        parts[3],
        lse,
        rsum,
        row_loss,
        B,
        splits,
        BLOCK=block,
        BLOCK_S=block_s,
        num_warps=4,
    )
    return row_loss.sum() / B, lse, rsum


def prototype_ce_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    w: torch.Tensor,
    p: torch.Tensor,
    lse: torch.Tensor,
    rsum: torch.Tensor,
    student_temp: float,
    *,
    want_x: bool = True,
    want_w: bool = True,
):
    """(dL/dx in x's dtype or an empty tensor, dL/dW in W's dtype or an empty tensor) for the upstream
    gradient `grad` (a scalar tensor) of the mean loss, from the forward's lse and r."""
    B, D = x.shape
    K = w.shape[0]
    inv_temp = 1.0 / student_temp
    grad_scale = inv_temp / B
    g = grad.reshape(1).to(torch.float32)
    dx, dw = x.new_empty(0), w.new_empty(0)
    common = (B, K, D, x.stride(0), w.stride(0), p.stride(0))
    if want_x:
        cfg = _tiles(D, "dx")
        n_rb = cdiv(B, cfg["BLOCK_M"])
        splits, per = _k_splits(n_rb, K, cfg["BLOCK_N"], x.device, DX_WAVES)
        part = empty((splits, B, D), dtype=torch.float32, device=x.device)
        _dx_kernel[(n_rb, splits, cdiv(D, cfg["BLOCK_DO"]))](
            x, w, p, lse, rsum, g, part, *common, B * D, per, inv_temp, grad_scale, UPCAST=upcast_dots(), **cfg
        )
        dx = (part[0] if splits == 1 else part.sum(0)).to(x.dtype)
    if want_w:
        cfg = _tiles(D, "dw")
        dw = empty((K, D), dtype=w.dtype, device=w.device)
        _dw_kernel[(cdiv(K, cfg["BLOCK_N"]), cdiv(D, cfg["BLOCK_DO"]))](
            x, w, p, lse, rsum, g, dw, *common, inv_temp, grad_scale, UPCAST=upcast_dots(), **cfg
        )
    return dx, dw


def _teacher_out(x, w, center, m, l, splits, scale2, softmax: bool) -> torch.Tensor:
    B, D = x.shape
    K = w.shape[0]
    cfg = _tiles(D, "teacher")
    out = empty((B, K), dtype=torch.float32, device=x.device)
    _teacher_out_kernel[(cdiv(B, cfg["BLOCK_M"]), cdiv(K, cfg["BLOCK_N"]))](
        x,
        w,
        center,
        m,
        l,
        out,
        B,
        K,
        D,
        x.stride(0),
        w.stride(0),
        splits,
        scale2,
        BLOCK_S=next_pow2(splits),
        UPCAST=upcast_dots(),
        SOFTMAX=softmax,
        **cfg,
    )
    return out


def prototype_teacher_softmax(x: torch.Tensor, w: torch.Tensor, center: torch.Tensor, teacher_temp: float):
    """softmax((x Wᵀ − c)/τ_t) per row, [B, K] fp32, in two passes over K tiles (no B×K but the result).
    x [B, D] and w [K, D] share a dtype; center a contiguous fp32 [K]; all contiguous."""
    B, D = x.shape
    K = w.shape[0]
    cfg = _tiles(D, "teacher")
    n_rb = cdiv(B, cfg["BLOCK_M"])
    splits, per = _k_splits(n_rb, K, cfg["BLOCK_N"], x.device, FWD_WAVES)
    parts = empty((2, splits, B), dtype=torch.float32, device=x.device)
    scale2 = LOG2E / teacher_temp
    _teacher_lse_kernel[(n_rb, splits)](
        x, w, center, parts[0], parts[1], B, K, D, x.stride(0), w.stride(0), per, scale2, UPCAST=upcast_dots(), **cfg
    )
    return _teacher_out(x, w, center, parts[0], parts[1], splits, scale2, True)


def prototype_teacher_logits(x: torch.Tensor, w: torch.Tensor):
    """x Wᵀ, [B, K] fp32 (the tiles' fp32 accumulation, not rounded to the inputs' dtype)."""
    return _teacher_out(x, w, x, x, x, 1, 1.0, False)
