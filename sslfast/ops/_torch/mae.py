"""MAE's PyTorch implementation (the contract `sslfast.ops.mae.MAEImpl`; math in `sslfast.kernels.mae`, the
official code in `sslfast.reference.mae`): the same functions as the kernels, with the same parameters.

Random masking and BERT masking run Triton's Philox generator (`philox`), so for one seed this module and the
kernels draw the same numbers; the permutation then goes through the official argsort logic. Everything else
computes at fp32 or better (fp64 for fp64 inputs) and returns the kernels' dtypes.
"""

from __future__ import annotations

import torch

NORM_PIX_EPS = 1e-6  # as the official forward_loss
_M32 = 0xFFFFFFFF


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def _row_index(ids: torch.Tensor, width: int) -> torch.Tensor:
    """ids [B, N] as the int64 [B, N, width] index of a row gather / scatter along dim 1."""
    return ids.long()[:, :, None].expand(-1, -1, width)


# ----------------------------------------------------------------------------------------- Philox 4x32-10
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85


def _mul32(a: torch.Tensor, b: int):
    """(high, low) 32-bit halves of a·b for uint32 values held in int64 (16-bit split: no int64 overflow)."""
    lo = a * (b & 0xFFFF)
    hi = a * (b >> 16)
    return (hi + (lo >> 16)) >> 16, (((hi & 0xFFFF) << 16) + lo) & _M32


