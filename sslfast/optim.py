"""Optimizers whose step also updates the EMA teacher, in the same pass over the parameters.

    opt = sslfast.optim.AdamWEMA(student.parameters(), teacher=sslfast.EMA(student), lr=1e-3)
    loss.backward(); opt.step()        # student AdamW step + teacher EMA (+ buffers copied, schedule advanced)

`AdamWEMA` equals torch.optim.AdamW followed by `sslfast.ema_update_(teacher, student, m)`; `LARSEMA` equals the
LARS of BYOL / Barlow Twins followed by the same EMA. On CUDA with `sslfast._C` each parameter group is one
kernel that reads every student tensor once (AdamW: after a one-block launch that counts the step; LARS: after
a pass that computes the trust-ratio norms); elsewhere the steps run torch's foreach ops (CPU) or its fused
kernels (CUDA without `_C`), `sslfast.ops._torch.ema`. No CUDA path syncs with the host.

`teacher` may be an `sslfast.nn.EMA` (its schedule gives the momentum, its step count advances with every
optimizer step, its buffers are copied), a sequence of teacher tensors parallel to the optimizer's parameters
(flattened over the param groups in order; momentum `ema_momentum`, a float or a one-element device tensor),
or None (a plain fused AdamW / LARS). Parameters without a gradient are not stepped, but their teachers still
follow them, as `optimizer.step(); ema.update()` would do.

CUDA graphs: a param group's `lr` may be a 0-dim float32 tensor on the parameters' device, and
`ema_momentum_tensor` (an attribute) a 0-dim float32 tensor that replaces the scheduled EMA momentum; both are
read by the kernels on the device, so `step()` does no host sync and can be captured in a `torch.cuda.CUDAGraph`
(after eager warm-up steps) and replayed after the caller fills new values into the tensors
(`torch.optim.lr_scheduler` fills a tensor lr in place).
"""

from __future__ import annotations

import itertools
import operator
from typing import Callable

import torch

from .nn.ema import EMA
from .ops import _ema_args as _args
from .ops import ema as _ops
from .ops.fused_optim import AdamWEMAPlan, LARSEMAPlan, exclude_bias_and_norm

__all__ = ["AdamWEMA", "EXCLUDE_RULES", "LARSEMA", "exclude_bias_and_norm"]

# LARS exclusion rules by name: a param group stores the name (plain data in `state_dict`, loadable with
# `torch.load(weights_only=True)`), never the function.
EXCLUDE_RULES: dict[str, Callable[[torch.Tensor], bool]] = {"bias_and_norm": exclude_bias_and_norm}


