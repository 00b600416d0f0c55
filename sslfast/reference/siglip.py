"""SigLIP's pairwise sigmoid loss in plain PyTorch.

* `siglip_loss`: the paper's math with the N x N logits materialized, as open_clip's `SigLipLoss` computes
  it: the float64 test oracle and the benchmark baseline;
* `siglip_rows`: the same sweep as `sslfast.kernels.siglip.siglip_rows` (loss, ∂L/∂r̂, ∂L/∂t, ∂L/∂b of the
  rows of r against the columns c), `CHUNK_ELEMS` logits at a time, so CPU memory stays O(chunk + N·D). It is
  the CPU path (float64 included); the math is documented in `sslfast.kernels.siglip`. The normalization
  helpers are InfoNCE's.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .infonce import CHUNK_ELEMS, row_normalize_backward, row_rnorm  # noqa: F401  (shared with InfoNCE)


def siglip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: torch.Tensor, *, pos_off: int = 0) -> torch.Tensor:
    """L = −(1/M) Σ_ij log σ(z_ij (t · x̂_i·ŷ_j + b)) over the M image rows, z_ij = +1 where j = i + pos_off and
    −1 elsewhere: open_clip's `SigLipLoss` on one rank (square, pos_off = 0); a rank's share of the gathered
    loss otherwise (its images against every rank's texts, its positives at pos_off = rank·M)."""
    logits = (logit_scale * F.normalize(image_features, dim=1) @ F.normalize(text_features, dim=1).T
              + logit_bias)
    m, n = logits.shape
    rows, cols = torch.arange(m, device=logits.device), torch.arange(n, device=logits.device)
    labels = torch.where(cols[None, :] == (rows + pos_off)[:, None], 1.0, -1.0).to(logits.dtype)
    return -F.logsigmoid(labels * logits).sum() / m


def siglip_rows(r, c, rn_r, rn_c, scale, bias, weight, pos_off: int, *, want_loss: bool, want_grad: bool,
                want_scalars: bool):
    """(Σ_ij ℓ_ij or None, ∂L/∂r̂ or None, ∂L/∂t or None, ∂L/∂b or None) in fp32 (fp64 for fp64 inputs), row
    chunks at a time; the gradients carry the weight w. See `sslfast.kernels.siglip`."""
    ct = torch.promote_types(r.dtype, torch.float32)
    m, nc = r.shape[0], c.shape[0]
    rh = r.to(ct) * rn_r.to(ct)[:, None]
    ch = c.to(ct) * rn_c.to(ct)[:, None]
    t, b, w = scale.to(ct), bias.to(ct), weight.to(ct)
    zero = torch.zeros((), dtype=ct, device=r.device)
    loss, ds, db = zero.clone(), zero.clone(), zero.clone()
    dr = torch.empty(r.shape, dtype=ct, device=r.device) if want_grad else None
    cols = torch.arange(nc, device=r.device)
    step = max(1, CHUNK_ELEMS // max(1, nc))
    for start in range(0, m, step):
        rows = torch.arange(start, min(m, start + step), device=r.device)
        cos = rh[rows] @ ch.T
        s = t * cos + b
        pos = cols[None, :] == (rows + pos_off)[:, None]
        zs = torch.where(pos, s, -s)  # z_ij s_ij
        if want_loss:
            loss -= F.logsigmoid(zs).sum()
        if want_grad or want_scalars:
            sig = torch.sigmoid(-zs)
            g = torch.where(pos, -sig, sig)  # ∂ℓ/∂s = −z σ(−z s)
            if want_scalars:
                ds += (g * cos).sum()
                db += g.sum()
            if want_grad:
                dr[rows] = g @ ch
    return (loss if want_loss else None, dr * (w * t) if want_grad else None, ds * w if want_scalars else None,
            db * w if want_scalars else None)
