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

`sinkhorn_knopp_literal` is DINOv2's code (float64 test oracle, benchmark baseline). The op's PyTorch
implementation of the log-domain passes is `sslfast.ops._torch.sinkhorn`.
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
