"""InfoNCE family in plain PyTorch.

Two layers:

* the literal losses (`nt_xent_loss`, `info_nce_loss`, `clip_loss`): the papers' math with the full logit
  matrix materialized, as lightly / solo-learn / open_clip compute it. They are the float64 test oracle and
  the benchmark baseline;
* the chunked core (`row_rnorm`, `similarity_lse`, `similarity_lse_rows_grad`, `row_normalize_backward`),
  the same functions as `sslfast.kernels.infonce` computed `CHUNK_ELEMS` logits at a time, so CPU memory
  stays O(N·D + chunk). It is the CPU path; its math is documented in `sslfast.kernels.infonce`;
* the epilogue from those statistics to the loss: `contrastive_loss` (differentiable, what torch.compile
  traces) and `loss_epilogue` (the loss and its closed-form gradients, the kernels' one-launch counterpart).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

NORM_EPS = 1e-12
CHUNK_ELEMS = 1 << 22  # logits per chunk: 16 MiB in fp32


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def _cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mean_i −log softmax(logits_i)[target_i]. In float64, the test oracle's dtype, it is evaluated as
    softplus(logsumexp(negatives − positive)), the same quantity without the 1 − softmax cancellation that
    zeroes gradients once a row's loss drops under 1e-16; otherwise as F.cross_entropy, what users run."""
    if logits.dtype != torch.float64:
        return F.cross_entropy(logits.to(_compute_dtype(logits)), target)
    pos = logits.gather(1, target[:, None])
    neg = logits.scatter(1, target[:, None], float("-inf"))
    return F.softplus(torch.logsumexp(neg - pos, dim=1)).mean()


# ----------------------------------------------------------------------------------------- literal losses
def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """SimCLR: z = normalize([z1; z2]), S = z zᵀ/τ, row i's positive is i ± N, the diagonal is excluded,
    loss = mean over the 2N rows of −log softmax(S_i)[positive]."""
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    s = (z @ z.T) / temperature
    s.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(s.device)
    return _cross_entropy(s, target)


def info_nce_loss(query: torch.Tensor, key: torch.Tensor, queue: torch.Tensor | None = None,
                  temperature: float = 0.2) -> torch.Tensor:
    """MoCo. With a queue: logits_i = [q̂_i·k̂_i, q̂_i·queuê_j...]/τ, target 0. Without: q̂ k̂ᵀ/τ, target i."""
    q = F.normalize(query, dim=1)
    k = F.normalize(key, dim=1)
    if queue is None:
        return _cross_entropy(q @ k.T / temperature, torch.arange(q.shape[0], device=q.device))
    neg = q @ F.normalize(queue, dim=1).detach().T
    logits = torch.cat([(q * k).sum(1, keepdim=True), neg], dim=1) / temperature
    return _cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor,
              logit_scale: torch.Tensor) -> torch.Tensor:
    """CLIP: L = logit_scale · norm(img) norm(txt)ᵀ; (CE(L, arange) + CE(Lᵀ, arange)) / 2."""
    logits = logit_scale * F.normalize(image_features, dim=1) @ F.normalize(text_features, dim=1).T
    target = torch.arange(logits.shape[0], device=logits.device)
    return (_cross_entropy(logits, target) + _cross_entropy(logits.T, target)) / 2


# ----------------------------------------------------------------------------------------- chunked core


def _global_index(idx: torch.Tensor, off: int, split: int, shift: int) -> torch.Tensor:
    return idx + off + (idx >= split).long() * shift


