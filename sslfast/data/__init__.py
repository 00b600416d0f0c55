"""Multi-view data for self-supervised pretraining: augmentation presets that match the papers, the
`SSLLoader` (native fused-kernel backend, DALI, or the torch DataLoader baseline), the `Prefetcher` that
overlaps loading with the step and measures the data wait, and image sources including the embedded default
data set.

    loader = sf.data.SSLLoader("/data/train", preset="simclr", batch_size=256)   # views on the GPU
    images, labels = sf.data.load_digits(image_size=32)                          # embedded default data
"""

from . import datasets, presets
from .datasets import ArraySource, FileSource, digits, find_images, file_list, load_digits, resolve_source
from .loader import SSLLoader, distributed_shard
from .prefetch import Prefetcher
from .presets import PRESETS, Preset, ViewSpec, barlow, byol, dino, get_preset, mae, moco_v2, simclr, vicreg

__all__ = [
    "ArraySource",
    "FileSource",
    "PRESETS",
    "Preset",
    "Prefetcher",
    "SSLLoader",
    "ViewSpec",
    "barlow",
    "byol",
    "datasets",
    "digits",
    "dino",
    "distributed_shard",
    "file_list",
    "find_images",
    "get_preset",
    "load_digits",
    "mae",
    "moco_v2",
    "presets",
    "resolve_source",
    "simclr",
    "vicreg",
]
