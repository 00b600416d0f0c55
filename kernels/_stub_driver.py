"""A Triton driver for machines without a GPU: Triton's whole launch path, with only the driver-level launch stubbed.

Under ``TRITON_INTERPRET=1`` a ``kernel[grid](...)`` never reaches Triton's ``JITFunction.run``: the interpreter
replaces it, so the binding, specialization, cache lookup and launcher of a real launch go unmeasured and
untested on a CPU. With this driver active, and the interpreter off:

* each kernel compiles for a real CUDA target (sm_90 by default) with Triton's own NVIDIA backend and the
  ``ptxas`` its wheel ships, so the specializations, constexprs and compiled metadata are the GPU's;
* ``JITFunction.run`` runs unchanged: binder, specialization, cache key, kernel cache, globals check, launch
  metadata and hooks, then the Python half of ``CudaLauncher.__call__`` (its scratch allocation);
* only the C launcher's entry point (argument conversion and ``cuLaunchKernel``) is replaced, by a function that
  counts the launch and, when ``record`` is set, records what it was given.

Inputs are CPU tensors (their ``data_ptr`` is all a launcher reads); no kernel runs, so outputs stay unwritten
(integer ones from ``_common.empty`` read as zeros, so that host code after a launch sees legal indices).
The launch recorded per call is::

    Launch(kernel=name, function=handle, grid=(gx, gy, gz), args=(every argument in parameter order, constexprs
           included), packed_metadata=..., hooks=(launch metadata, enter hook, exit hook))

where ``handle`` is unique per compiled kernel (what ``load_binary`` returned), so two launches with the same
handle run the same compiled code.

Uses: ``benchmarks/host_overhead.py --launch-path driver`` (an eager call's host cost including Triton's
launch path or the cached one, on a CPU) and ``tests/test_launch_cache.py`` (the cached launch path against
Triton's own, launch by launch, on compiled kernels).

    with stub_driver(record=True) as launches:
        kernel[grid](...)
    launches[0].grid, launches[0].args
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools

from .._backend import STUB_DRIVER, interpreting


@dataclasses.dataclass(frozen=True)
class Launch:
    kernel: str  # the kernel's name
    function: int  # the compiled kernel's handle
    grid: tuple  # (gx, gy, gz)
    args: tuple  # the kernel's arguments in parameter order, constexprs included
    packed_metadata: tuple  # what the compiled kernel hands the launcher (warps, CTAs, shared memory, ...)
    hooks: tuple  # (launch metadata, enter hook, exit hook): all None unless a launch hook is set


class Launches(list):
    """The launches seen while the driver was active: ``count`` always, a `Launch` each while ``record`` is
    True (it may be switched inside the block)."""

    def __init__(self, record: bool):
        super().__init__()
        self.count, self.record = 0, record


# What an H100 SXM reports, as far as Triton's compiler and launcher read it.
_H100_PROPERTIES = {
    "max_shared_mem": 232448,
    "max_num_regs": 65536,
    "multiprocessor_count": 132,
    "warpSize": 32,
    "sm_clock_rate": 1980000,
    "mem_clock_rate": 2619000,
    "mem_bus_width": 5120,
}


@functools.lru_cache(maxsize=None)
def _driver_class():
    from triton.backends.nvidia.driver import CudaDriver, CudaLauncher

    class StubUtils:
        """`CudaUtils` without libcuda: binaries "load" to a fresh handle."""

        def load_binary(self, name, kernel, shared, device):
            return 0, next(_HANDLES), 32, 0, 1024  # module, function, registers, spills, max threads

        def get_device_properties(self, device):
            return dict(_H100_PROPERTIES)

    class StubLauncher(CudaLauncher):
        """`CudaLauncher` whose C entry point (argument conversion + `cuLaunchKernel`) is a recorder; its Python
        `__call__` (scratch allocation) is Triton's own."""

        def __init__(self, src, metadata):
            self.num_ctas = getattr(metadata, "num_ctas", 1)
            self.global_scratch_size = metadata.global_scratch_size
            self.global_scratch_align = metadata.global_scratch_align
            self.profile_scratch_size = metadata.profile_scratch_size
            self.profile_scratch_align = metadata.profile_scratch_align
            self.launch_cooperative_grid = metadata.launch_cooperative_grid
            self.launch_pdl = metadata.launch_pdl
            self.launch = _recorder(src.fn.__name__ if hasattr(src, "fn") else str(src))

    def _recorder(name):
        def launch(gx, gy, gz, stream, function, cooperative, pdl, global_scratch, profile_scratch, *args):
            launches = _STATE["launches"]
            launches.count += 1
            if launches.record:
                # args: packed metadata, launch metadata, enter hook, exit hook, then the kernel's arguments
                launches.append(Launch(name, function, (gx, gy, gz), args[4:], args[0], args[1:4]))

        return launch

    class StubDriver(CudaDriver):
        """`CudaDriver` for a CPU-only machine: device 0, stream 0, the given compute capability."""

        def __init__(self, capability: int):
            self.utils = StubUtils()
            self.launcher_cls = StubLauncher
            self.capability = divmod(capability, 10)
            self.get_current_device = lambda: 0
            self.set_current_device = lambda device: None
            self.get_current_stream = lambda device=None: 0
            self.get_device_capability = lambda device=None: self.capability

    return StubDriver


# Shared by every stub launcher: a kernel compiled (and its launcher made) inside one `stub_driver` block
# records into the block that launches it.
_STATE = {"launches": Launches(record=False)}
_HANDLES = itertools.count(1)  # one per compiled kernel, for the whole process


@contextlib.contextmanager
def stub_driver(*, record: bool = False, capability: int = 90):
    """Make a stub CUDA driver Triton's active one for the block (module docstring).

    Args:
        record: keep a `Launch` per launch (costs host time; off for timing, where only the count is kept);
            the yielded object's ``record`` attribute switches it later.
        capability: the compute capability the kernels compile for (90: Hopper).

    Yields:
        The `Launches` of the block.

    Raises:
        RuntimeError: under TRITON_INTERPRET=1, where ``triton.jit`` makes interpreted functions that never
            reach a driver.
    """
    if interpreting():
        raise RuntimeError("stub_driver: TRITON_INTERPRET=1 is set; the interpreter never reaches a driver")
    from triton.runtime.driver import driver

    previous, saved, was_stubbed = driver._active, dict(_STATE), STUB_DRIVER[0]
    _STATE["launches"] = Launches(record)
    driver.set_active(_driver_class()(capability))
    STUB_DRIVER[0] = True
    try:
        yield _STATE["launches"]
    finally:
        driver._active = previous
        _STATE.update(saved)
        STUB_DRIVER[0] = was_stubbed
