"""iBOT's masked-patch loss as DINOv2 computes it (`dinov2/loss/ibot_patch_loss.py`), two entry points, one op.

    loss = sf.ibot_patch_loss(student_patch_logits, teacher_patch_probs, mask, student_temp=0.1)
    loss = sf.ibot_patch_loss_masked(student_logits_masked, teacher_probs_masked, masks_weight=w, n_images=B,
                                     n_masked_patches=None, student_temp=0.1)

`ibot_patch_loss` is `iBOTPatchLoss.forward`: student logits and teacher probabilities [B, L, K] of every patch
token, mask [B, L] bool; the soft cross-entropy ℓ = −Σ_k t_k log softmax(s/τ)_k of each masked token, averaged
over the masked tokens of its image (an image with none contributes 0) and then over the B images.

`ibot_patch_loss_masked` is `iBOTPatchLoss.forward_masked` with its weights made explicit: the masked tokens
only, [M, K] each, and one weight per counted token,

    loss = Σ_{m < n} masks_weight[m]·ℓ(t_m, s_m) / n_images,   n = n_masked_patches (default M)

Rows m >= n (DINOv2 pads its masked-token buffers to a fixed upper bound) are ignored and get a zero gradient;
masks_weight has exactly n entries. DINOv2's default weights are 1/(masked tokens of the token's image) and
n_images the batch size B (`masks.shape[0]`), which makes it equal to `ibot_patch_loss` on the same tokens.

Both are loss = Σ_r w_r ℓ(t_r, s_r) over token rows with per-row weights (math in `sslfast.reference.ibot`);
the teacher's rows need not sum to 1. Rows of weight 0 are not read (so a non-finite unmasked token does not
reach the loss, as in `forward_masked`). Gradients go to the student logits only. CUDA tensors run one
streaming Triton pass per weighted row and a backward over K chunks (`sslfast.kernels.ibot`), no [tokens, K]
temporary besides the gradient; CPU and fp64 tensors the chunked PyTorch path. An eager call that will be
differentiated computes the gradient in its forward (`sslfast._custom_op.loss_with_grads`). Returns an fp32
scalar (fp64 for fp64 student logits). Like DINOv2, the loss is a mean over this rank's images: no collective.
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


class IbotImpl(Protocol):
    """What `kernels.ibot` and `ops._torch.ibot` both define: student logits and teacher probabilities [R, K],
    weights [R] in the work dtype (rows of weight 0 are neither read nor differentiated)."""

    def ibot_forward(self, student, teacher, weights, student_temp):
        """(loss [], row statistics [2, R]: natural lse(s/τ) (0 where w = 0), then Σ_k t)."""

    def ibot_backward(self, grad, student, teacher, weights, stats, student_temp):
        """∂loss/∂student [R, K] in the student's dtype for the 0-d upstream gradient `grad`; `stats` from the
        forward."""


def _accepts(student, teacher, weights) -> bool:
    return student.dtype != torch.float64 and teacher.dtype != torch.float64 and weights.dtype != torch.float64


FAMILY = Family("ibot", IbotImpl, accepts=_accepts)
_impl = FAMILY.impl


def _work_dtype(student: torch.Tensor) -> torch.dtype:
    return torch.float64 if student.dtype == torch.float64 else torch.float32


def _fake_forward(student, teacher, weights, student_temp):
    dtype = _work_dtype(student)
    return student.new_empty((), dtype=dtype), student.new_empty((2, student.shape[0]), dtype=dtype)


def _fake_backward(grad, student, teacher, weights, stats, student_temp):
    return torch.empty_like(student)


@without_autocast
def _run_forward(student, teacher, weights, student_temp):
    with torch.no_grad():
        return _impl(student, teacher, weights).ibot_forward(student, teacher, weights, student_temp)


@without_autocast
def _run_backward(grad, student, teacher, weights, stats, student_temp):
    return _impl(student, teacher, weights).ibot_backward(grad, student, teacher, weights, stats, student_temp)


@custom_op("ibot_patch_loss_backward", fake=_fake_backward)
def _ibot_backward(
    grad: torch.Tensor,
    student: torch.Tensor,
    teacher: torch.Tensor,
    weights: torch.Tensor,
    stats: torch.Tensor,
    student_temp: float,
) -> torch.Tensor:
    return _run_backward(grad, student, teacher, weights, stats, student_temp)


def _setup_context(ctx, inputs, output):
    student, teacher, weights, student_temp = inputs
    ctx.save_for_backward(student, teacher, weights, output[1])
    ctx.student_temp = student_temp


def _backward(ctx, g_loss, g_stats):
    student, teacher, weights, stats = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return (None,) * 4
    return _ibot_backward(g_loss, student, teacher, weights, stats, ctx.student_temp), None, None, None


def _differentiable_loss(student_temp, student, teacher, weights) -> torch.Tensor:
    """The loss in plain autograd (the PyTorch path's forward), for a create_graph=True backward."""
    if _impl(student, teacher, weights) is not FAMILY.torch:
        raise double_backward_unsupported("ibot_patch_loss", TRITON_DOUBLE_BACKWARD)
    return FAMILY.torch.ibot_forward(student, teacher, weights, student_temp)[0]


def _double_backward(ctx, g_loss, g_stats):
    student, teacher, weights, _ = ctx.saved_tensors
    grads = differentiable_grads(
        functools.partial(_differentiable_loss, ctx.student_temp),
        (student, teacher, weights),
        (ctx.needs_input_grad[0], False, False),
        (g_loss,),
    )
    return grads + (None,)


@custom_op(
    "ibot_patch_loss",
    fake=_fake_forward,
    backward=_backward,
    setup_context=_setup_context,
    non_differentiable=(1,),
    double_backward=_double_backward,
)
def _ibot(
    student: torch.Tensor, teacher: torch.Tensor, weights: torch.Tensor, student_temp: float
) -> tuple[torch.Tensor, torch.Tensor]:
    loss, stats = _run_forward(student, teacher, weights, student_temp)
    return loss, stats


def _loss_and_grad(student_temp, needs, student, teacher, weights):
    """`loss_with_grads`' function: the forward kernel, then the backward's for an upstream 1."""
    loss, stats = _run_forward(student, teacher, weights, student_temp)
    return loss, (_run_backward(torch.ones_like(loss), student, teacher, weights, stats, student_temp), None, None)


def _weighted_loss(student: torch.Tensor, teacher: torch.Tensor, weights: torch.Tensor, student_temp: float):
    """Σ_r weights_r·ℓ(teacher_r, student_r) over rows of [R, K] tensors (validated); weights [R] in the work
    dtype, no gradient."""
    if grads_in_forward(student):
        # a create_graph backward recomputes the loss in plain autograd (PyTorch path only)
        differentiable = (
            functools.partial(_differentiable_loss, student_temp)
            if _impl(student, teacher, weights) is FAMILY.torch
            else None
        )
        return loss_with_grads(
            functools.partial(_loss_and_grad, student_temp),
            student,
            teacher,
            weights,
            op="ibot_patch_loss",
            differentiable=differentiable,
            hint=TRITON_DOUBLE_BACKWARD,
        )
    return _ibot(student, teacher, weights, student_temp)[0]


def _logits_and_probs(s_name: str, student, t_name: str, teacher, ndim: int, hint: str):
    """(student logits, teacher probabilities detached), both [.., K] of one shape, K >= 1, on one device."""
    s = V.tensor(s_name, student, ndim=ndim, shape_hint=hint, dtypes=V.ALL_FLOAT_DTYPES)
    if s.shape[-1] == 0:
        raise ValueError(f"{s_name} must have K >= 1 prototypes, got shape {tuple(s.shape)}")
    return s, V.soft_targets(t_name, teacher, shape=s.shape, shape_hint=hint, like={s_name: s})


def ibot_patch_loss(
    student_patch_logits: torch.Tensor,
    teacher_patch_probs: torch.Tensor,
    mask: torch.Tensor,
    *,
    student_temp: float = 0.1,
) -> torch.Tensor:
    """DINOv2's `iBOTPatchLoss.forward`: the masked tokens' soft cross-entropy, a mean per image, then over the
    images (an image without masked tokens contributes 0; see the module docstring).

    Args:
        student_patch_logits: [B, L, K], B images of L patch tokens, K >= 1 prototypes; fp32, bf16, fp16 or
            fp64 (fp64 runs the PyTorch path). Gets the gradient (0 on the unmasked tokens).
        teacher_patch_probs: [B, L, K], any floating dtype, on the student's device; no gradient, rows need
            not sum to 1. Unmasked tokens are not read.
        mask: [B, L] bool, True for the masked tokens that count.
        student_temp: τ > 0, the student's softmax temperature.

    Returns:
        The loss, a 0-d fp32 tensor (fp64 for fp64 student logits).

    Raises:
        TypeError: a tensor argument is not a tensor, the logits or probabilities are not floating, mask is
            not bool, or student_temp is not a real number.
        ValueError: a rank or shape differs from the above (no tokens, K = 0, shapes disagreeing), the tensors
            are on different devices, or student_temp is not finite and > 0.
    """
    s, t = _logits_and_probs(
        "student_patch_logits", student_patch_logits, "teacher_patch_probs", teacher_patch_probs, 3, "[B, L, K]"
    )
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor [B, L], got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor [B, L], got dtype {mask.dtype}")
    if mask.shape != s.shape[:2]:
        raise ValueError(
            f"mask must be [B, L] = {tuple(s.shape[:2])} (from student_patch_logits), got shape {tuple(mask.shape)}"
        )
    V.same_device(student_patch_logits=s, mask=mask)
    tau = V.positive("student_temp", student_temp)
    B, L, K = s.shape
    if B * L == 0:
        raise ValueError(f"student_patch_logits must hold at least one token, got shape {tuple(s.shape)}")
    m = mask.to(_work_dtype(s))
    weights = (m / (m.sum(-1, keepdim=True).clamp(min=1.0) * B)).reshape(-1)
    return _weighted_loss(s.view(B * L, K), t.view(B * L, K), weights, tau)


def _count(name: str, value, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value


def ibot_patch_loss_masked(
    student_logits_masked: torch.Tensor,
    teacher_probs_masked: torch.Tensor,
    *,
    masks_weight: torch.Tensor,
    n_images: int,
    n_masked_patches: int | None = None,
    student_temp: float = 0.1,
) -> torch.Tensor:
    """DINOv2's `iBOTPatchLoss.forward_masked` with its weights explicit (see the module docstring):

        loss = Σ_{m < n} masks_weight[m]·ℓ(t_m, s_m) / n_images,   n = n_masked_patches

    Args:
        student_logits_masked: [M, K], the masked tokens' student logits, M >= 1, K >= 1; fp32, bf16, fp16 or
            fp64 (fp64 runs the PyTorch path). Gets the gradient (0 on rows m >= n).
        teacher_probs_masked: [M, K], the same tokens' teacher probabilities, any floating dtype, on the
            student's device; no gradient, rows need not sum to 1.
        masks_weight: [n], one weight per counted token (DINOv2's: 1 / masked tokens of the token's image).
        n_images: >= 1, what the weighted sum is divided by (DINOv2: the batch size).
        n_masked_patches: n in [0, M], the rows that count (DINOv2 pads its buffers beyond them); default M.
        student_temp: τ > 0, the student's softmax temperature.

    Returns:
        The loss, a 0-d fp32 tensor (fp64 for fp64 student logits).

    Raises:
        TypeError: a tensor argument is not a floating tensor, n_images or n_masked_patches is not an int, or
            student_temp is not a real number.
        ValueError: a rank or shape differs from the above, n_images < 1, n_masked_patches outside [0, M], the
            tensors are on different devices, or student_temp is not finite and > 0.
    """
    s, t = _logits_and_probs(
        "student_logits_masked", student_logits_masked, "teacher_probs_masked", teacher_probs_masked, 2, "[M, K]"
    )
    M = s.shape[0]
    if M == 0:
        raise ValueError("student_logits_masked must hold at least one token row [M, K], got M = 0")
    n = M if n_masked_patches is None else _count("n_masked_patches", n_masked_patches, 0, M)
    images = _count("n_images", n_images, 1)
    w = V.tensor(
        "masks_weight", masks_weight, ndim=1, shape_hint=f"[n_masked_patches] = [{n}]", dtypes=V.ALL_FLOAT_DTYPES
    )
    if w.shape[0] != n:
        raise ValueError(
            f"masks_weight must have n_masked_patches = {n} entries (one per counted token), got shape {tuple(w.shape)}"
        )
    V.same_device(student_logits_masked=s, masks_weight=w)
    tau = V.positive("student_temp", student_temp)
    work = _work_dtype(s)
    weights = w.detach().to(work) / images
    if n < M:
        weights = torch.cat([weights, weights.new_zeros(M - n)])
    return _weighted_loss(s, t, weights, tau)
