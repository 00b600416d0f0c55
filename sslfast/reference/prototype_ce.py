"""Prototype-head cross-entropy (DINO / DINOv2 / SwAV heads) written literally: the float64 test oracle and the
benchmark baseline. Nothing at run time calls it (the CPU path is `sslfast.ops._torch.prototype_ce`).

Student side. With student features x [B, D], prototypes W [K, D] (the head's effective last-layer weight),
teacher probabilities p [B, K] (no gradient; rows need not sum to 1), s = x Wᵀ/τ_s and r_i = Σ_k p_ik:

    loss   = mean_i Σ_k p_ik · −log softmax(s_i)_k = mean_i (r_i·lse_i − Σ_k p_ik s_ik)
    dS_ik  = g·(r_i·softmax(s_i)_k − p_ik)/B,   dX = dS W/τ_s,   dW = dSᵀ X/τ_s    (upstream gradient g)

Teacher side. With teacher features f [B, D], the teacher's prototypes W [K, D] and z = f Wᵀ:

    centering (DINO):            p_i = softmax((z_i − c)/τ_t),   then c ← m·c + (1 − m)·mean_i z_i
    sinkhorn (DINOv2, SwAV):     p = SinkhornKnopp(z, τ_t, n_iters)   (`sslfast.reference.sinkhorn`)

The batch mean of z is linear in f: mean_i z_i = (mean_i f_i) Wᵀ, which is how the runtime updates the center
without the B×K logits (the mean all-reduced over ranks, as DINO's `update_center`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .sinkhorn import sinkhorn_knopp_literal


def prototype_cross_entropy_literal(
    x: torch.Tensor, w: torch.Tensor, p: torch.Tensor, student_temp: float
) -> torch.Tensor:
    """mean_i Σ_k −p_ik log softmax(x_i Wᵀ/τ)_k, materialized (in the inputs' dtype)."""
    logits = (x @ w.T) / student_temp
    return torch.sum(-p * F.log_softmax(logits, dim=-1), dim=-1).mean()


def prototype_teacher_probs_literal(
    f: torch.Tensor,
    w: torch.Tensor,
    teacher_temp: float,
    *,
    center: torch.Tensor | None = None,
    mode: str = "centering",
    sinkhorn_iters: int = 3,
) -> torch.Tensor:
    """The teacher targets from the materialized logits z = f Wᵀ: DINO's softmax((z − center)/τ_t) (center
    None: 0), or DINOv2's `sinkhorn_knopp_teacher(z, τ_t, sinkhorn_iters)`."""
    logits = f @ w.T
    if mode == "sinkhorn":
        return sinkhorn_knopp_literal(logits, teacher_temp, sinkhorn_iters)
    return F.softmax((logits - (0.0 if center is None else center)) / teacher_temp, dim=-1)


def updated_center_literal(
    center: torch.Tensor, f: torch.Tensor, w: torch.Tensor, momentum: float, world_feats: torch.Tensor | None = None
) -> torch.Tensor:
    """DINO's `update_center` on the materialized logits, out of place: m·center + (1 − m)·mean over the
    global batch of f Wᵀ (`world_feats`: every rank's features concatenated; default `f`)."""
    logits = (f if world_feats is None else world_feats) @ w.T
    return center * momentum + logits.mean(dim=0).reshape(center.shape) * (1 - momentum)
