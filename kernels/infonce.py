"""Tiled, normalized-similarity log-sum-exp: the kernels under NT-Xent, MoCo and CLIP.

Every contrastive loss in sslfast is a cheap function of three vectors computed here without ever storing
the similarity matrix. With â_i = a_i/‖a_i‖, b̂_j = b_j/‖b_j‖ and τ⁻¹ = `scale`:

    s_ij      = scale · â_i·b̂_j                       (tiles on tensor cores, input dtype, fp32 accumulate)
    pos[i]    = s_{i, π(i)}                            (the positive column, read from the tile holding it)
    lse_r[i]  = log Σ_{j valid, j ≠ π(i)} exp(s_ij)    (per row: the negatives only)
    lse_c[j]  = log Σ_{i, π(i) ≠ j}       exp(s_ij)    (per column, same tiles; CLIP)

"valid" drops j = i when `exclude_self` (NT-Xent); the positive is left out of the sums when it is
extracted (`want_pos`). Keeping it out makes the loss cancellation-free: a row's cross-entropy is
softplus(lse_r − pos), accurate even when it is ~1e-9, where lse − pos of two O(scale) numbers is not.
Indices are compared as *global* indices, g = idx + off + (idx >= split)·shift, so a rank's local rows can
be scored against an all-gathered batch, and π(g) = (g + p_shift) mod p_period maps a row to its positive
(identity for CLIP/MoCo v3, i ↦ i ± N for NT-Xent).

Backward, for upstream gradients g_r (of lse_r), g_c (of lse_c) and g_p (of pos):

    G_ij      = g_r[i]·exp(s_ij − lse_r[i]) + g_c[j]·exp(s_ij − lse_c[j])    (j ≠ π(i))
    G_iπ(i)   = g_p[i] (row role) or g_p[j] (column role)
    ∂L/∂â_i   = scale · Σ_j G_ij b̂_j                 (this kernel, rows of a)
    ∂L/∂b̂_j   = scale · Σ_i G_ij â_i                 (the same kernel with a and b swapped)
    ∂L/∂scale = Σ_ij G_ij · â_i·b̂_j
    ∂L/∂a_i   = (∂L/∂â_i − â_i (â_i·∂L/∂â_i)) / ‖a_i‖ (row-normalization backward)

When a and b are the same matrix (NT-Xent on one device), the row and column roles are folded into one
launch: G + Gᵀ needs only S_ij (S is symmetric), so one recomputation of each tile gives the full gradient.
The forward of that case uses the symmetry too (with plain-sum statistics): it computes only the row blocks'
diagonal blocks and the tiles right of them, and a tile right of the diagonal adds its column sums to the
statistics of the rows those columns are, half the tiles of the full square. π being an involution, a
column's positive sits in the same tile as the row whose positive it is. The sums are fp32 atomics, so their
last bits depend on the order; torch.use_deterministic_algorithms(True) selects the full square.

Operands. Tiles multiply the *raw* inputs (bf16 products are exact in the fp32 accumulator) and scale the
dot products by per-row and per-column factors rn_a·scale·log2 e and rn_b (rn = 1/‖x‖, computed once):
the logits are more accurate than those of a bf16 F.normalize, and every exponential is one `exp2`.
fp32 inputs on a GPU are the exception: one pass writes their unit rows x̂ in fp16 and the tiles multiply
those (inverse norms 1). |x̂| <= 1, and fp16's 11-bit significand is TF32's, so the logits are as accurate
as TF32 dots of the fp32 inputs while the tensor cores run twice as fast and tiles move half the bytes.

Numerics. Because the rows are unit vectors, |s·log2 e| ≤ scale·log2 e. When the caller knows scale ≤ 64
(`bounded`: every SimCLR/MoCo temperature ≥ 1/64) each 2^s and each sum of up to 2^20 of them lies inside fp32's normal
range, so the statistics are plain fp32 sums of exp2(s): no running max, no rescaling, column sums by fp32
atomics, and in the backward one exp2 per element serves both the row and the column term,
G_ij = 2^s_ij · (g_r[i]·2^-lse_r[i] + g_c[j]·2^-lse_c[j]). Otherwise (CLIP, whose learned scale the host
does not read) rows keep an online (max, sum) pair, and each tile reduces its columns to (max m, sum l)
and atomically adds l·2^(m − |scale|·log2 e) into an fp64 accumulator: |s| ≤ |scale|, so that factor never
overflows, and fp64 keeps it exact down to 2^-1022, which covers every column while |scale| < ~333. A column
whose largest logit lies further below |scale| (its sum under 2^-MIN_COL_ACC_EXP) is recomputed by one more
launch of the forward with the roles swapped, its columns as rows with the online (max, sum); that launch
skips every row block without such a column, so at ordinary scales it costs one near-empty launch.

Split merge. A forward split over columns leaves per-split partials [splits, M] (sums, or (max, sum) pairs)
and column sums; one launch (`_merge_splits_kernel`) reduces them to lse_r, pos and lse_c.

Epilogue. An eager training call turns the statistics into the loss and the upstream gradients of its
backward in one launch (`loss_epilogue`): loss = mean softplus(lse − pos) (rows and, for CLIP, columns
averaged), ∂/∂lse = sigmoid(lse − pos)/M, ∂/∂pos = −(the row's and column's terms).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._backend import interpreting
from ._common import TL_LN2, TL_LOG2E, cdiv, empty, merged_lse2, next_pow2, num_sms, online_lse2, upcast_dots
from ._launch import cached_launch

NORM_EPS = 1e-12  # as torch.nn.functional.normalize
MAX_ATOMIC_SPLITS = 4  # backward column splits that add into one output atomically (more: per-split slices)
TRIANGLE_WAVES = 16  # the symmetric forward's work, in waves of the machine
# The column sums of the online-max forward are fp64 sums of 2^(s − |scale|·log2 e): terms under 2^-1022 lose
# bits or vanish. A column whose sum is under 2^-MIN_COL_ACC_EXP (its largest logit > ~665 below |scale|) is
# recomputed; above it, the at most 2^31 lost terms (each < 2^-1022) weigh < 2^-31 of the sum.
MIN_COL_ACC_EXP = tl.constexpr(960)


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
def _underflowed(COL_ACC, cols, col_ok):
    """Columns whose fp64 sum Σ 2^(s − |scale|·log2 e) fell under 2^-MIN_COL_ACC_EXP (zero included: every term
    underflowed; NaN excluded: the inputs were not finite). Compared on the bits, as positive doubles order
    like their int64 patterns: a float literal would be an fp32 constant, in which 2^-960 is 0."""
    bits = tl.load(COL_ACC + cols, mask=col_ok, other=1.0).to(tl.int64, bitcast=True)
    return col_ok & (bits < (1023 - MIN_COL_ACC_EXP) << 52)


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
def _tile_dots(
    r_res,
    R,
    C,
    rows,
    row_ok,
    cols,
    col_ok,
    D,
    stride_r,
    stride_c,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ONE_CHUNK: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Raw dot products r_i·c_j of one [BLOCK_M, BLOCK_N] tile (fp32). With ONE_CHUNK the row block `r_res`
    stays resident for the whole sweep; otherwise D is walked in BLOCK_D chunks and the rows are re-read."""
    if ONE_CHUNK:
        s = tl.dot(r_res, _load_cols_t(C, cols, col_ok, tl.arange(0, BLOCK_D), D, stride_c, UPCAST))
    else:
        s = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, D, BLOCK_D):
            dk = k0 + tl.arange(0, BLOCK_D)
            s = tl.dot(
                _load_rows(R, rows, row_ok, dk, D, stride_r, UPCAST),
                _load_cols_t(C, cols, col_ok, dk, D, stride_c, UPCAST),
                s,
            )
    return s


