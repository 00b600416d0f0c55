"""`sslfast::` operators: one registration, two ways in.

Every op is a `torch.library.custom_op` (schema from the annotations, a fake kernel, an autograd formula),
which is what `torch.compile(fullgraph=True)` traces. Going through the dispatcher costs tens of microseconds
of host time per call, though, as much as a whole small op on an H100 (Barlow Twins at N = 256, the MAE token
ops). So eager calls skip it: the same function runs directly, through a plain `torch.autograd.Function` with
the same `setup_context` and `backward` when the op is differentiable and autograd will record it (grad mode on,
a tensor argument that requires grad); otherwise as a plain call, with no autograd node to set up.

The switch: the custom op while torch.compile traces (`torch.compiler.is_compiling()`) or when the first
argument (a tensor in every sslfast op) is a tensor subclass (the fake and functional tensors of AOTAutograd,
`opcheck`, `make_fx`), the function on plain tensors. Backward formulas call their backward ops through the
same switch, so a traced backward records the custom op and an eager one runs the function.

Terminal losses (`loss_with_grads`). A scalar loss's input gradients are the upstream scalar times the
gradients for an upstream 1, so an eager training call can compute them in its forward, right behind the
loss kernels, and its backward only scales them. On a GPU the backward kernels are then queued while the host
is still in the forward, not after the autograd engine (~150 µs of host time on an H100 host) has reached the
op's node; the graph holds one node instead of the loss epilogue's four; and a loss that streams its inputs
(MAE's norm-pix MSE) reads them once instead of twice. The scaling is in place and free when the upstream
gradient is 1 (`kernels._common.scale_unless_one_`), so the backward hands the gradients on and runs once.

Gradients of outputs. The custom op materializes a zero gradient for every output the loss did not use; the
eager path declares `non_differentiable` outputs (saved statistics, operands, shares) as such and passes
their gradients as None instead of zero-filling them (they can be large); the other outputs still get zeros
when unused, as from the custom op.

Double backward (create_graph=True). The autograd engine runs a backward in grad mode exactly when it was asked
to build a graph, so every backward here checks `torch.is_grad_enabled()`. Fused kernels and hand-written
gradient formulas (which treat the saved statistics as constants) are not differentiable again: such a
backward raises `DoubleBackwardError` instead of returning gradients that are silently wrong or detached.
An op (or a terminal loss) whose path is plain PyTorch may pass a `double_backward` (`differentiable`) route
instead: it recomputes its outputs from the saved inputs in plain autograd and returns
∂⟨outputs, grads⟩/∂inputs with create_graph=True (`differentiable_grads`), a graph that autograd can
differentiate again.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from typing import Callable, Sequence

import torch

from ._backend import use_triton


class DoubleBackwardError(NotImplementedError):
    """A backward through an sslfast op was asked to build a graph (create_graph=True, e.g. for a gradient
    penalty or `torch.autograd.gradgradcheck`) on a path whose gradients are not differentiable again (the
    Triton kernels). The PyTorch path (CPU tensors, float64, `SSLFAST_BACKEND=reference`) is differentiable
    twice.

    Args:
        message: names the op and what to do instead (`double_backward_unsupported` builds it).
    """


def double_backward_unsupported(op: str, hint: str = "") -> DoubleBackwardError:
    """The error for `op` (raise it): names the op and says what to do instead."""
    return DoubleBackwardError(
        f"sslfast: {op} does not support double backward (create_graph=True); "
        f"{hint or 'its gradient formula is not differentiable again'}"
    )


TRITON_DOUBLE_BACKWARD = (
    "the Triton kernels' gradients are not differentiable again; the reference backend "
    "supports it (CPU tensors, or SSLFAST_BACKEND=reference)"
)


def differentiable_grads(
    fn: Callable, inputs: Sequence[torch.Tensor | None], needs: Sequence[bool], grads: Sequence[torch.Tensor | None]
) -> tuple:
    """The input gradients Σ_k ∂⟨fn(*inputs)_k, grads_k⟩/∂inputs (None where `needs` is False) as a graph that
    can be differentiated again: `fn` recomputed in plain autograd, then `torch.autograd.grad` with
    create_graph=True. The double-backward route of an op whose path is plain PyTorch; `inputs` are the saved
    inputs themselves (their graph is what the second derivative runs through). A tensor passed as two inputs
    gets its whole gradient at the first (autograd adds what each input position returns)."""
    wanted = []
    for i, need in enumerate(needs):
        x = inputs[i]
        if need and x is not None and x.requires_grad and not any(inputs[j] is x for j in wanted):
            wanted.append(i)
    out: list = [None] * len(needs)
    with torch.enable_grad():
        outs = fn(*inputs)
        outs = outs if isinstance(outs, tuple) else (outs,)
        pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
        if wanted and pairs:
            got = torch.autograd.grad(
                [o for o, _ in pairs],
                [inputs[i] for i in wanted],
                [g for _, g in pairs],
                create_graph=True,
                allow_unused=True,
            )
            for i, g in zip(wanted, got):
                out[i] = g
    return tuple(out)


def backward_on_reference(name: str, backward: Callable) -> Callable:
    """A `double_backward` for an op whose `backward` is plain PyTorch on the reference path (so autograd
    records it as it runs, e.g. a gather's scatter-add) and launches kernels on the Triton path, which raises."""

    def run(ctx, *grads):
        if use_triton(*ctx.saved_tensors, *grads):
            raise double_backward_unsupported(name, TRITON_DOUBLE_BACKWARD)
        return backward(ctx, *grads)

    return run


def _guarded(name: str, backward: Callable, double_backward: Callable | None) -> Callable:
    """`backward`, or `double_backward` when the engine builds a graph (grad mode is on in a backward exactly
    when create_graph=True); without a double-backward route, the clear error."""

    def run(ctx, *grads):
        if torch.is_grad_enabled():
            if double_backward is None:
                raise double_backward_unsupported(name)
            return double_backward(ctx, *grads)
        return backward(ctx, *grads)

    return run


def custom_op(
    name: str,
    *,
    fake: Callable,
    backward: Callable | None = None,
    setup_context: Callable | None = None,
    non_differentiable: Sequence[int] = (),
    double_backward: Callable | None = None,
):
    """Decorator: registers `fn` as `sslfast::<name>` and returns a callable (positional arguments, as the
    schema) that runs the custom op while compiling and `fn` (wrapped for autograd) otherwise. The custom op
    itself is the callable's `.custom_op` (for `torch.library.opcheck`).

    `double_backward(ctx, *grads)`, same contract as `backward`, runs instead of it when autograd builds a
    graph of the backward (create_graph=True) and must return differentiable gradients (or raise
    `DoubleBackwardError`); without it such a backward raises `DoubleBackwardError`."""

    def wrap(fn):
        op = torch.library.custom_op(f"sslfast::{name}", mutates_args=())(fn)
        op.register_fake(fake)
        if backward is None:

            @functools.wraps(fn)
            def call(*args):
                return op(*args) if _tracing(args) else fn(*args)
        else:
            guarded = _guarded(name, backward, double_backward)
            op.register_autograd(guarded, setup_context=setup_context)
            apply = _eager_function(name, fn, guarded, setup_context, tuple(non_differentiable)).apply

            @functools.wraps(fn)
            def call(*args):
                if _tracing(args):
                    return op(*args)
                if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
                    return apply(*args)
                return fn(*args)  # nothing to differentiate: no autograd node (its setup costs host time)

        call.custom_op = op
        return call

    return wrap


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _tracing(args) -> bool:
    return type(args[0]) not in _PLAIN or torch.compiler.is_compiling()


def scalar_constant(value: float, like: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A 0-d tensor (fp32 unless `dtype`) holding `value` on `like`'s device, for kernels that read a scalar from
    memory. Eager calls reuse one per (value, device, dtype): a fill is a launch (tens of µs of host time on
    an H100 host). Not while tracing (the tensor would be a constant of the graph) nor while a CUDA graph is
    being captured (the fill would only run at replay)."""
    if _tracing((like,)) or (like.is_cuda and torch.cuda.is_current_stream_capturing()):
        return torch.full((), value, dtype=dtype, device=like.device)
    return _cached_scalar(float(value), like.device, dtype)


@functools.lru_cache(maxsize=256)  # bounded: a temperature schedule makes a new value every step
def _cached_scalar(value: float, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    with torch.inference_mode(False):  # a first call under inference_mode must not cache an inference tensor
        return torch.full((), value, dtype=dtype, device=device)


_MODE = threading.local()  # .separate: depth of `separate_backward` blocks in this thread (grad mode is per thread too)


@contextlib.contextmanager
def separate_backward():
    """Inside the block, terminal losses leave their gradients to the backward pass as the custom ops do
    (the benchmarks time both ways): needed to backpropagate through such a loss twice (`retain_graph=True`).

    Returns:
        A context manager; blocks nest, and the mode is per thread.
    """
    _MODE.separate = getattr(_MODE, "separate", 0) + 1
    try:
        yield
    finally:
        _MODE.separate -= 1


def grads_in_forward(*tensors: torch.Tensor | None) -> bool:
    """Whether a terminal loss on `tensors` computes its gradients in the forward (`loss_with_grads`): an
    eager call (not traced, plain tensors) that autograd will differentiate, outside `separate_backward`."""
    present = [t for t in tensors if t is not None]
    return (
        torch.is_grad_enabled()
        and not getattr(_MODE, "separate", 0)
        and any(t.requires_grad for t in present)
        and not _tracing(present)
    )


class _LossWithGrads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn, why_not, differentiable, *inputs):
        loss, ctx.grads = fn(ctx.needs_input_grad[3:], *inputs)  # intermediates, not saved tensors: see backward
        ctx.why_not, ctx.differentiable = why_not, differentiable
        if differentiable is not None:
            ctx.save_for_backward(*inputs)  # only unpacked (and version-checked) by a create_graph backward
        return loss

    @staticmethod
    def backward(ctx, g):
        if torch.is_grad_enabled():  # create_graph=True: the stored gradients are constants, recompute instead
            if ctx.differentiable is None:
                raise double_backward_unsupported(*ctx.why_not)
            return (
                None,
                None,
                None,
                *differentiable_grads(ctx.differentiable, ctx.saved_tensors, ctx.needs_input_grad[3:], (g,)),
            )
        grads, ctx.grads = ctx.grads, None  # handed on, not copied: the next node may own them
        if grads is None:
            raise RuntimeError(
                "this sslfast loss computed its input gradients in the forward pass and the first "
                "backward handed them on; to backpropagate through it twice (retain_graph=True), "
                "compute it inside `with sslfast.separate_backward():`"
            )
        return (None, None, None, *_scale_all_(grads, g))


# Below this many elements ATen's multiply is cheaper: its host call costs ~5 µs less than a Triton launch on the
# H100 host, and reading + writing 2^20 bf16 elements takes ~1.3 µs at 3 TB/s.
SCALE_KERNEL_MIN_NUMEL = 1 << 20


def _scale_all_(grads: tuple, g: torch.Tensor) -> tuple:
    """grads (None where not wanted) times g in place: each large contiguous one by `scale_unless_one_`, the
    rest by one `_foreach_mul_` (one host call rather than a `mul_` each; on a GPU one launch when they
    share a dtype)."""
    small = []
    for t in grads:
        if t is None:
            continue
        if t.numel() >= SCALE_KERNEL_MIN_NUMEL and use_triton(t) and t.is_contiguous():
            from .kernels._common import scale_unless_one_

            scale_unless_one_(t, g)
        else:
            small.append(t)
    if small:
        torch._foreach_mul_(small, g)
    return grads


def loss_with_grads(
    fn: Callable,
    *inputs: torch.Tensor | None,
    op: str | None = None,
    differentiable: Callable | None = None,
    hint: str = "",
) -> torch.Tensor:
    """A scalar loss whose input gradients `fn` computes in the same forward (see the module docstring).

    `fn(needs_grad, *inputs) -> (loss, grads)`: needs_grad[i] says whether inputs[i] wants a gradient;
    grads[i] is ∂loss/∂inputs[i] (None where not wanted), in the input's dtype. The backward scales them in
    place by the upstream gradient g (on the GPU a kernel that leaves them untouched when g = 1) and hands
    them on, so it runs once per forward.

    Those gradients are constants, so a backward with create_graph=True cannot use them: given
    `differentiable(*inputs) -> loss` (the same loss in plain autograd), it recomputes the loss and returns
    gradients that can be differentiated again; without it, it raises `DoubleBackwardError` naming `op` (by
    default `fn`'s name) with `hint`."""
    name = op or getattr(getattr(fn, "func", fn), "__name__", "this loss").strip("_")
    why_not = (name, hint or "its input gradients are computed in the forward pass and are not differentiable again")
    return _LossWithGrads.apply(fn, why_not, differentiable, *inputs)


def _eager_function(name, fn, backward, setup_context, non_differentiable):
    def forward(ctx, *args):
        out = fn(*args)
        setup_context(ctx, args, out)
        outs = out if isinstance(out, tuple) else (out,)
        ctx.set_materialize_grads(False)
        if non_differentiable:
            ctx.mark_non_differentiable(*(outs[i] for i in non_differentiable))
        ctx.zero_like = {
            i: (o.shape, o.dtype, o.device)
            for i, o in enumerate(outs)
            if i not in non_differentiable and o.is_floating_point()
        }
        return out

    def backward_(ctx, *grads):  # `backward` is guarded (see `custom_op`)
        if any(g is None for g in grads):
            grads = [
                torch.zeros(ctx.zero_like[i][0], dtype=ctx.zero_like[i][1], device=ctx.zero_like[i][2])
                if g is None and i in ctx.zero_like
                else g
                for i, g in enumerate(grads)
            ]
        return backward(ctx, *grads)

    return type(
        f"{name}_eager",
        (torch.autograd.Function,),
        {"forward": staticmethod(forward), "backward": staticmethod(backward_)},
    )
