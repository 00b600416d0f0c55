"""`EMA`: a teacher network that follows a student by exponential moving average (BYOL, MoCo, DINO)."""

from __future__ import annotations

import copy
import operator

import torch
from torch import nn

from ..ops import ema as _ops
from ..ops._ema_args import real as _real
from ..schedules import cosine_momentum


def unwrap(module: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel / DataParallel / torch.compile wrappers."""
    while True:
        if isinstance(module, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            module = module.module
        elif hasattr(module, "_orig_mod") and isinstance(module._orig_mod, nn.Module):
            module = module._orig_mod
        else:
            return module


def _slots(module: nn.Module, kind: str) -> list[tuple[str, nn.Module, str]]:
    """(qualified name, owning module, attribute) of every parameter or buffer, shared ones once."""
    out, seen = [], set()
    for mod_name, mod in module.named_modules():
        for name, t in getattr(mod, kind).items():
            if t is None or id(t) in seen:
                continue
            seen.add(id(t))
            out.append((f"{mod_name}.{name}" if mod_name else name, mod, name))
    return out


def _schedule(momentum, final_momentum, total_steps, where: str = "") -> tuple[float, float, int | None]:
    """The checked (momentum, final_momentum, total_steps) of a schedule: both momenta finite numbers in [0, 1]
    (NaN refused), total_steps a positive int or None. `where` names the source in messages (a state dict)."""
    m = _real(f"{where}momentum", momentum, 0.0, 1.0)
    final = _real(f"{where}final_momentum", final_momentum, 0.0, 1.0)
    if total_steps is not None and (
        isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps <= 0
    ):
        raise ValueError(f"{where}total_steps must be a positive int or None, got {total_steps!r}")
    return m, final, total_steps


class EMA(nn.Module):
    """A teacher that tracks `student` by EMA: after each `update()`,

        teacher_param ← m·teacher_param + (1 − m)·student_param   for every parameter,
        teacher_buffer ← student_buffer                          for every buffer (e.g. BatchNorm statistics).

    `teacher`: a module with the student's parameter names and shapes (e.g. a bf16 copy), or None for a deep
    copy of the student. Its parameters stop requiring grad. A DistributedDataParallel / DataParallel /
    torch.compile-wrapped student is unwrapped (`.module`).

    Momentum schedule: with `total_steps=None`, m = `momentum` at every step; otherwise the BYOL / DINO cosine
    schedule from `momentum` at step 0 to `final_momentum` at `total_steps`
    (m_k = final − (final − base)(1 + cos(πk/K))/2, `sslfast.schedules.cosine_momentum`). The step count is
    host-side, so a schedule costs no device sync; it is saved in `state_dict()` with the teacher.

    `update()` is one multi-tensor launch on CUDA (`sslfast.ema_update_`). Calling the module runs the teacher.
    To fold the EMA into the optimizer step instead, pass this object as `teacher=` to `sslfast.optim.AdamWEMA`
    or `sslfast.optim.LARSEMA` and do not call `update()` yourself.

    Args:
        student: the module followed (unwrapped as above); it is not registered as a submodule.
        teacher: a module with the student's parameter and buffer names and shapes, or None for a deep copy.
        momentum: the base momentum m_0, a finite number in [0, 1].
        final_momentum: the momentum at `total_steps` and after, a finite number in [0, 1].
        total_steps: K, a positive int, or None for the constant `momentum`.
        copy_buffers: whether `update()` copies the student's buffers into the teacher.

    Raises:
        TypeError: `student` is not an nn.Module, or `teacher` neither an nn.Module nor None; a momentum is not
            a real number.
        ValueError: a momentum outside [0, 1], NaN or infinite; `total_steps` not a positive int or None; the
            teacher's parameter or buffer names or shapes differ from the student's.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None = None,
        momentum: float = 0.996,
        final_momentum: float = 1.0,
        total_steps: int | None = None,
        *,
        copy_buffers: bool = True,
    ):
        super().__init__()
        if not isinstance(student, nn.Module):
            raise TypeError(f"student must be an nn.Module, got {type(student).__name__}")
        student = unwrap(student)
        if teacher is None:
            teacher = copy.deepcopy(student)
        elif not isinstance(teacher, nn.Module):
            raise TypeError(f"teacher must be an nn.Module or None, got {type(teacher).__name__}")
        teacher = unwrap(teacher)
        self.base_momentum, self.final_momentum, self.total_steps = _schedule(momentum, final_momentum, total_steps)
        teacher.requires_grad_(False)
        self.teacher = teacher
        self._student = [student]  # a list, so the student is not registered as a submodule
        self.copy_buffers = copy_buffers
        self.step = 0
        self._bind()

    @property
    def student(self) -> nn.Module:
        return self._student[0]

    def _bind(self) -> None:
        """Pairs the student's parameters and buffers with the teacher's by name (checking names and shapes)."""
        pairs = {}
        for kind in ("_parameters", "_buffers"):
            s_slots, t_slots = _slots(self.student, kind), _slots(self.teacher, kind)
            s_names, t_names = [n for n, _, _ in s_slots], [n for n, _, _ in t_slots]
            if s_names != t_names:
                what = "parameters" if kind == "_parameters" else "buffers"
                missing = sorted(set(s_names) ^ set(t_names))
                raise ValueError(
                    f"teacher must have the student's {what} (same names, same order); they differ at "
                    f"{missing[:5] or 'their order'}"
                )
            for (name, sm, sa), (_, tm, ta) in zip(s_slots, t_slots):
                s, t = getattr(sm, kind)[sa], getattr(tm, kind)[ta]
                if s.shape != t.shape:
                    raise ValueError(f"teacher.{name} has shape {tuple(t.shape)}, the student's has {tuple(s.shape)}")
            pairs[kind] = ([(sm, sa) for _, sm, sa in s_slots], [(tm, ta) for _, tm, ta in t_slots])
        self._param_slots = pairs["_parameters"]
        # buffers grouped by dtype, so each group is one multi-tensor copy (foreach's fast path needs one dtype)
        groups: dict = {}
        for s_slot, t_slot in zip(*pairs["_buffers"]):
            key = (s_slot[0]._buffers[s_slot[1]].dtype, t_slot[0]._buffers[t_slot[1]].dtype)
            g = groups.setdefault(key, ([], []))
            g[0].append(s_slot)
            g[1].append(t_slot)
        self._buffer_groups = list(groups.values())

    # The current tensors are looked up at every update (cheap), so parameters replaced after construction
    # (load_state_dict(assign=True), module.to() with overwrite semantics...) are still the ones updated.
    def _params(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        (s_slots, t_slots) = self._param_slots
        return [m._parameters[a] for m, a in s_slots], [m._parameters[a] for m, a in t_slots]

    @property
    def momentum(self) -> float:
        """The momentum the next `update()` uses."""
        return cosine_momentum(self.step, self.total_steps, self.base_momentum, self.final_momentum)

    @torch.no_grad()
    def update(self, momentum=None) -> None:
        """One EMA step of the teacher towards the student (then buffers copied, step count + 1).

        Args:
            momentum: None for the schedule's `momentum`, or an override for this step: a float in [0, 1], or a
                one-element CUDA tensor read on the device (for CUDA-graph capture), whose range is checked by a
                device-side assertion instead of a host sync.

        Raises:
            TypeError, ValueError: as `sslfast.ops.ema.ema_update_` (a bad momentum; parameters replaced by
                tensors of other shapes or devices).
        """
        student, teacher = self._params()
        _ops.ema_update_(teacher, student, self.momentum if momentum is None else momentum)
        self.finish_step()

    def finish_step(self) -> None:
        """Completes an update whose parameters were already averaged elsewhere (a fused optimizer step, or the
        EMA over FSDP shards): copies the buffers (when `copy_buffers`) and counts the step, as `update` does
        after its own average."""
        if self.copy_buffers:
            with torch.no_grad():  # BatchNorm statistics, counters: one multi-tensor copy per dtype
                for s_slots, t_slots in self._buffer_groups:
                    torch._foreach_copy_(
                        [tm._buffers[ta] for tm, ta in t_slots], [sm._buffers[sa] for sm, sa in s_slots]
                    )
        self.step += 1

    def forward(self, *args, **kwargs):
        return self.teacher(*args, **kwargs)

    def get_extra_state(self):
        return {
            "step": self.step,
            "momentum": self.base_momentum,
            "final_momentum": self.final_momentum,
            "total_steps": self.total_steps,
        }

    def set_extra_state(self, state):
        try:
            step = operator.index(state["step"])
        except TypeError:
            step = -1
        if isinstance(state["step"], bool) or step < 0:
            raise ValueError(f"state: step must be an int >= 0, got {state['step']!r}")
        self.base_momentum, self.final_momentum, self.total_steps = _schedule(
            state.get("momentum", self.base_momentum),
            state.get("final_momentum", self.final_momentum),
            state.get("total_steps", self.total_steps),
            where="state: ",
        )
        self.step = step

    def extra_repr(self) -> str:
        return (
            f"momentum={self.base_momentum}, final_momentum={self.final_momentum}, "
            f"total_steps={self.total_steps}, step={self.step}"
        )
