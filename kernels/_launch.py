"""A cached launch path for Triton kernels (opt-in: ``SSLFAST_LAUNCH_CACHE=1``, read once, at import).

Every ``kernel[grid](*args, **kwargs)`` through Triton's ``JITFunction.run`` binds the arguments, specializes
each one (``native_specialize_impl``), turns the specialization and the options into a string cache key,
looks the compiled kernel up, checks the kernel's globals, builds the launch metadata and calls the launch
hooks: several microseconds of Python per launch. With the cache on, a kernel decorated with
:func:`cached_launch` does that only on the first call of each specialization. Later calls with the same
*launch key* go straight to the compiled kernel's launcher::

    compiled.run(gx, gy, gz, stream, compiled.function, compiled.packed_metadata, None, None, None, *bound)

where ``bound`` is every argument in parameter order, defaults applied, constexprs included (the generated
launcher skips constexpr positions itself, so this is exactly ``*bound_args.values()`` of Triton's ``run``).

The launch key, per (kernel, current device), is what Triton's own key depends on, computed cheaply:

* a tensor: ``(dtype, data_ptr() % 16 == 0)`` (Triton: ``*<dtype>`` and ``"D"`` for 16-byte alignment);
* an int: 1 (which Triton turns into the constexpr 1), else its width class (i32 / i64 / u64, by range) and
  whether it is a multiple of 16; a float: fp32 (never specialized); a bool: u1; None: a constexpr;
* a constexpr: its value if it is an int, else ``(type, str(value))`` (Triton's key is the str of it);
* the launch options (``num_warps=...``) as ``(name, value)`` pairs in call order, as in Triton's key.

Anything else (an argument of another type, a parameter with an annotation, ``do_not_specialize``, a
callable grid, a kernel with ``debug`` or ``pre_run_hooks``, ``knobs.runtime.debug``, an instrumentation
mode, a non-empty launch enter/exit hook such as the profiler's, a global the kernel reads that is no longer
the object it was compiled with) takes Triton's normal path, unchanged, and so does every first call. A
cached launch passes no launch metadata and no hooks, which is what Triton's empty hook chains amount to.

With the variable unset (the default), or under ``TRITON_INTERPRET=1`` (where ``triton.jit`` makes no
``JITFunction``), :func:`cached_launch` returns the kernel itself: the default path costs nothing extra.

What is checked without a GPU (``tests/test_launch_cache.py``): that the launch key separates exactly the
argument sets Triton's binder and cache key separate, for real kernels of this package, and that the
argument tuple equals Triton's ``bound_args``; the hit/miss plumbing against a stand-in compiled kernel.
What needs a GPU (the ``gpu``-marked test there): the launch through the real CUDA launcher, bit-for-bit
against the normal path, including under CUDA-graph capture, and the host time it saves.
"""

from __future__ import annotations

import functools
import os

import torch

from .._backend import interpreting

ENV = "SSLFAST_LAUNCH_CACHE"
_ENABLED = os.environ.get(ENV, "0") == "1"
MAX_ENTRIES = 256  # per (kernel, device); past it a specialization keeps taking Triton's path


def enabled() -> bool:
    """Whether kernels decorated with :func:`cached_launch` take the cached path (``SSLFAST_LAUNCH_CACHE=1``
    at import, and not interpreting)."""
    return _ENABLED and not interpreting()


class _Uncacheable(Exception):
    """An argument the launch key does not model: the call takes Triton's path."""


_ONE = "constexpr-1"
_FP32 = "fp32"
_U1 = "u1"
_NONE = "constexpr-None"
_I32 = ("i32", False)
_I32_D = ("i32", True)
_I64 = ("i64", False)
_I64_D = ("i64", True)
_U64 = ("u64", False)
_U64_D = ("u64", True)


