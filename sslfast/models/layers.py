"""Layers shared by the backbones and the method heads: a BatchNorm whose statistics span every rank (CPU/gloo
and CUDA/NCCL alike) and the projector / predictor MLPs of the SSL papers."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..distributed import all_gather, is_distributed


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the global batch of all ranks (SimCLR's "global BN"), for any input rank.

    Each rank reduces its rows to (count, mean, biased var) per channel; the [W, 3, C] table is all-gathered
    through `sslfast.distributed.all_gather` (differentiable) and combined exactly,
    mean = Σ n_r m_r / n, var = Σ n_r (v_r + (m_r − mean)²) / n, so forward and gradients equal BatchNorm on
    the concatenated batch. Unlike `torch.nn.SyncBatchNorm` it also runs on CPU tensors (gloo). Without a
    process group, or in eval mode, it is `F.batch_norm`. Parameter and buffer names are BatchNorm's.
    """

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2-D input [N, C, ...], got shape {tuple(input.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if not (self.training and is_distributed()):
            return super().forward(x)
        dims = [0] + list(range(2, x.dim()))
        xf = x.float()
        n_local = x.numel() // x.shape[1]
        var, mean = torch.var_mean(xf, dim=dims, correction=0)
        count = torch.full_like(mean, float(n_local))
        stats = all_gather(torch.stack([count, mean, var])[None])  # [W, 3, C]
        counts, means, vars_ = stats[:, 0], stats[:, 1], stats[:, 2]
        n = counts.sum(0)
        g_mean = (counts * means).sum(0) / n
        g_var = (counts * (vars_ + (means - g_mean) ** 2)).sum(0) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(g_mean.to(self.running_mean.dtype), m)
                unbiased = g_var * n / (n - 1).clamp_min(1)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), m)
        shape = [1, -1] + [1] * (x.dim() - 2)
        y = (xf - g_mean.view(shape)) * torch.rsqrt(g_var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Replaces every BatchNorm{1,2,3}d of `module` (in place, recursively) by `SyncBatchNorm`, keeping its
    parameters, statistics, device and mode.

    Args:
        module: the module to convert.

    Returns:
        `module` itself.
    """
    for name, child in list(module.named_children()):
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, SyncBatchNorm):
            new = SyncBatchNorm(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
            new.load_state_dict(child.state_dict())
            new.to(next(iter(child.state_dict().values()), torch.empty(0)).device)
            new.train(child.training)
            setattr(module, name, new)
        else:
            convert_sync_batchnorm(child)
    return module


def mlp(
    in_dim: int,
    hidden_dim: int,
    out_dim: int,
    num_layers: int = 2,
    *,
    batch_norm: bool = True,
    last_batch_norm: bool = False,
    last_affine: bool = True,
    bias: bool | None = None,
) -> nn.Sequential:
    """The projector / predictor MLP of the SSL papers: (Linear → [BN] → ReLU) × (num_layers − 1) → Linear
    [→ BN]. Hidden linears drop their bias when followed by BN (it would be cancelled); `last_batch_norm` adds
    a BN after the output layer (SimSiam, MoCo v3; `last_affine=False`: their affine-free last BN). The BNs
    are `SyncBatchNorm`: plain BatchNorm in one process, global-batch statistics under torch.distributed
    (SimCLR's global BN).

    Args:
        in_dim: the input width.
        hidden_dim: the hidden layers' width.
        out_dim: the output width.
        num_layers: linear layers, >= 1.
        batch_norm: BN + ReLU after each hidden linear (else ReLU only).
        last_batch_norm: a BN after the output linear.
        last_affine: whether that last BN has a learned scale and shift.
        bias: force the linears' bias on or off (None: off before a BN, on otherwise).

    Returns:
        The `nn.Sequential`.

    Raises:
        ValueError: `num_layers` < 1.
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    layers: list[nn.Module] = []
    dim = in_dim
    for _ in range(num_layers - 1):
        layers.append(nn.Linear(dim, hidden_dim, bias=not batch_norm if bias is None else bias))
        if batch_norm:
            layers.append(SyncBatchNorm(hidden_dim))
        layers.append(nn.ReLU(inplace=True))
        dim = hidden_dim
    layers.append(nn.Linear(dim, out_dim, bias=not last_batch_norm if bias is None else bias))
    if last_batch_norm:
        layers.append(SyncBatchNorm(out_dim, affine=last_affine))
    return nn.Sequential(*layers)
