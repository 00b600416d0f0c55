"""Sinkhorn-Knopp teacher targets (DINOv2's `SinkhornKnoppTeacher`, SwAV's `distributed_sinkhorn`), one op.

    q = sf.sinkhorn_knopp(teacher_logits, temperature, n_iters=3, gather_distributed=False)   # [B, K]

Equal to DINOv2's `sinkhorn_knopp_teacher(teacher_logits, temperature, n_iters)`: exp(logits/τ)ᵀ normalized
alternately over prototypes (to 1/K) and samples (to 1/B_global), n_iters times, then scaled by B_global and
transposed back, so each row of the result sums to 1. It runs in log domain (math in
`sslfast.reference.sinkhorn`): the same numbers without exp(logits/τ) ever overflowing or underflowing to a
0/0 row, and no [B, K] temporary besides the result on the kernels' path (CUDA tensors: `sslfast.kernels
.sinkhorn`; CPU and fp64: PyTorch).

The targets carry no gradient: the op runs under `torch.no_grad()` and returns a tensor that does not require
grad, in fp32 (fp64 for fp64 logits), as DINOv2's `.float()`. With `gather_distributed=True` each rank passes
its own samples [B_rank, K] and gets its rows of the targets of the global batch B = Σ B_rank (every rank must
call it; each iteration all-gathers one K-vector of per-prototype log-sums).
"""

from __future__ import annotations

from typing import Protocol

import torch

from .. import _validate as V
from .._custom_op import custom_op
from ..distributed import all_gather, rank_and_world
from ._family import Family


class SinkhornImpl(Protocol):
    """What `kernels.sinkhorn` and `ops._torch.sinkhorn` both define: the passes over logits x [B, K] with
    s = x·inv_temp, in fp32 (fp64 for fp64 logits)."""

    def column_potential(self, x, v, inv_temp):
        """LSE_b(s_bk + v_b) [K] over this rank's samples, for the row potential v [B]."""

    def row_lse(self, x, u, inv_temp):
        """LSE_k(s_bk + u_k) [B] for the column potential u [K]."""

    def softmax_rows(self, x, u, inv_temp):
        """softmax_k(s_bk + u_k) [B, K]: the targets."""


FAMILY = Family("sinkhorn", SinkhornImpl, accepts=lambda x: x.dtype != torch.float64)
_impl = FAMILY.impl


def _fake(x, inv_temp, n_iters, distributed):
    return x.new_empty(x.shape, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)


@custom_op("sinkhorn_knopp", fake=_fake)
def _sinkhorn(x: torch.Tensor, inv_temp: float, n_iters: int, distributed: bool) -> torch.Tensor:
    impl = _impl(x)
    world = rank_and_world()[1] if distributed else 1
    v = x.new_zeros(x.shape[0], dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
    for it in range(n_iters):
        lse = impl.column_potential(x, v, inv_temp)
        if world > 1:  # Σ over every rank's samples: log-sum-exp of the ranks' log-sums
            lse = torch.logsumexp(all_gather(lse).view(world, -1), dim=0)
        u = -lse
        if it + 1 < n_iters:
            v = -impl.row_lse(x, u, inv_temp)
    return impl.softmax_rows(x, u, inv_temp)


def sinkhorn_knopp(
    teacher_logits: torch.Tensor, temperature: float, n_iters: int = 3, *, gather_distributed: bool = False
) -> torch.Tensor:
    """Sinkhorn-Knopp targets of teacher logits (see the module docstring); no gradient.

    Args:
        teacher_logits: [B, K], B samples (this rank's with `gather_distributed`) and K prototypes; fp32, bf16,
            fp16, or fp64 on the PyTorch path (CPU tensors or ``SSLFAST_BACKEND=reference``).
        temperature: τ > 0; the logits are divided by it before the exponential.
        n_iters: >= 1 alternations of the prototype and sample normalizations.
        gather_distributed: normalize over the global batch of every rank's samples (every rank must call).

    Returns:
        The targets [B, K], each row summing to 1, fp32 (fp64 for fp64 logits), not requiring grad.

    Raises:
        TypeError: teacher_logits is not a floating tensor, temperature not a real number, n_iters not an int
            or gather_distributed not a bool.
        ValueError: teacher_logits is not a non-empty 2-D tensor, temperature is not finite and > 0, or
            n_iters < 1.
    """
    x = V.tensor("teacher_logits", teacher_logits, ndim=2, shape_hint="[B, K]", reference_dtypes=V.REFERENCE_DTYPES)
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"teacher_logits must be a non-empty [B, K] tensor, got shape {tuple(x.shape)}")
    tau = V.positive("temperature", temperature)
    if isinstance(n_iters, bool) or not isinstance(n_iters, int):
        raise TypeError(f"n_iters must be an int, got {type(n_iters).__name__}")
    if n_iters < 1:
        raise ValueError(f"n_iters must be >= 1, got {n_iters}")
    if not isinstance(gather_distributed, bool):
        raise TypeError(f"gather_distributed must be a bool, got {type(gather_distributed).__name__}")
    with torch.no_grad():
        return _sinkhorn(x.detach(), 1.0 / tau, n_iters, gather_distributed)
