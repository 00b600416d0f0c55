"""Argument checks shared by the ops: every failure names the argument and what was expected, and is raised
before any kernel launches."""

from __future__ import annotations

import math
from numbers import Real

import torch

from ._backend import use_triton

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
REFERENCE_DTYPES = (torch.float64,)  # what the reference path runs (gradcheck's dtype) and the kernels do not
# Logits and soft targets of the prototype cross-entropies (DINO, iBOT, SwAV): fp64 is accepted on every device
# and sent to the PyTorch path by the family's `accepts`.
ALL_FLOAT_DTYPES = FLOAT_DTYPES + (torch.float64,)


def host_scalar(t: torch.Tensor) -> float | int | bool:
    """The value of a one-element tensor in host memory (CPU), for an argument check: reading it costs no
    device sync. The ops' checks read tensor values on the host only through here; a device tensor raises
    instead (callers branch on the device first: on CUDA they check on the device or not at all, so a CUDA-graph
    capture never syncs), and the tests of `--cuda-graph` allow no other read inside a captured step.

    Raises:
        RuntimeError: `t` is not on the CPU.
    """
    if t.device.type != "cpu":
        raise RuntimeError(f"host_scalar: reading a {t.device} tensor on the host would wait for the device")
    return t.item()


def tensor(
    name: str,
    value,
    *,
    ndim: int | None = None,
    shape_hint: str = "",
    floating: bool = True,
    dtypes=FLOAT_DTYPES,
    reference_dtypes=(),
) -> torch.Tensor:
    """Checks that `value` is a tensor of the expected rank and (floating) dtype; returns it contiguous.

    `reference_dtypes` are accepted too where the op will run its reference path (CPU tensors, or
    SSLFAST_BACKEND=reference); on the Triton path they raise a TypeError that says so."""
    return check(
        name,
        value,
        ndim=ndim,
        shape_hint=shape_hint,
        floating=floating,
        dtypes=dtypes,
        reference_dtypes=reference_dtypes,
    ).contiguous()


def check(
    name: str,
    value,
    *,
    ndim: int | None = None,
    shape_hint: str = "",
    floating: bool = True,
    dtypes=FLOAT_DTYPES,
    reference_dtypes=(),
) -> torch.Tensor:
    """`tensor`'s checks, returning `value` itself (any layout)."""
    if (
        isinstance(value, torch.Tensor)
        and (ndim is None or value.dim() == ndim)
        and (not floating or value.dtype in dtypes)
    ):
        return value  # the common case, decided in three tests
    hint = f" {shape_hint}" if shape_hint else ""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor{hint}, got {type(value).__name__}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name} must be a {ndim}-D tensor{hint}, got shape {tuple(value.shape)}")
    if floating and value.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        if value.dtype not in reference_dtypes:
            raise TypeError(f"{name} must have a floating dtype ({names}), got {value.dtype}")
        if use_triton(value):
            raise TypeError(
                f"{name} has dtype {value.dtype}, which only the reference backend runs (the Triton "
                f"kernels take {names}): set SSLFAST_BACKEND=reference or use CPU tensors"
            )
    return value


def _agree(attr: str, error: type, tensors: dict) -> object:
    values = [getattr(v, attr) for v in tensors.values() if v is not None]
    if values.count(values[0]) != len(values):
        listing = ", ".join(f"{k}: {getattr(v, attr)}" for k, v in tensors.items() if v is not None)
        raise error(f"all inputs must share one {attr}, got {listing}")
    return values[0]


def same_device(**tensors: torch.Tensor | None) -> torch.device:
    return _agree("device", ValueError, tensors)


def same_dtype(**tensors: torch.Tensor | None) -> torch.dtype:
    return _agree("dtype", TypeError, tensors)


def positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


def non_negative(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return value


def in_open_interval(name: str, value, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not (low < value < high):
        raise ValueError(f"{name} must lie in ({low}, {high}), got {value}")
    return value


def features(name: str, x) -> torch.Tensor:
    """A non-empty [N, D] floating tensor (made contiguous); float64 on the reference path."""
    x = tensor(name, x, ndim=2, shape_hint="[N, D]", reference_dtypes=REFERENCE_DTYPES)
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty [N, D] tensor, got shape {tuple(x.shape)}")
    return x


def view_pair(name1: str, x1, name2: str, x2) -> tuple[torch.Tensor, torch.Tensor]:
    """Two embeddings of the same batch (two views, query/key, image/text): same shape, device and dtype."""
    x1, x2 = features(name1, x1), features(name2, x2)
    if x1.shape != x2.shape:
        raise ValueError(
            f"{name1} and {name2} must have the same shape [N, D], got {tuple(x1.shape)} and {tuple(x2.shape)}"
        )
    if x1.device != x2.device:
        same_device(**{name1: x1, name2: x2})  # raises, naming both
    if x1.dtype != x2.dtype:
        same_dtype(**{name1: x1, name2: x2})
    return x1, x2


def soft_targets(
    name: str, value, *, shape: tuple[int | None, ...], shape_hint: str, like: dict[str, torch.Tensor]
) -> torch.Tensor:
    """The targets of a soft cross-entropy over K prototypes (teacher probabilities, Sinkhorn codes), checked
    against the tensors `like` (name → tensor) that they are scored with.

    Args:
        name: the argument's name, for the messages.
        value: what the caller passed.
        shape: the expected shape, taken from the `like` tensors; None leaves a dimension to the caller.
        shape_hint: the shape in symbols, e.g. ``"[B, K]"``.
        like: the tensors `shape` comes from, by argument name; the targets must be on their device.

    Returns:
        `value` contiguous and detached (targets get no gradient); any dtype of `ALL_FLOAT_DTYPES`.

    Raises:
        TypeError: `value` is not a tensor, or not a floating one.
        ValueError: its rank or shape differs from `shape` (the message names the `like` arguments), or it is
            on another device than the `like` tensors.
    """
    t = tensor(name, value, ndim=len(shape), shape_hint=shape_hint, dtypes=ALL_FLOAT_DTYPES)
    if t.shape != shape and any(want is not None and want != got for want, got in zip(shape, t.shape)):
        want = ", ".join("·" if w is None else str(w) for w in shape)
        raise ValueError(
            f"{name} must be {shape_hint} = [{want}] (from {' and '.join(like)}), got shape {tuple(t.shape)}"
        )
    if any(x.device != t.device for x in like.values()):
        same_device(**like, **{name: t})  # raises, naming every argument
    return t.detach()
