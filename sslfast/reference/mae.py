"""MAE in plain PyTorch.

Two layers:

* the official code, verbatim in substance (facebookresearch/mae `models_mae.py`): `patchify_official`,
  `random_masking_official` (argsort the noise twice, gather with a repeated int64 index),
  `embed_all_then_mask_official` (patch-embed all L patches + pos, then mask), `unshuffle_official` (cat the
  repeated mask tokens, gather, add pos) and `forward_loss_official`. They are the float64 test oracle and the
  benchmark baseline;
* the CPU path: the same functions as `sslfast.kernels.mae`, with the same signatures, in PyTorch. Its
  random masking runs Triton's Philox generator (`philox`) so that, for one seed, the CPU path and the
  kernels produce the same permutation; the permutation then goes through the official argsort logic.
"""
from __future__ import annotations

import torch

NORM_PIX_EPS = 1e-6
_M32 = 0xFFFFFFFF


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


# ----------------------------------------------------------------------------------------- official code
def patchify_official(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """[N, C, H, W] -> [N, L, p·p·C] (official order 'nchpwq->nhwpqc'; any C, H != W allowed)."""
    n, c, H, W = imgs.shape
    h, w = H // p, W // p
    x = imgs.reshape(n, c, h, p, w, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(n, h * w, p * p * c)


def random_masking_official(x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None):
    """The official `random_masking(x, mask_ratio)`: (x_masked, mask, ids_restore). `noise` [N, L] may be
    given to fix the permutation (the official code draws torch.rand)."""
    N, L, D = x.shape
    len_keep = int(L * (1 - mask_ratio))
    if noise is None:
        noise = torch.rand(N, L, device=x.device)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    x_masked = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, D))
    mask = torch.ones([N, L], device=x.device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)
    return x_masked, mask, ids_restore


def embed_all_then_mask_official(imgs: torch.Tensor, proj: torch.nn.Conv2d, pos_embed: torch.Tensor,
                                 mask_ratio: float, noise: torch.Tensor | None = None):
    """Official encoder front: x = patch_embed(imgs) + pos (all L patches), then random_masking."""
    x = proj(imgs).flatten(2).transpose(1, 2)
    x = x + pos_embed.reshape(1, x.shape[1], -1)
    return random_masking_official(x, mask_ratio, noise)


def unshuffle_official(x: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor,
                       pos_embed: torch.Tensor | None = None) -> torch.Tensor:
    """Official decoder unshuffle (cls token left to the caller): cat(x, repeated mask tokens), gather by
    ids_restore, + pos."""
    N, keep, D = x.shape
    L = ids_restore.shape[1]
    mask_tokens = mask_token.reshape(1, 1, D).repeat(N, L - keep, 1)
    x_ = torch.cat([x, mask_tokens], dim=1)
    x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, D))
    if pos_embed is not None:
        x_ = x_ + pos_embed.reshape(1, L, D)
    return x_


def forward_loss_official(imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, p: int,
                          norm_pix_loss: bool = True) -> torch.Tensor:
    """The official `forward_loss(imgs, pred, mask)`."""
    target = patchify_official(imgs, p)
    if norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.e-6) ** .5
    loss = (pred - target) ** 2
    loss = loss.mean(dim=-1)
    return (loss * mask).sum() / mask.sum()


# ----------------------------------------------------------------------------------------- Philox 4x32-10
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85


def _mul32(a: torch.Tensor, b: int):
    """(high, low) 32-bit halves of a·b for uint32 values held in int64 (16-bit split: no int64 overflow)."""
    lo = a * (b & 0xFFFF)
    hi = a * (b >> 16)
    return (hi + (lo >> 16)) >> 16, (((hi & 0xFFFF) << 16) + lo) & _M32


