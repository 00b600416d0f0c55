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

import torch

from .. import _validate as V
from .._backend import use_triton, without_autocast
from .._custom_op import (TRITON_DOUBLE_BACKWARD, custom_op, differentiable_grads, double_backward_unsupported,
                          grads_in_forward, loss_with_grads)
from ..reference import swav as _reference

_DTYPES = V.FLOAT_DTYPES + (torch.float64,)


def _impl(*tensors):
    if use_triton(*tensors) and all(t.dtype != torch.float64 for t in tensors):
        from ..kernels import swav as _kernels

        return _kernels
    return _reference


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
def _swav_loss_backward(grad: torch.Tensor, scores: torch.Tensor, codes: torch.Tensor, stats: torch.Tensor,
                        temperature: float, num_global: int) -> torch.Tensor:
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
    """The loss in plain autograd (the reference path's forward), for a create_graph=True backward."""
    if _impl(scores, codes) is not _reference:
        raise double_backward_unsupported("swav_loss", TRITON_DOUBLE_BACKWARD)
    return _reference.swav_loss_forward(scores, codes, *cfg)[0]


def _double_backward(ctx, g_loss, g_stats):
    scores, codes, _ = ctx.saved_tensors
    grads = differentiable_grads(functools.partial(_differentiable_loss, ctx.cfg), (scores, codes),
                                 (ctx.needs_input_grad[0], False), (g_loss,))
    return grads + (None,) * 2


@custom_op("swav_loss", fake=_fake_forward, backward=_backward, setup_context=_setup_context,
           non_differentiable=(1,), double_backward=_double_backward)
def _swav_loss(scores: torch.Tensor, codes: torch.Tensor, temperature: float,
               num_global: int) -> tuple[torch.Tensor, torch.Tensor]:
    loss, stats = _run_forward(scores, codes, temperature, num_global)
    return loss, stats


def _loss_and_grad(cfg, needs, scores, codes):
    """`loss_with_grads`' function: the forward kernels, then the backward's for an upstream 1."""
    loss, stats = _run_forward(scores, codes, *cfg)
    return loss, (_run_backward(torch.ones_like(loss), scores, codes, stats, *cfg), None)


def _crops(name: str, value, hint: str) -> tuple[torch.Tensor, int | None]:
    """One [N, K] tensor from a tensor or a list/tuple of [B, K] crops (concatenated crop-major), and the number
    of crops when a list was given."""
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError(f"{name} must not be an empty list")
        parts = [V.tensor(f"{name}[{i}]", x, ndim=2, shape_hint="[B, K]", dtypes=_DTYPES) for i, x in enumerate(value)]
        if any(p.shape != parts[0].shape for p in parts):
            raise ValueError(f"the crops of {name} must share one shape [B, K], got "
                             f"{[tuple(p.shape) for p in parts]}")
        V.same_dtype(**{f"{name}[{i}]": p for i, p in enumerate(parts)})
        V.same_device(**{f"{name}[{i}]": p for i, p in enumerate(parts)})
        return (torch.cat(parts) if len(parts) > 1 else parts[0]), len(parts)
    return V.tensor(name, value, ndim=2, shape_hint=hint, dtypes=_DTYPES), None


def swav_loss(scores, codes, *, temperature: float = 0.1, num_global_crops: int = 2) -> torch.Tensor:
    """SwAV swapped-prediction loss (see the module docstring); gradients to `scores` only."""
    if isinstance(num_global_crops, bool) or not isinstance(num_global_crops, int):
        raise TypeError(f"num_global_crops must be an int, got {type(num_global_crops).__name__}")
    if num_global_crops < 1:
        raise ValueError(f"num_global_crops must be >= 1, got {num_global_crops}")
    G = num_global_crops
    s, n_crops = _crops("scores", scores, "[V·B, K]")
    q, n_codes = _crops("codes", codes, "[G·B, K]")
    if n_codes is not None and n_codes != G:
        raise ValueError(f"codes must hold num_global_crops = {G} crops, got a list of {n_codes}")
    if q.shape[0] == 0 or q.shape[1] == 0 or q.shape[0] % G:
        raise ValueError(f"codes must be a non-empty [G·B, K] tensor with G = num_global_crops = {G}, got shape "
                         f"{tuple(q.shape)}")
    B, K = q.shape[0] // G, q.shape[1]
    if s.shape[1] != K or s.shape[0] % B:
        raise ValueError(f"scores must be [V·B, K] with B = {B}, K = {K} (from codes), got shape {tuple(s.shape)}")
    if n_crops is not None and s.shape[0] != n_crops * B:
        raise ValueError(f"the crops of scores must be [B, K] with B = {B} (from codes), got "
                         f"{tuple(scores[0].shape)}")
    n_crops = s.shape[0] // B
    if n_crops < max(G, 2):
        raise ValueError(f"scores must hold V >= max(num_global_crops, 2) = {max(G, 2)} crops of B = {B}, got "
                         f"{n_crops}")
    V.same_device(scores=s, codes=q)
    tau = V.positive("temperature", temperature)
    q = q.detach()
    cfg = (tau, G)
    if grads_in_forward(s):
        # a create_graph backward recomputes the loss in plain autograd (reference path only)
        differentiable = functools.partial(_differentiable_loss, cfg) if _impl(s, q) is _reference else None
        return loss_with_grads(functools.partial(_loss_and_grad, cfg), s, q, op="swav_loss",
                               differentiable=differentiable, hint=TRITON_DOUBLE_BACKWARD)
    return _swav_loss(s, q, tau, G)[0]
