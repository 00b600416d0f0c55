"""SwAV's swapped-prediction loss over every (global crop's codes, other crop's scores) pair, one op.

    loss = sf.swav_loss(scores, codes, temperature=0.1, num_global_crops=2)

scores: the prototype scores of all V crops, a list/tuple of V tensors [B, K] or one [V·B, K] tensor
crop-major, the G = num_global_crops global crops first; codes: the Sinkhorn codes q of the G global crops
(e.g. `sf.sinkhorn_knopp` of their detached scores), a list/tuple of G tensors [B, K] or one [G·B, K]. The
loss is exactly facebookresearch/swav main_swav.py's loop,

    loss = 1/G Σ_{i < G} 1/(V − 1) Σ_{v ≠ i} mean_b −Σ_k q_i[b, k] log softmax(scores_v[b]/τ)_k,

computed as per-row log-sum-exps, target sums and dots against the codes summed over crops (math in
`sslfast.reference.swav`): no per-pair log-softmax is materialized, and the backward recomputes the softmax
from the saved [2, V·B] row statistics (an eager call that will be differentiated runs that backward inside
its forward: `sslfast._custom_op.loss_with_grads`). The codes get no gradient. CUDA tensors run streaming
Triton kernels over K (`sslfast.kernels.swav`); CPU and fp64 tensors the chunked PyTorch path. Returns an fp32
scalar (fp64 for fp64 scores).

Distributed training: the loss is a mean over this rank's images only and needs no collective. With codes
computed over the global batch (`sf.sinkhorn_knopp(..., gather_distributed=True)`, as SwAV's
`distributed_sinkhorn`) and equal per-rank batches, DDP's average of the per-rank gradients is exactly the
gradient of the single-process loss on the whole batch.
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
)
from ._family import Family


class SwavImpl(Protocol):
    """What `kernels.swav` and `ops._torch.swav` both define: scores [V·B, K] crop-major, codes [G·B, K],
    G = num_global."""

    def swav_loss_forward(self, scores, codes, temperature, num_global):
        """(loss [], row statistics [2, V·B]: natural lse(scores/τ) per row, then the target sums c per row)."""

    def swav_loss_backward(self, grad, scores, codes, stats, temperature, num_global):
        """∂loss/∂scores in the scores' dtype for the 0-d upstream gradient `grad`; `stats` from the forward."""


FAMILY = Family(
    "swav", SwavImpl, accepts=lambda scores, codes: scores.dtype != torch.float64 and codes.dtype != torch.float64
)
_impl = FAMILY.impl


def _fake_forward(scores, codes, temperature, num_global):
    dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
    return scores.new_empty((), dtype=dtype), scores.new_empty((2, scores.shape[0]), dtype=dtype)


def _fake_backward(grad, scores, codes, stats, temperature, num_global):
    return torch.empty_like(scores)


@without_autocast
def _run_forward(scores, codes, temperature, num_global):
    with torch.no_grad():
        return _impl(scores, codes).swav_loss_forward(scores, codes, temperature, num_global)


@without_autocast
def _run_backward(grad, scores, codes, stats, temperature, num_global):
    return _impl(scores, codes).swav_loss_backward(grad, scores, codes, stats, temperature, num_global)


@custom_op("swav_loss_backward", fake=_fake_backward)
def _swav_loss_backward(
    grad: torch.Tensor,
    scores: torch.Tensor,
    codes: torch.Tensor,
    stats: torch.Tensor,
    temperature: float,
    num_global: int,
) -> torch.Tensor:
    return _run_backward(grad, scores, codes, stats, temperature, num_global)


def _setup_context(ctx, inputs, output):
    scores, codes, temperature, num_global = inputs
    ctx.save_for_backward(scores, codes, output[1])
    ctx.cfg = (temperature, num_global)


def _backward(ctx, g_loss, g_stats):
    scores, codes, stats = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return (None,) * 4
    return _swav_loss_backward(g_loss, scores, codes, stats, *ctx.cfg), None, None, None


def _differentiable_loss(cfg, scores, codes) -> torch.Tensor:
    """The loss in plain autograd (the PyTorch path's forward), for a create_graph=True backward."""
    if _impl(scores, codes) is not FAMILY.torch:
        raise double_backward_unsupported("swav_loss", TRITON_DOUBLE_BACKWARD)
    return FAMILY.torch.swav_loss_forward(scores, codes, *cfg)[0]


def _double_backward(ctx, g_loss, g_stats):
    scores, codes, _ = ctx.saved_tensors
    grads = differentiable_grads(
        functools.partial(_differentiable_loss, ctx.cfg), (scores, codes), (ctx.needs_input_grad[0], False), (g_loss,)
    )
    return grads + (None,) * 2


@custom_op(
    "swav_loss",
    fake=_fake_forward,
    backward=_backward,
    setup_context=_setup_context,
    non_differentiable=(1,),
    double_backward=_double_backward,
)
def _swav_loss(
    scores: torch.Tensor, codes: torch.Tensor, temperature: float, num_global: int
) -> tuple[torch.Tensor, torch.Tensor]:
    loss, stats = _run_forward(scores, codes, temperature, num_global)
    return loss, stats


