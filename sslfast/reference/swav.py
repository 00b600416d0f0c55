"""SwAV's swapped-prediction loss (Caron et al., 2020) in plain PyTorch: the literal code and the CPU path.

Layout: scores [V·B, K] holds the prototype scores of V crops of B images crop-major (the G global crops
first), codes [G·B, K] the Sinkhorn codes q_i of the G global crops (targets, no gradient). With
s_v = scores_v/τ, facebookresearch/swav main_swav.py computes

    loss = 1/G Σ_{i < G} 1/(V − 1) Σ_{v ≠ i} 1/B Σ_b CE(q_i[b], s_v[b]),   CE(q, s) = −Σ_k q_k log softmax(s)_k

that is, a mean over the n = G·(V − 1) pairs, the same pair structure as DINO's multi-crop loss. The codes'
rows need not sum to 1 exactly, so CE(q, s) = (Σ_k q_k)·lse(s) − q·s. Summing the pairs per crop v first,
with the targets w_v = Q_Σ − [v < G] q_v (Q_Σ = Σ_i q_i) and their row sums c_v = Σ_k w_v[k]:

    loss = 1/(B·n) Σ_{v, b} [ c_v[b]·lse(s_v[b]) − w_v[b]·s_v[b] ]
    ∂loss/∂scores_v[b] = (c_v[b]·softmax(s_v[b]) − w_v[b]) / (τ·B·n)

so the loss needs a per-row log-sum-exp, target sum and dot per crop, and the backward only the saved row
statistics (lse, c) [2, V·B]. `swav_loss_literal` is main_swav.py's loop (float64 test oracle, benchmark
baseline); `swav_loss_forward` / `swav_loss_backward` run the rearranged sums over chunks of images so the
temporaries stay within `CHUNK_ELEMS` floats. Work is in fp32 (fp64 for fp64 scores).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK_ELEMS = 1 << 24  # fp32 elements of temporaries per chunk (64 MiB)


def num_pairs(num_crops: int, num_global: int) -> int:
    return num_global * (num_crops - 1)


def swav_loss_literal(scores: torch.Tensor, codes: torch.Tensor, temperature: float, num_global: int = 2
                      ) -> torch.Tensor:
    """facebookresearch/swav main_swav.py, the swapped-prediction loop of `train` (crops_for_assign = the first
    `num_global` crops, their codes given)."""
    bs = codes.shape[0] // num_global
    n_crops = scores.shape[0] // bs
    loss = 0
    for i in range(num_global):
        q = codes[bs * i:bs * (i + 1)].detach()
        subloss = 0
        for v in (v for v in range(n_crops) if v != i):
            x = scores[bs * v:bs * (v + 1)] / temperature
            subloss -= torch.mean(torch.sum(q * F.log_softmax(x, dim=1), dim=1))
        loss += subloss / (n_crops - 1)
    return loss / num_global


def _work(scores: torch.Tensor) -> torch.dtype:
    return torch.promote_types(scores.dtype, torch.float32)


def _shape(scores: torch.Tensor, codes: torch.Tensor, num_global: int) -> tuple[int, int, int]:
    B = codes.shape[0] // num_global
    return B, scores.shape[0] // B, scores.shape[1]


def _chunk_rows(B: int, K: int, V: int, G: int) -> int:
    return max(1, min(B, CHUNK_ELEMS // max(1, K * (2 * V + G))))


def _targets(codes: torch.Tensor, G: int, B: int, V: int, b0: int, b1: int, work: torch.dtype) -> torch.Tensor:
    """w_v = Q_Σ − [v < G] q_v for images b0:b1, [V, b, K] in `work`."""
    q = codes.view(G, B, -1)[:, b0:b1].to(work)
    w = q.sum(0, keepdim=True).repeat(V, 1, 1)
    w[:G] -= q
    return w


def swav_loss_forward(scores: torch.Tensor, codes: torch.Tensor, temperature: float, num_global: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss [], row statistics [2, V·B]: lse(scores/τ) per row, then the target sums c per row), fp32 (fp64
    for fp64 scores). The backward takes the statistics back instead of recomputing them."""
    G = num_global
    B, V, K = _shape(scores, codes, G)
    work = _work(scores)
    s_all = scores.view(V, B, K)
    stats = torch.empty(2, V, B, dtype=work, device=scores.device)
    total = torch.zeros((), dtype=work, device=scores.device)
    step = _chunk_rows(B, K, V, G)
    for b0 in range(0, B, step):
        b1 = min(B, b0 + step)
        w = _targets(codes, G, B, V, b0, b1, work)                 # [V, b, K]
        s = s_all[:, b0:b1].to(work) / temperature
        lse = torch.logsumexp(s, dim=-1)
        c = w.sum(-1)
        stats[0, :, b0:b1], stats[1, :, b0:b1] = lse, c
        total = total + (c * lse - (w * s).sum(-1)).sum()
    return total / (B * num_pairs(V, G)), stats.view(2, V * B)


def swav_loss_backward(grad: torch.Tensor, scores: torch.Tensor, codes: torch.Tensor, stats: torch.Tensor,
                       temperature: float, num_global: int) -> torch.Tensor:
    """∂loss/∂scores (the codes get none) in the scores' dtype; `stats` from the forward."""
    G = num_global
    B, V, K = _shape(scores, codes, G)
    work = _work(scores)
    s_all = scores.view(V, B, K)
    stats = stats.view(2, V, B).to(work)
    out = torch.empty_like(scores).view(V, B, K)
    scale = grad.to(work) / (temperature * B * num_pairs(V, G))
    step = _chunk_rows(B, K, V, G)
    for b0 in range(0, B, step):
        b1 = min(B, b0 + step)
        w = _targets(codes, G, B, V, b0, b1, work)
        softmax = torch.exp(s_all[:, b0:b1].to(work) / temperature - stats[0, :, b0:b1, None])
        out[:, b0:b1] = ((stats[1, :, b0:b1, None] * softmax - w) * scale).to(scores.dtype)
    return out.view_as(scores)