def philox(seed, offset: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Triton's `tl.randint4x(seed, offset)` (Philox 4x32, 10 rounds) in PyTorch.

    Args:
        seed: an int, or an int64 tensor with one element (kept on its device: no host sync).
        offset: int64 counters, any shape.

    Returns:
        Four uint32 streams as int64 tensors shaped like `offset`.
    """
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


# ----------------------------------------------------------------------------------------- masking
def masking_noise(seed, batch: int, num_patches: int, block: int, grid_w: int, device) -> torch.Tensor:
    """The noise whose stable argsort is the masking permutation (the kernel's, for the same seed).

    Args:
        seed: int or one-element int64 tensor (see `philox`).
        batch: B.
        num_patches: L, the patches of a grid `grid_w` wide.
        block: side s of the s×s cells kept or masked whole (1: single patches).
        grid_w: the patch grid's width w.
        device: where the noise is made.

    Returns:
        int64 [B, L]: 31 random bits per coarse cell, repeated over the cell's patches.
    """
    i = torch.arange(num_patches, device=device)
    row, col = i // grid_w, i % grid_w
    cell = (row // block) * (grid_w // block) + col // block
    n_coarse = num_patches // (block * block)
    off = torch.arange(batch, device=device)[:, None] * n_coarse + cell[None, :]
    return philox(seed, off)[0] >> 1


def random_masking(seed, batch: int, num_patches: int, keep: int, block: int, grid_w: int, device):
    """(ids_keep [B, keep], ids_restore [B, L], mask fp32 [B, L]): the official argsort logic on `masking_noise`
    (ties broken by index, as the kernel's packed keys)."""
    noise = masking_noise(seed, batch, num_patches, block, grid_w, device)
    ids_shuffle = torch.argsort(noise, dim=1, stable=True)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones(batch, num_patches, device=device)
    mask[:, :keep] = 0
    return ids_shuffle[:, :keep].contiguous(), ids_restore, torch.gather(mask, 1, ids_restore)


# ----------------------------------------------------------------------------------------- patches and tokens
def patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, L, p·p·C] in MAE's order (h w p q c), a view where torch can make one."""
    B, C, H, W = imgs.shape
    h, w = H // p, W // p
    return torch.einsum("nchpwq->nhwpqc", imgs.reshape(B, C, h, p, w, p)).reshape(B, h * w, p * p * C)


def gather_patches(imgs: torch.Tensor, ids: torch.Tensor | None, p: int) -> torch.Tensor:
    """[B, K, p·p·C] patches (MAE order) of `imgs` at `ids` [B, K]; all L patches when ids is None."""
    x = patchify(imgs, p)
    if ids is None:
        return x.contiguous()
    return torch.gather(x, 1, _row_index(ids, x.shape[2]))


def gather_patches_backward(g: torch.Tensor, ids: torch.Tensor | None, p: int, img_shape) -> torch.Tensor:
    """dL/dimgs [B, C, H, W] from dL/dpatches g [B, K, p·p·C]: the adjoint of `gather_patches` (any device).

    Args:
        g: the patches' gradient.
        ids: the gathered patch ids [B, K], or None for all L patches in order.
        p: the patch size.
        img_shape: (B, C, H, W) of the images.

    Returns:
        The images' gradient in g's dtype (repeated ids summed at fp32 or better).
    """
    B, C, H, W = img_shape
    h, w = H // p, W // p
    if ids is not None:
        full = g.new_zeros(B, h * w, g.shape[2], dtype=_compute_dtype(g))
        full.scatter_add_(1, _row_index(ids, g.shape[2]), g.to(full.dtype))
        g = full.to(g.dtype)
    x = g.reshape(B, h, w, p, p, C)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(B, C, H, W)


def gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """x [B, L, D], ids [B, K] -> [B, K, D] in x's dtype."""
    return torch.gather(x, 1, _row_index(ids, x.shape[2]))


def gather_tokens_backward(g: torch.Tensor, ids: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """dL/dx [B, L, D] (g's dtype) from g [B, K, D]; repeated ids summed at fp32 or better."""
    out = g.new_zeros(g.shape[0], num_tokens, g.shape[2], dtype=_compute_dtype(g))
    out.scatter_add_(1, _row_index(ids, g.shape[2]), g.to(out.dtype))
    return out.to(g.dtype)


def unshuffle(x, ids_restore, mask_token, pos, out_dtype):
    """x [B, K, D], ids_restore [B, L], mask_token [D], pos [L, D] or None -> [B, L, D] in out_dtype:
    out[b, l] = x[b, ids_restore[b, l]] if ids_restore[b, l] < K else mask_token, plus pos[l]."""
    ct = torch.promote_types(out_dtype, torch.float32)
    keep, D = x.shape[1], x.shape[2]
    ids = ids_restore.long()
    rows = torch.gather(x.to(ct), 1, _row_index(ids.clamp(max=keep - 1), D))
    out = torch.where((ids < keep)[:, :, None], rows, mask_token.to(ct).reshape(1, 1, D))
    if pos is not None:
        out = out + pos.to(ct).reshape(1, -1, D)
    return out.to(out_dtype)


def unshuffle_backward(g, ids_restore, keep, x_dtype, want_mask_token):
    """(dx [B, K, D] in x_dtype, d mask_token [D] at fp32 or better, or None) from g [B, L, D]."""
    B, L, D = g.shape
    ct = _compute_dtype(g)
    full = g.new_zeros(B, L, D, dtype=ct)
    full.scatter_add_(1, _row_index(ids_restore, D), g.to(ct))
    dx = full[:, :keep].to(x_dtype)
    return dx, (full[:, keep:].sum((0, 1)) if want_mask_token else None)


# ----------------------------------------------------------------------------------------- loss
def _residual(pred, imgs, p: int, norm_pix: bool) -> torch.Tensor:
    """pred − target at fp32 or better (fp64 for fp64 inputs); target = patchify(imgs), per patch normalized
    to mean 0 and (unbiased) variance 1 (eps `NORM_PIX_EPS`) when norm_pix."""
    t = patchify(imgs.to(_compute_dtype(imgs)), p)
    if norm_pix:
        mean = t.mean(dim=-1, keepdim=True)
        var = t.var(dim=-1, keepdim=True)
        t = (t - mean) / (var + NORM_PIX_EPS) ** 0.5
    ct = torch.promote_types(t.dtype, _compute_dtype(pred))
    return pred.to(ct) - t.to(ct)


def _dpred(dif, mask, scale, dtype) -> torch.Tensor:
    """scale · 2 w (pred − t) / E on rows with w != 0, zeros on the others, in pred's dtype."""
    w = mask.to(dif.dtype)[:, :, None]
    dp = dif * (w * (2.0 * scale.to(dif.dtype) / dif.shape[-1]))
    return torch.where(w != 0, dp, 0.0).to(dtype)


def masked_mse(pred, imgs, mask, p: int, norm_pix: bool, want_grad: bool = False):
    """(loss, Σ mask, ∂loss/∂pred or None): the official forward_loss computed at fp32 or better, and with
    `want_grad` its gradient for an upstream 1 from the same residual. Differentiable in pred through autograd
    (the double-backward route)."""
    dif = _residual(pred, imgs, p, norm_pix)
    w = mask.to(dif.dtype)
    wsum = w.sum()
    loss = (dif**2).mean(dim=-1)
    return (loss * w).sum() / wsum, wsum, _dpred(dif, mask, 1.0 / wsum, pred.dtype) if want_grad else None


def masked_mse_backward(g, pred, imgs, mask, wsum, p: int, norm_pix: bool):
    """dL/dpred in pred's dtype for the upstream gradient g (0-d tensor)."""
    return _dpred(_residual(pred, imgs, p, norm_pix), mask, g / wsum, pred.dtype)


# ----------------------------------------------------------------------------------------- BERT masking
def _uniform24(r: torch.Tensor) -> torch.Tensor:
    return (r >> 8).to(torch.float32) * (1.0 / 16777216.0)


def bert_masking(seed, input_ids, special, mask_token_id, vocab_size, prob, replace_prob, random_prob, ignore_index):
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
