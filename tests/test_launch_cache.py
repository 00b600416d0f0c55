"""The cached launch path (`sslfast.kernels._launch`) against Triton's own binder, cache key and launch.

On the CPU: launches of the real MAE / Barlow Twins / DINO kernels are recorded under the interpreter, then
varied one argument at a time (dtype, 16-byte alignment, ints of value 1 / multiples of 16 / others / i64 /
u64, floats, constexprs, launch options); the launch key must separate exactly the variants Triton's binder
and `compute_cache_key` separate, and the bound arguments must be Triton's `bound_args`, in order. The hit
and miss plumbing runs against a stand-in driver and compiled kernel. On CUDA (`gpu`): every recorded launch
is replayed through the cached path (a miss, then a hit, then a hit captured in a CUDA graph) and must write
bit-for-bit what the normal path wrote.
"""

from __future__ import annotations

import collections
import itertools

import pytest
import torch

pytest.importorskip("triton")

from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import CUDABackend  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402
from triton.runtime.jit import JITFunction, compute_cache_key, create_function_from_signature  # noqa: E402

import sslfast as sf  # noqa: E402
from sslfast import mae  # noqa: E402
from sslfast.kernels import _launch  # noqa: E402

_MODULES = ("sslfast.kernels.mae", "sslfast.kernels.barlow", "sslfast.kernels.dino")


def _run_ops():
    """Small calls of the ops whose kernels are routed through the launch cache (forward and backward)."""
    z1, z2 = (torch.randn(10, 24, requires_grad=True) for _ in range(2))
    sf.barlow_twins_loss(z1, z2).backward()
    sf.vicreg_loss(z1, z2).backward()
    student = torch.randn(6 * 3, 40, requires_grad=True)
    sf.dino_loss(student, torch.randn(2 * 3, 40), torch.randn(1, 40)).backward()
    b, L, d, p, c = 2, 16, 12, 4, 3
    m = mae.random_masking(b, L, 0.75)
    x = torch.randn(b, L, d, requires_grad=True)
    mae.gather_tokens(x, m.ids_keep).sum().backward()
    imgs = torch.randn(b, c, 16, 16)
    mae.gather_patches(imgs, m.ids_keep, p)
    pred = torch.randn(b, L, p * p * c, requires_grad=True)
    mae.masked_mse_loss(pred, imgs, m.mask, p).backward()


def _record(monkeypatch, run_name: str, cls) -> list:
    """Run the ops, recording (kernel function, grid, args, kwargs) of each launch of the routed kernels."""
    seen, run = [], getattr(cls, run_name)

    def recording(self, *args, grid, warmup, **kwargs):
        if self.fn.__module__ in _MODULES:
            seen.append((self.fn, grid, args, dict(kwargs)))
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(cls, run_name, recording)
    monkeypatch.setenv("SSLFAST_BACKEND", "triton")
    _run_ops()
    monkeypatch.undo()
    return seen


@pytest.fixture(scope="module")
def launches():
    from sslfast._backend import interpreting

    if not interpreting():
        pytest.skip("records launches under TRITON_INTERPRET=1")
    from triton.runtime.interpreter import InterpretedFunction

    with pytest.MonkeyPatch.context() as mp:
        seen = _record(mp, "run", InterpretedFunction)
    names = {fn.__name__ for fn, *_ in seen}
    assert len(names) >= 12, names  # the MAE, Barlow Twins and DINO kernels all launched
    return seen


def _int_values():
    return [1, 0, 16, 17, 48, -16, -3, 2**31 - 1, 2**31, 2**31 + 16, -(2**31), -(2**31) - 16, 2**63 + 16, 2**63 + 5]


def _variants(jf, args, kwargs):
    """(args, kwargs) of the recorded launch, then each with one argument or option changed."""
    bound = dict(zip(jf.arg_names, args))
    bound.update({k: v for k, v in kwargs.items() if k in jf.arg_names})
    options = {k: v for k, v in kwargs.items() if k not in jf.arg_names}
    yield bound, options
    for param in jf.params:
        value = bound[param.name]
        if param.is_constexpr:
            alts = [True, 1, 1.0, None] if isinstance(value, bool) else [value, 1.0 * value, value + 1, None]
            alts = alts if isinstance(value, (int, float)) else [None]
        elif isinstance(value, torch.Tensor):
            n = value.numel()
            alts = [value.clone(), torch.empty(n + 1, dtype=value.dtype)[1:], torch.empty(n + 4, dtype=value.dtype)[4:]]
            alts += [value.to(dt) for dt in (torch.float16, torch.bfloat16, torch.int32) if dt != value.dtype]
        elif isinstance(value, bool):
            alts = [not value, 1]
        elif isinstance(value, int):
            alts = _int_values()
        else:
            alts = [0.5, 3.0, 1, 16, True]
        for alt in alts:
            yield {**bound, param.name: alt}, options
    for warps in (1, 2, 8):
        yield bound, {**options, "num_warps": warps}
    yield bound, {**options, "num_stages": 3}


