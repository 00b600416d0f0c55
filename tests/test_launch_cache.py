"""The cached launch path (`sslfast.kernels._launch`) against Triton's own binder, cache key and launch.

On the CPU: launches of the real kernels of every op family are recorded under the interpreter, then
varied one argument at a time (dtype, 16-byte alignment, ints of value 1 / multiples of 16 / others / i64 /
u64, floats, constexprs, launch options); the launch key must separate exactly the variants Triton's binder
and `compute_cache_key` separate, and the bound arguments must be Triton's `bound_args`, in order. The hit
and miss plumbing runs against a stand-in driver and compiled kernel. On CUDA (`gpu`): every recorded launch
is replayed through the cached path (a miss, then a hit, then a hit captured in a CUDA graph) and must write
bit-for-bit what the normal path wrote, and a representative call of each op family must give the same
results with the cache on and off. The kernels covered are every `@cached_launch` kernel of the package,
found in its source; a launched `@triton.jit` kernel left undecorated, or a decorated one no op call here
launches, fails the tests.
"""

from __future__ import annotations

import ast
import collections
import importlib
import itertools
import os
import subprocess
import sys
from pathlib import Path

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


def _decorated() -> list[str]:
    """ "module.kernel" of every `@cached_launch` kernel of the kernels package, read from the source (with the
    cache off the decorator hands the kernel back unmarked); fails on a misplaced decorator, a decorated
    helper, or a launched `@triton.jit` kernel left undecorated."""
    found = []
    for path in sorted(Path(_launch.__file__).parent.glob("*.py")):
        module = f"sslfast.kernels.{path.stem}"
        tree = ast.parse(path.read_text())
        jitted = {node.name for node in tree.body if isinstance(node, ast.FunctionDef) and _jit_index(node) >= 0}
        launched = {
            node.func.value.id
            for node in ast.walk(tree)
            if isinstance(node, ast.Call)
            and isinstance(node.func, ast.Subscript)
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id in jitted
        }
        for node in tree.body:
            if not isinstance(node, ast.FunctionDef):
                continue
            names = [_decorator_name(d) for d in node.decorator_list]
            if "cached_launch" in names:
                assert names.index("cached_launch") == _jit_index(node) - 1, f"{module}.{node.name}: decorator order"
                assert node.name in launched, f"{module}.{node.name}: a device helper must not be decorated"
                found.append(f"{module}.{node.name}")
            elif node.name in launched:
                raise AssertionError(f"{module}.{node.name} is launched but not on the cached launch path")
    return found


def _decorator_name(node) -> str:
    node = node.func if isinstance(node, ast.Call) else node
    return node.attr if isinstance(node, ast.Attribute) else getattr(node, "id", "")


def _jit_index(node) -> int:
    names = [_decorator_name(d) for d in node.decorator_list]
    return names.index("jit") if "jit" in names else -1


DECORATED = _decorated()
_MODULES = frozenset(name.rpartition(".")[0] for name in DECORATED)


def _qualname(fn) -> str:
    return f"{fn.__module__}.{fn.__name__}"


def _run_ops():
    """Small calls of every op family whose kernels are routed through the launch cache (forward and
    backward), reaching each decorated kernel at least once (`launches` checks it)."""
    from sslfast.kernels import _common, barlow

    z1, z2 = (torch.randn(10, 24, requires_grad=True) for _ in range(2))
    sf.barlow_twins_loss(z1, z2).backward()
    sf.vicreg_loss(z1, z2, algorithm="tiled").backward()
    forced, barlow.GRAM_FORWARD = barlow.GRAM_FORWARD, "triton"  # the symmetric dual-Gram kernel
    try:
        sf.barlow_twins_loss(z1, z2).backward()
    finally:
        barlow.GRAM_FORWARD = forced
    _common.scale_unless_one_(torch.randn(37), torch.tensor(2.0))  # large gradients' in-place scaling
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
    with sf.separate_backward():
        mae.masked_mse_loss(pred, imgs, m.mask, p).backward()
    mae.bert_masking(torch.randint(5, 50, (3, 17)), 1, 50)
    _run_contrastive()
    _run_prototypes()
    _run_augment()


