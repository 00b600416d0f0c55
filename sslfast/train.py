"""The pretraining loop behind `sslfast pretrain`: data, method, optimizer and schedule, checkpoints, resume,
NaN stop, metrics and pictures, kNN evaluation; multi-GPU through torchrun (DDP).

    from sslfast.train import PretrainConfig, pretrain
    result = pretrain(PretrainConfig(method="byol", epochs=10))      # -> dict written to <out>/metrics.json

Run directory `out`:
  checkpoint.pt   written after every epoch through `checkpoint.pt.tmp` + `os.replace` (atomic): method state
                  (student, EMA teacher, queue, DINO center), optimizer, scheduler, every RNG state, the epoch
                  and step reached (the loader position: checkpoints sit at epoch boundaries and each epoch's
                  order and augmentations derive from (seed, epoch, rank)), the loss history and the config.
  metrics.json    config, per-epoch loss / lr / images/s / seconds, kNN accuracies (pretrained vs random init).
  loss_curve.png  per-step loss.   reconstructions.png (MAE): images | masked | reconstructed.

`resume=True` restores all of it and continues with the checkpoint's config, so a run stopped after any epoch
and resumed ends with the weights of an uninterrupted run (on the same device and thread count). A non-finite
loss stops the run with `NonFiniteLossError` before anything is written, leaving the last good checkpoint.
"""
from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import math
import os
import random
import time
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .data import SSLLoader, get_preset
from .data import datasets as D
from .distributed import is_distributed, rank_and_world
from .methods import Method, build_method, get_method
from .models import build_backbone, check_backbone, convert_sync_batchnorm, is_vit
from .optim import AdamWEMA, LARSEMA

DEFAULT_DATA = "digits"
CHECKPOINT = "checkpoint.pt"


class ConfigError(ValueError):
    """A bad argument of `sslfast pretrain` / `sslfast eval` (the CLI prints it and exits with status 2)."""


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stopped and the last good checkpoint was kept."""


@dataclasses.dataclass
class PretrainConfig:
    """Every knob of `sslfast pretrain` (None: the method's / dataset's default, resolved by `resolve`)."""
    method: str = "simclr"
    data: str | None = None            # None or "digits": the embedded scikit-learn digits; else an image folder
    backbone: str | None = None        # default: resnet_tiny / vit_micro on digits, resnet50 / vit_small otherwise
    epochs: int | None = None
    batch_size: int | None = None      # global batch (split over ranks)
    lr: float | None = None            # base lr for a batch of 256 (default: the method's recipe)
    optimizer: str | None = None       # lars | adamw | sgd (default: the method's recipe)
    precision: str = "fp32"            # fp32 | bf16 (autocast)
    out: str | None = None             # default: runs/<method>
    resume: bool = False
    image_size: int | None = None
    weight_decay: float | None = None
    warmup_epochs: float | None = None    # default: the recipe's, at most a tenth of the run
    profile: str | None = None         # paper | small (default: small on digits, paper otherwise)
    seed: int = 0
    device: str | None = None
    workers: int = 4
    knn: bool = True                   # evaluate kNN (pretrained vs random init) at the end
    stop_after: int | None = None      # stop after this many epochs of the run (resume later)
    progress: bool = True

    @property
    def embedded(self) -> bool:
        return self.data in (None, DEFAULT_DATA)


# Defaults of the embedded digits demo, measured to finish on 2 CPU cores in well under 3 minutes.
DIGITS_DEFAULTS = dict(epochs=40, batch_size=256, image_size=16)
IMAGENET_DEFAULTS = dict(epochs=100, batch_size=256, image_size=224)


def _recipe(cfg: PretrainConfig) -> dict:
    """The method's training recipe for the profile (MoCo v3 has a separate one for ViTs)."""
    cls = get_method(cfg.method)
    return cls.recipe(cfg.profile, **({"vit": is_vit(cfg.backbone)} if cls.name == "mocov3" else {}))


