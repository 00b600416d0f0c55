"""Host cost of each op's fast path, measured on a machine without a GPU.

A small op on an H100 (Barlow Twins at N=256, the MAE token ops, the EMA of a parameter list) finishes its GPU
work in tens of microseconds, so what a call costs is the Python, the PyTorch dispatch and the kernel launches
in front of it. This script measures that part on the CPU, in one of two ways (``--launch-path``):

``stubbed`` (default): the glue alone.
  SSLFAST_BACKEND=triton with TRITON_INTERPRET=1 sends every op down its Triton path (the same launchers,
  validation, autograd plumbing and torch glue ops as on a GPU); the interpreter's launch is replaced by a
  counter, so kernels cost nothing and are only counted. The interpreter picks its own, smaller block sizes,
  and a few launchers branch on it (InfoNCE's fp32 tile operands), so its launch counts can differ from a GPU's.

``driver``: the glue and Triton's launch path, as on a GPU.
  No interpreter: the kernels compile for sm_90 with Triton's own backend (on first use: about a minute for
  all of them) and every launch runs Triton's Python launch path up to the C launcher, which a recorder
  replaces (`sslfast.kernels._stub_driver`). Each case is timed three ways in one process: ``glue`` (every
  ``kernel[grid](...)`` replaced by a counter: the GPU configuration's glue), ``triton`` (Triton's launch
  path, the default) and ``cached`` (the cached launch path of `sslfast.kernels._launch`, what
  SSLFAST_LAUNCH_CACHE=1 selects). Their differences over the launch count are the host µs per launch of each
  path, less the C launcher's own argument conversion and the driver call.

Inputs are tiny, so the glue ops' CPU arithmetic is negligible next to their dispatch. The first rows are floors,
not ops: a two-op torch expression and an empty autograd node, forward and backward, which no eager training op
can undercut, and nt_xent's own ATen ops alone in such a node (what nt_xent would cost if its Python and its
launches were free). Per case it prints the median wall time of one call (forward + backward where the op
trains), the median CPU time of this thread for it (less sensitive than the wall time to other processes on a
loaded machine), the Triton launches and the ATen ops it issued. `ema_update_` runs on CPU tensors, so its final
multi-tensor update (`ops._torch.ema.ema_update_`, the stand-in for the csrc launch) is stubbed and counted like
a launch: its row is the validation and the cached plan's check.

    python benchmarks/host_overhead.py [--launch-path stubbed|driver] [--json FILE] [--repeat 200]
        [--rounds 3] [--cases REGEX ...] [--compare BEFORE.json]

`--compare` takes the --json of an earlier run (e.g. of the code before a change) and prints both."""

from __future__ import annotations

import argparse
import collections
import cProfile
import contextlib
import importlib
import json
import os
import pstats
import re
import statistics
import sys
import time
from unittest import mock

LAUNCH_PATHS = ("stubbed", "driver")


def _launch_path(argv) -> str:
    """--launch-path, read before torch and sslfast import: it decides TRITON_INTERPRET, which `triton.jit`
    reads when the kernels are decorated."""
    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--launch-path", choices=LAUNCH_PATHS, default="stubbed")
    return ap.parse_known_args(argv)[0].launch_path


MODE = _launch_path(sys.argv[1:])
os.environ["SSLFAST_BACKEND"] = "triton"
os.environ.pop("SSLFAST_POISON", None)
os.environ.pop("SSLFAST_LAUNCH_CACHE", None)  # `driver` switches the cache itself
if MODE == "stubbed":
    os.environ["TRITON_INTERPRET"] = "1"
else:
    os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import sslfast as sf  # noqa: E402
from sslfast import mae  # noqa: E402
from sslfast.bench import fwd_bwd  # noqa: E402
from sslfast.kernels import _launch  # noqa: E402
from sslfast.kernels._stub_driver import stub_driver  # noqa: E402

LAUNCHES: collections.Counter = collections.Counter()


def _count_launch(self, *args, grid, warmup, **kwargs):
    LAUNCHES[self.fn.__name__] += 1


if MODE == "stubbed":
    import triton.runtime.interpreter as _interp

    _interp.InterpretedFunction.run = _count_launch


_EMA_STUB = "ema_update_ (multi-tensor update)"


def _count_ema(*args, **kwargs):
    LAUNCHES[_EMA_STUB] += 1


