"""DINO's centered, sharpened cross-entropy over every (teacher global crop, other student crop) pair, one op.

    loss = sf.dino_loss(student_output, teacher_output, center, student_temp=0.1, teacher_temp=0.04,
                        num_global_crops=2, center_momentum=0.9)

student_output [V·B, K]: all V crops crop-major, the global ones first; teacher_output [G·B, K]: the teacher's
G global crops. The loss is exactly facebookresearch/dino's `DINOLoss.forward` (mean over the G·V − G pairs of
the batch-mean CE between softmax((t_g − center)/τ_t) and log_softmax(s_v/τ_s), v ≠ g), computed as
per-row log-sum-exps and dots against the teacher probabilities summed over crops (math in
`sslfast.reference.dino`): no per-pair softmax or product is materialized, and the backward recomputes the
student and teacher softmaxes from the saved [(V + G)·B] row LSEs (an eager call that will be
differentiated runs that backward inside its forward: `sslfast._custom_op.loss_with_grads`). The teacher
output and the center get no gradient. CUDA tensors run three streaming Triton kernels over K
(`sslfast.kernels.dino`); CPU and fp64 tensors the chunked PyTorch path.

With `center_momentum`, the center (a [1, K] or [K] tensor, e.g. the `center` buffer of
`sslfast.nn.DINOLoss`) is then updated in place with the batch mean of the teacher outputs, all-reduced over
ranks (`update_center_`); the loss uses the center from before the update, as DINO does.
"""

from __future__ import annotations

import functools
from typing import Protocol

import torch

from .. import _validate as V
from .._custom_op import (
    TRITON_DOUBLE_BACKWARD,
    custom_op,
    differentiable_grads,
    double_backward_unsupported,
    grads_in_forward,
    loss_with_grads,
)
from ._ema_args import real as _real
from ._family import Family


class DinoImpl(Protocol):
    """What `kernels.dino` and `ops._torch.dino` both define."""

    def dino_loss_forward(self, student, teacher, center, student_temp, teacher_temp, num_global):
        """(loss [], natural log-sum-exps [(V + G)·B]: of student/τ_s per row, then of (teacher − center)/τ_t
        per row), fp32 (fp64 for fp64 inputs)."""

    def dino_loss_backward(self, grad, student, teacher, center, lse, student_temp, teacher_temp, num_global):
        """∂loss/∂student in the student's dtype for the 0-d upstream gradient `grad`; `lse` from the forward."""


FAMILY = Family("dino", DinoImpl, accepts=lambda *tensors: all(t.dtype != torch.float64 for t in tensors))
_impl = FAMILY.impl


def _fake_forward(student, teacher, center, student_temp, teacher_temp, num_global):
    dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
    return student.new_empty((), dtype=dtype), student.new_empty(student.shape[0] + teacher.shape[0], dtype=dtype)


def _fake_backward(grad, student, teacher, center, lse, student_temp, teacher_temp, num_global):
    return torch.empty_like(student)


@custom_op("dino_loss_backward", fake=_fake_backward)
def _dino_loss_backward(
    grad: torch.Tensor,
    student: torch.Tensor,
    teacher: torch.Tensor,
    center: torch.Tensor,
    lse: torch.Tensor,
    student_temp: float,
    teacher_temp: float,
    num_global: int,
) -> torch.Tensor:
    return _impl(student, teacher, center).dino_loss_backward(
        grad, student, teacher, center, lse, student_temp, teacher_temp, num_global
    )


def _setup_context(ctx, inputs, output):
    student, teacher, center, student_temp, teacher_temp, num_global = inputs
    ctx.save_for_backward(student, teacher, center, output[1])
    ctx.cfg = (student_temp, teacher_temp, num_global)


def _backward(ctx, g_loss, g_lse):
    student, teacher, center, lse = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return (None,) * 6
    ds = _dino_loss_backward(g_loss, student, teacher, center, lse, *ctx.cfg)
    return ds, None, None, None, None, None


