"""The EMA family's csrc implementation (the contract `sslfast.ops.ema.EMAImpl`): launches of the kernels of
csrc/ema.cu and csrc/optim.cu over a plan's pointer tables (`sslfast.ops._ema_plan`), one launch per table on
the current CUDA stream, no host sync. The rows a plan leaves to the PyTorch path (layouts the kernels cannot
walk as one flat array) are updated by `sslfast.ops._torch.ema` in the same call.

`sslfast._C` is imported at the first launch, so this module imports without CUDA or the extension.
"""

from __future__ import annotations

import torch

from .._torch import ema as _torch

_EXT = None


def extension():
    """The `sslfast._C` extension module, imported on first use."""
    global _EXT
    if _EXT is None:
        from ... import _C as ext

        _EXT = ext
    return _EXT


def stream(device: torch.device) -> int:
    """The current CUDA stream of `device` as an integer (cudaStream_t), without building a Stream object."""
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if raw is not None:
        return raw(torch.cuda.current_device() if device.index is None else device.index)
    return torch.cuda.current_stream(device).cuda_stream


def launch_tables(device: torch.device, tables, weight: float | None, m_tensor: torch.Tensor | None, launch) -> None:
    """`launch(table, ema_weight, momentum_ptr, stream)` for each table on `device`'s current stream: the EMA
    weight 1 − m as a float, or (weight None) the device momentum tensor's address for the kernel to read."""
    cuda_stream = stream(device)
    mptr = 0 if m_tensor is None else m_tensor.data_ptr()
    w = 0.0 if weight is None else weight
    for tbl in tables:
        launch(tbl, w, mptr, cuda_stream)


def ema_update_(plan, teacher, student, *, weight, m_tensor) -> None:
    """One `ema_apply` launch per table of `plan` (an `EMAPlan`), then `lerp_` of its fallback pairs."""
    apply = extension().ema_apply
    launch_tables(
        plan.device,
        plan.tables,
        weight,
        m_tensor,
        lambda tbl, w, mptr, s: apply(tbl.data, tbl.dtypes[0], tbl.dtypes[1], w, mptr, s, plan.device.index),
    )
    if plan.fallback:
        _torch.lerp_(
            [teacher[i] for i in plan.fallback],
            [student[i] for i in plan.fallback],
            _torch.momentum_of(weight, m_tensor),
        )


def lr_args(lr) -> tuple[float, int]:
    """The kernels' (lr, lr_ptr): a float and 0, or (0.0, the address of a 0-dim fp32 device tensor the
    kernels read at run time)."""
    return (0.0, lr.data_ptr()) if isinstance(lr, torch.Tensor) else (lr, 0)


def _launch_steps(plan, grads, weight, m_tensor, launch) -> None:
    """The step kernel of every table of a `FusedPlan`, each after the gradients are written into it."""

    def step(tbl, w, mptr, s):
        plan.set_grads(tbl, grads)
        launch(tbl, w, mptr, s)

    launch_tables(plan.device, plan.tables, weight, m_tensor, step)


def _select(rows, n: int):
    """A function picking `rows` out of a list of `n` (the list itself when `rows` are all of them)."""
    return (lambda lst: lst) if len(rows) == n else (lambda lst: [lst[i] for i in rows])


def _teacher_fallback(plan, params, teachers, momentum) -> None:
    """After the kernels: the EMA of the teachers whose layout differs from their param's."""
    if plan.teacher_fallback:
        _torch.lerp_([teachers[i] for i in plan.teacher_fallback], [params[i] for i in plan.teacher_fallback], momentum)


def adamw_ema_step_(
    plan,
    params,
    grads,
    exp_avgs,
    exp_avg_sqs,
    steps,
    teachers,
    *,
    lr,
    beta1,
    beta2,
    eps,
    weight_decay,
    weight,
    m_tensor,
) -> None:
    """`adamw_ema_apply` over `plan`'s tables (an `AdamWEMAPlan`); its slow rows by torch's fused AdamW when
    they are all the rows, else by the foreach step; then the fallback teachers. `lr`: a float or a 0-dim fp32
    device tensor (its address goes to the kernels)."""
    lr_f, lr_ptr = lr_args(lr)
    _launch_steps(
        plan,
        grads,
        weight,
        m_tensor,
        lambda tbl, w, mptr, s: extension().adamw_ema_apply(
            tbl.data,
            tbl.dtypes[0],
            tbl.dtypes[1],
            lr_f,
            lr_ptr,
            beta1,
            beta2,
            eps,
            weight_decay,
            w,
            mptr,
            s,
            plan.device.index,
        ),
    )
    momentum = _torch.momentum_of(weight, m_tensor)
    rows = plan.slow
    if len(rows):
        sel = _select(rows, len(params))
        step = _torch.adamw_fused_step_ if len(rows) == len(params) else _torch.adamw_foreach_step_
        step(
            sel(params),
            sel(grads),
            sel(exp_avgs),
            sel(exp_avg_sqs),
            sel(steps),
            sel(teachers),
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            eps=eps,
            weight_decay=weight_decay,
            momentum=momentum,
        )
    _teacher_fallback(plan, params, teachers, momentum)


def lars_ema_step_(
    plan, params, grads, momentum_buffers, teachers, *, lr, momentum, weight_decay, eta, weight, m_tensor
) -> None:
    """The two-pass `lars_ema_apply` over `plan`'s tables (a `LARSEMAPlan`, per-chunk norms in each table's
    `partials`); its slow rows by the foreach step; then the fallback teachers. `lr` as `adamw_ema_step_`'s."""
    lr_f, lr_ptr = lr_args(lr)
    _launch_steps(
        plan,
        grads,
        weight,
        m_tensor,
        lambda tbl, w, mptr, s: extension().lars_ema_apply(
            tbl.data,
            tbl.dtypes[0],
            tbl.dtypes[1],
            tbl.partials.data_ptr(),
            lr_f,
            lr_ptr,
            momentum,
            weight_decay,
            eta,
            w,
            mptr,
            s,
            plan.device.index,
        ),
    )
    ema_momentum = _torch.momentum_of(weight, m_tensor)
    rows = plan.slow
    if len(rows):
        sel = _select(rows, len(params))
        _torch.lars_foreach_step_(
            sel(params),
            sel(grads),
            sel(momentum_buffers),
            sel(teachers),
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            eta=eta,
            decay=sel(plan.decay),
            adapt=sel(plan.adapt),
            ema_momentum=ema_momentum,
        )
    _teacher_fallback(plan, params, teachers, ema_momentum)
