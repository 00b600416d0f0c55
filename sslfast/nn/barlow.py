"""Redundancy-reduction losses (names and call signatures follow lightly)."""
from __future__ import annotations

import torch
from torch import nn

from ..ops import barlow as _ops


class BarlowTwinsLoss(nn.Module):
    """Barlow Twins (`sslfast.barlow_twins_loss`), computed without the D x D cross-correlation.

    Arguments as lightly's `BarlowTwinsLoss(lambda_param, gather_distributed)`; the default λ is the paper's
    0.0051 (as `sf.barlow_twins_loss`; lightly's is 5e-3: pass `lambda_param=5e-3` for its numbers). `eps` is the
    standardization's (BatchNorm1d's 1e-5) and `algorithm` forces ``"gram"`` or ``"tiled"`` (default ``"auto"``).
    With `gather_distributed`, gradients are exact after DDP's average (the official implementation's are
    1/world_size of that).
    """

    def __init__(self, lambda_param: float = 0.0051, gather_distributed: bool = False, *, eps: float = 1e-5,
                 algorithm: str = "auto"):
        super().__init__()
        self.lambda_param = lambda_param
        self.gather_distributed = gather_distributed
        self.eps = eps
        self.algorithm = algorithm

    def forward(self, z_a: torch.Tensor, z_b: torch.Tensor) -> torch.Tensor:
        return _ops.barlow_twins_loss(z_a, z_b, self.lambda_param, eps=self.eps,
                                      gather_distributed=self.gather_distributed, algorithm=self.algorithm)


class VICRegLoss(nn.Module):
    """VICReg (`sslfast.vicreg_loss`, the official code's semantics) in one fused op.

    Arguments as lightly's `VICRegLoss(lambda_param, mu_param, nu_param, gather_distributed, eps)`:
    lambda_param weighs the invariance (sim_coeff), mu_param the variance (std_coeff) and nu_param the
    covariance term (cov_coeff).
    """

    def __init__(self, lambda_param: float = 25.0, mu_param: float = 25.0, nu_param: float = 1.0,
                 gather_distributed: bool = False, eps: float = 1e-4, *, algorithm: str = "auto"):
        super().__init__()
        self.lambda_param = lambda_param
        self.mu_param = mu_param
        self.nu_param = nu_param
        self.gather_distributed = gather_distributed
        self.eps = eps
        self.algorithm = algorithm

    def forward(self, z_a: torch.Tensor, z_b: torch.Tensor) -> torch.Tensor:
        return _ops.vicreg_loss(z_a, z_b, self.lambda_param, self.mu_param, self.nu_param, eps=self.eps,
                                gather_distributed=self.gather_distributed, algorithm=self.algorithm)