def resolve(cfg: PretrainConfig, world: int = 1) -> PretrainConfig:
    """Fills the defaults and checks every argument (ConfigError names the flag)."""
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
    if cfg.backbone is None:  # DINO's and MAE's papers are ViT-first; on the CPU demo only MAE needs one
        if cfg.profile == "small":
            cfg.backbone = "vit_micro" if cfg.method == "mae" else "resnet_tiny"
        else:
            cfg.backbone = "vit_small" if cfg.method in ("mae", "dino") else "resnet50"
    try:
        check_backbone(cfg.backbone)
    except ValueError as err:
        raise ConfigError(f"--backbone: {err}") from None
    if cfg.method == "mae" and not is_vit(cfg.backbone):
        raise ConfigError(f"--backbone: mae needs a ViT backbone (vit_micro, vit_tiny, vit_small, vit_base), "
                          f"got {cfg.backbone!r}")
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
    if cfg.precision not in ("fp32", "bf16"):
        raise ConfigError(f"--precision must be fp32 or bf16, got {cfg.precision!r}")
    for key in ("epochs", "batch_size", "image_size"):
        value = getattr(cfg, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"--{key.replace('_', '-')} must be a positive integer, got {value!r}")
    if not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        raise ConfigError(f"--lr must be a finite number > 0, got {cfg.lr}")
    if cfg.batch_size < world:
        raise ConfigError(f"--batch-size {cfg.batch_size} is smaller than the world size {world}: every rank "
                          f"needs at least one image (use a batch of at least {world})")
    if cfg.batch_size % world:
        raise ConfigError(f"--batch-size {cfg.batch_size} must be divisible by the world size {world}")
    if cfg.batch_size // world < 2 and cfg.method in ("simclr", "mocov3", "simsiam", "byol", "barlowtwins",
                                                      "vicreg"):
        raise ConfigError(f"--batch-size: {cfg.method} needs at least 2 images per rank (batch statistics, "
                          f"negatives), got {cfg.batch_size // world}")
    cfg.out = cfg.out or os.path.join("runs", cfg.method)
    return cfg


# ------------------------------------------------------------------------------------------------ setup
def init_distributed(device: str | None) -> tuple[int, int, torch.device]:
    """torchrun: one process per GPU (WORLD_SIZE > 1 → a process group, NCCL on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    dev = torch.device(device) if device else torch.device("cuda" if use_cuda else "cpu")
    if use_cuda and dev.index is None:
        dev = torch.device("cuda", local if world > 1 else torch.cuda.current_device())
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = rank_and_world()
    return rank, world, dev


def build_optimizer(method: Method, cfg: PretrainConfig):
    """The optimizer of the recipe, fused with the teacher EMA (`sslfast.optim`) for lars / adamw, and the
    per-group schedule factors (warm-up + cosine, or constant for `fixed_lr` groups)."""
    recipe = _recipe(cfg)
    lr = cfg.lr * cfg.batch_size / 256
    groups = []
    for g in method.param_groups():
        g = dict(g)
        g["lr"] = lr * g.pop("lr_scale", 1.0)
        g["weight_decay"] = cfg.weight_decay * g.pop("weight_decay_scale", 1.0)
        groups.append(g)
    momentum = recipe.get("momentum", 0.9)
    if cfg.optimizer == "lars":
        opt = LARSEMA(groups, teacher=method.ema, lr=lr, momentum=momentum, weight_decay=cfg.weight_decay)
    elif cfg.optimizer == "adamw":
        opt = AdamWEMA(groups, teacher=method.ema, lr=lr, betas=tuple(recipe.get("betas", (0.9, 0.999))),
                       weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=cfg.weight_decay)
    return opt


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up over `warmup` steps, then half a cosine to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def build_scheduler(opt, total_steps: int, warmup_steps: int):
    lambdas = [(lambda s: 1.0) if g.get("fixed_lr") else (lambda s: lr_factor(s, total_steps, warmup_steps))
               for g in opt.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(opt, lambdas)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_atomic(obj, path: str) -> None:
    """torch.save to `path + ".tmp"`, flushed to disk, then renamed over `path` (never a torn checkpoint)."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_model(cfg: PretrainConfig, world: int = 1, **overrides) -> Method:
    """The backbone and method of `cfg` (same seed → same initial weights); `overrides` go to the method."""
    seed_everything(cfg.seed)
    backbone = build_backbone(cfg.backbone, image_size=cfg.image_size)
    if world > 1:
        convert_sync_batchnorm(backbone)  # global BN statistics (the heads' BNs already are)
    return build_method(cfg.method, backbone, profile=cfg.profile, gather_distributed=world > 1, **overrides)


