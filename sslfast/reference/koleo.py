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
similarities). The op's PyTorch implementation is `sslfast.ops._torch.koleo`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PDIST_EPS = 1e-8  # DINOv2's `nn.PairwiseDistance(2, eps=1e-8)`, independent of the loss's ε


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
