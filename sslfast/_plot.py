"""PNG output without hard dependencies: matplotlib when it is installed, else a small built-in rasterizer
(numpy + zlib) that writes a plain line chart or an image grid."""
from __future__ import annotations

import struct
import zlib

import numpy as np
import torch


def write_png(path: str, rgb: np.ndarray) -> None:
    """Writes an [H, W, 3] uint8 array as an 8-bit RGB PNG."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[i].tobytes() for i in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + \
        chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")
    with open(path, "wb") as f:
        f.write(png)


def _smooth(values: np.ndarray, n: int) -> np.ndarray:
    if len(values) < 2 * n or n < 2:
        return values
    kernel = np.ones(n) / n
    return np.convolve(np.pad(values, (n // 2, n - 1 - n // 2), mode="edge"), kernel, mode="valid")


def line_plot(values, path: str, *, title: str = "", xlabel: str = "", ylabel: str = "") -> None:
    """Raw values (light) and a moving average (dark) against their index."""
    y = np.asarray(values, dtype=np.float64)
    smooth = _smooth(y, max(1, len(y) // 50))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return _raster_plot(y, smooth, path)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot(y, color="#9ecae1", lw=0.8, label="step")
    ax.plot(smooth, color="#08519c", lw=1.6, label="moving average")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _raster_plot(y: np.ndarray, smooth: np.ndarray, path: str, w: int = 640, h: int = 360, pad: int = 20) -> None:
    img = np.full((h, w, 3), 255, np.uint8)
    img[pad:h - pad, pad] = img[h - pad, pad:w - pad] = 0  # axes
    if len(y):
        lo, hi = float(np.nanmin(y)), float(np.nanmax(y))
        hi = hi if hi > lo else lo + 1
        for series, color in ((y, (158, 202, 225)), (smooth, (8, 81, 156))):
            xs = pad + np.linspace(0, w - 2 * pad - 1, len(series)) if len(series) > 1 else np.array([pad])
            ys = h - pad - (series - lo) / (hi - lo) * (h - 2 * pad - 1)
            for i in range(max(1, len(series) - 1)):  # segments, sampled densely
                j = min(i + 1, len(series) - 1)
                t = np.linspace(0, 1, 2 + int(abs(xs[j] - xs[i]) + abs(ys[j] - ys[i])))
                px = np.clip((xs[i] + t * (xs[j] - xs[i])).round().astype(int), 0, w - 1)
                py = np.clip((ys[i] + t * (ys[j] - ys[i])).round().astype(int), 0, h - 1)
                img[py, px] = color
    write_png(path, img)


def save_image_grid(rows: list[torch.Tensor], path: str, scale: int = 4, gap: int = 2) -> None:
    """rows: [N, C, H, W] tensors in [0, 1] (one grid row each), upscaled by `scale` (nearest)."""
    n = max(r.shape[0] for r in rows)
    c, h, w = rows[0].shape[1:]
    H, W = h * scale, w * scale
    grid = np.full((len(rows) * (H + gap) + gap, n * (W + gap) + gap, 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            x = img.detach().float().clamp(0, 1)
            x = x.expand(3, -1, -1) if x.shape[0] == 1 else x[:3]
            x = x.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
            top, left = gap + i * (H + gap), gap + j * (W + gap)
            grid[top:top + H, left:left + W] = (x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    write_png(path, grid)
