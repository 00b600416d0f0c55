"""iBOT's block masks for DINOv2 (its `MaskingGenerator` and collate function): per image, a mask ratio drawn in
[min, max] and rectangles of random area and aspect ratio added until the target number of patches is reached;
a `mask_sample_probability` fraction of the images is masked, the rest stays whole.
"""

from __future__ import annotations

import math
import random

import torch


def block_mask(
    grid: tuple[int, int],
    num_masking_patches: int,
    rng: random.Random,
    *,
    min_num_patches: int = 4,
    max_num_patches: float | None = None,
    min_aspect: float = 0.3,
) -> torch.Tensor:
    """DINOv2's `MaskingGenerator(grid, max_num_patches)(num_masking_patches)`: a [gh, gw] bool mask made of
    random rectangles (area ~ U(min_num_patches, remaining), log-aspect ~ U(log a, −log a), strictly smaller
    than the grid), each accepted if it adds between 1 and `remaining` new patches (at most 10 tries per
    rectangle); it stops at `num_masking_patches` patches, or earlier when no rectangle fits."""
    gh, gw = grid
    cap = num_masking_patches if max_num_patches is None else max_num_patches
    log_aspect = (math.log(min_aspect), -math.log(min_aspect))
    mask = torch.zeros(gh, gw, dtype=torch.bool)
    count = 0
    while count < num_masking_patches:
        remaining = min(num_masking_patches - count, cap)
        delta = 0
        for _ in range(10):
            area = rng.uniform(min_num_patches, remaining)
            aspect = math.exp(rng.uniform(*log_aspect))
            h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            if w < gw and h < gh:
                top, left = rng.randint(0, gh - h), rng.randint(0, gw - w)
                new = h * w - int(mask[top : top + h, left : left + w].sum())
                if 0 < new <= remaining:
                    mask[top : top + h, left : left + w] = True
                    delta = new
                    break
        if delta == 0:
            break
        count += delta
    return mask


def check_mask_args(mask_ratio_min_max, mask_sample_probability) -> tuple[float, float]:
    try:
        lo, hi = (float(r) for r in mask_ratio_min_max)
    except (TypeError, ValueError):
        raise ValueError(f"mask_ratio_min_max must be a pair (min, max), got {mask_ratio_min_max!r}") from None
    if not (0.0 <= lo <= hi <= 1.0):
        raise ValueError(f"mask_ratio_min_max must satisfy 0 <= min <= max <= 1, got {mask_ratio_min_max!r}")
    if not (isinstance(mask_sample_probability, (int, float)) and 0.0 <= mask_sample_probability <= 1.0):
        raise ValueError(f"mask_sample_probability must be in [0, 1], got {mask_sample_probability!r}")
    return lo, hi


# host-side data: under `torch.compile` of a method that draws its masks in the forward (DINOv2), the draw runs
# eagerly between the compiled graphs (dynamo cannot trace `random.Random`, and the masks are data, not compute)
@torch.compiler.disable
def ibot_masks(
    n_images: int,
    grid: tuple[int, int],
    *,
    mask_ratio_min_max: tuple[float, float] = (0.1, 0.5),
    mask_sample_probability: float = 0.5,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """iBOT masks [n_images, gh·gw] bool (row-major patches) as DINOv2's collate: ⌊n·p⌋ images masked, the i-th
    with ⌊L·U(r_i, r_{i+1})⌋ patches (r = linspace(*mask_ratio_min_max, ⌊n·p⌋ + 1)) by `block_mask` (at most
    L/2 per rectangle), the rest unmasked, shuffled. Randomness from `generator` (default: torch's global RNG)."""
    lo, hi = check_mask_args(mask_ratio_min_max, mask_sample_probability)
    rng = random.Random(int(torch.randint(2**62, (1,), generator=generator)))
    L = grid[0] * grid[1]
    n_masked = int(n_images * mask_sample_probability)
    edges = torch.linspace(lo, hi, n_masked + 1, dtype=torch.float64).tolist()
    masks = [
        block_mask(grid, int(L * rng.uniform(edges[i], edges[i + 1])), rng, max_num_patches=0.5 * L)
        for i in range(n_masked)
    ]
    masks += [torch.zeros(grid, dtype=torch.bool)] * (n_images - n_masked)
    rng.shuffle(masks)
    return torch.stack(masks).flatten(1) if masks else torch.zeros(0, L, dtype=torch.bool)
