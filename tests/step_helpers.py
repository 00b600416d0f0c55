"""Shared pieces of the step-mode tests (`--compile`, `--cuda-graph`): a small resolved config per method and
random batches of its preset's view sizes."""

import torch

from sslfast.methods import METHODS
from sslfast.train import PretrainConfig, resolve
from sslfast.train.data import preset_for


def small_config(name: str, device: str = "cpu"):
    """The digits profile of method `name` at batch 8, 16 px, one epoch, resolved."""
    return resolve(PretrainConfig(method=name, batch_size=8, epochs=1, image_size=16, device=device))


def step_batches(cfg, n: int, device: str = "cpu") -> list[list[torch.Tensor]]:
    """`n` batches of random views, each a list of [B, 3, s, s] tensors at the sizes of the method's preset."""
    sizes = preset_for(cfg, METHODS[cfg.method]).sizes()
    return [[torch.randn(cfg.batch_size, 3, s, s, device=device) for s in sizes] for _ in range(n)]
