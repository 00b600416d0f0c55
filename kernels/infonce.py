"""Tiled, normalized-similarity log-sum-exp: the kernels under NT-Xent, MoCo and CLIP.

Every contrastive loss in sslfast is a cheap function of three vectors computed here without ever storing
the similarity matrix. With â_i = a_i/‖a_i‖, b̂_j = b_j/‖b_j‖ and τ⁻¹ = `scale`:

    s_ij      = scale · â_i·b̂_j                       (tiles on tensor cores, input dtype, fp32 accumulate)
    pos[i]    = s_{i, π(i)}                            (the positive column, read from the tile holding it)
    lse_r[i]  = log Σ_{j valid, j ≠ π(i)} exp(s_ij)    (online, per row: the negatives only)
    lse_c[j]  = log Σ_{i, π(i) ≠ j}       exp(s_ij)    (per column, same tiles; CLIP)

"valid" drops j = i when `exclude_self` (NT-Xent); the positive is left out of the sums only when it is
extracted (`want_pos`). Keeping it out makes the loss cancellation-free: a row's cross-entropy is
softplus(lse_r − pos), accurate even when it is ~1e-9, where lse − pos of two O(scale) numbers is not. Indices are compared as *global* indices,
g = idx + off + (idx >= split)·shift, so a rank's local rows can be scored against an all-gathered batch,
and π(g) = (g + p_shift) mod p_period maps a row to its positive (identity for CLIP/MoCo v3,
i ↦ i ± N for NT-Xent).

Backward, for upstream gradients g_r (of lse_r), g_c (of lse_c) and g_p (of pos):

    G_ij      = g_r[i]·exp(s_ij − lse_r[i]) + g_c[j]·exp(s_ij − lse_c[j])    (j ≠ π(i))
    G_iπ(i)   = g_p[i] (row role) or g_p[j] (column role)
    ∂L/∂â_i   = scale · Σ_j G_ij b̂_j                 (this kernel, rows of a)
    ∂L/∂b̂_j   = scale · Σ_i G_ij â_i                 (the same kernel with a and b swapped)
    ∂L/∂scale = Σ_ij G_ij · â_i·b̂_j
    ∂L/∂a_i   = (∂L/∂â_i − â_i (â_i·∂L/∂â_i)) / ‖a_i‖ (row-normalization backward)

When a and b are the same matrix (NT-Xent on one device), the row and column roles are folded into one
launch: G + Gᵀ needs only S_ij (S is symmetric), so one recomputation of each tile gives the full gradient.

Numerics: logits are kept in base 2 (s·log2 e) so every exponential is one `exp2`; statistics and
accumulators are fp32. Row statistics are an online (max, sum) pair per column split, merged on the host
side. Column statistics need a reduction across row blocks: each tile reduces its columns to
(max m, sum l) in fp32 and atomically adds l·2^(m − scale·log2 e) into an fp64 accumulator. |s| ≤ scale,
so that factor never overflows, and fp64 keeps it exact down to 2^-1022 (scale up to ~350).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import empty, interpreting, next_pow2, num_sms, upcast_dots

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
NORM_EPS = 1e-12  # as torch.nn.functional.normalize


# --------------------------------------------------------------------------------------------- helpers
@triton.jit
def _global_index(idx, off, split, shift):
    return idx + off + tl.where(idx >= split, shift, 0)


@triton.jit
def _exp2_f64(x):
    """2**x in fp64 for fp32 x <= ~0: exact power-of-two part built from the exponent bits."""
    n = tl.maximum(tl.floor(x), -1022.0)
    frac = tl.exp2(x - n).to(tl.float64)
    bits = (n.to(tl.int64) + 1023) << 52
    return frac * bits.to(tl.float64, bitcast=True)


@triton.jit
def _load_rows(X, rows, row_ok, dk, D, stride, UPCAST: tl.constexpr):
    x = tl.load(X + rows[:, None] * stride + dk[None, :], mask=row_ok[:, None] & (dk[None, :] < D), other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _load_cols_t(X, cols, col_ok, dk, D, stride, UPCAST: tl.constexpr):
    """Rows `cols` of X, transposed to [BLOCK_D, BLOCK_N] for the right operand of a dot."""
    x = tl.load(X + cols[None, :] * stride + dk[:, None], mask=col_ok[None, :] & (dk[:, None] < D), other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _logit_tile(a_res, A, B, rows, row_ok, cols, col_ok, D, stride_a, stride_b,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                ONE_CHUNK: tl.constexpr, UPCAST: tl.constexpr):
    """Raw dot products a_i·b_j of one [BLOCK_M, BLOCK_N] tile, fp32. With ONE_CHUNK the row block `a_res`
    stays resident for the whole sweep; otherwise D is walked in BLOCK_D chunks and a is re-read (L2)."""
    if ONE_CHUNK:
        dk = tl.arange(0, BLOCK_D)
        acc = tl.dot(a_res, _load_cols_t(B, cols, col_ok, dk, D, stride_b, UPCAST))
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, D, BLOCK_D):
            dk = k0 + tl.arange(0, BLOCK_D)
            a = _load_rows(A, rows, row_ok, dk, D, stride_a, UPCAST)
            acc = tl.dot(a, _load_cols_t(B, cols, col_ok, dk, D, stride_b, UPCAST), acc)
    return acc


@triton.jit
def _masked_logits(a_res, A, B, RN_B, rows, row_ok, row_fac, g_row, g_pos, c0, col_hi, D, stride_a, stride_b,
                   c_off, c_split, c_shift, EXCLUDE_SELF: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   ONE_CHUNK: tl.constexpr, UPCAST: tl.constexpr):
    """Base-2 logits of the tile starting at column c0 (-inf where invalid), where each row's positive
    sits, the tile's columns and the per-column normalization factors."""
    cols = c0 + tl.arange(0, BLOCK_N)
    col_ok = cols < col_hi
    col_fac = tl.load(RN_B + cols, mask=col_ok, other=0.0)
    dots = _logit_tile(a_res, A, B, rows, row_ok, cols, col_ok, D, stride_a, stride_b,
                       BLOCK_M, BLOCK_N, BLOCK_D, ONE_CHUNK, UPCAST)
    s = dots * row_fac[:, None] * col_fac[None, :]
    g_col = _global_index(cols, c_off, c_split, c_shift)
    valid = col_ok[None, :]
    if EXCLUDE_SELF:
        valid = valid & (g_row[:, None] != g_col[None, :])
    s = tl.where(valid, s, float("-inf"))
    match = g_col[None, :] == g_pos[:, None]
    return s, match, cols, col_ok, col_fac