def _arg_key(x):
    """Launch-key part of a plain (unannotated, specialized, alignment-specialized) parameter's argument,
    mirroring `native_specialize_impl(backend, x, is_const=False, specialize=True, align=True)`."""
    if isinstance(x, torch.Tensor):
        return x.dtype, not x.data_ptr() & 15
    cls = x.__class__
    if cls is int:
        if x == 1:
            return _ONE
        if -0x80000000 <= x <= 0x7FFFFFFF:
            return _I32 if x & 15 else _I32_D
        if -0x8000000000000000 <= x <= 0x7FFFFFFFFFFFFFFF:
            return _I64 if x & 15 else _I64_D
        if 0 <= x <= 0xFFFFFFFFFFFFFFFF:
            return _U64 if x & 15 else _U64_D
        raise _Uncacheable
    if cls is float:
        return _FP32
    if cls is bool:
        return _U1
    if x is None:
        return _NONE
    raise _Uncacheable


def _constexpr_key(x):
    """Launch-key part of a non-int constexpr: Triton keys constexprs by their str (1.0 ≠ 1, True ≠ 1)."""
    return x.__class__, str(x)


_BOOL_KEYS = {True: (bool, "True"), False: (bool, "False")}  # = _constexpr_key of each, without the str()
_I32_KEYS = (_I32, _I32_D)


def make_binder(kernel):
    """The launch-key binder of a ``JITFunction``, or None where the key does not model its parameters.

    Args:
        kernel: a ``triton.runtime.jit.JITFunction``.

    Returns:
        A function of the launch's ``(*args, **kwargs)`` returning ``(key, bound)``: the launch key and every
        argument in parameter order (defaults applied), Triton's ``tuple(bound_args.values())``. It raises
        TypeError for arguments that do not bind and ``_Uncacheable`` for arguments the key does not model.
        None when a parameter is annotated (other than ``tl.constexpr``), ``do_not_specialize``d or
        ``do_not_specialize_on_alignment``ed.

    Each parameter's key part is an inline expression whose common cases (a plain tensor, a positive int32,
    an int or bool constexpr) cost no Python call; every other value goes to `_arg_key` / `_constexpr_key`,
    which give the same part the inline case would (so the two spellings never split one specialization).
    """
    names, parts = [], []
    namespace = {
        "_arg_key": _arg_key,
        "_constexpr_key": _constexpr_key,
        "_Tensor": torch.Tensor,
        "_BOOL_KEYS": _BOOL_KEYS,
        "_I32_KEYS": _I32_KEYS,
    }
    for param in kernel.params:
        name = param.name
        if param.is_constexpr:
            parts.append(
                f"({name} if {name}.__class__ is int else _BOOL_KEYS[{name}] if {name}.__class__ is bool"
                f" else _constexpr_key({name}))"
            )
        elif param.annotation or param.do_not_specialize or param.do_not_specialize_on_alignment:
            return None
        else:
            parts.append(
                f"(({name}.dtype, not {name}.data_ptr() & 15) if {name}.__class__ is _Tensor"
                f" else _I32_KEYS[not {name} & 15] if {name}.__class__ is int and 1 < {name} < 0x80000000"
                f" else _arg_key({name}))"
            )
        if param.has_default:
            namespace[f"default_{name}"] = param.default
            names.append(f"{name}=default_{name}")
        else:
            names.append(name)
    plain = [p.name for p in kernel.params]
    source = (
        f"def bind({', '.join([*names, '**options'])}):\n"
        f"    return ({''.join(p + ', ' for p in parts)}*options.items()), ({''.join(n + ', ' for n in plain)})\n"
    )
    exec(source, namespace)  # noqa: S102 - generated from the kernel's own signature, as Triton's binder is
    return namespace["bind"]


KERNELS: list = []  # every kernel `cached_launch` has seen, cached or not (measurements switch them: `switch`)


def cached_launch(kernel):
    """Decorator (outside ``@triton.jit``): route ``kernel[grid](...)`` through the launch cache when it is on.

    Args:
        kernel: what ``triton.jit`` returned.

    Returns:
        ``kernel`` itself when the cache is off (the default) or when interpreting; otherwise ``wrap(kernel)``.
    """
    KERNELS.append(kernel)
    return wrap(kernel) if enabled() else kernel


def switch(on: bool) -> None:
    """Put every kernel in `KERNELS` on the cached path (``on``) or back on Triton's, whatever
    ``SSLFAST_LAUNCH_CACHE`` said at import; the cache tables are kept. For measurements that compare the two
    paths in one process (``benchmarks/host_overhead.py --launch-path driver``)."""
    from triton.runtime.jit import JITFunction

    for kernel in KERNELS:
        if on and not hasattr(kernel, "_sslfast_tables"):
            wrap(kernel)
        elif hasattr(kernel, "_sslfast_tables"):
            kernel.__class__ = _cached_class() if on else JITFunction


