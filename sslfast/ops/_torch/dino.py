"""DINO's PyTorch implementation (the contract `sslfast.ops.dino.DinoImpl`; math and its rearrangement in
`sslfast.reference.dino`), for CPU tensors, fp64 and ``SSLFAST_BACKEND=reference``; and DINO's center update,
plain PyTorch on every device.

`dino_loss_forward` / `dino_loss_backward` run the rearranged sums over chunks of images so the temporaries stay
within `CHUNK_ELEMS` floats: per image one teacher sum P_Σ = Σ_g P_g and per crop a row log-sum-exp and a dot,
and the backward recomputes both softmaxes from the saved row LSEs. Work is in fp32 (fp64 for fp64 inputs).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ...distributed import is_distributed

CHUNK_ELEMS = 1 << 24  # fp32 elements of temporaries per chunk (64 MiB)


def num_pairs(num_crops: int, num_global: int) -> int:
    """n = G·V − G, the (teacher global crop, other student crop) pairs."""
    return num_global * num_crops - num_global


def _chunk_rows(B: int, K: int, V: int, G: int) -> int:
    return max(1, min(B, CHUNK_ELEMS // max(1, K * (V + G + 2))))


def _teacher_logits(
    teacher: torch.Tensor, center: torch.Tensor, teacher_temp: float, G: int, B: int, b0: int, b1: int
) -> torch.Tensor:
    """(t_g − c)/τ_t for images b0:b1, [G, b, K] in fp32 (fp64 for fp64 inputs)."""
    work = torch.promote_types(teacher.dtype, torch.float32)
    t = teacher.view(G, B, -1)[:, b0:b1].to(work)
    return (t - center.reshape(1, 1, -1).to(work)) / teacher_temp


def dino_loss_forward(
    student: torch.Tensor,
    teacher: torch.Tensor,
    center: torch.Tensor,
    student_temp: float,
    teacher_temp: float,
    num_global: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss [], log-sum-exps [(V + G)·B]: of student/τ_s per row, then of (teacher − center)/τ_t per row), fp32
    (fp64 for fp64 inputs). The backward takes the LSEs back instead of recomputing them."""
    G = num_global
    B = teacher.shape[0] // G
    V, K = student.shape[0] // B, student.shape[1]
    s_all = student.view(V, B, K)
    work = torch.promote_types(student.dtype, torch.float32)
    lse = torch.empty(V + G, B, dtype=work, device=student.device)
    total = torch.zeros((), dtype=work, device=student.device)
    step = _chunk_rows(B, K, V, G)
    for b0 in range(0, B, step):
        b1 = min(B, b0 + step)
        x = _teacher_logits(teacher, center, teacher_temp, G, B, b0, b1)  # [G, b, K]
        lse[V:, b0:b1] = torch.logsumexp(x, dim=-1)
        p = torch.exp(x - lse[V:, b0:b1, None])
        p_sum = p.sum(0)
        s = s_all[:, b0:b1].to(work) / student_temp  # [V, b, K]
        lse_c = torch.logsumexp(s, dim=-1)  # [V, b]
        lse[:V, b0:b1] = lse_c
        dots = torch.einsum("vbk,bk->vb", s, p_sum.to(s.dtype))
        dots[:G] -= torch.einsum("gbk,gbk->gb", s[:G], p.to(s.dtype))
        coef = torch.full((V, 1), float(G), dtype=s.dtype, device=s.device)
        coef[:G] -= 1
        total = total + (coef * lse_c - dots).sum()
    return total / (B * num_pairs(V, G)), lse.reshape(-1)


def dino_loss_backward(
    grad: torch.Tensor,
    student: torch.Tensor,
    teacher: torch.Tensor,
    center: torch.Tensor,
    lse: torch.Tensor,
    student_temp: float,
    teacher_temp: float,
    num_global: int,
) -> torch.Tensor:
    """∂loss/∂student_output (the teacher and the center get none), in the student's dtype; `lse` from the
    forward."""
    G = num_global
    B = teacher.shape[0] // G
    V, K = student.shape[0] // B, student.shape[1]
    s_all = student.view(V, B, K)
    lse = lse.view(V + G, B)
    out = torch.empty_like(student).view(V, B, K)
    work = torch.promote_types(student.dtype, torch.float32)
    scale = grad.to(work) / (student_temp * B * num_pairs(V, G))
    step = _chunk_rows(B, K, V, G)
    coef = torch.full((V, 1, 1), float(G), dtype=work, device=student.device)
    coef[:G] -= 1
    for b0 in range(0, B, step):
        b1 = min(B, b0 + step)
        x = _teacher_logits(teacher, center, teacher_temp, G, B, b0, b1)
        p = torch.exp(x - lse[V:, b0:b1, None].to(work))
        softmax = torch.exp(s_all[:, b0:b1].to(work) / student_temp - lse[:V, b0:b1, None].to(work))  # [V, b, K]
        g = coef * softmax - p.sum(0)
        g[:G] += p
        out[:, b0:b1] = (g * scale).to(student.dtype)
    return out.view_as(student)


def update_center_(center: torch.Tensor, teacher_output: torch.Tensor, momentum: float) -> None:
    """DINOLoss.update_center (facebookresearch/dino, main_dino.py): the batch center is the sum of the
    teacher outputs, all-reduced over ranks, divided by the global batch size; then
    center ← center·m + batch_center·(1 − m), in place."""
    with torch.no_grad():
        batch_center = torch.sum(
            teacher_output.to(torch.promote_types(teacher_output.dtype, torch.float32)), dim=0, keepdim=True
        )
        world = 1
        if is_distributed():
            dist.all_reduce(batch_center)
            world = dist.get_world_size()
        batch_center = batch_center / (len(teacher_output) * world)
        center.mul_(momentum).add_((batch_center * (1 - momentum)).reshape(center.shape).to(center.dtype))
