"""Sinkhorn-Knopp's PyTorch implementation (the contract `sslfast.ops.sinkhorn.SinkhornImpl`; math in
`sslfast.reference.sinkhorn`): the three log-domain passes over logits x [B, K] at inverse temperature
1/τ, each a `torch.logsumexp` or `torch.softmax` over s = x/τ plus a potential. `sslfast.ops.sinkhorn` runs
the loop and the collectives. Work is in fp32 (fp64 for fp64 logits).
"""

from __future__ import annotations

import torch


def _scores(x: torch.Tensor, inv_temp: float) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32)) * inv_temp


def column_potential(x: torch.Tensor, v: torch.Tensor, inv_temp: float) -> torch.Tensor:
    """LSE_b(x_bk·inv_temp + v_b) [K] (this rank's samples only)."""
    return torch.logsumexp(_scores(x, inv_temp) + v[:, None], dim=0)


def row_lse(x: torch.Tensor, u: torch.Tensor, inv_temp: float) -> torch.Tensor:
    """LSE_k(x_bk·inv_temp + u_k) [B]."""
    return torch.logsumexp(_scores(x, inv_temp) + u[None, :], dim=1)


def softmax_rows(x: torch.Tensor, u: torch.Tensor, inv_temp: float) -> torch.Tensor:
    """softmax_k(x_bk·inv_temp + u_k) [B, K]."""
    return torch.softmax(_scores(x, inv_temp) + u[None, :], dim=1)
