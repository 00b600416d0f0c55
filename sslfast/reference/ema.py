"""Teacher EMA and the optimizer steps it is fused with: the papers' math and the literal code (test oracles and
benchmark baselines of `sslfast.ops.ema` and `sslfast.ops.fused_optim`, whose PyTorch implementation is
`sslfast.ops._torch.ema` and whose kernels live in csrc/ema.cu and csrc/optim.cu).

* EMA (BYOL, MoCo, DINO):  teacher ← m·teacher + (1 − m)·student. The ops compute it as
  torch.lerp(teacher, student, 1 − m) in fp32, rounded once to the teacher's dtype; the per-parameter loop that
  DINO / MoCo / solo-learn run is `ema_update_loop_`.
* Momentum schedule (`sslfast.schedules.cosine_momentum`): BYOL (Grill et al. 2020, §3.2)
  τ_k = 1 − (1 − τ_base)(cos(πk/K) + 1)/2, generalised as DINO's `cosine_scheduler` (Caron et al. 2021) from a
  base to a final value: m_k = final − (final − base)(1 + cos(π·min(k, K)/K))/2.
* AdamW + EMA: torch.optim.AdamW's math (Loshchilov & Hutter 2019), then the EMA of the teachers towards the
  new parameters (the oracle is torch.optim.AdamW itself followed by a lerp).
* LARS + EMA: LARS (You et al. 2017) with the semantics of BYOL (appendix C: "excluding the biases and batch
  normalization parameters from both LARS adaptation and weight decay") as written in the official Barlow
  Twins code: d = g + wd·p, q = η‖p‖/‖d‖ (1 where either norm is 0), μ ← momentum·μ + q·d, p ← p − lr·μ.
  `lars_step_literal_` is that code line by line.
* DINO's center (`sslfast.ops.dino.update_center_`): c ← m·c + (1 − m)·mean over the (global) batch of the
  teacher outputs.
"""

from __future__ import annotations

from typing import Sequence

import torch

Tensor = torch.Tensor


def ema_update_loop_(teacher: Sequence[Tensor], student: Sequence[Tensor], momentum: float) -> None:
    """The per-parameter loop of DINO / MoCo / solo-learn: t.mul_(m).add_(s, alpha=1 − m)."""
    with torch.no_grad():
        for t, s in zip(teacher, student):
            t.mul_(momentum).add_(s, alpha=1.0 - momentum)


def lars_step_literal_(
    params: list[Tensor],
    grads: list[Tensor],
    mus: list[Tensor],
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    eta: float,
    decay: Sequence[bool],
    adapt: Sequence[bool],
) -> None:
    """LARS.step of the official Barlow Twins code (facebookresearch/barlowtwins, main.py), one parameter at a
    time; `decay[i]` / `adapt[i]` are False where its weight_decay_filter / lars_adaptation_filter excludes
    the parameter. The test oracle."""
    with torch.no_grad():
        for p, g, mu, dec, ada in zip(params, grads, mus, decay, adapt):
            dp = g
            if dec:
                dp = dp.add(p, alpha=weight_decay)
            if ada:
                param_norm = torch.norm(p)
                update_norm = torch.norm(dp)
                one = torch.ones_like(param_norm)
                q = torch.where(
                    param_norm > 0.0, torch.where(update_norm > 0, (eta * param_norm / update_norm), one), one
                )
                dp = dp.mul(q)
            mu.mul_(momentum).add_(dp)
            p.add_(mu, alpha=-lr)
