"""SigLIP: the pairwise sigmoid loss with a learnable scale and bias, without the N x N logits.

    L = −(1/N) Σ_i Σ_j log σ(z_ij (t · x̂_i·ŷ_j + b)),   z_ii = +1, z_ij = −1 (i ≠ j)

with x̂, ŷ the L2-normalized rows of the image and text features, t = logit_scale (already exponentiated) and
b = logit_bias. The op `sslfast::siglip_loss` returns the loss and the inverse row norms (saved for the
backward, no gradient); its backward `sslfast::siglip_backward` recomputes the tiles (math in
`sslfast.kernels.siglip`). An eager call that will be differentiated computes its gradients in the forward
(`_custom_op.loss_with_grads`): one row pass (loss, ∂L/∂x̂, ∂L/∂t, ∂L/∂b) and one column pass (∂L/∂ŷ), since
∂ℓ_ij/∂s_ij depends on s_ij only. The family (`SigLIPImpl`) runs the Triton kernels on CUDA tensors and the
chunked PyTorch path (`sslfast.ops._torch.siglip`) elsewhere, float64 included.
"""

from __future__ import annotations

import functools
from typing import Protocol

import torch

from .. import _validate as V
from .._backend import without_autocast
from .._custom_op import (
    TRITON_DOUBLE_BACKWARD,
    custom_op,
    differentiable_grads,
    double_backward_unsupported,
    grads_in_forward,
    loss_with_grads,
    scalar_constant,
)
from ..distributed import all_gather, rank_and_world
from ._family import Family


class SigLIPImpl(Protocol):
    """What `kernels.siglip` and `ops._torch.siglip` both define (math in `sslfast.kernels.siglip`)."""

    def row_rnorm(self, x, partner=None, scale=None):
        """1/max(‖x_i‖, 1e-12) [M] (InfoNCE's; SigLIP passes no partner)."""

    def row_normalize_backward(self, x, rn, dxh=None, partner=None, rn_p=None, coef=None):
        """∂L/∂x in x's dtype from ∂L/∂x̂ (InfoNCE's)."""

    def siglip_rows(self, r, c, rn_r, rn_c, scale, bias, weight, pos_off, *, want_loss, want_grad, want_scalars):
        """(Σ_ij ℓ_ij or None, ∂L/∂r̂ or None, ∂L/∂t or None, ∂L/∂b or None) of the rows of r against the
        columns c, row i's positive at column i + pos_off; the gradients carry the weight."""


FAMILY = Family("siglip", SigLIPImpl)
_impl = FAMILY.impl


def _stat_dtype(x: torch.Tensor) -> torch.dtype:
    """The loss', statistics' and scalars' dtype: fp32, fp64 for fp64 inputs (PyTorch path only)."""
    return torch.promote_types(x.dtype, torch.float32)


# ------------------------------------------------------------------------------------------- passes
@without_autocast
def _forward(img, txt, scale, bias, pos_off):
    """(loss, rn_img, rn_txt): the row pass without gradients."""
    impl = _impl(img, txt, scale, bias)
    rn_i, rn_t = impl.row_rnorm(img), impl.row_rnorm(txt)
    total, *_ = impl.siglip_rows(
        img, txt, rn_i, rn_t, scale, bias, scale, pos_off, want_loss=True, want_grad=False, want_scalars=False
    )
    st = _stat_dtype(img)
    return (total / img.shape[0]).to(st), rn_i.to(st), rn_t.to(st)


@without_autocast
def _backward(
    img,
    txt,
    scale,
    bias,
    rn_i,
    rn_t,
    weight,
    pos_off,
    *,
    want_img: bool,
    want_txt: bool,
    want_scalars: bool,
    want_loss: bool = False,
):
    """(Σ ℓ or None, d_img or [0], d_txt or [0], d_scale or [0], d_bias or [0]) for gradients weighted by
    `weight` (upstream / rows): a row pass (images against texts) and, for d_txt, the column pass (texts
    against images, positives at −pos_off)."""
    impl = _impl(img, txt, scale, bias)
    total, dih, ds, db = None, None, None, None
    if want_img or want_scalars or want_loss:
        total, dih, ds, db = impl.siglip_rows(
            img,
            txt,
            rn_i,
            rn_t,
            scale,
            bias,
            weight,
            pos_off,
            want_loss=want_loss,
            want_grad=want_img,
            want_scalars=want_scalars,
        )
    d_img = impl.row_normalize_backward(img, rn_i, dih) if want_img else img.new_empty(0)
    d_txt = txt.new_empty(0)
    if want_txt:
        _, dth, _, _ = impl.siglip_rows(
            txt, img, rn_t, rn_i, scale, bias, weight, -pos_off, want_loss=False, want_grad=True, want_scalars=False
        )
        d_txt = impl.row_normalize_backward(txt, rn_t, dth)
    empty = scale.new_empty(0)
    ds = ds.to(scale.dtype).reshape(()) if want_scalars else empty
    db = db.to(scale.dtype).reshape(()) if want_scalars else empty.clone()
    return total, d_img, d_txt, ds, db


