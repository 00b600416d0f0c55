"""Barlow Twins and VICReg, exact, without the D x D cross-correlation / covariance matrices.

Both losses are one custom op, `sslfast::redundancy_loss` (kind 0 = Barlow Twins, 1 = VICReg), with its
backward `sslfast::redundancy_loss_backward`. Two exact algorithms (math in `sslfast.kernels.barlow`):

* ``"gram"``: with the standardized (Barlow) or centered (VICReg) features Ẑ, ‖Ẑ1ᵀẐ2‖²_F = ⟨Ẑ1Ẑ1ᵀ, Ẑ2Ẑ2ᵀ⟩:
  O(N²D) FLOPs and N x N memory. Chosen by ``"auto"`` when N < D (batch 256-2048 against an 8192-wide
  projector).
* ``"tiled"``: the D x D matrix tile by tile, reduced in the epilogue, recomputed in P x D slabs in the
  backward. Chosen by ``"auto"`` when N >= D.

CUDA tensors run the Triton kernels (with cuBLAS for the big Gram GEMMs), CPU tensors the PyTorch path of
`sslfast.ops._torch.barlow` (the same algorithms, never D x D when N < D).

Distributed (``gather_distributed=True``): z1 and z2 are all-gathered with `sslfast.distributed.all_gather`
(N·W x D per rank instead of the official code's D x D all-reduce); each rank reduces its own rows of the
Gram matrices and the loss is arranged so that, once DDP averages gradients, every parameter receives the
gradient of the single-process loss on the concatenated batch; the value returned on every rank is that
global loss. How the official implementations differ:

* Barlow Twins (facebookresearch/barlowtwins `main.py`): c = bn(z1)ᵀbn(z2) / batch_size followed by a
  `torch.distributed.all_reduce(c)` that autograd does not see. Each rank's backward therefore carries only
  its own rows' share of ∂L/∂z, and DDP's average divides it by world_size again: gradients are 1/W of the
  single-process gradients (lightly fixed this in its #1977; solo-learn still has it). sslfast's gradients
  are exact, i.e. W times the official ones.
* VICReg (facebookresearch/vicreg `main_vicreg.py`): its FullGatherLayer sums gradients over ranks, so the
  variance and covariance terms already have exact gradients, and the invariance term is the local MSE
  whose DDP average is the global one: same gradients as sslfast. The official loss *value* differs per
  rank (local MSE); sslfast reports the global loss on every rank.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.distributed as dist

from .. import _validate as V
from .._backend import without_autocast
from .._custom_op import TRITON_DOUBLE_BACKWARD, custom_op, differentiable_grads, double_backward_unsupported
from ..distributed import all_gather, rank_and_world
from ._family import Family
from ._torch.barlow import BARLOW, NCOL, VICREG

ALGORITHMS = ("auto", "gram", "tiled")


class BarlowImpl(Protocol):
    """What `kernels.barlow` and `ops._torch.barlow` both define (`kind` is BARLOW or VICREG, `rows` = [first
    row of this rank, rows per rank]; the outputs are those of `redundancy_loss`)."""

    def forward(self, z1, z2, kind, coef, eps, rows, world, algorithm):
        """(loss_r, u_r, col [NCOL, D], scal [2], ops [2, M, D], grams [2, n, M] or [2, 0, 0], pdiag [2, n] or
        [2, 0])."""

    def backward(self, grad, z1, z2, col, scal, ops, grams, pdiag, kind, coef, eps, rows, world, algorithm):
        """(∂loss_r/∂z1, ∂loss_r/∂z2) in the inputs' dtypes for the 0-d upstream gradient `grad`."""

    def operand_dtype(self, dtype, rows, algorithm):
        """The dtype of `forward`'s `ops` and `grams` for inputs of `dtype` and a batch of `rows` rows."""


FAMILY = Family("barlow", BarlowImpl)
_impl = FAMILY.impl


@without_autocast
def _run_forward(z1, z2, *config):
    return _impl(z1, z2).forward(z1, z2, *config)


@without_autocast
def _run_backward(grad, z1, z2, *rest):
    return _impl(z1, z2).backward(grad, z1, z2, *rest)


def _stat_dtype(z: torch.Tensor) -> torch.dtype:
    """The loss' and statistics' dtype: fp32, fp64 for fp64 inputs (PyTorch path only)."""
    return torch.float64 if z.dtype == torch.float64 else torch.float32  # promote_types(dtype, fp32), no dispatch


# ------------------------------------------------------------------------------------------- the op
def _fake_forward(z1, z2, kind, coef, eps, rows, world, algorithm):
    m, d = z1.shape
    n = rows[1]
    f32 = dict(dtype=_stat_dtype(z1))
    odt = _impl(z1).operand_dtype(z1.dtype, m, algorithm)
    gram = algorithm == "gram"
    return (
        z1.new_empty((), **f32),
        z1.new_empty((), **f32),
        z1.new_empty((NCOL, d), **f32),
        z1.new_empty((2,), **f32),
        z1.new_empty((2, m, d), dtype=odt),
        z1.new_empty((2, n, m) if gram else (2, 0, 0), dtype=odt),
        z1.new_empty((2, n) if gram else (2, 0), **f32),
    )


