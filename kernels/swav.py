"""SwAV's swapped-prediction loss without any [crops, batch, K] temporary: streaming kernels over K.

Notation and math in `sslfast.reference.swav`: scores [V·B, K] crop-major with the G global crops first,
codes [G·B, K]; targets w_v = Q_Σ − [v < G] q_v, c_v = Σ_k w_v, n = G·(V − 1) pairs. The structure is DINO's
multi-crop loss (`sslfast.kernels.dino`, whose student tiles and K splits this reuses) with the teacher
softmax replaced by the codes themselves, so there is no teacher pass, and c_v read from the codes (their rows
need not sum to 1) instead of being G − [v < G]. Calling the DINO kernels with log(codes) as teacher logits
would renormalize each code row and allocate a [G·B, K] logarithm, so SwAV has its own forward and backward.

    forward   per image b and K split, all V crops as one [V, K-chunk] tile: the running (max, sum) of
              s_vb/τ (base 2), dot[v, b] = Σ_k w_v[b, k]·s_vb[k]/τ and c_v[b] = Σ_k w_v[b, k]   (_forward_kernel)
              splits merged by one more program: lse[v, b], c[v, b] saved;
              loss = Σ_{v,b} (c·lse − dot) / (B·n)                        (_loss_kernel: DINO's `_merge_loss`)
    backward  ∂loss/∂s_vb[k] = g·(c_v[b]·exp(s_vb[k]/τ − lse[v, b]) − w_v[b, k]) / (τ·B·n)    (_backward_kernel)

Traffic: the forward reads the scores and the codes once, the backward once more and writes the gradient;
the saved statistics are [2, V·B] floats. All arithmetic is fp32 whatever the input dtypes; the loss is a
deterministic sum of per-(split, crop, image) partials.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._backend import interpreting
from ._common import LOG2E, TL_LN2, TL_LOG2E, cdiv, empty, next_pow2, online_lse2
from ._launch import cached_launch
from .dino import _blocks, _merge_loss, _splits, _student_tile, _warps


@triton.jit
def _targets(Q, b, B, G, vv, kk, ok, stride_q):
    """w_v[b, k] = Σ_g q_g[b, k] − [v < G] q_v[b, k] at columns kk, [BLOCK_V, BLOCK_K] fp32 (0 where not ok)."""
    q_sum = tl.zeros(kk.shape, dtype=tl.float32)
    own = tl.zeros((vv.shape[0], kk.shape[0]), dtype=tl.float32)
    for g in range(G):
        q = tl.load(Q + (g * B + b).to(tl.int64) * stride_q + kk, mask=ok, other=0.0).to(tl.float32)
        q_sum += q
        own = tl.where(vv[:, None] == g, q[None, :], own)
    return tl.where(ok[None, :], q_sum[None, :] - own, 0.0)


@cached_launch
@triton.jit
def _forward_kernel(
    S, Q, PART, B, V, G, K, stride_s, stride_q, k_per_split, s2, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr
):
    # Grid (B, K splits): image b's columns [k_lo, k_hi) as [BLOCK_V, BLOCK_K] tiles of all its crops at once.
    # PART [4, splits, V, B]: per crop the (max, sum) of s/τ (base 2), the dot w·s/τ and the target sum c.
    b = tl.program_id(0)
    sp = tl.program_id(1)
    n_sp = tl.num_programs(1)
    k_lo = sp * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    vv = tl.arange(0, BLOCK_V)
    m = tl.full((BLOCK_V,), float("-inf"), dtype=tl.float32)
    l = tl.zeros((BLOCK_V,), dtype=tl.float32)
    dot = tl.zeros((BLOCK_V,), dtype=tl.float32)
    c = tl.zeros((BLOCK_V,), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        ok = kk < k_hi
        w = _targets(Q, b, B, G, vv, kk, ok, stride_q)
        s, _, mask = _student_tile(S, b, B, V, vv, kk, ok, stride_s)
        m, l = online_lse2(m, l, tl.where(mask, s * s2, float("-inf")), 1)
        dot += tl.sum(w * s, axis=1)
        c += tl.sum(w, axis=1)
    out = (sp * V + vv) * B + b
    n_out = n_sp * V * B
    tl.store(PART + out, m, mask=vv < V)
    tl.store(PART + n_out + out, l, mask=vv < V)
    tl.store(PART + 2 * n_out + out, dot * (s2 * TL_LN2), mask=vv < V)
    tl.store(PART + 3 * n_out + out, c, mask=vv < V)


@cached_launch
@triton.jit
def _loss_kernel(PART, STATS, LOSS, n_sp, n, inv_pairs, BLOCK_SP: tl.constexpr, BLOCK: tl.constexpr):
    # Grid (1,): DINO's `_merge_loss` with the target sums c merged from the splits too: STATS [2, n] = (lse, c).
    _merge_loss(PART, STATS, LOSS, n_sp, n, 0, 0, inv_pairs, True, BLOCK_SP, BLOCK)


@cached_launch
@triton.jit
def _backward_kernel(
    S,
    Q,
    STATS,
    GRAD,
    DS,
    B,
    V,
    G,
    K,
    stride_s,
    stride_q,
    stride_ds,
    s2,
    coef,
    BLOCK_K: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    # Grid (B, cdiv(K, BLOCK_K)): one [BLOCK_V, BLOCK_K] tile, every crop of image b at one chunk of columns;
    # lse and c are the forward's (saved).
    b = tl.program_id(0)
    kk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    ok = kk < K
    vv = tl.arange(0, BLOCK_V)
    w = _targets(Q, b, B, G, vv, kk, ok, stride_q)
    s, rows, mask = _student_tile(S, b, B, V, vv, kk, ok, stride_s)
    lse = tl.load(STATS + rows, mask=vv < V, other=0.0) * TL_LOG2E
    c = tl.load(STATS + V * B + rows, mask=vv < V, other=0.0)
    ds = tl.load(GRAD).to(tl.float32) * coef * (c[:, None] * tl.exp2(s * s2 - lse[:, None]) - w)
    tl.store(DS + rows[:, None] * stride_ds + kk[None, :], ds.to(DS.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------- launchers
def _shape(scores, codes, num_global):
    B = codes.shape[0] // num_global
    return B, scores.shape[0] // B, scores.shape[1]


def _config(scores: torch.Tensor, V: int, G: int) -> dict:
    """DINO's student tiles (8 KB per [BLOCK_V, BLOCK_K] tile); the codes are read row by row, no BLOCK_G."""
    cfg = _blocks(scores, V, G)
    del cfg["BLOCK_G"]
    return cfg


