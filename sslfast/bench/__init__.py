"""Op benchmark registry and runner behind `sslfast bench`.

Each op family registers its cases in a module of this package (`sslfast/bench/<op>.py`, imported
automatically). A case's `setup(device, dtype)` builds inputs once and returns a `Setup`: the callables to
time (the fused op and the reference that users run today, each doing one full forward+backward where the
op is differentiable), plus the FLOP and byte counts used for the "% of ceiling" column.

Timing: CUDA events around each call after a device synchronization, median over repeats after warm-up (host
clock on the CPU), as benchmarks/reference_ops_bench.py times the references: the latency of one call from an
idle device, host overhead included. For calls under PIPELINE_BELOW_MS, also "pipelined" ms: PIPELINE_CALLS calls back
to back between two events, divided by their number. That is the cost inside a training step, where the host
queues work ahead of the device and a small op's Python and launches overlap the kernels before it. And
"graphed" ms: the same call captured once in a CUDA graph and replayed PIPELINE_CALLS times back to back, i.e.
the device time with the host taken out, what `torch.compile(mode="reduce-overhead")` or a hand-captured
step gets. A call that cannot be captured (a host sync, a CPU-side branch on device data) reports none.
Memory: peak allocated during one call minus what was allocated before it (CUDA only).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import os
import pkgutil
import re
import statistics
import time
import warnings
from typing import Callable

import torch

from .._custom_op import separate_backward

# Measured ceilings (bf16 matmul TFLOP/s, device-to-device copy TB/s counting reads and writes) by device
# name: an H100 80GB HBM3 (benchmarks/runs/2026-11-26-h100-baselines/baselines.json) and an H200, both measured with
# torch 2.11 and triton 3.6. Other devices use the H100's.
CEILINGS = {"H200": (788.0, 4.3), "H100": (781.0, 3.0)}


def ceilings(device_name: str) -> tuple[float, float]:
    return next((c for key, c in CEILINGS.items() if key in device_name), CEILINGS["H100"])


@dataclasses.dataclass
class Setup:
    fused: Callable[[], object]
    reference: Callable[[], object] | None = None
    flops: float = 0.0  # useful FLOPs of one fused call
    bytes: float = 0.0  # minimal device-memory traffic of one fused call
    others: dict = dataclasses.field(default_factory=dict)  # extra baselines by name (e.g. Inf-CL)
    items: int = 0  # samples one call processes (training steps: images), for items/s


@dataclasses.dataclass
class Case:
    op: str
    name: str
    setup: Callable[[torch.device, torch.dtype], Setup]
    dtypes: tuple = (torch.bfloat16,)
    device_types: tuple = ("cuda",)  # where the case makes sense ("cpu" for tiny smoke sizes)


REGISTRY: list[Case] = []
BF16_AND_FP32 = (torch.bfloat16, torch.float32)


def fwd_bwd(loss_fn, *leaves, separate: bool = False):
    """A timed call: clear the leaves' gradients, then one forward+backward of `loss_fn()`. `separate`: a
    terminal loss runs its backward kernels in the backward pass (as under torch.compile), not in its forward
    (`sslfast._custom_op.separate_backward`)."""

    def run():
        for t in leaves:
            t.grad = None
        with separate_backward() if separate else contextlib.nullcontext():
            loss = loss_fn()
        loss.backward()

    return run


def terminal_loss(loss_fn, *leaves, others: dict | None = None, **fields) -> Setup:
    """The Setup of a loss timed both ways: `fused` computes the input gradients in the forward (the eager
    default), others["separate_backward"] in the backward pass (what torch.compile traces)."""
    return Setup(
        fused=fwd_bwd(loss_fn, *leaves),
        others={"separate_backward": fwd_bwd(loss_fn, *leaves, separate=True), **(others or {})},
        **fields,
    )


@contextlib.contextmanager
def reference_backend():
    """SSLFAST_BACKEND=reference inside the block (the same model and inputs on plain PyTorch)."""
    old = os.environ.get("SSLFAST_BACKEND")
    os.environ["SSLFAST_BACKEND"] = "reference"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("SSLFAST_BACKEND", None)
        else:
            os.environ["SSLFAST_BACKEND"] = old


def register(op: str, name: str, *, dtypes=(torch.bfloat16,), device_types=("cuda",)):
    """Decorator: `@register("nt_xent", "N=16384 D=128")` over a `setup(device, dtype) -> Setup`."""

    def wrap(fn):
        REGISTRY.append(Case(op, name, fn, tuple(dtypes), tuple(device_types)))
        return fn

    return wrap


def load_all() -> list[Case]:
    for mod in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{mod.name}")
    return REGISTRY


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device: torch.device, warmup: int = 3, repeat: int = 10) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


PIPELINE_BELOW_MS = 5.0
PIPELINE_CALLS = 20


def pipelined_ms(fn, device: torch.device, repeat: int = 5) -> float:
    """Median over `repeat` of (time of PIPELINE_CALLS back-to-back calls) / PIPELINE_CALLS (CUDA)."""

    def calls():
        for _ in range(PIPELINE_CALLS):
            fn()

    return _events_per_call(calls, device, repeat)


def _events_per_call(body, device: torch.device, repeat: int) -> float:
    """Median over `repeat` of (event time around `body()`) / PIPELINE_CALLS."""
    times = []
    for _ in range(repeat):
        sync(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        body()
        end.record()
        sync(device)
        times.append(start.elapsed_time(end) / PIPELINE_CALLS)
    return statistics.median(times)


def capture(fn, device: torch.device, warmup: int = 2) -> torch.cuda.CUDAGraph | None:
    """`fn` captured in a CUDA graph after `warmup` calls on a side stream; None if it can't be captured."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm-up off the default stream, as capture requires
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with torch.cuda.graph(graph):
                fn()
        except RuntimeError:  # capture refused (a host sync or pageable copy inside): report no graphed time
            torch.cuda.synchronize(device)  # (torch also warns that the abandoned graph is empty: dropped)
            return None
    empty = [w for w in caught if "CUDA Graph is empty" in str(w.message)]
    for w in caught:
        if w not in empty:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return None if empty else graph  # an empty graph would time nothing