class _EMAOptimizer(torch.optim.Optimizer):
    """Per step: one cached plan per param group (keyed by which parameters have gradients and by the
    teacher mapping), checked for moved storage, its gradient pointers refreshed, launched. The Python work is
    a handful of C-level passes over the parameter list (no per-parameter state lookups).

    Attributes:
        ema_momentum_tensor: None (the default: the EMA momentum is the teacher `EMA`'s scheduled `momentum`,
            or `ema_momentum`), or a 0-dim float32 tensor on the parameters' device that every `step()` uses as
            the EMA momentum instead, read on the device (no host sync). The caller fills it before each step
            (``opt.ema_momentum_tensor.fill_(ema.momentum)``); `step()` never writes it, which makes the step
            capturable in a CUDA graph with a changing momentum. Checked when set and at each step (TypeError /
            ValueError naming it); its range [0, 1] as `sslfast.ops.ema.ema_update_` checks a device momentum.
            An `EMA` teacher still counts its steps in `step()` (in eager mode only: a replayed graph runs no
            Python).
    """

    def __init__(self, params, defaults, teacher, ema_momentum):
        super().__init__(params, defaults)
        self._ema: EMA | None = None
        self._mapping = None  # (students, teachers, {id(student): teacher}, version)
        if isinstance(teacher, EMA):
            self._ema = teacher
        elif teacher is not None:
            teachers = _args.tensor_list("teacher", teacher)
            flat = [p for g in self.param_groups for p in g["params"]]
            _args.check_pairs("params", flat, "teacher", teachers)
            self._mapping = (flat, teachers, dict(zip(map(id, flat), teachers)), 0)
        _args.momentum("ema_momentum", ema_momentum, None)
        self.ema_momentum = ema_momentum
        self.ema_momentum_tensor = None
        device = self._device()
        for group in self.param_groups:  # a tensor lr must live with the parameters (checked again per step)
            if isinstance(group["lr"], torch.Tensor):
                _args.scalar_tensor("lr", group["lr"], device)
        self._plans: dict = {}
        self._leftovers: dict = {}

    @property
    def ema_momentum_tensor(self) -> torch.Tensor | None:
        """The device EMA momentum every step uses instead of the scheduled one, or None (class docstring)."""
        return self._ema_momentum_tensor

    @ema_momentum_tensor.setter
    def ema_momentum_tensor(self, value: torch.Tensor | None) -> None:
        if value is not None:
            _args.scalar_tensor("ema_momentum_tensor", value, self._device())
        self._ema_momentum_tensor = value

    def _device(self) -> torch.device | None:
        """The device of the first parameter (all of a fused step's tensors share one), None without any."""
        for group in self.param_groups:
            for p in group["params"]:
                return p.device
        return None

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        self._plans.clear()  # the state tensors were replaced

    def _teacher_mapping(self):
        """(students, teachers, {id(student): teacher}, version) for this step, or None without teachers. With
        an EMA, its current parameters are looked up every step and the mapping rebuilt only when they are
        other objects than last step's."""
        if self._ema is None:
            return self._mapping
        students, teachers = self._ema._params()
        old = self._mapping
        if (
            old is None
            or len(students) != len(old[0])
            or not (all(map(operator.is_, students, old[0])) and all(map(operator.is_, teachers, old[1])))
        ):
            version = 0 if old is None else old[3] + 1
            self._mapping = (students, teachers, dict(zip(map(id, students), teachers)), version)
        return self._mapping

    def _group_plan(self, index: int, group: dict, params: list[torch.Tensor], mapping):
        """(plan, its tensor lists) for these params, cached. The plan holds the tensors, so their ids stay
        valid; params and teachers are checked for moved storage (the states are the optimizer's own, and
        load_state_dict drops every plan)."""
        key = (index, tuple(map(id, params)), None if mapping is None else mapping[3])
        bound = self._plans.get(key)
        if bound is not None and not bound[0].matches((params, bound[2]), which=(0, -1)):
            bound = None
        if bound is None:
            teachers = [mapping[2].get(id(p)) for p in params] if mapping else [None] * len(params)
            plan, lists = self._build_plan(group, params, teachers)
            bound = self._plans[key] = (plan, lists, [t for t in teachers if t is not None])
        return key, bound[0], bound[1]

    def _leftover_pairs(self, mapping, keys: tuple):
        """(teachers, students) of the pairs that no group stepped this time (no gradient, or not in this
        optimizer): they get a plain EMA, as `optimizer.step(); ema.update()` would give them."""
        left = self._leftovers.get(keys)
        if left is None:
            covered = {id(p) for k in keys for p in self._plans[k][1][0]}
            pairs = [(t, s) for s, t in zip(mapping[0], mapping[1]) if id(s) not in covered]
            left = self._leftovers[keys] = ([t for t, _ in pairs], [s for _, s in pairs])
        return left

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        mapping = self._teacher_mapping()
        if mapping is None:
            momentum = 0.0
        elif self._ema_momentum_tensor is not None:  # checked (metadata only), read on the device
            momentum = _args.scalar_tensor("ema_momentum_tensor", self._ema_momentum_tensor, self._device())
        else:
            momentum = self._ema.momentum if self._ema is not None else self.ema_momentum
        keys = []
        for index, group in enumerate(self.param_groups):
            params = group["params"]
            grads = [p.grad for p in params]
            if not all(map(operator.is_not, grads, itertools.repeat(None))):  # C-level: no Tensor.__eq__
                params = [p for p, g in zip(params, grads) if g is not None]
                grads = [g for g in grads if g is not None]
            if not params:
                continue
            key, plan, lists = self._group_plan(index, group, params, mapping)
            self._step_group(plan, lists, group, grads, momentum)
            keys.append(key)
        if mapping is not None:
            teachers, students = self._leftover_pairs(mapping, tuple(keys))
            if teachers:
                _ops.ema_update_(teachers, students, momentum)
        if self._ema is not None:
            self._ema.finish_step()
        return loss


