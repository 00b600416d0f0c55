"""Where the time of a benchmark case goes on the GPU: kernels vs the host in front of them.

For each registered `sslfast bench` case matching `--cases` (fused path only), after warm-up:

* wall ms    one call timed as `sslfast bench` times it (sync, event, call, event, sync);
* pipe ms    the same call back to back (`sslfast.bench.pipelined_ms`): host overhead hidden behind kernels;
* kernel ms  the sum of the device time of the kernels the call launched (torch.profiler, CUPTI);
* launches   how many kernels, and the top ones by device time;
* host ms    the CPU time from the call's start to its last launch returning;
* python     with --python N: cProfile over N more calls, the functions with the most own time (µs/call).

`--launch-costs` first times the host side of single building blocks on this machine (a bare Triton
launch, the same kernel launched from its compiled handle, an allocation, a tiny ATen op, an autograd
Function, one backward through the autograd engine), so a case's host time can be read as a count of
those.

wall ≫ kernel means the host (Python, dispatch, launches) is the bottleneck; wall ≈ kernel means the
kernels are, and the per-kernel table says which one.

    python benchmarks/profile_ops.py --cases "barlow_twins N=256" "mae " --json out.json
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import json
import pstats
import re
import time

import torch
from torch.profiler import ProfilerActivity, profile

import triton
import triton.language as tl

from sslfast import bench


@triton.jit
def _copy_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n), mask=offs < n)


class _Identity(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g


def launch_costs(device, calls: int = 2000) -> dict[str, float]:
    """Host µs per call of single building blocks (median of 5 rounds of `calls` calls, no sync inside)."""
    x = torch.randn(4096, device=device)
    y = torch.empty_like(x)
    leaf = torch.randn(4096, device=device, requires_grad=True)
    compiled = _copy_kernel[(4,)](x, y, x.numel(), BLOCK=1024)
    runner = compiled[(4, 1, 1)]
    blocks = {
        "triton launch (JITFunction)": lambda: _copy_kernel[(4,)](x, y, x.numel(), BLOCK=1024),
        "triton launch (compiled handle)": lambda: runner(x, y, x.numel(), 1024),
        "torch.empty": lambda: torch.empty(4096, device=device),
        "torch.add": lambda: torch.add(x, x),
        "autograd.Function apply": lambda: _Identity.apply(x),
        "backward through 2 nodes (autograd engine)": lambda: _Identity.apply(leaf).sum().backward(),
    }
    out = {}
    for name, fn in blocks.items():
        rounds = []
        for _ in range(5):
            bench.sync(device)
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            rounds.append((time.perf_counter() - t0) * 1e6 / calls)
        out[name] = sorted(rounds)[2]
    bench.sync(device)
    return out


def python_top(fn, device, calls: int, top: int = 15) -> list[dict]:
    """cProfile of `calls` calls: the functions with the most own time, in µs per call."""
    prof = cProfile.Profile()
    bench.sync(device)
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    bench.sync(device)
    stats = pstats.Stats(prof).stats
    rows = sorted(stats.items(), key=lambda kv: -kv[1][2])[:top]
    return [
        {
            "fn": f"{k[0].rsplit('/', 2)[-1]}:{k[1]}:{k[2]}",
            "ncalls": v[1] / calls,
            "own_us": v[2] * 1e6 / calls,
            "cum_us": v[3] * 1e6 / calls,
        }
        for k, v in rows
    ]


def _kernel_table(prof) -> list[tuple[str, float, int]]:
    """(name, total device ms, count) per kernel, largest first."""
    total: dict[str, list] = collections.defaultdict(lambda: [0.0, 0])
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            t = total[ev.name]
            t[0] += ev.device_time_total / 1e3
            t[1] += 1
    return sorted(((k, v[0], v[1]) for k, v in total.items()), key=lambda r: -r[1])


def profile_case(case, dtype, device, calls: int, python_calls: int = 0) -> dict:
    st = case.setup(device, dtype)
    fn = st.fused
    wall = bench.time_ms(fn, device, warmup=3, repeat=10)
    pipe = bench.pipelined_ms(fn, device) if device.type == "cuda" else None
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        host = []
        for _ in range(calls):
            bench.sync(device)
            t0 = time.perf_counter()
            fn()
            host.append((time.perf_counter() - t0) * 1e3)
        bench.sync(device)
    kernels = _kernel_table(prof)
    python = python_top(fn, device, python_calls) if python_calls else []
    return {
        "op": case.op,
        "case": case.name,
        "dtype": str(dtype).replace("torch.", ""),
        "wall_ms": wall,
        "pipelined_ms": pipe,
        "host_ms": sorted(host)[len(host) // 2],
        "kernel_ms": sum(k[1] for k in kernels) / calls,
        "launches": sum(k[2] for k in kernels) / calls,
        "kernels": [{"name": k[0][:120], "ms": k[1] / calls, "count": k[2] / calls} for k in kernels[:12]],
        "python": python,
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", required=True, help="regular expressions on 'op case-name'")
    ap.add_argument("--calls", type=int, default=5, help="profiled calls per case")
    ap.add_argument("--python", type=int, default=0, metavar="N", help="cProfile N calls per case")
    ap.add_argument("--launch-costs", action="store_true", help="time single launches/allocations first")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--device", default="cuda", help="cpu: runs the CPU smoke cases (checks this script)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    rows = []
    if args.launch_costs:
        costs = launch_costs(device)
        rows.append({"launch_costs_us": costs})
        for name, us in costs.items():
            print(f"{us:8.2f} us  {name}")
    for case in bench.load_all():
        if device.type not in case.device_types or not any(re.search(c, f"{case.op} {case.name}") for c in args.cases):
            continue
        for dtype in case.dtypes:
            row = profile_case(case, dtype, device, args.calls, args.python)
            rows.append(row)
            pipe = "-" if row["pipelined_ms"] is None else f"{row['pipelined_ms']:.3f}"
            print(
                f"\n{row['op']} {row['case']} {row['dtype']}: wall {row['wall_ms']:.3f} ms, pipelined {pipe} ms, "
                f"host {row['host_ms']:.3f} ms, kernels {row['kernel_ms']:.3f} ms in {row['launches']:.0f} launches"
            )
            for k in row["kernels"]:
                print(f"    {k['ms']:8.3f} ms  x{k['count']:<4.0f} {k['name']}")
            for p in row["python"]:
                print(f"    {p['own_us']:8.1f} us own {p['cum_us']:8.1f} us cum  x{p['ncalls']:<5.1f} {p['fn']}")
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