def test_key_separates_exactly_what_triton_separates(launches):
    """Per kernel: Triton's cache key and the launch key induce the same partition of the variants, and the
    launch's argument tuple is Triton's `bound_args`, element for element."""
    backend = CUDABackend(GPUTarget("cuda", 90, 32))
    by_kernel = collections.defaultdict(list)
    for fn, _, args, kwargs in launches:
        by_kernel[fn].append((args, kwargs))
    for fn, calls in by_kernel.items():
        jf = JITFunction(fn)
        triton_bind = create_function_from_signature(jf.signature, jf.params, backend)
        ours = _launch.make_binder(jf)
        assert ours is not None, fn.__name__
        groups_t, groups_o = collections.defaultdict(set), collections.defaultdict(set)
        for args, kwargs in calls:
            for i, (bound, options) in enumerate(_variants(jf, args, kwargs)):
                t_kwargs = {**bound, **options}
                t_kwargs["debug"] = t_kwargs.get("debug", jf.debug) or knobs.runtime.debug  # as JITFunction.run
                t_kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
                t_bound, spec, t_options = triton_bind(**t_kwargs)
                t_key = compute_cache_key({}, spec, t_options)
                key, ours_bound = ours(**bound, **options)
                assert len(ours_bound) == len(t_bound), fn.__name__
                assert all(a is b for a, b in zip(ours_bound, t_bound.values(), strict=True)), fn.__name__
                # the cached path skips the debug / instrumentation options only while both are off
                assert t_options["debug"] is False and t_options["instrumentation_mode"] == ""
                groups_t[t_key].add(key)
                groups_o[key].add(t_key)
        merged = [k for k, v in groups_t.items() if len(v) > 1]
        split = [k for k, v in groups_o.items() if len(v) > 1]
        assert not split, f"{fn.__name__}: one launch key covers several Triton keys: {split[:2]}"
        assert not merged, f"{fn.__name__}: one Triton key has several launch keys: {merged[:2]}"
        assert len(groups_t) > 10, fn.__name__  # the variants did reach different specializations


def test_key_classes_of_ints_and_tensors():
    """The launch key of one argument against `native_specialize_impl`, value by value."""
    from triton._C.libtriton import native_specialize_impl

    backend = CUDABackend(GPUTarget("cuda", 90, 32))
    x = torch.randn(40)
    values = [*_int_values(), 0.25, float("nan"), True, False, None, x, x[1:], x[4:], x.half(), x.long()[3:]]
    ours = collections.defaultdict(set)
    for v in values:
        ours[_launch._arg_key(v)].add(native_specialize_impl(backend, v, False, True, True))
    assert all(len(v) == 1 for v in ours.values()), ours
    assert len(ours) == len({next(iter(v)) for v in ours.values()})
    for bad in (2**64, -(2**63) - 1, "s", (1, 2)):
        with pytest.raises(_launch._Uncacheable):
            _launch._arg_key(bad)


def test_off_by_default_and_under_the_interpreter(launches):
    """Unset (and always under TRITON_INTERPRET) the decorator hands the kernel back: the default launch path
    is Triton's, with no added call."""
    from sslfast.kernels import barlow, dino
    from sslfast.kernels import mae as kmae

    assert not _launch.enabled()
    sentinel = object()
    assert _launch.cached_launch(sentinel) is sentinel
    for module in (kmae, barlow, dino):
        for name in dir(module):
            obj = getattr(module, name)
            assert not hasattr(obj, "_sslfast_tables"), name


class _FakeCompiled:
    def __init__(self, calls):
        self.calls, self.function, self.packed_metadata = calls, "FUNCTION", ("PACKED",)

    def run(self, *launch):
        self.calls.append(launch)


