"""Shared pieces of the data tests (the fixtures `loader_backend` and `jpeg_root` are in conftest.py)."""

import pytest
import torch

from sslfast.reference import augment as ref


def dali_or_skip():
    from sslfast.data.dali import dali_available

    if not dali_available():
        pytest.skip("nvidia-dali is not importable (install the extra: pip install 'sslfast[dali]')")


def check_views(views, preset, batch, dtype, device="cpu"):
    assert isinstance(views, list) and len(views) == preset.num_views
    lo, hi = ref.output_range(preset.mean, preset.std)
    slack = 1e-5 if dtype == torch.float32 else 2e-2
    for v, size in zip(views, preset.sizes()):
        assert v.shape == (batch, 3, size, size) and v.dtype == dtype and v.device.type == device
        x = v.double().cpu()
        assert torch.isfinite(x).all()
        for c in range(3):
            assert x[:, c].min() >= lo[c] - slack and x[:, c].max() <= hi[c] + slack
