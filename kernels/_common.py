"""Helpers shared by every kernel launcher."""

from __future__ import annotations

import functools
import os
import warnings

import numpy as np
import torch
import triton
import triton.language as tl

from .._backend import STUB_DRIVER, interpreting
from ._launch import cached_launch

# The kernels keep logits in base 2 (x·log2 e) so that every exponential is one exp2. TL_* are the same
# numbers as constexprs, the only globals a @triton.jit function may read.
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
TL_LOG2E = tl.constexpr(LOG2E)
TL_LN2 = tl.constexpr(LN2)


_INTERPRETER_MODULE = r"triton\.runtime\.interpreter"


def quiet_interpreter() -> None:
    """Under TRITON_INTERPRET=1 (installed once, at import): interpreted launches stop reporting the
    interpreter's own numpy noise. The interpreter evaluates every lane of a block, masked-off ones included
    (log2 of 0, inf − inf, NaN casts on lanes that are never stored), and converts 1-element arrays to Python
    ints the way numpy deprecates; none of it reaches a result, but it reached users as RuntimeWarnings and
    DeprecationWarnings. Each grid launch (`triton.runtime.interpreter.GridExecutor.__call__`) now runs under
    `np.errstate(all="ignore")` (so a user's `np.seterr(all="raise")` cannot break a kernel either) and a
    warnings filter that ignores RuntimeWarning and DeprecationWarning attributed to that module only:
    warnings from anywhere else, and everything outside interpreted launches, are untouched. (The filter is
    a `warnings.catch_warnings` scope, which is process-wide for its duration, as that API always is.)"""
    from triton.runtime import interpreter

    executor = getattr(interpreter, "GridExecutor", None)  # the launch of every interpreted grid
    if executor is None or getattr(executor.__call__, "_sslfast_quiet", False):
        return
    call = executor.__call__

    @functools.wraps(call)
    def quiet_call(self, *args, **kwargs):
        with np.errstate(all="ignore"), warnings.catch_warnings():
            for category in (RuntimeWarning, DeprecationWarning):
                warnings.filterwarnings("ignore", category=category, module=_INTERPRETER_MODULE)
            return call(self, *args, **kwargs)

    quiet_call._sslfast_quiet = True
    executor.__call__ = quiet_call


if interpreting():
    quiet_interpreter()


def upcast_dots() -> bool:
    """Constexpr switch for the kernels' `tl.dot` operands.

    Triton's interpreter returns garbage for `tl.dot` on bf16 operands (fp16/fp32 are exact), so under
    TRITON_INTERPRET=1 the kernels upcast dot operands to fp32. On a GPU the dots stay in the input dtype
    (tensor cores) and this is False.
    """
    return interpreting()


@functools.lru_cache(maxsize=None)
def poisoning() -> bool:
    """SSLFAST_POISON=1, read once per process (the test suite sets it before importing sslfast): a launcher
    allocates several outputs per call, and an environment lookup each time is measurable host time."""
    return os.environ.get("SSLFAST_POISON", "0") == "1"


def empty(shape, *, dtype: torch.dtype, device) -> torch.Tensor:
    """`torch.empty` for kernel outputs. With SSLFAST_POISON=1 (the test suite sets it) the buffer is filled
    with NaN (floats) or -1 (integers) first, so an element a kernel forgets to write cannot pass a check.
    While launches are only recorded (`_stub_driver`) an integer buffer is zeroed instead: no kernel writes it,
    and the host code after a launch (index checks, `bincount` of neighbour ids) must see legal indices."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if poisoning():
        out.fill_(float("nan") if out.is_floating_point() else -1)
    elif STUB_DRIVER[0] and not out.is_floating_point():
        out.zero_()
    return out


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    """Per device, once: `get_device_properties` costs microseconds of Python per call, and launchers ask
    for the SM count on every call (grid splits)."""
    return torch.cuda.get_device_properties(index).multi_processor_count


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) on the host (`triton.cdiv` is a constexpr function: ~1.5 µs of Python per host call)."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return _sm_count(torch.cuda.current_device() if device.index is None else device.index)
    return 4  # interpreter: a small, fixed "machine" so splits are still exercised


@triton.jit
def merged_lse2(m, l, AXIS: tl.constexpr):
    """Base-2 log-sum-exp from split partials (max m, sum l of 2^(x − m)) along AXIS; a group whose every
    partial is empty (m = −inf) gives −inf, not NaN."""
    mx = tl.max(m, axis=AXIS)
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    return mx + tl.log2(tl.sum(l * tl.exp2(m - tl.expand_dims(mx, AXIS)), axis=AXIS))


@triton.jit
def online_lse2(m, l, z, AXIS: tl.constexpr):
    """One tile of base-2 scores z folded along AXIS into lane-wise running (max m, sum l of 2^(z − m)):

        m' = max(m, max_AXIS z),   l' = l·2^(m − m') + Σ_AXIS 2^(z − m'),

    with m' read as 0 in both exponents while it is −inf (nothing but −inf seen yet), so such a lane stays
    (−inf, 0) instead of NaN. Returns (m', l')."""
    m_new = tl.maximum(m, tl.max(z, axis=AXIS))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    l = l * tl.exp2(m - m_use) + tl.sum(tl.exp2(z - tl.expand_dims(m_use, AXIS)), axis=AXIS)
    return m_new, l


@triton.jit
def online_lse2_lanes(m, l, z):
    """`online_lse2` with one score per lane (z shaped like m, nothing reduced):
    m' = max(m, z), l' = l·2^(m − m') + 2^(z − m'), m' read as 0 while it is −inf. Returns (m', l')."""
    m_new = tl.maximum(m, z)
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    return m_new, l * tl.exp2(m - m_use) + tl.exp2(z - m_use)


@cached_launch
@triton.jit
def _scale_unless_one_kernel(X, G, n, BLOCK: tl.constexpr):
    # Grid (cdiv(n, BLOCK),): x *= g in place, unless g = 1 (then each program reads g only).
    g = tl.load(G).to(tl.float32)
    if g != 1.0:
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < n
        x = tl.load(X + offs, mask=ok).to(tl.float32)
        tl.store(X + offs, (x * g).to(X.dtype.element_ty), mask=ok)


def scale_unless_one_(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """x ·= g in place (x contiguous, g a device scalar) with no traffic when g = 1, which is what a loss's
    own `backward()` passes: a precomputed gradient (`sslfast._custom_op.loss_with_grads`) is then free to hand
    on, where `x * g` would read and write it once more, without a host sync to look at g."""
    block = 1024 if interpreting() else 4096
    _scale_unless_one_kernel[(cdiv(x.numel(), block),)](x, g, x.numel(), BLOCK=block, num_warps=4)
    return x
