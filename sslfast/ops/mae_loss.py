"""MAE's norm-pix masked MSE loss, `masked_mse_loss` (math in `sslfast.kernels.mae`): the official
`forward_loss` with the targets read from the images, never materialized. An eager loss that will be
differentiated gets ∂loss/∂pred from its forward pass (`sslfast._custom_op.loss_with_grads`).
"""

from __future__ import annotations

import functools

import torch

from .. import _validate as V
from .._backend import use_triton
from .._custom_op import (
    TRITON_DOUBLE_BACKWARD,
    backward_on_reference,
    custom_op,
    differentiable_grads,
    grads_in_forward,
    loss_with_grads,
)
from .mae_common import FAMILY, check_images, check_tokens

_impl = FAMILY.impl


@custom_op("mae_masked_mse_backward", fake=lambda g, pred, imgs, mask, wsum, p, norm_pix: torch.empty_like(pred))
def _masked_mse_backward_op(
    g: torch.Tensor,
    pred: torch.Tensor,
    imgs: torch.Tensor,
    mask: torch.Tensor,
    wsum: torch.Tensor,
    p: int,
    norm_pix: bool,
) -> torch.Tensor:
    return _impl(pred, imgs, mask).masked_mse_backward(g, pred, imgs, mask, wsum, p, norm_pix)


def _masked_mse_setup(ctx, inputs, output):
    pred, imgs, mask, p, norm_pix = inputs
    ctx.save_for_backward(pred, imgs, mask, output[1])
    ctx.cfg = (p, norm_pix)


def _masked_mse_backward(ctx, g_loss, g_wsum):
    pred, imgs, mask, wsum = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return None, None, None, None, None
    dpred = _masked_mse_backward_op(g_loss.float().reshape(()).contiguous(), pred, imgs, mask, wsum, *ctx.cfg)
    return dpred, None, None, None, None


def _fake_masked_mse(pred, imgs, mask, p, norm_pix):
    return pred.new_empty((), dtype=torch.float32), pred.new_empty((), dtype=torch.float32)


def _masked_mse_literal(cfg, pred, imgs, mask):
    """The loss in plain autograd (the reference path's formula): the double-backward route."""
    return FAMILY.torch.masked_mse(pred, imgs, mask, *cfg)[0]


def _masked_mse_double_backward(ctx, g_loss, g_wsum):
    pred, imgs, mask, _ = ctx.saved_tensors
    (dpred,) = differentiable_grads(
        lambda x: _masked_mse_literal(ctx.cfg, x, imgs, mask), [pred], [ctx.needs_input_grad[0]], [g_loss]
    )
    return dpred, None, None, None, None


@custom_op(
    "mae_masked_mse",
    fake=_fake_masked_mse,
    backward=_masked_mse_backward,
    setup_context=_masked_mse_setup,
    non_differentiable=(1,),
    double_backward=backward_on_reference("masked_mse_loss", _masked_mse_double_backward),
)
def _masked_mse_op(
    pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor, p: int, norm_pix: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, Σ mask) as fp32 scalars."""
    loss, wsum, _ = _impl(pred, imgs, mask).masked_mse(pred, imgs, mask, p, norm_pix)
    return loss.float().clone(), wsum.float().clone()


def _masked_mse_and_grad(cfg, needs, pred, imgs, mask):
    """`loss_with_grads`' function: the loss and ∂loss/∂pred from one pass (imgs and mask get none)."""
    loss, _, dpred = _impl(pred, imgs, mask).masked_mse(pred, imgs, mask, *cfg, True)
    return loss.float(), (dpred, None, None)


def _detached(x: torch.Tensor) -> torch.Tensor:
    """x cut from the graph; x itself when it is not in one (`detach` is a dispatcher call)."""
    return x.detach() if x.requires_grad else x


def masked_mse_loss(
    pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor, patch_size: int, norm_pix_loss: bool = True
) -> torch.Tensor:
    """The official MAE `forward_loss`: target = patchify(imgs), per patch normalized to mean 0 and
    (unbiased) variance 1 (eps 1e-6) when norm_pix_loss; loss = Σ mask·mean_e (pred − target)² / Σ mask.

    pred [B, L, p·p·C] (MAE patch order), imgs [B, C, H, W], mask [B, L] (1 = masked; bool or floating; a
    floating mask acts as weights). The target is computed on the fly from the images; the fused backward
    gives pred its gradient (imgs and mask get none). Returns an fp32 scalar.

    Args:
        pred: floating [B, L, p·p·C], the decoder's prediction (batch-strided views read in place).
        imgs: floating [B, C, H, W], H and W multiples of `patch_size`.
        mask: [B, L], bool or floating (1 = masked; floating values act as weights).
        patch_size: p >= 1.
        norm_pix_loss: normalize each target patch (the official default).

    Returns:
        The fp32 scalar loss.

    Raises:
        TypeError: a non-floating pred or imgs, mask not a tensor, patch_size not an int, norm_pix_loss not a
            bool.
        ValueError: shapes that do not match (pred [B, L, p·p·C] and mask [B, L] for imgs), tensors on
            different devices.
    """
    pred = check_tokens("pred", pred, "[B, L, p*p*C]")
    imgs, p = check_images("imgs", imgs, patch_size)
    B, C, H, W = imgs.shape
    L, E = (H // p) * (W // p), p * p * C
    if pred.shape != (B, L, E):
        raise ValueError(
            f"pred must be [B, L, p*p*C] = [{B}, {L}, {E}] for imgs {tuple(imgs.shape)} and "
            f"patch_size={p}, got {tuple(pred.shape)}"
        )
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor [B, L], got {type(mask).__name__}")
    if mask.dtype == torch.bool:
        mask = mask.float()
    mask = V.tensor("mask", mask, ndim=2, shape_hint=f"[B, L] = [{B}, {L}]")
    if mask.shape != (B, L):
        raise ValueError(f"mask must be [B, L] = [{B}, {L}], got {tuple(mask.shape)}")
    if not isinstance(norm_pix_loss, bool):
        raise TypeError(f"norm_pix_loss must be a bool, got {type(norm_pix_loss).__name__}")
    V.same_device(pred=pred, imgs=imgs, mask=mask)
    if grads_in_forward(pred):
        cfg = (p, norm_pix_loss)
        literal = functools.partial(_masked_mse_literal, cfg) if not use_triton(pred, imgs, mask) else None
        return loss_with_grads(
            functools.partial(_masked_mse_and_grad, cfg),
            pred,
            _detached(imgs),
            _detached(mask),
            op="masked_mse_loss",
            differentiable=literal,
            hint=TRITON_DOUBLE_BACKWARD,
        )
    loss, _ = _masked_mse_op(pred, imgs, _detached(mask), p, norm_pix_loss)
    return loss
