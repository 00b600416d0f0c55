"""DINOv2's KoLeo regularizer, one op.

    loss = sf.koleo_loss(x, eps=1e-8)     # x [N, D], e.g. the student's class tokens of one rank

Equal to DINOv2's `KoLeoLoss()(x, eps)`: −mean_i log(‖x̂_i − x̂_{n(i)} + 1e-8‖ + ε) over the L2-normalized
rows x̂ (`F.normalize(x, eps=ε)`), n(i) the nearest other row by cosine similarity (math and gradient in
`sslfast.reference.koleo`). The neighbour indices get no gradient, as in autograd through DINOv2's argmax;
the backward is the exact gradient through x̂_i and x̂_{n(i)}. CUDA tensors run a tiled neighbour search that
keeps no N×N similarity matrix (`sslfast.kernels.koleo`); CPU and fp64 tensors search over chunks of rows.
DINOv2 computes KoLeo per rank, and so does this op. Returns an fp32 scalar (fp64 for fp64 inputs).
"""

from __future__ import annotations

import functools
from typing import Protocol

import torch

from .. import _validate as V
from .._backend import without_autocast
from .._custom_op import TRITON_DOUBLE_BACKWARD, custom_op, differentiable_grads, double_backward_unsupported
from ._family import Family


class KoleoImpl(Protocol):
    """What `kernels.koleo` and `ops._torch.koleo` both define."""

    def koleo_forward(self, x, eps):
        """(loss [], nearest other row n [N] int64, distances d [N], inverse norms 1/max(‖x_i‖, ε) [N])."""

    def koleo_backward(self, grad, x, nn, dist, rnorm, eps):
        """∂loss/∂x in x's dtype for the 0-d upstream gradient `grad`."""


FAMILY = Family("koleo", KoleoImpl, accepts=lambda x: x.dtype != torch.float64)
_impl = FAMILY.impl


def _work_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _fake_forward(x, eps):
    N, dtype = x.shape[0], _work_dtype(x)
    return (
        x.new_empty((), dtype=dtype),
        x.new_empty(N, dtype=torch.int64),
        x.new_empty(N, dtype=dtype),
        x.new_empty(N, dtype=dtype),
    )


def _fake_backward(grad, x, nn, dist, rnorm, eps):
    return torch.empty_like(x)


@without_autocast
def _run_forward(x, eps):
    with torch.no_grad():
        return _impl(x).koleo_forward(x, eps)


@without_autocast
def _run_backward(grad, x, nn, dist, rnorm, eps):
    return _impl(x).koleo_backward(grad, x, nn, dist, rnorm, eps)


@custom_op("koleo_loss_backward", fake=_fake_backward)
def _koleo_backward(
    grad: torch.Tensor, x: torch.Tensor, nn: torch.Tensor, dist: torch.Tensor, rnorm: torch.Tensor, eps: float
) -> torch.Tensor:
    return _run_backward(grad, x, nn, dist, rnorm, eps)


def _setup_context(ctx, inputs, output):
    x, eps = inputs
    ctx.save_for_backward(x, *output[1:])
    ctx.eps = eps


def _backward(ctx, g_loss, *_):
    x, nn, dist, rnorm = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return None, None
    return _koleo_backward(g_loss, x, nn, dist, rnorm, ctx.eps), None


def _differentiable_loss(eps, x):
    """The loss in plain autograd (the reference path's forward), for a create_graph=True backward."""
    if _impl(x) is not FAMILY.torch:
        raise double_backward_unsupported("koleo_loss", TRITON_DOUBLE_BACKWARD)
    return FAMILY.torch.koleo_forward(x, eps)[0]


def _double_backward(ctx, g_loss, *_):
    x = ctx.saved_tensors[0]
    return differentiable_grads(
        functools.partial(_differentiable_loss, ctx.eps), (x,), (ctx.needs_input_grad[0],), (g_loss,)
    ) + (None,)


@custom_op(
    "koleo_loss",
    fake=_fake_forward,
    backward=_backward,
    setup_context=_setup_context,
    non_differentiable=(1, 2, 3),
    double_backward=_double_backward,
)
def _koleo(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    loss, nn, dist, rnorm = _run_forward(x, eps)
    return loss, nn, dist, rnorm


def koleo_loss(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """KoLeo loss of the rows of `x` (see the module docstring).

    Args:
        x: features [N, D], N >= 2, fp32 / bf16 / fp16 / fp64 (fp64 on the PyTorch path).
        eps: ε, the floor of the norms and the offset inside the log (> 0).

    Returns:
        The scalar loss, fp32 (fp64 for fp64 `x`); differentiable in `x`.

    Raises:
        TypeError: `x` is not a floating tensor.
        ValueError: `x` is not 2-D with at least 2 rows, or `eps` is not finite and > 0.
    """
    x = V.features("x", x)
    if x.shape[0] < 2:
        raise ValueError(f"x needs at least 2 rows (each row's nearest other row), got shape {tuple(x.shape)}")
    return _koleo(x, V.positive("eps", eps))[0]
