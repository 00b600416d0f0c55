"""Argument checks of the EMA family's ops (`ema_update_`, `adamw_ema_step_`, `lars_ema_step_`) and of DINO's
center update: tensor lists, momenta, finite hyper-parameters. Every failure names the argument and is raised
before any launch."""

from __future__ import annotations

import math
from numbers import Real

import torch

from .. import _validate as V

Tensor = torch.Tensor
_FP32_MAX = torch.finfo(torch.float32).max  # clamp(x, 0, max) == x: finite and >= 0 (NaN compares unequal)


def tensor_list(name: str, value) -> list[Tensor]:
    """`value` as a list (a list is kept as is); one tensor or a non-iterable is a TypeError naming `name`."""
    if isinstance(value, Tensor):
        raise TypeError(f"{name} must be a sequence of tensors (e.g. list(model.parameters())), got one tensor")
    try:
        items = value if isinstance(value, list) else list(value)
    except TypeError:
        raise TypeError(f"{name} must be a sequence of tensors, got {type(value).__name__}") from None
    return items


def check_pairs(
    name_a: str, a: list[Tensor], name_b: str, b: list, *, b_optional: bool = False, same_dtype: bool = False
) -> torch.device | None:
    """Per-element checks between two parallel lists; returns their one device (None for empty lists)."""
    if len(a) != len(b):
        raise ValueError(f"{name_a} and {name_b} must have the same length, got {len(a)} and {len(b)}")
    device = None
    for i, (x, y) in enumerate(zip(a, b)):
        V.tensor(f"{name_a}[{i}]", x)
        if y is None and b_optional:
            continue
        V.tensor(f"{name_b}[{i}]", y)
        if x.shape != y.shape:
            raise ValueError(
                f"{name_b}[{i}] must have the shape of {name_a}[{i}], {tuple(x.shape)}, got {tuple(y.shape)}"
            )
        if same_dtype and x.dtype != y.dtype:
            raise TypeError(f"{name_b}[{i}] must have the dtype of {name_a}[{i}], {x.dtype}, got {y.dtype}")
        if device is None:
            device = x.device
        for nm, t in ((name_a, x), (name_b, y)):
            if t.device != device:
                raise ValueError(
                    f"all tensors must be on one device: {nm}[{i}] is on {t.device}, {name_a}[0] on {device}"
                )
    if device is None and a:
        device = a[0].device
    return device


def check_fused(params: list[Tensor], states: dict[str, list], teachers) -> torch.device | None:
    """A fused step's params against each list of optimizer states (same shapes and dtypes) and the optional
    teachers (same shapes, any float dtype); returns their one device."""
    device = None
    for name, lst in states.items():
        device = check_pairs("params", params, name, lst, same_dtype=True) or device
    if teachers is not None:
        device = check_pairs("params", params, "teachers", teachers, b_optional=True) or device
    return device


def check_steps(params: list[Tensor], steps: list) -> None:
    """AdamW's step counters: one one-element fp32 tensor per param, on its device."""
    if len(steps) != len(params):
        raise ValueError(f"params and steps must have the same length, got {len(params)} and {len(steps)}")
    for i, (p, s) in enumerate(zip(params, steps)):
        if not isinstance(s, Tensor) or s.numel() != 1 or s.dtype != torch.float32 or s.device != p.device:
            where = f" on {s.device}" if isinstance(s, Tensor) else ""
            got = s.dtype if isinstance(s, Tensor) else type(s).__name__
            raise TypeError(
                f"steps[{i}] must be a one-element float32 tensor on {p.device} (the step count), got {got}{where}"
            )


def _unit(name: str, value: float) -> float:
    """`value` if it lies in [0, 1]; NaN fails both comparisons and is refused with everything else."""
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value}")
    return value


