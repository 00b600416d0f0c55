"""`SSLLoader`: multi-view batches for self-supervised pretraining, from files or arrays, on the GPU.

    loader = sf.data.SSLLoader("/data/imagenet/train", preset="dino", batch_size=256)
    for epoch in range(epochs):
        loader.set_epoch(epoch)                 # optional: iterating again starts the next epoch anyway
        for views in loader:                    # list of [B, 3, H, W] normalized tensors on loader.device
            ...

Sampling is the loader's own: every epoch draws one permutation of the whole source from (seed, epoch),
identical on every rank, and shard r of W takes positions r, r + W, … (torch DistributedSampler's rule:
with drop_last the tail that does not divide by W is dropped, otherwise it is padded by wrapping around).
Batches are cut from the shard; with drop_last the last partial batch is dropped, so every rank runs
`len(loader)` steps. The shard defaults to the torch.distributed rank and world size when a process group
is initialized.

Bad files never crash an epoch: a file that cannot be read, fails the cheap format check or does not
decode is skipped and counted (`loader.skipped`, `loader.bad_files`), remembered (not read again), and its
slot in the batch is filled by another image of the same batch, so batches keep their size and every rank
its step count. Only a source in which nothing decodes is an error.

The same seed gives the same views. Native backend: per-batch generators are seeded by (seed, epoch, shard,
batch), so `set_epoch(e)` replays epoch e exactly. Torch backend (`sslfast.data.torch_loader`): per-sample
generators seeded by (seed, epoch, index), whatever the number of worker processes. DALI backend: its random
operators are seeded once per loader (seed, shard) and run on, so two loaders with the same seed produce the
same sequence of epochs.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import os
import threading

import numpy as np
import torch

from . import datasets as D
from .native import BadSample, NativeBackend
from .presets import get_preset

_BACKENDS = ("native", "dali", "torch")
_MASK64 = (1 << 64) - 1


def _mix(*values: int) -> int:
    """A 63-bit seed from integers (SplitMix64 finalizer over a running combination)."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & _MASK64)) * 0xBF58476D1CE4E5B9 & _MASK64
        h ^= h >> 31
        h = h * 0x94D049BB133111EB & _MASK64
        h ^= h >> 29
    return h >> 1


