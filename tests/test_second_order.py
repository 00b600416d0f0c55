"""Second-order gradients (create_graph=True) and float64 inputs, for every loss and differentiable MAE op.

A backward asked to build a graph either returns gradients that autograd can differentiate again, checked by
`torch.autograd.gradgradcheck` in float64 (the reference path recomputes the loss in plain autograd), or
raises sslfast's `DoubleBackwardError` naming the op (the Triton kernels' gradients, the MAE ops): never a
detached or silently wrong gradient. Both ways of computing gradients are covered: in the forward (the
default for an eager loss) and in the backward (`sf.separate_backward()`).
"""

import contextlib

import pytest
import torch

import sslfast as sf
from sslfast.reference import barlow as ref_barlow, dino as ref_dino, infonce as ref_infonce, mae as ref_mae
from sslfast._custom_op import DoubleBackwardError, backward_on_reference, custom_op
from sslfast.ops import mae

from helpers import assert_close

F64 = torch.float64
_MESSAGE = r"sslfast: .* does not support double backward \(create_graph=True\)"


def _mode(name: str):
    return sf.separate_backward() if name == "separate" else contextlib.nullcontext()


@pytest.fixture(params=["grads_in_forward", "separate"])
def mode(request):
    return request.param


@pytest.fixture
def triton_backend(monkeypatch):
    """The Triton kernels under the interpreter."""
    if not (sf._backend.triton_available() and sf._backend.interpreting()):
        pytest.skip("Triton kernels on CPU tensors need triton and TRITON_INTERPRET=1")
    monkeypatch.setenv("SSLFAST_BACKEND", "triton")


def _x(*shape, dtype=F64):
    return torch.randn(*shape, dtype=dtype).requires_grad_()


# name -> (inputs(dtype): leaves that get gradients, loss(*leaves) with fixed extra arguments, literal oracle or None).
# Odd sizes; Barlow Twins and VICReg once with N < D (Gram algorithm) and once with N >= D (tiled).
def _cases():
    queue = torch.randn(7, 3, dtype=F64)
    teacher, center = torch.randn(6, 5, dtype=F64), torch.randn(1, 5, dtype=F64)
    return {
        "nt_xent": (
            lambda dt: (_x(5, 3, dtype=dt), _x(5, 3, dtype=dt)),
            lambda a, b: sf.nt_xent_loss(a, b, 0.7),
            lambda a, b: ref_infonce.nt_xent_loss(a, b, 0.7),
        ),
        "info_nce": (
            lambda dt: (_x(5, 3, dtype=dt), _x(5, 3, dtype=dt)),
            lambda a, b: sf.info_nce_loss(a, b, None, 0.3),
            lambda a, b: ref_infonce.info_nce_loss(a, b, None, 0.3),
        ),
        "info_nce_queue": (
            lambda dt: (_x(5, 3, dtype=dt), _x(5, 3, dtype=dt)),
            lambda a, b: sf.info_nce_loss(a, b, queue.to(a.dtype), 0.3),
            lambda a, b: ref_infonce.info_nce_loss(a, b, queue.to(a.dtype), 0.3),
        ),
        "clip": (
            lambda dt: (_x(5, 3, dtype=dt), _x(5, 3, dtype=dt), (1.5 + torch.rand((), dtype=dt)).requires_grad_()),
            sf.clip_loss,
            ref_infonce.clip_loss,
        ),
        "barlow_gram": (
            lambda dt: (_x(4, 7, dtype=dt), _x(4, 7, dtype=dt)),
            lambda a, b: sf.barlow_twins_loss(a, b, 0.3, algorithm="gram"),
            lambda a, b: ref_barlow.barlow_twins_loss(a, b, 0.3),
        ),
        "barlow_tiled": (
            lambda dt: (_x(6, 3, dtype=dt), _x(6, 3, dtype=dt)),
            lambda a, b: sf.barlow_twins_loss(a, b, 0.3, algorithm="tiled"),
            lambda a, b: ref_barlow.barlow_twins_loss(a, b, 0.3),
        ),
        "barlow_same_tensor": (
            lambda dt: (_x(5, 4, dtype=dt),),
            lambda a: sf.barlow_twins_loss(a, a, 0.3),
            lambda a: ref_barlow.barlow_twins_loss(a, a, 0.3),
        ),
        "vicreg_gram": (
            lambda dt: (_x(4, 7, dtype=dt), _x(4, 7, dtype=dt)),
            lambda a, b: sf.vicreg_loss(a, b, 2.0, 3.0, 0.5, algorithm="gram"),
            lambda a, b: ref_barlow.vicreg_loss(a, b, 2.0, 3.0, 0.5),
        ),
        "vicreg_tiled": (
            lambda dt: (_x(6, 3, dtype=dt), _x(6, 3, dtype=dt)),
            lambda a, b: sf.vicreg_loss(a, b, 2.0, 3.0, 0.5, algorithm="tiled"),
            lambda a, b: ref_barlow.vicreg_loss(a, b, 2.0, 3.0, 0.5),
        ),
        "dino": (
            lambda dt: (_x(9, 5, dtype=dt),),
            lambda s: sf.dino_loss(s, teacher.to(s.dtype), center.to(s.dtype), 0.2, 0.1),
            lambda s: ref_dino.dino_loss_literal(s, teacher.to(s.dtype), center.to(s.dtype), 0.2, 0.1),
        ),
    }


