"""Optimizer steps fused with the teacher EMA, the EMA family's other two ops (`sslfast.optim.AdamWEMA` and
`LARSEMA` wrap them as optimizers):

    sf.ops.adamw_ema_step_(params, grads, exp_avgs, exp_avg_sqs, steps, teachers, lr=1e-3, momentum=0.996)
    sf.ops.lars_ema_step_(params, grads, momentum_buffers, teachers, lr=0.2, ema_momentum=0.996)

Each is one optimizer step of every param, then teachers[i] ← lerp(teachers[i], new params[i], 1 − m) where
teachers[i] is given. Dispatch as `sslfast.ops.ema` (`FAMILY.impl`): the csrc kernels on CUDA with
`sslfast._C` (one pass over every tensor, no host sync), else the PyTorch path. The plans (`AdamWEMAPlan`,
`LARSEMAPlan`) hold the launch tables of fixed lists of params / states / teachers and are cached per lists.

CUDA graphs: `lr` and the EMA momentum may each be a 0-dim float32 tensor on the params' device instead of a
float. It is never read on the host: the kernels read it when they run, so a step captured once in a
`torch.cuda.CUDAGraph` and replayed after ``lr.fill_(new_lr)`` / ``m.fill_(new_m)`` uses the new values (a
learning-rate and momentum schedule under graph replay). Warm the step up (at least once, outside the capture)
before capturing it: the first call builds and caches the launch tables.
"""

from __future__ import annotations

from typing import Sequence

import torch

from . import _ema_args as A
from ._ema_plan import ADAMW_DEPTH, FLAG_ADAPT, FLAG_DECAY, LARS_DEPTH, FusedPlan, PlanCache
from .ema import FAMILY

Tensor = torch.Tensor
_impl = FAMILY.impl


def _teacher_list(teachers, n: int) -> list:
    return list(teachers) if teachers is not None else [None] * n


class AdamWEMAPlan(FusedPlan):
    """Launch tables of `adamw_ema_step_` for fixed params / moments / steps / teachers."""

    def __init__(self, params, exp_avgs, exp_avg_sqs, steps, teachers):
        super().__init__(
            ADAMW_DEPTH,
            params,
            [exp_avgs, exp_avg_sqs],
            _teacher_list(teachers, len(params)),
            [steps],
            [0] * len(params),
        )

    def step_(
        self,
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        steps,
        teachers,
        *,
        lr,
        beta1: float,
        beta2: float,
        eps: float,
        weight_decay: float,
        momentum,
    ) -> None:
        """The tensors must be those the plan was built for (`matches`); grads have the params' shapes and
        dtypes (as `p.grad` always has). `lr`: a Python float (not checked here: the caller did), or anything
        else `sslfast.ops._ema_args.lr_arg` accepts (a 0-dim float32 tensor on the params' device, read on the
        device), checked here before any launch."""
        if type(lr) is not float:  # a float: checked by the caller (no host work added on that path)
            lr = A.lr_arg("lr", lr, self.device)
        if not params:
            return
        teachers = _teacher_list(teachers, len(params))
        weight, m_tensor = A.momentum("momentum", momentum, self.device)
        grads = self.param_layout_grads(params, grads)
        _impl(params[0]).adamw_ema_step_(
            self,
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            steps,
            teachers,
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            eps=eps,
            weight_decay=weight_decay,
            weight=weight,
            m_tensor=m_tensor,
        )


class LARSEMAPlan(FusedPlan):
    """Launch tables of `lars_ema_step_` for fixed params / momentum buffers / teachers and per-param flags."""

    def __init__(self, params, momentum_buffers, teachers, decay, adapt):
        self.decay, self.adapt = list(decay), list(adapt)
        flags = [(FLAG_DECAY if d else 0) | (FLAG_ADAPT if a else 0) for d, a in zip(self.decay, self.adapt)]
        super().__init__(LARS_DEPTH, params, [momentum_buffers], _teacher_list(teachers, len(params)), [], flags)

    def step_(
        self,
        params,
        grads,
        momentum_buffers,
        teachers,
        *,
        lr,
        momentum: float,
        weight_decay: float,
        eta: float,
        ema_momentum,
    ) -> None:
        """As `AdamWEMAPlan.step_` (`lr` a float or a 0-dim float32 device tensor), for one LARS step."""
        if type(lr) is not float:  # a float: checked by the caller (no host work added on that path)
            lr = A.lr_arg("lr", lr, self.device)
        if not params:
            return
        teachers = _teacher_list(teachers, len(params))
        weight, m_tensor = A.momentum("momentum", ema_momentum, self.device)
        grads = self.param_layout_grads(params, grads)
        _impl(params[0]).lars_ema_step_(
            self,
            params,
            grads,
            momentum_buffers,
            teachers,
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            eta=eta,
            weight=weight,
            m_tensor=m_tensor,
        )


