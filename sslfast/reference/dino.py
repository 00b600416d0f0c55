"""DINO's loss (Caron et al., 2021) in plain PyTorch: the literal code and the memory-frugal CPU path.

Layout: student_output [V·B, K] holds V crops of B images crop-major (the G global crops first, then the
local crops), teacher_output [G·B, K] the teacher's G global crops in the same order. With
P_g = softmax((t_g − c)/τ_t) (teacher, no gradient) and s_v = student_v/τ_s,

    loss = 1/(B·n) Σ_b Σ_{g < G} Σ_{v ≠ g} CE(P_g[b], s_v[b]),   n = G·V − G pairs (G·(G − 1) when V = G)

and since Σ_k P = 1, CE(P, s) = lse(s) − P·s. Summing the pairs per student crop first,

    Σ_g Σ_{v≠g} CE = Σ_v [ c_v lse(s_v) − (P_Σ − [v < G] P_v) · s_v ],  P_Σ = Σ_g P_g,  c_v = G − [v < G]

so the loss needs one [B, K] teacher sum and a per-row log-sum-exp and dot per crop: no pair's softmax or
product is ever stored, and the backward recomputes both softmaxes from the saved row LSEs:

    ∂loss/∂student_v[b] = (c_v softmax(s_v[b]) − (P_Σ[b] − [v < G] P_v[b])) / (τ_s · B · n)

`dino_loss_literal` is the facebookresearch/dino `DINOLoss.forward` (float64 test oracle and benchmark
baseline); `dino_loss_forward` / `dino_loss_backward` run the rearranged sums over chunks of images so the
temporaries stay within `CHUNK_ELEMS` floats.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK_ELEMS = 1 << 24  # fp32 elements of temporaries per chunk (64 MiB)


def num_pairs(num_crops: int, num_global: int) -> int:
    return num_global * num_crops - num_global


def dino_loss_literal(student_output: torch.Tensor, teacher_output: torch.Tensor, center: torch.Tensor,
                      student_temp: float, teacher_temp: float, num_global: int = 2) -> torch.Tensor:
    """facebookresearch/dino main_dino.py, DINOLoss.forward (without the center update)."""
    B = teacher_output.shape[0] // num_global
    ncrops = student_output.shape[0] // B
    student_out = (student_output / student_temp).chunk(ncrops)
    teacher_out = F.softmax((teacher_output - center) / teacher_temp, dim=-1).detach().chunk(num_global)
    total_loss, n_loss_terms = 0, 0
    for iq, q in enumerate(teacher_out):
        for v in range(len(student_out)):
            if v == iq:
                continue
            loss = torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1)
            total_loss += loss.mean()
            n_loss_terms += 1
    return total_loss / n_loss_terms


def _chunk_rows(B: int, K: int, V: int, G: int) -> int:
    return max(1, min(B, CHUNK_ELEMS // max(1, K * (V + G + 2))))


def _teacher_logits(teacher: torch.Tensor, center: torch.Tensor, teacher_temp: float, G: int, B: int,
                    b0: int, b1: int) -> torch.Tensor:
    """(t_g − c)/τ_t for images b0:b1, [G, b, K] in fp32 (fp64 for fp64 inputs)."""
    work = torch.promote_types(teacher.dtype, torch.float32)
    t = teacher.view(G, B, -1)[:, b0:b1].to(work)
    return (t - center.reshape(1, 1, -1).to(work)) / teacher_temp


def dino_loss_forward(student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor, student_temp: float,
                      teacher_temp: float, num_global: int) -> tuple[torch.Tensor, torch.Tensor]:
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
        x = _teacher_logits(teacher, center, teacher_temp, G, B, b0, b1)       # [G, b, K]
        lse[V:, b0:b1] = torch.logsumexp(x, dim=-1)
        p = torch.exp(x - lse[V:, b0:b1, None])
        p_sum = p.sum(0)
        s = s_all[:, b0:b1].to(work) / student_temp   # [V, b, K]
        lse_c = torch.logsumexp(s, dim=-1)                                     # [V, b]
        lse[:V, b0:b1] = lse_c
        dots = torch.einsum("vbk,bk->vb", s, p_sum.to(s.dtype))
        dots[:G] -= torch.einsum("gbk,gbk->gb", s[:G], p.to(s.dtype))
        coef = torch.full((V, 1), float(G), dtype=s.dtype, device=s.device)
        coef[:G] -= 1
        total = total + (coef * lse_c - dots).sum()
    return total / (B * num_pairs(V, G)), lse.reshape(-1)


def dino_loss_backward(grad: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor,
                       lse: torch.Tensor, student_temp: float, teacher_temp: float, num_global: int) -> torch.Tensor:
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
