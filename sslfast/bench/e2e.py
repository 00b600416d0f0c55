"""`sslfast bench --ops e2e`: images/s of whole pretraining steps from JPEG files on disk, the loader and the step
together, as `sslfast pretrain` runs them (a `Prefetcher` over the run's `SSLLoader`, `train_step`, each loss read
back one step late).

Rows (`ROWS`): the torch DataLoader with `SSLFAST_BACKEND=reference` (the usual pipeline, the baseline); the torch
loader with the fused ops; the native loader (fused augmentation on the device); native + `--compile`; native +
`--cuda-graph` (the whole step replayed from a CUDA graph); DALI; and the step alone on one batch already on the
device (the ceiling: no data loading at all). A row that cannot run here is kept, with `unavailable` saying why.

Each row runs two passes of `steps` steps after `warmup` steps. The throughput pass is the training loop as it is:
images/s = batch · steps / wall time. The split pass times the phases of each step with `perf_counter`,
synchronizing the device at the phase boundaries (so it perturbs the overlap, and is kept apart): data wait (the
`Prefetcher`'s `step_waits`), forward + backward (`step.forward_backward`), optimizer + EMA (`step.optimizer_step`),
and other host time (the step's wall time, from the end of the step before, minus those three: the loss read-back,
the prefetcher's hand-over, the loop). A `--cuda-graph` step is one replay: its forward, backward, optimizer and EMA
are timed together, under fwd+bwd (opt+EMA reads "in fwd+bwd"). Peak memory: the largest allocation of the
throughput pass (CUDA), model and optimizer state included.

Inputs: a folder of images (`data`), by default a generated set of smooth random JPEGs in the cache directory
(`jpeg_set`): 2,000 at 500×375 on CUDA, 64 at 64×48 on the CPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time

import numpy as np
import torch

from . import _columns, _fmt, reference_backend

# (name, loader backend, sslfast backend: "fused" or "reference", step mode: None, "compile" or "cuda_graph" (the
# `PretrainConfig` flag it sets), from files?)
ROWS = (
    ("torch + reference", "torch", "reference", None, True),
    ("torch + fused", "torch", "fused", None, True),
    ("native + fused", "native", "fused", None, True),
    ("native + fused + compile", "native", "fused", "compile", True),
    ("native + fused + cuda-graph", "native", "fused", "cuda_graph", True),
    ("dali + fused", "dali", "fused", None, True),
    ("step only (device batches)", "native", "fused", None, False),
)


@dataclasses.dataclass
class Settings:
    """What the rows run: the method, backbone (None: the method's `default_backbone` for the device's profile,
    "paper" on CUDA, "small" on the CPU), global batch and training resolution; the generated image set
    (`images` files of `jpeg_size` (width, height)) unless `data` names a folder; steps timed per pass."""

    method: str
    backbone: str | None
    batch: int
    image_size: int
    images: int
    jpeg_size: tuple[int, int]
    steps: int
    warmup: int
    workers: int
    data: str | None = None


def default_settings(device: torch.device) -> Settings:
    """SimCLR on its default backbone (ResNet-50 B=256 224px on CUDA; a CPU-sized smoke run otherwise).

    Args:
        device: the device the rows run on.

    Returns:
        The `Settings` (backbone None: resolved by `run` from the method's traits).
    """
    if device.type == "cuda":
        return Settings("simclr", None, 256, 224, 2000, (500, 375), steps=20, warmup=5, workers=8)
    return Settings("simclr", None, 16, 16, 64, (64, 48), steps=4, warmup=1, workers=2)


def _profile(device: torch.device) -> str:
    """The method profile of the rows: the paper's heads on CUDA, the CPU-sized ones elsewhere."""
    return "paper" if device.type == "cuda" else "small"


def parse_images(spec: str) -> tuple[int, tuple[int, int] | None]:
    """ "N" or "N:WxH" (e.g. "2000:500x375") -> (N, (W, H) or None); ValueError naming --e2e-images."""
    count, _, size = spec.partition(":")
    try:
        n = int(count)
        wh = tuple(int(v) for v in size.lower().split("x")) if size else None
    except ValueError:
        n, wh = 0, None
    if n < 1 or (size and (len(wh) != 2 or min(wh) < 8)):
        raise ValueError(
            f"--e2e-images: expected N or N:WxH with N >= 1 and sides >= 8 (e.g. 2000:500x375), got {spec!r}"
        )
    return n, wh


def cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "sslfast", "e2e")