# ------------------------------------------------------------------------------------------------ progress
class _Progress:
    """tqdm (or rich, or a line per epoch) showing loss, lr and images/s."""

    def __init__(self, enabled: bool, total: int, desc: str):
        self.bar = None
        self.kind = None
        if not enabled:
            return
        try:
            from tqdm.auto import tqdm

            self.bar, self.kind = tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True, leave=False), "tqdm"
        except ImportError:
            try:
                from rich.progress import Progress

                self.bar, self.kind = Progress(transient=True), "rich"
                self.bar.start()
                self.task = self.bar.add_task(desc, total=total)
            except ImportError:
                pass

    def update(self, **info):
        text = ", ".join(f"{k}={v}" for k, v in info.items())
        if self.kind == "tqdm":
            self.bar.set_postfix_str(text, refresh=False)
            self.bar.update(1)
        elif self.kind == "rich":
            self.bar.update(self.task, advance=1, description=text)

    def close(self):
        if self.kind == "tqdm":
            self.bar.close()
        elif self.kind == "rich":
            self.bar.stop()


# ------------------------------------------------------------------------------------------------ training
@dataclasses.dataclass
class Run:
    """Everything a training step touches (built by `setup`)."""
    cfg: PretrainConfig
    method: Method
    model: nn.Module              # the method, wrapped in DistributedDataParallel when world > 1
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    device: torch.device
    world: int = 1

    @property
    def fused_ema(self) -> bool:
        return self.method.ema is not None and isinstance(self.optimizer, (AdamWEMA, LARSEMA))


def setup(cfg: PretrainConfig, steps_per_epoch: int, device, world: int = 1, **overrides) -> Run:
    """Model, optimizer and schedule of a resolved config (DDP-wrapped when world > 1); `overrides` go to the
    method's constructor."""
    device = torch.device(device)
    method = build_model(cfg, world, **overrides).to(device)
    if device.type == "cuda" and not is_vit(cfg.backbone):
        method.to(memory_format=torch.channels_last)  # NHWC convolutions (tensor cores)
    method.configure(steps_per_epoch * cfg.epochs, steps_per_epoch)
    opt = build_optimizer(method, cfg)
    sched = build_scheduler(opt, steps_per_epoch * cfg.epochs, round(cfg.warmup_epochs * steps_per_epoch))
    model = method
    if world > 1:
        # buffers (global-BN statistics, queue, center) stay equal on every rank by construction: no per-step
        # broadcast (torch >= 2.13 names the switch forward_sync_buffers)
        ddp = nn.parallel.DistributedDataParallel
        no_sync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(ddp).parameters else \
            "broadcast_buffers"
        model = ddp(method, device_ids=[device.index] if device.type == "cuda" else None, **{no_sync: False})
    return Run(cfg, method, model, opt, sched, device, world)


def train_step(run: Run, views) -> torch.Tensor:
    """One optimizer step on a batch of views; returns the (detached) loss of this rank."""
    views = [v.to(run.device, non_blocking=True) for v in views]
    with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=run.cfg.precision == "bf16"):
        loss = run.model(views)
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    run.method.before_optimizer_step()
    run.optimizer.step()          # lars / adamw: the teacher EMA is fused into this step
    run.scheduler.step()
    if run.method.ema is not None and not run.fused_ema:
        run.method.ema.update()
    run.method.after_step()
    return loss.detach()


