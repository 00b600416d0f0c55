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
With Triton 3.6's CUDA launcher and a kernel that needs no scratch buffer, the call goes one step further in,
to the launcher's C entry point, with the arguments its Python ``__call__`` would pass (`_entry`). Binding,
key, guards and launch are one function per kernel, generated from its signature (`make_launcher`).

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
argument tuple equals Triton's ``bound_args``; the hit/miss plumbing against a stand-in compiled kernel; and,
on every kernel compiled for sm_90 with a stub driver (`_stub_driver`: only the C launcher is replaced), that
each launch reaches the launcher with the compiled kernel, grid, metadata and argument objects Triton's path
gives it, and that a repeated launch never re-enters Triton's path. The host cost per launch of both paths
is measured the same way (``benchmarks/host_overhead.py --launch-path driver``). What needs a GPU (the
``gpu``-marked tests there): the launch through the real C launcher and driver, bit-for-bit against the normal
path, including under CUDA-graph capture, and the wall time it saves.
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


def _signature(kernel):
    """(parameter list with defaults, key-part expressions, parameter names, namespace) of a kernel's generated
    binder and launcher, or None where the key does not model a parameter (`make_binder`)."""
    params, parts = [], []
    namespace = {
        "_arg_key": _arg_key,
        "_constexpr_key": _constexpr_key,
        "_Tensor": torch.Tensor,
        "_BOOL_KEYS": _BOOL_KEYS,
        "_I32_KEYS": _I32_KEYS,
    }
    for param in kernel.params:
        name = param.name
        if name.startswith("_sslfast_"):
            return None  # the generated launcher's own names
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
            namespace[f"_sslfast_default_{name}"] = param.default
            params.append(f"{name}=_sslfast_default_{name}")
        else:
            params.append(name)
    return params, parts, [p.name for p in kernel.params], namespace


def _compile(source: str, namespace: dict, name: str):
    exec(source, namespace)  # noqa: S102 - generated from the kernel's own signature, as Triton's binder is
    return namespace[name]


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
    The launcher (`make_launcher`) computes the same key with the same expressions.
    """
    signature = _signature(kernel)
    if signature is None:
        return None
    params, parts, names, namespace = signature
    source = (
        f"def bind({', '.join([*params, '**options'])}):\n"
        f"    return ({''.join(p + ', ' for p in parts)}*options.items()), ({''.join(n + ', ' for n in names)})\n"
    )
    return _compile(source, namespace, "bind")


def make_launcher(kernel, tables: dict, slow):
    """The cached launch of one ``JITFunction``: a function of ``(grid, *args, **kwargs)``, generated from the
    kernel's signature so that binding, key and launch are one Python call, or None (as `make_binder`).

    Args:
        kernel: the ``JITFunction``.
        tables: device -> {launch key: `_entry`}, filled by `slow`.
        slow: ``slow(kernel, grid, kwargs, key)``: Triton's path for this launch (every argument by name in
            ``kwargs``); ``key`` is None where the launch must not be cached.
    """
    signature = _signature(kernel)
    if signature is None:
        return None
    params, parts, names, namespace = signature
    from triton import knobs
    from triton.knobs import HookChain
    from triton.runtime.driver import driver

    namespace.update(
        _sslfast_kernel=kernel,
        _sslfast_tables=tables,
        _sslfast_slow=slow,
        _sslfast_driver=driver,
        _sslfast_runtime=knobs.runtime,
        _sslfast_compilation=knobs.compilation,
        _sslfast_HookChain=HookChain,
        _sslfast_missing=_MISSING,
        _sslfast_Uncacheable=_Uncacheable,
        _sslfast_empty={},
    )
    # Every name of the generated function other than the kernel's parameters starts with `_sslfast_`, which
    # `_signature` refuses as a parameter name: a local must never shadow an argument.
    by_name = "{" + "".join(f"{n!r}: {n}, " for n in names) + "**_sslfast_options}"
    slow_call = f"_sslfast_slow(_sslfast_kernel, _sslfast_grid, {by_name}"
    args = "".join(f", {n}" for n in names)
    source = f"""\