@triton.jit
def _logit_tile(
    r_res,
    R,
    C,
    RN_C,
    rows,
    row_ok,
    row_fac,
    c0,
    col_hi,
    D,
    stride_r,
    stride_c,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ONE_CHUNK: tl.constexpr,
    C_ROWS: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Base-2 logits of the tile at column c0, its columns and their inverse norms (1 past the end, where the
    logits are masked by the caller), with C_ROWS (ONE_CHUNK only) the tile's rows of C [BLOCK_N, BLOCK_D]
    as loaded for the dot, for the caller to use again (the backward's G·C), and the tile's dots R·Cᵀ before
    the factors (the cosines times ‖r‖‖c‖: the backward's ∂S/∂scale, whatever the scale)."""
    cols = c0 + tl.arange(0, BLOCK_N)
    col_ok = cols < col_hi
    col_fac = tl.load(RN_C + cols, mask=col_ok, other=1.0)
    c_rows = 0.0
    if C_ROWS:
        c_rows = _load_rows(C, cols, col_ok, tl.arange(0, BLOCK_D), D, stride_c, UPCAST)
        s = tl.dot(r_res, tl.trans(c_rows))
    else:
        s = _tile_dots(
            r_res, R, C, rows, row_ok, cols, col_ok, D, stride_r, stride_c, BLOCK_M, BLOCK_N, BLOCK_D, ONE_CHUNK, UPCAST
        )
    return s * row_fac[:, None] * col_fac[None, :], cols, col_ok, col_fac, c_rows, s


@triton.jit
def _index_ranges(rows, row_ok, r_off, r_split, r_shift, p_shift, p_period):
    """Global indices of the rows and of their positives, and the [lo, hi] range of each over valid rows."""
    g_row = _global_index(rows, r_off, r_split, r_shift)
    g_pos = (g_row + p_shift) % p_period
    g_lo = tl.min(tl.where(row_ok, g_row, 2147483647), axis=0)
    g_hi = tl.max(tl.where(row_ok, g_row, -1), axis=0)
    p_lo = tl.min(tl.where(row_ok, g_pos, 2147483647), axis=0)
    p_hi = tl.max(tl.where(row_ok, g_pos, -1), axis=0)
    return g_row, g_pos, g_lo, g_hi, p_lo, p_hi


@triton.jit
def _needs_mask(
    c0,
    col_hi,
    g_lo,
    g_hi,
    p_lo,
    p_hi,
    c_off,
    c_split,
    c_shift,
    EXCLUDE_SELF: tl.constexpr,
    POS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Whether the tile at column c0 holds anything to mask: columns past the end, a row's own index, or a
    row's positive. Column maps are monotonic, so the tile's global columns lie in [map(c0), map(last)]."""
    last = tl.minimum(c0 + BLOCK_N, col_hi) - 1
    gc_lo = _global_index(c0, c_off, c_split, c_shift)
    gc_hi = _global_index(last, c_off, c_split, c_shift)
    need = c0 + BLOCK_N > col_hi
    if EXCLUDE_SELF:
        need = need | ((gc_lo <= g_hi) & (gc_hi >= g_lo))
    if POS:
        need = need | ((gc_lo <= p_hi) & (gc_hi >= p_lo))
    return need


@triton.jit
def _tile_masks(g_row, g_pos, cols, col_ok, c_off, c_split, c_shift, EXCLUDE_SELF: tl.constexpr):
    """(valid, match): entries that exist and are not a row's own index; the rows' positives."""
    g_col = _global_index(cols, c_off, c_split, c_shift)
    valid = col_ok[None, :]
    if EXCLUDE_SELF:
        valid = valid & (g_row[:, None] != g_col[None, :])
    return valid, g_col[None, :] == g_pos[:, None]


# --------------------------------------------------------------------------------------------- kernels
@cached_launch
@triton.jit
def _rownorm_kernel(
    X,
    RN,
    P,
    RN_P,
    POS,
    SCALE,
    M,
    D,
    stride_x,
    stride_p,
    eps,
    HAS_PARTNER: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """RN[i] = 1/max(‖x_i‖, eps) in fp32. With a partner matrix P (MoCo's keys) also RN_P and the positive
    logits POS[i] = scale · x̂_i·p̂_i, in the same pass."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    ss = tl.zeros((BLOCK_M,), dtype=tl.float32)
    ss_p = tl.zeros((BLOCK_M,), dtype=tl.float32)
    xp = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_D):
        dk = k0 + tl.arange(0, BLOCK_D)
        x = _load_rows(X, rows, row_ok, dk, D, stride_x, True)
        ss += tl.sum(x * x, axis=1)
        if HAS_PARTNER:
            p = _load_rows(P, rows, row_ok, dk, D, stride_p, True)
            ss_p += tl.sum(p * p, axis=1)
            xp += tl.sum(x * p, axis=1)
    rn = 1.0 / tl.maximum(tl.sqrt(ss), eps)
    tl.store(RN + rows, rn, mask=row_ok)
    if HAS_PARTNER:
        rn_p = 1.0 / tl.maximum(tl.sqrt(ss_p), eps)
        tl.store(RN_P + rows, rn_p, mask=row_ok)
        tl.store(POS + rows, tl.load(SCALE).to(tl.float32) * rn * rn_p * xp, mask=row_ok)


@cached_launch
@triton.jit
def _unit_rows_kernel(X, RN, XH, M, D, stride_x, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """XH = X · RN[:, None] in XH's dtype (fp16 unit rows, the tile operands of fp32 inputs)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    rn = tl.load(RN + rows, mask=row_ok, other=0.0)
    for k0 in range(0, D, BLOCK_D):
        dk = k0 + tl.arange(0, BLOCK_D)
        x = _load_rows(X, rows, row_ok, dk, D, stride_x, True) * rn[:, None]
        tl.store(
            XH + rows[:, None] * D + dk[None, :], x.to(XH.dtype.element_ty), mask=row_ok[:, None] & (dk[None, :] < D)
        )


@cached_launch
@triton.jit
def _normalize_bwd_kernel(
    X,
    RN,
    DXH,
    P,
    RN_P,
    COEF,
    DX,
    M,
    D,
    splits,
    stride_x,
    stride_dxs,
    stride_dxh,
    stride_p,
    stride_dx,
    HAS_DXH: tl.constexpr,
    HAS_PARTNER: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """DX = (g − x̂ (x̂·g)) · rn with g = Σ_s DXH[s] + COEF·p̂: the backward of x ↦ x/‖x‖ for the gradient of
    the tiles (DXH, `splits` partial slices stride_dxs apart, summed in order) plus that of a positive logit
    c·x̂·p̂ (MoCo's queue mode); whole rows in registers."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    dk = tl.arange(0, BLOCK_D)
    mask = row_ok[:, None] & (dk[None, :] < D)
    rn = tl.load(RN + rows, mask=row_ok, other=0.0)
    xh = _load_rows(X, rows, row_ok, dk, D, stride_x, True) * rn[:, None]
    g = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    if HAS_DXH:
        for sp in range(0, splits):
            g += tl.load(DXH + sp * stride_dxs + rows[:, None] * stride_dxh + dk[None, :], mask=mask, other=0.0)
    if HAS_PARTNER:
        coef = tl.load(COEF + rows, mask=row_ok, other=0.0) * tl.load(RN_P + rows, mask=row_ok, other=0.0)
        g += coef[:, None] * _load_rows(P, rows, row_ok, dk, D, stride_p, True)
    dx = (g - xh * tl.sum(xh * g, axis=1)[:, None]) * rn[:, None]
    tl.store(DX + rows[:, None] * stride_dx + dk[None, :], dx.to(DX.dtype.element_ty), mask=mask)


@cached_launch
@triton.jit
def _pair_normalize_bwd_kernel(
    X,
    RN,
    DXH,
    P,
    RN_P,
    G_P,
    SCALE,
    DX,
    DP,
    DSCALE,
    M,
    D,
    splits,
    stride_x,
    stride_dxs,
    stride_dxh,
    stride_p,
    stride_dx,
    stride_dp,
    WANT_DSCALE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Both row-normalization backwards of a positive logit pos_i = scale · x̂_i·p̂_i scored against a partner
    row (MoCo's queue mode), from one read of X and P, with c_i = G_P[i]·scale:
        DX = (g − x̂ (x̂·g)) · rn,     g = Σ_s DXH[s] + c·p̂
        DP = (h − p̂ (p̂·h)) · rn_p,   h = c·x̂
    and with WANT_DSCALE, DSCALE += Σ_i G_P[i]·x̂_i·p̂_i (= ∂pos_i/∂scale, from the rows loaded: pos_i/scale
    would be 0/0 at scale 0), atomically."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    dk = tl.arange(0, BLOCK_D)
    mask = row_ok[:, None] & (dk[None, :] < D)
    rn = tl.load(RN + rows, mask=row_ok, other=0.0)
    rn_p = tl.load(RN_P + rows, mask=row_ok, other=0.0)
    scale = tl.load(SCALE).to(tl.float32)
    g_p = tl.load(G_P + rows, mask=row_ok, other=0.0)
    c = g_p * scale
    x = _load_rows(X, rows, row_ok, dk, D, stride_x, True)
    p = _load_rows(P, rows, row_ok, dk, D, stride_p, True)
    g = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for sp in range(0, splits):
        g += tl.load(DXH + sp * stride_dxs + rows[:, None] * stride_dxh + dk[None, :], mask=mask, other=0.0)
    g += (c * rn_p)[:, None] * p
    xh = x * rn[:, None]
    dx = (g - xh * tl.sum(xh * g, axis=1)[:, None]) * rn[:, None]
    tl.store(DX + rows[:, None] * stride_dx + dk[None, :], dx.to(DX.dtype.element_ty), mask=mask)
    h = (c * rn)[:, None] * x
    ph = p * rn_p[:, None]
    dp = (h - ph * tl.sum(ph * h, axis=1)[:, None]) * rn_p[:, None]
    tl.store(DP + rows[:, None] * stride_dp + dk[None, :], dp.to(DP.dtype.element_ty), mask=mask)
    if WANT_DSCALE:
        tl.atomic_add(DSCALE, tl.sum(g_p * rn * rn_p * tl.sum(x * p, axis=1), axis=0))


@triton.jit
def _softplus(x):
    """log(1 + e^x) = max(x, 0) + log1p(e^-|x|), with log1p(y) = log(u)·y/(u − 1), u = 1 + y (y where u rounds
    to 1): accurate for the tiny losses of well-separated rows (~e^x), where log(1 + y) would return 0."""
    y = tl.exp(-tl.abs(x))
    u = 1.0 + y
    return tl.maximum(x, 0.0) + tl.where(u == 1.0, y, tl.log(u) * (y / (u - 1.0)))


@cached_launch
@triton.jit
def _loss_epilogue_kernel(LSE_R, LSE_C, POS, LOSS, G_R, G_C, G_P, m, w_over_m, COLS: tl.constexpr, BLOCK: tl.constexpr):
    # Grid (1,): one program walks the M rows in BLOCK chunks (a few µs at M ≤ 10⁶), so the loss is summed in
    # a fixed order. Per row: x = lse − pos, loss += w·softplus(x)/M, ∂/∂lse = w·sigmoid(x)/M, ∂/∂pos = −Σ.
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, m, BLOCK):
        i = start + tl.arange(0, BLOCK)
        ok = i < m
        p = tl.load(POS + i, mask=ok, other=0.0)
        x = tl.load(LSE_R + i, mask=ok, other=0.0) - p
        acc += tl.where(ok, _softplus(x), 0.0)
        g = tl.sigmoid(x) * w_over_m
        tl.store(G_R + i, g, mask=ok)
        if COLS:
            xc = tl.load(LSE_C + i, mask=ok, other=0.0) - p
            acc += tl.where(ok, _softplus(xc), 0.0)
            gc = tl.sigmoid(xc) * w_over_m
            tl.store(G_C + i, gc, mask=ok)
            g += gc
        tl.store(G_P + i, -g, mask=ok)
    tl.store(LOSS, tl.sum(acc, axis=0) * w_over_m)


@cached_launch
@triton.jit
def _merge_splits_kernel(
    ROW_M,
    ROW_L,
    POS_S,
    COL_L,
    COL_ACC,
    SCALE,
    LSE_R,
    POS,
    LSE_C,
    m,
    nb,
    splits,
    WANT_POS: tl.constexpr,
    COL_STATS: tl.constexpr,
    BOUNDED: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    # Grid (cdiv(max(M, Nb), BLOCK),): BLOCK rows' [BLOCK_S ≥ splits, BLOCK] partials, reduced over the splits
    # (plain sums: ln Σ l; otherwise the base-2 (max, sum) merge), the positives' split sums, and BLOCK columns.
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    row_ok = i < m
    at = tl.arange(0, BLOCK_S)[:, None] * m + i[None, :]
    ok = (tl.arange(0, BLOCK_S)[:, None] < splits) & row_ok[None, :]
    l = tl.load(ROW_L + at, mask=ok, other=0.0)
    if BOUNDED:
        lse = tl.log(tl.sum(l, axis=0))
    else:
        lse = merged_lse2(tl.load(ROW_M + at, mask=ok, other=float("-inf")), l, 0) * TL_LN2
    tl.store(LSE_R + i, lse, mask=row_ok)
    if WANT_POS:
        tl.store(POS + i, tl.sum(tl.load(POS_S + at, mask=ok, other=0.0), axis=0), mask=row_ok)
    if COL_STATS:
        col_ok = i < nb
        if BOUNDED:  # Σ_i e^s_ij
            lse_c = tl.log(tl.load(COL_L + i, mask=col_ok, other=1.0))
        else:  # Σ_i e^(s_ij − |scale|) in fp64 (underflowed columns are recomputed after this launch)
            acc = tl.load(COL_ACC + i, mask=col_ok, other=1.0)
            lse_c = (tl.log(acc) + tl.abs(tl.load(SCALE).to(tl.float64))).to(tl.float32)
        tl.store(LSE_C + i, lse_c, mask=col_ok)


@cached_launch
@triton.jit
def _lse_fwd_kernel(
    R,
    C,
    RN_R,
    RN_C,
    SCALE,
    ROW_M,
    ROW_L,
    POS,
    COL_L,
    COL_ACC,
    M,
    NB,
    D,
    stride_r,
    stride_c,
    cols_per_split,
    r_off,
    r_split,
    r_shift,
    c_off,
    c_split,
    c_shift,
    p_shift,
    p_period,
    EXCLUDE_SELF: tl.constexpr,
    WANT_POS: tl.constexpr,
    COL_STATS: tl.constexpr,
    BOUNDED: tl.constexpr,
    TRIANGLE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ONE_CHUNK: tl.constexpr,
    UPCAST: tl.constexpr,
):
    _lse_fwd(
        R,
        C,
        RN_R,
        RN_C,
        SCALE,
        ROW_M,
        ROW_L,
        POS,
        COL_L,
        COL_ACC,
        M,
        NB,
        D,
        stride_r,
        stride_c,
        cols_per_split,
        r_off,
        r_split,
        r_shift,
        c_off,
        c_split,
        c_shift,
        p_shift,
        p_period,
        EXCLUDE_SELF,
        WANT_POS,
        COL_STATS,
        BOUNDED,
        TRIANGLE,
        BLOCK_M,
        BLOCK_N,
        BLOCK_D,
        ONE_CHUNK,
        UPCAST,
        False,
    )


@cached_launch
@triton.jit
def _lse_redo_kernel(
    R,
    C,
    RN_R,
    RN_C,
    SCALE,
    LSE,
    COL_ACC,
    M,
    NB,
    D,
    stride_r,
    stride_c,
    r_off,
    r_split,
    r_shift,
    c_off,
    c_split,
    c_shift,
    p_shift,
    p_period,
    EXCLUDE_SELF: tl.constexpr,
    WANT_POS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ONE_CHUNK: tl.constexpr,
    UPCAST: tl.constexpr,
):
    # Grid (row block,): `_lse_fwd`'s REDO mode, LSE[i] for the rows i whose COL_ACC[i] underflowed.
    _lse_fwd(
        R,
        C,
        RN_R,
        RN_C,
        SCALE,
        LSE,
        LSE,
        LSE,
        LSE,
        COL_ACC,
        M,
        NB,
        D,
        stride_r,
        stride_c,
        NB,
        r_off,
        r_split,
        r_shift,
        c_off,
        c_split,
        c_shift,
        p_shift,
        p_period,
        EXCLUDE_SELF,
        WANT_POS,
        False,
        False,
        False,
        BLOCK_M,
        BLOCK_N,
        BLOCK_D,
        ONE_CHUNK,
        UPCAST,
        True,
    )


@triton.jit
def _lse_fwd(
    R,
    C,
    RN_R,
    RN_C,
    SCALE,
    ROW_M,
    ROW_L,
    POS,
    COL_L,
    COL_ACC,
    M,
    NB,
    D,
    stride_r,
    stride_c,
    cols_per_split,
    r_off,
    r_split,
    r_shift,
    c_off,
    c_split,
    c_shift,
    p_shift,
    p_period,
    EXCLUDE_SELF: tl.constexpr,
    WANT_POS: tl.constexpr,
    COL_STATS: tl.constexpr,
    BOUNDED: tl.constexpr,
    TRIANGLE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ONE_CHUNK: tl.constexpr,
    UPCAST: tl.constexpr,
    REDO: tl.constexpr,
):
    # Grid (row block, column split). A program keeps BLOCK_M rows resident and sweeps its split's columns
    # BLOCK_N at a time; partial row statistics go to ROW_M/ROW_L[split], merged by the launcher. Only the
    # few tiles that hold a row's own index, a positive or the ragged end pay for masking.
    # TRIANGLE (symmetric S, bounded): program (row block I, j) takes the cols_per_split columns starting at
    # the row block's diagonal block plus j of those spans; a tile right of the diagonal block also adds its
    # column sums (and its columns' positives) to those rows' statistics, so the tiles left of the diagonal
    # are never computed. Programs past the last column do nothing (the grid is a rectangle over a
    # triangle). Every statistic is an fp32 atomic sum into ROW_L [M] and POS [M].
    # REDO (one split, online max): the rows are the columns of an earlier launch whose fp64 sums COL_ACC
    # underflowed (`_underflowed`); a row block holding none of them skips its sweep, the others store those
    # rows' natural-log LSEs into ROW_L (the earlier merge's LSE_C). WANT_POS then only masks the positives.
    pid_m = tl.program_id(0)
    if TRIANGLE:
        col_lo = pid_m * BLOCK_M + tl.program_id(1) * cols_per_split
    else:
        col_lo = tl.program_id(1) * cols_per_split
    live = col_lo < NB
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    if REDO:
        redo = _underflowed(COL_ACC, rows, row_ok)
        live = live & (tl.max(redo.to(tl.int32), axis=0) > 0)
    ragged_rows = (pid_m + 1) * BLOCK_M > M
    g_row, g_pos, g_lo, g_hi, p_lo, p_hi = _index_ranges(rows, row_ok, r_off, r_split, r_shift, p_shift, p_period)
    r_res = 0.0
    if ONE_CHUNK:
        r_res = _load_rows(R, rows, row_ok & live, tl.arange(0, BLOCK_D), D, stride_r, UPCAST)
    ref2 = tl.load(SCALE).to(tl.float32) * TL_LOG2E
    row_fac = tl.load(RN_R + rows, mask=row_ok, other=0.0) * ref2

    m_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    if not BOUNDED:
        m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    pos_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    col_hi = tl.minimum(col_lo + cols_per_split, NB)
    if REDO:
        col_hi = tl.where(live, col_hi, col_lo)
    for c0 in range(col_lo, col_hi, BLOCK_N):
        s, cols, col_ok, col_fac, _, _ = _logit_tile(
            r_res,
            R,
            C,
            RN_C,
            rows,
            row_ok,
            row_fac,
            c0,
            col_hi,
            D,
            stride_r,
            stride_c,
            BLOCK_M,
            BLOCK_N,
            BLOCK_D,
            ONE_CHUNK,
            False,
            UPCAST,
        )
        mirror = TRIANGLE and c0 >= (pid_m + 1) * BLOCK_M  # right of the diagonal block: columns count too
        if _needs_mask(c0, col_hi, g_lo, g_hi, p_lo, p_hi, c_off, c_split, c_shift, EXCLUDE_SELF, WANT_POS, BLOCK_N):
            valid, match = _tile_masks(g_row, g_pos, cols, col_ok, c_off, c_split, c_shift, EXCLUDE_SELF)
            if WANT_POS:
                s_pos = tl.where(match, s, 0.0)
                pos_i += tl.sum(s_pos, axis=1)
                if mirror:  # π is an involution: column j's positive is the row whose positive j is
                    tl.atomic_add(POS + cols, tl.sum(s_pos, axis=0) * TL_LN2, mask=col_ok)
                valid = valid & ~match
            s = tl.where(valid, s, float("-inf"))
        if COL_STATS or TRIANGLE:
            if ragged_rows:
                s = tl.where(row_ok[:, None], s, float("-inf"))
        if BOUNDED:
            p = tl.exp2(s)
            l_i += tl.sum(p, axis=1)
            if COL_STATS:
                tl.atomic_add(COL_L + cols, tl.sum(p, axis=0), mask=col_ok)
            if mirror:
                tl.atomic_add(ROW_L + cols, tl.sum(p, axis=0), mask=col_ok)
        else:
            m_i, l_i = online_lse2(m_i, l_i, s, 1)
            if COL_STATS:
                cm = tl.max(s, axis=0)
                cm_use = tl.where(cm == float("-inf"), 0.0, cm)
                cl = tl.sum(tl.exp2(s - cm_use[None, :]), axis=0)
                tl.atomic_add(COL_ACC + cols, cl.to(tl.float64) * _exp2_f64(cm_use - tl.abs(ref2)), mask=col_ok)

    if TRIANGLE:
        tl.atomic_add(ROW_L + rows, l_i, mask=row_ok & live)
        if WANT_POS:
            tl.atomic_add(POS + rows, pos_i * TL_LN2, mask=row_ok & live)
    elif REDO:
        tl.store(ROW_L + rows, (m_i + tl.log2(l_i)) * TL_LN2, mask=redo)
    else:
        out = tl.program_id(1) * M + rows
        if not BOUNDED:  # plain sums have no running max
            tl.store(ROW_M + out, m_i, mask=row_ok)
        tl.store(ROW_L + out, l_i, mask=row_ok)
        if WANT_POS:
            tl.store(POS + out, pos_i * TL_LN2, mask=row_ok)


@cached_launch
@triton.jit
def _lse_bwd_kernel(
    R,
    C,
    RN_R,
    RN_C,
    SCALE,
    LSE_R,
    G_R,
    LSE_C,
    G_C,
    G_PR,
    G_PC,
    DR,
    DSCALE,
    M,
    NB,
    D,
    stride_r,
    stride_c,
    stride_dr,
    stride_ds,
    cols_per_split,
    g_norm,
    r_off,
    r_split,
    r_shift,
    c_off,
    c_split,
    c_shift,
    p_shift,
    p_period,
    EXCLUDE_SELF: tl.constexpr,
    ROW_TERM: tl.constexpr,
    COL_TERM: tl.constexpr,
    POS_ROW: tl.constexpr,
    POS_COL: tl.constexpr,
    WANT_DSCALE: tl.constexpr,
    ATOMIC: tl.constexpr,
    BOUNDED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ONE_CHUNK: tl.constexpr,
    BLOCK_DO: tl.constexpr,
    UPCAST: tl.constexpr,
):
    # Grid (row block, column split, output-feature chunk). Each program recomputes its tiles, forms
    # W = G·rn_c and accumulates W·C = G·Ĉ for BLOCK_DO output features in fp32. A few splits add into DR
    # atomically; many write their own slice DR[split] (stride_ds), summed by the row-normalization
    # backward that reads them, since hundreds of programs adding into one row block serialize on the
    # atomics. W is carried multiplied by g_norm (≈ the row count) so fp16 dot operands stay normal numbers.
    # When one program covers every output feature (ONE_CHUNK, BLOCK_DO = BLOCK_D), C's tile is loaded once
    # for both dots (S = R·Cᵀ, then W·C).
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_d = tl.program_id(2)
    POS: tl.constexpr = POS_ROW or POS_COL
    SHARE_C: tl.constexpr = ONE_CHUNK and BLOCK_DO == BLOCK_D
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    ragged_rows = (pid_m + 1) * BLOCK_M > M
    g_row, g_pos, g_lo, g_hi, p_lo, p_hi = _index_ranges(rows, row_ok, r_off, r_split, r_shift, p_shift, p_period)
    scale2 = tl.load(SCALE).to(tl.float32) * TL_LOG2E
    rn_r = tl.load(RN_R + rows, mask=row_ok, other=0.0)
    row_fac = rn_r * scale2
    if ROW_TERM:
        lse_r = tl.load(LSE_R + rows, mask=row_ok, other=0.0) * TL_LOG2E
        g_r = tl.load(G_R + rows, mask=row_ok, other=0.0) * g_norm
        u_r = g_r * tl.exp2(-lse_r)
    if POS_ROW:
        g_pr = tl.load(G_PR + rows, mask=row_ok, other=0.0) * g_norm
    r_res = 0.0
    if ONE_CHUNK:
        r_res = _load_rows(R, rows, row_ok, tl.arange(0, BLOCK_D), D, stride_r, UPCAST)
    dout = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)

    acc = tl.zeros((BLOCK_M, BLOCK_DO), dtype=tl.float32)
    ds = tl.zeros((BLOCK_M,), dtype=tl.float32)
    col_lo = pid_s * cols_per_split
    col_hi = tl.minimum(col_lo + cols_per_split, NB)
    for c0 in range(col_lo, col_hi, BLOCK_N):
        s, cols, col_ok, col_fac, c_rows, dots = _logit_tile(
            r_res,
            R,
            C,
            RN_C,
            rows,
            row_ok,
            row_fac,
            c0,
            col_hi,
            D,
            stride_r,
            stride_c,
            BLOCK_M,
            BLOCK_N,
            BLOCK_D,
            ONE_CHUNK,
            SHARE_C,
            UPCAST,
        )
        if COL_TERM:
            lse_c = tl.load(LSE_C + cols, mask=col_ok, other=0.0) * TL_LOG2E
            g_c = tl.load(G_C + cols, mask=col_ok, other=0.0) * g_norm
        # W: softmax weights of the negatives (times rn_c) ...
        if BOUNDED:
            e = tl.exp2(s + tl.log2(col_fac)[None, :])
            if ROW_TERM and COL_TERM:
                w = e * (u_r[:, None] + (g_c * tl.exp2(-lse_c))[None, :])
            elif ROW_TERM:
                w = e * u_r[:, None]
            else:
                w = e * (g_c * tl.exp2(-lse_c))[None, :]
        else:
            w = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            if ROW_TERM:
                w += g_r[:, None] * tl.exp2(s - lse_r[:, None])
            if COL_TERM:
                w += g_c[None, :] * tl.exp2(s - lse_c[None, :])
            w = w * col_fac[None, :]
        # ... and the positive's gradient on its own entry; nothing on masked entries.
        if _needs_mask(c0, col_hi, g_lo, g_hi, p_lo, p_hi, c_off, c_split, c_shift, EXCLUDE_SELF, POS, BLOCK_N):
            valid, match = _tile_masks(g_row, g_pos, cols, col_ok, c_off, c_split, c_shift, EXCLUDE_SELF)
            if POS:
                w = tl.where(valid & ~match, w, 0.0)
                match = match & row_ok[:, None]
                if POS_ROW:
                    w += tl.where(match, (g_pr[:, None] * col_fac[None, :]), 0.0)
                if POS_COL:
                    g_pc = tl.load(G_PC + cols, mask=col_ok, other=0.0) * g_norm
                    w += tl.where(match, (g_pc * col_fac)[None, :], 0.0)
            else:
                w = tl.where(valid, w, 0.0)
        if ragged_rows:  # padding rows: their column terms may be inf·0
            w = tl.where(row_ok[:, None], w, 0.0)
        if WANT_DSCALE:  # Σ_j G_ij·cos_ij · g_norm/rn_r[i], with G = W / (g_norm·rn_c) and cos = dots·rn_r·rn_c
            ds += tl.sum(w * dots, axis=1)
        if SHARE_C:
            cd = c_rows
        else:
            cd = _load_rows(C, cols, col_ok, dout, D, stride_c, UPCAST)
        acc = tl.dot(w.to(cd.dtype), cd, acc)

    acc = acc * (scale2 * TL_LN2 / g_norm)
    dptr = DR + pid_s * stride_ds + rows[:, None] * stride_dr + dout[None, :]
    dmask = row_ok[:, None] & (dout[None, :] < D)
    if ATOMIC:
        tl.atomic_add(dptr, acc, mask=dmask)
    else:
        tl.store(dptr, acc, mask=dmask)
    if WANT_DSCALE:
        if pid_d == 0:
            tl.atomic_add(DSCALE, tl.sum(ds * rn_r, axis=0) / g_norm)


# --------------------------------------------------------------------------------------------- launchers
# Tile shapes on a GPU per (pass, row block resident (D <= 256), plain-sum statistics), from the sweeps of
# benchmarks/tune_infonce.py on an H100 and an H200 (benchmarks/runs/): the forward prefers 4 warps
# with 3 stages; the backward with both exp terms folded into one (bounded) prefers narrow 32-column tiles,
# the others 128x64, except at D <= 128 (NARROW_TILES).
GPU_TILES = {
    ("fwd", True, True): dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3),
    ("fwd", True, False): dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3),
    ("bwd", True, True): dict(BLOCK_M=128, BLOCK_N=32, num_warps=4, num_stages=4),
    ("bwd", True, False): dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2),
    ("fwd", False, True): dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2),
    ("fwd", False, False): dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2),
    ("bwd", False, True): dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2),
    ("bwd", False, False): dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2),
}
# (pass, bounded) -> tiles for rows of at most 128 features. The unbounded backward (CLIP's learned scale)
# runs 64x64 tiles on 4 warps there: CLIP B=32768 D=128 7.24 -> 6.28 ms on the H200, where at D=256 the same
# tiles take 12.9 ms against 10.4.
NARROW_TILES = {
    ("bwd", False): dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
}