# --------------------------------------------------------------------------------------------- kernels
@triton.jit
def _rownorm_fwd_kernel(X, RN, M, D, stride, eps, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """RN[i] = 1 / max(‖x_i‖, eps) in fp32."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    ss = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_D):
        x = _load_rows(X, rows, row_ok, k0 + tl.arange(0, BLOCK_D), D, stride, True)
        ss += tl.sum(x * x, axis=1)
    tl.store(RN + rows, 1.0 / tl.maximum(tl.sqrt(ss), eps), mask=row_ok)


@triton.jit
def _rownorm_bwd_kernel(X, RN, DXH, DX, M, D, stride_x, stride_dxh, stride_dx,
                        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """DX = (DXH − x̂ (x̂·DXH)) · rn: the backward of x ↦ x/‖x‖, one row block, whole rows in registers."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    dk = tl.arange(0, BLOCK_D)
    mask = row_ok[:, None] & (dk[None, :] < D)
    rn = tl.load(RN + rows, mask=row_ok, other=0.0)
    xh = _load_rows(X, rows, row_ok, dk, D, stride_x, True) * rn[:, None]
    g = tl.load(DXH + rows[:, None] * stride_dxh + dk[None, :], mask=mask, other=0.0)
    dx = (g - xh * tl.sum(xh * g, axis=1)[:, None]) * rn[:, None]
    tl.store(DX + rows[:, None] * stride_dx + dk[None, :], dx.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def _lse_fwd_kernel(
    A, B, RN_A, RN_B, SCALE, ROW_M, ROW_L, POS, COL_ACC,
    M, NB, D, stride_a, stride_b, cols_per_split,
    r_off, r_split, r_shift, c_off, c_split, c_shift, p_shift, p_period,
    EXCLUDE_SELF: tl.constexpr, WANT_POS: tl.constexpr, COL_STATS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ONE_CHUNK: tl.constexpr, UPCAST: tl.constexpr,
):
    # Grid (row block, column split). A program keeps BLOCK_M rows resident and sweeps its split's columns
    # BLOCK_N at a time; partial row statistics go to ROW_M/ROW_L[split], merged by the launcher.
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    scale2 = tl.load(SCALE).to(tl.float32) * 1.4426950408889634
    row_fac = tl.load(RN_A + rows, mask=row_ok, other=0.0) * scale2
    g_row = _global_index(rows, r_off, r_split, r_shift)
    g_pos = (g_row + p_shift) % p_period
    a_res = 0.0
    if ONE_CHUNK:
        a_res = _load_rows(A, rows, row_ok, tl.arange(0, BLOCK_D), D, stride_a, UPCAST)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    pos_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    col_lo = pid_s * cols_per_split
    col_hi = tl.minimum(col_lo + cols_per_split, NB)
    for c0 in range(col_lo, col_hi, BLOCK_N):
        s, match, cols, col_ok, col_fac = _masked_logits(
            a_res, A, B, RN_B, rows, row_ok, row_fac, g_row, g_pos, c0, col_hi, D, stride_a, stride_b,
            c_off, c_split, c_shift, EXCLUDE_SELF, BLOCK_M, BLOCK_N, BLOCK_D, ONE_CHUNK, UPCAST)
        if WANT_POS:
            pos_i += tl.sum(tl.where(match, s, 0.0), axis=1)
            s = tl.where(match, float("-inf"), s)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_use) + tl.sum(tl.exp2(s - m_use[:, None]), axis=1)
        m_i = m_new
        if COL_STATS:
            sc = tl.where(row_ok[:, None], s, float("-inf"))
            cm = tl.max(sc, axis=0)
            cm_use = tl.where(cm == float("-inf"), 0.0, cm)
            cl = tl.sum(tl.exp2(sc - cm_use[None, :]), axis=0)
            tl.atomic_add(COL_ACC + cols, cl.to(tl.float64) * _exp2_f64(cm_use - scale2), mask=col_ok)

    out = pid_s * M + rows
    tl.store(ROW_M + out, m_i, mask=row_ok)
    tl.store(ROW_L + out, l_i, mask=row_ok)
    if WANT_POS:
        tl.store(POS + out, pos_i * 0.6931471805599453, mask=row_ok)


@triton.jit
def _lse_bwd_kernel(
    A, B, RN_A, RN_B, SCALE, LSE_R, G_R, LSE_C, G_C, G_PR, G_PC, DA, DSCALE,
    M, NB, D, stride_a, stride_b, stride_da, cols_per_split, g_norm,
    r_off, r_split, r_shift, c_off, c_split, c_shift, p_shift, p_period,
    EXCLUDE_SELF: tl.constexpr, ROW_TERM: tl.constexpr, COL_TERM: tl.constexpr,
    POS_ROW: tl.constexpr, POS_COL: tl.constexpr, WANT_DSCALE: tl.constexpr, ATOMIC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, ONE_CHUNK: tl.constexpr,
    BLOCK_DO: tl.constexpr, UPCAST: tl.constexpr,
):
    # Grid (row block, column split, output-feature chunk). Each program recomputes its tiles, forms G and
    # accumulates G·B̂ for BLOCK_DO output features in fp32. Splits add into DA atomically.
    # G is carried multiplied by g_norm (≈ the row count) so that fp16 dot operands stay normal numbers.
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_d = tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    scale = tl.load(SCALE).to(tl.float32)
    scale2 = scale * 1.4426950408889634
    row_fac = tl.load(RN_A + rows, mask=row_ok, other=0.0) * scale2
    g_row = _global_index(rows, r_off, r_split, r_shift)
    g_pos = (g_row + p_shift) % p_period
    if ROW_TERM:
        lse_r = tl.load(LSE_R + rows, mask=row_ok, other=0.0) * 1.4426950408889634
        g_r = tl.load(G_R + rows, mask=row_ok, other=0.0) * g_norm
    if POS_ROW:
        g_pr = tl.load(G_PR + rows, mask=row_ok, other=0.0) * g_norm
    a_res = 0.0
    if ONE_CHUNK:
        a_res = _load_rows(A, rows, row_ok, tl.arange(0, BLOCK_D), D, stride_a, UPCAST)
    dout = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)

    acc = tl.zeros((BLOCK_M, BLOCK_DO), dtype=tl.float32)
    ds = tl.zeros((BLOCK_M,), dtype=tl.float32)
    col_lo = pid_s * cols_per_split
    col_hi = tl.minimum(col_lo + cols_per_split, NB)
    for c0 in range(col_lo, col_hi, BLOCK_N):
        s, match, cols, col_ok, col_fac = _masked_logits(
            a_res, A, B, RN_B, rows, row_ok, row_fac, g_row, g_pos, c0, col_hi, D, stride_a, stride_b,
            c_off, c_split, c_shift, EXCLUDE_SELF, BLOCK_M, BLOCK_N, BLOCK_D, ONE_CHUNK, UPCAST)
        s_neg = s
        if POS_ROW or POS_COL:
            s_neg = tl.where(match, float("-inf"), s)
            match = match & row_ok[:, None]
        # G: softmax weights of the negatives, the positive's gradient on its own entry.
        w = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if ROW_TERM:
            w += g_r[:, None] * tl.exp2(s_neg - lse_r[:, None])
        if COL_TERM:
            lse_c = tl.load(LSE_C + cols, mask=col_ok, other=0.0) * 1.4426950408889634
            g_c = tl.load(G_C + cols, mask=col_ok, other=0.0) * g_norm
            w += g_c[None, :] * tl.exp2(s_neg - lse_c[None, :])
        if POS_ROW:
            w += tl.where(match, g_pr[:, None], 0.0)
        if POS_COL:
            g_pc = tl.load(G_PC + cols, mask=col_ok, other=0.0) * g_norm
            w += tl.where(match, g_pc[None, :], 0.0)
        if WANT_DSCALE:
            ds += tl.sum(w * tl.where(s > float("-inf"), s, 0.0), axis=1)
        wb = w * col_fac[None, :]
        bd = _load_rows(B, cols, col_ok, dout, D, stride_b, UPCAST)
        acc = tl.dot(wb.to(bd.dtype), bd, acc)

    acc = acc * (scale / g_norm)
    dptr = DA + rows[:, None] * stride_da + dout[None, :]
    dmask = row_ok[:, None] & (dout[None, :] < D)
    if ATOMIC:
        tl.atomic_add(dptr, acc, mask=dmask)
    else:
        tl.store(dptr, acc, mask=dmask)
    if WANT_DSCALE:
        if pid_d == 0:
            tl.atomic_add(DSCALE, tl.sum(ds, axis=0) / (g_norm * scale2))


