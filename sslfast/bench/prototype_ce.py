"""Prototype-head cross-entropy benchmark cases: the fused op (forward + backward into the features and the
prototypes) against the materialized formula the DINO / DINOv2 / SwAV heads run today
(`sslfast.reference.prototype_ce.prototype_cross_entropy_literal`).

FLOPs (what the fused kernels execute, 2 per multiply-add): forward 2BKD; the backward recomputes the logits in
both of its kernels, dX = 2BKD + 2BKD and dW = 2BKD + 2BKD: 10BKD in all (the materialized version: 6BKD).
Bytes: the teacher probabilities [B, K] are read by each of the three kernels; features and prototypes are read
by each and their gradients written once: 3·B·K·|p| + 4·(B + K)·D·|x|.

Teacher side (`prototype_teacher_probs`, DINO's centering with the center update) against the materialized
softmax((f Wᵀ − c)/τ_t): 4BKD FLOPs (the two passes each compute the logits), and 4·B·K bytes of fp32 targets
written plus 2·(B + K)·D·|x| read.
"""

import torch

from .. import ops
from ..reference import prototype_ce as R
from . import Setup, fwd_bwd, register


def _case(B: int, K: int, D: int, temp: float = 0.1):
    def setup(device, dtype):
        x = torch.nn.functional.normalize(torch.randn(B, D, device=device), dim=1).to(dtype).requires_grad_()
        w = torch.nn.functional.normalize(torch.randn(K, D, device=device), dim=1).to(dtype).requires_grad_()
        p = torch.softmax(torch.randn(B, K, device=device, dtype=dtype), dim=1)
        return Setup(
            fused=fwd_bwd(lambda: ops.prototype_cross_entropy(x, w, p, student_temp=temp), x, w),
            reference=fwd_bwd(lambda: R.prototype_cross_entropy_literal(x, w, p, temp), x, w),
            flops=10.0 * B * K * D,
            bytes=float(3 * B * K * p.element_size() + 4 * (B + K) * D * x.element_size()),
        )

    return setup


def _teacher_case(B: int, K: int, D: int, temp: float = 0.04):
    def setup(device, dtype):
        f = torch.nn.functional.normalize(torch.randn(B, D, device=device), dim=1).to(dtype)
        w = torch.nn.functional.normalize(torch.randn(K, D, device=device), dim=1).to(dtype)
        c = torch.zeros(1, K, device=device)
        return Setup(
            fused=lambda: ops.prototype_teacher_probs(f, w, teacher_temp=temp, center=c, center_momentum=0.9),
            reference=lambda: R.prototype_teacher_probs_literal(f, w, temp, center=c),
            flops=4.0 * B * K * D,
            bytes=float(4 * B * K + 2 * (B + K) * D * f.element_size()),
        )

    return setup


register("prototype_ce", "B=4096 K=131072 D=256", dtypes=(torch.bfloat16,))(_case(4096, 131072, 256))
register("prototype_ce", "B=4096 K=65536 D=256", dtypes=(torch.bfloat16, torch.float32))(_case(4096, 65536, 256))
register("prototype_ce", "B=64 K=512 D=32 (smoke)", dtypes=(torch.float32,), device_types=("cpu",))(_case(64, 512, 32))
register("prototype_ce", "teacher B=4096 K=65536 D=256", dtypes=(torch.bfloat16,))(_teacher_case(4096, 65536, 256))
register("prototype_ce", "teacher B=64 K=512 D=32 (smoke)", dtypes=(torch.float32,), device_types=("cpu",))(
    _teacher_case(64, 512, 32)
)