def _fake_backward(grad, z1, z2, col, scal, ops, grams, pdiag, kind, coef, eps, rows, world, algorithm):
    return torch.empty_like(z1), torch.empty_like(z2)


@custom_op("redundancy_loss_backward", fake=_fake_backward)
def redundancy_loss_backward(
    grad: torch.Tensor,
    z1: torch.Tensor,
    z2: torch.Tensor,
    col: torch.Tensor,
    scal: torch.Tensor,
    ops: torch.Tensor,
    grams: torch.Tensor,
    pdiag: torch.Tensor,
    kind: int,
    coef: list[float],
    eps: float,
    rows: list[int],
    world: int,
    algorithm: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dz1, dz2) of loss_r for the upstream gradient `grad` (0-d)."""
    return tuple(_run_backward(grad, z1, z2, col, scal, ops, grams, pdiag, kind, coef, eps, rows, world, algorithm))


def _setup_context(ctx, inputs, output):
    z1, z2, kind, coef, eps, rows, world, algorithm = inputs
    _, _, col, scal, ops, grams, pdiag = output
    ctx.save_for_backward(z1, z2, col, scal, ops, grams, pdiag)
    ctx.cfg = (kind, coef, eps, rows, world, algorithm)


def _backward(ctx, g_loss, *unused):
    # Only loss_r is differentiable; u_r and the saved tensors are returned for the caller and the backward.
    z1, z2, col, scal, ops, grams, pdiag = ctx.saved_tensors
    dz1, dz2 = redundancy_loss_backward(g_loss.to(col.dtype), z1, z2, col, scal, ops, grams, pdiag, *ctx.cfg)
    return dz1, dz2, None, None, None, None, None, None


def _double_backward(ctx, g_loss, *unused):
    """create_graph=True: loss_r recomputed in plain autograd by the PyTorch path's forward."""
    z1, z2 = ctx.saved_tensors[:2]
    if _impl(z1, z2) is not FAMILY.torch:
        raise double_backward_unsupported("redundancy_loss (barlow_twins_loss, vicreg_loss)", TRITON_DOUBLE_BACKWARD)

    def loss_r(a, b):
        return _run_forward(a, b, *ctx.cfg)[0]

    return (*differentiable_grads(loss_r, (z1, z2), ctx.needs_input_grad[:2], (g_loss,)),) + (None,) * 6


