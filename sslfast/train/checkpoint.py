"""Files of a run directory: safe checkpoint loading, RNG states, atomic writes with a kept fallback, the run
lock, the writability probe and the finite-state check.

Everything a checkpoint holds loads with `torch.load(weights_only=True)`: tensors, numbers, strings, lists,
tuples and dicts only (no pickled functions or numpy objects), so reading a checkpoint never runs code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pickle
import random
import shutil
import tempfile
import uuid
from typing import Callable, Iterable

import numpy as np
import torch

from .config import CHECKPOINT, ConfigError, PretrainConfig

REQUIRED_KEYS = ("method", "config", "epoch")
PREVIOUS = "checkpoint.prev.pt"  # the checkpoint before the newest one (resume falls back to it)
METRICS = "metrics.json"
LOCK = ".lock"


def load_checkpoint(path: str, *, what: str = "--checkpoint") -> dict:
    """The state dict of a `sslfast pretrain` checkpoint, read with `weights_only=True` (nothing in the file
    is executed). A missing, unreadable, unsafe or foreign file raises `ConfigError` naming `what`."""
    if not os.path.isfile(path):
        raise ConfigError(f"{what}: no checkpoint at {path} (run `sslfast pretrain` first)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # torch's message advises weights_only=False, which would run the file's code
        raise ConfigError(
            f"{what}: {path} is not a readable sslfast checkpoint: it holds Python objects other "
            f"than tensors and plain data (loading it could run code), or is no checkpoint at "
            f"all"
        ) from None
    except Exception as err:  # noqa: BLE001 - any failure to read is the same user error
        text = str(err).strip()
        first = text.splitlines()[0] if text else type(err).__name__
        raise ConfigError(f"{what}: {path} is not a readable sslfast checkpoint ({first[:200]})") from None
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED_KEYS):
        raise ConfigError(f"{what}: {path} is not an sslfast checkpoint (missing {', '.join(REQUIRED_KEYS)})")
    config = state["config"]
    fields = {f.name for f in dataclasses.fields(PretrainConfig)}
    if not isinstance(config, dict) or not set(config) <= fields or "method" not in config:
        unknown = sorted(set(config) - fields) if isinstance(config, dict) else []
        raise ConfigError(
            f"{what}: {path} holds no config of this sslfast version"
            f"{' (unknown keys: ' + ', '.join(map(str, unknown[:5])) + ')' if unknown else ''}"
        )
    return state


def saved_config(state: dict) -> PretrainConfig:
    """The `PretrainConfig` stored in a checkpoint read by `load_checkpoint`."""
    return PretrainConfig(**state["config"])


def load_latest(out: str, *, what: str = "--resume", log: Callable[[str], None] = print) -> tuple[dict, str]:
    """(state, path) of the newest readable checkpoint of run directory `out`: `checkpoint.pt`, or the kept
    previous one when the newest is missing or unreadable (with a note). Neither readable: `ConfigError`."""
    newest, previous = os.path.join(out, CHECKPOINT), os.path.join(out, PREVIOUS)
    try:
        return load_checkpoint(newest, what=what), newest
    except ConfigError as err:
        if not os.path.isfile(previous):
            raise
        try:
            state = load_checkpoint(previous, what=what)
        except ConfigError:
            raise err from None
        log(f"note: {err}; falling back to the previous checkpoint {previous} (epoch {state['epoch']})")
        return state, previous


# ------------------------------------------------------------------------------------------------ RNG states
def rng_state() -> dict:
    """Every RNG state of the process as tensors, numbers and tuples (loadable with weights_only=True)."""
    name, key, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": str(name),
            "key": torch.from_numpy(key.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restores what `rng_state` returned, exactly."""
    torch.set_rng_state(state["torch"])
    npy = state["numpy"]
    np.random.set_state(
        (npy["name"], npy["key"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["cached_gaussian"])
    )
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------------------ writes
def _new_temp(path: str) -> tuple[int, str]:
    """(fd, name) of a new file next to `path`, unique to this writer (pid + random), created with the
    permissions the umask gives (not mkstemp's 0600)."""
    folder, base = os.path.split(os.path.abspath(path))
    while True:
        tmp = os.path.join(folder, f"{base}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue


def _fsync_dir(folder: str) -> None:
    with contextlib.suppress(OSError):  # not every platform / file system can open a directory
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_atomic(obj, path: str, *, keep_previous: str | None = None) -> None:
    """torch.save to a temporary file unique to this writer (same folder), flushed to disk, then renamed over
    `path`: never a torn checkpoint, and two writers never share a temporary. With `keep_previous`, the file
    at `path` is first hard-linked (or copied) to `keep_previous`, so a readable older file always exists."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = _new_temp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous is not None and os.path.isfile(path):
            _replace_with_copy(path, keep_previous)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(folder)


def _replace_with_copy(src: str, dst: str) -> None:
    """`dst` becomes a copy of `src` (a hard link where possible), atomically."""
    fd, tmp = _new_temp(dst)
    os.close(fd)
    try:
        os.unlink(tmp)
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_text_atomic(text: str, path: str) -> None:
    """`path` gets `text` through a temporary unique to this writer and a rename (never a torn file)."""
    fd, tmp = _new_temp(path)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def check_writable_dir(folder: str, *, what: str = "--out") -> None:
    """Creates `folder` and writes / removes a probe file in it, so a bad run directory fails before any work."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ConfigError(f"{what}: {folder} is a file, not a folder")
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".probe.", delete=True) as f:
            f.write(b"sslfast")
            f.flush()
    except OSError as err:
        raise ConfigError(f"{what}: cannot write to {folder} ({err.strerror or err})") from None


def check_writable_file(path: str, *, what: str) -> None:
    """The folder of `path` exists and takes a new file (probed, then removed); `path` is not a folder."""
    if os.path.isdir(path):
        raise ConfigError(f"{what}: {path} is a folder, not a file")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ConfigError(f"{what}: the folder {folder} of {path} does not exist")
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".probe.", delete=True) as f:
            f.write(b"sslfast")
    except OSError as err:
        raise ConfigError(f"{what}: cannot write to {folder} ({err.strerror or err})") from None


@contextlib.contextmanager
def run_lock(folder: str):
    """An exclusive lock on `<folder>/.lock` for the whole block (released on exit, and by the OS when the
    process dies); a second process on the same run directory gets `ConfigError`."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): no protection, as before
        yield
        return
    path = os.path.join(folder, LOCK)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise ConfigError(f"--out: cannot create the lock file {path} ({err.strerror or err})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(
                f"another sslfast process is using {folder} (it holds {path}); wait for it to "
                f"finish or use another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------------------ finite state
def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether every floating-point tensor is free of NaN / ±inf, in one fused reduction and one host sync:
    the max-norm of each tensor (NaN and inf propagate, finite values cannot overflow) then one `isfinite`."""
    by_device: dict = {}
    for t in tensors:
        if t.is_floating_point() and t.numel():
            by_device.setdefault((t.device, t.dtype), []).append(t.detach())
    if not by_device:
        return True
    norms = [n.float().reshape(1) for group in by_device.values() for n in torch._foreach_norm(group, ord=float("inf"))]
    device = norms[0].device
    return bool(torch.isfinite(torch.cat([n.to(device) for n in norms])).all().item())


def nonfinite_names(named: Iterable[tuple[str, torch.Tensor]], limit: int = 5) -> list[str]:
    """The names of (up to `limit`) floating-point tensors holding NaN / inf (the slow path of `all_finite`,
    for the message)."""
    bad = []
    for name, t in named:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad.append(name)
            if len(bad) == limit:
                break
    return bad
