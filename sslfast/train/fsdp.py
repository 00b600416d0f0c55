"""`--strategy fsdp`: the method sharded with torch's FSDP2 (`torch.distributed.fsdp.fully_shard`).

Layout. Every block (ViT: `backbone.blocks[i]`) or stage (ResNet: `backbone.layer1..4`) of the student's
backbone is one FSDP unit, and so is the same block of the EMA teacher's copy; the method itself is the root
unit, holding everything else (stems, embeddings, heads, the teacher's heads, prototypes). Each parameter
becomes a DTensor sharded along dim 0 over the ranks (`Shard(0)`), so a rank holds ≈ 1/world of the
parameters, gradients and optimizer state; buffers (BatchNorm statistics, queues, DINO centers) stay whole and
equal on every rank, as under DDP.

Step. Forward all-gathers each unit's parameters just before it runs and frees them after (the root keeps its
own until the end of backward); backward reduce-scatters the gradients, so each rank's `.grad` is its shard of
the gradient of the mean loss over ranks, the one DDP's all-reduce gives. The optimizer steps the shards (its
per-tensor norms, LARS's trust ratio, are DTensor reductions over all shards). The teacher then follows by

    teacher_shard ← m·teacher_shard + (1 − m)·student_shard      (`sslfast.ema_update_` on `to_local()`)

on every rank's local shards: the EMA is elementwise and the teacher is sharded exactly as the student, so this
equals the unsharded update. Buffers are copied and the schedule advanced by the `EMA` as usual.

State. `full_state` gathers the whole method and optimizer state (plain tensors on the CPU, keyed by parameter
name) for the checkpoint, which therefore loads into an unsharded model (`sslfast eval`) or back into a
sharded one (`load_full_state`, `--resume`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..methods import Method
from ..nn.ema import EMA
from ..ops import ema_update_


def _units(backbone: nn.Module) -> list[nn.Module]:
    """The blocks (ViT `blocks`) or stages (ResNet `layer1..layer4`) of a backbone; [] if it has neither."""
    blocks = getattr(backbone, "blocks", None)
    if isinstance(blocks, (nn.ModuleList, nn.Sequential)):
        return list(blocks)
    return [m for m in (getattr(backbone, f"layer{i}", None) for i in range(1, 5)) if isinstance(m, nn.Module)]


def _teacher_backbone(method: Method) -> nn.Module | None:
    """The EMA teacher's copy of `method.backbone` (found by its name in the student the EMA follows)."""
    ema = method.ema
    if ema is None:
        return None
    for name, module in ema.student.named_modules():
        if module is method.backbone:
            return ema.teacher.get_submodule(name)
    return None


def shard_method(method: Method, device: torch.device, world: int) -> None:
    """Shards `method` in place with FSDP2 over a 1-D mesh of `world` ranks on `device`'s type: one unit per
    block / stage of the student's backbone and of the teacher's copy, then the method as the root.

    Args:
        method: a method on `device`, before its optimizer is built (the optimizer must see the sharded
            parameters).
        device: the rank's device (cpu: gloo, cuda: nccl).
        world: the number of ranks of the default process group.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world,))
    teacher = _teacher_backbone(method)
    for backbone in (method.backbone, teacher):
        if backbone is not None:
            for unit in _units(backbone):
                fully_shard(unit, mesh=mesh)
    fully_shard(method, mesh=mesh)


def _locals(module: nn.Module) -> list[torch.Tensor]:
    return [p.to_local() if hasattr(p, "to_local") else p for p in module.parameters()]


@torch.no_grad()
def ema_update_local(ema: EMA) -> None:
    """One EMA step of a sharded teacher: the multi-tensor EMA on each rank's local shards (the EMA's pairs
    are the student's and the teacher's parameters in order, which `EMA` checks to match by name), then the
    buffers copied and the step counted as `EMA.update` does.

    Args:
        ema: the method's `EMA`, its student and teacher sharded alike by `shard_method`.
    """
    ema_update_(_locals(ema.teacher), _locals(ema.student), ema.momentum)
    ema.finish_step()


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def full_state(method: Method, optimizer: torch.optim.Optimizer, *, rank0_only: bool = True) -> tuple[dict, dict]:
    """(method state, optimizer state) gathered whole, as plain CPU tensors keyed as an unsharded model's.
    A collective: every rank calls it.

    Args:
        method: the sharded method.
        optimizer: its optimizer.
        rank0_only: only rank 0 receives the states (the others get empty dicts), saving their memory.

    Returns:
        The method's `state_dict()` (extra states included) and the optimizer's state dict with parameter
        names as keys (`torch.distributed.checkpoint.state_dict` format).
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    if rank0_only:
        opts = _options(cpu_offload=True)
    else:  # every rank gets the whole state (gathered, then copied to the CPU)
        opts = _options()
    model_sd = get_model_state_dict(method, options=opts)
    optim_sd = get_optimizer_state_dict(method, optimizer, options=opts)
    if not rank0_only:
        model_sd = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in model_sd.items()}
    return model_sd, optim_sd


def load_full_state(
    method: Method, optimizer: torch.optim.Optimizer, method_state: dict, optimizer_state: dict
) -> None:
    """Loads what `full_state` returned (every rank passes the whole states) into a sharded method and its
    optimizer; each rank keeps its shards.

    Raises:
        RuntimeError, KeyError, ValueError: the states do not fit the method (missing / unexpected keys, shapes).
    """
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    set_model_state_dict(method, method_state, options=_options())
    set_optimizer_state_dict(method, optimizer, optimizer_state, options=_options())


def local_state(method: Method, optimizer: torch.optim.Optimizer) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) of this rank's part of every parameter, buffer and optimizer-state tensor (DTensors as
    their local shards), for the finite check."""
    out = [
        (k, v.to_local() if hasattr(v, "to_local") else v)
        for k, v in method.state_dict().items()
        if isinstance(v, torch.Tensor)
    ]
    names = {p: n for n, p in method.named_parameters()}
    for p, s in optimizer.state.items():
        for key, v in s.items():
            if isinstance(v, torch.Tensor):
                out.append(
                    (f"optimizer state {names.get(p, '?')}.{key}", v.to_local() if hasattr(v, "to_local") else v)
                )
    return out


def any_rank(flag: bool, device: torch.device) -> bool:
    """Whether `flag` is true on any rank (a collective)."""
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
