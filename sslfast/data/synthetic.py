"""Synthetic photo-like JPEGs for tests and benchmarks: `write_jpeg_folder` writes an ImageFolder tree of them
(`sslfast bench --ops e2e` and `--ops augment` default to one)."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np


def synthetic_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A photo-like uint8 [H, W, 3] image: smooth colour gradients, a few shapes and mild noise (JPEG sizes
    and decode costs close to natural images).

    Args:
        rng: the random generator (the image is a function of its state).
        height, width: the image's size.
    """
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.empty((height, width, 3), np.float32)
    for c in range(3):
        a, b, ph = rng.uniform(-1, 1, 3)
        f1, f2 = rng.uniform(1, 6, 2)
        img[..., c] = 128 + 60 * np.sin(2 * np.pi * (f1 * xx / width * a + f2 * yy / height * b) + ph * 3)
    for _ in range(4):
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        r = rng.uniform(0.05, 0.25) * min(height, width)
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        img[mask] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 8, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_jpeg_folder(
    root: str | os.PathLike,
    n: int,
    size: tuple[int, int] = (500, 375),
    *,
    classes: int = 2,
    quality: int = 90,
    seed: int = 0,
    distinct: int | None = None,
) -> list[str]:
    """Writes `n` synthetic JPEGs of `size` (W, H) in ImageFolder layout (root/class_k/img_i.jpg) and returns
    their paths (tests and `sslfast bench`). With `distinct`, only that many different images are encoded and
    the files cycle through them (same decode cost, much faster to write).

    Args:
        root: the folder (created with its class folders as needed).
        n: the number of files.
        size: (width, height) of each image.
        classes: class folders; file i goes to class_{i % classes}.
        quality: the JPEG quality.
        seed: the images' random seed.
        distinct: encode only this many images and cycle through them (None: every file distinct).

    Returns:
        The paths written, in order.
    """
    rng = np.random.default_rng(seed)
    root = Path(root)
    encoded: list[bytes] = []
    paths = []
    for i in range(n):
        d = root / f"class_{i % max(1, classes)}"
        d.mkdir(parents=True, exist_ok=True)
        p = d / f"img_{i:06d}.jpg"
        if distinct is None or len(encoded) < distinct:
            encoded.append(encode_jpeg(synthetic_image(rng, size[1], size[0]), quality))
        p.write_bytes(encoded[-1] if distinct is None else encoded[i % distinct])
        paths.append(str(p))
    return paths


def encode_jpeg(img: np.ndarray, quality: int = 90) -> bytes:
    """`img` (uint8 [H, W, 3]) encoded as a JPEG of `quality` by Pillow."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()
