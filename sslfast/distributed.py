"""Collectives with the right gradients, shared by the losses' `gather_distributed=True` mode.

`all_gather(x)` concatenates every rank's `x` along dim 0. Its backward *sums* the incoming gradient over
ranks and returns this rank's slice (a reduce-scatter): rank r's loss depends on rank s's rows through the
gather, so rank s must receive Σ_r ∂L_r/∂x_s. After DDP averages parameter gradients, every parameter then
gets exactly the gradient of the single-process loss on the concatenated batch. (Returning only the local
slice of the gradient, without the sum, is the classic bug that leaves gradients off by world_size.)
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)


# torch >= 2.13 renamed all_gather_into_tensor (the old name warns); torch 2.11 has only the old one.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        world = dist.get_world_size()
        x = x.contiguous()
        out = x.new_empty((world * x.shape[0], *x.shape[1:]))
        _all_gather_single(out, x)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        rank, world = dist.get_rank(), dist.get_world_size()
        grad = grad.contiguous()
        n = grad.shape[0] // world
        if dist.get_backend() == "nccl":
            out = grad.new_empty((n, *grad.shape[1:]))
            dist.reduce_scatter_tensor(out, grad, op=dist.ReduceOp.SUM)
            return out
        grad = grad.clone()  # gloo has no reduce-scatter: all-reduce, keep our slice
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[rank * n : (rank + 1) * n]


def all_gather(x: torch.Tensor) -> torch.Tensor:
    """Differentiable all-gather along dim 0; identity without a process group. Every rank must pass the
    same number of rows (as DDP with drop_last gives)."""
    return _AllGather.apply(x) if is_distributed() else x