_ema_torch = importlib.import_module("sslfast.ops._torch.ema")
_ema_torch.ema_update_ = _count_ema  # the family's PyTorch `ema_update_`, which CPU tensors dispatch to
torch.set_num_threads(1)  # tiny tensors: intra-op threads would only add wake-up latency


class _CountAten(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))


def _leaves(*shapes):
    return [torch.randn(*s, requires_grad=True) for s in shapes]


class _EmptyFunction(torch.autograd.Function):
    """An autograd node that allocates its two input gradients in the forward and scales them in the backward:
    the plumbing every training op pays, with no work."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(torch.empty_like(a), torch.empty_like(b))
        return a.new_zeros(())

    @staticmethod
    def backward(ctx, g):
        ga, gb = ctx.saved_tensors
        return ga * g, gb * g


class _NtXentOps(torch.autograd.Function):
    """The ATen ops one eager `nt_xent_loss` call issues (its row's `aten` counts, which
    tests/test_bench_tools.py holds equal), in an autograd node that does nothing else: no validation, no Python
    of the op, no launches. What the call would cost if all of its own host work were free."""

    @staticmethod
    def forward(ctx, a, b):
        n, f32 = a.shape[0], dict(dtype=torch.float32)
        z = torch.cat([a, b])  # the rows of both views
        torch.empty((2 * n,), **f32)  # inverse norms
        _, row_sums, _ = torch.zeros((4 * n,), **f32).split_with_sizes((2 * n, 2 * n, 0))  # pos, sums, lse_c
        torch.log(row_sums)  # lse
        loss = torch.empty((), **f32)
        torch.empty((4 * n,), **f32).split_with_sizes((2 * n, 2 * n))  # the epilogue's gradients
        torch.zeros(z.shape, **f32)  # the rows-grad accumulator
        dz = torch.empty(z.shape, dtype=z.dtype)
        ctx.grads = (dz[:n], dz[n:])
        return loss

    @staticmethod
    def backward(ctx, g):
        grads, ctx.grads = ctx.grads, None  # handed on, as nt_xent does: AccumulateGrad may keep them
        torch._foreach_mul_(list(grads), g)
        return grads


def floors():
    """name -> call: what any eager call costs in torch alone, measured in the same run as the ops, so that each
    op's row reads against the floor the machine gives at that moment."""
    a, b = _leaves((16, 32), (16, 32))
    yield "floor: torch (a*b).sum() fwd+bwd", fwd_bwd(lambda: (a * b).sum(), a, b)
    yield "floor: empty autograd.Function fwd+bwd", fwd_bwd(lambda: _EmptyFunction.apply(a, b), a, b)
    yield "floor: nt_xent's ATen ops alone fwd+bwd", fwd_bwd(lambda: _NtXentOps.apply(a, b), a, b)