def jpeg_set(count: int, size: tuple[int, int], *, root: str | None = None, seed: int = 0) -> str:
    """A folder of `count` smooth random JPEGs of `size` (width, height) under `root` (default: the cache
    directory), written once (a `.complete` marker is the last file written) and reused."""
    from PIL import Image

    w, h = size
    folder = os.path.join(root or cache_dir(), f"jpegs-{count}-{w}x{h}-seed{seed}")
    marker = os.path.join(folder, ".complete")
    if os.path.isfile(marker):
        return folder
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        # a coarse random grid upsampled bicubically: smooth content that JPEG compresses as photographs
        coarse = rng.integers(0, 256, size=(rng.integers(3, 9), rng.integers(3, 9), 3), dtype=np.uint8)
        Image.fromarray(coarse).resize((w, h), Image.BICUBIC).save(os.path.join(folder, f"{i:06d}.jpg"), quality=90)
    open(marker, "w").close()
    return folder


# `sslfast pretrain --compile` runs anywhere, but on a CPU inductor's C++ compile of the step takes about a minute on
# two cores before the first step, which would dwarf a smoke run: the row is measured on CUDA only.
COMPILE_NOT_ON_CPU = "--compile is benchmarked on CUDA only (on a CPU the compile alone takes about a minute)"


def _unavailable(loader: str, mode: str | None, device: torch.device, method: str) -> str | None:
    """Why the row cannot run on `device`, or None."""
    if loader == "dali":
        from ..data.dali import dali_available

        reasons = [] if dali_available() else ["NVIDIA DALI is not installed (pip install 'sslfast[dali]')"]
        if device.type != "cuda":
            reasons.append("DALI's mixed (GPU) decode needs a CUDA device")
        return "; ".join(reasons) or None
    if mode == "compile":
        return None if device.type == "cuda" else COMPILE_NOT_ON_CPU
    if mode == "cuda_graph":
        from ..methods import get_method

        refusal = get_method(method).graph_refusal
        if refusal:
            return f"--cuda-graph: {refusal}"
        return None if device.type == "cuda" else "--cuda-graph needs a CUDA device"
    return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _DeviceBatches:
    """One batch of views, already on the device, handed out `steps` times per pass (the ceiling row's
    loader); `step_waits` are zeros."""

    def __init__(self, views, steps: int):
        self.views, self.steps, self.step_waits = views, steps, []

    def __iter__(self):
        for _ in range(self.steps):
            self.step_waits.append(0.0)
            yield self.views

    def close(self):
        pass


def _batches(settings: Settings, loader, run, device):
    """(an endless iterator of batches over epochs, what to close, the data wait of the last batch)."""
    from ..data import Prefetcher

    if loader is None:
        batches = _DeviceBatches(_device_views(run, settings.batch, device), 10**9)
        return iter(batches), batches, (lambda: 0.0)
    pf = Prefetcher(loader, depth=2, device=device if device.type == "cuda" else None)

    def endless():
        epoch = 0
        while True:
            pf.set_epoch(epoch)
            yield from pf
            epoch += 1

    return endless(), pf, (lambda: pf.wait_s)


def _device_views(run, batch: int, device) -> list[torch.Tensor]:
    """Random views of the method's preset sizes on the device (the ceiling row's batch)."""
    from ..methods import get_method
    from ..train import preset_for

    return [torch.randn(batch, 3, s, s, device=device) for s in preset_for(run.cfg, get_method(run.cfg.method)).sizes()]


def _measure(settings: Settings, device: torch.device, loader_name: str, mode: str | None, from_files: bool) -> dict:
    from ..train import PretrainConfig, resolve, setup
    from ..train.data import _data_loader
    from ..train.step import forward_backward, optimizer_step, train_step

    cfg = resolve(
        PretrainConfig(
            method=settings.method,
            data=settings.data,
            backbone=settings.backbone,
            batch_size=settings.batch,
            image_size=settings.image_size,
            epochs=1,
            loader=loader_name,
            workers=settings.workers,
            device=str(device),
            compile=mode == "compile",
            cuda_graph=mode == "cuda_graph",
            profile=_profile(device),
            precision="bf16" if device.type == "cuda" else "fp32",
            out="unused",
            knn=False,
            progress=False,
        )
    )
    loader = _data_loader(cfg, 0, 1, device) if from_files else None
    run = setup(cfg, steps_per_epoch=len(loader) if loader else 1000, device=device)
    batches, closer, last_wait = _batches(settings, loader, run, device)
    # compilation, cudnn autotuning, worker start-up; a graph's eager warm-up steps and its capture
    warmup = settings.warmup + (run.graph.warmup + 1 if run.graph is not None else 0)
    try:
        for _ in range(warmup):
            train_step(run, next(batches)).float().item()
        # throughput pass: the training loop as `sslfast pretrain` runs it
        _sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        previous = None
        for _ in range(settings.steps):
            loss = train_step(run, next(batches)).float()
            if previous is not None:  # read back one step late, as the trainer does
                previous.item()
            previous = loss
        previous.item()
        _sync(device)
        seconds = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
        # split pass: device synchronized at the phase boundaries
        split = np.zeros(4)
        end = time.perf_counter()
        for _ in range(settings.steps):
            views = next(batches)
            wait = last_wait()
            t1 = time.perf_counter()
            if run.graph is not None:  # one replay: the whole step under fwd+bwd
                loss = train_step(run, views)
                _sync(device)
                t2 = t3 = time.perf_counter()
            else:
                loss = forward_backward(run, views)
                _sync(device)
                t2 = time.perf_counter()
                optimizer_step(run)
                _sync(device)
                t3 = time.perf_counter()
            loss.detach().float().item()
            t4 = time.perf_counter()
            split += (wait, t2 - t1, t3 - t2, (t4 - end) - wait - (t2 - t1) - (t3 - t2))
            end = t4
    finally:
        closer.close()
        if loader is not None:
            loader.close()
    ms = split / settings.steps * 1e3
    return {
        "images_per_s": settings.batch * settings.steps / seconds,
        "step_ms": seconds / settings.steps * 1e3,
        "split_ms": dict(zip(("data_wait", "fwd_bwd", "opt_ema", "other"), ms.tolist()))
        | ({"opt_ema": None} if run.graph is not None else {}),
        "split_step_ms": float(ms.sum()),
        "peak_mib": peak,
    }


