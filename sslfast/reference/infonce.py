"""The InfoNCE family's losses written literally: `nt_xent_loss`, `info_nce_loss` and `clip_loss`, the papers'
math with the full logit matrix materialized, as lightly / solo-learn / open_clip compute it. They are the
float64 test oracle and the benchmark baseline; nothing at run time calls them (the CPU path is
`sslfast.ops._torch.infonce`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def _cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mean_i −log softmax(logits_i)[target_i]. In float64, the test oracle's dtype, it is evaluated as
    softplus(logsumexp(negatives − positive)), the same quantity without the 1 − softmax cancellation that
    zeroes gradients once a row's loss drops under 1e-16; otherwise as F.cross_entropy, what users run."""
    if logits.dtype != torch.float64:
        return F.cross_entropy(logits.to(_compute_dtype(logits)), target)
    pos = logits.gather(1, target[:, None])
    neg = logits.scatter(1, target[:, None], float("-inf"))
    return F.softplus(torch.logsumexp(neg - pos, dim=1)).mean()


def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """SimCLR: z = normalize([z1; z2]), S = z zᵀ/τ, row i's positive is i ± N, the diagonal is excluded,
    loss = mean over the 2N rows of −log softmax(S_i)[positive]."""
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    s = (z @ z.T) / temperature
    s.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(s.device)
    return _cross_entropy(s, target)


def info_nce_loss(
    query: torch.Tensor, key: torch.Tensor, queue: torch.Tensor | None = None, temperature: float = 0.2
) -> torch.Tensor:
    """MoCo. With a queue: logits_i = [q̂_i·k̂_i, q̂_i·queuê_j...]/τ, target 0. Without: q̂ k̂ᵀ/τ, target i."""
    q = F.normalize(query, dim=1)
    k = F.normalize(key, dim=1)
    if queue is None:
        return _cross_entropy(q @ k.T / temperature, torch.arange(q.shape[0], device=q.device))
    neg = q @ F.normalize(queue, dim=1).detach().T
    logits = torch.cat([(q * k).sum(1, keepdim=True), neg], dim=1) / temperature
    return _cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """CLIP: L = logit_scale · norm(img) norm(txt)ᵀ; (CE(L, arange) + CE(Lᵀ, arange)) / 2."""
    logits = logit_scale * F.normalize(image_features, dim=1) @ F.normalize(text_features, dim=1).T
    target = torch.arange(logits.shape[0], device=logits.device)
    return (_cross_entropy(logits, target) + _cross_entropy(logits.T, target)) / 2
