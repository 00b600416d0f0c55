"""Whole training steps per method (forward, backward, optimizer + teacher EMA): the sslfast ops against the
same model and optimizer with `SSLFAST_BACKEND=reference` (plain PyTorch everywhere).

One realistic config per method, the paper's heads (`profile="paper"`), bf16 autocast, synthetic views of the
method's preset sizes already on the GPU (no data loading). Images per second (`items_per_s`) = batch /
(ms / 1000), an image counting once however many views it has; the runner's peak memory is the step's peak
allocation above the model and optimizer state. FLOP and byte floors are not counted (the backbone
dominates). `benchmarks/max_batch.py` finds the largest batch each path fits. Each step runs on the same
model, so the two paths are timed on identical shapes; the weights drift between calls, which does not change
the work.
"""
from __future__ import annotations

import torch

from . import Setup, reference_backend, register

# (method, backbone, global batch, image size): ResNet-50 at batch 256 (2 × 256 views) is what fits a
# 80 GB GPU with bf16 activations; DINO runs its per-GPU batch of 64 with 2 × 224 + 8 × 96 crops.
CASES = [
    ("simclr", "resnet50", 256, 224),
    ("mocov2", "resnet50", 256, 224),
    ("mocov3", "vit_small", 256, 224),
    ("byol", "resnet50", 256, 224),
    ("simsiam", "resnet50", 256, 224),
    ("barlowtwins", "resnet50", 256, 224),
    ("vicreg", "resnet50", 256, 224),
    ("mae", "vit_base", 256, 224),
    ("dino", "vit_small", 64, 224),
]


def step_setup(method: str, backbone: str, batch: int, image_size: int, device, dtype) -> Setup:
    from ..methods import get_method
    from ..train import PretrainConfig, preset_for, resolve, setup, train_step

    cfg = resolve(PretrainConfig(method=method, backbone=backbone, batch_size=batch, image_size=image_size,
                                 profile="paper", epochs=100, out="unused",
                                 precision="bf16" if dtype == torch.bfloat16 else "fp32"))
    run = setup(cfg, steps_per_epoch=1000, device=device)
    views = [torch.randn(batch, 3, s, s, device=device) for s in preset_for(cfg, get_method(method)).sizes()]

    def fused():
        train_step(run, views)

    def reference():
        with reference_backend():
            train_step(run, views)

    return Setup(fused=fused, reference=reference, items=batch)


for _method, _backbone, _batch, _size in CASES:
    register("step", f"{_method} {_backbone} B={_batch} {_size}px", dtypes=(torch.bfloat16,), device_types=("cuda",))(
        lambda device, dtype, m=_method, b=_backbone, n=_batch, s=_size: step_setup(m, b, n, s, device, dtype))

register("step", "simclr resnet_tiny B=32 16px (smoke)", dtypes=(torch.float32,), device_types=("cpu",))(
    lambda device, dtype: step_setup("simclr", "resnet_tiny", 32, 16, device, dtype))
