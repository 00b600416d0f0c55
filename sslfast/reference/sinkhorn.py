"""Sinkhorn-Knopp teacher targets (SwAV, Caron et al., 2020; DINOv2, Oquab et al., 2023) in plain PyTorch.

With logits x [B, K] (B samples, K prototypes) and s = x/τ, DINOv2's `sinkhorn_knopp_teacher` (SwAV's
`distributed_sinkhorn`) is, on Q = exp(s)ᵀ [K, B] with B = B_global:

    Q /= Σ Q;   n_iters times:  Q[k, :] /= K Σ_b Q[k, b]  (prototype sums all-reduced over ranks),
                               Q[:, b] /= B Σ_k Q[k, b];
    return (B·Q)ᵀ  [B, K]

Every step rescales rows or columns, so Q stays exp(s_bk + u_k + v_b) for a K-vector u and a B-vector v, and
the steps are log-sum-exps of the potentials (constant offsets such as log K, log B and the first global sum
cancel in the next normalization, so they are dropped):

    v = 0;  n_iters times:  u_k = −LSE_b(s_bk + v_b)   (the LSE over b merged across ranks),
                            v_b = −LSE_k(s_bk + u_k)   (skipped in the last iteration);
    Q[b, k] = softmax_k(s_b + u)[k]

The last column normalization and the final ·B make each output row a softmax, so the rows sum to 1 exactly;
the prototype marginals Σ_b Q[b, k] only approach B/K as n_iters grows. Unlike exp(s) (which overflows in
fp32 once s > 88, e.g. logits of 5 at τ = 0.05), the log-domain form never overflows, and it keeps prototypes
whose logits all lie far below the global maximum (their exp underflows to 0 and the literal row division is
0/0). The result is mathematically the literal one.

`sinkhorn_knopp_literal` is DINOv2's code (float64 test oracle, benchmark baseline); `column_potential`,
`row_lse` and `softmax_rows` are the CPU path's passes (`sslfast.ops.sinkhorn` runs the loop and the
collectives). Work is in fp32 (fp64 for fp64 logits).
"""
from __future__ import annotations

import torch


def sinkhorn_knopp_literal(teacher_output: torch.Tensor, teacher_temp: float, n_iterations: int = 3) -> torch.Tensor:
    """facebookresearch/dinov2 `SinkhornKnoppTeacher.sinkhorn_knopp_teacher`, single process, in the logits'
    dtype if it is float64 (fp32 otherwise, as DINOv2's `.float()`)."""
    teacher_output = teacher_output.double() if teacher_output.dtype == torch.float64 else teacher_output.float()
    Q = torch.exp(teacher_output / teacher_temp).t()
    B = Q.shape[1]
    K = Q.shape[0]
    Q /= torch.sum(Q)
    for _ in range(n_iterations):
        Q /= torch.sum(Q, dim=1, keepdim=True)
        Q /= K
        Q /= torch.sum(Q, dim=0, keepdim=True)
        Q /= B
    Q *= B
    return Q.t()


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
