"""The prototype-head cross-entropy of DINO, DINOv2 (iBOT) and SwAV, fused with the head's last layer.

    loss = sf.prototype_cross_entropy(student_feats, weight, teacher_probs, student_temp=0.1)

student_feats x [B, D] (the head's bottleneck output), weight W [K, D] (the prototypes: the effective weight of
the last layer, e.g. the weight-normalized one of DINO's head, which has no bias), teacher_probs p [B, K] (the
teacher's soft targets, centered/sharpened or Sinkhorn-Knopp; no gradient; rows need not sum to 1):

    loss = mean_i Σ_k p_ik · −log softmax(x_i Wᵀ/τ_s)_k = mean_i (r_i·lse_i − Σ_k p_ik s_ik),  r_i = Σ_k p_ik

Gradients flow to x and W (math in `sslfast.reference.prototype_ce`). The B×K student logits, their softmax
and their gradient are never stored: the forward keeps per-row log-sum-exps and r, and the backward
recomputes the logits tile by tile. CUDA tensors run the Triton kernels (`sslfast.kernels.prototype_ce`); CPU
and fp64 tensors the blocked PyTorch path (`sslfast.ops._torch.prototype_ce`). Returns an fp32 scalar (fp64
for fp64 inputs).

The teacher's targets come from the same head without its logits either:

    p = sf.prototype_teacher_probs(teacher_feats, teacher_weight, teacher_temp=0.04, center=c, center_momentum=0.9)

DINO's centered, sharpened softmax in two passes over K tiles (online row log-sum-exps, then the result), and
its center EMA from (mean_i f_i) Wᵀ, which equals the batch mean of the logits; or (mode="sinkhorn") the
Sinkhorn-Knopp targets of DINOv2 and SwAV (`sslfast.ops.sinkhorn`) of the logits f Wᵀ, which Sinkhorn's
column sums need in full.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.distributed as dist

from .. import _validate as V
from .._backend import without_autocast
from .._custom_op import custom_op
from ..distributed import is_distributed
from ._family import Family
from .sinkhorn import sinkhorn_knopp

_DTYPES = V.ALL_FLOAT_DTYPES


class PrototypeCEImpl(Protocol):
    """What `kernels.prototype_ce` and `ops._torch.prototype_ce` both define (x [B, D] and w [K, D] share a
    dtype; results in fp32, fp64 for fp64 inputs)."""

    def prototype_ce_forward(self, x, w, p, student_temp):
        """(loss [], lse [B], r [B]): the mean loss, each row's log-sum-exp of x Wᵀ/τ_s and Σ_k p_ik."""

    def prototype_ce_backward(self, grad, x, w, p, lse, rsum, student_temp, *, want_x=True, want_w=True):
        """(dL/dx or an empty tensor, dL/dW or an empty tensor) for the 0-d upstream gradient `grad`."""

    def prototype_teacher_softmax(self, x, w, center, teacher_temp):
        """softmax((x Wᵀ − center)/τ_t) per row [B, K], the only B×K tensor; center a [K] vector."""

    def prototype_teacher_logits(self, x, w):
        """x Wᵀ [B, K] (Sinkhorn-Knopp's input)."""


FAMILY = Family("prototype_ce", PrototypeCEImpl, accepts=lambda *ts: all(t.dtype != torch.float64 for t in ts))
_impl = FAMILY.impl


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
        return _impl(x, w, p).prototype_ce_backward(
            grad, x, w, p, lse, rsum, student_temp, want_x=want_x, want_w=want_w
        )


@custom_op("prototype_cross_entropy_backward", fake=_fake_backward)
def _prototype_ce_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    w: torch.Tensor,
    p: torch.Tensor,
    lse: torch.Tensor,
    rsum: torch.Tensor,
    student_temp: float,
    want_x: bool,
    want_w: bool,
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


@custom_op(
    "prototype_cross_entropy",
    fake=_fake_forward,
    backward=_backward,
    setup_context=_setup_context,
    non_differentiable=(1, 2),
)
def _prototype_ce(
    x: torch.Tensor, w: torch.Tensor, p: torch.Tensor, student_temp: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, lse [B], r [B]): the loss, each row's log-sum-exp of x Wᵀ/τ and Σ_k p_ik (for the backward)."""
    loss, lse, rsum = _run_forward(x, w, p, student_temp)
    return loss, lse, rsum


