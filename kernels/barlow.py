"""Barlow Twins and VICReg without the D x D matrix: kernels and launchers behind `sslfast::redundancy_loss`.

Notation: Z1, Z2 [M, D] are the batch (all-gathered across ranks with `gather_distributed`), this rank's
rows are R = [r0, r0 + n) (every row in one process), W ranks.

Per-feature statistics, one pass per column strip in fp32 (Chan's merge of per-chunk mean / M2, each column
shifted by its first value so that a constant column is exactly zero once centered):

    Barlow   ẑ = (z − μ) / sqrt(σ²_biased + eps)            as BatchNorm1d(affine=False) in training
    VICReg   x̃ = z − μ,  var = Σ_m x̃² / (M − 1),  std = sqrt(var + eps)      as the official torch.var

The GEMM operands ("ops", [2, M, D]) are ẑ, or σ·x̃ for VICReg with one scale per branch,
σ = 1 / sqrt(mean_k var_k), so that |op| <= sqrt((M − 1)·D) and every Gram entry over D is below M.

Barlow Twins, C = Ẑ1ᵀẐ2 / M, L = Σ_k (1 − C_kk)² + λ Σ_{k≠l} C_kl².
  Gram path (chosen when M < D). A = Ẑ1Ẑ1ᵀ, B = Ẑ2Ẑ2ᵀ are M x M and ‖C‖²_F = ⟨A, B⟩ / M², so
      L = Σ_k (1 − d_k)² + λ (⟨A, B⟩ / M² − Σ_k d'_k²)
  with d_k = C_kk from fp32 column dots of the exact ẑ, and d'_k the same dot of the *rounded* operands,
  so that ⟨A, B⟩/M² − Σ d'² is exactly the off-diagonal sum of the C that the GEMMs saw (no cancellation
  error from mixing the two). Backward, with b = diag B, f'_k = −2(1 − d_k) − 2λ d'_k:
      ∂L/∂Ẑ1 = (2λ/M²)(B_off Ẑ1 + b ∘ Ẑ1) + Ẑ2 diag(f') / M          (1 ↔ 2 with A)
  The GEMM sees only B_off (stored as B_off / D in the operand dtype); the dominant diagonal term b ∘ Ẑ1
  is applied in fp32. Then the standardization backward, two passes over each column strip:
      ∂L/∂z = rstd · (g − mean_m g − ẑ · mean_m(g ẑ)).
  Tiled path (M >= D). C tile by tile (reduction over M on tensor cores), Σ_{k≠l} C_kl² reduced in the
  epilogue and never stored. Backward ∂L/∂Ẑ1 = (2λ/M) Ẑ2 C_offᵀ − 2(1 − d) ∘ Ẑ2 / M, with C recomputed
  from the operands P rows at a time (a P x D slab, P·D <= SLAB_ELEMS), never as a D x D buffer.

VICReg: sim·‖z1 − z2‖²/(N·D) + std·Σ_branches mean_k relu(1 − std_k) / 2 + cov·Σ_branches Σ_{k≠l} Cov_kl² / D,
Cov = X̃ᵀX̃ / (M − 1). The same identity gives Σ_{k≠l} Cov_kl² = ‖K‖²_F / (M − 1)² − Σ_k var'_k² with the
M x M Gram K = X̃X̃ᵀ, and ∂/∂X̃ of ‖K‖²_F = 4 (K_off X̃ + k ∘ X̃), k = diag K; the centering backward is
g − mean_m g, and the invariance gradient is added after it.

Distributed. Rank r reduces only its rows of the Gram matrices, S_r = Σ_{i∈R, j} A_ij B_ij (or K_ij²), and
its own invariance rows, and returns L_r = base + W·u_r, where `base` (diagonal, variance and subtraction
terms) is identical on every rank and Σ_r u_r is the rest of L, so Σ_r L_r = W·L. The all-gather's backward
sums the ranks' gradients and DDP divides by W: every parameter gets exactly ∂L/∂θ of the single-process
loss on the concatenated batch. ∂S_r/∂Ẑ1 has both sides of the rank's Gram rows,
[m∈R](B_off[R,:] Ẑ1)_m + (B_off[R,:]ᵀ Ẑ1[R])_m + 2 b_m ẑ1_m [m∈R] (one GEMM, doubled, when R is everything).
u_r comes back too, so that the caller reports the global value L = L_r + Σ_r u_r − W·u_r.

GPU plan. The O(M²D) work is on tensor cores with fp32 accumulation; the O(MD) work is fused into Triton
streaming kernels. Forward: statistics + operands + column dots in one kernel (two for VICReg); then, for
one process and a batch whose upper 128 x 128 tiles make two waves (M >= ~3000 on an H100), one Triton
kernel computes both Gram matrices on the upper tiles only (half the FLOPs of two GEMMs) with the epilogue
fused (⟨A, B⟩ partial sums, the scaled off-diagonal partner Gram and its mirror for the backward, the
diagonal); otherwise two cuBLAS Gram GEMMs (torch.bmm with fp32 output; split-K for small M) feed a Triton
epilogue kernel; a one-program kernel finalizes the loss (folded into the epilogue for small M). Backward:
one cuBLAS GEMM (the partner Gram times the operands) and one Triton kernel for the diagonal, cross and
standardization terms. Operands are bf16 for bf16 inputs (the backward product then stays bf16) and fp16
for fp16 and fp32 inputs (product in fp32): the operands are bounded (above), and fp16 carries TF32's
11-bit significand at twice TF32's tensor-core rate, so fp32 inputs get TF32-level accuracy (the fp32 GPU
tolerance). Under the interpreter fp32 inputs keep fp32 operands (exact, as the CI tolerance requires).

Floors (Gram path, forward + backward, bf16, H100: 781 TFLOP/s, 3.0 TB/s). Executed GEMM FLOPs are 8·N²·D
(6·N²·D with the symmetric forward); the traffic floor is 4·N·D·2 bytes (read z1, z2, write both
gradients). The fused kernels move about 44 bytes per (row, feature) position for both views together
(statistics pass 12, operands through the GEMMs 12, standardization backward 20):
    N=2048, D=8192:  2.75e11 FLOP -> 0.35 ms;  floor 134 MB -> 0.045 ms;  ~0.74 GB moved -> ~0.25 ms
    N=1024, D=16384: 1.37e11 FLOP -> 0.18 ms;  floor 134 MB -> 0.045 ms;  ~0.74 GB moved -> ~0.25 ms
    N=256,  D=8192:  4.3e9 FLOP -> 6 µs;       floor 16.8 MB -> 6 µs;  host-bound: 5 launches (3 Triton,
                     2 cuBLAS) and one autograd.Function, ~30 µs of GPU work
The tiled path costs 2·N·D² FLOPs forward and 8·N·D² backward (each C slab is computed twice, once per
branch, instead of being stored).
"""

