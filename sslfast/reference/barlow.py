"""Barlow Twins (Zbontar et al., 2021) and VICReg (Bardes et al., 2022) written literally: the papers' math
with the D x D matrices materialized, the way the official code computes them. They are the float64 test
oracle and the benchmark baseline; the op's PyTorch implementation is `sslfast.ops._torch.barlow`.

Sources of the semantics:

* Barlow Twins, facebookresearch/barlowtwins `main.py` (`BarlowTwins.forward`): z standardized by
  `BatchNorm1d(affine=False)` in training mode (per-feature mean, *biased* variance, eps inside the sqrt),
  c = bn(z1)ᵀ bn(z2) / batch_size, loss = Σ(1 − c_ii)² + λ Σ_{i≠j} c_ij².
* VICReg, facebookresearch/vicreg `main_vicreg.py` (`VICReg.forward`): invariance `F.mse_loss(x, y)`;
  x, y centered; std = sqrt(x.var(dim=0) + 0.0001), i.e. the *unbiased* variance (torch.var's default),
  hinge mean(relu(1 − std)) / 2 per branch; cov = xᵀx / (batch_size − 1), off-diagonal squares summed and
  divided by num_features (D), per branch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _off_diagonal(x: torch.Tensor) -> torch.Tensor:
    """The official code's flattened view of a square matrix's off-diagonal entries."""
    n = x.shape[0]
    return x.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()


def barlow_twins_loss(z1: torch.Tensor, z2: torch.Tensor, lambd: float = 0.0051, eps: float = 1e-5) -> torch.Tensor:
    """Barlow Twins with the D x D cross-correlation: BatchNorm1d(affine=False) standardization (biased
    variance, eps inside the sqrt), C = z1nᵀ z2n / N, Σ(1 − C_ii)² + λ Σ_{i≠j} C_ij²."""
    n = z1.shape[0]
    z1n = (z1 - z1.mean(0)) / torch.sqrt(z1.var(0, unbiased=False) + eps)
    z2n = (z2 - z2.mean(0)) / torch.sqrt(z2.var(0, unbiased=False) + eps)
    c = z1n.T @ z2n / n
    on_diag = (torch.diagonal(c) - 1).pow(2).sum()
    off_diag = c.pow(2).sum() - torch.diagonal(c).pow(2).sum()
    return on_diag + lambd * off_diag


def vicreg_loss(
    z1: torch.Tensor,
    z2: torch.Tensor,
    sim_coeff: float = 25.0,
    std_coeff: float = 25.0,
    cov_coeff: float = 1.0,
    eps: float = 1e-4,
) -> torch.Tensor:
    """VICReg as in the official `main_vicreg.py` (single process), the D x D covariances materialized."""
    n, d = z1.shape
    repr_loss = F.mse_loss(z1, z2)
    x = z1 - z1.mean(dim=0)
    y = z2 - z2.mean(dim=0)
    std_x = torch.sqrt(x.var(dim=0) + eps)
    std_y = torch.sqrt(y.var(dim=0) + eps)
    std_loss = torch.mean(F.relu(1 - std_x)) / 2 + torch.mean(F.relu(1 - std_y)) / 2
    cov_x = (x.T @ x) / (n - 1)
    cov_y = (y.T @ y) / (n - 1)
    cov_loss = _off_diagonal(cov_x).pow(2).sum().div(d) + _off_diagonal(cov_y).pow(2).sum().div(d)
    return sim_coeff * repr_loss + std_coeff * std_loss + cov_coeff * cov_loss