def _feats_and_weight(name: str, feats, weight) -> tuple[torch.Tensor, torch.Tensor]:
    """Features [B, D] named `name` and prototypes `weight` [K, D], non-empty, with one D, on one device."""
    x = V.tensor(name, feats, ndim=2, shape_hint="[B, D]", dtypes=_DTYPES)
    w = V.tensor("weight", weight, ndim=2, shape_hint="[K, D]", dtypes=_DTYPES)
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty [B, D] tensor, got shape {tuple(x.shape)}")
    if w.shape[0] == 0 or w.shape[1] != x.shape[1]:
        raise ValueError(
            f"weight must be a non-empty [K, D] tensor with D = {x.shape[1]} (from {name}), got shape {tuple(w.shape)}"
        )
    V.same_device(**{name: x, "weight": w})
    return x, w


def prototype_cross_entropy(
    student_feats: torch.Tensor, weight: torch.Tensor, teacher_probs: torch.Tensor, *, student_temp: float
) -> torch.Tensor:
    """Mean over rows of the cross-entropy between `teacher_probs` and softmax(student_feats · weightᵀ /
    student_temp) (see the module docstring), without storing the [B, K] student logits.

    Args:
        student_feats: [B, D] student features (fp32, bf16, fp16; fp64 on the PyTorch path); gets a gradient.
        weight: [K, D] prototypes, the head's effective last-layer weight, in student_feats' dtype; gets a
            gradient.
        teacher_probs: [B, K] teacher targets of any floating dtype (rows need not sum to 1); no gradient.
        student_temp: τ_s > 0.

    Returns:
        The mean over rows of Σ_k −p_ik log softmax(x_i Wᵀ/τ_s)_k, an fp32 scalar (fp64 for fp64 inputs).

    Raises:
        TypeError: a non-tensor or non-floating input, student_feats and weight of different dtypes, or a
            non-real student_temp.
        ValueError: shapes that are not [B, D], [K, D] and [B, K] with B, D, K >= 1, inputs on different devices,
            or student_temp not finite and > 0.
    """
    x, w = _feats_and_weight("student_feats", student_feats, weight)
    B, K = x.shape[0], w.shape[0]
    p = V.soft_targets(
        "teacher_probs", teacher_probs, shape=(B, K), shape_hint="[B, K]", like={"student_feats": x, "weight": w}
    )
    if x.dtype != w.dtype:
        raise TypeError(f"student_feats and weight must share a dtype, got {x.dtype} and {w.dtype}")
    tau = V.positive("student_temp", student_temp)
    return _prototype_ce(x, w, p, tau)[0]


# ------------------------------------------------------------------------------------------------ teacher side
_MODES = ("centering", "sinkhorn")


def _fake_teacher(x, w, *_):
    return x.new_empty((x.shape[0], w.shape[0]), dtype=_work_dtype(x))


@without_autocast
def _run_teacher_softmax(x, w, c, teacher_temp):
    with torch.no_grad():
        return _impl(x, w, c).prototype_teacher_softmax(x, w, c, teacher_temp)


@without_autocast
def _run_teacher_logits(x, w):
    with torch.no_grad():
        return _impl(x, w).prototype_teacher_logits(x, w)


@custom_op("prototype_teacher_softmax", fake=_fake_teacher)
def _teacher_softmax(x: torch.Tensor, w: torch.Tensor, c: torch.Tensor, teacher_temp: float) -> torch.Tensor:
    """softmax((x Wᵀ − c)/τ_t) per row, c a [K] vector in the work dtype."""
    return _run_teacher_softmax(x, w, c, teacher_temp)


