"""PNG output of a run: the loss curve (matplotlib) and image grids (Pillow)."""

from __future__ import annotations

import numpy as np
import torch


def _smooth(values: np.ndarray, n: int) -> np.ndarray:
    if len(values) < 2 * n or n < 2:
        return values
    kernel = np.ones(n) / n
    return np.convolve(np.pad(values, (n // 2, n - 1 - n // 2), mode="edge"), kernel, mode="valid")


def line_plot(values, path: str, *, title: str = "", xlabel: str = "", ylabel: str = "") -> None:
    """Raw values (light) and a moving average (dark) against their index, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    y = np.asarray(values, dtype=np.float64)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot(y, color="#9ecae1", lw=0.8, label="step")
    ax.plot(_smooth(y, max(1, len(y) // 50)), color="#08519c", lw=1.6, label="moving average")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def save_image_grid(rows: list[torch.Tensor], path: str, scale: int = 4, gap: int = 2) -> None:
    """rows: [N, C, H, W] tensors in [0, 1] (one grid row each), upscaled by `scale` (nearest), as a PNG."""
    from PIL import Image

    n = max(r.shape[0] for r in rows)
    h, w = rows[0].shape[2:]
    H, W = h * scale, w * scale
    grid = np.full((len(rows) * (H + gap) + gap, n * (W + gap) + gap, 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            x = img.detach().float().clamp(0, 1)
            x = x.expand(3, -1, -1) if x.shape[0] == 1 else x[:3]
            x = x.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
            top, left = gap + i * (H + gap), gap + j * (W + gap)
            grid[top : top + H, left : left + W] = (x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(grid).save(path)