from __future__ import annotations

import functools
import warnings

import torch
import triton
import triton.language as tl

from .._backend import interpreting
from ._common import cdiv, empty, num_sms, upcast_dots
from ._launch import cached_launch

BARLOW, VICREG = 0, 1
NCOL = 9  # rows of `col` [NCOL, D], fp32:
#   0, 1  mean of z1, z2
#   2, 3  Barlow: rstd = 1/sqrt(σ²_biased + eps);  VICReg: std = sqrt(var_unbiased + eps)
#   4, 5  Barlow: d (exact column dot / M), d' (rounded operands' column dot / M);  VICReg: var1, var2 (unbiased)
#   6, 7  q = Σ_m op² per column (rounded operands)
#   8     VICReg: Σ_{m∈R} (z1 − z2)² per column
SLAB_ELEMS = 1 << 22  # tiled backward: cross-correlation entries held at once (P x D slab)
# Gram path forward in one process: "auto" runs the Triton symmetric dual-Gram kernel when its upper tiles
# make two waves or more (M >= ~3000 on an H100, `symmetric_gram_forward`) and two cuBLAS Gram GEMMs + the
# epilogue kernel otherwise; "triton" / "cublas" force one (tests, benchmarks).
GRAM_FORWARD = "auto"
FP16_MAX_ROWS = 65504  # Gram entries / D are bounded by M − 1: fp16 operands up to this many rows


def operand_dtype(dtype: torch.dtype, rows: int, algorithm: str) -> torch.dtype:
    """dtype of the GEMM operands: bf16 for bf16; fp16 for fp16 and fp32 (fp32 stays fp32 under the
    interpreter, where dots are exact); bf16 when a Gram path batch is too large for fp16's range."""
    if dtype == torch.float32 and interpreting():
        return torch.float32
    if dtype == torch.bfloat16 or (algorithm == "gram" and rows > FP16_MAX_ROWS):
        return torch.bfloat16
    return torch.float16


_OUT_DTYPE_MM = [True]  # torch >= 2.8 on CUDA: 16-bit cuBLAS GEMMs with an fp32 result


def _bmm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """fp32 result of a (batched) matrix product of 16-bit (or fp32) operands, fp32 accumulation."""
    if a.is_cuda and a.dtype in (torch.float16, torch.bfloat16) and _OUT_DTYPE_MM[0]:
        mm = torch.mm if a.dim() == 2 else torch.bmm
        try:
            return mm(a, b, out_dtype=torch.float32)  # cuBLAS, fp32 accumulation and output
        except (TypeError, RuntimeError, NotImplementedError) as err:  # older torch: exact but slow fallback
            _OUT_DTYPE_MM[0] = False
            warnings.warn(
                f"sslfast: torch.{mm.__name__}(out_dtype=float32) unavailable ({err}); "
                "Barlow/VICReg GEMMs fall back to fp32 operands"
            )
    if a.dtype != torch.float32 or b.dtype != torch.float32:
        a, b = a.float(), b.float()
    return torch.mm(a, b) if a.dim() == 2 else torch.bmm(a, b)  # not matmul: its batched views cost host calls


# ---------------------------------------------------------------------------------------------- kernels
# Triton 3.6's interpreter converts fp32 -> bf16 by truncation (a systematic −2⁻⁹ relative bias; its
# fp_downcast_rounding="rtne" is not right either), while GPUs round to nearest even. `_cast` does the
# rounding with integer ops when interpreted, so CI sees the GPU's numerics.
_ROUND_BF16 = tl.constexpr(interpreting())


@triton.jit
def _cast(x, dtype: tl.constexpr):
    """fp32 x to `dtype`, rounding to nearest even."""
    if _ROUND_BF16 and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


@triton.jit
def _load_cols(Z, rows, rmask, cols, cmask, stride):
    mask = rmask[:, None] & cmask[None, :]
    x = tl.load(Z + rows.to(tl.int64)[:, None] * stride + cols[None, :], mask=mask, other=0.0)
    return x.to(tl.float32), mask


@triton.jit
def _chan_merge(mean, m2, cnt, y, mask, nb):
    """Merges a chunk (shifted values y, `nb` valid rows) into running (mean, M2) over `cnt` rows."""
    mb = tl.sum(y, axis=0) / nb
    dev = tl.where(mask, y - mb[None, :], 0.0)
    m2b = tl.sum(dev * dev, axis=0)
    tot = cnt + nb
    delta = mb - mean
    mean = mean + delta * (nb / tot)
    m2 = m2 + m2b + delta * delta * (cnt * nb / tot)
    return mean, m2