# --------------------------------------------------------------------------------------------- launchers
def _tiles(D: int) -> dict:
    """Tile shapes. 128x64 tiles with the whole (<=256-wide) row block resident fit Hopper's register file
    at 8 warps; under the interpreter tiles are tiny so odd sizes cross many tile edges (and D > 64 takes
    the chunked path)."""
    if interpreting():
        one = D <= 64
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_D=next_pow2(D) if one else 32, ONE_CHUNK=one,
                    BLOCK_DO=min(next_pow2(D), 64), num_warps=1, num_stages=1)
    one = D <= 256
    bd = max(16, next_pow2(D)) if one else 64
    return dict(BLOCK_M=128, BLOCK_N=64, BLOCK_D=bd, ONE_CHUNK=one, BLOCK_DO=bd if one else 128,
                num_warps=8, num_stages=2)


def _splits(n_row_blocks: int, n_cols: int, block_n: int, device) -> tuple[int, int]:
    """Column splits so that row blocks x splits fills the machine about twice; returns (splits, cols each)."""
    col_tiles = triton.cdiv(n_cols, block_n)
    want = max(1, min(col_tiles, triton.cdiv(2 * num_sms(device), n_row_blocks)))
    per = triton.cdiv(col_tiles, want) * block_n
    return triton.cdiv(n_cols, per), per


