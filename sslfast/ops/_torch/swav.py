"""SwAV's swapped-prediction loss, its PyTorch implementation (the contract `sslfast.ops.swav.SwavImpl`; math
and notation in `sslfast.reference.swav`): the rearranged sums over chunks of images, so that the
temporaries stay within `CHUNK_ELEMS` floats. Work is in fp32 (fp64 for fp64 scores).
"""

from __future__ import annotations

import torch

CHUNK_ELEMS = 1 << 24  # fp32 elements of temporaries per chunk (64 MiB)


def num_pairs(num_crops: int, num_global: int) -> int:
    return num_global * (num_crops - 1)


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


def swav_loss_forward(
    scores: torch.Tensor, codes: torch.Tensor, temperature: float, num_global: int
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
        w = _targets(codes, G, B, V, b0, b1, work)  # [V, b, K]
        s = s_all[:, b0:b1].to(work) / temperature
        lse = torch.logsumexp(s, dim=-1)
        c = w.sum(-1)
        stats[0, :, b0:b1], stats[1, :, b0:b1] = lse, c
        total = total + (c * lse - (w * s).sum(-1)).sum()
    return total / (B * num_pairs(V, G)), stats.view(2, V * B)


def swav_loss_backward(
    grad: torch.Tensor,
    scores: torch.Tensor,
    codes: torch.Tensor,
    stats: torch.Tensor,
    temperature: float,
    num_global: int,
) -> torch.Tensor:
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