def _run_contrastive():
    """InfoNCE (NT-Xent, MoCo with and without a queue, CLIP bounded and at a scale that underflows column
    sums), SigLIP and KoLeo."""
    from sslfast.kernels import infonce

    z1, z2 = (torch.randn(9, 20, requires_grad=True) for _ in range(2))
    sf.nt_xent_loss(z1, z2, 0.5).backward()
    sf.info_nce_loss(z1, z2, torch.randn(11, 20), 0.2).backward()
    sf.info_nce_loss(z1, z2, None, 0.2).backward()
    scale = torch.tensor(20.0, requires_grad=True)
    sf.clip_loss(z1, z2, scale).backward()
    img, txt = torch.randn(37, 48), torch.randn(37, 48)
    near = [*range(16), 30]
    txt[near] = img[[(j + 1) % 37 for j in near]] + 1e-3 * torch.randn(len(near), 48)
    img.requires_grad_(True)
    sf.clip_loss(img, txt, torch.tensor(1e4, requires_grad=True)).backward()
    sf.siglip_loss(z1, z2, torch.tensor(10.0, requires_grad=True), torch.tensor(-10.0, requires_grad=True)).backward()
    sf.koleo_loss(torch.randn(13, 20, requires_grad=True)).backward()
    x = torch.randn(9, 20)
    infonce._unit_rows(x, infonce.row_rnorm(x))  # 16-bit tile operands of fp32 inputs (a GPU's default)


def _run_prototypes():
    """SwAV, Sinkhorn-Knopp, iBOT and the prototype cross-entropy (student and teacher sides)."""
    scores = torch.randn(4 * 3, 30, requires_grad=True)
    sf.swav_loss(scores, torch.softmax(torch.randn(2 * 3, 30), 1), num_global_crops=2).backward()
    sf.sinkhorn_knopp(torch.randn(7, 30), 0.05, 2)
    s = torch.randn(2, 9, 30, requires_grad=True)
    sf.ibot_patch_loss(s, torch.softmax(torch.randn(2, 9, 30), -1), torch.rand(2, 9) < 0.5).backward()
    feats, w = torch.randn(11, 16, requires_grad=True), torch.randn(23, 16, requires_grad=True)
    probs = sf.prototype_teacher_probs(feats.detach(), w.detach(), teacher_temp=0.04, center=torch.zeros(23))
    sf.prototype_cross_entropy(feats, w, probs, student_temp=0.1).backward()


def _run_augment():
    """The fused multi-view augmentation with its blur pass, and the standalone blur."""
    from sslfast.data import presets
    from sslfast.ops import augment as aug

    imgs = [torch.randint(0, 256, (h, w, 3), dtype=torch.uint8) for h, w in ((21, 17), (9, 30))]
    flat, offs, sizes = aug.pack_images(imgs, chw=False)
    params = aug.sample_view_params(presets.ViewSpec(blur_p=1.0), sizes, count=2)
    aug.augment_views(flat, offs, sizes, params, (11, 9), blur_kernel=5)
    aug.gaussian_blur(torch.rand(2, 3, 10, 9), torch.tensor([0.5, 1.5]), 5)


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
    missing = set(DECORATED) - {_qualname(fn) for fn, *_ in seen}
    assert not missing, f"decorated kernels `_run_ops` does not launch (extend it): {sorted(missing)}"
    return seen


def test_every_launched_kernel_is_decorated():
    """The scan itself: every family's kernels are on the cached path (a new kernel module is picked up)."""
    assert len(DECORATED) >= 45, DECORATED
    families = {"mae", "barlow", "dino", "infonce", "siglip", "koleo", "sinkhorn", "swav", "ibot", "prototype_ce"}
    assert {f"sslfast.kernels.{f}" for f in families | {"augment", "_common"}} <= _MODULES


_CALLS = 4  # recorded launches per kernel whose variants are checked (the first ones, in launch order)


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


@pytest.mark.parametrize("kernel", DECORATED)
def test_key_separates_exactly_what_triton_separates(launches, kernel):
    """Per decorated kernel: Triton's cache key and the launch key induce the same partition of the variants of
    its recorded launches (up to `_CALLS` distinct ones), and the launch's argument tuple is Triton's
    `bound_args`, element for element."""
    backend = CUDABackend(GPUTarget("cuda", 90, 32))
    by_kernel = collections.defaultdict(list)
    for fn, _, args, kwargs in launches:
        if _qualname(fn) == kernel and len(by_kernel[fn]) < _CALLS:
            by_kernel[fn].append((args, kwargs))
    assert len(by_kernel) == 1, kernel
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
    assert not _launch.enabled()
    sentinel = object()
    assert _launch.cached_launch(sentinel) is sentinel
    for name in DECORATED:
        module, _, attr = name.rpartition(".")
        obj = getattr(importlib.import_module(module), attr)
        assert not hasattr(obj, "_sslfast_tables") and type(obj).__name__ != "CachedJITFunction", name


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


