"""DINO's multi-crop loss without any [crops, batch, K] temporary: three streaming kernels over K.

Notation (math and its derivation in `sslfast.reference.dino`): student [V·B, K] crop-major with the G global
crops first, teacher [G·B, K], center [K]; c_v = G − [v < G], n = G·V − G pairs. Inside the kernels logits
are in base 2 (x·log2 e), so every exponential is one `exp2`.

    teacher   lse_t[g, b] = log Σ_k exp((t_gb[k] − c[k]) / τ_t)                        (_teacher_lse_kernel)
              P_g[b, k]   = exp((t_gb[k] − c[k]) / τ_t − lse_t[g, b]),    P_Σ = Σ_g P_g
    forward   per image b and K split: for every crop v the running (max, sum) of s_vb/τ_s and
              dot[v, b] = Σ_k (P_Σ − [v < G] P_v)[b, k] · s_vb[k] / τ_s                  (_forward_kernel)
              splits merged by the launcher: lse_s[v, b];  loss = Σ_{v,b} (c_v lse_s − dot) / (B·n)
    backward  ∂loss/∂s_vb[k] = g · (c_v exp(s_vb[k]/τ_s − lse_s[v, b]) − (P_Σ − [v < G] P_v)[b, k])
                               / (τ_s·B·n)                                                  (_backward_kernel)

Traffic: the forward reads the teacher rows twice (for lse_t, then for P_Σ; a global crop's own row a third
time, mostly from cache) and the student once; the backward reads both once more and writes the gradient.
All arithmetic is fp32 whatever the input dtypes; the loss is a deterministic sum of per-(split, crop,
image) partials.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._backend import interpreting
from ._common import cdiv, empty, next_pow2, num_sms

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
_LOG2E = tl.constexpr(LOG2E)  # the same constants inside the kernels (a @jit global must be a constexpr)
_LN2 = tl.constexpr(LN2)


@triton.jit
def _teacher_probs(T, C, LSE_T, row, kk, ok, stride_t, t2):
    """P of teacher row `row` at columns kk (0 where not ok): exp2((t − c)·t2 − lse_t[row]), fp32."""
    t = tl.load(T + row.to(tl.int64) * stride_t + kk, mask=ok, other=0.0).to(tl.float32)
    c = tl.load(C + kk, mask=ok, other=0.0).to(tl.float32)
    return tl.where(ok, tl.exp2((t - c) * t2 - tl.load(LSE_T + row)), 0.0)


@triton.jit
def _teacher_sum(T, C, LSE_T, b, B, G, kk, ok, stride_t, t2):
    """P_Σ of image b at columns kk."""
    p = tl.zeros(kk.shape, dtype=tl.float32)
    for g in range(G):
        p += _teacher_probs(T, C, LSE_T, g * B + b, kk, ok, stride_t, t2)
    return p


@triton.jit
def _target(p_sum, T, C, LSE_T, b, v, B, G, kk, ok, stride_t, t2):
    """The weights crop v's logits meet at columns kk: P_Σ − [v < G] P_v of image b (a global crop's own
    teacher row re-read, from L1/L2)."""
    own = ok & (v < G)
    return p_sum - _teacher_probs(T, C, LSE_T, tl.where(v < G, v, 0) * B + b, kk, own, stride_t, t2)


@triton.jit
def _teacher_lse_kernel(T, C, LSE_T, K, stride_t, t2, BLOCK_K: tl.constexpr):
    # Grid (G·B,): one teacher row per program; lane-wise online (max, sum) over K, merged at the end.
    row = tl.program_id(0).to(tl.int64)
    m = tl.full((BLOCK_K,), float("-inf"), dtype=tl.float32)
    l = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        ok = kk < K
        t = tl.load(T + row * stride_t + kk, mask=ok, other=0.0).to(tl.float32)
        c = tl.load(C + kk, mask=ok, other=0.0).to(tl.float32)
        x = tl.where(ok, (t - c) * t2, float("-inf"))
        m_new = tl.maximum(m, x)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        l = l * tl.exp2(m - m_use) + tl.exp2(x - m_use)
        m = m_new
    mx = tl.max(m, axis=0)
    tl.store(LSE_T + row, mx + tl.log2(tl.sum(l * tl.exp2(m - mx), axis=0)))


@triton.jit
def _forward_kernel(S, T, C, LSE_T, PART, B, V, G, K, stride_s, stride_t, k_per_split, s2, t2,
                    BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr):
    # Grid (B, K splits): image b's columns [k_lo, k_hi), BLOCK_K at a time; P_Σ once per chunk, then every
    # crop's (max, sum, dot) updated, kept in BLOCK_V-lane vectors (lane v = crop v). PART [3, splits, V, B].
    b = tl.program_id(0)
    sp = tl.program_id(1)
    k_lo = sp * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    vv = tl.arange(0, BLOCK_V)
    m = tl.full((BLOCK_V,), float("-inf"), dtype=tl.float32)
    l = tl.zeros((BLOCK_V,), dtype=tl.float32)
    dot = tl.zeros((BLOCK_V,), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        ok = kk < k_hi
        p_sum = _teacher_sum(T, C, LSE_T, b, B, G, kk, ok, stride_t, t2)
        for v in range(V):
            s = tl.load(S + (v * B + b).to(tl.int64) * stride_s + kk, mask=ok, other=0.0).to(tl.float32)
            w = _target(p_sum, T, C, LSE_T, b, v, B, G, kk, ok, stride_t, t2)
            x = tl.where(ok, s * s2, float("-inf"))
            lane = vv == v
            m_v = tl.max(tl.where(lane, m, float("-inf")), axis=0)
            m_new = tl.maximum(m_v, tl.max(x, axis=0))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_v = tl.sum(tl.where(lane, l, 0.0), axis=0) * tl.exp2(m_v - m_use) + tl.sum(tl.exp2(x - m_use), axis=0)
            m = tl.where(lane, m_new, m)
            l = tl.where(lane, l_v, l)
            dot = tl.where(lane, dot + tl.sum(w * s, axis=0), dot)
    n_sp = tl.num_programs(1)
    out = (sp * V + vv) * B + b
    tl.store(PART + out, m, mask=vv < V)
    tl.store(PART + n_sp * V * B + out, l, mask=vv < V)
    tl.store(PART + 2 * n_sp * V * B + out, dot * (s2 * _LN2), mask=vv < V)


@triton.jit
def _backward_kernel(S, T, C, LSE_T, LSE_S, GRAD, DS, B, V, G, K, stride_s, stride_t, stride_ds, s2, t2, coef,
                     BLOCK_K: tl.constexpr):
    # Grid (B, cdiv(K, BLOCK_K)): one chunk of columns of image b, every crop's gradient there.
    b = tl.program_id(0)
    kk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    ok = kk < K
    g = tl.load(GRAD).to(tl.float32) * coef
    p_sum = _teacher_sum(T, C, LSE_T, b, B, G, kk, ok, stride_t, t2)
    for v in range(V):
        row = (v * B + b).to(tl.int64)
        s = tl.load(S + row * stride_s + kk, mask=ok, other=0.0).to(tl.float32)
        p = tl.exp2(s * s2 - tl.load(LSE_S + row).to(tl.float32) * _LOG2E)
        c_v = G - (v < G).to(tl.float32)
        ds = g * (c_v * p - _target(p_sum, T, C, LSE_T, b, v, B, G, kk, ok, stride_t, t2))
        tl.store(DS + row * stride_ds + kk, ds.to(DS.dtype.element_ty), mask=ok)


# --------------------------------------------------------------------------------------------- launchers
def _block_k(K: int) -> int:
    return min(next_pow2(K), 16 if interpreting() else 1024)


def _warps() -> int:
    return 1 if interpreting() else 4


def _shape(student, teacher, num_global):
    B = teacher.shape[0] // num_global
    return B, student.shape[0] // B, student.shape[1]


def _teacher_lse(teacher, center, teacher_temp):
    """Base-2 lse_t [G·B] (fp32)."""
    lse_t = empty((teacher.shape[0],), dtype=torch.float32, device=teacher.device)
    K = teacher.shape[1]
    _teacher_lse_kernel[(teacher.shape[0],)](teacher, center, lse_t, K, teacher.stride(0), LOG2E / teacher_temp,
                                             BLOCK_K=_block_k(K), num_warps=_warps())
    return lse_t


def dino_loss_forward(student, teacher, center, student_temp, teacher_temp, num_global):
    """(loss [], natural log-sum-exp of student/τ_s per row [V·B]), fp32."""
    G = num_global
    B, V, K = _shape(student, teacher, G)
    center = center.reshape(-1)
    lse_t = _teacher_lse(teacher, center, teacher_temp)
    bk = _block_k(K)
    # K splits so that images x splits make about two waves (a DINO batch per GPU is 32-256 images)
    splits = max(1, min(cdiv(K, bk), cdiv(2 * num_sms(student.device), B)))
    per = cdiv(cdiv(K, splits), bk) * bk
    splits = cdiv(K, per)
    part = empty((3, splits, V, B), dtype=torch.float32, device=student.device)
    _forward_kernel[(B, splits)](student, teacher, center, lse_t, part, B, V, G, K, student.stride(0),
                                 teacher.stride(0), per, LOG2E / student_temp, LOG2E / teacher_temp,
                                 BLOCK_K=bk, BLOCK_V=next_pow2(V), num_warps=_warps())
    m, l, dot = part
    mx = m.amax(0)
    lse = (mx + torch.log2((l * torch.exp2(m - mx)).sum(0))) * LN2   # [V, B]
    coef = torch.full((V, 1), float(G), dtype=torch.float32, device=student.device)
    coef[:G] -= 1
    loss = (coef * lse - dot.sum(0)).sum() / (B * (G * V - G))
    return loss, lse.reshape(-1)


def dino_loss_backward(grad, student, teacher, center, lse, student_temp, teacher_temp, num_global):
    """∂loss/∂student in the student's dtype for the upstream gradient `grad` (0-d)."""
    G = num_global
    B, V, K = _shape(student, teacher, G)
    center = center.reshape(-1)
    lse_t = _teacher_lse(teacher, center, teacher_temp)
    ds = empty(tuple(student.shape), dtype=student.dtype, device=student.device)
    bk = _block_k(K)
    _backward_kernel[(B, cdiv(K, bk))](student, teacher, center, lse_t, lse, grad, ds, B, V, G, K,
                                       student.stride(0), teacher.stride(0), ds.stride(0), LOG2E / student_temp,
                                       LOG2E / teacher_temp, 1.0 / (student_temp * B * (G * V - G)),
                                       BLOCK_K=bk, num_warps=_warps())
    return ds
