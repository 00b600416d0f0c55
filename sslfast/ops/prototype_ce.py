"""The prototype-head cross-entropy of DINO, DINOv2 (iBOT) and SwAV, fused with the head's last layer.

    loss = sf.prototype_cross_entropy(student_feats, weight, teacher_probs, student_temp=0.1)

student_feats x [B, D] (the head's bottleneck output), weight W [K, D] (the prototypes: the effective weight of
the last layer, e.g. the weight-normalized one of DINO's head, which has no bias), teacher_probs p [B, K] (the
teacher's soft targets, centered/sharpened or Sinkhorn-Knopp; no gradient; rows need not sum to 1):

    loss = mean_i Σ_k p_ik · −log softmax(x_i Wᵀ/τ_s)_k = mean_i (r_i·lse_i − Σ_k p_ik s_ik),  r_i = Σ_k p_ik

Gradients flow to x and W (math in `sslfast.reference.prototype_ce`). The B×K student logits, their softmax
and their gradient are never stored: the forward keeps per-row log-sum-exps and r, and the backward
recomputes the logits tile by tile. CUDA tensors run the Triton kernels (`sslfast.kernels.prototype_ce`); CPU
and fp64 tensors the blocked PyTorch path. Returns an fp32 scalar (fp64 for fp64 inputs).
"""
from __future__ import annotations

import torch

from .. import _validate as V
from .._backend import use_triton, without_autocast
from .._custom_op import custom_op
from ..reference import prototype_ce as _reference

_DTYPES = V.FLOAT_DTYPES + (torch.float64,)


def _impl(*tensors):
    if use_triton(*tensors) and all(t.dtype != torch.float64 for t in tensors):
        from ..kernels import prototype_ce as _kernels

        return _kernels
    return _reference


def _work_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _fake_forward(x, w, p, student_temp):
    dtype = _work_dtype(x)
    return x.new_empty((), dtype=dtype), x.new_empty(x.shape[0], dtype=dtype), x.new_empty(x.shape[0], dtype=dtype)


def _fake_backward(grad, x, w, p, lse, rsum, student_temp, want_x, want_w):
    return (torch.empty_like(x) if want_x else x.new_empty(0)), (torch.empty_like(w) if want_w else w.new_empty(0))


@without_autocast
def _run_forward(x, w, p, student_temp):
    with torch.no_grad():
        return _impl(x, w, p).prototype_ce_forward(x, w, p, student_temp)


@without_autocast
def _run_backward(grad, x, w, p, lse, rsum, student_temp, want_x, want_w):
    with torch.no_grad():
        return _impl(x, w, p).prototype_ce_backward(grad, x, w, p, lse, rsum, student_temp, want_x=want_x,
                                                    want_w=want_w)


@custom_op("prototype_cross_entropy_backward", fake=_fake_backward)
def _prototype_ce_backward(grad: torch.Tensor, x: torch.Tensor, w: torch.Tensor, p: torch.Tensor, lse: torch.Tensor,
                           rsum: torch.Tensor, student_temp: float, want_x: bool, want_w: bool
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(dL/dx or [0], dL/dW or [0]) for the upstream gradient of the loss, the logits recomputed from lse."""
    return _run_backward(grad, x, w, p, lse, rsum, student_temp, want_x, want_w)


def _setup_context(ctx, inputs, output):
    x, w, p, student_temp = inputs
    ctx.save_for_backward(x, w, p, output[1], output[2])
    ctx.student_temp = student_temp


def _backward(ctx, g_loss, *_):
    want_x, want_w = ctx.needs_input_grad[:2]
    if not (want_x or want_w):
        return None, None, None, None
    dx, dw = _prototype_ce_backward(g_loss, *ctx.saved_tensors, ctx.student_temp, want_x, want_w)
    return (dx if want_x else None), (dw if want_w else None), None, None


@custom_op("prototype_cross_entropy", fake=_fake_forward, backward=_backward, setup_context=_setup_context,
           non_differentiable=(1, 2))
def _prototype_ce(x: torch.Tensor, w: torch.Tensor, p: torch.Tensor, student_temp: float
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, lse [B], r [B]): the loss, each row's log-sum-exp of x Wᵀ/τ and Σ_k p_ik (for the backward)."""
    loss, lse, rsum = _run_forward(x, w, p, student_temp)
    return loss, lse, rsum


def prototype_cross_entropy(student_feats: torch.Tensor, weight: torch.Tensor, teacher_probs: torch.Tensor, *,
                            student_temp: float) -> torch.Tensor:
    """Mean over rows of the cross-entropy between `teacher_probs` and softmax(student_feats · weightᵀ /
    student_temp) (see the module docstring). student_feats and weight share a dtype; teacher_probs may have
    any floating dtype and gets no gradient."""
    x = V.tensor("student_feats", student_feats, ndim=2, shape_hint="[B, D]", dtypes=_DTYPES)
    w = V.tensor("weight", weight, ndim=2, shape_hint="[K, D]", dtypes=_DTYPES)
    p = V.tensor("teacher_probs", teacher_probs, ndim=2, shape_hint="[B, K]", dtypes=_DTYPES)
    (B, D), K = x.shape, w.shape[0]
    if B == 0 or D == 0:
        raise ValueError(f"student_feats must be a non-empty [B, D] tensor, got shape {tuple(x.shape)}")
    if K == 0 or w.shape[1] != D:
        raise ValueError(f"weight must be a non-empty [K, D] tensor with D = {D} (from student_feats), got shape "
                         f"{tuple(w.shape)}")
    if p.shape != (B, K):
        raise ValueError(f"teacher_probs must be [B, K] = [{B}, {K}] (from student_feats and weight), got shape "
                         f"{tuple(p.shape)}")
    V.same_device(student_feats=x, weight=w, teacher_probs=p)
    if x.dtype != w.dtype:
        raise TypeError(f"student_feats and weight must share a dtype, got {x.dtype} and {w.dtype}")
    tau = V.positive("student_temp", student_temp)
    return _prototype_ce(x, w, p.detach(), tau)[0]
