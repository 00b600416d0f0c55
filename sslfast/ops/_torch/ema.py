"""The EMA family's PyTorch implementation (the contract `sslfast.ops.ema.EMAImpl`; math in
`sslfast.reference.ema`): multi-tensor (`torch._foreach_*`) ops for CPU tensors and SSLFAST_BACKEND=reference,
torch's fused AdamW kernel on CUDA without `sslfast._C`, and the rows the csrc kernels leave over.

* EMA: teacher ← m·teacher + (1 − m)·student as torch.lerp(teacher, student, 1 − m) in fp32, rounded once to
  the teacher's dtype (`lerp_`).
* AdamW + EMA (`adamw_foreach_step_`): torch.optim.AdamW's foreach ops in its order, then the EMA of the
  teachers towards the new parameters; `adamw_fused_step_` the same with `torch._fused_adamw_`.
* LARS + EMA (`lars_foreach_step_`): `sslfast.reference.ema.lars_step_literal_` over the whole list, the
  trust ratios q = η‖p‖/‖g + wd·p‖ kept on the device (no host sync), then the EMA.

The contract functions take the call's cached plan (`sslfast.ops._ema_plan`) and the momentum as the ops
layer parsed it: the EMA weight 1 − m as a float (`weight`), or the momentum as a 0-dim fp32 device tensor
(`m_tensor`). `lr` is a float or a 0-dim fp32 tensor on the params' device; a tensor is never read on the host:
the steps use the multi-tensor ops that take a tensor operand (`_foreach_mul_` by a 0-dim tensor,
`_foreach_addcmul_` by it, `_fused_adamw_`'s tensor lr), with the same results as the float lr holding the same
fp32 value (bit for bit on the CPU, every dtype: a float lr takes the tensor path, see `lars_foreach_step_`).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ... import _validate as V
from ..._backend import backend

Tensor = torch.Tensor


def momentum_of(weight: float | None, m_tensor: Tensor | None):
    """The momentum back from the ops layer's (weight, m_tensor): the device tensor, or 1 − weight."""
    return m_tensor if m_tensor is not None else 1.0 - weight


# ------------------------------------------------------------------------------------------------ EMA
def _weight(momentum):
    """1 − momentum: a Python float (computed in double, as torch turns 1 − m into lerp's weight), or a
    0-dim fp32 tensor when momentum is a device scalar (no host sync)."""
    if isinstance(momentum, Tensor):
        return 1.0 - momentum.reshape(()).float()
    return 1.0 - float(momentum)


def _foreach_lerp_(teacher: list[Tensor], end: list[Tensor], weight) -> None:
    if isinstance(weight, Tensor):
        torch._foreach_lerp_(teacher, end, [weight.to(teacher[0].device)] * len(teacher))
    else:
        torch._foreach_lerp_(teacher, end, weight)


def lerp_(teacher: Sequence[Tensor], student: Sequence[Tensor], momentum) -> None:
    """teacher[i] ← lerp(teacher[i], student[i], 1 − momentum) in place, for every i.

    Grouped by (teacher dtype, student dtype) so each group is one foreach call. With equal dtypes torch's
    lerp already computes in fp32; a student of another dtype is upcast first, and a low-precision teacher
    with a student of another dtype is updated in fp32 and rounded once, as the csrc kernel does.
    """
    weight = _weight(momentum)
    groups: dict[tuple, tuple[list, list]] = {}
    for t, s in zip(teacher, student):
        if t.numel():
            ts, ss = groups.setdefault((t.dtype, s.dtype), ([], []))
            ts.append(t)
            ss.append(s)
    with torch.no_grad():
        for (t_dtype, s_dtype), (ts, ss) in groups.items():
            if t_dtype == s_dtype:
                _foreach_lerp_(ts, ss, weight)
            elif t_dtype == torch.float32:
                _foreach_lerp_(ts, [s.float() for s in ss], weight)
            else:
                wide = [t.float() for t in ts]
                _foreach_lerp_(wide, [s.float() for s in ss], weight)
                torch._foreach_copy_(ts, wide)