def tile_entry(kind: str, one: bool, bounded: bool, block_d: int) -> tuple[dict, tuple]:
    """(table, key) of the tiles a launch reads: NARROW_TILES' entry for a resident row block of at most 128
    features where it has one, else GPU_TILES'."""
    if one and block_d <= 128 and (kind, bounded) in NARROW_TILES:
        return NARROW_TILES, (kind, bounded)
    return GPU_TILES, (kind, one, bounded)


def gpu_tiles(kind: str, one: bool, bounded: bool, block_d: int) -> dict:
    """A copy of the tiles `tile_entry` points at."""
    table, key = tile_entry(kind, one, bounded, block_d)
    return dict(table[key])


_TILES: dict = {}  # (D, kind, bounded) -> (the table entry it was made from, or None; the tiles)


def _tiles(D: int, kind: str, bounded: bool) -> dict:
    """Tile shapes for `kind` in {"fwd", "bwd"} (a shared dict: read it, do not change it). On a GPU a row
    block of up to 256 features stays resident (ONE_CHUNK) and the backward keeps all D outputs in one
    accumulator; wider rows are walked in 64-wide chunks and the backward's outputs split over the grid's third
    axis. Under the interpreter tiles are tiny so odd sizes cross many tile edges, and D > 64 already takes the
    chunked path. Made once per (D, kind, bounded) and table entry (a tuning sweep replaces entries)."""
    hit = _TILES.get((D, kind, bounded))
    if hit is not None and (hit[0] is None or hit[0] is _table_entry(D, kind, bounded)):
        return hit[1]
    tiles = _make_tiles(D, kind, bounded)
    _TILES[D, kind, bounded] = (None if interpreting() else _table_entry(D, kind, bounded), tiles)
    return tiles