LOSSES = list(_cases())
FLOAT64_REJECTED = [n for n in LOSSES if n != "dino"]  # DINO runs float64 through its reference path anywhere


@pytest.mark.parametrize("name", LOSSES)
def test_gradgradcheck_float64_on_the_reference_path(seed, name, mode, monkeypatch):
    monkeypatch.setenv("SSLFAST_BACKEND", "reference")
    make, loss, _ = _cases()[name]
    inputs = make(F64)
    with _mode(mode):
        if mode == "separate":  # gradcheck backpropagates twice through one graph, which grads_in_forward refuses
            assert torch.autograd.gradcheck(loss, inputs), f"{name} ({mode}), seed {seed}"
        assert torch.autograd.gradgradcheck(loss, inputs), f"{name} ({mode}), seed {seed}"


@pytest.mark.parametrize("name", LOSSES)
def test_hessian_vector_product_matches_the_literal_loss(seed, name, mode, monkeypatch):
    """Loss, gradient and a Hessian-vector product against plain autograd through the float64 literal loss."""
    monkeypatch.setenv("SSLFAST_BACKEND", "reference")
    make, loss, literal = _cases()[name]
    got_in = make(F64)
    want_in = [x.detach().clone().requires_grad_() for x in got_in]
    vs = [torch.randn_like(x) for x in got_in]
    results = []
    for fn, xs, ctx in ((loss, got_in, _mode(mode)), (literal, want_in, contextlib.nullcontext())):
        with ctx:
            out = fn(*xs)
        grads = torch.autograd.grad(out, xs, create_graph=True)
        hvp = torch.autograd.grad(sum((g * v).sum() for g, v in zip(grads, vs)), xs)
        results.append((out, grads, hvp))
    (out, grads, hvp), (want, want_grads, want_hvp) = results
    assert out.dtype == F64
    assert_close(out, want, 1e-10, f"{name} ({mode}) loss, seed {seed}")
    for i, (g, w, h, hw) in enumerate(zip(grads, want_grads, hvp, want_hvp)):
        assert_close(g, w, 1e-9, f"{name} ({mode}) gradient of input {i}, seed {seed}")
        assert_close(h, hw, 1e-8, f"{name} ({mode}) Hessian-vector product of input {i}, seed {seed}")


@pytest.mark.parametrize("name", LOSSES)
def test_triton_path_refuses_double_backward(triton_backend, seed, name, mode):
    """The kernels' gradients are not differentiable again: a create_graph backward says so, naming the op and
    the reference backend, instead of returning a detached or partial graph."""
    make, loss, _ = _cases()[name]
    inputs = make(torch.float32)
    with _mode(mode):
        out = loss(*inputs)
    with pytest.raises(DoubleBackwardError, match=_MESSAGE + r".*SSLFAST_BACKEND=reference"):
        grads = torch.autograd.grad(out, inputs, create_graph=True)
        sum(g.square().sum() for g in grads).backward()
    # the first-order gradients are unaffected
    assert all(torch.isfinite(g).all() for g in torch.autograd.grad(out, inputs))


@pytest.mark.parametrize("name", FLOAT64_REJECTED)
def test_float64_on_the_triton_path_is_a_clear_type_error(triton_backend, name):
    make, loss, _ = _cases()[name]
    first = "image_features" if name == "clip" else "query" if name.startswith("info_nce") else "z1"
    with pytest.raises(TypeError, match=f"{first} has dtype torch.float64.*SSLFAST_BACKEND=reference"):
        loss(*make(F64))


def test_float64_queue_on_the_triton_path_is_a_clear_type_error(triton_backend):
    with pytest.raises(TypeError, match="queue has dtype torch.float64.*SSLFAST_BACKEND=reference"):
        sf.info_nce_loss(torch.randn(4, 3), torch.randn(4, 3), torch.randn(6, 3, dtype=F64))


def test_double_backward_error_is_a_runtime_error():
    """Code that catches RuntimeError (torch's own autograd errors) also catches sslfast's."""
    assert issubclass(DoubleBackwardError, NotImplementedError) and issubclass(DoubleBackwardError, RuntimeError)


