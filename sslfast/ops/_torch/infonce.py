"""The InfoNCE family's PyTorch implementation (the contract `sslfast.ops.infonce.InfoNCEImpl`; math in
`sslfast.kernels.infonce`, the papers' literal losses in `sslfast.reference.infonce`).

The same functions as the kernels, computed `CHUNK_ELEMS` logits at a time, so CPU memory stays
O(N·D + chunk) and float64 works; all of them are plain autograd, so the statistics can be differentiated
again (create_graph=True recomputes them here). Work is in fp32 (fp64 for fp64 inputs). Also here, shared by
both implementations: `contrastive_loss`, the differentiable epilogue from the statistics to the loss (what
torch.compile traces), whose one-launch counterpart with closed-form gradients is `loss_epilogue`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NORM_EPS = 1e-12  # as torch.nn.functional.normalize
CHUNK_ELEMS = 1 << 22  # logits per chunk: 16 MiB in fp32


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def _global_index(idx: torch.Tensor, off: int, split: int, shift: int) -> torch.Tensor:
    return idx + off + (idx >= split).long() * shift


def _tiles(r, c, rn_r, rn_c, scale, maps, exclude_self):
    """Row chunks of the logits S = scale · r̂ ĉᵀ, with self entries at -inf and a mask of where each row's
    positive sits (global indices and pairing from the `IndexMaps` `maps`)."""
    ct = _compute_dtype(r)
    rh = r.to(ct) * (rn_r.to(ct) * scale.to(ct))[:, None]
    ch = c.to(ct) * rn_c.to(ct)[:, None]
    g_col = _global_index(torch.arange(c.shape[0], device=c.device), maps.col_off, maps.col_split, maps.col_shift)
    step = max(1, CHUNK_ELEMS // max(1, c.shape[0]))
    for start in range(0, r.shape[0], step):
        rows = torch.arange(start, min(r.shape[0], start + step), device=r.device)
        g_row = _global_index(rows, maps.row_off, maps.row_split, maps.row_shift)
        s = rh[rows] @ ch.T
        if exclude_self:
            s = s.masked_fill(g_row[:, None] == g_col[None, :], float("-inf"))
        yield rows, s, g_col[None, :] == ((g_row + maps.pos_shift) % maps.pos_period)[:, None], ch


def row_rnorm(x: torch.Tensor, partner: torch.Tensor | None = None, scale: torch.Tensor | None = None):
    """1/max(‖x_i‖, 1e-12) [M]; with a partner, (that, its inverse norms, scale · x̂_i·p̂_i)."""
    ct = _compute_dtype(x)
    rn = 1.0 / torch.linalg.vector_norm(x.to(ct), dim=1).clamp_min(NORM_EPS)
    if partner is None:
        return rn
    rn_p = 1.0 / torch.linalg.vector_norm(partner.to(ct), dim=1).clamp_min(NORM_EPS)
    return rn, rn_p, scale.to(ct) * rn * rn_p * (x.to(ct) * partner.to(ct)).sum(1)


def row_normalize_backward(x, rn, dxh=None, partner=None, rn_p=None, coef=None) -> torch.Tensor:
    """∂L/∂x in x's dtype from ∂L/∂x̂ (optional) plus the gradient of coef_i · x̂_i·p̂_i:
    (g − x̂ (x̂·g)) · rn with g = ∂L/∂x̂ + coef · rn_p · p."""
    ct = rn.dtype
    g = torch.zeros(x.shape, dtype=ct, device=x.device) if dxh is None else dxh.to(ct)
    if partner is not None:
        g = g + (coef * rn_p)[:, None] * partner.to(ct)
    xh = x.to(ct) * rn[:, None]
    return ((g - xh * (xh * g).sum(1, keepdim=True)) * rn[:, None]).to(x.dtype)


def pair_normalize_backward(x, rn, dxh, partner, rn_p, g_p, scale, dscale=None):
    """(∂L/∂x, ∂L/∂partner, ∂L/∂scale or None) for a positive pos_i = scale · x̂_i·p̂_i with upstream gradient
    g_p, plus ∂L/∂x̂ = dxh on x: `row_normalize_backward` of both with coef = g_p · scale, and with `dscale`
    the latter plus Σ_i g_p_i · x̂_i·p̂_i (= ∂pos_i/∂scale, computed from the rows, not as pos_i/scale: that is
    0/0 at scale 0)."""
    coef = g_p * scale
    dx = row_normalize_backward(x, rn, dxh, partner, rn_p, coef)
    dp = row_normalize_backward(partner, rn_p, None, x, rn, coef)
    if dscale is None:
        return dx, dp, None
    ct = rn.dtype
    return dx, dp, dscale + (g_p * rn * rn_p * (x.to(ct) * partner.to(ct)).sum(1)).sum()


def tile_operands(r, c, rn_r, rn_c):
    """(r, c, rn_r, rn_c) in the compute dtype (fp32; fp64 for fp64), converted once per pass and shared by its
    `similarity_lse` / `similarity_lse_rows_grad` calls (CLIP's backward runs two roles over the same
    operands); one matrix stays one. Every dot of the chunks is then exact in that dtype."""
    ct = _compute_dtype(r)
    rr = r.to(ct)
    return rr, rr if c is r else c.to(ct), rn_r, rn_c


def similarity_lse(r, c, rn_r, rn_c, scale, maps, *, exclude_self, want_pos, col_stats, bounded):
    """(lse_r [M], lse_c [Nc] or empty, pos [M] or empty) of rows r against columns c (see
    `sslfast.kernels.infonce`); `bounded` only selects the kernels' plain sums, the chunks need no hint."""
    ct = _compute_dtype(r)
    lse_r = torch.empty(r.shape[0], dtype=ct, device=r.device)
    pos = torch.empty(r.shape[0] if want_pos else 0, dtype=ct, device=r.device)
    lse_c = torch.full((c.shape[0] if col_stats else 0,), float("-inf"), dtype=ct, device=r.device)
    for rows, s, match, _ in _tiles(r, c, rn_r, rn_c, scale, maps, exclude_self):
        if want_pos:  # the positive is reported separately and left out of the sums
            pos[rows] = torch.where(match, s, 0.0).sum(1)
            s = s.masked_fill(match, float("-inf"))
        lse_r[rows] = torch.logsumexp(s, dim=1)
        if col_stats:
            lse_c = torch.logaddexp(lse_c, torch.logsumexp(s, dim=0))
    return lse_r, lse_c, pos