def cases():
    """name -> call. Shapes are tiny; only the code path (algorithm, flags) matters."""
    yield from floors()
    z1, z2 = _leaves((16, 64), (16, 64))
    q, k = _leaves((16, 32), (16, 32))
    queue = torch.randn(64, 32)
    scale = torch.tensor(14.0, requires_grad=True)
    student, teacher, center = _leaves((10 * 2, 64))[0], torch.randn(2 * 2, 64), torch.zeros(1, 64)
    terminal = {
        "nt_xent fwd+bwd": (lambda: sf.nt_xent_loss(q, k, 0.1), q, k),
        "info_nce (queue) fwd+bwd": (lambda: sf.info_nce_loss(q, k, queue, 0.2), q, k),
        "clip fwd+bwd": (lambda: sf.clip_loss(q, k, scale), q, k, scale),
        "dino fwd+bwd": (lambda: sf.dino_loss(student, teacher, center), student),
    }
    for name, args in terminal.items():  # gradients computed in the forward (default), then the other way
        yield name, fwd_bwd(*args)
        yield f"{name} (separate backward)", fwd_bwd(*args, separate=True)
    yield "barlow_twins (gram) fwd+bwd", fwd_bwd(lambda: sf.barlow_twins_loss(z1, z2), z1, z2)
    yield "vicreg (gram) fwd+bwd", fwd_bwd(lambda: sf.vicreg_loss(z1, z2), z1, z2)

    b, L, d, p, c = 2, 16, 32, 4, 3
    (x,) = _leaves((b, L, d))
    xv, mt = _leaves((b, L // 4, d), (1, 1, d))
    pos = torch.randn(1, L, d)
    imgs = torch.randn(b, c, 16, 16)
    (pred,) = _leaves((b, L, p * p * c))
    shuffle = torch.argsort(torch.rand(b, L), dim=1)  # a valid mask, built without the (counted) kernel
    restore = torch.argsort(shuffle, dim=1)
    m = mae.MaskInfo(shuffle[:, : L // 4], restore, (restore >= L // 4).float())

    yield "mae random_masking", lambda: mae.random_masking(b, L, 0.75)
    yield "mae gather_tokens fwd", lambda: mae.gather_tokens(x, m.ids_keep)
    yield "mae gather_patches fwd", lambda: mae.gather_patches(imgs, m.ids_keep, p)
    yield "mae unshuffle fwd", lambda: mae.unshuffle(xv, m.ids_restore, mt)
    yield "mae unshuffle+pos fwd+bwd", fwd_bwd(lambda: mae.unshuffle(xv, m.ids_restore, mt, pos).sum(), xv, mt)
    norm_pix = (lambda: mae.masked_mse_loss(pred, imgs, m.mask, p), pred)
    yield "mae norm-pix loss fwd+bwd", fwd_bwd(*norm_pix)
    yield "mae norm-pix loss fwd+bwd (separate backward)", fwd_bwd(*norm_pix, separate=True)

    teacher, student = _vit_b_params(), _vit_b_params()
    yield "ema_update_ (cached plan, ViT-B list)", lambda: sf.ema_update_(teacher, student, 0.996)


def _vit_b_params() -> list:
    """A ViT-B/16's parameter list (150 tensors: patch embedding, tokens, 12 blocks of 12, final norm) at 1/64
    of its widths: the plan cache's work grows with the number of tensors, not their sizes."""
    d, h = 768 // 64, 3072 // 64
    shapes = [(d, 3, 16, 16), (d,), (1, 1, d), (1, 197, d)]
    for _ in range(12):
        shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (h, d), (h,), (d, h), (d,)]
    shapes += [(d,), (d,)]
    return [torch.randn(s) for s in shapes]


def _times(call, repeat: int) -> tuple[float, float]:
    """Median wall and thread-CPU µs of one call over `repeat` calls."""
    times, cpu = [], []
    for _ in range(repeat):
        c0 = time.thread_time()
        t0 = time.perf_counter()
        call()
        t1 = time.perf_counter()
        cpu.append(time.thread_time() - c0)
        times.append(t1 - t0)
    return statistics.median(times) * 1e6, statistics.median(cpu) * 1e6


def _counts(call, driver_launches) -> dict:
    """Launches (by kernel) and ATen ops of one call."""
    LAUNCHES.clear()
    if driver_launches is not None:
        driver_launches.clear()
        driver_launches.record = True
    try:
        with _CountAten() as mode:
            call()
    finally:
        if driver_launches is not None:
            driver_launches.record = False
    kernels = collections.Counter(LAUNCHES)
    kernels.update(x.kernel for x in driver_launches or ())
    return {
        "launches": sum(kernels.values()),
        "kernels": dict(kernels),
        "aten_ops": sum(mode.ops.values()),
        "aten": dict(mode.ops),
    }


def measure(call, repeat: int, rounds: int = 1) -> dict:
    """--launch-path stubbed: one call's median host µs (median over `rounds` of each round's median)."""
    for _ in range(5):
        call()
    counts = _counts(call, None)
    walls, cpus = zip(*(_times(call, repeat) for _ in range(rounds)))
    return {"us": statistics.median(walls), "cpu_us": statistics.median(cpus), **counts}


def _glue_launch(kernel, grid):
    def launch(*args, **kwargs):
        LAUNCHES[kernel.fn.__name__] += 1

    return launch


@contextlib.contextmanager
def _launch_variant(variant: str):
    """`glue`: every `kernel[grid](...)` is a counter; `triton`: Triton's launch path; `cached`: the cache."""
    from triton.runtime.jit import JITFunction

    _launch.switch(variant == "cached")  # off for `glue` too: every kernel is then a plain JITFunction
    with mock.patch.object(JITFunction, "__getitem__", _glue_launch) if variant == "glue" else contextlib.nullcontext():
        yield


VARIANTS = ("glue", "triton", "cached")


def measure_driver(call, repeat: int, rounds: int, driver_launches) -> dict:
    """--launch-path driver: each variant's median host µs, interleaved over `rounds`; the counts are the
    Triton path's (the glue variant must issue the same launches)."""
    row = {}
    for variant in VARIANTS:
        with _launch_variant(variant):
            for _ in range(5):
                call()  # compiles on first use, then fills the cache's tables
            counts = _counts(call, None if variant == "glue" else driver_launches)
        if variant == "triton":
            row.update(counts)
        row[f"{variant}_launches"] = counts["launches"]
    samples = {v: [] for v in VARIANTS}
    for _ in range(rounds):
        for variant in VARIANTS:
            with _launch_variant(variant):
                samples[variant].append(_times(call, repeat))
    for variant, got in samples.items():
        walls, cpus = zip(*got)
        row[f"{variant}_us"], row[f"{variant}_cpu_us"] = statistics.median(walls), statistics.median(cpus)
    row["us"], row["cpu_us"] = row["triton_us"], row["triton_cpu_us"]
    n = row["launches"] - row["kernels"].get(_EMA_STUB, 0)
    for variant in ("triton", "cached"):
        row[f"{variant}_us_per_launch"] = (row[f"{variant}_us"] - row["glue_us"]) / n if n else None
    return row


def _line(name: str, row: dict, before: dict | None) -> str:
    if MODE == "driver":
        per = [row[f"{v}_us_per_launch"] for v in ("triton", "cached")]
        line = (
            f"{name:46s} {row['glue_us']:8.1f} {row['triton_us']:8.1f} {row['cached_us']:8.1f} {row['launches']:9d}"
            + "".join(f" {p:11.1f}" if p is not None else f" {'-':>11s}" for p in per)
            + f" {row['aten_ops']:9d}"
        )
    else:
        line = f"{name:46s} {row['us']:9.1f} {row['cpu_us']:8.1f} {row['launches']:9d} {row['aten_ops']:9d}"
    if before:
        line += f"   | {before['us']:16.1f} {before.get('cpu_us', float('nan')):8.1f}"
        line += f" {before['launches']:8d} {before['aten_ops']:8d}"
    return line


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--launch-path",
        choices=LAUNCH_PATHS,
        default="stubbed",
        help="stubbed: the glue alone, under the interpreter; driver: also Triton's launch path and the cached "
        "one, on kernels compiled for sm_90 (module docstring)",
    )
    ap.add_argument("--repeat", type=int, default=200, help="calls per timing round")
    ap.add_argument("--rounds", type=int, default=1, help="timing rounds per case (interleaved across variants)")
    ap.add_argument("--cases", nargs="*", help="regular expressions on the case names")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="also print each case's N most expensive functions (cProfile, own time)",
    )
    ap.add_argument("--compare", metavar="BEFORE.json", help="an earlier --json: print its numbers next to these")
    args = ap.parse_args(argv)
    if args.launch_path != MODE:
        ap.error("--launch-path must be given on the command line (it is read before the imports)")
    before = {}
    if args.compare:
        with open(args.compare) as f:
            before = {r["case"]: r for r in json.load(f)["rows"]}
    rows = []
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}, launch path: {MODE}")
    if MODE == "driver":
        head = f"{'case':46s} {'glue us':>8s} {'triton':>8s} {'cached':>8s} {'launches':>9s}"
        head += f" {'us/launch T':>11s} {'us/launch C':>11s} {'aten ops':>9s}"
    else:
        head = f"{'case':46s} {'host us':>9s} {'cpu us':>8s} {'launches':>9s} {'aten ops':>9s}"
    print(head + (f"   | before: {'host us':>8s} {'cpu us':>8s} {'launches':>8s} {'aten ops':>8s}" if before else ""))
    with stub_driver() if MODE == "driver" else contextlib.nullcontext() as driver_launches:
        for name, call in cases():
            if args.cases and not any(re.search(c, name) for c in args.cases):
                continue
            if MODE == "driver":
                measured = measure_driver(call, args.repeat, args.rounds, driver_launches)
            else:
                measured = measure(call, args.repeat, args.rounds)
            row = {"case": name, **measured}
            rows.append(row)
            print(_line(name, row, before.get(name)))
            if args.profile:
                prof = cProfile.Profile()
                prof.runcall(lambda: [call() for _ in range(args.repeat)])
                pstats.Stats(prof).sort_stats("tottime").print_stats(args.profile)
    if args.json:
        with open(args.json, "w") as f:
            meta = {"torch": torch.__version__, "load": os.getloadavg(), "launch_path": MODE}
            json.dump({**meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