def wrap(kernel):
    """Put a ``JITFunction`` on the cached launch path, whatever ``SSLFAST_LAUNCH_CACHE`` says.

    Args:
        kernel: what ``triton.jit`` returned.

    Returns:
        The same object, its ``kernel[grid]`` now cached; ``kernel`` unchanged when it is not a plain
        ``JITFunction`` (e.g. the interpreter's), has ``debug`` set, or has parameters the key does not model.
    """
    from triton.runtime.jit import JITFunction

    if type(kernel) is not JITFunction or kernel.debug:
        return kernel
    bind = make_binder(kernel)
    if bind is None:
        return kernel
    kernel._sslfast_bind = bind
    kernel._sslfast_tables = {}  # device -> {launch key: (compiled, launcher, function, packed metadata, globals)}
    kernel.__class__ = _cached_class()
    return kernel


@functools.lru_cache(maxsize=None)
def _cached_class():
    """`JITFunction` with `kernel[grid]` on the cached path (a subclass: `isinstance` and every attribute stay)."""
    from triton import knobs
    from triton.knobs import HookChain
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    runtime, compilation, missing = knobs.runtime, knobs.compilation, object()

    def idle(hook) -> bool:
        return hook is None or (hook.__class__ is HookChain and not hook.calls)

    def normal(kernel, grid, args, kwargs):
        return JITFunction.run(kernel, *args, grid=grid, warmup=False, **kwargs)

    def miss(kernel, grid, args, kwargs, key):
        compiled = normal(kernel, grid, args, kwargs)
        if compiled is None or callable(grid) or kernel.pre_run_hooks or runtime.debug:
            return compiled
        if compilation.instrumentation_mode or not (idle(runtime.launch_enter_hook) and idle(runtime.launch_exit_hook)):
            return compiled
        table = kernel._sslfast_tables.setdefault(driver.active.get_current_device(), {})
        if len(table) < MAX_ENTRIES:
            # Triton keeps a deep copy of each global the kernel read and compares with `!=` per launch; its
            # check just passed, so the objects bound now are the ones to hold on to (an identity check).
            used = tuple((g, name, g.get(name, missing)) for (name, _), (_, g) in kernel.used_global_vals.items())
            table[key] = (compiled, compiled.run, compiled.function, compiled.packed_metadata, used)
        return compiled

    def launch(kernel, grid, *args, **kwargs):
        try:
            key, bound = kernel._sslfast_bind(*args, **kwargs)
        except (_Uncacheable, TypeError):
            return normal(kernel, grid, args, kwargs)
        device = driver.active.get_current_device()
        table = kernel._sslfast_tables.get(device)
        entry = None if table is None else table.get(key)
        if entry is None:
            return miss(kernel, grid, args, kwargs, key)
        compiled, run, function, packed, used = entry
        enter, exit_ = runtime.launch_enter_hook, runtime.launch_exit_hook
        if (
            kernel.pre_run_hooks
            or runtime.debug
            or compilation.instrumentation_mode
            or not (enter is None or (enter.__class__ is HookChain and not enter.calls))
            or not (exit_ is None or (exit_.__class__ is HookChain and not exit_.calls))
            or callable(grid)
        ):
            return normal(kernel, grid, args, kwargs)
        for g, name, val in used:
            if g.get(name, missing) is not val:
                return normal(kernel, grid, args, kwargs)  # Triton's check raises if the value really changed
        n = len(grid)
        run(
            grid[0],
            grid[1] if n > 1 else 1,
            grid[2] if n > 2 else 1,
            driver.active.get_current_stream(device),
            function,
            packed,
            None,
            None,
            None,
            *bound,
        )
        return compiled

    class CachedJITFunction(JITFunction):
        """A `JITFunction` whose `kernel[grid](...)` takes the launch cache (module docstring)."""

        def __getitem__(self, grid):
            return functools.partial(launch, self, grid)

    return CachedJITFunction
