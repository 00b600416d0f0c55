"""SigLIP's PyTorch implementation (the contract `sslfast.ops.siglip.SigLIPImpl`; math in
`sslfast.kernels.siglip`, the literal loss in `sslfast.reference.siglip`).

`siglip_rows` is the kernels' sweep (loss, ∂L/∂r̂, ∂L/∂t, ∂L/∂b of the rows of r against the columns c),
`CHUNK_ELEMS` logits at a time, so CPU memory stays O(chunk + N·D); it is plain autograd (its loss can be
differentiated again) and takes float64. The normalization and its backward are InfoNCE's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .infonce import row_normalize_backward, row_rnorm  # noqa: F401  (the contract's; shared with InfoNCE)

CHUNK_ELEMS = 1 << 22  # logits per chunk: 16 MiB in fp32


def siglip_rows(
    r, c, rn_r, rn_c, scale, bias, weight, pos_off: int, *, want_loss: bool, want_grad: bool, want_scalars: bool
):
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
    return (
        loss if want_loss else None,
        dr * (w * t) if want_grad else None,
        ds * w if want_scalars else None,
        db * w if want_scalars else None,
    )
