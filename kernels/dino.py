"""DINO's multi-crop loss without any [crops, batch, K] temporary: three streaming kernels over K.

Notation (math and its derivation in `sslfast.reference.dino`): student [V·B, K] crop-major with the G global
crops first, teacher [G·B, K], center [K]; c_v = G − [v < G], n = G·V − G pairs. Inside the kernels logits
are in base 2 (x·log2 e), so every exponential is one `exp2`.

    teacher   lse_t[g, b] = log Σ_k exp((t_gb[k] − c[k]) / τ_t)       per K split, then merged (_teacher_stats_kernel)
              P_g[b, k]   = exp((t_gb[k] − c[k]) / τ_t − lse_t[g, b]),    P_Σ = Σ_g P_g
    forward   per image b and K split, all V crops as one [V, K-chunk] tile: the running (max, sum) of
              s_vb/τ_s and dot[v, b] = Σ_k (P_Σ − [v < G] P_v)[b, k] · s_vb[k] / τ_s       (_forward_kernel)
              splits merged by one more program: lse_s[v, b];  loss = Σ_{v,b} (c_v lse_s − dot) / (B·n)
    backward  ∂loss/∂s_vb[k] = g · (c_v exp(s_vb[k]/τ_s − lse_s[v, b]) − (P_Σ − [v < G] P_v)[b, k])
                               / (τ_s·B·n)                                                  (_backward_kernel)

The forward saves lse_s and lse_t ([(V + G)·B] floats), so the backward reads each input once and needs no
teacher pass of its own. Traffic: the forward reads the teacher twice (statistics, then P_Σ) and the student
once; the backward reads both once more and writes the gradient. All arithmetic is fp32 whatever the input
dtypes; the loss is a deterministic sum of per-(split, crop, image) partials.
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
    online_lse2_lanes,
)
from ._launch import cached_launch


@triton.jit
def _targets(T, C, lse_t, b, B, G, gg, vv, kk, ok, stride_t, t2):
    """The weights crop v's logits meet at columns kk, [BLOCK_V, BLOCK_K] (0 where not ok):
    P_Σ − [v < G] P_v of image b, from the base-2 teacher LSEs lse_t [BLOCK_G] of its G rows."""
    c = tl.load(C + kk, mask=ok, other=0.0).to(tl.float32)
    p_sum = tl.zeros(kk.shape, dtype=tl.float32)
    own = tl.zeros((vv.shape[0], kk.shape[0]), dtype=tl.float32)
    for g in range(G):
        lse_g = tl.sum(tl.where(gg == g, lse_t, 0.0), axis=0)
        t = tl.load(T + (g * B + b).to(tl.int64) * stride_t + kk, mask=ok, other=0.0).to(tl.float32)
        p = tl.where(ok, tl.exp2((t - c) * t2 - lse_g), 0.0)
        p_sum += p
        own = tl.where(vv[:, None] == g, p[None, :], own)
    return p_sum[None, :] - own


@triton.jit
def _student_tile(S, b, B, V, vv, kk, ok, stride_s):
    """Rows v·B + b of every crop at columns kk, [BLOCK_V, BLOCK_K] fp32 (0 where masked), the row indices and
    the full mask."""
    rows = (vv * B + b).to(tl.int64)
    mask = (vv < V)[:, None] & ok[None, :]
    return tl.load(S + rows[:, None] * stride_s + kk[None, :], mask=mask, other=0.0).to(tl.float32), rows, mask


@cached_launch
@triton.jit
def _teacher_stats_kernel(T, C, PART_T, n_rows, K, stride_t, k_per_split, t2, BLOCK_K: tl.constexpr):
    # Grid (G·B, K splits): one teacher row's columns [k_lo, k_hi); lane-wise online (max, sum) of the base-2
    # logits, merged to one (max, sum) in PART_T [2, splits, G·B]. Splits keep 128 rows x 65536 columns from
    # being one long serial sweep per SM.
    row = tl.program_id(0)
    sp = tl.program_id(1)
    k_lo = sp * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    m = tl.full((BLOCK_K,), float("-inf"), dtype=tl.float32)
    l = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        ok = kk < k_hi
        t = tl.load(T + row.to(tl.int64) * stride_t + kk, mask=ok, other=0.0).to(tl.float32)
        c = tl.load(C + kk, mask=ok, other=0.0).to(tl.float32)
        m, l = online_lse2_lanes(m, l, tl.where(ok, (t - c) * t2, float("-inf")))
    mx = tl.max(m, axis=0)
    mx_use = tl.where(mx == float("-inf"), 0.0, mx)
    tl.store(PART_T + sp * n_rows + row, mx)
    tl.store(PART_T + (tl.num_programs(1) + sp) * n_rows + row, tl.sum(l * tl.exp2(m - mx_use), axis=0))


@cached_launch
@triton.jit
def _forward_kernel(
    S,
    T,
    C,
    PART_T,
    LSE_T,
    PART,
    B,
    V,
    G,
    K,
    stride_s,
    stride_t,
    k_per_split,
    s2,
    t2,
    BLOCK_K: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_SP: tl.constexpr,
):
    # Grid (B, K splits), the teacher statistics' splits too: image b's columns [k_lo, k_hi) as [BLOCK_V,
    # BLOCK_K] tiles of all its crops at once (one 2-D load, one reduction per statistic for every crop).
    # First the G teacher LSEs of image b, merged from the splits' partials; split 0 also stores them (natural
    # log) for the backward. PART [3, splits, V, B]: per crop (max, sum) of s/τ_s (base 2) and the dot.
    b = tl.program_id(0)
    sp = tl.program_id(1)
    n_sp = tl.num_programs(1)
    gg = tl.arange(0, BLOCK_G)
    t_rows = gg * B + b
    t_mask = (gg < G)[:, None] & (tl.arange(0, BLOCK_SP) < n_sp)[None, :]
    t_part = tl.arange(0, BLOCK_SP)[None, :] * (G * B) + t_rows[:, None]
    m_t = tl.load(PART_T + t_part, mask=t_mask, other=float("-inf"))
    l_t = tl.load(PART_T + n_sp * G * B + t_part, mask=t_mask, other=0.0)
    lse_t = merged_lse2(m_t, l_t, 1)
    if sp == 0:
        tl.store(LSE_T + t_rows, lse_t * TL_LN2, mask=gg < G)

    k_lo = sp * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    vv = tl.arange(0, BLOCK_V)
    m = tl.full((BLOCK_V,), float("-inf"), dtype=tl.float32)
    l = tl.zeros((BLOCK_V,), dtype=tl.float32)
    dot = tl.zeros((BLOCK_V,), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        ok = kk < k_hi
        w = _targets(T, C, lse_t, b, B, G, gg, vv, kk, ok, stride_t, t2)
        s, _, mask = _student_tile(S, b, B, V, vv, kk, ok, stride_s)
        m, l = online_lse2(m, l, tl.where(mask, s * s2, float("-inf")), 1)
        dot += tl.sum(w * s, axis=1)
    out = (sp * V + vv) * B + b
    tl.store(PART + out, m, mask=vv < V)
    tl.store(PART + n_sp * V * B + out, l, mask=vv < V)
    tl.store(PART + 2 * n_sp * V * B + out, dot * (s2 * TL_LN2), mask=vv < V)


@triton.jit
def _merge_loss(
    PART, STATS, LOSS, n_sp, n, B, G, inv_pairs, SUMS: tl.constexpr, BLOCK_SP: tl.constexpr, BLOCK: tl.constexpr
):
    """The multi-crop cross-entropy's last step, shared by DINO's and SwAV's `_loss_kernel` (one program): the
    K splits' partials of every student row (n = V·B, crop-major) merged into its natural LSE (STATS[:n]), and
    loss = Σ (c·lse − dot) / (B·n_pairs) summed in a fixed order. PART [3 + SUMS, splits, n] holds the (max,
    sum) of the base-2 logits, the dot and, with SUMS, the target sums c, merged too and stored at STATS[n:2n]
    (SwAV's codes); without SUMS, c_v = G − [v < G] (DINO's teacher softmaxes, each summing to 1)."""
    sp = tl.arange(0, BLOCK_SP)[:, None]
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, n, BLOCK):
        i = start + tl.arange(0, BLOCK)
        ok = i < n
        mask = (sp < n_sp) & ok[None, :]
        at = sp * n + i[None, :]
        m = tl.load(PART + at, mask=mask, other=float("-inf"))
        l = tl.load(PART + n_sp * n + at, mask=mask, other=0.0)
        dot = tl.sum(tl.load(PART + 2 * n_sp * n + at, mask=mask, other=0.0), axis=0)
        lse = merged_lse2(m, l, 0) * TL_LN2
        tl.store(STATS + i, lse, mask=ok)
        if SUMS:
            c = tl.sum(tl.load(PART + 3 * n_sp * n + at, mask=mask, other=0.0), axis=0)
            tl.store(STATS + n + i, c, mask=ok)
        else:
            c = G - (i < G * B).to(tl.float32)  # crop v = i // B is a global crop when i < G·B
        acc += tl.where(ok, c * lse - dot, 0.0)
    tl.store(LOSS, tl.sum(acc, axis=0) * inv_pairs)


@cached_launch
@triton.jit
def _loss_kernel(PART, LSE_S, LOSS, n_sp, n, B, G, inv_pairs, BLOCK_SP: tl.constexpr, BLOCK: tl.constexpr):
    # Grid (1,): the student LSEs and the loss, c_v = G − [v < G]: one launch for what were a dozen small ATen
    # ops.
    _merge_loss(PART, LSE_S, LOSS, n_sp, n, B, G, inv_pairs, False, BLOCK_SP, BLOCK)


@cached_launch
@triton.jit
def _backward_kernel(
    S,
    T,
    C,
    LSE_T,
    LSE_S,
    GRAD,
    DS,
    B,
    V,
    G,
    K,
    stride_s,
    stride_t,
    stride_ds,
    s2,
    t2,
    coef,
    BLOCK_K: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    # Grid (B, cdiv(K, BLOCK_K)): one [BLOCK_V, BLOCK_K] tile, every crop of image b at one chunk of columns;
    # the teacher and student LSEs are the forward's (natural log, saved).
    b = tl.program_id(0)
    kk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    ok = kk < K
    gg = tl.arange(0, BLOCK_G)
    lse_t = tl.load(LSE_T + gg * B + b, mask=gg < G, other=0.0) * TL_LOG2E
    w = _targets(T, C, lse_t, b, B, G, gg, tl.arange(0, BLOCK_V), kk, ok, stride_t, t2)
    vv = tl.arange(0, BLOCK_V)
    s, rows, mask = _student_tile(S, b, B, V, vv, kk, ok, stride_s)
    lse_s = tl.load(LSE_S + rows, mask=vv < V, other=0.0).to(tl.float32) * TL_LOG2E
    c_v = G - (vv < G).to(tl.float32)
    ds = tl.load(GRAD).to(tl.float32) * coef * (c_v[:, None] * tl.exp2(s * s2 - lse_s[:, None]) - w)
    tl.store(DS + rows[:, None] * stride_ds + kk[None, :], ds.to(DS.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------- launchers
def _blocks(student: torch.Tensor, V: int, G: int) -> dict:
    # Student tiles [BLOCK_V, BLOCK_K] of 8 KB for 4 warps (16 x 256 in a 16-bit dtype, 16 x 128 in fp32 at
    # V = 10 crops): one 16-byte load per thread and row group; 96 / 64 registers in the forward (bf16 / fp32,
    # sm_90), where 16 x 256 fp32 took 207. More crops, fewer columns per tile.
    bv = next_pow2(V)
    bk = 16 if interpreting() else min(1024, 8192 // student.element_size() // bv)
    return dict(BLOCK_K=min(next_pow2(student.shape[1]), bk), BLOCK_V=bv, BLOCK_G=next_pow2(G), num_warps=_warps())


def _warps() -> int:
    return 1 if interpreting() else 4


def _shape(student, teacher, num_global):
    B = teacher.shape[0] // num_global
    return B, student.shape[0] // B, student.shape[1]


def _splits(B: int, K: int, block: int, device) -> tuple[int, int]:
    """(splits, columns per split): images x splits make about four waves of programs (a DINO batch per GPU is
    32-256 images), each split a whole number of `block` columns."""
    splits = max(1, min(cdiv(K, block), cdiv(4 * num_sms(device), B)))
    per = cdiv(cdiv(K, splits), block) * block
    return cdiv(K, per), per


def dino_loss_forward(student, teacher, center, student_temp, teacher_temp, num_global):
    """(loss [], natural log-sum-exps [(V + G)·B]: student/τ_s per row, then (teacher − center)/τ_t per row),
    fp32."""
    G = num_global
    B, V, K = _shape(student, teacher, G)
    center = center.reshape(-1)
    cfg = _blocks(student, V, G)
    splits, per = _splits(B, K, cfg["BLOCK_K"], student.device)
    part_t = empty((2, splits, G * B), dtype=torch.float32, device=student.device)
    _teacher_stats_kernel[(G * B, splits)](
        teacher,
        center,
        part_t,
        G * B,
        K,
        teacher.stride(0),
        per,
        LOG2E / teacher_temp,
        BLOCK_K=min(next_pow2(per), 4 * cfg["BLOCK_K"]),
        num_warps=cfg["num_warps"],
    )
    lse = empty(((V + G) * B,), dtype=torch.float32, device=student.device)
    part = empty((3, splits, V, B), dtype=torch.float32, device=student.device)
    _forward_kernel[(B, splits)](
        student,
        teacher,
        center,
        part_t,
        lse[V * B :],
        part,
        B,
        V,
        G,
        K,
        student.stride(0),
        teacher.stride(0),
        per,
        LOG2E / student_temp,
        LOG2E / teacher_temp,
        BLOCK_SP=next_pow2(splits),
        **cfg,
    )
    loss = empty((), dtype=torch.float32, device=student.device)
    _loss_kernel[(1,)](
        part,
        lse,
        loss,
        splits,
        V * B,
        B,
        G,
        1.0 / (B * (G * V - G)),
        BLOCK_SP=next_pow2(splits),
        BLOCK=64 if interpreting() else 256,
        num_warps=_warps(),
    )
    return loss, lse


def dino_loss_backward(grad, student, teacher, center, lse, student_temp, teacher_temp, num_global):
    """∂loss/∂student in the student's dtype for the upstream gradient `grad` (0-d); `lse` from the forward."""
    G = num_global
    B, V, K = _shape(student, teacher, G)
    cfg = _blocks(student, V, G)
    ds = empty(tuple(student.shape), dtype=student.dtype, device=student.device)
    _backward_kernel[(B, cdiv(K, cfg["BLOCK_K"]))](
        student,
        teacher,
        center.reshape(-1),
        lse[V * B :],
        lse,
        grad,
        ds,
        B,
        V,
        G,
        K,
        student.stride(0),
        teacher.stride(0),
        ds.stride(0),
        LOG2E / student_temp,
        LOG2E / teacher_temp,
        1.0 / (student_temp * B * (G * V - G)),
        **cfg,
    )
    return ds
