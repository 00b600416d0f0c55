"""pytest-benchmark suite over the `sslfast bench` registry: every registered case for the current device,
fused and reference side by side.

    pytest benchmarks/ --benchmark-only [--benchmark-json out.json] [-k nt_xent]

On a machine without CUDA only the CPU smoke cases run. Timings are pytest-benchmark's (host clock; CUDA
is synchronized inside each round); `sslfast bench` gives CUDA-event timings and peak memory instead.
"""

import pytest
import torch

from sslfast import bench

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASES = [(case, dtype) for case in bench.load_all() if DEVICE.type in case.device_types for dtype in case.dtypes]


def _synced(fn):
    def run():
        fn()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize(DEVICE)

    return run


@pytest.mark.parametrize("path", ["fused", "reference"])
@pytest.mark.parametrize("case,dtype", CASES, ids=[f"{c.op}-{c.name}-{str(d)[6:]}" for c, d in CASES])
def test_op(benchmark, case, dtype, path):
    setup = case.setup(DEVICE, dtype)
    fn = setup.fused if path == "fused" else setup.reference
    if fn is None:
        pytest.skip("no reference can run at this size")
    benchmark.extra_info.update(op=case.op, case=case.name, dtype=str(dtype), flops=setup.flops, bytes=setup.bytes)
    benchmark.pedantic(_synced(fn), warmup_rounds=1, rounds=5)
