"""The pretraining loop behind `sslfast pretrain`: epochs, NaN stop, checkpoints, resume, metrics, pictures."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shlex
import time
from typing import Callable, Iterable

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from ..data import Prefetcher
from ..distributed import is_distributed
from .checkpoint import (
    METRICS,
    PREVIOUS,
    all_finite,
    check_writable_dir,
    load_latest,
    nonfinite_names,
    rng_state,
    run_lock,
    save_atomic,
    saved_config,
    set_rng_state,
    write_text_atomic,
)
from .config import (
    CHECKPOINT,
    ConfigError,
    NonFiniteLossError,
    PretrainConfig,
    RunInterrupted,
    explicit_fields,
    merge_resume,
    resolve,
)
from .data import _data_loader, denormalize, labeled_sets
from .evaluation import knn_compare
from .fsdp import any_rank, full_state, load_full_state, local_state
from .step import build_model, init_distributed, setup, train_step


class _Progress:
    """A tqdm bar per epoch showing loss, lr and images/s (nothing when disabled)."""

    def __init__(self, enabled: bool, total: int, desc: str):
        self.bar = tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True, leave=False) if enabled else None

    def update(self, **info):
        if self.bar is not None:
            self.bar.set_postfix_str(", ".join(f"{k}={v}" for k, v in info.items()), refresh=False)
            self.bar.update(1)

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _run_files(out: str) -> list[str]:
    """The files of a run that a new run in `out` would replace."""
    return [name for name in (CHECKPOINT, PREVIOUS, METRICS) if os.path.isfile(os.path.join(out, name))]


def pretrain(cfg: PretrainConfig, log: Callable[[str], None] = print, *, explicit: Iterable[str] | None = None) -> dict:
    """Runs (or resumes) a pretraining; returns the metrics also written to `<out>/metrics.json`.

    A new run refuses an `out` that holds one (checkpoint or metrics) unless `cfg.overwrite`; `cfg.resume`
    continues it with the saved config, where `explicit` (the fields the caller set; default: those that differ
    from `PretrainConfig()`) may change only `config.RESUMABLE` (see `merge_resume`). The run holds an exclusive
    lock on `out` throughout. Under torchrun (WORLD_SIZE > 1) every process calls it; `cfg.strategy` picks DDP or
    FSDP2.

    Args:
        cfg: the run's flags (unresolved; `resolve` fills the defaults).
        log: where progress lines go (rank 0 only).
        explicit: the fields the caller set (the CLI passes the flags given).

    Returns:
        The metrics: config, per-epoch records, train seconds, finished, skipped images, kNN accuracies.

    Raises:
        ConfigError: a bad flag, an `out` holding another run, or a checkpoint that does not fit.
        NonFiniteLossError: the loss or the state became NaN / inf (the last good checkpoint is kept).
        RunInterrupted: Ctrl-C.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    explicit = explicit_fields(cfg) if explicit is None else set(explicit)
    given = resolve(cfg, world)  # every argument checked before any setup
    is_rank0 = int(os.environ.get("RANK", "0")) == 0
    check_writable_dir(given.out)
    with run_lock(given.out) if is_rank0 else contextlib.nullcontext():
        return _pretrain_locked(given, explicit, world, log)


def _pretrain_locked(cfg: PretrainConfig, explicit: set, world: int, log) -> dict:
    out = cfg.out
    ckpt_path = os.path.join(out, CHECKPOINT)
    state = None
    if cfg.resume:
        state, source = load_latest(out, what="--resume", log=log)
        cfg = merge_resume(saved_config(state), cfg, explicit, world=world, reached=state["epoch"], log=log)
    else:
        existing = _run_files(out)
        if existing and not cfg.overwrite:
            raise ConfigError(
                f"--out: {out} holds a run ({', '.join(existing)}); pass --resume to continue it or "
                f"--overwrite to replace it"
            )
    rank, world, device = init_distributed(cfg.device)
    say = log if rank == 0 else (lambda s: None)
    if state is not None:
        say(f"resuming {cfg.method} from {source} at epoch {state['epoch']}/{cfg.epochs}")
    elif _run_files(out) and rank == 0:
        say(f"note: --overwrite: replacing the run in {out} ({', '.join(_run_files(out))})")
        for name in _run_files(out):  # neither a resume nor a fallback into the replaced run
            os.unlink(os.path.join(out, name))
    progress = {"saved_epoch": state["epoch"] if state is not None else None}
    loader = None
    try:
        loader = _open_loader(cfg, rank, world, device)
        return _train(cfg, state, loader, progress, rank, world, device, say)
    except KeyboardInterrupt:
        saved_epoch = progress["saved_epoch"]
        if saved_epoch is None:
            raise RunInterrupted("interrupted: no checkpoint was written yet; start the run again") from None
        resume = f"sslfast pretrain --resume --out {shlex.quote(out)}"
        raise RunInterrupted(
            f"interrupted: {ckpt_path} of epoch {saved_epoch} is kept; continue with `{resume}`"
        ) from None
    finally:
        if loader is not None:
            loader.close()


