"""Sinkhorn-Knopp teacher targets in log domain: streaming passes over the logits, Q written once.

Math in `sslfast.reference.sinkhorn`: with s = x/τ [B, K], Q = exp(s_bk + u_k + v_b) is kept implicit as the
potentials u [K] and v [B], and each normalization is one pass computing a log-sum-exp along one axis:

    column pass   LSE_b(s_bk + v_b) per prototype k       (_column_kernel; the caller sets u = −LSE, merged over
                                                            ranks first when distributed)
    row pass      LSE_k(s_bk + u_k) per sample b           (_row_kernel; the caller sets v = −LSE)
    output        Q[b, k] = exp(s_bk + u_k − LSE_k(s_bk + u_k)), rows summing to 1   (_softmax_kernel)

No [B, K] buffer besides Q itself. Inside the kernels the scores are in base 2 (x·log2 e/τ) so every
exponential is one `exp2`; potentials and LSEs cross the launchers in natural log, fp32. Online (max, sum)
log-sum-exps keep every exponent ≤ 0, so nothing overflows whatever the temperature.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._backend import interpreting
from ._common import LOG2E, TL_LN2, TL_LOG2E, cdiv, empty, merged_lse2, next_pow2, online_lse2, online_lse2_lanes
from ._launch import cached_launch


@cached_launch
@triton.jit
def _column_kernel(X, V, OUT, B, K, stride_x, s2, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    # Grid (cdiv(K, BLOCK_K),): prototypes kk, a sweep over every sample in [BLOCK_B, BLOCK_K] tiles (rows are
    # K-contiguous, so each tile load is coalesced along k).
    kk = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = kk < K
    m = tl.full((BLOCK_K,), float("-inf"), dtype=tl.float32)
    l = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for b0 in range(0, B, BLOCK_B):
        bb = b0 + tl.arange(0, BLOCK_B)
        b_ok = bb < B
        mask = b_ok[:, None] & k_ok[None, :]
        x = tl.load(X + bb.to(tl.int64)[:, None] * stride_x + kk[None, :], mask=mask, other=0.0).to(tl.float32)
        v = tl.load(V + bb, mask=b_ok, other=0.0) * TL_LOG2E
        m, l = online_lse2(m, l, tl.where(mask, x * s2 + v[:, None], float("-inf")), 0)
    m_use = tl.where(m == float("-inf"), 0.0, m)
    tl.store(OUT + kk, (m_use + tl.log2(l)) * TL_LN2, mask=k_ok)


@triton.jit
def _row_lse2(X, U, b, K, stride_x, s2, BLOCK_K: tl.constexpr):
    """Base-2 LSE_k(x_bk·s2 + u_k·log2 e) of sample b."""
    m = tl.full((BLOCK_K,), float("-inf"), dtype=tl.float32)
    l = tl.zeros((BLOCK_K,), dtype=tl.float32)
    row = X + b.to(tl.int64) * stride_x
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        ok = kk < K
        x = tl.load(row + kk, mask=ok, other=0.0).to(tl.float32)
        u = tl.load(U + kk, mask=ok, other=0.0) * TL_LOG2E
        m, l = online_lse2_lanes(m, l, tl.where(ok, x * s2 + u, float("-inf")))
    return merged_lse2(m, l, 0)


@cached_launch
@triton.jit
def _row_kernel(X, U, OUT, K, stride_x, s2, BLOCK_K: tl.constexpr):
    # Grid (B,): one sample's K scores, lane-wise online LSE then one merge.
    b = tl.program_id(0)
    tl.store(OUT + b, _row_lse2(X, U, b, K, stride_x, s2, BLOCK_K) * TL_LN2)


@cached_launch
@triton.jit
def _softmax_kernel(X, U, Q, K, stride_x, stride_q, s2, BLOCK_K: tl.constexpr):
    # Grid (B,): sample b's LSE (first sweep), then Q[b, :] written in the second.
    b = tl.program_id(0)
    lse = _row_lse2(X, U, b, K, stride_x, s2, BLOCK_K)
    row = X + b.to(tl.int64) * stride_x
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        ok = kk < K
        x = tl.load(row + kk, mask=ok, other=0.0).to(tl.float32)
        u = tl.load(U + kk, mask=ok, other=0.0) * TL_LOG2E
        tl.store(Q + b.to(tl.int64) * stride_q + kk, tl.exp2(x * s2 + u - lse), mask=ok)


# --------------------------------------------------------------------------------------------- launchers
def _block_k(K: int, cap: int) -> int:
    return min(next_pow2(K), 16 if interpreting() else cap)


def _warps() -> int:
    return 1 if interpreting() else 4


def column_potential(x: torch.Tensor, v: torch.Tensor, inv_temp: float) -> torch.Tensor:
    """LSE_b(x_bk·inv_temp + v_b) [K] fp32; x [B, K] with unit stride along K, v [B] fp32."""
    B, K = x.shape
    out = empty((K,), dtype=torch.float32, device=x.device)
    bk = _block_k(K, 128)
    bb = 16 if interpreting() else 32
    _column_kernel[(cdiv(K, bk),)](
        x, v, out, B, K, x.stride(0), inv_temp * LOG2E, BLOCK_B=bb, BLOCK_K=bk, num_warps=_warps()
    )
    return out


def row_lse(x: torch.Tensor, u: torch.Tensor, inv_temp: float) -> torch.Tensor:
    """LSE_k(x_bk·inv_temp + u_k) [B] fp32."""
    B, K = x.shape
    out = empty((B,), dtype=torch.float32, device=x.device)
    _row_kernel[(B,)](x, u, out, K, x.stride(0), inv_temp * LOG2E, BLOCK_K=_block_k(K, 1024), num_warps=_warps())
    return out


def softmax_rows(x: torch.Tensor, u: torch.Tensor, inv_temp: float) -> torch.Tensor:
    """softmax_k(x_bk·inv_temp + u_k) [B, K] fp32."""
    B, K = x.shape
    q = empty((B, K), dtype=torch.float32, device=x.device)
    _softmax_kernel[(B,)](
        x, u, q, K, x.stride(0), q.stride(0), inv_temp * LOG2E, BLOCK_K=_block_k(K, 1024), num_warps=_warps()
    )
    return q