def stub_driver_check():
    """The body of `test_cached_path_on_compiled_kernels`, run in a process without the interpreter (the test
    suite's processes interpret, and a process cannot switch: `triton.jit` reads the variable at import)."""
    from sslfast._backend import interpreting
    from sslfast.kernels._stub_driver import stub_driver

    assert not interpreting() and not _launch.enabled()
    seen, triton_run, triton_calls = [], JITFunction.run, []

    def recording(self, *args, grid, warmup, **kwargs):
        if self.fn.__module__ in _MODULES:
            seen.append((self, grid, args, kwargs))
        return triton_run(self, *args, grid=grid, warmup=warmup, **kwargs)

    def counting(self, *args, **kwargs):
        triton_calls.append(self)
        return triton_run(self, *args, **kwargs)

    def shape(launch):
        """A launch with each tensor argument read as what its specialization and kernel see of it."""
        args = tuple(
            (a.dtype, a.shape, a.stride(), a.data_ptr() % 16 == 0) if isinstance(a, torch.Tensor) else (type(a), a)
            for a in launch.args
        )
        return launch.kernel, launch.function, launch.grid, args, launch.packed_metadata

    with stub_driver(record=True) as launches:
        JITFunction.run = recording
        try:
            torch.manual_seed(0)
            _run_ops()
        finally:
            JITFunction.run = triton_run
        want = list(launches)
        missing = set(DECORATED) - {_qualname(jf.fn) for jf, *_ in seen}
        assert not missing, f"decorated kernels `_run_ops` does not launch: {sorted(missing)}"
        assert len(want) == len(seen)
        for qual in DECORATED:  # in place, as SSLFAST_LAUNCH_CACHE=1 does at import
            module, _, attr = qual.rpartition(".")
            assert hasattr(_launch.wrap(getattr(importlib.import_module(module), attr)), "_sslfast_tables"), qual

        # Each recorded launch, on the very same arguments: Triton's path, then the cache (a miss or a hit, then
        # a hit) must reach the launcher with the same compiled kernel, grid, metadata and argument objects.
        JITFunction.run = counting
        try:
            for jf, grid, args, kwargs in seen:
                launches.clear()
                triton_run(jf, *args, grid=grid, warmup=False, **kwargs)
                jf[grid](*args, **kwargs)
                del triton_calls[:]
                jf[grid](*args, **kwargs)
                assert not triton_calls, f"{jf.fn.__name__}: a repeated launch took Triton's path"
                normal, *cached = launches
                assert len(cached) == 2, jf.fn.__name__
                for c in cached:
                    assert (c.kernel, c.function, c.grid) == (normal.kernel, normal.function, normal.grid)
                    assert c.packed_metadata is normal.packed_metadata, jf.fn.__name__
                    assert len(c.args) == len(normal.args), jf.fn.__name__
                    assert all(a is b for a, b in zip(c.args, normal.args)), jf.fn.__name__
                # a hit passes no hooks: the launcher skips None, and Triton's chains are empty (nothing profiles)
                assert cached[1].hooks == (None, None, None), jf.fn.__name__
                assert all(h is None or not h.calls for h in normal.hooks[1:]), jf.fn.__name__

            # Whole op calls with the cache on: the launches of the cache-off run, and none through Triton's
            # path once every specialization has been seen.
            for attempt in range(2):
                launches.clear()
                del triton_calls[:]
                torch.manual_seed(0)
                _run_ops()
                assert [shape(x) for x in launches] == [shape(x) for x in want], f"attempt {attempt}"
            assert not triton_calls, sorted({jf.fn.__name__ for jf in triton_calls})
            # and every launch went to the launcher's C entry point directly (no kernel here needs scratch)
            for jf, *_ in seen:
                entries = [e for table in jf._sslfast_tables.values() for e in table.values()]
                assert entries and all(direct for _, _, direct, _, _ in entries), jf.fn.__name__
        finally:
            JITFunction.run = triton_run

        # Each op family's representative call in bf16 and fp16: their kernels compile for sm_90 too (GPU
        # block sizes; the interpreter compiles nothing), with the cache on.
        compiled16 = set()
        JITFunction.run = recording
        try:
            for dtype in (torch.bfloat16, torch.float16):
                for name, call in _family_calls("cpu", dtype).items():
                    launches.clear()
                    del seen[:]
                    call()
                    assert launches.count > 0, (name, dtype)
                    compiled16.update(_qualname(jf.fn) for jf, *_ in seen)
        finally:
            JITFunction.run = triton_run
    print(f"stub driver: {len(want)} launches of {len(DECORATED)} kernels checked; {len(compiled16)} in 16 bits")