def _train(cfg: PretrainConfig, state, loader, progress: dict, rank: int, world: int, device, say) -> dict:
    """Epochs from the checkpoint `state` (or the start), a checkpoint after each; then kNN and the outputs.
    `progress["saved_epoch"]` follows the epoch of the checkpoint on disk."""
    out = cfg.out
    ckpt_path = os.path.join(out, CHECKPOINT)
    steps_per_epoch = len(loader)
    run = setup(cfg, steps_per_epoch, device, world)
    history: dict = {"step_loss": [], "epochs": [], "bad_files": {}}
    start_epoch = 0
    if state is not None:
        history = _restore(run, state, lr_changed=state["config"]["lr"] != cfg.lr)
        start_epoch = state["epoch"]
    say(
        f"sslfast pretrain: {cfg.method} on {cfg.data} ({len(loader.source)} images), backbone {cfg.backbone} "
        f"at {cfg.image_size}px, {cfg.epochs} epoch(s) × {steps_per_epoch} steps of {cfg.batch_size}, "
        f"{cfg.optimizer} lr {cfg.lr:g}·B/256, {cfg.precision}, {world} process(es) on {device.type}"
    )
    for epoch in range(start_epoch, cfg.epochs):
        if cfg.stop_after is not None and epoch - start_epoch >= cfg.stop_after:
            break
        _train_epoch(run, loader, epoch, history, ckpt_path, progress["saved_epoch"], rank, say)
        _check_finite_state(run, epoch, ckpt_path, progress["saved_epoch"])
        method_state, optimizer_state = _states(run)
        if rank == 0:
            save_atomic(
                {
                    "method": method_state,
                    "optimizer": optimizer_state,
                    "scheduler": run.scheduler.state_dict(),
                    "rng": rng_state(),
                    "epoch": epoch + 1,
                    "history": history,
                    "config": dataclasses.asdict(cfg),
                },
                ckpt_path,
                keep_previous=os.path.join(out, PREVIOUS),
            )
        progress["saved_epoch"] = epoch + 1
    finished = bool(history["epochs"]) and history["epochs"][-1]["epoch"] == cfg.epochs
    result = {
        "config": dataclasses.asdict(cfg),
        "epochs": history["epochs"],
        "train_seconds": sum(e["seconds"] for e in history["epochs"]),
        "finished": finished,
        "skipped_images": len(history["bad_files"]),
        "bad_files": dict(list(history["bad_files"].items())[:100]),
        "world_size": world,
        "device": str(device),
    }
    method = run.method
    if run.sharded and ((finished and cfg.knn) or run.method.pictures):
        method = _whole_method(run)
    if rank == 0:
        if finished and cfg.knn:
            result["knn"] = knn_compare(cfg, method, device, say)
        _write_outputs(cfg, method, history, result, device)
        written = ([CHECKPOINT] if os.path.isfile(ckpt_path) else []) + [
            METRICS,
            "loss_curve.png",
            *run.method.pictures,
        ]
        say(f"wrote {out}/{{{', '.join(written)}}}")
    if is_distributed():
        dist.barrier()
    return result


def _states(run) -> tuple[dict, dict]:
    """(method, optimizer) state dicts of the checkpoint: whole tensors (gathered on rank 0 under FSDP, a
    collective then)."""
    if run.sharded:
        return full_state(run.method, run.optimizer)
    return run.method.state_dict(), run.optimizer.state_dict()