def test_hit_launches_what_the_normal_path_launches(monkeypatch, launches):
    """A stand-in for `JITFunction.run` (Triton's binder, one compiled kernel per Triton key, and the launch
    Triton makes); the second identical call must reach the same launcher with the same grid, stream,
    handle, packed metadata and arguments, without the normal path; a new specialization, an active launch
    hook or a callable grid must take the normal path."""
    fn, grid, args, kwargs = next(item for item in launches if item[0].__name__ == "_columns_kernel")
    jf = _launch.wrap(JITFunction(fn))
    assert isinstance(jf, JITFunction) and hasattr(jf, "_sslfast_tables")
    backend, calls, compiled, normal = CUDABackend(GPUTarget("cuda", 90, 32)), [], {}, []
    binder = create_function_from_signature(jf.signature, jf.params, backend)

    def fake_run(self, *a, grid, warmup, **kw):
        bound, spec, options = binder(*a, **kw)
        kernel = compiled.setdefault(compute_cache_key({}, spec, options), _FakeCompiled(calls))
        normal.append(kernel)
        g = grid(bound) if callable(grid) else grid
        kernel.run(g[0], g[1] if len(g) > 1 else 1, g[2] if len(g) > 2 else 1, 7, kernel.function,
                   kernel.packed_metadata, None, None, None, *bound.values())  # fmt: skip
        return kernel

    class FakeDriver:
        get_current_device = staticmethod(lambda: 0)
        get_current_stream = staticmethod(lambda device: 7)

    monkeypatch.setattr(JITFunction, "run", fake_run)
    monkeypatch.setattr(driver, "_active", FakeDriver())
    assert jf[grid](*args, **kwargs) is normal[-1] and len(normal) == 1  # miss: the normal path
    assert jf[grid](*args, **kwargs) is normal[-1] and len(normal) == 1  # hit
    assert len(calls) == 2 and calls[0] == calls[1]
    assert all(a is b for a, b in zip(calls[0], calls[1], strict=True))
    odd = [torch.empty(a.numel() + 1, dtype=a.dtype)[1:] if isinstance(a, torch.Tensor) else a for a in args]
    jf[grid](*odd, **kwargs)
    assert len(normal) == 2  # a new specialization (misaligned tensors) compiles through the normal path
    hook = knobs.runtime.launch_enter_hook
    monkeypatch.setattr(hook, "calls", [lambda metadata: None])
    jf[grid](*args, **kwargs)
    assert len(normal) == 3  # a profiler-style hook is honoured by the normal path
    monkeypatch.setattr(hook, "calls", [])
    jf[lambda meta: grid](*args, **kwargs)
    assert len(normal) == 4
    jf[grid](*args, **kwargs)
    assert len(normal) == 4 and len(calls) == 6 and calls[-1] == calls[0]


@pytest.mark.gpu
def test_cached_launch_matches_normal_launch_on_cuda(monkeypatch):
    """Every recorded launch, replayed on copies of its inputs through the normal path and through the cache
    (a miss, a hit, and a hit captured in a CUDA graph), writes the same bits."""
    seen = []
    run = JITFunction.run

    def recording(self, *args, grid, warmup, **kwargs):
        if self.fn.__module__ in _MODULES and not warmup:
            seen.append((self.fn, grid, [a.clone() if isinstance(a, torch.Tensor) else a for a in args], kwargs))
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(JITFunction, "run", recording)
    torch.set_default_device("cuda")
    try:
        _run_ops()
    finally:
        torch.set_default_device(None)
        monkeypatch.undo()
    assert len({fn for fn, *_ in seen}) >= 12
    kernels = {}
    for fn, grid, args, kwargs in seen:
        jf = kernels.setdefault(fn, _launch.wrap(JITFunction(fn)))
        assert hasattr(jf, "_sslfast_tables")
        want = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
        JITFunction.run(jf, *want, grid=grid, warmup=False, **kwargs)
        for attempt in range(3):
            got = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
            if attempt < 2:
                jf[grid](*got, **kwargs)
            else:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    jf[grid](*got, **kwargs)
                graph.replay()
            torch.cuda.synchronize()
            for a, b in itertools.zip_longest(want, got):
                if isinstance(a, torch.Tensor):
                    assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), fn.__name__
        assert jf._sslfast_tables, fn.__name__
