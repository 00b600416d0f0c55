"""Command line: `sslfast pretrain` (the main job), `sslfast eval` (kNN / linear probe / fine-tune of a
pretrained backbone) and `sslfast bench` (the fused ops against their PyTorch references).

    sslfast pretrain                              # SimCLR on the embedded digits, then kNN vs random init
    sslfast pretrain --method dino --data /imagenet/train --epochs 100 --precision bf16 --out runs/dino
    torchrun --nproc-per-node 8 -m sslfast.cli pretrain --method byol --data /imagenet/train
    torchrun --nproc-per-node 8 -m sslfast.cli pretrain --method dino --data /imagenet/train --strategy fsdp
    sslfast eval --checkpoint runs/simclr/checkpoint.pt
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shlex
import sys

import torch


def _bench(args) -> int:
    from . import bench
    from .train.checkpoint import check_writable_file
    from .train.config import ConfigError, check_device

    check_device(args.device)
    if args.ops and "e2e" in args.ops:
        return _bench_e2e(args)
    known = sorted({case.op for case in bench.load_all()} | {"e2e"})
    unknown = [op for op in args.ops or () if op not in known]
    if unknown:
        raise ConfigError(
            f"--ops: unknown op famil{'y' if len(unknown) == 1 else 'ies'} {', '.join(unknown)} "
            f"(known: {', '.join(known)})"
        )
    if args.plot and not _importable("matplotlib"):
        raise ConfigError("--plot needs matplotlib (pip install matplotlib)")
    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        if path:
            check_writable_file(path, what=flag)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rows = bench.run(
        device,
        ops=args.ops,
        warmup=args.warmup,
        repeat=args.repeat,
        with_reference=not args.no_reference,
        log=(lambda s: None) if args.quiet else print,
        cases=args.cases,
    )
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


def _bench_e2e(args) -> int:
    """`sslfast bench --ops e2e`: whole steps from JPEG files per loader and step mode (`sslfast.bench.e2e`)."""
    import dataclasses

    from .bench import e2e
    from .train.checkpoint import check_writable_file
    from .train.config import ConfigError

    if args.ops != ["e2e"]:
        raise ConfigError("--ops e2e runs alone (time the other op families in another invocation)")
    if args.plot:
        raise ConfigError("--plot: the e2e rows have no plot (use --json)")
    if args.json:
        check_writable_file(args.json, what="--json")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    settings = e2e.default_settings(device)
    changes = {
        k: getattr(args, f"e2e_{k}")
        for k in ("method", "backbone", "batch", "image_size", "steps", "data")
        if getattr(args, f"e2e_{k}") is not None
    }
    for key in ("batch", "image_size", "steps"):
        if key in changes and changes[key] < 1:
            raise ConfigError(f"--e2e-{key.replace('_', '-')} must be a positive integer, got {changes[key]}")
    if args.e2e_images:
        try:
            changes["images"], size = e2e.parse_images(args.e2e_images)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if size:
            changes["jpeg_size"] = size
    rows = e2e.run(device, dataclasses.replace(settings, **changes), log=(lambda s: None) if args.quiet else print)
    print(e2e.table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": {"torch": torch.__version__, "device": rows[0]["device"]}, "rows": rows}, f, indent=1)
    return 0


def _pretrain(args) -> int:
    from .train import PretrainConfig, pretrain

    fields = {f for f in PretrainConfig.__dataclass_fields__}
    given = {k: v for k, v in vars(args).items() if k in fields}  # only the flags on the command line
    pretrain(PretrainConfig(**given), explicit=given)
    return 0


def _eval(args) -> int:
    from .train import evaluate
    from .train.checkpoint import check_writable_file
    from .train.config import check_device

    check_device(args.device)
    if args.json:  # before the evaluation, not after it
        check_writable_file(args.json, what="--json")
    evaluate(
        args.checkpoint,
        protocols=args.protocol,
        data=args.data,
        epochs=args.epochs,
        device=args.device,
        random_init=args.random_init,
        out=args.json,
    )
    return 0


def _add_pretrain(sub) -> None:
    from .methods import METHODS

    p = sub.add_parser(
        "pretrain",
        help="self-supervised pretraining (default: SimCLR on the embedded digits)",
        description="Pretrain a backbone with an SSL method on the fused ops; writes checkpoint.pt "
        "(every epoch, atomically; the one before is kept as checkpoint.prev.pt), "
        "metrics.json and loss_curve.png to --out.",
        argument_default=argparse.SUPPRESS,
    )  # args holds only the flags given (see --resume)
    p.add_argument("--method", choices=sorted(METHODS), help="SSL method (default: simclr)")
    p.add_argument(
        "--data",
        help="a folder of images (class sub-folders allowed) or 'digits', the embedded scikit-learn digits (default)",
    )
    p.add_argument(
        "--backbone",
        help="resnet_tiny, resnet18, resnet50, vit_micro, vit_tiny, vit_small, vit_base "
        "(or a timm name); default: a tiny one on digits, resnet50 / vit_small else",
    )
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, help="global batch size (split over the torchrun processes)")
    p.add_argument("--lr", type=float, help="base learning rate for a batch of 256 (default: the method's paper)")
    p.add_argument("--optimizer", choices=("lars", "adamw", "sgd"), help="default: the method's paper")
    p.add_argument("--precision", choices=("fp32", "bf16"), help="default: fp32")
    p.add_argument(
        "--out",
        help="run directory (default: runs/<method>); a new run refuses one that holds a run "
        "(use --resume or --overwrite), and one process at a time may use it",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its last checkpoint (or the one before, if the last is "
        "unreadable) with its saved config. These flags may change on resume (a note is printed): "
        "--epochs (extend or shorten the run; the warm-up + cosine lr schedule and the method's "
        "step schedules are recomputed for the new total and continue from the step reached), "
        "--lr (the schedule is rescaled), --stop-after, --workers, --no-knn, --no-progress, "
        "--device. Any other flag that differs from the saved config is an error listing the "
        "differences",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start a new run in an --out that already holds one (its checkpoints and metrics are deleted)",
    )
    p.add_argument("--image-size", type=int, help="training resolution (default: 16 on digits, 224 else)")
    p.add_argument("--weight-decay", type=float)
    p.add_argument(
        "--warmup-epochs",
        type=float,
        help="linear lr warm-up (default: the paper's, at most a tenth of the run), then cosine",
    )
    p.add_argument(
        "--profile",
        choices=("paper", "small"),
        help="head widths: the paper's, or CPU-sized (default: small on digits, paper else)",
    )
    p.add_argument("--seed", type=int, help="default: 0")
    p.add_argument("--device", help="cuda, cuda:1 or cpu (default: cuda when available)")
    p.add_argument("--workers", type=int, help="data-loading worker threads for image folders (default: 4)")
    p.add_argument(
        "--loader",
        choices=("native", "dali", "torch"),
        help="native: decode + the fused augmentation kernel on the device (default); dali: NVIDIA DALI; "
        "torch: a torch DataLoader of --workers processes, PIL decode and per-sample CPU transforms "
        "(the usual pipeline, for comparison)",
    )
    p.add_argument(
        "--strategy",
        help="how several torchrun processes share the model: ddp (a whole replica per process, "
        "gradients all-reduced; the default) or fsdp (torch's FSDP2: parameters, gradients and "
        "optimizer state of the student and its EMA teacher sharded over the processes, gathered "
        "per block; the checkpoint still holds the whole model). Not swav",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the method's forward (the first steps compile: seconds on CUDA, about a minute on a CPU)",
    )
    p.add_argument(
        "--cuda-graph",
        action="store_true",
        help="capture the whole step (forward, backward, optimizer, teacher EMA) once in a CUDA graph and replay it "
        "per batch; one GPU, methods without host-side schedules (a refused method says why)",
    )
    p.add_argument(
        "--stop-after",
        type=int,
        metavar="EPOCHS",
        help="stop after this many epochs of this invocation (continue later with --resume)",
    )
    p.add_argument("--no-knn", dest="knn", action="store_false", help="skip the final kNN evaluation")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=_pretrain)


def _add_eval(sub) -> None:
    e = sub.add_parser("eval", help="kNN, linear probe and fine-tune accuracy of a pretrained backbone")
    e.add_argument(
        "--checkpoint",
        default="runs/simclr/checkpoint.pt",
        help="a checkpoint.pt written by `sslfast pretrain`, or its run directory",
    )
    e.add_argument(
        "--protocol", nargs="+", choices=("knn", "linear", "finetune"), default=["knn", "linear", "finetune"]
    )
    e.add_argument("--data", help="labeled data (default: the pretraining data)")
    e.add_argument("--epochs", type=int, help="epochs of the linear probe / fine-tune (default: 100 / 10)")
    e.add_argument("--device")
    e.add_argument("--random-init", action="store_true", help="also evaluate the randomly initialized backbone")
    e.add_argument("--json", help="write the accuracies here")
    e.set_defaults(func=_eval)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="sslfast", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_pretrain(sub)
    _add_eval(sub)
    b = sub.add_parser("bench", help="time the fused ops against their PyTorch references")
    b.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    b.add_argument("--ops", nargs="*", help="only these op families (default: all registered)")
    b.add_argument(
        "--cases", nargs="*", help="only cases whose 'op case-name' matches one of these regular expressions"
    )
    b.add_argument("--warmup", type=int, default=3)
    b.add_argument("--repeat", type=int, default=10)
    b.add_argument("--no-reference", action="store_true", help="time only the fused ops")
    b.add_argument("--json", help="write the rows here")
    b.add_argument("--plot", help="write a PNG bar chart here")
    b.add_argument("--quiet", action="store_true")
    e = b.add_argument_group(
        "--ops e2e (whole steps from JPEG files; defaults: SimCLR resnet50 B=256 224px on "
        "2000 generated 500x375 JPEGs on CUDA, resnet_tiny B=16 16px on 64 at 64x48 on the CPU)"
    )
    e.add_argument("--e2e-data", help="a folder of images (default: a generated set in ~/.cache/sslfast/e2e)")
    e.add_argument("--e2e-images", metavar="N[:WxH]", help="size of the generated set, e.g. 2000:500x375")
    e.add_argument("--e2e-steps", type=int, help="timed steps per pass")
    e.add_argument("--e2e-method")
    e.add_argument("--e2e-backbone")
    e.add_argument("--e2e-batch", type=int)
    e.add_argument("--e2e-image-size", type=int)
    b.set_defaults(func=_bench)
    args = parser.parse_args(argv)
    from .train.config import ConfigError, NonFiniteLossError, RunInterrupted

    try:
        return args.func(args)
    except ConfigError as err:
        parser.exit(2, f"sslfast {args.command}: error: {_one_line(err)}\n")
    except NonFiniteLossError as err:
        parser.exit(3, f"sslfast {args.command}: {_one_line(err)}\n")
    except RunInterrupted as err:
        parser.exit(130, f"sslfast {args.command}: {_one_line(err)}\n")
    except KeyboardInterrupt:
        hint = (
            f"; resume with `sslfast pretrain --resume --out {shlex.quote(args.out)}` if it holds a checkpoint"
            if args.command == "pretrain" and getattr(args, "out", None)
            else ""
        )
        parser.exit(130, f"sslfast {args.command}: interrupted{hint}\n")


def _importable(name: str) -> bool:
    """Whether `import name` would find the module, without importing it."""
    if name in sys.modules:
        return sys.modules[name] is not None
    return importlib.util.find_spec(name) is not None


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


if __name__ == "__main__":
    sys.exit(main())
