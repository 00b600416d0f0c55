"""Command line: `sslfast bench` (more subcommands arrive with the methods)."""
from __future__ import annotations

import argparse
import json
import sys

import torch


def _bench(args) -> int:
    from . import bench

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rows = bench.run(device, ops=args.ops, warmup=args.warmup, repeat=args.repeat,
                     with_reference=not args.no_reference, log=(lambda s: None) if args.quiet else print)
    meta = {"torch": torch.__version__, "device": rows[0]["device"] if rows else str(device)}
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        pass
    print(bench.table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    if args.plot:
        bench.plot(rows, args.plot)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="sslfast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="time the fused ops against their PyTorch references")
    b.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    b.add_argument("--ops", nargs="*", help="only these op families (default: all registered)")
    b.add_argument("--warmup", type=int, default=3)
    b.add_argument("--repeat", type=int, default=10)
    b.add_argument("--no-reference", action="store_true", help="time only the fused ops")
    b.add_argument("--json", help="write the rows here")
    b.add_argument("--plot", help="write a PNG bar chart here")
    b.add_argument("--quiet", action="store_true")
    b.set_defaults(func=_bench)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