def test_cached_path_on_compiled_kernels():
    """Without a GPU, on kernels compiled for sm_90 by Triton's own backend and launched through its whole
    Python launch path, with only the C launcher replaced by a recorder (`sslfast.kernels._stub_driver`):
    every launch `_run_ops` makes, replayed on the same arguments through Triton's path and then the cache,
    reaches the launcher with the same compiled kernel, grid, packed metadata and argument objects; the
    second launch of a specialization never re-enters Triton's path (a global the kernel reads, which
    Triton deep-copies, once sent every such launch back there); and the ops issue the same launches with
    the cache on as off. It also compiles every decorated kernel for Hopper, which the interpreter never does,
    and each op family's representative call (`_family_calls`) in bf16 and fp16."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "SSLFAST_POISON", _launch.ENV)}
    env["SSLFAST_BACKEND"] = "triton"
    code = "import test_launch_cache as t; t.stub_driver_check()"
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=Path(__file__).parent, env=env, capture_output=True, text=True, timeout=1200
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert f"launches of {len(DECORATED)} kernels checked" in proc.stdout, proc.stdout[-2000:]


def _uses_atomics(fn) -> bool:
    """Whether the kernel, or a `@triton.jit` helper of its module it calls (transitively), adds atomically:
    the order of its atomic adds differs from run to run, so its fp32 outputs do too, cache or not."""
    tree = ast.parse(Path(importlib.import_module(fn.__module__).__file__).read_text())
    defs = {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}
    todo, seen = [fn.__name__], set()
    while todo:
        name = todo.pop()
        if name in seen or name not in defs:
            continue
        seen.add(name)
        for node in ast.walk(defs[name]):
            if isinstance(node, ast.Attribute) and node.attr.startswith("atomic_"):
                return True
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                todo.append(node.func.id)
    return False


def _assert_same(want, got, exact: bool, what: str):
    """Bit for bit, or (`exact` False: atomically summed outputs) to fp32 rounding of a reordered sum."""
    for a, b in itertools.zip_longest(want, got):
        if not isinstance(a, torch.Tensor):
            continue
        if exact or not a.is_floating_point():
            assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), what
        else:
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, equal_nan=True, msg=what)


@pytest.mark.gpu
def test_cached_launch_matches_normal_launch_on_cuda(monkeypatch):
    """Every recorded launch of every decorated kernel, replayed on copies of its inputs through the normal
    path and through the cache (a miss, a hit, and a hit captured in a CUDA graph), writes the same bits
    (kernels that add atomically: the same values up to the order of their sums)."""
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
    missing = set(DECORATED) - {_qualname(fn) for fn, *_ in seen}
    assert not missing, sorted(missing)
    kernels = {}
    for fn, grid, args, kwargs in seen:
        jf = kernels.setdefault(fn, _launch.wrap(JITFunction(fn)))
        assert hasattr(jf, "_sslfast_tables"), fn.__name__
        exact = not _uses_atomics(fn)
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
            _assert_same(want, got, exact, f"{_qualname(fn)}, attempt {attempt}")
        assert jf._sslfast_tables, fn.__name__


def _family_calls(device: str = "cuda", dtype: torch.dtype = torch.float32) -> dict:
    """One representative call per op family: name -> function of nothing returning (loss or output, grads);
    its floating inputs in `dtype` (the scales and biases stay fp32)."""
    from sslfast.data import presets
    from sslfast.ops import augment as aug

    def grads(out, *leaves):
        return (out, *torch.autograd.grad(out, leaves))

    def leaves(*shapes):
        return [torch.randn(*s, device=device, dtype=dtype, requires_grad=True) for s in shapes]

    def masked_mse():
        m = mae.random_masking(3, 64, 0.75, device=device)
        (pred,) = leaves((3, 64, 48))
        return grads(mae.masked_mse_loss(pred, torch.randn(3, 3, 32, 32, device=device, dtype=dtype), m.mask, 4), pred)

    def augment():
        imgs = [torch.randint(0, 256, (h, w, 3), dtype=torch.uint8) for h, w in ((61, 47), (33, 70))]
        flat, offs, sizes = aug.pack_images(imgs, chw=False)
        params = aug.sample_view_params(presets.ViewSpec(blur_p=0.5), sizes, count=2)
        flat, offs, sizes, params = (t.to(device) for t in (flat, offs, sizes, params))
        return (aug.augment_views(flat, offs, sizes, params, 24, blur_kernel=9),)

    def contrastive(loss, *extra):
        z1, z2 = leaves((67, 96), (67, 96))
        return grads(loss(z1, z2, *extra), z1, z2)

    def prototypes():
        x, w = leaves((45, 64), (301, 64))
        center = torch.zeros(301, device=device, dtype=dtype)
        probs = sf.prototype_teacher_probs(x.detach(), w.detach(), teacher_temp=0.04, center=center)
        return grads(sf.prototype_cross_entropy(x, w, probs, student_temp=0.1), x, w)

    def swav():
        (s,) = leaves((4 * 5, 300))
        codes = sf.sinkhorn_knopp(torch.randn(2 * 5, 300, device=device, dtype=dtype), 0.05, 3)
        return (*grads(sf.swav_loss(s, codes), s), codes)

    def ibot():
        (s,) = leaves((3, 17, 200))
        t = torch.softmax(torch.randn(3, 17, 200, device=device, dtype=dtype), -1)
        return grads(sf.ibot_patch_loss(s, t, torch.rand(3, 17, device=device) < 0.4), s)

    def dino():
        (s,) = leaves((6 * 4, 500))
        t = torch.randn(2 * 4, 500, device=device, dtype=dtype)
        return grads(sf.dino_loss(s, t, torch.randn(1, 500, device=device, dtype=dtype)), s)

    def koleo():
        (x,) = leaves((77, 64))
        return grads(sf.koleo_loss(x), x)

    scale = torch.tensor(20.0, device=device)
    bias = torch.tensor(-10.0, device=device)
    return {
        "barlow": lambda: contrastive(sf.barlow_twins_loss),
        "vicreg": lambda: contrastive(sf.vicreg_loss),
        "mae": masked_mse,
        "dino": dino,
        "nt_xent": lambda: contrastive(sf.nt_xent_loss, 0.5),
        "info_nce": lambda: contrastive(sf.info_nce_loss, torch.randn(130, 96, device=device, dtype=dtype), 0.2),
        "clip": lambda: contrastive(sf.clip_loss, scale),
        "siglip": lambda: contrastive(sf.siglip_loss, scale, bias),
        "koleo": koleo,
        "swav+sinkhorn": swav,
        "ibot": ibot,
        "prototype_ce": prototypes,
        "augment": augment,
    }


@pytest.mark.gpu
def test_op_families_with_the_cache_on_and_off(monkeypatch):
    """A representative call of each op family with every decorated kernel on the cached path (a miss, then a
    hit) gives what it gives on Triton's path: bit for bit, except where a kernel it launches adds atomically
    (then to the rounding of a reordered sum). Deterministic algorithms are on, so InfoNCE takes its ordered
    (non-triangle) schedule."""
    calls = _family_calls()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        launched, run = set(), JITFunction.run

        def recording(self, *args, grid, warmup, **kwargs):
            launched.add(self.fn)
            return run(self, *args, grid=grid, warmup=warmup, **kwargs)

        for name, call in calls.items():
            torch.manual_seed(0)
            with monkeypatch.context() as mp:
                mp.setattr(JITFunction, "run", recording)
                want = call()
            exact = not any(_uses_atomics(fn) for fn in launched if fn.__module__ in _MODULES)
            launched.clear()
            with monkeypatch.context() as mp:
                for qual in DECORATED:
                    module, _, attr = qual.rpartition(".")
                    mod = importlib.import_module(module)
                    mp.setattr(mod, attr, _launch.wrap(JITFunction(getattr(mod, attr).fn)))
                for attempt in range(2):
                    torch.manual_seed(0)
                    _assert_same(want, call(), exact, f"{name}, cached, attempt {attempt}")
    finally:
        torch.use_deterministic_algorithms(False)
