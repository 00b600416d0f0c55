"""The largest batch each method's training step fits on this GPU, with the sslfast ops and with
`SSLFAST_BACKEND=reference` (issue 7's "largest batch that fits").

A batch fits when two full training steps (forward, backward, optimizer + teacher EMA, bf16 autocast, the
configs of `sslfast.bench.methods`: each registered method's `bench_step`) run without torch.OutOfMemoryError;
the second step is the one that holds the optimizer state. Search per method and path: double from `--start`
until a batch fails (or `--max` is reached), then bisect down to a multiple of `--step`, so
~log2(max/start) + log2(start/step) probes. Each probe builds the model afresh and frees everything before the
next.

    python benchmarks/max_batch.py [--methods simclr mae ...] [--start 256] [--step 64] [--max 8192] [--json F]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json

import torch

from sslfast.bench import reference_backend
from sslfast.bench.methods import cases, step_setup


def largest(fits, start: int, step: int, most: int) -> int:
    """Largest multiple of `step` in [step, most] with fits(b), given that fits is monotone (0 if none)."""
    top = most // step * step
    good, bad = 0, None
    b = max(step, min(top, start // step * step))
    while True:  # double up from a fitting batch, halve down from a failing one, until both are known
        if fits(b):
            good = b
            if bad is not None or b == top:
                break
            b = min(top, 2 * b)
        else:
            bad = b
            if good or b == step:
                break
            b = max(step, b // 2 // step * step)
    while bad is not None and bad - good > step:  # bisect between them
        mid = (good + bad) // 2 // step * step
        if fits(mid):
            good = mid
        else:
            bad = mid
    return good


def _free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def step_fits(method, backbone, size, device, reference: bool):
    """fits(batch) for one method and path."""

    def fits(batch: int) -> bool:
        st = None
        try:
            st = step_setup(method, backbone, batch, size, device, torch.bfloat16)
            with reference_backend() if reference else contextlib.nullcontext():
                for _ in range(2):
                    st.fused()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return True
        except torch.OutOfMemoryError:
            return False
        finally:
            del st
            _free()

    return fits


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    found = cases()
    ap.add_argument("--methods", nargs="+", default=[c[0] for c in found])
    ap.add_argument("--start", type=int, default=256)
    ap.add_argument("--step", type=int, default=64)
    ap.add_argument("--max", type=int, default=8192)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--backbone", help="override every method's backbone (e.g. resnet_tiny for a CPU smoke run)")
    ap.add_argument("--size", type=int, help="override the image size")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    unknown = sorted(set(args.methods) - {c[0] for c in found})
    if unknown:
        ap.error(f"--methods: no step case for {unknown}; choose from {[c[0] for c in found]}")
    device = torch.device(args.device)
    rows = []
    for method, backbone, _, size in found:
        if method not in args.methods:
            continue
        backbone, size = args.backbone or backbone, args.size or size
        row = {
            "method": method,
            "backbone": backbone,
            "image_size": size,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        }
        for path in ("fused", "reference"):
            row[path] = largest(
                step_fits(method, backbone, size, device, path == "reference"), args.start, args.step, args.max
            )
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