def graphed_ms(fn, device: torch.device, repeat: int = 5) -> float | None:
    """Per-call time of `fn` captured once and replayed back to back; None if it can't be captured."""
    graph = capture(fn, device)
    if graph is None:
        return None

    def replays():
        for _ in range(PIPELINE_CALLS):
            graph.replay()

    return _events_per_call(replays, device, repeat)


def peak_mib(fn, device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def _measure(fn, device, warmup, repeat):
    try:
        row = {"ms": time_ms(fn, device, warmup, repeat), "peak_mib": peak_mib(fn, device)}
        if device.type == "cuda" and row["ms"] < PIPELINE_BELOW_MS:
            row["pipelined_ms"] = pipelined_ms(fn, device)
            row["graphed_ms"] = graphed_ms(fn, device)
        return row
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {"oom": True}


def run(
    device: torch.device,
    ops: list[str] | None = None,
    warmup: int = 3,
    repeat: int = 10,
    with_reference: bool = True,
    log=print,
    cases: list[str] | None = None,
) -> list[dict]:
    """Runs the registered cases for `device`, optionally only the op families `ops` and the cases whose
    "op case-name" matches one of the regular expressions `cases` (re.search)."""
    rows = []
    for case in load_all():
        if ops and case.op not in ops or device.type not in case.device_types:
            continue
        if cases and not any(re.search(c, f"{case.op} {case.name}") for c in cases):
            continue
        for dtype in case.dtypes:
            row = {
                "op": case.op,
                "case": case.name,
                "dtype": str(dtype).replace("torch.", ""),
                "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            }
            try:
                st = case.setup(device, dtype)
            except torch.OutOfMemoryError:
                torch.cuda.empty_cache()
                rows.append({**row, "fused": {"oom": True}})
                continue
            row["fused"] = _measure(st.fused, device, warmup, repeat)
            baselines = dict(st.others)
            if with_reference and st.reference is not None:
                baselines = {"reference": st.reference, **baselines}
            for name, fn in baselines.items():
                row[name] = _measure(fn, device, warmup, repeat)
            if st.items:
                for name in ("fused", *baselines):
                    if row[name].get("ms"):
                        row[name]["items_per_s"] = st.items / row[name]["ms"] * 1e3
            ms = row["fused"].get("ms")
            if ms:
                row["tflops"] = st.flops / ms / 1e9 if st.flops else None
                row["tbps"] = st.bytes / ms / 1e9 if st.bytes else None
                tflops, tbps = ceilings(row["device"])
                row["pct_ceiling"] = max(100 * (row["tflops"] or 0) / tflops, 100 * (row["tbps"] or 0) / tbps) or None
                ref_ms = row.get("reference", {}).get("ms")
                row["speedup"] = ref_ms / ms if ref_ms else None
            rows.append(row)
            log(json.dumps(row))
            del st
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def table(rows: list[dict]) -> str:
    head = (
        "op",
        "case",
        "dtype",
        "ref ms",
        "fused ms",
        "speedup",
        "ref pipe",
        "fused pipe",
        "ref graph",
        "fused graph",
        "ref MiB",
        "fused MiB",
        "% ceiling",
        "ref img/s",
        "fused img/s",
    )
    lines = [head]
    for r in rows:
        f, ref = r.get("fused", {}), r.get("reference", {})
        lines.append(
            (
                r["op"],
                r["case"],
                r["dtype"],
                "oom" if ref.get("oom") else _fmt(ref.get("ms"), ".3f"),
                "oom" if f.get("oom") else _fmt(f.get("ms"), ".3f"),
                _fmt(r.get("speedup"), ".2f"),
                _fmt(ref.get("pipelined_ms"), ".3f"),
                _fmt(f.get("pipelined_ms"), ".3f"),
                _fmt(ref.get("graphed_ms"), ".3f"),
                _fmt(f.get("graphed_ms"), ".3f"),
                _fmt(ref.get("peak_mib"), ".1f"),
                _fmt(f.get("peak_mib"), ".1f"),
                _fmt(r.get("pct_ceiling"), ".1f"),
                _fmt(ref.get("items_per_s"), ".0f"),
                _fmt(f.get("items_per_s"), ".0f"),
            )
        )
    out = _columns(lines)
    others = [
        (
            r["op"],
            r["case"],
            r["dtype"],
            name,
            _fmt(m.get("ms"), ".3f"),
            _fmt(m.get("pipelined_ms"), ".3f"),
            _fmt(m.get("graphed_ms"), ".3f"),
            _fmt(m.get("peak_mib"), ".1f"),
        )
        for r in rows
        for name, m in r.items()
        if name not in _ROW_KEYS and isinstance(m, dict)
    ]
    if others:
        out += "\n\nother ways, same inputs\n" + _columns(
            [("op", "case", "dtype", "way", "ms", "pipe", "graph", "MiB")] + others
        )
    return out


_ROW_KEYS = {"op", "case", "dtype", "device", "fused", "reference"}


def _columns(lines: list[tuple]) -> str:
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(lines[0]))]
    return "\n".join("  ".join(str(c).rjust(w) for c, w in zip(line, widths)) for line in lines)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r.get("fused", {}).get("ms") and r.get("reference", {}).get("ms")]
    labels = [f"{r['op']}\n{r['case']}\n{r['dtype']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(rows)), 4.5))
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["reference"]["ms"] for r in rows], 0.4, label="reference")
    ax.bar([i + 0.2 for i in x], [r["fused"]["ms"] for r in rows], 0.4, label="sslfast")
    ax.set_yscale("log")
    ax.set_ylabel("ms per call (log)")
    ax.set_xticks(list(x), labels, fontsize=6, rotation=90)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