def _whole_method(run):
    """An unsharded copy of a sharded run's method on rank 0 (None elsewhere), for the evaluation and pictures
    that rank 0 computes alone. A collective."""
    state, _ = full_state(run.method, run.optimizer)
    if dist.get_rank() != 0:
        return None
    method = build_model(run.cfg).to(run.device)
    method.load_state_dict(state)
    return method


def _open_loader(cfg: PretrainConfig, rank: int, world: int, device):
    """The pretraining loader; an empty or missing data folder is a `ConfigError` naming --data."""
    try:
        return _data_loader(cfg, rank, world, device)
    except ConfigError:
        raise
    except (ValueError, OSError) as err:
        raise ConfigError(f"--data: {err}") from None


def _restore(run, state: dict, *, lr_changed: bool) -> dict:
    """Loads the method, optimizer, scheduler and RNG states of a checkpoint into a freshly built run and
    returns its history. With a changed --lr the schedule's base lrs are the new config's (the warm-up + cosine
    factor continues from the step reached). A checkpoint that does not fit is a `ConfigError`."""
    fresh = [g["initial_lr"] for g in run.optimizer.param_groups]
    try:
        if run.sharded:
            load_full_state(run.method, run.optimizer, state["method"], state["optimizer"])
        else:
            run.method.load_state_dict(state["method"])
            run.optimizer.load_state_dict(state["optimizer"])
        run.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        history = state["history"]
        history.setdefault("bad_files", {})
        if not isinstance(history["step_loss"], list) or not isinstance(history["epochs"], list):
            raise TypeError("history")
    except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"--resume: the checkpoint does not fit the run it describes ({first[:200]})") from None
    if lr_changed:
        run.scheduler.base_lrs = fresh
        for group, base, factor in zip(run.optimizer.param_groups, fresh, run.scheduler.lr_lambdas):
            group["initial_lr"] = base
            group["lr"] = base * factor(run.scheduler.last_epoch)
        run.scheduler._last_lr = [g["lr"] for g in run.optimizer.param_groups]
    return history


def _train_epoch(run, loader, epoch: int, history: dict, ckpt_path: str, saved_epoch, rank: int, say) -> None:
    cfg, opt, world = run.cfg, run.optimizer, run.world
    run.method.train()
    loader.set_epoch(epoch)
    steps_per_epoch = len(loader)
    bar = _Progress(cfg.progress and rank == 0, steps_per_epoch, f"epoch {epoch + 1}/{cfg.epochs}")
    t0 = time.perf_counter()
    # batch k + 1 is read, decoded and augmented in the background while batch k trains; the prefetcher
    # measures how long each step waited for its data
    batches = Prefetcher(loader, depth=2, device=run.device if run.device.type == "cuda" else None)
    seen, loss_sum = 0, 0.0

    def record(step: int, loss: torch.Tensor, images: int, lr: float) -> None:
        nonlocal seen, loss_sum
        value = loss.item()
        if not math.isfinite(value):
            raise NonFiniteLossError(
                f"loss became {value} at epoch {epoch + 1}, step {step + 1}: stopping "
                f"({_kept(ckpt_path, saved_epoch)}). Try a lower --lr, or --precision fp32."
            )
        seen += images
        loss_sum += value
        history["step_loss"].append(value)
        bar.update(
            loss=f"{value:.4f}",
            lr=f"{lr:.3g}",
            img_s=f"{seen / max(time.perf_counter() - t0, 1e-9):.0f}",
            wait=f"{batches.wait_s * 1e3:.0f}ms",
        )

    # a step's loss is read back after the next step is queued: the read waits for the step before, while the
    # device already has the next one to run (a read right after its own step would idle the device while the
    # host prepares the next); a non-finite loss stops the run one step later, before any checkpoint
    pending = None
    try:
        for step, views in enumerate(_batches(batches, loader, cfg)):
            lr = opt.param_groups[0]["lr"]  # this step's (the scheduler moves it in the step)
            loss = train_step(run, views).float()
            if world > 1:  # every rank sees the same value, so a NaN stops all of them at the same step
                dist.all_reduce(loss)
                loss /= world
            if pending is not None:
                record(*pending)
            pending = (step, loss, views[0].shape[0] * world, lr)
        if pending is not None:
            record(*pending)
    finally:
        bar.close()
        batches.close()
    seconds = time.perf_counter() - t0
    bad = loader.bad_files
    new_bad = [(path, why) for path, why in bad if path not in history["bad_files"]]
    history["bad_files"].update(dict(bad))
    record = {
        "epoch": epoch + 1,
        "loss": loss_sum / steps_per_epoch,
        "lr": opt.param_groups[0]["lr"],
        "images_per_s": seen / seconds,
        "seconds": seconds,
        "data_wait_s": batches.epoch_wait_s,
        "skipped_images": len(history["bad_files"]),
    }
    history["epochs"].append(record)
    skipped = f"  ({len(history['bad_files'])} undecodable image(s) skipped so far)" if history["bad_files"] else ""
    say(
        f"epoch {epoch + 1}/{cfg.epochs}  loss {record['loss']:.4f}  {record['images_per_s']:.0f} images/s  "
        f"{seconds:.1f}s (data wait {batches.epoch_wait_s:.1f}s){skipped}"
    )
    for path, why in new_bad[:3]:
        say(f"  skipped {path}: {why}")