def launch(_sslfast_grid, {", ".join([*params, "**_sslfast_options"])}):
    try:
        _sslfast_key = ({"".join(p + ", " for p in parts)}*_sslfast_options.items())
    except _sslfast_Uncacheable:
        return {slow_call}, None)
    if (
        _sslfast_kernel.pre_run_hooks
        or _sslfast_runtime.debug
        or _sslfast_compilation.instrumentation_mode
        or not (
            (_sslfast_hook := _sslfast_runtime.launch_enter_hook) is None
            or _sslfast_hook.__class__ is _sslfast_HookChain and not _sslfast_hook.calls
        )
        or not (
            (_sslfast_hook := _sslfast_runtime.launch_exit_hook) is None
            or _sslfast_hook.__class__ is _sslfast_HookChain and not _sslfast_hook.calls
        )
        or callable(_sslfast_grid)
    ):
        return {slow_call}, None)
    _sslfast_active = _sslfast_driver.active
    _sslfast_device = _sslfast_active.get_current_device()
    _sslfast_entry = _sslfast_tables.get(_sslfast_device, _sslfast_empty).get(_sslfast_key)
    if _sslfast_entry is None:
        return {slow_call}, _sslfast_key)
    _sslfast_compiled, _sslfast_launcher, _sslfast_direct, _sslfast_head, _sslfast_used = _sslfast_entry
    for _sslfast_globals, _sslfast_name, _sslfast_value in _sslfast_used:
        if _sslfast_globals.get(_sslfast_name, _sslfast_missing) is not _sslfast_value:
            return {slow_call}, None)  # Triton's check raises if the value really changed
    _sslfast_n = len(_sslfast_grid)
    _sslfast_launcher(
        _sslfast_grid[0],
        _sslfast_grid[1] if _sslfast_n > 1 else 1,
        _sslfast_grid[2] if _sslfast_n > 2 else 1,
        _sslfast_active.get_current_stream(_sslfast_device),
        *_sslfast_head{args}
    )
    return _sslfast_compiled
"""
    return _compile(source, namespace, "launch")


_MISSING = object()


@functools.lru_cache(maxsize=None)
def _direct_launcher_class():
    """Triton's CUDA launcher class when its ``__call__`` is the one `_entry` mirrors (Triton 3.6: scratch
    buffers allocated when the kernel asks for them, then ``self.launch(gx, gy, gz, stream, function,
    cooperative, pdl, global scratch, profile scratch, *args)``), else None."""
    import triton

    if not triton.__version__.startswith("3.6."):
        return None
    from triton.backends.nvidia.driver import CudaLauncher

    return CudaLauncher


def _entry(compiled, used) -> tuple:
    """A table entry, ``(compiled, launcher, direct, head, used)``: the launcher is called as
    ``launcher(gx, gy, gz, stream, *head, *args)``. A kernel that needs no scratch buffer, launched by Triton
    3.6's CUDA launcher, goes through the launcher's C entry point directly (what its Python ``__call__``
    would do, minus a Python frame and two closures); any other through the launcher object."""
    run, launcher_class = compiled.run, _direct_launcher_class()
    function, packed = compiled.function, compiled.packed_metadata
    if (
        launcher_class is not None
        and isinstance(run, launcher_class)
        and type(run).__call__ is launcher_class.__call__
        and not run.global_scratch_size
        and not run.profile_scratch_size
    ):
        head = (function, run.launch_cooperative_grid, run.launch_pdl, None, None, packed, None, None, None)
        return compiled, run.launch, True, head, used
    return compiled, run, False, (function, packed, None, None, None), used


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
    tables = {}  # device -> {launch key: `_entry`}
    launch = make_launcher(kernel, tables, _slow)
    if launch is None:
        return kernel
    kernel._sslfast_launch = launch
    kernel._sslfast_tables = tables
    kernel.__class__ = _cached_class()
    return kernel


def _slow(kernel, grid, kwargs, key):
    """Triton's path for one launch; where `key` is given (a launch the cache may take), the compiled kernel is
    then remembered under it."""
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    compiled = JITFunction.run(kernel, grid=grid, warmup=False, **kwargs)
    if key is None or compiled is None:
        return compiled
    table = kernel._sslfast_tables.setdefault(driver.active.get_current_device(), {})
    if len(table) < MAX_ENTRIES:
        # Triton keeps a deep copy of each global the kernel read and compares with `!=` per launch; its check
        # just passed, so the objects bound now are the ones to hold on to (an identity check).
        used = tuple((g, name, g.get(name, _MISSING)) for (name, _), (_, g) in kernel.used_global_vals.items())
        table[key] = _entry(compiled, used)
    return compiled


@functools.lru_cache(maxsize=None)
def _cached_class():
    """`JITFunction` with `kernel[grid]` on the cached path (a subclass: `isinstance` and every attribute stay)."""
    from triton.runtime.jit import JITFunction

    class CachedJITFunction(JITFunction):
        """A `JITFunction` whose `kernel[grid](...)` takes the launch cache (module docstring)."""

        def __getitem__(self, grid):
            return functools.partial(self._sslfast_launch, grid)

    return CachedJITFunction