_FUSED_PLANS = PlanCache()


def exclude_bias_and_norm(p: Tensor) -> bool:
    """BYOL / Barlow Twins: biases and normalization parameters (the 1-D ones) skip LARS adaptation and
    weight decay.

    Args:
        p: a parameter.

    Returns:
        Whether `p` is excluded (p.ndim <= 1).
    """
    return p.ndim <= 1


def adamw_ema_step_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    steps: Sequence[Tensor],
    teachers: Sequence[Tensor | None] | None = None,
    *,
    lr: float | Tensor = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    momentum=0.996,
) -> None:
    """One AdamW step (torch.optim.AdamW math: decoupled weight decay, bias-corrected moments) on every
    params[i], and teachers[i] ← lerp(teachers[i], new params[i], 1 − momentum) where teachers[i] is given.

    On CUDA with `sslfast._C` this is one kernel (after a one-block launch that increments the `steps`): it
    reads param, grad, exp_avg, exp_avg_sq and teacher once and writes param, moments and teacher once
    (36 bytes per fp32 parameter instead of 40 for AdamW(fused=True) + _foreach_lerp_, and one pass instead
    of two); the bias corrections are computed on the device: no host sync.

    Args:
        params: the parameters, updated in place (fp32 / bf16 / fp16, one device).
        grads: their gradients, of the params' shapes and dtypes.
        exp_avgs: first moments, of the params' shapes and dtypes, updated in place.
        exp_avg_sqs: second moments, likewise.
        steps: per-param step counts, one-element fp32 tensors on the params' device (torch's fused-AdamW
            state), incremented in place.
        teachers: None, or per param a teacher tensor of its shape (fp32 / bf16 / fp16) or None (no EMA).
        lr: learning rate, finite, >= 0: a float, or a 0-dim float32 tensor on the params' device read by the
            kernels on the device (no host sync; a captured CUDA graph uses the value it holds at replay). Its
            range is then checked by a device-side assertion (`sslfast.ops._ema_args.lr_tensor`).
        betas: (β1, β2), each finite in [0, 1].
        eps: the denominator's ε, finite, >= 0.
        weight_decay: decoupled weight decay, finite, >= 0.
        momentum: the EMA momentum, as `sslfast.ops.ema.ema_update_`'s.

    Returns:
        None (everything is updated in place).

    Raises:
        TypeError: a list is one tensor or not iterable; a dtype differs from its param's; a step count is not
            a one-element fp32 tensor on its param's device; a hyper-parameter is not a real number; a tensor
            `lr` is not 0-dim float32.
        ValueError: lists of different lengths, shapes or devices; a hyper-parameter outside its range, NaN or
            infinite; a tensor `lr` on another device than the params.
    """
    params, grads = A.tensor_list("params", params), A.tensor_list("grads", grads)
    exp_avgs, exp_avg_sqs = A.tensor_list("exp_avgs", exp_avgs), A.tensor_list("exp_avg_sqs", exp_avg_sqs)
    steps = A.tensor_list("steps", steps)
    teachers = None if teachers is None else A.tensor_list("teachers", teachers)
    beta1, beta2 = (A.real(f"betas[{i}]", b, 0.0, 1.0) for i, b in enumerate(betas))
    lr = lr if isinstance(lr, Tensor) else A.real("lr", lr, 0.0)  # a tensor: checked by the plan, on its device
    eps, weight_decay = A.real("eps", eps, 0.0), A.real("weight_decay", weight_decay, 0.0)
    lists = (params, exp_avgs, exp_avg_sqs, steps, [t for t in teachers if t is not None] if teachers else [])
    key = (
        "adamw",
        *(tuple(map(id, lst)) for lst in lists),
        None if teachers is None else tuple(t is None for t in teachers),
    )
    plan = _FUSED_PLANS.get(key, lists)
    if plan is None:
        A.check_fused(params, {"exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs}, teachers)
        A.check_steps(params, steps)
        plan = _FUSED_PLANS.put(key, AdamWEMAPlan(params, exp_avgs, exp_avg_sqs, steps, teachers), lists)
    A.check_pairs("params", params, "grads", grads, same_dtype=True)
    plan.step_(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        steps,
        teachers,
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        weight_decay=weight_decay,
        momentum=momentum,
    )


def lars_ema_step_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor],
    teachers: Sequence[Tensor | None] | None = None,
    *,
    lr: float | Tensor,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    eta: float = 1e-3,
    exclude=exclude_bias_and_norm,
    ema_momentum=0.996,
) -> None:
    """One LARS step with BYOL / Barlow Twins semantics (math in `sslfast.reference.ema`), then
    teachers[i] ← lerp(teachers[i], new params[i], 1 − ema_momentum) where teachers[i] is given:

        d = g + wd·p,  q = η‖p‖/‖d‖ (1 if either norm is 0),  μ ← momentum·μ + q·d,  p ← p − lr·μ

    On CUDA with `sslfast._C`: two launches and no host sync (a pass that writes per-chunk squared norms of p
    and of g + wd·p to a device buffer, then the update pass, where each block sums its tensor's partials and
    applies q).

    Args:
        params: the parameters, updated in place (fp32 / bf16 / fp16, one device).
        grads: their gradients, of the params' shapes and dtypes.
        momentum_buffers: μ per param, of its shape and dtype, updated in place.
        teachers: None, or per param a teacher tensor of its shape or None (no EMA).
        lr: learning rate, finite, >= 0: a float or a 0-dim float32 tensor on the params' device, as
            `adamw_ema_step_`'s.
        momentum: LARS momentum, finite in [0, 1].
        weight_decay: finite, >= 0.
        eta: the trust coefficient η, finite, >= 0.
        exclude: params for which `exclude(p)` is true get neither weight decay nor the trust ratio (default
            `exclude_bias_and_norm`: p.ndim <= 1); None excludes none.
        ema_momentum: the EMA momentum, as `sslfast.ops.ema.ema_update_`'s.

    Returns:
        None (everything is updated in place).

    Raises:
        TypeError: a list is one tensor or not iterable; a dtype differs from its param's; a hyper-parameter
            is not a real number; a tensor `lr` is not 0-dim float32.
        ValueError: lists of different lengths, shapes or devices; a hyper-parameter outside its range, NaN or
            infinite; a tensor `lr` on another device than the params.
    """
    params, grads = A.tensor_list("params", params), A.tensor_list("grads", grads)
    bufs = A.tensor_list("momentum_buffers", momentum_buffers)
    teachers = None if teachers is None else A.tensor_list("teachers", teachers)
    lr = lr if isinstance(lr, Tensor) else A.real("lr", lr, 0.0)  # a tensor: checked by the plan, on its device
    momentum = A.real("momentum", momentum, 0.0, 1.0)
    weight_decay, eta = A.real("weight_decay", weight_decay, 0.0), A.real("eta", eta, 0.0)
    keep = [not (exclude is not None and bool(exclude(p))) for p in params]
    lists = (params, bufs, [t for t in teachers if t is not None] if teachers else [])
    key = (
        "lars",
        *(tuple(map(id, lst)) for lst in lists),
        None if teachers is None else tuple(t is None for t in teachers),
        tuple(keep),
    )
    plan = _FUSED_PLANS.get(key, lists)
    if plan is None:
        A.check_fused(params, {"momentum_buffers": bufs}, teachers)
        plan = _FUSED_PLANS.put(key, LARSEMAPlan(params, bufs, teachers, keep, keep), lists)
    A.check_pairs("params", params, "grads", grads, same_dtype=True)
    plan.step_(
        params,
        grads,
        bufs,
        teachers,
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        eta=eta,
        ema_momentum=ema_momentum,
    )
