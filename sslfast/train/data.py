"""The images of a run: pretraining loader, train/test split, labeled evaluation sets."""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

import numpy as np
import torch

from ..data import SSLLoader, get_preset
from ..data.loader import BadFiles
from ..data import datasets as D
from ..methods import Method, get_method
from ..models import build_backbone, is_vit
from .config import ConfigError, PretrainConfig


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
        return SSLLoader(
            train,
            preset_for(cfg, get_method(cfg.method)),
            cfg.batch_size // world,
            device=device,
            backend=cfg.loader,
            shard_id=rank,
            num_shards=world,
            seed=cfg.seed,
            drop_last=True,
            num_workers=cfg.workers,
        )
    except ValueError as err:  # e.g. a batch larger than the data
        raise ConfigError(f"--batch-size {cfg.batch_size}: {err}") from None


class LabeledImages(BadFiles):
    """A labeled source seen without augmentation (a central square crop resized to `image_size`, the
    normalization of the presets), in batches of (images, labels) on `device`.

    A file that cannot be read or decoded is dropped from the batches it falls in, with its label: the loader
    fills its slot with another image of the batch, so that row is removed rather than paired with the wrong
    label (a batch may come out smaller). Bad files are remembered across passes (`skipped`, `bad_files`) and
    `log` reports each new one once."""

    def __init__(
        self,
        source,
        image_size: int,
        device,
        batch_size: int = 256,
        workers: int = 4,
        log: Callable[[str], None] | None = None,
    ):
        self.source, self.device, self.batch_size, self.workers = source, torch.device(device), batch_size, workers
        self.preset = get_preset("mae", image_size).replace_views(scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0)
        self.labels = torch.tensor(source.labels, dtype=torch.long)
        self.num_classes = max(len(getattr(source, "classes", ())), int(self.labels.max()) + 1)
        self.log = log
        self._loaders: dict[tuple[bool, bool, int], SSLLoader] = {}
        self._bad: dict[int, str] = {}  # index -> reason, over every loader
        self._positions: dict[str, list[int]] | None = None
        self._tensors: tuple[torch.Tensor, torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.source)

    def _loader(self, shuffle: bool, drop_last: bool, batch_size: int) -> SSLLoader:
        key = (shuffle, drop_last, batch_size)
        if key not in self._loaders:
            self._loaders[key] = SSLLoader(
                self.source,
                self.preset,
                min(batch_size, len(self.source)),
                device=self.device,
                shard_id=0,
                num_shards=1,
                seed=0,
                shuffle=shuffle,
                drop_last=drop_last,
                num_workers=self.workers,
            )
        return self._loaders[key]

    def _collect_bad(self, loader: SSLLoader) -> None:
        """Merges the loader's skipped samples into `_bad` (indices recovered from the reported paths)."""
        new = []
        for name, why in loader.bad_files:
            for i in self._indices_of(name):
                if i not in self._bad:
                    self._bad[i] = why
                    new.append((name, why))
        if new and self.log is not None:
            first, why = new[0]
            self.log(
                f"skipped {len(new)} unreadable image(s) of {len(self)} labeled images ({self.skipped} in all), "
                f"each dropped with its label; first: {first} ({why})"
            )

    def _indices_of(self, name: str) -> list[int]:
        paths = getattr(self.source, "paths", None)
        if not paths:
            return [int(name)]
        if self._positions is None:
            self._positions = {}
            for i, p in enumerate(paths):
                self._positions.setdefault(p, []).append(i)
        return self._positions.get(name, [])

    def batches(self, shuffle: bool = False, epoch: int = 0, drop_last: bool = False, batch_size: int | None = None):
        """(images [b, 3, S, S], labels [b]) on `device`, b <= `batch_size` (default: the set's); the order of
        `epoch` when shuffling. Every row's label is its own image's: rows whose file was skipped are removed."""
        loader = self._loader(shuffle, drop_last, batch_size or self.batch_size)
        loader.set_epoch(epoch)
        order = torch.tensor(loader.shard_indices(epoch), dtype=torch.long)
        seen = loader.skipped
        for k, views in enumerate(loader):
            idx = order[k * loader.batch_size : (k + 1) * loader.batch_size]
            x, y = views[0], self.labels[idx]
            if loader.skipped != seen or self._bad:
                if loader.skipped != seen:
                    seen = loader.skipped
                    self._collect_bad(loader)
                keep = torch.tensor([i not in self._bad for i in idx.tolist()], dtype=torch.bool)
                if not keep.all():
                    if not keep.any():
                        continue
                    x, y = x[keep.to(x.device)], y[keep]
            yield x, y.to(self.device)

    def tensors(self, max_bytes: int = 1 << 30) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Every delivered (images, labels) at once on `device`, read on the first call and kept (the views
        have no randomness); None when the fp32 images would take more than `max_bytes`."""
        size = self.preset.views[0].size
        if len(self) * 3 * size * size * 4 > max_bytes:
            return None
        if self._tensors is None:
            xs, ys = zip(*self.batches())
            self._tensors = torch.cat(xs), torch.cat(ys)
        return self._tensors

    def close(self) -> None:
        for loader in self._loaders.values():
            loader.close()
        self._loaders.clear()


def labeled_sets(
    cfg: PretrainConfig,
    device,
    max_train: int | None = None,
    max_test: int | None = None,
    log: Callable[[str], None] | None = None,
):
    """(train, test) `LabeledImages` of the run's data (at most `max_train` / `max_test` images, a fixed
    random subset); `log` reports skipped files."""
    train, test = data_sources(cfg)
    if max_train and len(train) > max_train:
        train = _split(train, 1 - max_train / len(train), seed=1)[1]
    if max_test and len(test) > max_test:
        test = _split(test, 1 - max_test / len(test), seed=1)[1]
    return (
        LabeledImages(train, cfg.image_size, device, workers=cfg.workers, log=log),
        LabeledImages(test, cfg.image_size, device, workers=cfg.workers, log=log),
    )


def denormalize(x: torch.Tensor, preset) -> torch.Tensor:
    mean = torch.tensor(preset.mean, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(preset.std, device=x.device).view(1, -1, 1, 1)
    return x * std + mean
