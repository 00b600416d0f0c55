"""SwAV's swapped-prediction loss (Caron et al., 2020) written literally.

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
baseline); the op's PyTorch implementation of the rearranged sums is `sslfast.ops._torch.swav`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def swav_loss_literal(
    scores: torch.Tensor, codes: torch.Tensor, temperature: float, num_global: int = 2
) -> torch.Tensor:
    """facebookresearch/swav main_swav.py, the swapped-prediction loop of `train` (crops_for_assign = the first
    `num_global` crops, their codes given)."""
    bs = codes.shape[0] // num_global
    n_crops = scores.shape[0] // bs
    loss = 0
    for i in range(num_global):
        q = codes[bs * i : bs * (i + 1)].detach()
        subloss = 0
        for v in (v for v in range(n_crops) if v != i):
            x = scores[bs * v : bs * (v + 1)] / temperature
            subloss -= torch.mean(torch.sum(q * F.log_softmax(x, dim=1), dim=1))
        loss += subloss / (n_crops - 1)
    return loss / num_global