def philox(seed, offset: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Triton's `tl.randint4x(seed, offset)` (Philox 4x32, 10 rounds) in PyTorch: four uint32 streams as
    int64 tensors shaped like `offset` (int64). `seed` is an int or an int64 tensor with one element (kept on
    its device: no host sync)."""
    if isinstance(seed, torch.Tensor):
        seed = seed.reshape(()).to(device=offset.device, dtype=torch.int64)
    k0 = seed & _M32
    k1 = (seed >> 32) & _M32
    c0 = offset & _M32
    c1 = (offset >> 32) & _M32
    c2 = torch.zeros_like(offset)
    c3 = torch.zeros_like(offset)
    for _ in range(10):
        hi_b, lo_b = _mul32(c2, _ROUND_B)
        hi_a, lo_a = _mul32(c0, _ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _KEY_A) & _M32
        k1 = (k1 + _KEY_B) & _M32
    return c0, c1, c2, c3


# ----------------------------------------------------------------------------------------- CPU path
def masking_noise(seed, batch: int, num_patches: int, block: int, grid_w: int, device) -> torch.Tensor:
    """int64 [B, L] noise (31 random bits per coarse cell) whose stable argsort is the masking permutation."""
    i = torch.arange(num_patches, device=device)
    row, col = i // grid_w, i % grid_w
    cell = (row // block) * (grid_w // block) + col // block
    n_coarse = num_patches // (block * block)
    off = torch.arange(batch, device=device)[:, None] * n_coarse + cell[None, :]
    return philox(seed, off)[0] >> 1


def random_masking(seed, batch: int, num_patches: int, keep: int, block: int, grid_w: int, device):
    """(ids_keep, ids_restore, mask): the official argsort logic on Philox noise (ties broken by index, as the
    kernel's packed keys)."""
    noise = masking_noise(seed, batch, num_patches, block, grid_w, device)
    ids_shuffle = torch.argsort(noise, dim=1, stable=True)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones(batch, num_patches, device=device)
    mask[:, :keep] = 0
    return ids_shuffle[:, :keep].contiguous(), ids_restore, torch.gather(mask, 1, ids_restore)


def gather_patches(imgs: torch.Tensor, ids: torch.Tensor | None, p: int) -> torch.Tensor:
    x = patchify_official(imgs, p)
    if ids is None:
        return x.contiguous()
    return torch.gather(x, 1, ids.long()[:, :, None].expand(-1, -1, x.shape[2]))


def gather_patches_backward(g: torch.Tensor, ids: torch.Tensor | None, p: int, img_shape) -> torch.Tensor:
    """dL/dimgs [B, C, H, W] from dL/dpatches [B, K, p·p·C] (the adjoint of gather_patches; any device)."""
    B, C, H, W = img_shape
    h, w = H // p, W // p
    if ids is not None:
        full = g.new_zeros(B, h * w, g.shape[2], dtype=_compute_dtype(g))
        full.scatter_add_(1, ids.long()[:, :, None].expand(-1, -1, g.shape[2]), g.to(full.dtype))
        g = full.to(g.dtype)
    x = g.reshape(B, h, w, p, p, C)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(B, C, H, W)


def gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return torch.gather(x, 1, ids.long()[:, :, None].expand(-1, -1, x.shape[2]))


def gather_tokens_backward(g: torch.Tensor, ids: torch.Tensor, num_tokens: int) -> torch.Tensor:
    out = g.new_zeros(g.shape[0], num_tokens, g.shape[2], dtype=_compute_dtype(g))
    out.scatter_add_(1, ids.long()[:, :, None].expand(-1, -1, g.shape[2]), g.to(out.dtype))
    return out.to(g.dtype)


def unshuffle(x, ids_restore, mask_token, pos, out_dtype):
    ct = torch.promote_types(out_dtype, torch.float32)
    out = unshuffle_official(x.to(ct), ids_restore.long(), mask_token.to(ct), None if pos is None else pos.to(ct))
    return out.to(out_dtype)


def unshuffle_backward(g, ids_restore, keep, x_dtype, want_mask_token):
    B, L, D = g.shape
    ct = _compute_dtype(g)
    full = g.new_zeros(B, L, D, dtype=ct)
    full.scatter_add_(1, ids_restore.long()[:, :, None].expand(-1, -1, D), g.to(ct))
    dx = full[:, :keep].to(x_dtype)
    return dx, (full[:, keep:].sum((0, 1)) if want_mask_token else None)


def _targets(imgs: torch.Tensor, p: int, norm_pix: bool) -> torch.Tensor:
    t = patchify_official(imgs.to(_compute_dtype(imgs)), p)
    if norm_pix:
        mean = t.mean(dim=-1, keepdim=True)
        var = t.var(dim=-1, keepdim=True)
        t = (t - mean) / (var + NORM_PIX_EPS) ** .5
    return t


def _residual(pred, imgs, p: int, norm_pix: bool) -> torch.Tensor:
    """pred − target at fp32 or better (fp64 for fp64 inputs)."""
    t = _targets(imgs, p, norm_pix)
    ct = torch.promote_types(t.dtype, _compute_dtype(pred))
    return pred.to(ct) - t.to(ct)


def _dpred(dif, mask, scale, dtype) -> torch.Tensor:
    """scale · 2 w (pred − t) / E on rows with w != 0, zeros on the others, in pred's dtype."""
    w = mask.to(dif.dtype)[:, :, None]
    dp = dif * (w * (2.0 * scale.to(dif.dtype) / dif.shape[-1]))
    return torch.where(w != 0, dp, 0.0).to(dtype)


def masked_mse(pred, imgs, mask, p: int, norm_pix: bool, want_grad: bool = False):
    """(loss, Σ mask, ∂loss/∂pred or None): the official forward_loss computed at fp32 or better, and its
    gradient for an upstream 1 from the same residual."""
    dif = _residual(pred, imgs, p, norm_pix)
    w = mask.to(dif.dtype)
    wsum = w.sum()
    loss = (dif ** 2).mean(dim=-1)
    return (loss * w).sum() / wsum, wsum, _dpred(dif, mask, 1.0 / wsum, pred.dtype) if want_grad else None


def masked_mse_backward(g, pred, imgs, mask, wsum, p: int, norm_pix: bool):
    return _dpred(_residual(pred, imgs, p, norm_pix), mask, g / wsum, pred.dtype)


# ----------------------------------------------------------------------------------------- BERT masking
def _uniform24(r: torch.Tensor) -> torch.Tensor:
    return (r >> 8).to(torch.float32) * (1.0 / 16777216.0)


def bert_masking(seed, input_ids, special, mask_token_id, vocab_size, prob, replace_prob, random_prob,
                 ignore_index):
    """BERT's 80/10/10 token masking (HF `DataCollatorForLanguageModeling` semantics) on Philox streams:
    a token (not special) is selected with probability `prob`; a selected token becomes `mask_token_id` when
    u_rep < replace_prob, else a uniform random token when u_rnd < random_prob (conditional), else stays.
    labels = the original token where selected, `ignore_index` elsewhere."""
    off = torch.arange(input_ids.numel(), device=input_ids.device).reshape(input_ids.shape)
    r0, r1, r2, r3 = philox(seed, off)
    sel = _uniform24(r0) < prob
    if special is not None:
        sel &= special == 0
    u_rep, u_rnd = _uniform24(r1), _uniform24(r2)
    rand_tok = ((r3 >> 1) % vocab_size).to(input_ids.dtype)
    out = torch.where(sel & (u_rep < replace_prob), torch.full_like(input_ids, mask_token_id), input_ids)
    out = torch.where(sel & (u_rep >= replace_prob) & (u_rnd < random_prob), rand_tok, out)
    labels = torch.where(sel, input_ids, torch.full_like(input_ids, ignore_index))
    return out, labels
