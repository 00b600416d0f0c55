"""SigLIP's pairwise sigmoid loss written literally (`siglip_loss`): the paper's math with the N x N logits
materialized, as open_clip's `SigLipLoss` computes it. The float64 test oracle and the benchmark baseline;
nothing at run time calls it (the CPU path is `sslfast.ops._torch.siglip`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def siglip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    *,
    pos_off: int = 0,
) -> torch.Tensor:
    """L = −(1/M) Σ_ij log σ(z_ij (t · x̂_i·ŷ_j + b)) over the M image rows, z_ij = +1 where j = i + pos_off and
    −1 elsewhere: open_clip's `SigLipLoss` on one rank (square, pos_off = 0); a rank's share of the gathered
    loss otherwise (its images against every rank's texts, its positives at pos_off = rank·M)."""
    logits = logit_scale * F.normalize(image_features, dim=1) @ F.normalize(text_features, dim=1).T + logit_bias
    m, n = logits.shape
    rows, cols = torch.arange(m, device=logits.device), torch.arange(n, device=logits.device)
    labels = torch.where(cols[None, :] == (rows + pos_off)[:, None], 1.0, -1.0).to(logits.dtype)
    return -F.logsigmoid(labels * logits).sum() / m
