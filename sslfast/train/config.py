"""`PretrainConfig`: every knob of `sslfast pretrain`, its defaults (the method's recipe, the dataset's
sizes) and its checks (`resolve` raises `ConfigError` naming the flag)."""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Callable, Iterable

import torch

from ..methods import get_method
from ..models import check_backbone, is_vit

DEFAULT_DATA = "digits"
CHECKPOINT = "checkpoint.pt"


class ConfigError(ValueError):
    """A bad argument of `sslfast pretrain` / `sslfast eval` (the CLI prints it and exits with status 2)."""


class NonFiniteLossError(RuntimeError):
    """The loss, or the state about to be checkpointed, became NaN or infinite; the run stopped and the last
    good checkpoint was kept (the CLI exits with status 3)."""


class RunInterrupted(RuntimeError):
    """Ctrl-C during `sslfast pretrain`: the message says which checkpoint is kept and how to resume (the CLI
    prints it and exits with status 130)."""


@dataclasses.dataclass
class PretrainConfig:
    """Every knob of `sslfast pretrain` (None: the method's / dataset's default, resolved by `resolve`)."""

    method: str = "simclr"
    data: str | None = None  # None or "digits": the embedded scikit-learn digits; else an image folder
    backbone: str | None = None  # default: resnet_tiny / vit_micro on digits, resnet50 / vit_small otherwise
    epochs: int | None = None
    batch_size: int | None = None  # global batch (split over ranks)
    lr: float | None = None  # base lr for a batch of 256 (default: the method's recipe)
    optimizer: str | None = None  # lars | adamw | sgd (default: the method's recipe)
    precision: str = "fp32"  # fp32 | bf16 (autocast)
    out: str | None = None  # default: runs/<method>
    resume: bool = False
    overwrite: bool = False  # start a new run in an `out` that holds one (its files are replaced)
    image_size: int | None = None
    weight_decay: float | None = None
    warmup_epochs: float | None = None  # default: the recipe's, at most a tenth of the run
    profile: str | None = None  # paper | small (default: small on digits, paper otherwise)
    seed: int = 0
    device: str | None = None
    workers: int = 4
    loader: str = "native"  # native (fused GPU augmentation) | dali | torch (DataLoader + PIL, per sample)
    compile: bool = False  # torch.compile the method's forward (CUDA; see `resolve`)
    cuda_graph: bool = False  # capture the whole step once, replay it per batch (`sslfast.train.graphed`)
    knn: bool = True  # evaluate kNN (pretrained vs random init) at the end
    stop_after: int | None = None  # stop after this many epochs of the run (resume later)
    progress: bool = True
    strategy: str = "ddp"  # ddp | fsdp (torch's FSDP2 shards student and teacher; several ranks only)

    @property
    def embedded(self) -> bool:
        return self.data in (None, DEFAULT_DATA)


# Defaults of the embedded digits demo, measured to finish on 2 CPU cores in well under 3 minutes.
LOADERS = ("native", "dali", "torch")
STRATEGIES = ("ddp", "fsdp")
DIGITS_DEFAULTS = dict(epochs=40, batch_size=256, image_size=16)
IMAGENET_DEFAULTS = dict(epochs=100, batch_size=256, image_size=224)


def _recipe(cfg: PretrainConfig) -> dict:
    """The method's training recipe for the profile and backbone (a method may have a separate ViT recipe)."""
    return get_method(cfg.method).recipe(cfg.profile, vit=is_vit(cfg.backbone))