def test_create_graph_backward_sees_in_place_changes_of_the_inputs(seed, monkeypatch):
    """The recompute reads the saved inputs: one modified in place after the forward is refused by autograd."""
    monkeypatch.setenv("SSLFAST_BACKEND", "reference")
    a, b = _x(5, 3), _x(5, 3)
    x, y = a * 1.0, b * 1.0
    out = sf.info_nce_loss(x, y, None, 0.5)
    with torch.no_grad():
        x.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(out, (a, b), create_graph=True)


def _take_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])
    ctx.rows = inputs[0].shape[0]


def _take_backward(ctx, g):
    (idx,) = ctx.saved_tensors
    return g.new_zeros(ctx.rows, *g.shape[1:]).index_add(0, idx, g), None


@custom_op(
    "test_second_order_take",
    fake=lambda x, idx: x.new_empty(idx.shape[0], *x.shape[1:]),
    backward=_take_backward,
    setup_context=_take_setup,
    double_backward=backward_on_reference("test_second_order_take", _take_backward),
)
def _take(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return x.index_select(0, idx)


def test_backward_on_reference_differentiates_a_plain_backward_and_refuses_on_triton(seed, monkeypatch):
    """`backward_on_reference`: a backward that is plain PyTorch is differentiated as it runs (reference path);
    on the Triton path it is refused. Rows gathered twice check that the scatter-add is what autograd sees."""
    x, idx = _x(5, 2), torch.tensor([3, 0, 3, 4])

    def f(t):
        return _take(t, idx).pow(3).sum()

    monkeypatch.setenv("SSLFAST_BACKEND", "reference")
    assert torch.autograd.gradgradcheck(f, (x,)), f"seed {seed}"
    monkeypatch.setenv("SSLFAST_BACKEND", "triton")
    if not (sf._backend.triton_available() and sf._backend.interpreting()):
        return
    g = torch.autograd.grad(f(x), x)[0]  # first order unaffected
    assert torch.isfinite(g).all()
    with pytest.raises(DoubleBackwardError, match="test_second_order_take" + r".*SSLFAST_BACKEND=reference"):
        torch.autograd.grad(f(x), x, create_graph=True)


# ------------------------------------------------------------------------------------------- MAE ops
B, C, H, P = 2, 3, 8, 4
L, E = (H // P) ** 2, P * P * 3


def _mae_case(name):
    """(op on x [B, L, E] as a scalar, the same in plain PyTorch), fixed masking and images."""
    gen = torch.Generator().manual_seed(1)
    imgs = torch.randn(B, C, H, H)
    info = mae.random_masking(B, L, 0.5, generator=gen)
    token = torch.randn(E)
    keep = info.ids_keep.shape[1]
    weights = torch.randn(B, keep, E)
    ids = info.ids_keep[..., None].expand(-1, -1, E)
    return {
        "masked_mse_loss": (
            lambda x: mae.masked_mse_loss(x, imgs, info.mask, P),
            lambda x: ref_mae.forward_loss_official(imgs, x, info.mask, P),
        ),
        "gather_tokens": (
            lambda x: (mae.gather_tokens(x, info.ids_keep) * weights).square().sum(),
            lambda x: (torch.gather(x, 1, ids) * weights).square().sum(),
        ),
        "unshuffle": (
            lambda x: mae.unshuffle(x[:, :keep], info.ids_restore, token).pow(3).sum(),
            lambda x: ref_mae.unshuffle_official(x[:, :keep], info.ids_restore, token).pow(3).sum(),
        ),
    }[name]


@pytest.mark.parametrize("name", ["masked_mse_loss", "gather_tokens", "unshuffle"])
def test_mae_ops_double_backward_is_right_or_refused(backend, seed, name, mode):
    """The differentiable MAE ops give the Hessian-vector product of plain PyTorch on the reference path; the
    kernels may raise `DoubleBackwardError` naming the op instead: never a detached or partial graph."""
    fused, plain = _mae_case(name)
    x = torch.randn(B, L, E, requires_grad=True)
    v = torch.randn(B, L, E)
    y = x.detach().clone().requires_grad_()
    g_want = torch.autograd.grad(plain(y), y, create_graph=True)[0]
    want = torch.autograd.grad((g_want * v).sum(), y)[0]
    with _mode(mode):
        out = fused(x)
    try:
        g = torch.autograd.grad(out, x, create_graph=True)[0]
        got = torch.autograd.grad((g * v).sum(), x, allow_unused=True)[0]
    except DoubleBackwardError as e:
        assert backend == "triton", f"{name} ({mode}): the reference path must give a true second order"
        assert e.args[0].startswith("sslfast: ") and "does not support double backward (create_graph=True)" in e.args[0]
        return
    assert got is not None and want.norm() > 0, f"{name} ({mode}): no second-order graph"
    assert_close(got, want, 1e-4, f"{name} ({mode}) Hessian-vector product, seed {seed}")