def similarity_lse_rows_grad(
    r,
    c,
    rn_r,
    rn_c,
    scale,
    maps,
    *,
    exclude_self,
    bounded,
    lse_r=None,
    g_r=None,
    lse_c=None,
    g_c=None,
    g_pr=None,
    g_pc=None,
    want_dscale=False,
):
    """(∂L/∂r̂ [M, D] for the unit rows of r, ∂L/∂scale or None); terms whose tensors are None are left out
    of G (see `sslfast.kernels.infonce`). With G = ∂L/∂S: ∂L/∂r̂ = scale · G ĉ and ∂L/∂scale =
    Σ_ij G_ij r̂_i·ĉ_j = Σ_i r̂_i·(G ĉ)_i, from the unit rows (Σ G∘S / scale would be 0/0 at scale 0)."""
    ct = _compute_dtype(r)
    dah = torch.empty(r.shape, dtype=ct, device=r.device)
    dscale = torch.zeros((), dtype=ct, device=r.device)
    with_pos = g_pr is not None or g_pc is not None
    sc = scale.to(ct)
    rh = r.to(ct) * rn_r.to(ct)[:, None] if want_dscale else None
    for rows, s, match, ch in _tiles(r, c, rn_r, rn_c, scale, maps, exclude_self):
        s_neg = s.masked_fill(match, float("-inf")) if with_pos else s
        w = torch.zeros_like(s)
        if g_r is not None:
            w += g_r[rows, None] * torch.exp(s_neg - lse_r[rows, None])
        if g_c is not None:
            w += g_c[None, :] * torch.exp(s_neg - lse_c[None, :])
        if g_pr is not None:
            w += torch.where(match, g_pr[rows, None], 0.0)
        if g_pc is not None:
            w += torch.where(match, g_pc[None, :], 0.0)
        wc = w @ ch
        dah[rows] = sc * wc
        if want_dscale:  # Σ_ij G_ij r̂_i·ĉ_j = Σ_i r̂_i·(G ĉ)_i: no division by the scale, which may be 0
            dscale += (wc * rh[rows]).sum()
    return dah, (dscale if want_dscale else None)


# ----------------------------------------------------------------------------------------- epilogue
def _margins(lse_r, lse_c, pos):
    """(lse_r − pos, lse_c − pos or None): each row's (column's) cross-entropy is softplus of its margin."""
    return lse_r - pos, None if lse_c.numel() == 0 else lse_c - pos


def _mean_softplus(x_r, x_c) -> torch.Tensor:
    rows = F.softplus(x_r).mean()
    return rows if x_c is None else (rows + F.softplus(x_c).mean()) / 2


def contrastive_loss(lse_r, lse_c, pos) -> torch.Tensor:
    """mean_i softplus(lse_r[i] − pos[i]); with column statistics (CLIP, lse_c not empty) averaged with the
    same over the columns, whose positives are the same diagonal. Differentiable in all three."""
    return _mean_softplus(*_margins(lse_r, lse_c, pos))


def loss_epilogue(lse_r, lse_c, pos):
    """(`contrastive_loss`, its gradients w.r.t. lse_r, lse_c (None without columns) and pos for an upstream
    1): softplus' = sigmoid."""
    x_r, x_c = _margins(lse_r, lse_c, pos)
    w = 1.0 if x_c is None else 0.5
    g_r = torch.sigmoid(x_r).mul_(w / x_r.numel())
    if x_c is None:
        return _mean_softplus(x_r, x_c), g_r, None, -g_r
    g_c = torch.sigmoid(x_c).mul_(w / x_c.numel())
    return _mean_softplus(x_r, x_c), g_r, g_c, -(g_r + g_c)