def row_rnorm(x: torch.Tensor) -> torch.Tensor:
    """fp32 [M]: 1/max(‖x_i‖, 1e-12)."""
    m, d = x.shape
    rn = empty((m,), dtype=torch.float32, device=x.device)
    bm = 16 if interpreting() else 64
    _rownorm_fwd_kernel[(triton.cdiv(m, bm),)](x, rn, m, d, x.stride(0), NORM_EPS,
                                               BLOCK_M=bm, BLOCK_D=min(next_pow2(d), 128))
    return rn


def row_normalize_backward(x: torch.Tensor, rn: torch.Tensor, dxh: torch.Tensor) -> torch.Tensor:
    """dL/dx in x's dtype from dL/dx̂ (fp32)."""
    m, d = x.shape
    dx = empty(x.shape, dtype=x.dtype, device=x.device)
    bd = next_pow2(d)
    bm = max(1, min(64, 8192 // bd)) if not interpreting() else 16
    _rownorm_bwd_kernel[(triton.cdiv(m, bm),)](x, rn, dxh, dx, m, d, x.stride(0), dxh.stride(0), dx.stride(0),
                                               BLOCK_M=bm, BLOCK_D=bd)
    return dx


def similarity_lse(a, b, rn_a, rn_b, scale, maps, *, exclude_self, want_pos, col_stats):
    """Forward statistics (lse_r [M], lse_c [Nb] or empty, pos [M] or empty), all fp32. `maps` is the
    8-tuple (r_off, r_split, r_shift, c_off, c_split, c_shift, p_shift, p_period); see the module doc."""
    m, d = a.shape
    nb = b.shape[0]
    cfg = _tiles(d)
    n_rb = triton.cdiv(m, cfg["BLOCK_M"])
    splits, per = _splits(n_rb, nb, cfg["BLOCK_N"], a.device)
    row_m = empty((splits, m), dtype=torch.float32, device=a.device)
    row_l = empty((splits, m), dtype=torch.float32, device=a.device)
    pos = empty((splits, m), dtype=torch.float32, device=a.device) if want_pos else row_m
    col_acc = torch.zeros((nb if col_stats else 1,), dtype=torch.float64, device=a.device)
    _lse_fwd_kernel[(n_rb, splits)](
        a, b, rn_a, rn_b, scale, row_m, row_l, pos, col_acc,
        m, nb, d, a.stride(0), b.stride(0), per, *maps,
        EXCLUDE_SELF=exclude_self, WANT_POS=want_pos, COL_STATS=col_stats, UPCAST=upcast_dots(), **cfg)
    lse_r = torch.logsumexp((row_m + torch.log2(row_l)) * LN2, dim=0)
    lse_c = ((torch.log2(col_acc) + scale.double() * LOG2E) * LN2).float() if col_stats else row_l.new_empty(0)
    pos = pos.sum(0) if want_pos else row_l.new_empty(0)
    return lse_r, lse_c, pos


def similarity_lse_rows_grad(a, b, rn_a, rn_b, scale, maps, *, exclude_self, lse_r=None, g_r=None,
                             lse_c=None, g_c=None, g_pr=None, g_pc=None, want_dscale=False):
    """dL/dâ (fp32 [M, D]) for rows of `a` against columns of `b`, and dL/dscale (fp32 scalar or None).
    Terms whose tensors are None are left out of G (see the module doc)."""
    m, d = a.shape
    nb = b.shape[0]
    cfg = _tiles(d)
    n_rb = triton.cdiv(m, cfg["BLOCK_M"])
    splits, per = _splits(n_rb, nb, cfg["BLOCK_N"], a.device)
    n_dc = triton.cdiv(d, cfg["BLOCK_DO"])
    atomic = splits > 1
    da = (torch.zeros if atomic else empty)((m, d), dtype=torch.float32, device=a.device)
    dscale = torch.zeros((), dtype=torch.float32, device=a.device) if want_dscale else da
    dummy = rn_a
    _lse_bwd_kernel[(n_rb, splits, n_dc)](
        a, b, rn_a, rn_b, scale,
        dummy if lse_r is None else lse_r, dummy if g_r is None else g_r,
        dummy if lse_c is None else lse_c, dummy if g_c is None else g_c,
        dummy if g_pr is None else g_pr, dummy if g_pc is None else g_pc, da, dscale,
        m, nb, d, a.stride(0), b.stride(0), da.stride(0), per, float(max(m, nb)), *maps,
        EXCLUDE_SELF=exclude_self, ROW_TERM=g_r is not None, COL_TERM=g_c is not None,
        POS_ROW=g_pr is not None, POS_COL=g_pc is not None, WANT_DSCALE=want_dscale, ATOMIC=atomic,
        UPCAST=upcast_dots(), **cfg)
    return da, (dscale if want_dscale else None)