def _differentiable_loss(cfg, student, teacher, center) -> torch.Tensor:
    """The loss in plain autograd (the reference path's forward), for a create_graph=True backward."""
    if _impl(student, teacher, center) is not FAMILY.torch:
        raise double_backward_unsupported("dino_loss", TRITON_DOUBLE_BACKWARD)
    return FAMILY.torch.dino_loss_forward(student, teacher, center, *cfg)[0]


def _double_backward(ctx, g_loss, g_lse):
    student, teacher, center, _ = ctx.saved_tensors
    grads = differentiable_grads(
        functools.partial(_differentiable_loss, ctx.cfg),
        (student, teacher, center),
        (ctx.needs_input_grad[0], False, False),
        (g_loss,),
    )
    return grads + (None,) * 3


@custom_op(
    "dino_loss",
    fake=_fake_forward,
    backward=_backward,
    setup_context=_setup_context,
    non_differentiable=(1,),
    double_backward=_double_backward,
)
def _dino_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    center: torch.Tensor,
    student_temp: float,
    teacher_temp: float,
    num_global: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    loss, lse = _impl(student, teacher, center).dino_loss_forward(
        student, teacher, center, student_temp, teacher_temp, num_global
    )
    return loss, lse


def _loss_and_grad(cfg, needs, student, teacher, center):
    """`loss_with_grads`' function: the forward kernels, then the backward's for an upstream 1."""
    impl = _impl(student, teacher, center)
    loss, lse = impl.dino_loss_forward(student, teacher, center, *cfg)
    return loss, (impl.dino_loss_backward(torch.ones_like(loss), student, teacher, center, lse, *cfg), None, None)


_DTYPES = V.FLOAT_DTYPES + (torch.float64,)


def dino_loss(
    student_output: torch.Tensor,
    teacher_output: torch.Tensor,
    center: torch.Tensor,
    student_temp: float = 0.1,
    teacher_temp: float = 0.04,
    *,
    num_global_crops: int = 2,
    center_momentum: float | None = None,
) -> torch.Tensor:
    """DINO loss over every (teacher global crop, other student crop) pair (see the module docstring).

    Args:
        student_output: [V·B, K] logits of V >= 2 crops of B images, crop-major, the G global crops first;
            fp32 / bf16 / fp16, or fp64 on the PyTorch path.
        teacher_output: [G·B, K] the teacher's logits of the G global crops (gets no gradient).
        center: [1, K] or [K], the teacher's center (gets no gradient).
        student_temp: τ_s, finite, > 0.
        teacher_temp: τ_t, finite, > 0.
        num_global_crops: G, an int >= 1.
        center_momentum: None, or m in [0, 1]: then `center` is updated in place after the loss
            (`update_center_`), the loss using the center from before the update.

    Returns:
        The loss, a 0-d fp32 tensor (fp64 for fp64 inputs), differentiable in `student_output`.

    Raises:
        TypeError: an input is not a tensor or has a dtype other than fp32 / bf16 / fp16 / fp64; a temperature
            or `center_momentum` is not a real number.
        ValueError: shapes that do not fit [V·B, K] / [G·B, K] / [K] (fewer than 2 crops, an empty teacher, B or
            K differing), inputs on different devices, a temperature <= 0 or not finite, `num_global_crops`
            not an int >= 1, `center_momentum` outside [0, 1], NaN or infinite.
    """
    s = V.tensor("student_output", student_output, ndim=2, shape_hint="[V·B, K]", dtypes=_DTYPES)
    t = V.tensor("teacher_output", teacher_output, ndim=2, shape_hint="[G·B, K]", dtypes=_DTYPES)
    c = V.tensor("center", center, dtypes=_DTYPES)
    if isinstance(num_global_crops, bool) or not isinstance(num_global_crops, int) or num_global_crops < 1:
        raise ValueError(f"num_global_crops must be an int >= 1, got {num_global_crops!r}")
    G = num_global_crops
    if t.shape[0] == 0 or t.shape[1] == 0 or t.shape[0] % G:
        raise ValueError(
            f"teacher_output must be a non-empty [G·B, K] tensor with G = num_global_crops = {G}, "
            f"got shape {tuple(t.shape)}"
        )
    B, K = t.shape[0] // G, t.shape[1]
    if s.shape[1] != K or s.shape[0] % B or s.shape[0] // B < G:
        raise ValueError(
            f"student_output must be [V·B, K] with B = {B}, K = {K} (from teacher_output) and "
            f"V >= {G} crops, got shape {tuple(s.shape)}"
        )
    if s.shape[0] // B == 1:
        raise ValueError("student_output needs at least 2 crops (a pair of different views)")
    if c.numel() != K or c.dim() > 2 or (c.dim() == 2 and c.shape[0] != 1):
        raise ValueError(f"center must be [1, K] or [K] with K = {K}, got shape {tuple(c.shape)}")
    V.same_device(student_output=s, teacher_output=t, center=c)
    st = V.positive("student_temp", student_temp)
    tt = V.positive("teacher_temp", teacher_temp)
    if center_momentum is not None:  # checked before any launch, not after the loss has run
        center_momentum = _real("center_momentum", center_momentum, 0.0, 1.0)
    if grads_in_forward(s):
        # a create_graph backward recomputes the loss in plain autograd (reference path only)
        differentiable = (
            functools.partial(_differentiable_loss, (st, tt, G)) if _impl(s, t, c) is FAMILY.torch else None
        )
        loss = loss_with_grads(
            functools.partial(_loss_and_grad, (st, tt, G)),
            s,
            t.detach(),
            c.detach(),
            op="dino_loss",
            differentiable=differentiable,
            hint=TRITON_DOUBLE_BACKWARD,
        )
    else:
        if center_momentum is not None:
            c = c.detach().clone()  # the loss and its backward use the center from before the update
        loss, _ = _dino_loss(s, t.detach(), c.detach(), st, tt, G)
    if center_momentum is not None:
        update_center_(center, t.detach(), center_momentum)
    return loss


