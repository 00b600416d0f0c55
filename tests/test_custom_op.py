"""`sslfast._custom_op`: one registration, the custom op when traced, a plain autograd.Function in eager mode."""

import torch

from sslfast._custom_op import custom_op

SEEN: list = []  # (path, grads) recorded by the toy backward


def _fake(x, scale):
    return torch.empty_like(x), x.new_empty(x.shape[0]), x.new_empty(x.shape[0])


def _setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])
    ctx.scale = inputs[1]


def _backward(ctx, g_out, g_rowsum, g_stat):
    (x,) = ctx.saved_tensors
    SEEN.append((g_rowsum, g_stat))
    return _toy_backward(g_out, g_rowsum, x, ctx.scale), None


@custom_op("test_toy_backward", fake=lambda g, g_rowsum, x, scale: torch.empty_like(x))
def _toy_backward(g: torch.Tensor, g_rowsum: torch.Tensor, x: torch.Tensor, scale: float) -> torch.Tensor:
    return (g + g_rowsum[:, None]) * scale


@custom_op("test_toy", fake=_fake, backward=_backward, setup_context=_setup, non_differentiable=(2,))
def _toy(x: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x·scale, its row sums, a statistic without gradient)."""
    out = x * scale
    return out, out.sum(1), x.detach().amax(1)


def _leaf(*shape):
    return torch.randn(*shape, dtype=torch.float64, requires_grad=True)


def test_eager_calls_skip_the_dispatcher_and_match_the_custom_op():
    x = _leaf(5, 3)
    out, rowsum, stat = _toy(x, 1.5)
    assert type(out.grad_fn).__name__ == "test_toy_eagerBackward"
    assert not stat.requires_grad
    (out.square().sum() + rowsum.sum()).backward()
    ref = x.detach().clone().requires_grad_()
    o2, r2, s2 = _toy.custom_op(ref, 1.5)
    assert "GeneratedBackwardFor_sslfast_test_toy" in type(o2.grad_fn).__name__
    (o2.square().sum() + r2.sum()).backward()
    torch.testing.assert_close(x.grad, ref.grad, rtol=0, atol=0)
    torch.testing.assert_close(stat, s2, rtol=0, atol=0)
    expected = (2 * out.detach() + 1) * 1.5
    torch.testing.assert_close(x.grad, expected)


def test_unused_outputs_get_zero_gradients_and_non_differentiable_ones_none():
    SEEN.clear()
    x = _leaf(4, 2)
    out, _, _ = _toy(x, 2.0)
    out.sum().backward()
    g_rowsum, g_stat = SEEN[-1]
    torch.testing.assert_close(g_rowsum, torch.zeros(4, dtype=torch.float64), rtol=0, atol=0)
    assert g_stat is None
    torch.testing.assert_close(x.grad, torch.full((4, 2), 2.0, dtype=torch.float64))


def test_compiled_graph_traces_the_custom_ops_without_breaks():
    x = _leaf(6, 4)
    y = x.detach().clone().requires_grad_()

    def loss(t):
        out, rowsum, _ = _toy(t, 0.5)
        return out.square().sum() + rowsum.square().sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    got = compiled(x)
    got.backward()
    want = loss(y)
    want.backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(x.grad, y.grad)


def test_opcheck_on_the_registered_op():
    torch.library.opcheck(_toy.custom_op, (_leaf(3, 5), 0.25))