def _tiles(a, b, rn_a, rn_b, scale, maps, exclude_self):
    """Row chunks of the logits S = scale · â b̂ᵀ, with self entries at -inf and a mask of where each row's
    positive sits."""
    r_off, r_split, r_shift, c_off, c_split, c_shift, p_shift, p_period = maps
    ct = _compute_dtype(a)
    ah = a.to(ct) * (rn_a.to(ct) * scale.to(ct))[:, None]
    bh = b.to(ct) * rn_b.to(ct)[:, None]
    g_col = _global_index(torch.arange(b.shape[0], device=b.device), c_off, c_split, c_shift)
    step = max(1, CHUNK_ELEMS // max(1, b.shape[0]))
    for start in range(0, a.shape[0], step):
        rows = torch.arange(start, min(a.shape[0], start + step), device=a.device)
        g_row = _global_index(rows, r_off, r_split, r_shift)
        s = ah[rows] @ bh.T
        if exclude_self:
            s = s.masked_fill(g_row[:, None] == g_col[None, :], float("-inf"))
        yield rows, s, g_col[None, :] == ((g_row + p_shift) % p_period)[:, None], bh


def row_rnorm(x: torch.Tensor, partner: torch.Tensor | None = None, scale: torch.Tensor | None = None):
    """1/max(‖x_i‖, 1e-12); with a partner, also (its inverse norms, scale · x̂_i·p̂_i)."""
    ct = _compute_dtype(x)
    rn = 1.0 / torch.linalg.vector_norm(x.to(ct), dim=1).clamp_min(NORM_EPS)
    if partner is None:
        return rn
    rn_p = 1.0 / torch.linalg.vector_norm(partner.to(ct), dim=1).clamp_min(NORM_EPS)
    return rn, rn_p, scale.to(ct) * rn * rn_p * (x.to(ct) * partner.to(ct)).sum(1)


def row_normalize_backward(x, rn, dxh=None, partner=None, rn_p=None, coef=None) -> torch.Tensor:
    """dL/dx from dL/dx̂ (optional) plus the gradient of coef_i · x̂_i·p̂_i."""
    ct = rn.dtype
    g = torch.zeros(x.shape, dtype=ct, device=x.device) if dxh is None else dxh.to(ct)
    if partner is not None:
        g = g + (coef * rn_p)[:, None] * partner.to(ct)
    xh = x.to(ct) * rn[:, None]
    return ((g - xh * (xh * g).sum(1, keepdim=True)) * rn[:, None]).to(x.dtype)


def tile_operands(a, b, rn_a, rn_b):
    """The inputs as they are (the kernels' fp32 inputs may become fp16 unit rows; here every dot is exact)."""
    return a, b, rn_a, rn_b


def similarity_lse(a, b, rn_a, rn_b, scale, maps, *, exclude_self, want_pos, col_stats, bounded=False):
    ct = _compute_dtype(a)
    lse_r = torch.empty(a.shape[0], dtype=ct, device=a.device)
    pos = torch.empty(a.shape[0] if want_pos else 0, dtype=ct, device=a.device)
    lse_c = torch.full((b.shape[0] if col_stats else 0,), float("-inf"), dtype=ct, device=a.device)
    for rows, s, match, _ in _tiles(a, b, rn_a, rn_b, scale, maps, exclude_self):
        if want_pos:  # the positive is reported separately and left out of the sums
            pos[rows] = torch.where(match, s, 0.0).sum(1)
            s = s.masked_fill(match, float("-inf"))
        lse_r[rows] = torch.logsumexp(s, dim=1)
        if col_stats:
            lse_c = torch.logaddexp(lse_c, torch.logsumexp(s, dim=0))
    return lse_r, lse_c, pos


def similarity_lse_rows_grad(a, b, rn_a, rn_b, scale, maps, *, exclude_self, bounded=False, lse_r=None,
                             g_r=None, lse_c=None, g_c=None, g_pr=None, g_pc=None, want_dscale=False):
    """dL/dâ for the unit rows of a (see sslfast.kernels.infonce), and dL/dscale."""
    ct = _compute_dtype(a)
    dah = torch.empty(a.shape, dtype=ct, device=a.device)
    dscale = torch.zeros((), dtype=ct, device=a.device)
    with_pos = g_pr is not None or g_pc is not None
    sc = scale.to(ct)
    for rows, s, match, bh in _tiles(a, b, rn_a, rn_b, scale, maps, exclude_self):
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
        dah[rows] = sc * (w @ bh)
        if want_dscale:
            dscale += (w * torch.where(torch.isfinite(s), s, 0.0)).sum() / sc
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
    same over the columns, whose positives are the same diagonal."""
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
