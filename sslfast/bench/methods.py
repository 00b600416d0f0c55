"""Whole training steps per method (forward, backward, optimizer + teacher EMA): the sslfast ops against the
same model and optimizer with `SSLFAST_BACKEND=reference` (plain PyTorch everywhere).

One realistic config per registered method that declares one (`Method.bench_step`: backbone, global batch,
image size), the paper's heads (`profile="paper"`), bf16 autocast, synthetic views of the method's preset
sizes already on the GPU (no data loading). ResNet-50 at batch 256 (2 × 256 views) is what fits a 80 GB GPU
with bf16 activations, hence `BenchStep`'s defaults. Images per second (`items_per_s`) = batch / (ms / 1000),
an image counting once however many views it has; the runner's peak memory is the step's peak allocation
above the model and optimizer state. FLOP and byte floors are not counted (the backbone dominates).
`benchmarks/max_batch.py` finds the largest batch each path fits. Each step runs on the same model, so the two
paths are timed on identical shapes; the weights drift between calls, which does not change the work.
"""

from __future__ import annotations

import torch

from . import Setup, reference_backend, register

SMOKE_BATCH, SMOKE_SIZE = 32, 16  # the CPU smoke case: the first case's method on its small backbone


def cases() -> list[tuple[str, str, int, int]]:
    """The step cases of the registered methods, in registry order.

    Returns:
        (method name, backbone, global batch, image size) per method whose `bench_step` is not None.
    """
    from ..methods import METHODS

    return [(name, *case) for name, cls in METHODS.items() if (case := cls.bench_case()) is not None]


def case_name(method: str, backbone: str, batch: int, image_size: int) -> str:
    """The case's name in `sslfast bench --ops step` (e.g. "simclr resnet50 B=256 224px")."""
    return f"{method} {backbone} B={batch} {image_size}px"


def step_setup(method: str, backbone: str, batch: int, image_size: int, device, dtype) -> Setup:
    """One training step of `method` (paper heads, `steps_per_epoch=1000` of a 100-epoch run) on random views.

    Args:
        method: a registered method name.
        backbone: a backbone name.
        batch: images per step.
        image_size: the training resolution (the preset's view sizes follow it).
        device: where the model and views live.
        dtype: torch.bfloat16 (bf16 autocast) or torch.float32.

    Returns:
        A `Setup` whose `fused` and `reference` callables each run one step (sslfast ops / plain PyTorch).

    Raises:
        ValueError: an unknown method or backbone (`sslfast.train.resolve`'s ConfigError).
    """
    from ..methods import get_method
    from ..train import PretrainConfig, preset_for, resolve, setup, train_step

    cfg = resolve(
        PretrainConfig(
            method=method,
            backbone=backbone,
            batch_size=batch,
            image_size=image_size,
            profile="paper",
            epochs=100,
            out="unused",
            precision="bf16" if dtype == torch.bfloat16 else "fp32",
        )
    )
    run = setup(cfg, steps_per_epoch=1000, device=device)
    views = [torch.randn(batch, 3, s, s, device=device) for s in preset_for(cfg, get_method(method)).sizes()]

    def fused():
        train_step(run, views)

    def reference():
        with reference_backend():
            train_step(run, views)

    return Setup(fused=fused, reference=reference, items=batch)


def register_cases() -> None:
    """Registers a "step" case per entry of `cases()` (CUDA, bf16) and a CPU smoke case (fp32): the first
    case's method on its small backbone at B=SMOKE_BATCH, SMOKE_SIZE px. Runs once, on import."""
    from ..methods import get_method

    found = cases()
    for method, backbone, batch, size in found:
        register("step", case_name(method, backbone, batch, size), dtypes=(torch.bfloat16,), device_types=("cuda",))(
            lambda device, dtype, m=method, b=backbone, n=batch, s=size: step_setup(m, b, n, s, device, dtype)
        )
    if found:
        method = found[0][0]
        backbone = get_method(method).default_backbone["small"]
        register(
            "step",
            case_name(method, backbone, SMOKE_BATCH, SMOKE_SIZE) + " (smoke)",
            dtypes=(torch.float32,),
            device_types=("cpu",),
        )(lambda device, dtype: step_setup(method, backbone, SMOKE_BATCH, SMOKE_SIZE, device, dtype))


register_cases()
