"""iBOT / DINOv2 masked-patch soft cross-entropy: one streaming pass per token row, no [tokens, K] temporary.

Math in `sslfast.reference.ibot`: token rows r of student logits s [R, K] and teacher probabilities t [R, K]
with weights w [R] (0 for tokens that do not count); inside the kernels logits are in base 2 (s·log2 e/τ),
so every exponential is one `exp2`.

    forward   per row with w_r ≠ 0, one sweep over K: the lane-wise online (max, sum) of s/τ, Σ_k t and
              Σ_k t·s; lse_r and (Σt)_r saved, part_r = w_r·((Σt)_r·lse_r − t_r·s_r/τ)       (_forward_kernel)
              loss = Σ_r part_r (a fixed-order reduction of [R] floats)
    backward  ∂loss/∂s_r[k] = g·w_r·((Σt)_r·exp(s_r[k]/τ − lse_r) − t_r[k]) / τ             (_backward_kernel)

Rows with w_r = 0 are never read (their sweep has no iterations, their gradient tiles are stored as zeros).
Traffic: each weighted row of s and t is read once by the forward and once by the backward, which writes the
gradient; the statistics are [2, R] floats. All arithmetic is fp32 whatever the input dtypes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._backend import interpreting
from ._common import LOG2E, TL_LN2, TL_LOG2E, cdiv, empty, merged_lse2, next_pow2, online_lse2_lanes
from ._launch import cached_launch


@cached_launch
@triton.jit
def _forward_kernel(S, T, W, STATS, PART, R, K, stride_s, stride_t, s2, BLOCK_K: tl.constexpr):
    # Grid (R,): one token row. An unweighted row's sweep is empty (k_end = 0), so it reads nothing.
    r = tl.program_id(0)
    w = tl.load(W + r).to(tl.float32)
    k_end = tl.where(w != 0.0, K, 0)
    s_row = S + r.to(tl.int64) * stride_s
    t_row = T + r.to(tl.int64) * stride_t
    m = tl.full((BLOCK_K,), float("-inf"), dtype=tl.float32)
    l = tl.zeros((BLOCK_K,), dtype=tl.float32)
    ts = tl.zeros((BLOCK_K,), dtype=tl.float32)
    tt = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, k_end, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        ok = kk < K
        s = tl.load(s_row + kk, mask=ok, other=0.0).to(tl.float32)
        t = tl.load(t_row + kk, mask=ok, other=0.0).to(tl.float32)
        m, l = online_lse2_lanes(m, l, tl.where(ok, s * s2, float("-inf")))
        ts += t * s
        tt += t
    lse = merged_lse2(m, l, 0) * TL_LN2
    t_sum = tl.sum(tt, axis=0)
    weighted = w != 0.0
    tl.store(STATS + r, tl.where(weighted, lse, 0.0))
    tl.store(STATS + R + r, t_sum)
    part = w * (t_sum * lse - tl.sum(ts, axis=0) * (s2 * TL_LN2))
    tl.store(PART + r, tl.where(weighted, part, 0.0))


@cached_launch
@triton.jit
def _backward_kernel(
    S, T, W, STATS, GRAD, DS, R, K, stride_s, stride_t, stride_ds, s2, inv_temp, BLOCK_K: tl.constexpr
):
    # Grid (R, cdiv(K, BLOCK_K)): one chunk of one token row; an unweighted row's loads are masked off and its
    # gradient chunk stored as zeros.
    r = tl.program_id(0)
    kk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    ok = kk < K
    w = tl.load(W + r).to(tl.float32)
    read = kk < tl.where(w != 0.0, K, 0)
    s = tl.load(S + r.to(tl.int64) * stride_s + kk, mask=read, other=0.0).to(tl.float32)
    t = tl.load(T + r.to(tl.int64) * stride_t + kk, mask=read, other=0.0).to(tl.float32)
    lse = tl.load(STATS + r) * TL_LOG2E
    t_sum = tl.load(STATS + R + r)
    coef = tl.load(GRAD).to(tl.float32) * w * inv_temp
    ds = tl.where(read, coef * (t_sum * tl.exp2(s * s2 - lse) - t), 0.0)
    tl.store(DS + r.to(tl.int64) * stride_ds + kk, ds.to(DS.dtype.element_ty), mask=ok)


# --------------------------------------------------------------------------------------------- launchers
def _config(K: int) -> dict:
    # 1024 fp32 lanes of four running statistics over 4 warps: 32 registers of state per thread.
    return dict(BLOCK_K=min(next_pow2(K), 16 if interpreting() else 1024), num_warps=1 if interpreting() else 4)


def ibot_forward(student, teacher, weights, student_temp):
    """(loss [], row statistics [2, R]: natural lse(s/τ) (0 where w = 0), then Σ_k t), fp32; student,
    teacher [R, K] with unit stride along K, weights [R] fp32."""
    R, K = student.shape
    stats = empty((2, R), dtype=torch.float32, device=student.device)
    part = empty((R,), dtype=torch.float32, device=student.device)
    _forward_kernel[(R,)](
        student,
        teacher,
        weights,
        stats,
        part,
        R,
        K,
        student.stride(0),
        teacher.stride(0),
        LOG2E / student_temp,
        **_config(K),
    )
    return part.sum(), stats


def ibot_backward(grad, student, teacher, weights, stats, student_temp):
    """∂loss/∂student [R, K] in the student's dtype for the upstream gradient `grad` (0-d); `stats` from the
    forward."""
    R, K = student.shape
    cfg = _config(K)
    ds = empty((R, K), dtype=student.dtype, device=student.device)
    _backward_kernel[(R, cdiv(K, cfg["BLOCK_K"]))](
        student,
        teacher,
        weights,
        stats,
        grad,
        ds,
        R,
        K,
        student.stride(0),
        teacher.stride(0),
        ds.stride(0),
        LOG2E / student_temp,
        1.0 / student_temp,
        **cfg,
    )
    return ds