def teacher_lerp_(params: list[Tensor], teachers, momentum) -> None:
    """`lerp_` of the given teachers (None: no teacher) towards their params."""
    if teachers is None:
        return
    pairs = [(t, p) for t, p in zip(teachers, params) if t is not None]
    if pairs:
        lerp_([t for t, _ in pairs], [p for _, p in pairs], momentum)


def ema_update_(plan, teacher, student, *, weight, m_tensor) -> None:
    """`lerp_` of every pair (the plan is not needed here)."""
    lerp_(teacher, student, momentum_of(weight, m_tensor))


# ------------------------------------------------------------------------------------------------ AdamW
def _step_counts(steps: list[Tensor]) -> list[float]:
    """The step counters' values on the host: CPU tensors read directly (`host_scalar`), device ones in one
    transfer (a sync: on CUDA this path runs only as `SSLFAST_BACKEND=reference`, the benchmarks' baseline)."""
    if steps[0].device.type == "cpu":
        return [float(V.host_scalar(s)) for s in steps]
    return torch.stack(steps).tolist()


def adamw_foreach_step_(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    teachers: Sequence[Tensor | None] | None,
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    momentum,
) -> None:
    """One torch.optim.AdamW step (the ops of its foreach implementation, in the same order), then
    teachers[i] ← lerp(teachers[i], params[i], 1 − momentum) where teachers[i] is not None. `steps` are the
    per-parameter step counters (0-dim tensors), incremented here; their values are read on the host (a sync
    on CUDA, with a float or a tensor lr: the capturable CUDA paths are the csrc kernels and
    `adamw_fused_step_`). A tensor lr enters as float64 tensor arithmetic that repeats the float path's double
    arithmetic on the same value: 1 − lr·wd, and −lr / (1 − β1^t) per param (`_foreach_addcdiv_` takes that
    list as a CPU tensor and reads it as the float path's list of scalars)."""
    if not params:
        return
    with torch.no_grad():
        torch._foreach_add_(steps, 1)
        lr64 = lr.double() if isinstance(lr, Tensor) else lr
        if weight_decay != 0:
            torch._foreach_mul_(params, 1 - lr64 * weight_decay)
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
        counts = _step_counts(steps)
        if isinstance(lr, Tensor):
            bc1 = torch.tensor([1 - beta1**c for c in counts], dtype=torch.float64, device=lr.device)
            step_size = (-(lr64 / bc1)).cpu()
        else:
            step_size = [-(lr / (1 - beta1**c)) for c in counts]
        bias_correction2_sqrt = [(1 - beta2**c) ** 0.5 for c in counts]
        denom = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denom, bias_correction2_sqrt)
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(params, exp_avgs, denom, step_size)
    teacher_lerp_(params, teachers, momentum)


def adamw_fused_step_(
    params, grads, exp_avgs, exp_avg_sqs, steps, teachers, *, lr, beta1, beta2, eps, weight_decay, momentum
) -> None:
    """`adamw_foreach_step_` with torch's fused AdamW kernel per param dtype (CUDA without sslfast._C: what
    users run without this library), then the foreach lerp of the teachers. A tensor lr goes to the kernel as
    is (its `tensor_lr` overload reads it on the device: no host sync)."""
    with torch.no_grad():
        groups: dict[torch.dtype, list[int]] = {}
        for i, p in enumerate(params):
            groups.setdefault(p.dtype, []).append(i)
        for idx in groups.values():
            sel = lambda lst: [lst[i] for i in idx]  # noqa: E731
            torch._foreach_add_(sel(steps), 1)
            torch._fused_adamw_(
                sel(params),
                sel(grads),
                sel(exp_avgs),
                sel(exp_avg_sqs),
                [],
                sel(steps),
                lr=lr,
                beta1=beta1,
                beta2=beta2,
                weight_decay=weight_decay,
                eps=eps,
                amsgrad=False,
                maximize=False,
            )
    teacher_lerp_(params, teachers, momentum)