def pretrain(cfg: PretrainConfig, log: Callable[[str], None] = print) -> dict:
    """Runs (or resumes) a pretraining; returns the metrics also written to `<out>/metrics.json`."""
    cfg = resolve(cfg, int(os.environ.get("WORLD_SIZE", "1")))  # every argument checked before any setup
    ckpt_path = os.path.join(cfg.out, CHECKPOINT)
    state = None
    if cfg.resume:
        if not os.path.isfile(ckpt_path):
            raise ConfigError(f"--resume: no checkpoint at {ckpt_path}")
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        saved = PretrainConfig(**state["config"])
        saved.out, saved.resume, saved.stop_after = cfg.out, True, cfg.stop_after
        saved.device, saved.progress, saved.knn = cfg.device, cfg.progress, cfg.knn
        cfg = saved
    rank, world, device = init_distributed(cfg.device)
    say = log if rank == 0 else (lambda s: None)
    if state is None and os.path.isfile(ckpt_path):
        say(f"note: {ckpt_path} exists; starting a new run over it (pass --resume to continue it)")
    os.makedirs(cfg.out, exist_ok=True)

    loader = _data_loader(cfg, rank, world, device)
    steps_per_epoch = len(loader)
    run = setup(cfg, steps_per_epoch, device, world)
    method, opt, sched = run.method, run.optimizer, run.scheduler
    history: dict = {"step_loss": [], "epochs": []}
    start_epoch = 0
    if state is not None:
        method.load_state_dict(state["method"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        history = state["history"]
        start_epoch = state["epoch"]
        say(f"resuming {cfg.method} from {ckpt_path} at epoch {start_epoch}/{cfg.epochs}")
    say(f"sslfast pretrain: {cfg.method} on {cfg.data} ({len(loader.source)} images), backbone {cfg.backbone} "
        f"at {cfg.image_size}px, {cfg.epochs} epoch(s) × {steps_per_epoch} steps of {cfg.batch_size}, "
        f"{cfg.optimizer} lr {cfg.lr:g}·B/256, {cfg.precision}, {world} process(es) on {device.type}")

    for epoch in range(start_epoch, cfg.epochs):
        if cfg.stop_after is not None and epoch - start_epoch >= cfg.stop_after:
            break
        method.train()
        loader.set_epoch(epoch)
        bar = _Progress(cfg.progress and rank == 0, steps_per_epoch, f"epoch {epoch + 1}/{cfg.epochs}")
        t0, seen, loss_sum = time.perf_counter(), 0, 0.0
        for step, views in enumerate(loader):
            loss = train_step(run, views).float()
            if world > 1:  # every rank sees the same value, so a NaN stops all of them at the same step
                dist.all_reduce(loss)
                loss /= world
            value = loss.item()
            if not math.isfinite(value):
                bar.close()
                kept = f"the last good checkpoint {ckpt_path} (epoch {epoch}) is kept" if os.path.isfile(ckpt_path) \
                    else "no checkpoint had been written yet"
                raise NonFiniteLossError(f"loss became {value} at epoch {epoch + 1}, step {step + 1}: stopping "
                                         f"({kept}). Try a lower --lr, or --precision fp32.")
            seen += views[0].shape[0] * world
            loss_sum += value
            history["step_loss"].append(value)
            bar.update(loss=f"{value:.4f}", lr=f"{opt.param_groups[0]['lr']:.3g}",
                       img_s=f"{seen / max(time.perf_counter() - t0, 1e-9):.0f}")
        bar.close()
        seconds = time.perf_counter() - t0
        record = {"epoch": epoch + 1, "loss": loss_sum / steps_per_epoch, "lr": opt.param_groups[0]["lr"],
                  "images_per_s": seen / seconds, "seconds": seconds}
        history["epochs"].append(record)
        say(f"epoch {epoch + 1}/{cfg.epochs}  loss {record['loss']:.4f}  {record['images_per_s']:.0f} images/s  "
            f"{seconds:.1f}s")
        if rank == 0:
            save_atomic({"method": method.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                         "rng": rng_state(), "epoch": epoch + 1, "history": history,
                         "config": dataclasses.asdict(cfg)}, ckpt_path)
    loader.close()
    finished = bool(history["epochs"]) and history["epochs"][-1]["epoch"] == cfg.epochs
    result = {"config": dataclasses.asdict(cfg), "epochs": history["epochs"],
              "train_seconds": sum(e["seconds"] for e in history["epochs"]), "finished": finished,
              "world_size": world, "device": str(device)}
    if rank == 0:
        if finished and cfg.knn:
            result["knn"] = knn_compare(cfg, method, device, say)
        _write_outputs(cfg, method, history, result, device)
        say(f"wrote {cfg.out}/{{{CHECKPOINT}, metrics.json, loss_curve.png"
            f"{', reconstructions.png' if cfg.method == 'mae' else ''}}}")
    if is_distributed():
        dist.barrier()
    return result


# ------------------------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def extract_features(backbone: nn.Module, images: "LabeledImages") -> tuple[torch.Tensor, torch.Tensor]:
    """(features [N, D] fp32 on the CPU, labels [N]) of the backbone in eval mode."""
    was = backbone.training
    backbone.eval()
    feats, labels = [], []
    for x, y in images.batches():
        feats.append(backbone(x).float().cpu())
        labels.append(y.cpu())
    backbone.train(was)
    return torch.cat(feats), torch.cat(labels)


def knn_accuracy(train_f: torch.Tensor, train_y: torch.Tensor, test_f: torch.Tensor, test_y: torch.Tensor,
                 k: int = 20, temperature: float = 0.07) -> float:
    """Weighted kNN on cosine similarity (Wu et al. 2018, as DINO's eval_knn): each of the k nearest training
    features votes for its class with weight exp(sim/T)."""
    train_f, test_f = nn.functional.normalize(train_f, dim=1), nn.functional.normalize(test_f, dim=1)
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    k = min(k, len(train_f))
    correct = 0
    for i in range(0, len(test_f), 256):
        sim = test_f[i:i + 256] @ train_f.T
        top, idx = sim.topk(k, dim=1)
        votes = torch.zeros(len(top), num_classes).scatter_add_(1, train_y[idx], (top / temperature).exp())
        correct += (votes.argmax(1) == test_y[i:i + 256]).sum().item()
    return correct / len(test_f)


def linear_probe(train_f, train_y, test_f, test_y, epochs: int = 100, lr: float = 1e-2, batch: int = 1024,
                 seed: int = 0) -> float:
    """Logistic regression on frozen features (standardized by the training set's statistics, as the
    affine-free BatchNorm of MAE's linear probe), AdamW with a cosine lr; returns test accuracy."""
    g = torch.Generator().manual_seed(seed)
    mean, std = train_f.mean(0), train_f.std(0) + 1e-6
    train_f, test_f = (train_f - mean) / std, (test_f - mean) / std
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    torch.manual_seed(seed)
    head = nn.Linear(train_f.shape[1], num_classes)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * math.ceil(len(train_f) / batch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps, 0))
    for _ in range(epochs):
        perm = torch.randperm(len(train_f), generator=g)
        for i in range(0, len(perm), batch):
            idx = perm[i:i + batch]
            loss = nn.functional.cross_entropy(head(train_f[idx]), train_y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    with torch.no_grad():
        return (head(test_f).argmax(1) == test_y).float().mean().item()


def fine_tune(backbone: nn.Module, train: "LabeledImages", test: "LabeledImages", device, epochs: int = 10,
              lr: float = 1e-3, seed: int = 0) -> float:
    """Backbone + linear head trained end to end with AdamW (the backbone at a tenth of the head's lr, warm-up
    + cosine); returns test accuracy. `backbone` is trained in place (pass a copy)."""
    torch.manual_seed(seed)
    head = nn.Linear(backbone.num_features, max(train.num_classes, test.num_classes)).to(device)
    opt = torch.optim.AdamW([{"params": backbone.parameters(), "lr": lr / 10}, {"params": head.parameters()}],
                            lr=lr, weight_decay=0.05)
    steps = epochs * max(1, len(train) // train.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps, steps // 10))
    backbone.train()
    for epoch in range(epochs):
        for x, y in train.batches(shuffle=True, epoch=seed * 1000 + epoch, drop_last=len(train) > train.batch_size):
            loss = nn.functional.cross_entropy(head(backbone(x)), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    feats, labels = extract_features(backbone, test)
    with torch.no_grad():
        return (head(feats.to(device)).argmax(1).cpu() == labels).float().mean().item()


def knn_compare(cfg: PretrainConfig, method: Method, device, say=print) -> dict:
    """kNN accuracy of the pretrained backbone and of the same backbone at its random initialization
    (at most 20000 training and 5000 test images)."""
    train, test = labeled_sets(cfg, device, max_train=20000, max_test=5000)
    out = {}
    random_init = build_model(cfg).to(device).eval_backbone()
    for name, net in (("pretrained", method.eval_backbone()), ("random_init", random_init)):
        (ftr, ytr), (fte, yte) = extract_features(net, train), extract_features(net, test)
        out[name] = knn_accuracy(ftr, ytr, fte, yte)
    out["train_images"], out["test_images"] = len(train), len(test)
    say(f"kNN accuracy (k=20, {len(test)} held-out images): pretrained {100 * out['pretrained']:.1f}%  vs  "
        f"random init {100 * out['random_init']:.1f}%")
    return out


def evaluate(checkpoint: str, protocols=("knn", "linear", "finetune"), *, data: str | None = None,
             epochs: int | None = None, device: str | None = None, random_init: bool = False,
             out: str | None = None, log: Callable[[str], None] = print) -> dict:
    """`sslfast eval`: rebuilds the method of a `sslfast pretrain` checkpoint and reports the accuracy of its
    evaluated backbone (and optionally of its random initialization) under each protocol."""
    path = os.path.join(checkpoint, CHECKPOINT) if os.path.isdir(checkpoint) else checkpoint
    if not os.path.isfile(path):
        raise ConfigError(f"--checkpoint: no checkpoint at {path} (run `sslfast pretrain` first)")
    state = torch.load(path, map_location="cpu", weights_only=False)
    cfg = PretrainConfig(**state["config"])
    if data is not None:
        cfg.data = data
        if not cfg.embedded and not os.path.isdir(data):
            raise ConfigError(f"--data: {data!r} is not a folder of images (or 'digits')")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    method = build_model(cfg)
    method.load_state_dict(state["method"])
    nets = {"pretrained": method.eval_backbone()}
    if random_init:
        nets["random_init"] = build_model(cfg).eval_backbone()
    train, test = labeled_sets(cfg, dev)
    log(f"sslfast eval: {cfg.method} / {cfg.backbone} from {path} (epoch {state['epoch']}/{cfg.epochs}) on "
        f"{cfg.data}: {len(train)} train, {len(test)} test images")
    results: dict = {}
    for name, net in nets.items():
        net = net.to(dev)
        res = results[name] = {}
        if "knn" in protocols or "linear" in protocols:
            (ftr, ytr), (fte, yte) = extract_features(net, train), extract_features(net, test)
            if "knn" in protocols:
                res["knn"] = knn_accuracy(ftr, ytr, fte, yte)
            if "linear" in protocols:
                res["linear"] = linear_probe(ftr, ytr, fte, yte, epochs=epochs or 100)
        if "finetune" in protocols:
            res["finetune"] = fine_tune(copy.deepcopy(net), train, test, dev, epochs=epochs or 10)
        log(f"{name:>11}: " + "  ".join(f"{k} {100 * v:.1f}%" for k, v in res.items()))
    if out:
        with open(out, "w") as f:
            json.dump({"checkpoint": path, "config": dataclasses.asdict(cfg), "accuracy": results}, f, indent=1)
    return results


# ------------------------------------------------------------------------------------------------ outputs
def _write_outputs(cfg, method, history, result, device) -> None:
    with open(os.path.join(cfg.out, "metrics.json"), "w") as f:
        json.dump(result, f, indent=1)
    from ._plot import line_plot, save_image_grid

    line_plot(history["step_loss"], os.path.join(cfg.out, "loss_curve.png"), title=f"{cfg.method} loss",
              xlabel="step", ylabel="loss")
    if cfg.method == "mae":
        _, test = labeled_sets(cfg, device)
        imgs = next(test.batches())[0][:8]
        masked, recon = method.reconstruct(imgs, generator=torch.Generator(device).manual_seed(cfg.seed))
        rows = [denormalize(x, test.preset).cpu() for x in (imgs, masked, recon)]
        save_image_grid(rows, os.path.join(cfg.out, "reconstructions.png"))


# ------------------------------------------------------------------------------------------------ data
def _subset(source, idx):
    labels = [source.labels[i] for i in idx]
    if isinstance(source, D.ArraySource):
        if source.batch is not None:
            return D.ArraySource(source.batch[np.asarray(idx, dtype=np.int64)], labels)
        return D.ArraySource([source.images[i] for i in idx], labels)
    return D.FileSource([source.paths[i] for i in idx], labels, source.classes)


def _split(source, test_fraction: float = 0.2, seed: int = 0):
    perm = torch.randperm(len(source), generator=torch.Generator().manual_seed(seed)).tolist()
    n_test = max(1, int(len(source) * test_fraction))
    return _subset(source, sorted(perm[n_test:])), _subset(source, sorted(perm[:n_test]))


def data_sources(cfg: PretrainConfig):
    """(train, test) image sources: the embedded digits split 80/20 (fixed seed), a folder with `train/` and
    `val/` sub-folders, or any other image folder split 80/20. Pretraining reads the train part only."""
    if cfg.embedded:
        return _split(D.digits(cfg.image_size))
    root = cfg.data
    if os.path.isdir(os.path.join(root, "train")) and os.path.isdir(os.path.join(root, "val")):
        return D.find_images(os.path.join(root, "train")), D.find_images(os.path.join(root, "val"))
    return _split(D.find_images(root))


def preset_for(cfg: PretrainConfig, method_cls: type[Method]):
    """The method's augmentation preset at the run's image size; for a ViT every view side is rounded to a
    multiple of the patch size (DINO's local crops)."""
    preset = get_preset(method_cls.preset, cfg.image_size)
    if is_vit(cfg.backbone):
        p = build_backbone(cfg.backbone, image_size=cfg.image_size).patch_size
        views = tuple(dataclasses.replace(v, size=max(p, round(v.size / p) * p)) for v in preset.views)
        preset = dataclasses.replace(preset, views=views)
    return preset


def _data_loader(cfg: PretrainConfig, rank: int, world: int, device):
    train, _ = data_sources(cfg)
    try:
        return SSLLoader(train, preset_for(cfg, get_method(cfg.method)), cfg.batch_size // world, device=device,
                         shard_id=rank, num_shards=world, seed=cfg.seed, drop_last=True, num_workers=cfg.workers)
    except ValueError as err:  # e.g. a batch larger than the data
        raise ConfigError(f"--batch-size {cfg.batch_size}: {err}") from None


class LabeledImages:
    """A labeled source seen without augmentation (a central square crop resized to `image_size`, the
    normalization of the presets), in batches of (images, labels) on `device`."""

    def __init__(self, source, image_size: int, device, batch_size: int = 256, workers: int = 4):
        self.source, self.device, self.batch_size, self.workers = source, torch.device(device), batch_size, workers
        self.preset = get_preset("mae", image_size).replace_views(scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0)
        self.labels = torch.tensor(source.labels, dtype=torch.long)
        self.num_classes = max(len(getattr(source, "classes", ())), int(self.labels.max()) + 1)

    def __len__(self) -> int:
        return len(self.source)

    def batches(self, shuffle: bool = False, epoch: int = 0, drop_last: bool = False):
        loader = SSLLoader(self.source, self.preset, min(self.batch_size, len(self.source)), device=self.device,
                             shard_id=0, num_shards=1, seed=epoch, shuffle=shuffle, drop_last=drop_last,
                             num_workers=self.workers)
        order = loader.shard_indices(0)
        for k, views in enumerate(loader):
            yield views[0], self.labels[order[k * loader.batch_size:(k + 1) * loader.batch_size]].to(self.device)
        loader.close()


def labeled_sets(cfg: PretrainConfig, device, max_train: int | None = None, max_test: int | None = None):
    train, test = data_sources(cfg)
    if max_train and len(train) > max_train:
        train = _split(train, 1 - max_train / len(train), seed=1)[1]
    if max_test and len(test) > max_test:
        test = _split(test, 1 - max_test / len(test), seed=1)[1]
    return (LabeledImages(train, cfg.image_size, device, workers=cfg.workers),
            LabeledImages(test, cfg.image_size, device, workers=cfg.workers))


def denormalize(x: torch.Tensor, preset) -> torch.Tensor:
    mean = torch.tensor(preset.mean, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(preset.std, device=x.device).view(1, -1, 1, 1)
    return x * std + mean