def swav_loss_forward(scores, codes, temperature, num_global):
    """(loss [], row statistics [2, V·B]: natural lse(scores/τ), then the target sums c), fp32."""
    G = num_global
    B, V, K = _shape(scores, codes, G)
    cfg = _config(scores, V, G)
    splits, per = _splits(B, K, cfg["BLOCK_K"], scores.device)
    part = empty((4, splits, V, B), dtype=torch.float32, device=scores.device)
    _forward_kernel[(B, splits)](
        scores, codes, part, B, V, G, K, scores.stride(0), codes.stride(0), per, LOG2E / temperature, **cfg
    )
    stats = empty((2, V * B), dtype=torch.float32, device=scores.device)
    loss = empty((), dtype=torch.float32, device=scores.device)
    _loss_kernel[(1,)](
        part,
        stats,
        loss,
        splits,
        V * B,
        1.0 / (B * G * (V - 1)),
        BLOCK_SP=next_pow2(splits),
        BLOCK=64 if interpreting() else 256,
        num_warps=_warps(),
    )
    return loss, stats


def swav_loss_backward(grad, scores, codes, stats, temperature, num_global):
    """∂loss/∂scores in the scores' dtype for the upstream gradient `grad` (0-d); `stats` from the forward."""
    G = num_global
    B, V, K = _shape(scores, codes, G)
    cfg = _config(scores, V, G)
    ds = empty(tuple(scores.shape), dtype=scores.dtype, device=scores.device)
    _backward_kernel[(B, cdiv(K, cfg["BLOCK_K"]))](
        scores,
        codes,
        stats,
        grad,
        ds,
        B,
        V,
        G,
        K,
        scores.stride(0),
        codes.stride(0),
        ds.stride(0),
        LOG2E / temperature,
        1.0 / (temperature * B * G * (V - 1)),
        **cfg,
    )
    return ds
