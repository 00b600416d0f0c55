"""Redundancy-reduction losses (names and call signatures follow lightly)."""

from __future__ import annotations

import torch
from torch import nn

from ..ops import barlow as _ops


class BarlowTwinsLoss(nn.Module):
    """Barlow Twins (`sslfast.barlow_twins_loss`) as a module, computed without the D x D cross-correlation.

    Arguments as lightly's `BarlowTwinsLoss(lambda_param, gather_distributed)`. With `gather_distributed`,
    gradients are exact after DDP's average (the official implementation's are 1/world_size of that).

    Args:
        lambda_param: λ, the weight of the off-diagonal terms; the default is the paper's 0.0051 (as
            `sf.barlow_twins_loss`; lightly's is 5e-3: pass ``lambda_param=5e-3`` for its numbers).
        gather_distributed: score every rank's rows against the all-gathered batch.
        eps: the standardization's (BatchNorm1d's 1e-5).
        algorithm: ``"auto"``, or ``"gram"`` / ``"tiled"`` to force one.

    The arguments are checked at each call, by `sslfast.barlow_twins_loss`.
    """

    def __init__(
        self,
        lambda_param: float = 0.0051,
        gather_distributed: bool = False,
        *,
        eps: float = 1e-5,
        algorithm: str = "auto",
    ):
        super().__init__()
        self.lambda_param = lambda_param
        self.gather_distributed = gather_distributed
        self.eps = eps
        self.algorithm = algorithm

    def forward(self, z_a: torch.Tensor, z_b: torch.Tensor) -> torch.Tensor:
        """The loss of two views' embeddings.

        Args:
            z_a, z_b: [N, D], N >= 2, one dtype and device.

        Returns:
            The loss, a 0-d fp32 tensor (fp64 for fp64 inputs).

        Raises:
            TypeError, ValueError: bad embeddings or module arguments, as `sslfast.barlow_twins_loss` raises
                them (naming z1 / z2 for z_a / z_b, lambd for lambda_param).
        """
        return _ops.barlow_twins_loss(
            z_a,
            z_b,
            self.lambda_param,
            eps=self.eps,
            gather_distributed=self.gather_distributed,
            algorithm=self.algorithm,
        )


class VICRegLoss(nn.Module):
    """VICReg (`sslfast.vicreg_loss`, the official code's semantics) as a module, in one fused op.

    Arguments as lightly's `VICRegLoss(lambda_param, mu_param, nu_param, gather_distributed, eps)`.

    Args:
        lambda_param: the weight of the invariance term (`sim_coeff`).
        mu_param: the weight of the variance term (`std_coeff`).
        nu_param: the weight of the covariance term (`cov_coeff`).
        gather_distributed: score every rank's rows against the all-gathered batch.
        eps: added to the variance before the square root.
        algorithm: ``"auto"``, or ``"gram"`` / ``"tiled"`` to force one.

    The arguments are checked at each call, by `sslfast.vicreg_loss`.
    """

    def __init__(
        self,
        lambda_param: float = 25.0,
        mu_param: float = 25.0,
        nu_param: float = 1.0,
        gather_distributed: bool = False,
        eps: float = 1e-4,
        *,
        algorithm: str = "auto",
    ):
        super().__init__()
        self.lambda_param = lambda_param
        self.mu_param = mu_param
        self.nu_param = nu_param
        self.gather_distributed = gather_distributed
        self.eps = eps
        self.algorithm = algorithm

    def forward(self, z_a: torch.Tensor, z_b: torch.Tensor) -> torch.Tensor:
        """`sslfast.vicreg_loss` of z_a and z_b with this module's coefficients.

        Args:
            z_a, z_b: the two views' embeddings [N, D] (z1 and z2 of `sslfast.vicreg_loss`).

        Returns:
            A 0-d fp32 tensor (fp64 for fp64 embeddings) with gradients to z_a and z_b.

        Raises:
            TypeError, ValueError: from `sslfast.vicreg_loss`, which names z1 / z2 for z_a / z_b and sim_coeff /
                std_coeff / cov_coeff for lambda_param / mu_param / nu_param.
        """
        return _ops.vicreg_loss(
            z_a,
            z_b,
            self.lambda_param,
            self.mu_param,
            self.nu_param,
            eps=self.eps,
            gather_distributed=self.gather_distributed,
            algorithm=self.algorithm,
        )