def resolve(cfg: PretrainConfig, world: int = 1) -> PretrainConfig:
    """Fills the defaults and checks every argument.

    Args:
        cfg: the flags given (None: the default).
        world: the number of ranks the run will have (the batch is split over them).

    Returns:
        A new config with every default filled in.

    Raises:
        ConfigError: a bad argument, naming its flag (one line).
    """
    cfg = dataclasses.replace(cfg)
    try:
        cls = get_method(cfg.method)
    except ValueError as err:
        raise ConfigError(f"--method: {err}") from None
    cfg.method = cls.name
    if not cfg.embedded:
        if not os.path.isdir(cfg.data):
            raise ConfigError(f"--data: {cfg.data!r} is not a folder of images (or 'digits' for the embedded set)")
    else:
        cfg.data = DEFAULT_DATA
    base = DIGITS_DEFAULTS if cfg.embedded else IMAGENET_DEFAULTS
    for key, value in base.items():
        if getattr(cfg, key) is None:
            setattr(cfg, key, value)
    cfg.profile = cfg.profile or ("small" if cfg.embedded else "paper")
    if cfg.backbone is None:
        cfg.backbone = cls.default_backbone[cfg.profile]
    try:
        check_backbone(cfg.backbone)
    except ValueError as err:
        raise ConfigError(f"--backbone: {err}") from None
    if cls.needs_vit and not is_vit(cfg.backbone):
        raise ConfigError(
            f"--backbone: {cls.name} needs a ViT backbone (vit_micro, vit_tiny, vit_small, vit_base), "
            f"got {cfg.backbone!r}"
        )
    for key in ("epochs", "batch_size", "image_size", "workers", "stop_after"):
        value = getattr(cfg, key)
        if key == "stop_after" and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"--{key.replace('_', '-')} must be a positive integer, got {value!r}")
    recipe = _recipe(cfg)
    cfg.optimizer = (cfg.optimizer or recipe["optimizer"]).lower()
    if cfg.optimizer not in ("lars", "adamw", "sgd"):
        raise ConfigError(f"--optimizer must be lars, adamw or sgd, got {cfg.optimizer!r}")
    if cfg.optimizer != recipe["optimizer"] and cfg.lr is None:
        cfg.lr = {"lars": 0.3, "sgd": 0.05, "adamw": 1e-3}[cfg.optimizer]
    cfg.lr = recipe["lr"] if cfg.lr is None else cfg.lr
    cfg.weight_decay = recipe["weight_decay"] if cfg.weight_decay is None else cfg.weight_decay
    if cfg.warmup_epochs is None:
        cfg.warmup_epochs = min(recipe.get("warmup_epochs", 0), cfg.epochs / 10)
    if not (cfg.weight_decay >= 0 and math.isfinite(cfg.weight_decay)):
        raise ConfigError(f"--weight-decay must be a finite number >= 0, got {cfg.weight_decay}")
    if not (cfg.warmup_epochs >= 0 and math.isfinite(cfg.warmup_epochs)):
        raise ConfigError(f"--warmup-epochs must be a finite number >= 0, got {cfg.warmup_epochs}")
    if cfg.loader not in LOADERS:
        raise ConfigError(f"--loader must be one of {', '.join(LOADERS)}, got {cfg.loader!r}")
    if cfg.strategy not in STRATEGIES:
        raise ConfigError(f"--strategy must be ddp or fsdp, got {cfg.strategy!r}")
    if cfg.strategy == "fsdp" and cls.fsdp_refusal:
        raise ConfigError(f"--strategy fsdp: {cls.fsdp_refusal}")
    if cfg.precision not in ("fp32", "bf16"):
        raise ConfigError(f"--precision must be fp32 or bf16, got {cfg.precision!r}")
    if not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        raise ConfigError(f"--lr must be a finite number > 0, got {cfg.lr}")
    if cfg.batch_size < world:
        raise ConfigError(
            f"--batch-size {cfg.batch_size} is smaller than the world size {world}: every rank "
            f"needs at least one image (use a batch of at least {world})"
        )
    if cfg.batch_size % world:
        raise ConfigError(f"--batch-size {cfg.batch_size} must be divisible by the world size {world}")
    if cfg.batch_size // world < cls.min_batch_per_rank:
        raise ConfigError(
            f"--batch-size: {cls.name} needs at least {cls.min_batch_per_rank} images per rank (batch "
            f"statistics, negatives), got {cfg.batch_size // world}"
        )
    check_device(cfg.device)
    check_step_mode(cfg, cls, world)
    if cfg.resume and cfg.overwrite:
        raise ConfigError("--resume and --overwrite exclude each other: continue the run in --out, or replace it")
    cfg.out = cfg.out or os.path.join("runs", cfg.method)
    return cfg


