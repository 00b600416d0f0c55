"""iBOT's masked-patch loss as DINOv2 computes it (Zhou et al., 2022; Oquab et al., 2023) written literally.

DINOv2's `iBOTPatchLoss` scores student patch logits s [.., K] against teacher patch probabilities t [.., K]
(no gradient) with the soft cross-entropy of each token,

    ℓ(t, s) = −Σ_k t_k log softmax(s/τ)_k = (Σ_k t_k)·lse(s/τ) − t·s/τ     (the teacher rows need not sum to 1)

and a weighted sum over tokens: `forward` on [B, L, K] tokens with a mask [B, L] uses, for token l of image b,

    w_bl = mask_bl / (max(n_b, 1)·B),   n_b = Σ_l mask_bl        (masked tokens, mean per image, mean over images)

and `forward_masked` on the masked tokens only, [M, K], uses w_m = masks_weight_m / n_images for the first
n_masked_patches rows (0 for the rows after them). Both are loss = Σ_r w_r ℓ(t_r, s_r) over token rows r, with

    ∂loss/∂s_r = w_r·((Σ_k t_r,k)·softmax(s_r/τ) − t_r) / τ

so the forward keeps the row statistics (lse, Σt) [2, R] and the backward needs nothing else. Rows with
w_r = 0 (unmasked tokens, padding) are neither read nor differentiated: their gradient is 0.

`ibot_patch_loss_literal` / `ibot_patch_loss_masked_literal` are DINOv2's `forward` / `forward_masked`
(float64 test oracles, benchmark baselines). The op's PyTorch implementation of the weighted rows is
`sslfast.ops._torch.ibot`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _lossfunc(t: torch.Tensor, s: torch.Tensor, temp: float) -> torch.Tensor:
    """dinov2/loss/ibot_patch_loss.py `lossfunc`."""
    return torch.sum(t * F.log_softmax(s / temp, dim=-1), dim=-1)


def ibot_patch_loss_literal(
    student_patch_tokens: torch.Tensor,
    teacher_patch_tokens: torch.Tensor,
    student_masks_flat: torch.Tensor,
    student_temp: float,
) -> torch.Tensor:
    """facebookresearch/dinov2 `iBOTPatchLoss.forward`: tokens [B, L, K], masks [B, L]."""
    t = teacher_patch_tokens
    s = student_patch_tokens
    loss = torch.sum(t * F.log_softmax(s / student_temp, dim=-1), dim=-1)
    loss = torch.sum(loss * student_masks_flat.float(), dim=-1) / student_masks_flat.sum(dim=-1).clamp(min=1.0)
    return -loss.mean()


def ibot_patch_loss_masked_literal(
    student_patch_tokens_masked: torch.Tensor,
    teacher_patch_tokens_masked: torch.Tensor,
    student_masks_flat: torch.Tensor,
    student_temp: float,
    n_masked_patches: int | None = None,
    masks_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """facebookresearch/dinov2 `iBOTPatchLoss.forward_masked`: masked tokens [M, K], masks [B, L]."""
    t = teacher_patch_tokens_masked
    s = student_patch_tokens_masked
    loss = _lossfunc(t, s, student_temp)
    if masks_weight is None:
        masks_weight = (
            (1 / student_masks_flat.sum(-1).clamp(min=1.0))
            .unsqueeze(-1)
            .expand_as(student_masks_flat)[student_masks_flat]
        )
    if n_masked_patches is not None:
        loss = loss[:n_masked_patches]
    loss = loss * masks_weight
    return -loss.sum() / student_masks_flat.shape[0]