_CENTER_DTYPES = V.FLOAT_DTYPES + (torch.float64,)


def update_center_(center: torch.Tensor, teacher_output: torch.Tensor, momentum: float = 0.9) -> None:
    """DINO's center EMA, in place: center ← m·center + (1 − m)·mean of `teacher_output` over the batch,
    the mean taken over all ranks when torch.distributed is initialized (as DINOLoss.update_center). Plain
    PyTorch on every device (`sslfast.ops._torch.dino.update_center_`); the batch mean is taken in fp32, fp64
    for fp64 outputs.

    Args:
        center: [1, K] or [K], fp32 / bf16 / fp16 / fp64, updated in place.
        teacher_output: [N, K], N >= 1 (e.g. the teacher's outputs of all global crops), any of the same dtypes
            (independently of the center's), on the center's device.
        momentum: m, a finite number in [0, 1].

    Returns:
        None (`center` is updated in place).

    Raises:
        TypeError: `center` or `teacher_output` is not a floating tensor of those dtypes; `momentum` is not a
            real number.
        ValueError: `teacher_output` is not 2-D or has no row; `center` is not [1, K] or [K] with
            teacher_output's K; the two are on different devices; `momentum` outside [0, 1], NaN or infinite.
    """
    if not isinstance(center, torch.Tensor):
        raise TypeError(f"center must be a torch.Tensor [1, K] or [K], got {type(center).__name__}")
    V.tensor("center", center, dtypes=_CENTER_DTYPES)
    out = V.tensor("teacher_output", teacher_output, ndim=2, shape_hint="[N, K]", dtypes=_CENTER_DTYPES)
    if out.shape[0] == 0:
        raise ValueError("teacher_output must have at least one row, got shape (0, K)")
    if center.numel() != out.shape[1] or center.dim() > 2 or (center.dim() == 2 and center.shape[0] != 1):
        raise ValueError(
            f"center must be [1, K] or [K] with K = {out.shape[1]} (teacher_output's), got {tuple(center.shape)}"
        )
    V.same_device(center=center, teacher_output=out)
    FAMILY.torch.update_center_(center, out, _real("momentum", momentum, 0.0, 1.0))