def check_device(device: str | None, *, what: str = "--device") -> None:
    """`device` is None, cpu, cuda or cuda:N of a GPU this machine has."""
    if device is None:
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"{what}: unknown device {device!r} (use cpu, cuda or cuda:N)")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{what} {device}: CUDA is not available on this machine (use --device cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"{what} {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def _on_cuda(device: str | None) -> bool:
    return torch.device(device).type == "cuda" if device else torch.cuda.is_available()


def check_step_mode(cfg: PretrainConfig, method_cls=None, world: int = 1) -> None:
    """`--compile` and `--cuda-graph` on the run's device, else a one-line `ConfigError` saying why.

    Args:
        cfg: the config being resolved.
        method_cls: the method's class (its `graph_refusal`); None skips the method's check.
        world: the number of ranks.
    """
    for key in ("compile", "cuda_graph"):
        if not isinstance(getattr(cfg, key), bool):
            raise ConfigError(f"{flag_name(key)} must be True or False, got {getattr(cfg, key)!r}")
    if not cfg.cuda_graph:
        return
    if not _on_cuda(cfg.device):
        raise ConfigError("--cuda-graph needs a CUDA device")
    if cfg.compile:
        raise ConfigError("--cuda-graph and --compile exclude each other: choose one way to run the step")
    if world > 1:
        raise ConfigError(
            f"--cuda-graph captures the step of one process (the gradient all-reduce of {world} ranks is not "
            "captured); use --compile on several GPUs"
        )
    if method_cls is not None and method_cls.graph_refusal:
        raise ConfigError(f"--cuda-graph: {method_cls.graph_refusal}")


# What `--resume` may change: these flags apply to the resumed run (with a printed note); every other flag that
# differs from the saved config is an error. `epochs` extends (or shortens, not below the epoch reached) the run:
# the warm-up + cosine schedule and the method's step-based schedules (EMA momentum, DINO's teacher temperature)
# are recomputed for the new total and continue from the step reached. `lr` rescales the whole schedule from the
# step reached. `device` moves the run (not bit-exact across devices). `compile` / `cuda_graph` change how the
# step executes, not what it computes.
RESUMABLE = ("epochs", "lr", "stop_after", "workers", "knn", "progress", "device", "compile", "cuda_graph")
# Run-control flags that are never part of the comparison.
_NOT_COMPARED = ("out", "resume", "overwrite")


def flag_name(field: str) -> str:
    """The command-line flag of a `PretrainConfig` field."""
    return {"knn": "--no-knn", "progress": "--no-progress"}.get(field, "--" + field.replace("_", "-"))


def explicit_fields(cfg: PretrainConfig) -> set[str]:
    """The fields of `cfg` that differ from `PretrainConfig()`'s defaults (what a Python caller set)."""
    default = PretrainConfig()
    return {f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != getattr(default, f.name)}


def merge_resume(
    saved: PretrainConfig,
    given: PretrainConfig,
    explicit: Iterable[str],
    *,
    world: int = 1,
    reached: int = 0,
    log: Callable[[str], None] = print,
) -> PretrainConfig:
    """The config of a resumed run: `saved`, with the `RESUMABLE` flags among `explicit` taken from `given`
    (each change printed). Any other explicit flag whose (resolved) value differs from `saved` is a
    `ConfigError` listing every difference."""
    explicit = [k for k in sorted(set(explicit)) if k not in _NOT_COMPARED]
    merged = dataclasses.replace(saved, **{k: getattr(given, k) for k in explicit})
    merged = resolve(dataclasses.replace(merged, resume=False, overwrite=False), world)
    changed = {k: (getattr(saved, k), getattr(merged, k)) for k in explicit if getattr(merged, k) != getattr(saved, k)}
    refused = {k: v for k, v in changed.items() if k not in RESUMABLE}
    if refused:
        diff = "; ".join(f"{flag_name(k)}: saved {a!r}, given {b!r}" for k, (a, b) in refused.items())
        raise ConfigError(
            f"--resume continues the saved run, which differs in {diff} (only "
            f"{', '.join(map(flag_name, RESUMABLE))} may change on resume; start a new run with "
            f"another --out, or --overwrite)"
        )
    if "epochs" in changed and merged.epochs < reached:
        raise ConfigError(f"--epochs {merged.epochs}: the run already reached epoch {reached}")
    result = dataclasses.replace(
        saved, **{k: getattr(merged, k) for k in changed}, out=given.out, resume=True, overwrite=False
    )
    # invocation-only: never inherited
    for key in ("stop_after", "knn", "progress", "workers", "device", "compile", "cuda_graph"):
        if key not in explicit:
            setattr(result, key, getattr(given, key))
    for key, (old, new) in changed.items():
        if key in ("epochs", "lr", "device"):
            extra = {
                "epochs": " (the lr schedule is recomputed for the new total)",
                "lr": " (the lr schedule is rescaled from the step reached)",
                "device": " (results are bit-exact only on the saved device)",
            }[key]
            log(f"note: --resume with --{key} {new} instead of the saved {old}{extra}")
    return result
