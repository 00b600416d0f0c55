"""KoLeo's PyTorch implementation (the contract `sslfast.ops.koleo.KoleoImpl`; math in
`sslfast.reference.koleo`): `koleo_forward` searches the neighbours over chunks of rows, so its similarities take
`CHUNK_ELEMS` floats at most, and `koleo_backward` is the closed-form gradient. Work is in fp32 (fp64 for fp64 x).
"""

from __future__ import annotations

import torch

PDIST_EPS = 1e-8  # DINOv2's `nn.PairwiseDistance(2, eps=1e-8)`, independent of the loss's ε
CHUNK_ELEMS = 1 << 24  # similarity elements per chunk of rows (64 MiB in fp32)


def _work(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def nearest_neighbours(unit: torch.Tensor) -> torch.Tensor:
    """argmax_{j≠i} unit_i·unit_j [N] int64, over chunks of rows."""
    N = unit.shape[0]
    out = torch.empty(N, dtype=torch.int64, device=unit.device)
    step = max(1, CHUNK_ELEMS // N)
    for i0 in range(0, N, step):
        i1 = min(N, i0 + step)
        sims = unit[i0:i1] @ unit.t()
        rows = torch.arange(i1 - i0, device=unit.device)
        sims[rows, rows + i0] = float("-inf")
        out[i0:i1] = sims.argmax(dim=1)
    return out


def koleo_forward(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss [], neighbours n [N] int64, distances d [N], inverse norms 1/max(‖x_i‖, ε) [N]); differentiable in x
    through plain autograd when grad mode is on (the neighbours are constants)."""
    work = _work(x)
    rnorm = 1.0 / work.norm(dim=1).clamp_min(eps)
    unit = work * rnorm[:, None]
    with torch.no_grad():
        nn = nearest_neighbours(unit)
    dist = (unit - unit[nn] + PDIST_EPS).norm(dim=1)
    return -torch.log(dist + eps).mean(), nn, dist, rnorm


def koleo_backward(
    grad: torch.Tensor, x: torch.Tensor, nn: torch.Tensor, dist: torch.Tensor, rnorm: torch.Tensor, eps: float
) -> torch.Tensor:
    """∂loss/∂x in x's dtype for the upstream gradient `grad` (0-d); the rest from `koleo_forward`."""
    work = _work(x)
    unit = work * rnorm[:, None]
    delta = unit - unit[nn] + PDIST_EPS
    w = torch.where(dist > 0, -grad.to(work.dtype) / (x.shape[0] * dist * (dist + eps)), 0.0)
    g_unit = w[:, None] * delta
    g_unit = g_unit.index_add(0, nn, -g_unit)
    radial = torch.where(rnorm < 1.0 / eps, (unit * g_unit).sum(1), 0.0)
    return (rnorm[:, None] * (g_unit - unit * radial[:, None])).to(x.dtype)
