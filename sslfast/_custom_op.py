"""`sslfast::` operators: one registration, two ways in.

Every op is a `torch.library.custom_op` (schema from the annotations, a fake kernel, an autograd formula),
which is what `torch.compile(fullgraph=True)` traces. Going through the dispatcher costs tens of microseconds
of host time per call, though, as much as a whole small op on an H100 (Barlow Twins at N = 256, the MAE token
ops). So eager calls skip it: the same function runs directly, through a plain `torch.autograd.Function` with
the same `setup_context` and `backward` when the op is differentiable.

The switch: the custom op while torch.compile traces (`torch.compiler.is_compiling()`) or when the first
argument (a tensor in every sslfast op) is a tensor subclass (the fake and functional tensors of AOTAutograd,
`opcheck`, `make_fx`), the function on plain tensors. Backward formulas call their backward ops through the
same switch, so a traced backward records the custom op and an eager one runs the function.

Gradients of outputs. The custom op materializes a zero gradient for every output the loss did not use; the
eager path declares `non_differentiable` outputs (saved statistics, operands, shares) as such and passes
their gradients as None instead of zero-filling them (they can be large); the other outputs still get zeros
when unused, as from the custom op.
"""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import torch


def custom_op(name: str, *, fake: Callable, backward: Callable | None = None, setup_context: Callable | None = None,
              non_differentiable: Sequence[int] = ()):
    """Decorator: registers `fn` as `sslfast::<name>` and returns a callable (positional arguments, as the
    schema) that runs the custom op while compiling and `fn` (wrapped for autograd) otherwise. The custom op
    itself is the callable's `.custom_op` (for `torch.library.opcheck`)."""
    def wrap(fn):
        op = torch.library.custom_op(f"sslfast::{name}", mutates_args=())(fn)
        op.register_fake(fake)
        eager = fn
        if backward is not None:
            op.register_autograd(backward, setup_context=setup_context)
            eager = _eager_function(name, fn, backward, setup_context, tuple(non_differentiable)).apply

        @functools.wraps(fn)
        def call(*args):
            return op(*args) if _tracing(args) else eager(*args)

        call.custom_op = op
        return call
    return wrap


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _tracing(args) -> bool:
    return type(args[0]) not in _PLAIN or torch.compiler.is_compiling()


def _eager_function(name, fn, backward, setup_context, non_differentiable):
    def forward(ctx, *args):
        out = fn(*args)
        setup_context(ctx, args, out)
        outs = out if isinstance(out, tuple) else (out,)
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(*(outs[i] for i in non_differentiable))
        ctx.zero_like = {i: (o.shape, o.dtype, o.device) for i, o in enumerate(outs)
                         if i not in non_differentiable and o.is_floating_point()}
        return out

    def backward_(ctx, *grads):
        grads = [torch.zeros(ctx.zero_like[i][0], dtype=ctx.zero_like[i][1], device=ctx.zero_like[i][2])
                 if g is None and i in ctx.zero_like else g for i, g in enumerate(grads)]
        return backward(ctx, *grads)

    return type(f"{name}_eager", (torch.autograd.Function,),
                {"forward": staticmethod(forward), "backward": staticmethod(backward_)})
