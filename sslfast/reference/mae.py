"""MAE's official code (facebookresearch/mae `models_mae.py`), verbatim in substance: the float64 test oracle and
the benchmarks' baseline. `patchify_official`, `random_masking_official` (argsort the noise twice, gather with a
repeated int64 index), `embed_all_then_mask_official` (patch-embed all L patches + pos, then mask),
`unshuffle_official` (cat the repeated mask tokens, gather, add pos) and `forward_loss_official`.

The CPU path of `sslfast.ops.mae` is `sslfast.ops._torch.mae`; its `masking_noise` gives the noise whose
argsort is the ops' permutation, so `random_masking_official(x, ratio, noise)` reproduces a given mask.
"""

from __future__ import annotations

import torch


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


def embed_all_then_mask_official(
    imgs: torch.Tensor,
    proj: torch.nn.Conv2d,
    pos_embed: torch.Tensor,
    mask_ratio: float,
    noise: torch.Tensor | None = None,
):
    """Official encoder front: x = patch_embed(imgs) + pos (all L patches), then random_masking."""
    x = proj(imgs).flatten(2).transpose(1, 2)
    x = x + pos_embed.reshape(1, x.shape[1], -1)
    return random_masking_official(x, mask_ratio, noise)


def unshuffle_official(
    x: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor, pos_embed: torch.Tensor | None = None
) -> torch.Tensor:
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


def forward_loss_official(
    imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, p: int, norm_pix_loss: bool = True
) -> torch.Tensor:
    """The official `forward_loss(imgs, pred, mask)`."""
    target = patchify_official(imgs, p)
    if norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    loss = (pred - target) ** 2
    loss = loss.mean(dim=-1)
    return (loss * mask).sum() / mask.sum()