def _batches(batches, loader, cfg: PretrainConfig):
    """The batches of `batches` (the loader, or a prefetcher over it); a source in which nothing decodes is a
    `ConfigError` naming --data."""
    it = iter(batches)
    while True:
        try:
            views = next(it)
        except StopIteration:
            return
        except RuntimeError as err:
            if len(loader.source) and loader.skipped >= len(loader.source):
                raise ConfigError(
                    f"--data: none of the {len(loader.source)} images of {cfg.data} could be read "
                    f"and decoded (first: {loader.bad_files[0][0]}: {loader.bad_files[0][1]})"
                ) from None
            raise err
        yield views


def _kept(ckpt_path: str, saved_epoch) -> str:
    return (
        f"the last good checkpoint {ckpt_path} (epoch {saved_epoch}) is kept"
        if saved_epoch is not None
        else "no checkpoint had been written yet"
    )


def _check_finite_state(run, epoch: int, ckpt_path: str, saved_epoch) -> None:
    """Parameters, buffers and optimizer state are all finite (one fused reduction), else `NonFiniteLossError`:
    a checkpoint never holds NaN / inf. Under FSDP each rank checks its shards and all stop together."""
    if run.sharded:
        named = local_state(run.method, run.optimizer)
        if not any_rank(not all_finite([v for _, v in named]), run.device):
            return
        names = nonfinite_names(named) or ["the shards of another rank"]
        _raise_nonfinite(names, epoch, ckpt_path, saved_epoch)
    method_state = run.method.state_dict()
    opt_tensors = [
        (f"optimizer state {pid}.{name}", v)
        for pid, s in run.optimizer.state_dict()["state"].items()
        for name, v in s.items()
        if isinstance(v, torch.Tensor)
    ]
    tensors = [v for v in method_state.values() if isinstance(v, torch.Tensor)] + [v for _, v in opt_tensors]
    if all_finite(tensors):
        return
    names = nonfinite_names([(k, v) for k, v in method_state.items() if isinstance(v, torch.Tensor)] + opt_tensors)
    _raise_nonfinite(names, epoch, ckpt_path, saved_epoch)


def _raise_nonfinite(names: list[str], epoch: int, ckpt_path: str, saved_epoch) -> None:
    raise NonFiniteLossError(
        f"non-finite values in {', '.join(names)} after epoch {epoch + 1} (the loss was "
        f"finite): stopping without saving ({_kept(ckpt_path, saved_epoch)}). Try a lower "
        f"--lr, or --precision fp32."
    )


def _write_outputs(cfg, method, history, result, device) -> None:
    write_text_atomic(json.dumps(result, indent=1), os.path.join(cfg.out, METRICS))
    from .._plot import line_plot

    line_plot(
        history["step_loss"],
        os.path.join(cfg.out, "loss_curve.png"),
        title=f"{cfg.method} loss",
        xlabel="step",
        ylabel="loss",
    )
    if method.pictures:
        _, test = labeled_sets(cfg, device)
        imgs = next(test.batches())[0]
        method.write_pictures(cfg.out, imgs, denormalize=lambda x: denormalize(x, test.preset), seed=cfg.seed)
