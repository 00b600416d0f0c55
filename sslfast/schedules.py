"""Training schedules computed at run time: the teacher momentum of BYOL / DINO (`cosine_momentum`)."""

from __future__ import annotations

import math

import torch


def cosine_momentum(step, total_steps: int | None, base: float = 0.996, final: float = 1.0):
    """BYOL / DINO teacher momentum at `step` (0-based): base at step 0, cosine towards `final`, which it
    reaches at `total_steps` and keeps afterwards:

        m_k = final − (final − base)(1 + cos(π·min(k, K)/K))/2

    (BYOL §3.2 with final = 1; DINO's `cosine_scheduler` from base to final).

    Args:
        step: k, an int, or a tensor of steps (so a schedule can live on the device).
        total_steps: K > 0, or None for the constant `base`.
        base: the momentum at step 0.
        final: the momentum from step K on.

    Returns:
        m_k: a float for an int `step`, an fp32 tensor of `step`'s shape for a tensor.
    """
    if total_steps is None:
        return base if not isinstance(step, torch.Tensor) else torch.full_like(step, base, dtype=torch.float32)
    if isinstance(step, torch.Tensor):
        frac = step.float().clamp(max=total_steps) / total_steps
        return final - (final - base) * (1.0 + torch.cos(math.pi * frac)) / 2.0
    frac = min(step, total_steps) / total_steps
    return final - (final - base) * (1.0 + math.cos(math.pi * frac)) / 2.0
