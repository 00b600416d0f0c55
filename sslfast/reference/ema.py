"""Teacher EMA and the optimizer steps it is fused with, in plain PyTorch.

These are the CPU path, the fallback on CUDA without `sslfast._C`, the test oracle and the benchmark baseline
of `sslfast.ops.ema` (whose kernels live in csrc/ema.cu and csrc/optim.cu).

* EMA (BYOL, MoCo, DINO):  teacher ← m·teacher + (1 − m)·student, computed as torch.lerp(teacher, student,
  1 − m) in fp32 and rounded once to the teacher's dtype (`ema_update_`); the per-parameter loop that DINO /
  MoCo / solo-learn run is `ema_update_loop_`.
* Momentum schedule (`cosine_momentum`): BYOL (Grill et al. 2020, §3.2) τ_k = 1 − (1 − τ_base)(cos(πk/K) + 1)/2,
  generalised as DINO's `cosine_scheduler` (Caron et al. 2021) from a base to a final value:
  m_k = final − (final − base)(1 + cos(π·min(k, K)/K))/2.
* AdamW + EMA (`adamw_ema_step_`): torch.optim.AdamW's math (Loshchilov & Hutter 2019) step by step, then the
  EMA of the teachers towards the new parameters.
* LARS + EMA: LARS (You et al. 2017) with the semantics of BYOL (appendix C: "excluding the biases and batch
  normalization parameters from both LARS adaptation and weight decay") as written in the official Barlow
  Twins code: d = g + wd·p, q = η‖p‖/‖d‖ (1 where either norm is 0), μ ← momentum·μ + q·d, p ← p − lr·μ.
  `lars_step_literal_` is that code line by line (the oracle); `lars_ema_step_` computes the same over the
  whole list with the norms kept on the device (no host sync).
* DINO's center (`update_center_`): c ← m·c + (1 − m)·mean over the (global) batch of the teacher outputs.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.distributed as dist

from ..distributed import is_distributed

Tensor = torch.Tensor


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


def ema_update_(teacher: Sequence[Tensor], student: Sequence[Tensor], momentum) -> None:
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


def ema_update_loop_(teacher: Sequence[Tensor], student: Sequence[Tensor], momentum: float) -> None:
    """The per-parameter loop of DINO / MoCo / solo-learn: t.mul_(m).add_(s, alpha=1 − m)."""
    with torch.no_grad():
        for t, s in zip(teacher, student):
            t.mul_(momentum).add_(s, alpha=1.0 - momentum)


def cosine_momentum(step, total_steps: int | None, base: float = 0.996, final: float = 1.0):
    """BYOL / DINO teacher momentum at `step` (0-based): base at step 0, cosine towards `final`, which it
    reaches at `total_steps` and keeps afterwards. Constant `base` when total_steps is None. `step` may be an
    int (returns a float) or a tensor (returns a tensor, so a schedule can live on the device)."""
    if total_steps is None:
        return base if not isinstance(step, Tensor) else torch.full_like(step, base, dtype=torch.float32)
    if isinstance(step, Tensor):
        frac = step.float().clamp(max=total_steps) / total_steps
        return final - (final - base) * (1.0 + torch.cos(math.pi * frac)) / 2.0
    frac = min(step, total_steps) / total_steps
    return final - (final - base) * (1.0 + math.cos(math.pi * frac)) / 2.0


# ------------------------------------------------------------------------------------------------ AdamW
def adamw_ema_step_(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                    steps: list[Tensor], teachers: Sequence[Tensor | None] | None, *, lr: float, beta1: float,
                    beta2: float, eps: float, weight_decay: float, momentum) -> None:
    """One torch.optim.AdamW step (the ops of its foreach implementation, in the same order), then
    teachers[i] ← lerp(teachers[i], params[i], 1 − momentum) where teachers[i] is not None. `steps` are the
    per-parameter step counters (0-dim tensors), incremented here; their values are read on the host."""
    if not params:
        return
    with torch.no_grad():
        torch._foreach_add_(steps, 1)
        if weight_decay != 0:
            torch._foreach_mul_(params, 1 - lr * weight_decay)
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
        counts = [float(s) for s in steps]
        step_size = [-(lr / (1 - beta1 ** c)) for c in counts]
        bias_correction2_sqrt = [(1 - beta2 ** c) ** 0.5 for c in counts]
        denom = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denom, bias_correction2_sqrt)
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(params, exp_avgs, denom, step_size)
    _teacher_ema(params, teachers, momentum)


def _teacher_ema(params: list[Tensor], teachers, momentum) -> None:
    if teachers is None:
        return
    pairs = [(t, p) for t, p in zip(teachers, params) if t is not None]
    if pairs:
        ema_update_([t for t, _ in pairs], [p for _, p in pairs], momentum)


# ------------------------------------------------------------------------------------------------ LARS
def exclude_bias_and_norm(p: Tensor) -> bool:
    """BYOL / Barlow Twins: biases and normalization parameters (the 1-D ones) skip LARS adaptation and
    weight decay."""
    return p.ndim <= 1


def lars_step_literal_(params: list[Tensor], grads: list[Tensor], mus: list[Tensor], *, lr: float,
                       momentum: float, weight_decay: float, eta: float, decay: Sequence[bool],
                       adapt: Sequence[bool]) -> None:
    """LARS.step of the official Barlow Twins code (facebookresearch/barlowtwins, main.py), one parameter at a
    time; `decay[i]` / `adapt[i]` are False where its weight_decay_filter / lars_adaptation_filter excludes
    the parameter. The test oracle."""
    with torch.no_grad():
        for p, g, mu, dec, ada in zip(params, grads, mus, decay, adapt):
            dp = g
            if dec:
                dp = dp.add(p, alpha=weight_decay)
            if ada:
                param_norm = torch.norm(p)
                update_norm = torch.norm(dp)
                one = torch.ones_like(param_norm)
                q = torch.where(param_norm > 0.0,
                                torch.where(update_norm > 0, (eta * param_norm / update_norm), one), one)
                dp = dp.mul(q)
            mu.mul_(momentum).add_(dp)
            p.add_(mu, alpha=-lr)


def lars_ema_step_(params: list[Tensor], grads: list[Tensor], mus: list[Tensor],
                   teachers: Sequence[Tensor | None] | None, *, lr: float, momentum: float, weight_decay: float,
                   eta: float, decay: Sequence[bool], adapt: Sequence[bool], ema_momentum) -> None:
    """The LARS step of `lars_step_literal_` over the whole list (norms in fp32, trust ratios as device
    tensors: no host sync), then teachers[i] ← lerp(teachers[i], params[i], 1 − ema_momentum)."""
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
        torch._foreach_add_(params, mus, alpha=-lr)
    _teacher_ema(params, teachers, ema_momentum)


# ------------------------------------------------------------------------------------------------ DINO
def update_center_(center: Tensor, teacher_output: Tensor, momentum: float) -> None:
    """DINOLoss.update_center (facebookresearch/dino, main_dino.py): the batch center is the sum of the
    teacher outputs, all-reduced over ranks, divided by the global batch size; then
    center ← center·m + batch_center·(1 − m), in place."""
    with torch.no_grad():
        batch_center = torch.sum(teacher_output.to(torch.promote_types(teacher_output.dtype, torch.float32)),
                                 dim=0, keepdim=True)
        world = 1
        if is_distributed():
            dist.all_reduce(batch_center)
            world = dist.get_world_size()
        batch_center = batch_center / (len(teacher_output) * world)
        center.mul_(momentum).add_((batch_center * (1 - momentum)).reshape(center.shape).to(center.dtype))