# ------------------------------------------------------------------------------------------- the ops
def _fake_backward(img, txt, scale, bias, rn_i, rn_t, weight, pos_off, want_img, want_txt, want_scalars):
    scalar = () if want_scalars else (0,)
    return (
        torch.empty_like(img) if want_img else img.new_empty(0),
        torch.empty_like(txt) if want_txt else txt.new_empty(0),
        scale.new_empty(scalar),
        scale.new_empty(scalar),
    )


@custom_op("siglip_backward", fake=_fake_backward)
def siglip_backward(
    img: torch.Tensor,
    txt: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
    rn_i: torch.Tensor,
    rn_t: torch.Tensor,
    weight: torch.Tensor,
    pos_off: int,
    want_img: bool,
    want_txt: bool,
    want_scalars: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d_img or [0], d_txt or [0], d_scale or [0], d_bias or [0]) of L·(weight·M) (weight = upstream / M)."""
    return _backward(
        img,
        txt,
        scale,
        bias,
        rn_i,
        rn_t,
        weight,
        pos_off,
        want_img=want_img,
        want_txt=want_txt,
        want_scalars=want_scalars,
    )[1:]


def _save(ctx, inputs, output):
    img, txt, scale, bias, pos_off = inputs
    ctx.save_for_backward(img, txt, scale, bias, output[1], output[2])
    ctx.pos_off = pos_off


def _input_grads(needs, d_img, d_txt, d_scale, d_bias):
    return (
        d_img if needs[0] else None,
        d_txt if needs[1] else None,
        d_scale if needs[2] else None,
        d_bias if needs[3] else None,
        None,
    )


def _op_backward(ctx, g, *_):
    img, txt, scale, bias, rn_i, rn_t = ctx.saved_tensors
    needs = ctx.needs_input_grad
    weight = g.to(scale.dtype) / img.shape[0]
    return _input_grads(
        needs,
        *siglip_backward(
            img, txt, scale, bias, rn_i, rn_t, weight, ctx.pos_off, needs[0], needs[1], needs[2] or needs[3]
        ),
    )


def _differentiable_loss(pos_off, img, txt, scale, bias) -> torch.Tensor:
    """The loss in plain autograd (the PyTorch path's chunked row pass), for create_graph backwards on that
    path; the kernels' gradients are not differentiable again."""
    if _impl(img, txt, scale, bias) is not FAMILY.torch:
        raise double_backward_unsupported("siglip_loss", TRITON_DOUBLE_BACKWARD)
    return _forward(img, txt, scale, bias, pos_off)[0]


def _op_double_backward(ctx, g, *_):
    inputs = ctx.saved_tensors[:4]
    needs = ctx.needs_input_grad
    grads = differentiable_grads(functools.partial(_differentiable_loss, ctx.pos_off), inputs, needs[:4], (g,))
    return _input_grads(needs, *grads)


def _fake_forward(img, txt, scale, bias, pos_off):
    st = _stat_dtype(img)
    return img.new_empty((), dtype=st), img.new_empty(img.shape[0], dtype=st), txt.new_empty(txt.shape[0], dtype=st)


@custom_op(
    "siglip_loss",
    fake=_fake_forward,
    backward=_op_backward,
    setup_context=_save,
    non_differentiable=(1, 2),
    double_backward=_op_double_backward,
)
def siglip_forward(
    img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, pos_off: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, rn_img, rn_txt): the loss over img's M rows against txt's columns (row i's positive at column
    i + pos_off), and the inverse row norms for the backward (no gradient). scale, bias: 0-d tensors."""
    return _forward(img, txt, scale, bias, pos_off)


def _loss_and_input_grads(pos_off, needs, img, txt, scale, bias):
    """`loss_with_grads`' function: the loss and its input gradients for an upstream 1, in two passes."""
    impl = _impl(img, txt, scale, bias)
    rn_i, rn_t = impl.row_rnorm(img), impl.row_rnorm(txt)
    st = _stat_dtype(img)
    weight = scalar_constant(1.0 / img.shape[0], img, st)
    total, *grads = _backward(
        img,
        txt,
        scale,
        bias,
        rn_i.to(st),
        rn_t.to(st),
        weight,
        pos_off,
        want_img=needs[0],
        want_txt=needs[1],
        want_scalars=needs[2] or needs[3],
        want_loss=True,
    )
    return (total / img.shape[0]).to(st), _input_grads(needs, *grads)[:4]


# ------------------------------------------------------------------------------------------- validation
def _scalar(name: str, value, like: torch.Tensor, other_name: str) -> torch.Tensor:
    """A one-element floating tensor on `like`'s device, as a 0-d tensor in the statistics' dtype (a view and
    a cast, so its gradient flows back to `value`)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor with one element (e.g. a learnable parameter), got {type(value).__name__}"
        )
    if not value.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype, got {value.dtype}")
    if value.numel() != 1:
        raise ValueError(f"{name} must have exactly one element, got shape {tuple(value.shape)}")
    V.same_device(**{other_name: like, name: value})
    return value.reshape(()).to(_stat_dtype(like))


def _concrete(x: torch.Tensor) -> bool:
    return type(x) in (torch.Tensor, torch.nn.Parameter) and not torch.compiler.is_compiling() and not x.is_meta


def _check_finite(scale: torch.Tensor, bias: torch.Tensor) -> None:
    """Non-finite t or b -> ValueError for CPU tensors. On a GPU the check is a device-side assertion queued
    before the kernels (no host sync, so a call can be captured in a CUDA graph and checks every replay): a
    non-finite value raises at the next synchronization, which, as every CUDA device assert, leaves the CUDA
    context unusable. Skipped while tracing, where values are not known."""
    if not _concrete(scale):
        return
    both = torch.stack([scale.detach(), bias.detach()])
    if both.device.type != "cpu":
        torch._assert_async(torch.isfinite(both).all(), "logit_scale and logit_bias must be finite")
        return
    ok = torch.isfinite(both).tolist()
    for name, fine in zip(("logit_scale", "logit_bias"), ok):
        if not fine:
            raise ValueError(f"{name} must be finite, got {(scale if name == 'logit_scale' else bias).item()}")


# ------------------------------------------------------------------------------------------- public API
def siglip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    *,
    gather_distributed: bool = False,
) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss (Zhai et al., 2023):

        L = −(1/N) Σ_i Σ_j log σ(z_ij (t · x̂_i·ŷ_j + b)),   z_ii = +1, z_ij = −1 (i ≠ j)

    Args:
        image_features, text_features: [N, D], same dtype (fp32 / bf16 / fp16; fp64 on the PyTorch path) and
            device; rows are normalized inside.
        logit_scale: t, already exponentiated (e.g. `model.logit_scale.exp()`), a one-element floating tensor;
            receives a gradient.
        logit_bias: b, a one-element floating tensor; receives a gradient.
        gather_distributed: each rank scores its N images against all ranks' texts (all-gathered; the
            gather's backward sums over ranks) and divides by its own N, as open_clip's `SigLipLoss` does: the
            ranks' losses average to the loss of the whole batch, and after DDP averages the gradients they
            equal the single-process gradients on the whole batch.

    Returns:
        The loss, a 0-d fp32 tensor (fp64 for fp64 inputs).

    Raises:
        ValueError: a feature tensor not a non-empty [N, D] tensor, shapes or devices differ, t or b without
            exactly one element, or not finite (checked with one host sync, skipped while tracing).
        TypeError: a non-tensor or non-floating input (float64 on the Triton path), or dtypes differ.
    """
    img, txt = V.view_pair("image_features", image_features, "text_features", text_features)
    scale = _scalar("logit_scale", logit_scale, img, "image_features")
    bias = _scalar("logit_bias", logit_bias, img, "image_features")
    _check_finite(scale, bias)
    rank, world = rank_and_world() if gather_distributed else (0, 1)
    if world > 1:
        txt = all_gather(txt)
    pos_off = rank * img.shape[0]
    if grads_in_forward(img, txt, scale, bias):
        differentiable = (
            functools.partial(_differentiable_loss, pos_off) if _impl(img, txt, scale, bias) is FAMILY.torch else None
        )
        return loss_with_grads(
            functools.partial(_loss_and_input_grads, pos_off),
            img,
            txt,
            scale,
            bias,
            op="siglip_loss",
            differentiable=differentiable,
            hint=TRITON_DOUBLE_BACKWARD,
        )
    return siglip_forward(img, txt, scale, bias, pos_off)[0]
