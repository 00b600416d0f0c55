"""DINO's loss (Caron et al., 2021): its math, the rearrangement the op computes, and the literal code.

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
baseline). The op's PyTorch implementation, which runs the rearranged sums over chunks of images, is
`sslfast.ops._torch.dino`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dino_loss_literal(
    student_output: torch.Tensor,
    teacher_output: torch.Tensor,
    center: torch.Tensor,
    student_temp: float,
    teacher_temp: float,
    num_global: int = 2,
) -> torch.Tensor:
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
