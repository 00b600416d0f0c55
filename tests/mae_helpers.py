"""Shared pieces of the MAE op tests (tests/test_mae_*.py): patch grids, dtypes and the exact-match check."""

import torch

GRIDS = {49: (7, 7), 50: (5, 10), 196: (14, 14)}
DTYPES = [torch.float32, torch.bfloat16]
SHAPES = [(L, p, C) for L in (49, 50, 196) for p in (4, 16) for C in (1, 3)] + [(49, 6, 3), (50, 6, 1), (49, 14, 3)]


def exact(out, ref, what=""):
    assert out.dtype == ref.dtype, f"{what}: dtype {out.dtype} != {ref.dtype}"
    assert torch.isfinite(out).all(), f"{what}: non-finite values (unwritten output?)"
    assert torch.equal(out, ref), f"{what}: max abs diff {(out.double() - ref.double()).abs().max().item():.3g}"


def make_images(B, C, L, p, dtype=torch.float32):
    """[B, C, H, W] images of the L-patch grid `GRIDS[L]` at patch size p (values ~ N(0.5, 2²))."""
    gh, gw = GRIDS[L]
    return (torch.randn(B, C, gh * p, gw * p) * 2 + 0.5).to(dtype)


def seeded(seed):
    return torch.Generator().manual_seed(seed)


def gather(x, ids):
    """x [B, L, D] at ids [B, K] the official way (torch.gather with the repeated index)."""
    return torch.gather(x, 1, ids[:, :, None].expand(-1, -1, x.shape[2]))