def adamw_ema_step_(
    plan,
    params,
    grads,
    exp_avgs,
    exp_avg_sqs,
    steps,
    teachers,
    *,
    lr,
    beta1,
    beta2,
    eps,
    weight_decay,
    weight,
    m_tensor,
) -> None:
    """`adamw_fused_step_` on CUDA (unless SSLFAST_BACKEND=reference), else `adamw_foreach_step_`."""
    step = adamw_fused_step_ if params[0].is_cuda and backend() != "reference" else adamw_foreach_step_
    step(
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
        momentum=momentum_of(weight, m_tensor),
    )


# ------------------------------------------------------------------------------------------------ LARS
def lars_foreach_step_(
    params: list[Tensor],
    grads: list[Tensor],
    mus: list[Tensor],
    teachers: Sequence[Tensor | None] | None,
    *,
    lr: float | Tensor,
    momentum: float,
    weight_decay: float,
    eta: float,
    decay: Sequence[bool],
    adapt: Sequence[bool],
    ema_momentum,
) -> None:
    """The LARS step of `sslfast.reference.ema.lars_step_literal_` over the whole list (norms in fp32, trust
    ratios as device tensors: no host sync), then teachers[i] ← lerp(teachers[i], params[i], 1 − ema_momentum).

    p ← p − lr·μ by `_foreach_addcmul_(params, mus, −lr)` with lr as a 0-dim fp32 tensor (a float lr is made
    one, on the params' device), so that a float lr and a tensor lr holding the same fp32 value step bit for
    bit alike in every dtype. (`_foreach_add_(params, mus, alpha=-lr)` equals it on fp32 params, but on bf16 /
    fp16 ATen's CPU add-with-alpha computes the elements past its last full vector in the param dtype, two
    roundings, where addcmul computes in fp32, one: a float-lr run and a tensor-lr run drifted apart by a few
    ulps.)"""
    if not params:
        return
    with torch.no_grad():
        d = [g.add(p, alpha=weight_decay) if dec else g for p, g, dec in zip(params, grads, decay)]
        idx = [i for i, a in enumerate(adapt) if a and params[i].numel()]
        if idx:
            p_norm = torch.stack(torch._foreach_norm([params[i] for i in idx], 2, dtype=torch.float32))
            d_norm = torch.stack(torch._foreach_norm([d[i] for i in idx], 2, dtype=torch.float32))
            one = torch.ones_like(p_norm)
            q = torch.where(p_norm > 0, torch.where(d_norm > 0, eta * p_norm / d_norm, one), one)
            for j, i in enumerate(idx):
                d[i] = (d[i].float() * q[j]).to(d[i].dtype)
        torch._foreach_mul_(mus, momentum)
        torch._foreach_add_(mus, d)
        # a float lr becomes a 0-dim fp32 tensor on the params' device: `full` writes it with a fill kernel (no
        # host-to-device copy, no sync), and the foreach op sees one device
        neg_lr = -lr if isinstance(lr, Tensor) else torch.full((), -lr, dtype=torch.float32, device=params[0].device)
        torch._foreach_addcmul_(params, mus, [neg_lr] * len(params))
    teacher_lerp_(params, teachers, ema_momentum)


def lars_ema_step_(
    plan, params, grads, momentum_buffers, teachers, *, lr, momentum, weight_decay, eta, weight, m_tensor
) -> None:
    """`lars_foreach_step_` with the plan's per-param decay / adaptation flags."""
    lars_foreach_step_(
        params,
        grads,
        momentum_buffers,
        teachers,
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        eta=eta,
        decay=plan.decay,
        adapt=plan.adapt,
        ema_momentum=momentum_of(weight, m_tensor),
    )