def run(device: torch.device, settings: Settings | None = None, log=print) -> list[dict]:
    """Runs the `ROWS`.

    Args:
        device: the device the steps run on.
        settings: what to run (default: `default_settings(device)`).
        log: called with one line per row.

    Returns:
        One dict per row, unavailable ones with the reason (`unavailable`).

    Raises:
        ConfigError: `settings.method` is not a registered method (a ValueError; before any row runs).
    """
    from ..methods import get_method
    from ..train.config import ConfigError

    settings = settings or default_settings(device)
    if settings.backbone is None:
        try:
            cls = get_method(settings.method)
        except ValueError as err:
            raise ConfigError(f"--e2e-method: {err}") from None
        settings = dataclasses.replace(settings, backbone=cls.default_backbone[_profile(device)])
    if settings.data is None:
        settings = dataclasses.replace(settings, data=jpeg_set(settings.images, settings.jpeg_size))
    rows = []
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    for name, loader_name, backend, mode, from_files in ROWS:
        row = {
            "op": "e2e",
            "case": name,
            "loader": loader_name if from_files else None,
            "backend": backend,
            "step_mode": mode or "eager",
            "device": dev_name,
            "method": settings.method,
            "backbone": settings.backbone,
            "batch": settings.batch,
            "image_size": settings.image_size,
            "data": settings.data,
            "steps": settings.steps,
        }
        why = _unavailable(loader_name if from_files else "", mode, device, settings.method)
        if why:
            row["unavailable"] = why
        else:
            with reference_backend() if backend == "reference" else contextlib.nullcontext():
                try:
                    row.update(_measure(settings, device, loader_name, mode, from_files))
                except torch.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    row["unavailable"] = "out of memory"
        rows.append(row)
        log(
            f"e2e {name}: "
            + (f"unavailable: {row['unavailable']}" if "unavailable" in row else f"{row['images_per_s']:.1f} images/s")
        )
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def table(rows: list[dict]) -> str:
    head = (
        "case",
        "images/s",
        "vs base",
        "step ms",
        "data wait",
        "fwd+bwd",
        "opt+EMA",
        "other",
        "split step",
        "peak MiB",
    )
    base = next((r.get("images_per_s") for r in rows if r["case"] == ROWS[0][0]), None)
    lines, notes = [head], []
    for r in rows:
        if "unavailable" in r:
            lines.append((r["case"], "unavailable*", *["-"] * (len(head) - 2)))
            notes.append(f"* {r['case']}: unavailable: {r['unavailable']}")
            continue
        s = r["split_ms"]
        lines.append(
            (
                r["case"],
                _fmt(r["images_per_s"], ".1f"),
                _fmt(r["images_per_s"] / base if base else None, ".2f"),
                _fmt(r["step_ms"], ".1f"),
                *(
                    _fmt(s[k], ".1f") if s[k] is not None else "in fwd+bwd"
                    for k in ("data_wait", "fwd_bwd", "opt_ema", "other")
                ),
                _fmt(r["split_step_ms"], ".1f"),
                _fmt(r["peak_mib"], ".0f"),
            )
        )
    r0 = rows[0] if rows else {}
    title = (
        f"end to end: {r0.get('method')} {r0.get('backbone')} B={r0.get('batch')} {r0.get('image_size')}px "
        f"on {r0.get('device')}, {r0.get('steps')} steps per pass, data {r0.get('data')} (times: ms per step; "
        f"the split pass synchronizes at phase boundaries)"
    )
    return "\n".join([title, _columns(lines), *notes])
