"""MAE patch and token ops: `patchify` / `gather_patches` straight from the images, `gather_tokens`, and the
decoder's `unshuffle` with mask tokens (math in `sslfast.kernels.mae`). Index checks: `sslfast.ops.mae_common`.
"""

from __future__ import annotations

import torch

from .. import _validate as V
from .._custom_op import backward_on_reference, custom_op
from .mae_common import FAMILY, check_ids, check_images, check_tokens

_impl = FAMILY.impl


def _fake_gather_patches(imgs, ids, p):
    B, C, H, W = imgs.shape
    k = (H // p) * (W // p) if ids is None else ids.shape[1]
    return imgs.new_empty(B, k, p * p * C)


def _gather_patches_setup(ctx, inputs, output):
    imgs, ids, p = inputs
    ctx.save_for_backward(ids)
    ctx.cfg = (p, tuple(imgs.shape))


def _gather_patches_backward(ctx, g):
    (ids,) = ctx.saved_tensors
    p, shape = ctx.cfg
    return FAMILY.torch.gather_patches_backward(g, ids, p, shape), None, None


@custom_op(
    "mae_gather_patches",
    fake=_fake_gather_patches,
    backward=_gather_patches_backward,
    setup_context=_gather_patches_setup,
    double_backward=_gather_patches_backward,
)
def _gather_patches_op(imgs: torch.Tensor, ids: torch.Tensor | None, p: int) -> torch.Tensor:
    out = _impl(imgs, ids).gather_patches(imgs, ids, p)
    return out.clone() if out.data_ptr() == imgs.data_ptr() else out


@custom_op(
    "mae_gather_tokens_backward", fake=lambda g, ids, num_tokens: g.new_empty(g.shape[0], num_tokens, g.shape[2])
)
def _gather_tokens_backward_op(g: torch.Tensor, ids: torch.Tensor, num_tokens: int) -> torch.Tensor:
    return _impl(g, ids).gather_tokens_backward(g, ids, num_tokens)


def _gather_tokens_setup(ctx, inputs, output):
    x, ids = inputs
    ctx.save_for_backward(ids)
    ctx.num_tokens = x.shape[1]


def _gather_tokens_backward(ctx, g):
    (ids,) = ctx.saved_tensors
    return _gather_tokens_backward_op(g.contiguous(), ids, ctx.num_tokens), None


def _gather_tokens_backward_literal(ctx, g):
    (ids,) = ctx.saved_tensors
    return FAMILY.torch.gather_tokens_backward(g, ids, ctx.num_tokens), None


@custom_op(
    "mae_gather_tokens",
    fake=lambda x, ids: x.new_empty(x.shape[0], ids.shape[1], x.shape[2]),
    backward=_gather_tokens_backward,
    setup_context=_gather_tokens_setup,
    double_backward=backward_on_reference("gather_tokens", _gather_tokens_backward_literal),
)
def _gather_tokens_op(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return _impl(x, ids).gather_tokens(x, ids)


def _unshuffle_dtype(x, mask_token, pos) -> torch.dtype:
    dt = x.dtype if mask_token.dtype == x.dtype else torch.promote_types(x.dtype, mask_token.dtype)
    return dt if pos is None or pos.dtype == dt else torch.promote_types(dt, pos.dtype)


def _fake_unshuffle_backward(g, ids_restore, keep, x_dtype, want_mask_token):
    B, _, D = g.shape
    return (g.new_empty(B, keep, D, dtype=x_dtype), g.new_empty(D if want_mask_token else 0, dtype=torch.float32))


@custom_op("mae_unshuffle_backward", fake=_fake_unshuffle_backward)
def _unshuffle_backward_op(
    g: torch.Tensor, ids_restore: torch.Tensor, keep: int, x_dtype: torch.dtype, want_mask_token: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx [B, K, D] in x_dtype, d mask_token fp32 [D] or [0])."""
    dx, dmt = _impl(g, ids_restore).unshuffle_backward(g, ids_restore, keep, x_dtype, want_mask_token)
    return dx.contiguous(), (dmt.float().contiguous() if want_mask_token else g.new_empty(0, dtype=torch.float32))


def _unshuffle_setup(ctx, inputs, output):
    x, ids_restore, mask_token, pos = inputs
    ctx.save_for_backward(ids_restore)
    ctx.cfg = (x.shape[1], x.dtype, mask_token.dtype, None if pos is None else pos.dtype)


def _unshuffle_backward(ctx, g):
    (ids_restore,) = ctx.saved_tensors
    keep, x_dtype, mt_dtype, pos_dtype = ctx.cfg
    g = g.contiguous()
    want_mt = ctx.needs_input_grad[2]
    dx, dmt = _unshuffle_backward_op(g, ids_restore, keep, x_dtype, want_mt)
    dpos = g.sum(0, dtype=torch.float32).to(pos_dtype) if pos_dtype is not None and ctx.needs_input_grad[3] else None
    return (dx if ctx.needs_input_grad[0] else None, None, dmt.to(mt_dtype) if want_mt else None, dpos)


def _fake_unshuffle(x, ids_restore, mask_token, pos):
    return x.new_empty(x.shape[0], ids_restore.shape[1], x.shape[2], dtype=_unshuffle_dtype(x, mask_token, pos))


def _unshuffle_backward_literal(ctx, g):
    (ids_restore,) = ctx.saved_tensors
    keep, x_dtype, mt_dtype, pos_dtype = ctx.cfg
    want_mt = ctx.needs_input_grad[2]
    dx, dmt = FAMILY.torch.unshuffle_backward(g, ids_restore, keep, x_dtype, want_mt)
    dpos = g.sum(0, dtype=torch.float32).to(pos_dtype) if pos_dtype is not None and ctx.needs_input_grad[3] else None
    return (dx if ctx.needs_input_grad[0] else None, None, dmt.to(mt_dtype) if want_mt else None, dpos)


@custom_op(
    "mae_unshuffle",
    fake=_fake_unshuffle,
    backward=_unshuffle_backward,
    setup_context=_unshuffle_setup,
    double_backward=backward_on_reference("unshuffle", _unshuffle_backward_literal),
)
def _unshuffle_op(
    x: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor, pos: torch.Tensor | None
) -> torch.Tensor:
    impl = _impl(x, ids_restore, mask_token, pos)
    return impl.unshuffle(x, ids_restore, mask_token, pos, _unshuffle_dtype(x, mask_token, pos))


def patchify(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, L, p·p·C] in MAE's order (h w p q c); L = (H/p)·(W/p). Differentiable.

    Args:
        imgs: floating [B, C, H, W], H and W multiples of `patch_size`.
        patch_size: p >= 1.

    Returns:
        [B, L, p·p·C] in imgs' dtype.

    Raises:
        TypeError: imgs not a floating tensor, patch_size not an int.
        ValueError: imgs empty or not 4-d, H or W not a multiple of p.
    """
    imgs, p = check_images("imgs", imgs, patch_size)
    return _gather_patches_op(imgs, None, p)


def gather_patches(imgs: torch.Tensor, ids_keep: torch.Tensor, patch_size: int) -> torch.Tensor:
    """The visible patches read straight from the images: equals `patchify(imgs, p)` gathered at ids_keep
    ([B, K, p·p·C]), without building the patchified tensor. Differentiable in imgs (rarely needed; the
    backward is a PyTorch scatter).

    Args:
        imgs: floating [B, C, H, W], H and W multiples of `patch_size`.
        ids_keep: int64 or int32 [B, K] patch indices in [0, L) (range checked off CUDA; see
            `sslfast.ops.mae_common`).
        patch_size: p >= 1.

    Returns:
        [B, K, p·p·C] in imgs' dtype.

    Raises:
        TypeError: imgs not a floating tensor, ids_keep not an integer tensor, patch_size not an int.
        ValueError: bad shapes, ids out of range (CPU), imgs and ids_keep on different devices.
    """
    imgs, p = check_images("imgs", imgs, patch_size)
    B, _, H, W = imgs.shape
    ids = check_ids("ids_keep", ids_keep, B, (H // p) * (W // p), "patch indices", "imgs")
    V.same_device(imgs=imgs, ids_keep=ids)
    return _gather_patches_op(imgs, ids, p)


def gather_tokens(x: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
    """x [B, L, D] gathered at ids_keep [B, K] -> [B, K, D] (`torch.gather` with the official repeated index,
    without building it). Differentiable: the backward sums the gradient rows into their positions.

    Args:
        x: floating [B, L, D]; a batch-strided view with dense rows (e.g. `x[:, 1:]`) is read in place.
        ids_keep: int64 or int32 [B, K] token indices in [0, L) (range checked off CUDA).

    Returns:
        [B, K, D] in x's dtype.

    Raises:
        TypeError: x not a floating tensor, ids_keep not an integer tensor.
        ValueError: bad shapes, ids out of range (CPU), x and ids_keep on different devices.
    """
    x = check_tokens("x", x, "[B, L, D]")
    ids = check_ids("ids_keep", ids_keep, x.shape[0], x.shape[1], "token indices", "x")
    V.same_device(x=x, ids_keep=ids)
    return _gather_tokens_op(x, ids)


def unshuffle(
    x_visible: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor, pos_embed: torch.Tensor | None = None
) -> torch.Tensor:
    """MAE decoder unshuffle: out[b, l] = x_visible[b, ids_restore[b, l]] if ids_restore[b, l] < K else
    mask_token, plus pos_embed[l] when given; [B, L, D] in the promoted dtype of the inputs (as the official
    cat + gather + add). The cls token is the caller's (official: x[:, 1:] in, cat it back after).

    x_visible [B, K, D]; ids_restore [B, L] (L >= K); mask_token with D elements ([1, 1, D] or [D]);
    pos_embed [L, D] or [1, L, D]. One pass: the mask token is broadcast, never repeated in memory.
    Differentiable in x_visible, mask_token and pos_embed.

    Args:
        x_visible: floating [B, K, D], the encoder's visible tokens (batch-strided views read in place).
        ids_restore: int64 or int32 [B, L], L >= K, positions in [0, L) (range checked off CUDA).
        mask_token: D elements.
        pos_embed: [L, D] or [1, L, D], or None.

    Returns:
        [B, L, D] in the promoted dtype of x_visible, mask_token and pos_embed.

    Raises:
        TypeError: a non-floating tensor, ids_restore not an integer tensor.
        ValueError: bad shapes, ids out of range (CPU), tensors on different devices.
    """
    x = check_tokens("x_visible", x_visible, "[B, K, D]")
    B, K, D = x.shape
    if not isinstance(ids_restore, torch.Tensor) or ids_restore.dim() != 2:
        shape = tuple(ids_restore.shape) if isinstance(ids_restore, torch.Tensor) else type(ids_restore).__name__
        raise ValueError(f"ids_restore must be a [B, L] tensor, got {shape}")
    L = ids_restore.shape[1]
    if L < K:
        raise ValueError(f"ids_restore must be [B, L] with L >= K={K} (x_visible's rows), got L={L}")
    ids = check_ids("ids_restore", ids_restore, B, L, "positions", "x_visible", "[B, L]")
    mask_token = V.tensor("mask_token", mask_token, shape_hint="[1, 1, D]")
    if mask_token.numel() != D:
        raise ValueError(f"mask_token must have D={D} elements ([1, 1, D] or [D]), got shape {tuple(mask_token.shape)}")
    pos = None
    if pos_embed is not None:
        pos_embed = V.tensor("pos_embed", pos_embed, shape_hint="[L, D]")
        if (
            pos_embed.dim() not in (2, 3)
            or pos_embed.numel() != L * D
            or pos_embed.shape[-1] != D
            or pos_embed.shape[-2] != L
        ):
            raise ValueError(
                f"pos_embed must be [L, D] or [1, L, D] with L={L}, D={D}, got shape {tuple(pos_embed.shape)}"
            )
        pos = pos_embed.reshape(L, D)
    V.same_device(x_visible=x, ids_restore=ids, mask_token=mask_token, pos_embed=pos)
    return _unshuffle_op(x, ids, mask_token.reshape(D), pos)