class AdamWEMA(_EMAOptimizer):
    """torch.optim.AdamW (decoupled weight decay; no amsgrad / maximize) fused with the teacher EMA.

    State per parameter as torch's fused AdamW: `step` (fp32 tensor on the parameter's device), `exp_avg`,
    `exp_avg_sq`; a torch.optim.AdamW state dict loads as is. Per step and fp32 parameter the CUDA kernel moves
    36 bytes (read param, grad, both moments and the teacher; write param, moments, teacher), against 40 for
    AdamW(fused=True) + _foreach_lerp_.

    `lr` (here or per param group) is a float or a 0-dim float32 tensor on the parameters' device, read on the
    device at every step (module docstring: CUDA graphs); `ema_momentum_tensor`: see `_EMAOptimizer`.
    """

    def __init__(
        self,
        params,
        teacher=None,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        ema_momentum=0.996,
    ):
        _args.lr_arg("lr", lr, None)
        for name, value, low, high in (
            ("betas[0]", betas[0], 0.0, 1.0),
            ("betas[1]", betas[1], 0.0, 1.0),
            ("eps", eps, 0.0, None),
            ("weight_decay", weight_decay, 0.0, None),
        ):
            _args.real(name, value, low, high)
        super().__init__(
            params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay), teacher, ema_momentum
        )

    def _build_plan(self, group, params, teachers):
        exp_avgs, exp_avg_sqs, steps = [], [], []
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            step = state["step"]
            if not isinstance(step, torch.Tensor):
                step = torch.tensor(float(step))
            if step.device != p.device or step.dtype != torch.float32 or step.dim():
                state["step"] = step = step.to(device=p.device, dtype=torch.float32).reshape(())
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(step)
        _args.check_fused(params, {"exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs}, teachers)
        plan = AdamWEMAPlan(params, exp_avgs, exp_avg_sqs, steps, teachers)
        return plan, (params, exp_avgs, exp_avg_sqs, steps, teachers)

    def _step_group(self, plan, lists, group, grads, momentum):
        params, exp_avgs, exp_avg_sqs, steps, teachers = lists
        beta1, beta2 = group["betas"]
        plan.step_(
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            steps,
            teachers,
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            momentum=momentum,
        )


class LARSEMA(_EMAOptimizer):
    """LARS with the semantics of BYOL / Barlow Twins, fused with the teacher EMA:

        d = g + wd·p,  q = η‖p‖/‖d‖ (1 if either norm is 0),  μ ← momentum·μ + q·d,  p ← p − lr·μ

    where parameters with `exclude(p)` true (default: biases and norm weights, p.ndim <= 1) get neither the
    weight decay nor the trust ratio (BYOL appendix C). The per-tensor norms are computed on the device by a
    first pass (no host sync). State per parameter: `momentum_buffer`.

    `exclude` (also per param group) is the name of a rule in `EXCLUDE_RULES` ("bias_and_norm"), None (no
    exclusion) or a callable param -> bool. A param group keeps only a name, so `state_dict()` is plain data: a
    registered rule is stored as its name, any other callable as "callable:<module>.<qualname>", which resolves
    only in an optimizer built with that same callable (a loaded state dict never brings code).

    `lr` and `ema_momentum_tensor` as `AdamWEMA`'s (a float or a 0-dim float32 device tensor lr; a device EMA
    momentum the caller fills before each step).
    """

    def __init__(
        self,
        params,
        teacher=None,
        lr: float | torch.Tensor = 0.2,
        momentum: float = 0.9,
        weight_decay: float = 1.5e-6,
        eta: float = 1e-3,
        *,
        exclude: str | Callable[[torch.Tensor], bool] | None = "bias_and_norm",
        ema_momentum=0.996,
    ):
        _args.lr_arg("lr", lr, None)
        for name, value, low, high in (
            ("momentum", momentum, 0.0, 1.0),
            ("weight_decay", weight_decay, 0.0, None),
            ("eta", eta, 0.0, None),
        ):
            _args.real(name, value, low, high)
        self._exclude_callables: dict[str, Callable[[torch.Tensor], bool]] = {}
        super().__init__(
            params,
            dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, exclude=self._exclude_name(exclude)),
            teacher,
            ema_momentum,
        )

    def _exclude_name(self, exclude) -> str | None:
        """The stored form of an `exclude` argument (a rule name or None); a user callable is remembered."""
        if exclude is None:
            return None
        if isinstance(exclude, str):
            if exclude not in EXCLUDE_RULES and exclude not in self._exclude_callables:
                raise ValueError(
                    f"exclude: unknown rule {exclude!r} (known: {', '.join(sorted(EXCLUDE_RULES))}, "
                    f"or pass a callable param -> bool, or None)"
                )
            return exclude
        if not callable(exclude):
            raise TypeError(
                f"exclude must be a rule name, a callable (param -> bool) or None, got {type(exclude).__name__}"
            )
        for name, rule in EXCLUDE_RULES.items():
            if exclude is rule:
                return name
        key = f"callable:{getattr(exclude, '__module__', '?')}.{getattr(exclude, '__qualname__', repr(exclude))}"
        if self._exclude_callables.get(key, exclude) is not exclude:
            key = f"{key}#{len(self._exclude_callables)}"  # two different callables of the same name
        self._exclude_callables[key] = exclude
        return key

    def add_param_group(self, param_group: dict) -> None:
        if "exclude" in param_group:
            param_group = dict(param_group, exclude=self._exclude_name(param_group["exclude"]))
        super().add_param_group(param_group)

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        for group in self.param_groups:  # a state dict of an older version may hold the function itself
            group["exclude"] = self._exclude_name(group.get("exclude"))

    def _exclude_rule(self, name):
        if name is None:
            return None
        rule = EXCLUDE_RULES.get(name) or self._exclude_callables.get(name)
        if rule is None:
            raise ValueError(
                f"exclude: the param group names the rule {name!r}, which this optimizer does not "
                f"know (a loaded state dict names a callable: build the optimizer with exclude= that "
                f"callable)"
            )
        return rule

    def _build_plan(self, group, params, teachers):
        bufs = []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            bufs.append(state["momentum_buffer"])
        exclude = self._exclude_rule(group["exclude"])
        keep = [not (exclude is not None and bool(exclude(p))) for p in params]
        _args.check_fused(params, {"momentum_buffers": bufs}, teachers)
        return LARSEMAPlan(params, bufs, teachers, keep, keep), (params, bufs, teachers)

    def _step_group(self, plan, lists, group, grads, momentum):
        params, bufs, teachers = lists
        plan.step_(
            params,
            grads,
            bufs,
            teachers,
            lr=group["lr"],
            momentum=group["momentum"],
            weight_decay=group["weight_decay"],
            eta=group["eta"],
            ema_momentum=momentum,
        )