@custom_op(
    "redundancy_loss",
    fake=_fake_forward,
    backward=_backward,
    setup_context=_setup_context,
    non_differentiable=range(1, 7),
    double_backward=_double_backward,
)
def redundancy_loss(
    z1: torch.Tensor,
    z2: torch.Tensor,
    kind: int,
    coef: list[float],
    eps: float,
    rows: list[int],
    world: int,
    algorithm: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss_r, u_r, col, scal, ops, grams, pdiag): this rank's loss and share (module doc of
    `sslfast.kernels.barlow`), then what the backward needs (per-feature statistics, operand scales, GEMM
    operands, Gram rows and their diagonal). `rows` = [first row of this rank, rows per rank]."""
    return tuple(_run_forward(z1, z2, kind, coef, eps, rows, world, algorithm))


# ------------------------------------------------------------------------------------------- validation
def _inputs(z1, z2) -> tuple[torch.Tensor, torch.Tensor]:
    z1, z2 = V.view_pair("z1", z1, "z2", z2)
    if z1.shape[0] < 2:
        raise ValueError(
            f"z1 and z2 need at least 2 rows (N >= 2): the per-feature variance of one sample is "
            f"undefined, got N={z1.shape[0]}"
        )
    return z1, z2


def _options(algorithm, gather_distributed) -> None:
    if not isinstance(algorithm, str) or algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    if not isinstance(gather_distributed, bool):
        raise TypeError(f"gather_distributed must be a bool, got {type(gather_distributed).__name__}")


def choose_algorithm(algorithm: str, rows: int, features: int) -> str:
    """``"auto"`` → ``"gram"`` when the (global) batch is smaller than the feature dimension, else ``"tiled"``."""
    if algorithm == "auto":
        return "gram" if rows < features else "tiled"
    return algorithm


def _loss(
    kind: int,
    z1: torch.Tensor,
    z2: torch.Tensor,
    coef: list[float],
    eps: float,
    gather_distributed: bool,
    algorithm: str,
) -> torch.Tensor:
    rank, world = rank_and_world() if gather_distributed else (0, 1)
    n = z1.shape[0]
    if world > 1:
        z1, z2 = all_gather(z1), all_gather(z2)
    m, d = z1.shape
    args = (z1, z2, kind, coef, eps, [rank * n, n], world, choose_algorithm(algorithm, m, d))
    loss, share, *_ = redundancy_loss(*args)
    if world > 1:
        # loss_r = base + W·u_r has the right gradients; report the global value base + Σ_r u_r.
        total = share.detach().clone()
        dist.all_reduce(total)
        loss = loss + (total - world * share).detach()
    return loss


# ------------------------------------------------------------------------------------------- public API
def barlow_twins_loss(
    z1: torch.Tensor,
    z2: torch.Tensor,
    lambd: float = 0.0051,
    *,
    eps: float = 1e-5,
    gather_distributed: bool = False,
    algorithm: str = "auto",
) -> torch.Tensor:
    """Barlow Twins' redundancy-reduction loss, exactly, without the D x D cross-correlation.

    With zn the batch-standardized z (per-feature mean, biased variance, eps inside the sqrt, as
    `BatchNorm1d(affine=False)` in training) and C = zn1ᵀ zn2 / N:

        loss = Σ_i (1 − C_ii)² + λ Σ_{i≠j} C_ij²

    A constant feature (zero variance) standardizes to 0, so it contributes (1 − 0)² = 1 and no gradient, as
    BatchNorm does (the eps keeps it finite).

    Args:
        z1, z2: the two views' embeddings [N, D], N >= 2, one dtype (fp32, bf16, fp16; fp64 on the PyTorch
            path: CPU tensors or ``SSLFAST_BACKEND=reference``) and one device.
        lambd: λ >= 0, the weight of the off-diagonal terms (the paper's 0.0051).
        eps: > 0, added to the variance before the square root.
        gather_distributed: every rank scores its rows against the all-gathered batch; after DDP averages the
            gradients they equal the single-process gradients on the concatenated batch (the official code's
            are 1/world_size of that), and every rank returns the global loss value.
        algorithm: ``"gram"`` (N x N Gram matrices), ``"tiled"`` (C tile by tile, recomputed in P x D slabs
            in the backward) or ``"auto"``: ``"gram"`` when the (global) batch N < D, else ``"tiled"``.

    Returns:
        The loss, a 0-d fp32 tensor (fp64 for fp64 inputs) with gradients to z1 and z2.

    Raises:
        TypeError: z1 or z2 is not a floating tensor, or their dtypes differ; lambd or eps is not a real
            number; gather_distributed is not a bool.
        ValueError: z1 or z2 is not a non-empty [N, D] tensor, their shapes or devices differ, N < 2, lambd
            < 0, eps <= 0 (or either is not finite), or algorithm is not one of ``ALGORITHMS``.
    """
    z1, z2 = _inputs(z1, z2)
    lambd = V.non_negative("lambd", lambd)
    eps = V.positive("eps", eps)
    _options(algorithm, gather_distributed)
    return _loss(BARLOW, z1, z2, [lambd], eps, gather_distributed, algorithm)


def vicreg_loss(
    z1: torch.Tensor,
    z2: torch.Tensor,
    sim_coeff: float = 25.0,
    std_coeff: float = 25.0,
    cov_coeff: float = 1.0,
    *,
    eps: float = 1e-4,
    gather_distributed: bool = False,
    algorithm: str = "auto",
) -> torch.Tensor:
    """VICReg as the official code computes it (facebookresearch/vicreg, `main_vicreg.py`, `VICReg.forward`):

        sim_coeff · mse(z1, z2)
      + std_coeff · (mean_k relu(1 − std1_k) + mean_k relu(1 − std2_k)) / 2,  std = sqrt(var + eps)
      + cov_coeff · (Σ_{k≠l} Cov1_kl² + Σ_{k≠l} Cov2_kl²) / D,            Cov = z̃ᵀz̃ / (N − 1)

    with z̃ the centered features and var the *unbiased* variance (the official `x.var(dim=0)`). One op:
    the covariance terms use the Gram identity (or tiles), never the D x D matrices when N < D.

    Args:
        z1, z2: the two views' embeddings [N, D], N >= 2, as in `barlow_twins_loss`.
        sim_coeff, std_coeff, cov_coeff: >= 0, the weights of the invariance, variance and covariance terms.
        eps: > 0, added to the variance before the square root.
        gather_distributed: as in `barlow_twins_loss` (the official code's gradients are already exact here;
            its per-rank value uses the local MSE, sslfast returns the global loss on every rank).
        algorithm: ``"auto"``, ``"gram"`` or ``"tiled"``, as in `barlow_twins_loss`.

    Returns:
        The loss, a 0-d fp32 tensor (fp64 for fp64 inputs) with gradients to z1 and z2.

    Raises:
        TypeError: z1 or z2 is not a floating tensor, or their dtypes differ; a coefficient or eps is not a
            real number; gather_distributed is not a bool.
        ValueError: z1 or z2 is not a non-empty [N, D] tensor, their shapes or devices differ, N < 2, a
            coefficient < 0, eps <= 0 (or either is not finite), or algorithm is not one of ``ALGORITHMS``.
    """
    z1, z2 = _inputs(z1, z2)
    coef = [
        V.non_negative("sim_coeff", sim_coeff),
        V.non_negative("std_coeff", std_coeff),
        V.non_negative("cov_coeff", cov_coeff),
    ]
    eps = V.positive("eps", eps)
    _options(algorithm, gather_distributed)
    return _loss(VICREG, z1, z2, coef, eps, gather_distributed, algorithm)