def distributed_shard() -> tuple[int, int]:
    """The shard a loader reads by default.

    Returns:
        (rank, world size) of the default torch.distributed group, (0, 1) when none is initialized.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


class _AllBad(Exception):
    pass


class BadFiles:
    """`skipped` and `bad_files` of an object holding `source` and `_bad` ({index: reason} of the samples
    dropped so far because they could not be read or decoded)."""

    source: object
    _bad: dict[int, str]

    @property
    def skipped(self) -> int:
        """Number of distinct samples skipped so far (unreadable, not an image, or undecodable)."""
        return len(self._bad)

    @property
    def bad_files(self) -> list[tuple[str, str]]:
        """(path or index, reason) of every skipped sample."""
        paths = getattr(self.source, "paths", None)
        return [(paths[i] if paths else str(i), why) for i, why in sorted(self._bad.items())]


class SSLLoader(BadFiles):
    """Iterable of multi-view batches: each item is a list of views [B, 3, S, S], one per view of the preset.

    Args:
        source: a folder (ImageFolder layout or flat), a .txt file list, a list of paths, a uint8 array/tensor
            [N, H, W, 3] or a list of uint8 arrays, or a `FileSource` / `ArraySource` (`sslfast.data.datasets`).
        preset: a name in `sslfast.data.PRESETS` ("simclr", "moco_v2", "byol", "barlow", "vicreg", "dino",
            "mae", ...) or a `Preset`.
        batch_size: images per batch (per shard).
        backend: "native" (decode + sslfast's fused Triton augmentation; PyTorch on the CPU), "dali", or
            "torch" (a torch DataLoader: worker processes decode with PIL and augment per sample on the CPU; the
            baseline).
        device: where the views live ("cuda" or "cpu").
        image_size: resizes the preset (the first view gets image_size; the others keep their ratio).
        shard_id, num_shards: this process's shard; default: the torch.distributed rank and world size.
        seed: the shuffling and augmentation seed (with the epoch: `set_epoch`).
        drop_last: drop the last incomplete batch.
        shuffle: shuffle the images every epoch.
        dtype: torch.float32, bfloat16 or float16.
        num_workers: host threads reading/decoding files (torch backend: worker processes; 0 runs in this
            process).
        prefetch: batches read ahead (torch backend: per worker).

    Raises:
        TypeError: a non-int batch size or shard count, or an unsupported dtype.
        ValueError: an unknown backend or device, a shard outside [0, num_shards), a source with no image, or
            a shard too small for one batch with drop_last.
        RuntimeError: device="cuda" without CUDA.
    """

    def __init__(
        self,
        source,
        preset="simclr",
        batch_size: int = 256,
        *,
        backend: str = "native",
        device="cuda",
        image_size: int | None = None,
        shard_id: int | None = None,
        num_shards: int | None = None,
        seed: int = 0,
        drop_last: bool = True,
        shuffle: bool = True,
        dtype: torch.dtype = torch.float32,
        num_workers: int | None = None,
        prefetch: int = 2,
    ):
        self.batch_size = _positive_int("batch_size", batch_size)
        if backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
        self.backend_name = backend
        self.preset = get_preset(preset, image_size)
        device = torch.device(device)
        if device.type not in ("cuda", "cpu"):
            raise ValueError(f"device must be 'cuda' or 'cpu', got {device}")
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise RuntimeError("device='cuda' but CUDA is not available; pass device='cpu'")
            if device.index is None:
                device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise TypeError(f"dtype must be torch.float32, bfloat16 or float16, got {dtype}")
        self.dtype = dtype
        rank, world = distributed_shard()
        self.shard_id = rank if shard_id is None else int(shard_id)
        self.num_shards = world if num_shards is None else _positive_int("num_shards", num_shards)
        if not 0 <= self.shard_id < self.num_shards:
            raise ValueError(f"shard_id must be in [0, num_shards={self.num_shards}), got {self.shard_id}")
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.shuffle = bool(shuffle)
        self.num_workers = self._workers(num_workers, backend)
        self.prefetch = max(1, int(prefetch))
        self.source = D.resolve_source(source)
        if len(self) == 0:
            raise ValueError(
                f"no batch to yield: shard {self.shard_id}/{self.num_shards} of {len(self.source)} "
                f"images holds {self._shard_len()}, fewer than batch_size={self.batch_size} with "
                "drop_last=True"
            )
        self._epoch = 0
        self._bad: dict[int, str] = {}
        self._lock = threading.Lock()
        self._pool: cf.ThreadPoolExecutor | None = None
        if backend == "dali":
            from .dali import DaliBackend

            self._backend = DaliBackend(self)
        elif backend == "torch":
            from .torch_loader import TorchBackend

            self._backend = TorchBackend(self)
        else:
            self._backend = NativeBackend(self)

    @staticmethod
    def _workers(num_workers, backend: str) -> int:
        if num_workers is None:
            return max(1, min(8, os.cpu_count() or 1))
        if isinstance(num_workers, bool) or not isinstance(num_workers, (int, np.integer)):
            raise TypeError(f"num_workers must be an int, got {type(num_workers).__name__}")
        lowest = 0 if backend == "torch" else 1
        if num_workers < lowest:
            raise ValueError(f"num_workers must be >= {lowest} for backend={backend!r}, got {num_workers}")
        return int(num_workers)

    # ------------------------------------------------------------------------------------------ sampling
    def _shard_len(self) -> int:
        n, w = len(self.source), self.num_shards
        return n // w if self.drop_last else -(-n // w)

    def __len__(self) -> int:
        m = self._shard_len()
        return m // self.batch_size if self.drop_last else -(-m // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next iteration runs (its permutation and random views); iterating advances it by one."""
        self._epoch = int(epoch)

    @property
    def epoch(self) -> int:
        return self._epoch

    def shard_indices(self, epoch: int) -> list[int]:
        n = len(self.source)
        if self.shuffle:
            g = torch.Generator().manual_seed(_mix(self.seed, epoch))
            perm = torch.randperm(n, generator=g).tolist()
        else:
            perm = list(range(n))
        total = self._shard_len() * self.num_shards
        if total > n:
            perm = perm + perm[: total - n]
        return perm[self.shard_id : total : self.num_shards]

    def _batch_seed(self, epoch: int, batch_no: int) -> int:
        return _mix(self.seed, epoch, self.shard_id, batch_no, 0x5EED)

    def _mark_bad(self, index: int, reason: str) -> None:
        with self._lock:
            self._bad.setdefault(index, reason)

    def _fetch(self, index: int):
        if index in self._bad:
            return None
        try:
            return self._backend.fetch(index)
        except BadSample as err:
            self._mark_bad(index, str(err))
            return None

    @staticmethod
    def _fill_decoded(payloads: list):
        """Replaces each None by the next good payload of the batch (cyclically)."""
        good = [p for p in payloads if p is not None]
        if not good:
            raise _AllBad()
        out, k = [], 0
        for p in payloads:
            if p is None:
                p = good[k % len(good)]
                k += 1
            out.append(p)
        return out

    @staticmethod
    def _fill_items(items):
        """(index, payload) pairs with each bad slot (payload None) taken over by the next good sample."""
        good = [(i, p) for i, p in items if p is not None]
        out, k = [], 0
        for i, p in items:
            if p is None:
                i, p = good[k % len(good)]
                k += 1
            out.append((i, p))
        return out

    def _rescue(self, shard: list[int], start: int):
        """(index, payload) of the next readable sample after a batch with none: from the shard, then anywhere."""
        start = start % max(1, len(shard))
        for i in shard[start:] + shard[:start] + list(range(len(self.source))):
            p = self._fetch(i)
            if p is not None:
                return i, p
        raise RuntimeError(
            f"none of the {len(self.source)} images of the source could be read and decoded; "
            f"first failures: {self.bad_files[:3]}"
        )

    # ------------------------------------------------------------------------------------------ iteration
    def _executor(self) -> cf.ThreadPoolExecutor:
        if self._pool is None:
            self._pool = cf.ThreadPoolExecutor(max_workers=self.num_workers, thread_name_prefix="sslfast-data")
        return self._pool

    def __iter__(self):
        epoch = self._epoch
        self._epoch += 1
        shard = self.shard_indices(epoch)
        nb = len(self)
        batches = [shard[k * self.batch_size : (k + 1) * self.batch_size] for k in range(nb)]
        if self.backend_name == "torch":
            yield from self._backend.iterate(batches, epoch)
            return
        pool = self._executor()
        pending = collections.deque()

        def submit(k):
            return [pool.submit(self._fetch, i) for i in batches[k]]

        for k in range(min(self.prefetch, nb)):
            pending.append(submit(k))
        try:
            for k in range(nb):
                futures = pending.popleft()
                if k + self.prefetch < nb:
                    pending.append(submit(k + self.prefetch))
                items = [(i, f.result()) for i, f in zip(batches[k], futures)]
                yield self._process(items, shard, (k + 1) * self.batch_size, k, epoch)
        finally:
            for futures in pending:
                for f in futures:
                    f.cancel()

    def _process(self, items, shard, start, batch_no, epoch):
        for _ in range(len(self.source) + 2):  # each retry marks at least one more sample bad
            if all(p is None for _, p in items):
                items = [self._rescue(shard, start)] + items[1:]
            try:
                return self._backend.process(self._fill_items(items), batch_no, epoch)
            except _AllBad:
                items = [(i, None) for i, _ in items]
        raise RuntimeError(f"no decodable image left in the source; first failures: {self.bad_files[:3]}")

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        return (
            f"SSLLoader({self.source!r}, preset={self.preset.name!r}, batch_size={self.batch_size}, "
            f"backend={self.backend_name!r}, device={str(self.device)!r}, views={self.preset.sizes()}, "
            f"shard={self.shard_id}/{self.num_shards}, len={len(self)})"
        )