def _table_entry(D: int, kind: str, bounded: bool) -> dict:
    one = D <= 256
    table, key = tile_entry(kind, one, bounded, max(16, next_pow2(D)) if one else 64)
    return table[key]


def _make_tiles(D: int, kind: str, bounded: bool) -> dict:
    if interpreting():
        one = D <= 64
        tiles = dict(
            BLOCK_M=16, BLOCK_N=16, BLOCK_D=next_pow2(D) if one else 32, ONE_CHUNK=one, num_warps=1, num_stages=1
        )
        return dict(tiles, BLOCK_DO=min(next_pow2(D), 64)) if kind == "bwd" else tiles
    one = D <= 256
    bd = max(16, next_pow2(D)) if one else 64
    tiles = dict(gpu_tiles(kind, one, bounded, bd), BLOCK_D=bd, ONE_CHUNK=one)
    return dict(tiles, BLOCK_DO=bd if one else 128) if kind == "bwd" else tiles


def _splits(n_row_blocks: int, n_cols: int, block_n: int, device, waves: int) -> tuple[int, int]:
    """Column splits so that row blocks x splits fills at most `waves` waves of the machine; returns (splits,
    columns per split). Equal programs finish together, so a partial last wave costs a whole one: rounding
    the split count down never loses (MoCo N=4096: 8 splits, 256 programs in 2 waves, rather than 9 in 3).
    The forward, whose splits only write small partial statistics, takes up to 8 waves; the backward, whose
    splits each add a [BLOCK_M, D] fp32 block, 2 (the configuration of the H100 sweep)."""
    col_tiles = cdiv(n_cols, block_n)
    want = max(1, min(col_tiles, waves * num_sms(device) // n_row_blocks))
    per = cdiv(col_tiles, want) * block_n
    return cdiv(n_cols, per), per


def row_rnorm(x: torch.Tensor, partner: torch.Tensor | None = None, scale: torch.Tensor | None = None):
    """fp32 [M] 1/max(‖x_i‖, 1e-12); with a partner, also (its inverse norms, scale · x̂_i·p̂_i)."""
    m, d = x.shape
    rn = empty((m,), dtype=torch.float32, device=x.device)
    rn_p, pos = (
        (empty((m,), dtype=torch.float32, device=x.device) for _ in range(2)) if partner is not None else (rn, rn)
    )
    bm = 16 if interpreting() else 32
    _rownorm_kernel[(cdiv(m, bm),)](
        x,
        rn,
        x if partner is None else partner,
        rn_p,
        pos,
        rn if scale is None else scale,
        m,
        d,
        x.stride(0),
        x.stride(0) if partner is None else partner.stride(0),
        NORM_EPS,
        HAS_PARTNER=partner is not None,
        BLOCK_M=bm,
        BLOCK_D=min(next_pow2(d), 128),
        num_warps=4,
    )
    return rn if partner is None else (rn, rn_p, pos)


def _split_strides(dxh) -> tuple[int, int, int]:
    """(splits, split stride, row stride) of ∂L/∂x̂ as `similarity_lse_rows_grad` returns it: [M, D], or
    [S, M, D] partial slices whose sum it is."""
    if dxh.dim() == 3:
        return dxh.shape[0], dxh.stride(0), dxh.stride(1)
    return 1, 0, dxh.stride(0)


def _normalize_rows(d: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_D) of the row-normalization backwards: whole rows, ~4096 fp32 values a matrix."""
    bd = next_pow2(d)
    return (16 if interpreting() else max(1, min(32, 4096 // bd))), bd


def row_normalize_backward(x, rn, dxh=None, partner=None, rn_p=None, coef=None) -> torch.Tensor:
    """dL/dx in x's dtype from dL/dx̂ (fp32, optional; [M, D] or the [S, M, D] partials of
    `similarity_lse_rows_grad`, summed here) plus the gradient of coef_i · x̂_i·p̂_i."""
    m, d = x.shape
    dx = empty(x.shape, dtype=x.dtype, device=x.device)
    splits, stride_dxs, stride_dxh = (0, 0, 0) if dxh is None else _split_strides(dxh)
    bm, bd = _normalize_rows(d)
    _normalize_bwd_kernel[(cdiv(m, bm),)](
        x,
        rn,
        dx if dxh is None else dxh,
        x if partner is None else partner,
        rn if rn_p is None else rn_p,
        rn if coef is None else coef,
        dx,
        m,
        d,
        splits,
        x.stride(0),
        stride_dxs,
        stride_dxh,
        x.stride(0) if partner is None else partner.stride(0),
        dx.stride(0),
        HAS_DXH=dxh is not None,
        HAS_PARTNER=partner is not None,
        BLOCK_M=bm,
        BLOCK_D=bd,
        num_warps=4 if bd <= 256 else 8,
    )
    return dx


def pair_normalize_backward(x, rn, dxh, partner, rn_p, g_p, scale, dscale=None):
    """(dL/dx, dL/dpartner, dL/dscale or None) in one launch, for a positive pos_i = scale · x̂_i·p̂_i with
    upstream gradient g_p (the partner's rows get only that term): dxh as in `row_normalize_backward`; with
    `dscale` (the tiles' fp32 scalar, added to in place) also Σ_i g_p_i · x̂_i·p̂_i = Σ_i g_p_i · ∂pos_i/∂scale,
    from the rows (not as pos_i/scale: that is 0/0 at scale 0)."""
    m, d = x.shape
    dx = empty(x.shape, dtype=x.dtype, device=x.device)
    dp = empty(partner.shape, dtype=partner.dtype, device=x.device)
    splits, stride_dxs, stride_dxh = _split_strides(dxh)
    bm, bd = _normalize_rows(d)
    want_dscale = dscale is not None
    _pair_normalize_bwd_kernel[(cdiv(m, max(1, bm // 2)),)](
        x,
        rn,
        dxh,
        partner,
        rn_p,
        g_p,
        scale,
        dx,
        dp,
        dscale if want_dscale else rn,
        m,
        d,
        splits,
        x.stride(0),
        stride_dxs,
        stride_dxh,
        partner.stride(0),
        dx.stride(0),
        dp.stride(0),
        WANT_DSCALE=want_dscale,
        BLOCK_M=max(1, bm // 2),
        BLOCK_D=bd,
        num_warps=4 if bd <= 256 else 8,
    )
    return dx, dp, dscale


def fp32_operand_dtype() -> torch.dtype:
    """Tile operands of fp32 inputs: fp16 unit rows on a GPU (fp16 keeps TF32's 11-bit significand, |x̂| <= 1
    is far inside its range, and its tensor cores run at twice TF32's rate); fp32 under the interpreter,
    whose dots are exact (the CI tolerance)."""
    return torch.float32 if interpreting() else torch.float16


def _unit_rows(x: torch.Tensor, rn: torch.Tensor) -> torch.Tensor:
    """x̂ = x / ‖x‖ in the fp32 operand dtype, [M, D] contiguous."""
    m, d = x.shape
    xh = empty((m, d), dtype=fp32_operand_dtype(), device=x.device)
    _unit_rows_kernel[(cdiv(m, 32),)](
        x, rn, xh, m, d, x.stride(0), BLOCK_M=32, BLOCK_D=min(next_pow2(d), 128), num_warps=1 if interpreting() else 4
    )
    return xh


def tile_operands(r, c, rn_r, rn_c):
    """What `similarity_lse` and `similarity_lse_rows_grad` take as (r, c, rn_r, rn_c): the inputs themselves,
    except fp32 inputs with a 16-bit operand dtype, which become unit rows (inverse norms 1). One matrix
    stays one (the symmetric schedules). Made once per pass and shared by its launches."""
    if r.dtype != torch.float32 or fp32_operand_dtype() == torch.float32:
        return r, c, rn_r, rn_c
    rh = _unit_rows(r, rn_r)
    ones = torch.ones_like(rn_r)
    if c is r and rn_c is rn_r:
        return rh, rh, ones, ones
    return rh, _unit_rows(c, rn_c), ones, torch.ones_like(rn_c)


def _triangle_span(n_rb: int, device: torch.device) -> int:
    """Column blocks per program of the symmetric forward: the n_rb²/2 blocks make about TRIANGLE_WAVES waves,
    and every row block gets at least ~8 programs (balance)."""
    return max(1, min(n_rb // 8, round(n_rb * n_rb / (2 * TRIANGLE_WAVES * num_sms(device)))))


def _symmetric(r, c, rn_r, rn_c, maps) -> bool:
    """Rows and columns are one matrix with one index map, and the pairing π is an involution (NT-Xent)."""
    return (
        r is c
        and rn_r is rn_c
        and maps.row_off == maps.col_off
        and maps.row_split == maps.col_split
        and maps.row_shift == maps.col_shift
        and (2 * maps.pos_shift) % maps.pos_period == 0
    )


def similarity_lse(r, c, rn_r, rn_c, scale, maps, *, exclude_self, want_pos, col_stats, bounded):
    """Forward statistics (lse_r [M], lse_c [Nb] or empty, pos [M] or empty), all fp32, of rows r against
    columns c with their inverse norms. `maps`: the `sslfast.ops.infonce.IndexMaps` (passed to the kernels as
    its eight ints, in field order); `bounded`: |scale| <= 64 is known (plain-sum statistics). A symmetric,
    bounded problem computes only the tiles on and right of the diagonal (half the FLOPs) with atomic sums,
    unless torch.use_deterministic_algorithms is on; its empty lse_c is a view of its statistics' buffer. r, c,
    rn_r, rn_c come from `tile_operands`."""
    m, d = r.shape
    nb = c.shape[0]
    cfg = _tiles(d, "fwd", bounded)
    n_rb = cdiv(m, cfg["BLOCK_M"])
    if (
        bounded
        and not col_stats
        and _symmetric(r, c, rn_r, rn_c, maps)
        and not torch.are_deterministic_algorithms_enabled()
    ):
        q = _triangle_span(n_rb, r.device)
        triangle, grid, per = True, (n_rb, cdiv(n_rb, q)), q * cfg["BLOCK_M"]
        # one "split" of each, and the empty lse_c, from one allocation (pos, an output, at offset 0)
        pos, row_l, no_cols = torch.zeros((2 * m,), dtype=torch.float32, device=r.device).split_with_sizes((m, m, 0))
        row_m = row_l  # unused: plain sums
    else:
        splits, per = _splits(n_rb, nb, cfg["BLOCK_N"], r.device, waves=8)
        triangle, grid = False, (n_rb, splits)
        # the partials [splits, M] from one allocation: sums, running maxima (online max only), and first the
        # positives (one split's pos[0], an output, then starts at offset 0)
        n_parts = 1 + (not bounded) + want_pos
        if n_parts == 1:
            parts = (empty((splits, m), dtype=torch.float32, device=r.device),)
        else:
            parts = empty((n_parts, splits, m), dtype=torch.float32, device=r.device).unbind()
        row_l = parts[-1]
        row_m = row_l if bounded else parts[-2]  # unused with plain sums
        pos = parts[0] if want_pos else row_l  # unused without positives
    col_l = torch.zeros((nb,), dtype=torch.float32, device=r.device) if col_stats and bounded else row_m
    col_acc = torch.zeros((nb,), dtype=torch.float64, device=r.device) if col_stats and not bounded else row_m
    _lse_fwd_kernel[grid](
        r,
        c,
        rn_r,
        rn_c,
        scale,
        row_m,
        row_l,
        pos,
        col_l,
        col_acc,
        m,
        nb,
        d,
        r.stride(0),
        c.stride(0),
        per,
        *maps,
        EXCLUDE_SELF=exclude_self,
        WANT_POS=want_pos,
        COL_STATS=col_stats,
        BOUNDED=bounded,
        TRIANGLE=triangle,
        UPCAST=upcast_dots(),
        **cfg,
    )
    if triangle:  # one split of plain sums, nothing to merge: one log, no launch
        return torch.log(row_l), no_cols, pos if want_pos else row_l.new_empty(0)
    lse_r, lse_c, pos = merge_splits(
        row_m, row_l, pos, col_l, col_acc, scale, nb, want_pos=want_pos, col_stats=col_stats, bounded=bounded
    )
    if col_stats and not bounded:
        _recompute_underflowed_columns(
            r, c, rn_r, rn_c, scale, maps, col_acc, lse_c, cfg=cfg, exclude_self=exclude_self, want_pos=want_pos
        )
    return lse_r, lse_c, pos


def _recompute_underflowed_columns(r, c, rn_r, rn_c, scale, maps, col_acc, lse_c, *, cfg, exclude_self, want_pos):
    """lse_c[j] of the columns whose fp64 sums underflowed (`MIN_COL_ACC_EXP`: a largest logit more than ~665
    under |scale|, so never at |scale| < 333), in place: the forward with the roles swapped (columns of S as
    rows, every row of r as columns, one split, online max; π an involution, as the backward's swapped launch
    assumes). A row block without such a column skips its sweep, so the fast path pays one near-empty launch."""
    nb, d = c.shape
    m = r.shape[0]
    _lse_redo_kernel[(cdiv(nb, cfg["BLOCK_M"]),)](
        c,
        r,
        rn_c,
        rn_r,
        scale,
        lse_c,
        col_acc,
        nb,
        m,
        d,
        c.stride(0),
        r.stride(0),
        *maps.swapped(),
        EXCLUDE_SELF=exclude_self,
        WANT_POS=want_pos,
        UPCAST=upcast_dots(),
        **cfg,
    )


def merge_splits(row_m, row_l, pos, col_l, col_acc, scale, nb: int, *, want_pos, col_stats, bounded):
    """(lse_r [M], lse_c [Nb] or empty, pos [M] or empty), fp32, from the forward's partials: row_m, row_l,
    pos [splits, M] (row_m only read when not `bounded`), column sums col_l (fp32, bounded) or col_acc
    (fp64 of e^(s − scale)), in one launch (plain sums of one split: an ATen log, cheaper on the host than a
    launch). Unused inputs may be any tensor."""
    splits, m = row_l.shape
    if splits == 1 and bounded and not col_stats:  # nothing to merge (NT-Xent's triangle): one log, no launch
        return torch.log(row_l[0]), row_l.new_empty(0), pos[0] if want_pos else row_l.new_empty(0)
    f32 = dict(dtype=torch.float32, device=row_l.device)
    lse_r, pos_out = empty((m,), **f32), empty((m if want_pos else 0,), **f32)
    lse_c = empty((nb if col_stats else 0,), **f32)
    block_s = next_pow2(splits)
    block = max(1, (256 if interpreting() else 1024) // block_s)  # ≤ 1024 partials a program (8 per thread)
    _merge_splits_kernel[(cdiv(max(m, lse_c.numel()), block),)](
        row_m,
        row_l,
        pos,
        col_l,
        col_acc,
        scale,
        lse_r,
        pos_out if want_pos else lse_r,
        lse_c if col_stats else lse_r,
        m,
        nb,
        splits,
        WANT_POS=want_pos,
        COL_STATS=col_stats,
        BOUNDED=bounded,
        BLOCK=block,
        BLOCK_S=block_s,
        num_warps=4,
    )
    return lse_r, lse_c, pos_out


def loss_epilogue(lse_r, lse_c, pos):
    """(loss, ∂loss/∂lse_r, ∂loss/∂lse_c or None, ∂loss/∂pos) of `ops._torch.infonce.contrastive_loss` for an
    upstream 1, in one launch instead of a dozen elementwise ops and reductions (all fp32 [M]; with column
    statistics M = Nb: CLIP is square)."""
    m, cols = lse_r.shape[0], lse_c.numel() > 0
    f32 = dict(dtype=torch.float32, device=lse_r.device)
    loss = empty((), **f32)
    g_r, g_p, *g_c = empty(((3 if cols else 2) * m,), **f32).split_with_sizes([m] * (3 if cols else 2))
    g_c = g_c[0] if cols else None
    _loss_epilogue_kernel[(1,)](
        lse_r,
        lse_c if cols else lse_r,
        pos,
        loss,
        g_r,
        g_r if g_c is None else g_c,
        g_p,
        m,
        (0.5 if cols else 1.0) / m,
        COLS=cols,
        BLOCK=64 if interpreting() else 1024,
        num_warps=4,
    )
    return loss, g_r, g_c, g_p


def similarity_lse_rows_grad(
    r,
    c,
    rn_r,
    rn_c,
    scale,
    maps,
    *,
    exclude_self,
    bounded,
    lse_r=None,
    g_r=None,
    lse_c=None,
    g_c=None,
    g_pr=None,
    g_pc=None,
    want_dscale=False,
):
    """dL/dr̂ (fp32, w.r.t. the unit rows r/‖r‖) and dL/dscale (fp32 scalar or None). Terms whose tensors are
    None are left out of G (see the module doc). r, c, rn_r, rn_c come from `tile_operands`. dL/dr̂ is [M, D],
    or with many column splits their [S, M, D] partials, summed by the row-normalization backward that takes
    it (`row_normalize_backward`, `pair_normalize_backward`): no extra pass over S·M·D values."""
    m, d = r.shape
    nb = c.shape[0]
    cfg = _tiles(d, "bwd", bounded)
    n_rb = cdiv(m, cfg["BLOCK_M"])
    splits, per = _splits(n_rb, nb, cfg["BLOCK_N"], r.device, waves=2)
    atomic = 1 < splits <= MAX_ATOMIC_SPLITS
    if atomic:
        dr = torch.zeros((m, d), dtype=torch.float32, device=r.device)
    else:  # one split, or one [M, D] slice per split (summed below)
        dr = empty((m, d) if splits == 1 else (splits, m, d), dtype=torch.float32, device=r.device)
    dscale = torch.zeros((), dtype=torch.float32, device=r.device) if want_dscale else dr
    dummy = dr
    _lse_bwd_kernel[(n_rb, splits, cdiv(d, cfg["BLOCK_DO"]))](
        r,
        c,
        rn_r,
        rn_c,
        scale,
        dummy if lse_r is None else lse_r,
        dummy if g_r is None else g_r,
        dummy if lse_c is None else lse_c,
        dummy if g_c is None else g_c,
        dummy if g_pr is None else g_pr,
        dummy if g_pc is None else g_pc,
        dr,
        dscale,
        m,
        nb,
        d,
        r.stride(0),
        c.stride(0),
        d,
        m * d if dr.dim() == 3 else 0,
        per,
        float(max(m, nb)),
        *maps,
        EXCLUDE_SELF=exclude_self,
        ROW_TERM=g_r is not None,
        COL_TERM=g_c is not None,
        POS_ROW=g_pr is not None,
        POS_COL=g_pc is not None,
        WANT_DSCALE=want_dscale,
        ATOMIC=atomic,
        BOUNDED=bounded,
        UPCAST=upcast_dots(),
        **cfg,
    )
    return dr, (dscale if want_dscale else None)