@cached_launch
@triton.jit
def _columns_kernel(
    Z1,
    Z2,
    COL,
    SCAL,
    OPS,
    M,
    D,
    stride1,
    stride2,
    r0,
    n_rows,
    eps,
    KIND: tl.constexpr,
    STATS: tl.constexpr,
    OPERANDS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # Grid: one program per BLOCK_D-wide column strip, walking all M rows in BLOCK_M chunks: pass 1 the
    # statistics (STATS), pass 2 the operands and the column dots (OPERANDS). Barlow runs both in one
    # launch; VICReg splits them because its operand scale needs every column's variance first.
    pid = tl.program_id(0)
    cols = pid * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    rr = tl.arange(0, BLOCK_M)
    k1 = tl.load(Z1 + cols, mask=cmask, other=0.0).to(tl.float32)  # shifts: row 0
    k2 = tl.load(Z2 + cols, mask=cmask, other=0.0).to(tl.float32)
    fM = M * 1.0
    if STATS:
        mean1 = tl.zeros((BLOCK_D,), dtype=tl.float32)
        mean2 = tl.zeros((BLOCK_D,), dtype=tl.float32)
        m2_1 = tl.zeros((BLOCK_D,), dtype=tl.float32)
        m2_2 = tl.zeros((BLOCK_D,), dtype=tl.float32)
        esum = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for m0 in range(0, M, BLOCK_M):
            rows = m0 + rr
            rmask = rows < M
            x1, mask = _load_cols(Z1, rows, rmask, cols, cmask, stride1)
            x2, _ = _load_cols(Z2, rows, rmask, cols, cmask, stride2)
            cnt = m0 * 1.0  # rows merged so far
            nb = tl.minimum(M - m0, BLOCK_M).to(tl.float32)
            mean1, m2_1 = _chan_merge(mean1, m2_1, cnt, tl.where(mask, x1 - k1[None, :], 0.0), mask, nb)
            mean2, m2_2 = _chan_merge(mean2, m2_2, cnt, tl.where(mask, x2 - k2[None, :], 0.0), mask, nb)
            if KIND == 1:
                mine = mask & ((rows >= r0) & (rows < r0 + n_rows))[:, None]
                diff = tl.where(mine, x1 - x2, 0.0)
                esum += tl.sum(diff * diff, axis=0)
        tl.store(COL + cols, k1 + mean1, mask=cmask)
        tl.store(COL + D + cols, k2 + mean2, mask=cmask)
        if KIND == 0:
            s1 = 1.0 / tl.sqrt(m2_1 / fM + eps)
            s2 = 1.0 / tl.sqrt(m2_2 / fM + eps)
            tl.store(COL + 8 * D + cols, esum, mask=cmask)  # unused by Barlow: zeros, not garbage
        else:
            var1 = m2_1 / (fM - 1.0)
            var2 = m2_2 / (fM - 1.0)
            tl.store(COL + 2 * D + cols, tl.sqrt(var1 + eps), mask=cmask)
            tl.store(COL + 3 * D + cols, tl.sqrt(var2 + eps), mask=cmask)
            tl.store(COL + 4 * D + cols, var1, mask=cmask)
            tl.store(COL + 5 * D + cols, var2, mask=cmask)
            tl.store(COL + 8 * D + cols, esum, mask=cmask)
            s1 = tl.zeros((BLOCK_D,), dtype=tl.float32)
            s2 = tl.zeros((BLOCK_D,), dtype=tl.float32)
    else:
        mean1 = tl.load(COL + cols, mask=cmask, other=0.0) - k1
        mean2 = tl.load(COL + D + cols, mask=cmask, other=0.0) - k2
        s1 = tl.zeros((BLOCK_D,), dtype=tl.float32)
        s2 = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if OPERANDS:
        if KIND == 0:
            if STATS:
                tl.store(COL + 2 * D + cols, s1, mask=cmask)
                tl.store(COL + 3 * D + cols, s2, mask=cmask)
            else:
                s1 = tl.load(COL + 2 * D + cols, mask=cmask, other=0.0)
                s2 = tl.load(COL + 3 * D + cols, mask=cmask, other=0.0)
            sig1 = tl.sum(tl.zeros((BLOCK_K,), dtype=tl.float32), axis=0) + 1.0
            sig2 = sig1
        else:
            # σ = 1/sqrt(mean_k var_k): every program reduces the (complete) variance rows itself.
            v1 = tl.zeros((BLOCK_K,), dtype=tl.float32)
            v2 = tl.zeros((BLOCK_K,), dtype=tl.float32)
            for k0 in range(0, D, BLOCK_K):
                kk = k0 + tl.arange(0, BLOCK_K)
                v1 += tl.load(COL + 4 * D + kk, mask=kk < D, other=0.0)
                v2 += tl.load(COL + 5 * D + kk, mask=kk < D, other=0.0)
            sig1 = 1.0 / tl.sqrt(tl.sum(v1, axis=0) / D + 1e-30)
            sig2 = 1.0 / tl.sqrt(tl.sum(v2, axis=0) / D + 1e-30)
            s1 = tl.zeros((BLOCK_D,), dtype=tl.float32) + sig1
            s2 = tl.zeros((BLOCK_D,), dtype=tl.float32) + sig2
        if pid == 0:
            tl.store(SCAL, sig1)
            tl.store(SCAL + 1, sig2)
        q1 = tl.zeros((BLOCK_D,), dtype=tl.float32)
        q2 = tl.zeros((BLOCK_D,), dtype=tl.float32)
        dx = tl.zeros((BLOCK_D,), dtype=tl.float32)
        dr = tl.zeros((BLOCK_D,), dtype=tl.float32)
        OPS2 = OPS + M.to(tl.int64) * D
        n_chunks = tl.cdiv(M, BLOCK_M)
        for i in range(0, n_chunks):  # rows in reverse: the strip's last chunks may still be in L2
            rows = (n_chunks - 1 - i) * BLOCK_M + rr
            rmask = rows < M
            x1, mask = _load_cols(Z1, rows, rmask, cols, cmask, stride1)
            x2, _ = _load_cols(Z2, rows, rmask, cols, cmask, stride2)
            o1 = tl.where(mask, ((x1 - k1[None, :]) - mean1[None, :]) * s1[None, :], 0.0)
            o2 = tl.where(mask, ((x2 - k2[None, :]) - mean2[None, :]) * s2[None, :], 0.0)
            r1 = _cast(o1, OPS.dtype.element_ty)
            r2 = _cast(o2, OPS.dtype.element_ty)
            offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
            tl.store(OPS + offs, r1, mask=mask)
            tl.store(OPS2 + offs, r2, mask=mask)
            f1 = r1.to(tl.float32)
            f2 = r2.to(tl.float32)
            q1 += tl.sum(f1 * f1, axis=0)
            q2 += tl.sum(f2 * f2, axis=0)
            if KIND == 0:
                dx += tl.sum(o1 * o2, axis=0)
                dr += tl.sum(f1 * f2, axis=0)
        tl.store(COL + 6 * D + cols, q1, mask=cmask)
        tl.store(COL + 7 * D + cols, q2, mask=cmask)
        if KIND == 0:
            tl.store(COL + 4 * D + cols, dx / fM, mask=cmask)
            tl.store(COL + 5 * D + cols, dr / fM, mask=cmask)


@triton.jit
def _loss_epilogue(
    s_a,
    s_b,
    COL,
    SCAL,
    LOSS,
    U,
    M,
    D,
    n_rows,
    W,
    c0,
    c1,
    c2,
    KIND: tl.constexpr,
    GRAM: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Stores L_r and u_r from the reduced Gram / tile sums s_a, s_b (operand units) and the rows of COL."""
    fM = M * 1.0
    fD = D * 1.0
    a0 = tl.zeros((BLOCK_K,), dtype=tl.float32)
    a1 = tl.zeros((BLOCK_K,), dtype=tl.float32)
    a2 = tl.zeros((BLOCK_K,), dtype=tl.float32)
    a3 = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        km = kk < D
        if KIND == 0:
            dd = 1.0 - tl.load(COL + 4 * D + kk, mask=km, other=1.0)
            dr = tl.load(COL + 5 * D + kk, mask=km, other=0.0)
            a0 += dd * dd
            a1 += dr * dr
        else:
            a0 += tl.load(COL + 8 * D + kk, mask=km, other=0.0)
            h1 = 1.0 - tl.load(COL + 2 * D + kk, mask=km, other=1.0)
            h2 = 1.0 - tl.load(COL + 3 * D + kk, mask=km, other=1.0)
            a1 += tl.where(h1 > 0.0, h1, 0.0) + tl.where(h2 > 0.0, h2, 0.0) + 0.0 * (h1 + h2)  # NaN-keeping relu
            q1 = tl.load(COL + 6 * D + kk, mask=km, other=0.0)
            q2 = tl.load(COL + 7 * D + kk, mask=km, other=0.0)
            a2 += q1 * q1
            a3 += q2 * q2
    t0 = tl.sum(a0, axis=0)
    t1 = tl.sum(a1, axis=0)
    if KIND == 0:
        if GRAM:
            loss = t0 + c0 * (W * s_a / (fM * fM) - t1)
            u = c0 * s_a / (fM * fM)
        else:
            loss = t0 + c0 * s_a / (fM * fM)
            u = 0.0 * s_a
    else:
        # operand units -> covariance units: Cov = Cov_ops / σ², so squares carry 1/σ⁴
        i1 = 1.0 / tl.load(SCAL)
        i2 = 1.0 / tl.load(SCAL + 1)
        f1 = (i1 * i1) / (fM - 1.0)
        f2 = (i2 * i2) / (fM - 1.0)
        if GRAM:
            cov = (((W * s_a - tl.sum(a2, axis=0)) * f1) * f1 + ((W * s_b - tl.sum(a3, axis=0)) * f2) * f2) / fD
            u = c0 * t0 / (fM * fD) + c2 * ((s_a * f1) * f1 + (s_b * f2) * f2) / fD
        else:
            cov = ((s_a * f1) * f1 + (s_b * f2) * f2) / fD
            u = c0 * t0 / (fM * fD)
        loss = c0 * t0 / (n_rows * fD) + c1 * t1 / (2.0 * fD) + c2 * cov
    tl.store(LOSS, loss)
    tl.store(U, u)


@cached_launch
@triton.jit
def _gram_epilogue_kernel(
    G,
    P,
    PD,
    PART,
    COL,
    SCAL,
    LOSS,
    U,
    n_rows,
    M,
    D,
    r0,
    inv_d,
    W,
    c0,
    c1,
    c2,
    n_tiles,
    tiles_c,
    nprog,
    KIND: tl.constexpr,
    FINALIZE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # Programs stride over the [BLOCK_R, BLOCK_C] tiles of this rank's Gram rows G [2, n, M] (fp32): partial
    # ⟨G0, G1⟩ (Barlow) or ‖G0‖², ‖G1‖² (VICReg); the partner Gram for each branch's backward, scaled by 1/D
    # with its diagonal (column r0 + i of row i) zeroed, into P [2, n, M]; the diagonal itself into PD.
    # One program (FINALIZE) also writes the loss; otherwise the partials go to PART [nprog, 2].
    pid = tl.program_id(0)
    slot = n_rows.to(tl.int64) * M
    acc_a = tl.zeros((BLOCK_C,), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for t in range(pid, n_tiles, nprog):
        ti = t // tiles_c
        tj = t % tiles_c
        rows = ti * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tj * BLOCK_C + tl.arange(0, BLOCK_C)
        rm = rows < n_rows
        mask = rm[:, None] & (cols < M)[None, :]
        offs = rows.to(tl.int64)[:, None] * M + cols[None, :]
        g0 = tl.load(G + offs, mask=mask, other=0.0)
        g1 = tl.load(G + slot + offs, mask=mask, other=0.0)
        if KIND == 0:
            acc_a += tl.sum(g0 * g1, axis=0)
            p0 = g1  # ∂/∂Ẑ1 pairs with B = Ẑ2Ẑ2ᵀ, ∂/∂Ẑ2 with A
            p1 = g0
        else:
            acc_a += tl.sum(g0 * g0, axis=0)
            acc_b += tl.sum(g1 * g1, axis=0)
            p0 = g0
            p1 = g1
        diag = cols[None, :] == (rows + r0)[:, None]
        tl.store(P + offs, _cast(tl.where(diag, 0.0, p0 * inv_d), P.dtype.element_ty), mask=mask)
        tl.store(P + slot + offs, _cast(tl.where(diag, 0.0, p1 * inv_d), P.dtype.element_ty), mask=mask)
        here = rm & (rows + r0 >= tj * BLOCK_C) & (rows + r0 < tj * BLOCK_C + BLOCK_C)
        tl.store(PD + rows, tl.sum(tl.where(diag, p0, 0.0), axis=1), mask=here)
        tl.store(PD + n_rows + rows, tl.sum(tl.where(diag, p1, 0.0), axis=1), mask=here)
    s_a = tl.sum(acc_a, axis=0)
    s_b = tl.sum(acc_b, axis=0)
    if FINALIZE:
        _loss_epilogue(s_a, s_b, COL, SCAL, LOSS, U, M, D, n_rows, W, c0, c1, c2, KIND, True, BLOCK_K)
    else:
        tl.store(PART + 2 * pid, s_a)
        tl.store(PART + 2 * pid + 1, s_b)


@cached_launch
@triton.jit
def _sym_gram_kernel(
    OPS,
    P,
    PD,
    PART,
    M,
    D,
    inv_d,
    T,
    KIND: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
):
    # Grid (T, T), one process only: tile (i, j) of both Gram matrices A = Ẑ1Ẑ1ᵀ, B = Ẑ2Ẑ2ᵀ at once (two
    # accumulators, reduction over D on tensor cores). Only tiles with i <= j run their loop (A, B are
    # symmetric: half the forward FLOPs of two full GEMMs); the epilogue reduces ⟨A, B⟩ (or ‖A‖², ‖B‖²),
    # weight 2 off the diagonal, into PART, and writes the backward's scaled off-diagonal partner Gram
    # (tile and mirror) and its diagonal. No M x M fp32 matrix goes through memory.
    ti = tl.program_id(0)
    tj = tl.program_id(1)
    md = M.to(tl.int64) * D
    ri = ti * BLOCK_T + tl.arange(0, BLOCK_T)
    rj = tj * BLOCK_T + tl.arange(0, BLOCK_T)
    mi = ri < M
    mj = rj < M
    pi = ri.to(tl.int64)[:, None] * D
    pj = rj.to(tl.int64)[:, None] * D
    kk = tl.arange(0, BLOCK_K)
    acc_a = tl.zeros((BLOCK_T, BLOCK_T), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_T, BLOCK_T), dtype=tl.float32)
    k_end = tl.where(ti <= tj, D, 0)
    for k0 in range(0, k_end, BLOCK_K):
        ks = k0 + kk
        km = (ks < D)[None, :]
        a1 = tl.load(OPS + pi + ks[None, :], mask=mi[:, None] & km, other=0.0)
        b1 = tl.load(OPS + pj + ks[None, :], mask=mj[:, None] & km, other=0.0)
        a2 = tl.load(OPS + md + pi + ks[None, :], mask=mi[:, None] & km, other=0.0)
        b2 = tl.load(OPS + md + pj + ks[None, :], mask=mj[:, None] & km, other=0.0)
        if UPCAST:
            a1 = a1.to(tl.float32)
            b1 = b1.to(tl.float32)
            a2 = a2.to(tl.float32)
            b2 = b2.to(tl.float32)
        acc_a = tl.dot(a1, tl.trans(b1), acc_a)
        acc_b = tl.dot(a2, tl.trans(b2), acc_b)
    w = tl.where(ti < tj, 2.0, 1.0)
    if KIND == 0:
        s_a = tl.sum(tl.sum(acc_a * acc_b, axis=1), axis=0) * w
        s_b = s_a * 0.0
        p0 = acc_b  # ∂/∂Ẑ1 pairs with B, ∂/∂Ẑ2 with A
        p1 = acc_a
    else:
        s_a = tl.sum(tl.sum(acc_a * acc_a, axis=1), axis=0) * w
        s_b = tl.sum(tl.sum(acc_b * acc_b, axis=1), axis=0) * w
        p0 = acc_a
        p1 = acc_b
    tile = ti * T + tj
    tl.store(PART + 2 * tile, s_a)
    tl.store(PART + 2 * tile + 1, s_b)
    mm = M.to(tl.int64) * M
    upper = ti <= tj
    valid = mi[:, None] & mj[None, :] & upper
    diag = ri[:, None] == rj[None, :]
    offs = ri.to(tl.int64)[:, None] * M + rj[None, :]
    mirror = rj.to(tl.int64)[None, :] * M + ri[:, None]
    q0 = _cast(tl.where(diag, 0.0, p0 * inv_d), P.dtype.element_ty)
    q1 = _cast(tl.where(diag, 0.0, p1 * inv_d), P.dtype.element_ty)
    tl.store(P + offs, q0, mask=valid)
    tl.store(P + mm + offs, q1, mask=valid)
    tl.store(P + mirror, q0, mask=valid & (ti < tj))
    tl.store(P + mm + mirror, q1, mask=valid & (ti < tj))
    on_diag = mi & (ti == tj)
    tl.store(PD + ri, tl.sum(tl.where(diag, p0, 0.0), axis=1), mask=on_diag)
    tl.store(PD + M + ri, tl.sum(tl.where(diag, p1, 0.0), axis=1), mask=on_diag)


@cached_launch
@triton.jit
def _finalize_kernel(
    PART,
    n_part,
    COL,
    SCAL,
    LOSS,
    U,
    M,
    D,
    n_rows,
    W,
    c0,
    c1,
    c2,
    KIND: tl.constexpr,
    GRAM: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # One program: sums the partials PART [n_part, 2] in a fixed order (deterministic) and writes the loss.
    a = tl.zeros((BLOCK_P,), dtype=tl.float32)
    b = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for p0 in range(0, n_part, BLOCK_P):
        idx = p0 + tl.arange(0, BLOCK_P)
        a += tl.load(PART + 2 * idx, mask=idx < n_part, other=0.0)
        b += tl.load(PART + 2 * idx + 1, mask=idx < n_part, other=0.0)
    _loss_epilogue(
        tl.sum(a, axis=0), tl.sum(b, axis=0), COL, SCAL, LOSS, U, M, D, n_rows, W, c0, c1, c2, KIND, GRAM, BLOCK_K
    )


@cached_launch
@triton.jit
def _tiles_kernel(
    OPS, PART, M, D, T, SYM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr
):
    # Grid (T, T, jobs): tile (i, j) of the D x D matrix a[:, I]ᵀ b[:, J], reduced over the M rows in BLOCK_K
    # chunks on tensor cores; the epilogue keeps only Σ of the squared off-diagonal entries. Barlow: one job,
    # a = Ẑ1, b = Ẑ2, every tile. VICReg: job x is branch x, a = b = X̃x, upper tiles only (the lower ones are
    # their transposes: weight 2; the tiles below the diagonal run no iterations).
    ti = tl.program_id(0)
    tj = tl.program_id(1)
    job = tl.program_id(2)
    md = M.to(tl.int64) * D
    if SYM:
        A = OPS + job * md
        B = A
        m_end = tl.where(ti <= tj, M, 0)
        w = tl.where(ti < tj, 2.0, 1.0)
    else:
        A = OPS
        B = OPS + md
        m_end = M
        w = 1.0
    ci = ti * BLOCK_T + tl.arange(0, BLOCK_T)
    cj = tj * BLOCK_T + tl.arange(0, BLOCK_T)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_T, BLOCK_T), dtype=tl.float32)
    for m0 in range(0, m_end, BLOCK_K):
        rows = (m0 + rk).to(tl.int64)
        rm = (m0 + rk) < M
        a = tl.load(A + rows[:, None] * D + ci[None, :], mask=rm[:, None] & (ci < D)[None, :], other=0.0)
        b = tl.load(B + rows[:, None] * D + cj[None, :], mask=rm[:, None] & (cj < D)[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(tl.trans(a), b, acc)
    valid = (ci < D)[:, None] & (cj < D)[None, :] & (ci[:, None] != cj[None, :])
    total = tl.sum(tl.sum(tl.where(valid, acc * acc, 0.0), axis=1), axis=0) * w
    tile = ti * T + tj
    tl.store(PART + 2 * tile + job, total)
    if not SYM:
        tl.store(PART + 2 * tile + 1, total * 0.0)


@triton.jit
def _grad_chunk(
    Z1,
    Z2,
    H,
    PD,
    rows,
    cols,
    cmask,
    M,
    D,
    stride1,
    stride2,
    r0,
    n_rows,
    mean1,
    mean2,
    sc1,
    sc2,
    hs1,
    hs2,
    ps1,
    ps2,
    v1,
    v2,
    KIND: tl.constexpr,
    GRAM: tl.constexpr,
):
    """g = ∂L_r/∂(ẑ or x̃) on a [BLOCK_M, BLOCK_D] chunk of both branches, from the backward product H, the
    diagonal term (Gram path) and the per-column term v (Barlow: cross term on the other branch's ẑ;
    VICReg: own-branch term)."""
    rmask = rows < M
    x1, mask = _load_cols(Z1, rows, rmask, cols, cmask, stride1)
    x2, _ = _load_cols(Z2, rows, rmask, cols, cmask, stride2)
    xh1 = (x1 - mean1[None, :]) * sc1[None, :]
    xh2 = (x2 - mean2[None, :]) * sc2[None, :]
    offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
    g1 = hs1 * tl.load(H + offs, mask=mask, other=0.0).to(tl.float32)
    g2 = hs2 * tl.load(H + M.to(tl.int64) * D + offs, mask=mask, other=0.0).to(tl.float32)
    if GRAM:
        mine = rmask & (rows >= r0) & (rows < r0 + n_rows)
        p1 = tl.load(PD + rows - r0, mask=mine, other=0.0)
        p2 = tl.load(PD + n_rows + rows - r0, mask=mine, other=0.0)
        g1 += (ps1 * p1)[:, None] * xh1
        g2 += (ps2 * p2)[:, None] * xh2
    if KIND == 0:
        g1 += v1[None, :] * xh2
        g2 += v2[None, :] * xh1
    else:
        g1 += v1[None, :] * xh1
        g2 += v2[None, :] * xh2
    g1 = tl.where(mask, g1, 0.0)
    g2 = tl.where(mask, g2, 0.0)
    return g1, g2, xh1, xh2, x1, x2, mask


@cached_launch
@triton.jit
def _combine_kernel(
    Z1,
    Z2,
    H,
    PD,
    COL,
    SCAL,
    GRAD,
    DZ1,
    DZ2,
    M,
    D,
    stride1,
    stride2,
    r0,
    n_rows,
    W,
    c0,
    c1,
    c2,
    hfac,
    KIND: tl.constexpr,
    GRAM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # Grid: one program per column strip, both branches. Pass 1 reduces the column sums the standardization
    # (Barlow) or centering (VICReg) backward needs; pass 2 (rows in reverse, to reuse what pass 1 left in
    # L2) recomputes g and writes dz. Coefficients: see the module doc (H is in operand units).
    pid = tl.program_id(0)
    cols = pid * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    rr = tl.arange(0, BLOCK_M)
    fM = M * 1.0
    fD = D * 1.0
    go = tl.load(GRAD).to(tl.float32)
    mean1 = tl.load(COL + cols, mask=cmask, other=0.0)
    mean2 = tl.load(COL + D + cols, mask=cmask, other=0.0)
    c2a = tl.load(COL + 2 * D + cols, mask=cmask, other=1.0)
    c2b = tl.load(COL + 3 * D + cols, mask=cmask, other=1.0)
    if KIND == 0:
        sc1 = c2a
        sc2 = c2b
        dd = tl.load(COL + 4 * D + cols, mask=cmask, other=0.0)
        if GRAM:
            v1 = (-2.0 * (1.0 - dd) - 2.0 * c0 * tl.load(COL + 5 * D + cols, mask=cmask, other=0.0)) / fM
            hs1 = c0 * W * hfac * fD / (fM * fM)
            ps1 = 2.0 * c0 * W / (fM * fM)
        else:
            v1 = -2.0 * (1.0 - dd) / fM
            hs1 = 2.0 * c0 / fM
            ps1 = 0.0
        v2 = v1
        hs2 = hs1
        ps2 = ps1
    else:
        sc1 = tl.zeros((BLOCK_D,), dtype=tl.float32) + 1.0
        sc2 = sc1
        sig1 = tl.load(SCAL)
        sig2 = tl.load(SCAL + 1)
        # std hinge: ∂/∂x̃ of c1/(2D) Σ relu(1 − std) = −c1/(2D) [std < 1] x̃ / (std (M − 1))
        v1 = tl.where(c2a < 1.0, -c1 / (2.0 * fD) / (c2a * (fM - 1.0)), 0.0)
        v2 = tl.where(c2b < 1.0, -c1 / (2.0 * fD) / (c2b * (fM - 1.0)), 0.0)
        if GRAM:
            base = c2 / fD * W / ((fM - 1.0) * (fM - 1.0)) * 2.0
            hs1 = base * hfac * fD / (sig1 * sig1 * sig1)
            hs2 = base * hfac * fD / (sig2 * sig2 * sig2)
            ps1 = base * 2.0 / (sig1 * sig1)
            ps2 = base * 2.0 / (sig2 * sig2)
            # − c2/D Σ var'² with var' = q / (σ² (M − 1)): ∂/∂x̃ = −4 c2/D var' x̃ / (M − 1)
            q1 = tl.load(COL + 6 * D + cols, mask=cmask, other=0.0)
            q2 = tl.load(COL + 7 * D + cols, mask=cmask, other=0.0)
            v1 -= 4.0 * c2 / fD * (q1 / (sig1 * sig1 * (fM - 1.0))) / (fM - 1.0)
            v2 -= 4.0 * c2 / fD * (q2 / (sig2 * sig2 * (fM - 1.0))) / (fM - 1.0)
        else:
            hs1 = 4.0 * c2 / (fD * (fM - 1.0)) / (sig1 * sig1 * sig1)
            hs2 = 4.0 * c2 / (fD * (fM - 1.0)) / (sig2 * sig2 * sig2)
            ps1 = 0.0
            ps2 = 0.0
    sg1 = tl.zeros((BLOCK_D,), dtype=tl.float32)
    sg2 = tl.zeros((BLOCK_D,), dtype=tl.float32)
    sx1 = tl.zeros((BLOCK_D,), dtype=tl.float32)
    sx2 = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        g1, g2, xh1, xh2, x1, x2, mask = _grad_chunk(
            Z1,
            Z2,
            H,
            PD,
            m0 + rr,
            cols,
            cmask,
            M,
            D,
            stride1,
            stride2,
            r0,
            n_rows,
            mean1,
            mean2,
            sc1,
            sc2,
            hs1,
            hs2,
            ps1,
            ps2,
            v1,
            v2,
            KIND,
            GRAM,
        )
        sg1 += tl.sum(g1, axis=0)
        sg2 += tl.sum(g2, axis=0)
        if KIND == 0:
            sx1 += tl.sum(g1 * xh1, axis=0)
            sx2 += tl.sum(g2 * xh2, axis=0)
    sg1 = sg1 / fM
    sg2 = sg2 / fM
    sx1 = sx1 / fM
    sx2 = sx2 / fM
    inv = go * 2.0 * c0 / (n_rows * fD)
    n_chunks = tl.cdiv(M, BLOCK_M)
    for i in range(0, n_chunks):
        rows = (n_chunks - 1 - i) * BLOCK_M + rr
        g1, g2, xh1, xh2, x1, x2, mask = _grad_chunk(
            Z1,
            Z2,
            H,
            PD,
            rows,
            cols,
            cmask,
            M,
            D,
            stride1,
            stride2,
            r0,
            n_rows,
            mean1,
            mean2,
            sc1,
            sc2,
            hs1,
            hs2,
            ps1,
            ps2,
            v1,
            v2,
            KIND,
            GRAM,
        )
        if KIND == 0:
            dz1 = go * sc1[None, :] * (g1 - sg1[None, :] - xh1 * sx1[None, :])
            dz2 = go * sc2[None, :] * (g2 - sg2[None, :] - xh2 * sx2[None, :])
        else:
            mine = ((rows >= r0) & (rows < r0 + n_rows))[:, None]
            e = tl.where(mine, inv * (x1 - x2), 0.0)
            dz1 = go * (g1 - sg1[None, :]) + e
            dz2 = go * (g2 - sg2[None, :]) - e
        offs = rows.to(tl.int64)[:, None] * D + cols[None, :]  # dz1, dz2 are fresh contiguous [M, D]
        tl.store(DZ1 + offs, _cast(dz1, DZ1.dtype.element_ty), mask=mask)
        tl.store(DZ2 + offs, _cast(dz2, DZ2.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------- launchers
def _cfg() -> dict:
    return _configs(interpreting())


@functools.lru_cache(maxsize=2)
def _configs(interpreted: bool) -> dict:
    """Block sizes. Column-strip kernels: 32 columns x 64 rows per step (D/32 programs: 256 at D = 8192);
    Gram epilogue 64 x 64 tiles; symmetric dual-Gram and tiled C: 128 x 128 tiles, 64-wide reduction steps,
    8 warps, 3 stages (two accumulators: 234 registers, 192 KB shared memory, no spills on sm_90). Under the
    interpreter every block is tiny so that odd sizes cross many tile edges."""
    if interpreted:
        return dict(
            col=dict(BLOCK_M=8, BLOCK_D=16, BLOCK_K=16, num_warps=1),
            gram=dict(BLOCK_R=16, BLOCK_C=16, BLOCK_K=16, num_warps=1),
            small_tiles=4,
            tiles=dict(BLOCK_T=16, BLOCK_K=16, num_warps=1),
            sym=dict(BLOCK_T=16, BLOCK_K=16, num_warps=1),
            fin=dict(BLOCK_P=16, BLOCK_K=16),
        )
    return dict(
        col=dict(BLOCK_M=64, BLOCK_D=32, BLOCK_K=1024, num_warps=4),
        gram=dict(BLOCK_R=64, BLOCK_C=64, BLOCK_K=1024, num_warps=4),
        small_tiles=16,
        tiles=dict(BLOCK_T=128, BLOCK_K=64, num_warps=8, num_stages=3),
        sym=dict(BLOCK_T=128, BLOCK_K=64, num_warps=8, num_stages=3),
        fin=dict(BLOCK_P=1024, BLOCK_K=1024),
    )


def _coefs(coef) -> tuple[float, float, float]:
    c = [float(x) for x in coef] + [0.0, 0.0, 0.0]
    return c[0], c[1], c[2]


def symmetric_gram_forward(m: int, device) -> bool:
    """Whether a one-process Gram forward of M rows runs the symmetric dual-Gram Triton kernel (its upper
    tiles fill the machine, or forced by GRAM_FORWARD) rather than two cuBLAS GEMMs + the epilogue kernel."""
    if GRAM_FORWARD != "auto":
        return GRAM_FORWARD == "triton"
    # Its upper tiles cost as much as cuBLAS's 128 x 256 output tiles of the two full Gram GEMMs, and there
    # are half as many: it wins once they make at least two waves (M >= ~3000 on 132 SMs). At M = 2048 both
    # need two waves (136 vs 256 tiles) and cuBLAS's tiles are the more efficient ones.
    t = cdiv(m, _cfg()["sym"]["BLOCK_T"])
    return t * (t + 1) // 2 >= 2 * num_sms(torch.device(device))


def slabs(d: int):
    """Row ranges of the P x D cross-correlation slabs of the tiled backward: P·D <= SLAB_ELEMS and at least
    two slabs, so the D x D matrix is never formed, not even transiently."""
    p = max(1, min((d + 1) // 2, SLAB_ELEMS // max(1, d)))
    for p0 in range(0, d, p):
        yield p0, min(d, p0 + p)


def forward(z1, z2, kind, coef, eps, rows, world, algorithm):
    """Statistics, operands and the loss. Returns (loss_r, u_r, col, scal, ops, grams, pdiag): the loss of
    this rank and its share u_r (module doc), the per-feature rows `col` [NCOL, D], the operand scales
    `scal` [2], the operands [2, M, D], and for the Gram path the scaled off-diagonal partner Gram rows
    [2, n, M] and their diagonal [2, n] (empty for the tiled path)."""
    m, d = z1.shape
    r0, n = rows
    dev = z1.device
    cfg = _cfg()
    c0, c1, c2 = _coefs(coef)
    f32 = torch.float32
    odt = operand_dtype(z1.dtype, m, algorithm)
    col = empty((NCOL, d), dtype=f32, device=dev)
    scal = empty((2,), dtype=f32, device=dev)
    ops = empty((2, m, d), dtype=odt, device=dev)
    cc = cfg["col"]
    grid = (cdiv(d, cc["BLOCK_D"]),)
    args = (z1, z2, col, scal, ops, m, d, z1.stride(0), z2.stride(0), r0, n, float(eps))
    if kind == BARLOW:
        _columns_kernel[grid](*args, KIND=kind, STATS=True, OPERANDS=True, **cc)
    else:
        _columns_kernel[grid](*args, KIND=kind, STATS=True, OPERANDS=False, **cc)
        _columns_kernel[grid](*args, KIND=kind, STATS=False, OPERANDS=True, **cc)
    loss = empty((), dtype=f32, device=dev)
    u = empty((), dtype=f32, device=dev)
    tail = (m, d, n, float(world), c0, c1, c2)
    if algorithm == "gram":
        grams = empty((2, n, m), dtype=odt, device=dev)
        pdiag = empty((2, n), dtype=f32, device=dev)
        sc = cfg["sym"]
        t = cdiv(m, sc["BLOCK_T"])
        if n == m and symmetric_gram_forward(m, dev):
            part = empty((t * t, 2), dtype=f32, device=dev)
            _sym_gram_kernel[(t, t)](ops, grams, pdiag, part, m, d, 1.0 / d, t, KIND=kind, UPCAST=upcast_dots(), **sc)
            _finalize_kernel[(1,)](part, t * t, col, scal, loss, u, *tail, KIND=kind, GRAM=True, **cfg["fin"])
            return loss, u, col, scal, ops, grams, pdiag
        mine = ops if n == m else ops[:, r0 : r0 + n]
        g = _bmm_f32(mine, ops.transpose(1, 2))  # [2, n, M]: this rank's Gram rows
        gc = cfg["gram"]
        tiles_c = cdiv(m, gc["BLOCK_C"])
        n_tiles = cdiv(n, gc["BLOCK_R"]) * tiles_c
        finalize = n_tiles <= cfg["small_tiles"]
        nprog = 1 if finalize else n_tiles
        part = loss if finalize else empty((nprog, 2), dtype=f32, device=dev)
        _gram_epilogue_kernel[(nprog,)](
            g,
            grams,
            pdiag,
            part,
            col,
            scal,
            loss,
            u,
            n,
            m,
            d,
            r0,
            1.0 / d,
            float(world),
            c0,
            c1,
            c2,
            n_tiles,
            tiles_c,
            nprog,
            KIND=kind,
            FINALIZE=finalize,
            **gc,
        )
        if not finalize:
            _finalize_kernel[(1,)](part, nprog, col, scal, loss, u, *tail, KIND=kind, GRAM=True, **cfg["fin"])
        return loss, u, col, scal, ops, grams, pdiag
    tc = cfg["tiles"]
    t = cdiv(d, tc["BLOCK_T"])
    part = empty((t * t, 2), dtype=f32, device=dev)
    _tiles_kernel[(t, t, 1 if kind == BARLOW else 2)](
        ops, part, m, d, t, SYM=kind == VICREG, UPCAST=upcast_dots(), **tc
    )
    _finalize_kernel[(1,)](part, t * t, col, scal, loss, u, *tail, KIND=kind, GRAM=False, **cfg["fin"])
    return loss, u, col, scal, ops, ops.new_empty((2, 0, 0)), col.new_empty((2, 0))


def _backward_product(kind, ops, grams, rows, algorithm):
    """H [2, M, D] (operand units) and the factor that makes it ∂S_r/∂ops' GEMM part (module doc)."""
    m, d = ops.shape[1:]
    r0, n = rows
    if algorithm == "gram":
        if n == m:  # one process: B_off Ẑ1 counted from both sides of the Gram rows
            if ops.is_cuda and ops.dtype == torch.bfloat16:
                return torch.bmm(grams, ops), 2.0  # bf16 product: halves the traffic of the combine pass
            return _bmm_f32(grams, ops), 2.0
        h = _bmm_f32(grams.transpose(1, 2), ops[:, r0 : r0 + n])
        h[:, r0 : r0 + n] += _bmm_f32(grams, ops)
        return h, 1.0
    h = empty((2, m, d), dtype=torch.float32, device=ops.device)
    norm = m if kind == BARLOW else m - 1
    for x in range(2):
        a = ops[x]
        b = ops[1 - x] if kind == BARLOW else ops[x]
        for p0, p1 in slabs(d):
            s = _bmm_f32(a[:, p0:p1].T, b)  # P x D slab of aᵀb
            s[:, p0:p1].diagonal().zero_()
            s = (s * (1.0 / norm)).to(ops.dtype)  # |C| <= 1 (Barlow), |Cov_ops| <= D (VICReg)
            h[x, :, p0:p1] = _bmm_f32(b, s.T)
    return h, 1.0


def backward(grad, z1, z2, col, scal, ops, grams, pdiag, kind, coef, eps, rows, world, algorithm):
    """(dz1, dz2) in the inputs' dtypes for the upstream gradient `grad` (a 0-d tensor, read on device)."""
    m, d = z1.shape
    r0, n = rows
    c0, c1, c2 = _coefs(coef)
    h, hfac = _backward_product(kind, ops, grams, rows, algorithm)
    dz1 = empty(z1.shape, dtype=z1.dtype, device=z1.device)
    dz2 = empty(z2.shape, dtype=z2.dtype, device=z2.device)
    cc = _cfg()["col"]
    pd = pdiag if algorithm == "gram" else col
    _combine_kernel[(cdiv(d, cc["BLOCK_D"]),)](
        z1,
        z2,
        h,
        pd,
        col,
        scal,
        grad,
        dz1,
        dz2,
        m,
        d,
        z1.stride(0),
        z2.stride(0),
        r0,
        n,
        float(world),
        c0,
        c1,
        c2,
        hfac,
        KIND=kind,
        GRAM=algorithm == "gram",
        BLOCK_M=cc["BLOCK_M"],
        BLOCK_D=cc["BLOCK_D"],
        num_warps=cc["num_warps"],
    )
    return dz1, dz2
