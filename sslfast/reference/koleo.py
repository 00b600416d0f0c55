"""DINOv2's KoLeo regularizer (Sablayrolles et al., 2019; Oquab et al., 2023) in plain PyTorch.

On the L2-normalized rows x̂_i = x_i / max(‖x_i‖, ε) of x [N, D], with n(i) = argmax_{j≠i} x̂_i·x̂_j the nearest
neighbour (a constant for autograd, as the argmax in DINOv2's code is) and p = 1e-8 the offset
`nn.PairwiseDistance(2, eps=1e-8)` adds to each difference:

    δ_i = x̂_i − x̂_{n(i)} + p·𝟙,   d_i = ‖δ_i‖,   loss = −(1/N) Σ_i log(d_i + ε)

Gradient: with w_i = −1 / (N d_i (d_i + ε)) (0 where d_i = 0, as the norm's backward gives),

    ∂loss/∂x̂_j = w_j δ_j − Σ_{i: n(i) = j} w_i δ_i
    ∂loss/∂x_j = (∂loss/∂x̂_j − [‖x_j‖ > ε] x̂_j (x̂_j·∂loss/∂x̂_j)) / max(‖x_j‖, ε)

DINOv2 excludes i from its own search by setting the diagonal of the similarities to −1; here it is excluded
outright (the two differ only when every other row is exactly antipodal to x̂_i). Among equal similarities
the smallest j wins.

`koleo_loss_literal` is DINOv2's `KoLeoLoss.forward` (float64 test oracle, benchmark baseline, N×N
similarities); `koleo_forward` searches the neighbours over chunks of rows, so its similarities take
`CHUNK_ELEMS` floats at most, and `koleo_backward` is the formula above. Work is in fp32 (fp64 for fp64 x).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

PDIST_EPS = 1e-8  # DINOv2's `nn.PairwiseDistance(2, eps=1e-8)`, independent of the loss's ε
CHUNK_ELEMS = 1 << 24  # similarity elements per chunk of rows (64 MiB in fp32)


def koleo_loss_literal(student_output: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """facebookresearch/dinov2 `KoLeoLoss.forward` (autocast off, the neighbour search as its
    `pairwise_NNs_inner`)."""
    student_output = F.normalize(student_output, eps=eps, p=2, dim=-1)
    with torch.no_grad():
        dots = torch.mm(student_output, student_output.t())
        n = student_output.shape[0]
        dots.view(-1)[:: (n + 1)].fill_(-1)
        _, index = torch.max(dots, dim=1)
    distances = F.pairwise_distance(student_output, student_output[index], p=2, eps=PDIST_EPS)
    return -torch.log(distances + eps).mean()


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


def koleo_backward(grad: torch.Tensor, x: torch.Tensor, nn: torch.Tensor, dist: torch.Tensor, rnorm: torch.Tensor,
                   eps: float) -> torch.Tensor:
    """∂loss/∂x in x's dtype for the upstream gradient `grad` (0-d); the rest from `koleo_forward`."""
    work = _work(x)
    unit = work * rnorm[:, None]
    delta = unit - unit[nn] + PDIST_EPS
    w = torch.where(dist > 0, -grad.to(work.dtype) / (x.shape[0] * dist * (dist + eps)), 0.0)
    g_unit = w[:, None] * delta
    g_unit = g_unit.index_add(0, nn, -g_unit)
    radial = torch.where(rnorm < 1.0 / eps, (unit * g_unit).sum(1), 0.0)
    return (rnorm[:, None] * (g_unit - unit * radial[:, None])).to(x.dtype)