@custom_op("prototype_teacher_logits", fake=_fake_teacher)
def _teacher_logits(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x Wᵀ in the work dtype."""
    return _run_teacher_logits(x, w)


def _unit_momentum(value) -> float:
    m = V.non_negative("center_momentum", value)
    if m > 1.0:
        raise ValueError(f"center_momentum must be a finite number in [0, 1], got {m}")
    return m


def _update_center_(center: torch.Tensor, x: torch.Tensor, w: torch.Tensor, momentum: float) -> None:
    """DINO's `update_center` from the features: the batch sum of the logits Σ_i x_i Wᵀ = (Σ_i x_i) Wᵀ,
    all-reduced over ranks when torch.distributed is initialized, over the global batch size; then
    center ← m·center + (1 − m)·batch_center, in place."""
    ct = _work_dtype(x)
    batch_center = w.to(ct) @ x.sum(dim=0, dtype=ct)
    world = 1
    if is_distributed():
        dist.all_reduce(batch_center)
        world = dist.get_world_size()
    batch_center = batch_center / (x.shape[0] * world)
    center.mul_(momentum).add_((batch_center * (1 - momentum)).reshape(center.shape).to(center.dtype))


def prototype_teacher_probs(
    teacher_feats: torch.Tensor,
    weight: torch.Tensor,
    *,
    teacher_temp: float,
    center: torch.Tensor | None = None,
    center_momentum: float | None = None,
    mode: str = "centering",
    sinkhorn_iters: int = 3,
    gather_distributed: bool = False,
) -> torch.Tensor:
    """The teacher's targets [B, K] of its head's last layer, from features and prototypes (module docstring).

    With z = teacher_feats · weightᵀ: mode="centering" (DINO) gives softmax((z_i − center)/τ_t) per row, a
    missing center counting as 0, and then, with `center_momentum` m, updates `center` in place,
    center ← m·center + (1 − m)·mean_i z_i, the mean over every rank's rows when torch.distributed is
    initialized (as DINO's `update_center` and `sslfast.update_center_`); the targets use the center from before
    the update. Only the result is B×K. mode="sinkhorn" (DINOv2's `SinkhornKnoppTeacher`, SwAV's
    `distributed_sinkhorn`) gives `sinkhorn_knopp(z, τ_t, sinkhorn_iters, gather_distributed=...)`, whose
    iterations need z [B, K]. No gradient flows.

    Args:
        teacher_feats: [B, D] teacher features (fp32, bf16, fp16; fp64 on the PyTorch path).
        weight: [K, D] the teacher's prototypes (its effective last-layer weight), in teacher_feats' dtype.
        teacher_temp: τ_t > 0 (SwAV: its ε).
        center: "centering" only: DINO's center, [1, K] or [K], any floating dtype; None for none.
        center_momentum: "centering" only: m in [0, 1] to update `center` in place; None leaves it.
        mode: "centering" or "sinkhorn".
        sinkhorn_iters: "sinkhorn" only: the number of Sinkhorn-Knopp iterations, >= 1.
        gather_distributed: "sinkhorn": normalize over the global batch (every rank must call it). "centering"
            reduces the center update over ranks whenever torch.distributed is initialized, as DINO.

    Returns:
        The targets [B, K], rows summing to 1, fp32 (fp64 for fp64 features), not requiring grad.

    Raises:
        TypeError: a non-tensor or non-floating input, teacher_feats and weight of different dtypes, a non-real
            temperature or momentum, a non-int sinkhorn_iters, a non-bool gather_distributed, or fp64 features
            in sinkhorn mode where `sinkhorn_knopp` runs its kernels.
        ValueError: shapes other than [B, D], [K, D] and [1, K] / [K] (B, D, K >= 1), inputs on different
            devices, an unknown mode, teacher_temp not finite and > 0, center_momentum outside [0, 1] or without
            a center, a center or center_momentum in sinkhorn mode, or sinkhorn_iters < 1.
    """
    x, w = _feats_and_weight("teacher_feats", teacher_feats, weight)
    K = w.shape[0]
    if x.dtype != w.dtype:
        raise TypeError(f"teacher_feats and weight must share a dtype, got {x.dtype} and {w.dtype}")
    tau = V.positive("teacher_temp", teacher_temp)
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    if isinstance(sinkhorn_iters, bool) or not isinstance(sinkhorn_iters, int):
        raise TypeError(f"sinkhorn_iters must be an int, got {type(sinkhorn_iters).__name__}")
    if sinkhorn_iters < 1:
        raise ValueError(f"sinkhorn_iters must be >= 1, got {sinkhorn_iters}")
    if not isinstance(gather_distributed, bool):
        raise TypeError(f"gather_distributed must be a bool, got {type(gather_distributed).__name__}")
    x, w = x.detach(), w.detach()
    if mode == "sinkhorn":
        if center is not None or center_momentum is not None:
            raise ValueError("center and center_momentum belong to mode='centering'; Sinkhorn-Knopp takes neither")
        # `sinkhorn_knopp` takes fp64 logits on its PyTorch path only: refused here, before the logits launch
        V.check("teacher_feats", x, dtypes=V.FLOAT_DTYPES, reference_dtypes=V.REFERENCE_DTYPES)
        with torch.no_grad():
            return sinkhorn_knopp(_teacher_logits(x, w), tau, sinkhorn_iters, gather_distributed=gather_distributed)
    if center is None:
        if center_momentum is not None:
            raise ValueError("center_momentum needs a center to update")
        c = x.new_zeros(K, dtype=_work_dtype(x))
    else:
        V.check("center", center, dtypes=_DTYPES)
        if center.numel() != K or center.dim() > 2 or (center.dim() == 2 and center.shape[0] != 1):
            raise ValueError(
                f"center must be [1, K] or [K] with K = {K} (from weight), got shape {tuple(center.shape)}"
            )
        V.same_device(teacher_feats=x, center=center)
        c = center.detach().reshape(K).to(_work_dtype(x)).contiguous()
    if center_momentum is not None:  # checked before any launch
        center_momentum = _unit_momentum(center_momentum)
    with torch.no_grad():  # (c may view center: the update below runs after the targets, in stream order)
        probs = _teacher_softmax(x, w, c, tau)
        if center_momentum is not None:
            _update_center_(center, x, w, center_momentum)
    return probs