def _loss_and_grad(cfg, needs, scores, codes):
    """`loss_with_grads`' function: the forward kernels, then the backward's for an upstream 1."""
    loss, stats = _run_forward(scores, codes, *cfg)
    return loss, (_run_backward(torch.ones_like(loss), scores, codes, stats, *cfg), None)


def _joined(name: str, value) -> tuple[object, int | None]:
    """A list/tuple of [B, K] crops checked and concatenated crop-major into one [V·B, K] tensor, with the number
    of crops; anything else as it is (checked by the caller), with None."""
    if not isinstance(value, (list, tuple)):
        return value, None
    if not value:
        raise ValueError(f"{name} must not be an empty list")
    parts = {
        f"{name}[{i}]": V.tensor(f"{name}[{i}]", x, ndim=2, shape_hint="[B, K]", dtypes=V.ALL_FLOAT_DTYPES)
        for i, x in enumerate(value)
    }
    shapes = [tuple(p.shape) for p in parts.values()]
    if shapes.count(shapes[0]) != len(shapes):
        raise ValueError(f"the crops of {name} must share one shape [B, K], got {shapes}")
    V.same_dtype(**parts)
    V.same_device(**parts)
    return (torch.cat(list(parts.values())) if len(parts) > 1 else parts[f"{name}[0]"]), len(parts)


def swav_loss(scores, codes, *, temperature: float = 0.1, num_global_crops: int = 2) -> torch.Tensor:
    """SwAV's swapped-prediction loss over every (global crop's codes, other crop's scores) pair (see the module
    docstring).

    Args:
        scores: the prototype scores of all V crops of B images: one [V·B, K] tensor crop-major with the G
            global crops first, or a list/tuple of V tensors [B, K]; fp32, bf16, fp16 or fp64 (fp64 runs the
            PyTorch path), one dtype and device. Gets the gradient.
        codes: the Sinkhorn codes of the G global crops (e.g. `sf.sinkhorn_knopp` of their detached scores):
            one [G·B, K] tensor or a list/tuple of G tensors [B, K], any floating dtype, on the scores'
            device. Gets no gradient; rows need not sum to 1.
        temperature: τ > 0, the scores' softmax temperature.
        num_global_crops: G >= 1, the crops that have codes; V >= max(G, 2).

    Returns:
        The loss, a 0-d fp32 tensor (fp64 for fp64 scores).

    Raises:
        TypeError: scores or codes (or one of their crops) is not a floating tensor, crops differ in dtype,
            temperature is not a real number or num_global_crops not an int.
        ValueError: a shape does not fit [V·B, K] / [G·B, K] (crops of unequal shape, K or B disagreeing,
            V < max(G, 2), G codes expected), an empty list, tensors on different devices, temperature not
            finite and > 0, or num_global_crops < 1.
    """
    if isinstance(num_global_crops, bool) or not isinstance(num_global_crops, int):
        raise TypeError(f"num_global_crops must be an int, got {type(num_global_crops).__name__}")
    if num_global_crops < 1:
        raise ValueError(f"num_global_crops must be >= 1, got {num_global_crops}")
    G = num_global_crops
    s, n_crops = _joined("scores", scores)
    s = V.tensor("scores", s, ndim=2, shape_hint="[V·B, K]", dtypes=V.ALL_FLOAT_DTYPES)
    q, n_codes = _joined("codes", codes)
    if n_codes is not None and n_codes != G:
        raise ValueError(f"codes must hold num_global_crops = {G} crops, got a list of {n_codes}")
    q = V.soft_targets("codes", q, shape=(None, s.shape[1]), shape_hint="[G·B, K]", like={"scores": s})
    if q.shape[0] == 0 or q.shape[1] == 0 or q.shape[0] % G:
        raise ValueError(
            f"codes must be a non-empty [G·B, K] tensor with G = num_global_crops = {G}, got shape {tuple(q.shape)}"
        )
    B = q.shape[0] // G
    if s.shape[0] % B:
        raise ValueError(f"scores must be [V·B, K] with B = {B} (from codes), got shape {tuple(s.shape)}")
    if n_crops is not None and s.shape[0] != n_crops * B:
        raise ValueError(f"the crops of scores must be [B, K] with B = {B} (from codes), got {tuple(scores[0].shape)}")
    n_crops = s.shape[0] // B
    if n_crops < max(G, 2):
        raise ValueError(
            f"scores must hold V >= max(num_global_crops, 2) = {max(G, 2)} crops of B = {B}, got {n_crops}"
        )
    tau = V.positive("temperature", temperature)
    cfg = (tau, G)
    if grads_in_forward(s):
        # a create_graph backward recomputes the loss in plain autograd (PyTorch path only)
        differentiable = functools.partial(_differentiable_loss, cfg) if _impl(s, q) is FAMILY.torch else None
        return loss_with_grads(
            functools.partial(_loss_and_grad, cfg),
            s,
            q,
            op="swav_loss",
            differentiable=differentiable,
            hint=TRITON_DOUBLE_BACKWARD,
        )
    return _swav_loss(s, q, tau, G)[0]
