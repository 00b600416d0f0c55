"""Teacher EMA, one op, and the EMA family's contract (the optimizer steps fused with it: `fused_optim`).

    sf.ema_update_(teacher.parameters(), student.parameters(), momentum=0.996)

    teacher ← momentum·teacher + (1 − momentum)·student     (= torch.lerp(teacher, student, 1 − momentum))

Dispatch (`FAMILY.impl`, fast when `sslfast._backend.use_csrc`): CUDA tensors with `sslfast._C` built → the
csrc kernels (csrc/ema.cu, csrc/optim.cu) through `sslfast.ops._csrc.ema`; otherwise `sslfast.ops._torch.ema`
(torch's own multi-tensor ops: `_foreach_lerp_`, and `_fused_adamw_` on CUDA without `_C`). Both take the
call's cached launch plan (`sslfast.ops._ema_plan`): the tables are built once per list of tensors, so a
repeated call only checks that the tensors did not move and launches.
"""

from __future__ import annotations

from typing import Iterable, Protocol

import torch

from .._backend import use_csrc
from . import _ema_args as A
from ._ema_plan import EMAPlan, PlanCache
from ._family import Family

Tensor = torch.Tensor


class EMAImpl(Protocol):
    """What `ops._csrc.ema` and `ops._torch.ema` both define. `plan` is the call's cached plan
    (`sslfast.ops._ema_plan`); the momentum m arrives as `weight` = 1 − m (a float) or, with weight None, as
    `m_tensor` (a 0-dim fp32 device tensor the kernels read on the device)."""

    def ema_update_(self, plan, teacher, student, *, weight, m_tensor):
        """teacher[i] ← lerp(teacher[i], student[i], 1 − m) in place, for every pair."""

    def adamw_ema_step_(
        self,
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
    ):
        """One AdamW step of every param (moments, step counts in place), then the EMA of the teachers given."""

    def lars_ema_step_(
        self, plan, params, grads, momentum_buffers, teachers, *, lr, momentum, weight_decay, eta, weight, m_tensor
    ):
        """One LARS step of every param (`plan.decay` / `plan.adapt` per param), then the EMA of the teachers."""


FAMILY = Family("ema", EMAImpl, kernels="sslfast.ops._csrc.ema", fast=use_csrc)
_impl = FAMILY.impl

_EMA_PLANS = PlanCache()


def _ema_plan(teacher: list[Tensor], student: list[Tensor]) -> EMAPlan:
    """The cached plan of these two lists (validated and built on a miss)."""
    key = (tuple(map(id, teacher)), tuple(map(id, student)))
    lists = (teacher, student)
    plan = _EMA_PLANS.get(key, lists)
    if plan is None:
        device = A.check_pairs("teacher_tensors", teacher, "student_tensors", student)
        plan = _EMA_PLANS.put(key, EMAPlan(teacher, student, device), lists)
    return plan


def ema_update_(teacher_tensors: Iterable[Tensor], student_tensors: Iterable[Tensor], momentum) -> None:
    """teacher ← momentum·teacher + (1 − momentum)·student, in place, for every pair of the two lists.

    Computed as torch.lerp(teacher, student, 1 − momentum) in fp32 and rounded once to the teacher's dtype
    (fp32 results equal torch's lerp exactly). On CUDA with `sslfast._C`: one launch per (teacher dtype,
    student dtype) group of up to 448 tensors (a ViT-B's 150 parameters: one launch); without `_C`:
    torch._foreach_lerp_; on the CPU: foreach lerp. Warm the update up once before capturing it in a CUDA
    graph (the first call builds and caches the launch tables).

    Args:
        teacher_tensors: the tensors updated in place (e.g. ``teacher.parameters()``), fp32 / bf16 / fp16.
        student_tensors: as many tensors, pairwise of the teachers' shapes, any of the same dtypes
            (independently of the teachers'), all on the teachers' device.
        momentum: m, a float in [0, 1] or a one-element floating tensor. A CUDA tensor is read by the kernel
            itself: no host sync, and a captured CUDA graph uses the value it holds at replay (change it with
            ``momentum.fill_(m)`` or compute it on the device).

    Returns:
        None (the teachers are updated in place).

    Raises:
        TypeError: a list is one tensor or not iterable; a non-floating tensor; `momentum` is neither a real
            number nor a one-element floating tensor.
        ValueError: the lists differ in length, a pair in shape, or the tensors in device; `momentum` (a float
            or a CPU tensor) lies outside [0, 1] or is NaN. A CUDA `momentum` outside [0, 1] fails a device-side
            assertion queued before the update instead (`sslfast.ops._ema_args.momentum`).
    """
    teacher = A.tensor_list("teacher_tensors", teacher_tensors)
    student = A.tensor_list("student_tensors", student_tensors)
    plan = _ema_plan(teacher, student)
    if not teacher:
        A.momentum("momentum", momentum, None)
        return
    weight, m_tensor = A.momentum("momentum", momentum, plan.device)
    _impl(teacher[0]).ema_update_(plan, teacher, student, weight=weight, m_tensor=m_tensor)