def momentum(name: str, value, device: torch.device | None):
    """(weight = 1 − m as a float, or None; momentum as a 0-dim fp32 device tensor, or None).

    Every momentum must lie in [0, 1] (NaN and ±inf are refused): a float or a CPU tensor is read and checked
    on the host (ValueError naming `name`). A CUDA tensor is not read on the host (that would cost a device sync
    per step, and a CUDA graph replays with whatever value the tensor holds then); instead a device-side
    assertion is queued on the current stream before the update (`torch._assert_async(clamp(m, 0, 1) == m)`:
    two tiny elementwise kernels and the assert, captured with the update by a CUDA graph). A value outside
    [0, 1] never extrapolates the teacher silently: it raises a device-side assert error, reported at the next
    synchronization (which, as every CUDA device assert, leaves the CUDA context unusable)."""
    if isinstance(value, Tensor):
        if value.numel() != 1 or not value.is_floating_point():
            raise TypeError(
                f"{name} must be a float or a floating tensor with one element, got "
                f"{value.dtype} of shape {tuple(value.shape)}"
            )
        if value.device.type == "cpu":  # a host scalar: reading it costs no device sync
            return 1.0 - _unit(name, float(V.host_scalar(value))), None
        if device is not None and value.device != device:
            raise ValueError(f"{name} must be on the tensors' device {device} (or on the CPU), got {value.device}")
        m = value.detach().reshape(()).to(torch.float32)
        torch._assert_async(
            m.clamp(0.0, 1.0) == m, f"{name} must lie in [0, 1] (a device tensor, checked on the device)"
        )
        return None, m
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number in [0, 1] or a tensor, got {type(value).__name__}")
    return 1.0 - _unit(name, float(value)), None


def scalar_tensor(name: str, value, device: torch.device | None) -> Tensor:
    """A hyper-parameter given as a tensor read on the device (a learning rate, an EMA momentum the caller
    fills before each step): `value` itself, which must be a 0-dim float32 tensor on `device` (None: any
    device). Only its metadata is checked here (no host read, no sync); TypeError / ValueError naming `name`."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a 0-dim float32 tensor, got {type(value).__name__}")
    if value.dtype != torch.float32 or value.dim() != 0:
        raise TypeError(f"{name} must be a 0-dim float32 tensor, got {value.dtype} of shape {tuple(value.shape)}")
    if device is not None and value.device != device:
        raise ValueError(f"{name} must be on the tensors' device {device}, got {value.device}")
    return value


def lr_tensor(name: str, value: Tensor, device: torch.device | None) -> Tensor:
    """A learning rate given as a tensor: `scalar_tensor`'s checks, then its range (finite, >= 0) checked
    where it is read, as `momentum` checks a CUDA momentum: a device-side assertion queued on the current
    stream (`torch._assert_async`, captured with the step by a CUDA graph; on the CPU it raises at once). The
    value is never read on the host: a graph replayed after ``value.fill_(new_lr)`` steps with the new lr.

    Returns:
        `value` detached (the tensor the kernels read).
    """
    lr = scalar_tensor(name, value, device).detach()
    torch._assert_async(
        lr.clamp(0.0, _FP32_MAX) == lr, f"{name} must be finite and >= 0 (a tensor, checked on its device)"
    )
    return lr


def lr_arg(name: str, value, device: torch.device | None):
    """A learning rate as the ops take it: a real number (returned as a float, finite and >= 0) or a 0-dim
    float32 tensor on `device` (`lr_tensor`)."""
    if isinstance(value, Tensor):
        return lr_tensor(name, value, device)
    return real(name, value, 0.0)


def real(name: str, value, low: float | None = None, high: float | None = None) -> float:
    """`value` as a float, finite and within [low, high] (either bound optional): NaN and ±inf are refused."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not (math.isfinite(value) and (low is None or value >= low) and (high is None or value <= high)):
        bounds = (
            f" in [{low}, {high}]"
            if low is not None and high is not None
            else f" >= {low}"
            if low is not None
            else f" <= {high}"
            if high is not None
            else ""
        )
        raise ValueError(f"{name} must be a finite number{bounds}, got {value}")
    return value
