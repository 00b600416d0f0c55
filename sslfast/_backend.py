"""Backend selection shared by every op (CONTRIBUTING.md, "One op family, one contract").

CUDA tensors take the fast path (Triton kernels or csrc); CPU tensors take the PyTorch reference path.
`SSLFAST_BACKEND` overrides that per process:

* ``auto`` (default): fast path iff every tensor is on CUDA and Triton imports;
* ``triton``: the Triton kernels even for CPU tensors (meaningful with ``TRITON_INTERPRET=1``, which is how
  CI runs the real kernels on a CPU);
* ``reference``: plain PyTorch everywhere.

The variable is read at every call so tests and benchmarks can switch it without re-importing.
"""

from __future__ import annotations

import functools
import os

import torch

_CHOICES = ("auto", "triton", "reference")


def backend() -> str:
    return _parse_backend(os.environ.get("SSLFAST_BACKEND"))


@functools.lru_cache(maxsize=8)  # the variable is still read at every call; only its parsing is remembered
def _parse_backend(raw: str | None) -> str:
    value = (raw or "auto").strip().lower() or "auto"
    if value not in _CHOICES:
        raise ValueError(f"SSLFAST_BACKEND must be one of {_CHOICES}, got {value!r}")
    return value


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=None)
def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1). Read once: `triton.jit`
    reads the variable when the kernels are decorated, at import, so later changes could not apply anyway."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")


# True while `sslfast.kernels._stub_driver.stub_driver` is active: launches take CPU tensors and record them
# without running anything (host-path measurements and tests; module docstring there).
STUB_DRIVER = [False]


def use_triton(*tensors: torch.Tensor | None) -> bool:
    """Whether an op over `tensors` should launch its Triton kernels."""
    choice = backend()
    if choice == "reference":
        return False
    if choice == "triton":
        if not triton_available():
            raise RuntimeError("SSLFAST_BACKEND=triton but triton is not installed")
        if not (interpreting() or STUB_DRIVER[0]) and any(t is not None and not t.is_cuda for t in tensors):
            raise RuntimeError("SSLFAST_BACKEND=triton on CPU tensors needs TRITON_INTERPRET=1")
        return True
    present = False
    for t in tensors:
        if t is not None:
            if not t.is_cuda:
                return False
            present = True
    return present and triton_available()


@functools.lru_cache(maxsize=None)
def csrc_available() -> bool:
    """Whether the CUDA extension `sslfast._C` (csrc/, built when nvcc was found at install time) imports."""
    try:
        from . import _C  # noqa: F401
    except ImportError:
        return False
    return True


def use_csrc(*tensors: torch.Tensor | None) -> bool:
    """Whether an op over `tensors` should launch the csrc kernels: every tensor on CUDA, `sslfast._C` built,
    and SSLFAST_BACKEND not forcing the reference path."""
    if backend() == "reference":
        return False
    present = [t for t in tensors if t is not None]
    return bool(present) and all(t.is_cuda for t in present) and csrc_available()


def without_autocast(fn):
    """Runs an op's implementation with autocast off on its tensors' device: the ops choose their own
    precision (dots in the input dtype, fp32 accumulation) and must not see autocast's casts."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        device = next((a.device.type for a in args if isinstance(a, torch.Tensor)), "cpu")
        if not torch.is_autocast_enabled(device):  # the common case: no context to enter and leave
            return fn(*args, **kwargs)
        with torch.autocast(device_type=device, enabled=False):
            return fn(*args, **kwargs)

    return wrapper
