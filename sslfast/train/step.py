"""One training step and what it needs: process group, model, optimizer and schedule."""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
import random

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..distributed import rank_and_world
from ..methods import Method, build_method
from ..models import build_backbone, convert_sync_batchnorm, is_vit
from ..optim import AdamWEMA, LARSEMA
from .config import PretrainConfig, _recipe
from .fsdp import ema_update_local, shard_method
from .graphed import GraphedStep


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


def build_optimizer(method: Method, cfg: PretrainConfig, *, fuse_teacher: bool = True):
    """The optimizer of the recipe over the method's parameter groups.

    Args:
        method: the method (sharded already under FSDP: the optimizer holds the parameters it is given).
        cfg: a resolved config (optimizer, lr for a batch of 256, weight decay, batch size).
        fuse_teacher: lars / adamw also step the teacher EMA (`sslfast.optim`). False (FSDP): the teacher is
            stepped apart, and adamw is `torch.optim.AdamW` (the same math) over the sharded parameters.

    Returns:
        The optimizer; each group keeps the method's extra keys (`fixed_lr`) for the schedule.
    """
    recipe = _recipe(cfg)
    lr = cfg.lr * cfg.batch_size / 256
    groups = []
    for g in method.param_groups():
        g = dict(g)
        g["lr"] = lr * g.pop("lr_scale", 1.0)
        g["weight_decay"] = cfg.weight_decay * g.pop("weight_decay_scale", 1.0)
        groups.append(g)
    momentum = recipe.get("momentum", 0.9)
    teacher = method.ema if fuse_teacher else None
    if cfg.optimizer == "lars":
        opt = LARSEMA(groups, teacher=teacher, lr=lr, momentum=momentum, weight_decay=cfg.weight_decay)
    elif cfg.optimizer == "adamw":
        adamw = AdamWEMA if fuse_teacher else torch.optim.AdamW
        opt = adamw(
            groups,
            **({"teacher": teacher} if fuse_teacher else {}),
            lr=lr,
            betas=tuple(recipe.get("betas", (0.9, 0.999))),
            weight_decay=cfg.weight_decay,
        )
    else:
        # under --cuda-graph, torch's fused SGD: it reads a tensor learning rate on the device (the foreach
        # SGD would read it back on the host, which a capture refuses); the same update
        opt = torch.optim.SGD(
            groups,
            lr=lr,
            momentum=momentum,
            weight_decay=cfg.weight_decay,
            **({"fused": True} if cfg.cuda_graph else {}),
        )
    return opt


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up over `warmup` steps, then half a cosine to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def build_scheduler(opt, total_steps: int, warmup_steps: int):
    lambdas = [
        (lambda s: 1.0) if g.get("fixed_lr") else (lambda s: lr_factor(s, total_steps, warmup_steps))
        for g in opt.param_groups
    ]
    return torch.optim.lr_scheduler.LambdaLR(opt, lambdas)


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


@dataclasses.dataclass
class Run:
    """Everything a training step touches (built by `setup`)."""

    cfg: PretrainConfig
    method: Method
    model: nn.Module  # the method, wrapped in DistributedDataParallel when world > 1 (not under FSDP)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    device: torch.device
    world: int = 1
    sharded: bool = False  # --strategy fsdp on several ranks: the method is sharded with FSDP2
    graph: GraphedStep | None = None  # --cuda-graph: the step captured once and replayed (`train_step` uses it)

    @property
    def fused_ema(self) -> bool:
        return self.method.ema is not None and not self.sharded and isinstance(self.optimizer, (AdamWEMA, LARSEMA))


def setup(cfg: PretrainConfig, steps_per_epoch: int, device, world: int = 1, **overrides) -> Run:
    """Model, optimizer and schedule of a resolved config.

    Args:
        cfg: a resolved `PretrainConfig`.
        steps_per_epoch: optimizer steps per epoch (the schedules' length).
        device: the rank's device.
        world: the number of ranks; above 1 the method is DDP-wrapped (`cfg.strategy == "ddp"`) or sharded
            with FSDP2 (`"fsdp"`, `sslfast.train.fsdp`), and a process group must exist.
        **overrides: keyword arguments of the method's constructor.

    Returns:
        The `Run` a training step takes.
    """
    device = torch.device(device)
    method = build_model(cfg, world, **overrides).to(device)
    if device.type == "cuda" and not is_vit(cfg.backbone):
        method.to(memory_format=torch.channels_last)  # NHWC convolutions (tensor cores)
    method.configure(steps_per_epoch * cfg.epochs, steps_per_epoch)
    sharded = world > 1 and cfg.strategy == "fsdp"
    if sharded:
        shard_method(method, device, world)
    opt = build_optimizer(method, cfg, fuse_teacher=not sharded)
    sched = build_scheduler(opt, steps_per_epoch * cfg.epochs, round(cfg.warmup_epochs * steps_per_epoch))
    model = method
    if world > 1 and not sharded:
        # buffers (global-BN statistics, queue, center) stay equal on every rank by construction: no per-step
        # broadcast (torch >= 2.13 names the switch forward_sync_buffers)
        ddp = nn.parallel.DistributedDataParallel
        no_sync = (
            "forward_sync_buffers"
            if "forward_sync_buffers" in inspect.signature(ddp).parameters
            else "broadcast_buffers"
        )
        model = ddp(method, device_ids=[device.index] if device.type == "cuda" else None, **{no_sync: False})
    if cfg.compile:
        # the method's forward (backbone, heads, the sslfast custom ops) traced and compiled; the parameters,
        # buffers and the state dict stay the method's own (`run.method`)
        model = torch.compile(model)
    run = Run(cfg, method, model, opt, sched, device, world, sharded)
    if cfg.cuda_graph:
        run.graph = GraphedStep(run)
    return run


def forward_backward(run: Run, views, *, cache_casts: bool = True) -> torch.Tensor:
    """The loss of a batch of views and its backward (gradients in the parameters' `.grad`); returns the loss.

    `cache_casts=False` turns autocast's cache of the weights' bf16 copies off (a CUDA-graph capture: a cached
    copy made in the capture would be reused after it, with the weights of the capture)."""
    views = [v.to(run.device, non_blocking=True) for v in views]
    bf16 = run.cfg.precision == "bf16"
    with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=bf16, cache_enabled=cache_casts):
        loss = run.model(views)
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    return loss


def optimizer_step(run: Run) -> None:
    """The optimizer step after `forward_backward`: the method's hooks, the schedule and the teacher EMA."""
    run.method.before_optimizer_step()
    run.optimizer.step()  # lars / adamw: the teacher EMA is fused into this step
    run.scheduler.step()
    if run.method.ema is not None and not run.fused_ema:
        if run.sharded:
            ema_update_local(run.method.ema)  # the EMA on each rank's shards
        else:
            run.method.ema.update()
    run.method.after_step()


def train_step(run: Run, views, *, graphed: bool = True) -> torch.Tensor:
    """One optimizer step on a batch of views.

    Args:
        run: what `setup` built.
        views: this rank's augmented views (a list of [B, C, H, W] tensors).
        graphed: with `--cuda-graph` (`run.graph`), replay the captured step; False runs it eagerly (the
            graph's warm-up steps).

    Returns:
        The (detached) loss of this rank.
    """
    if graphed and run.graph is not None:
        return run.graph(views)
    loss = forward_backward(run, views)
    optimizer_step(run)
    return loss.detach()
