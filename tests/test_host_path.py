"""The eager host path: what an op call issues besides its kernels (ATen ops, autograd nodes), the folded
epilogues, and the EMA plan cache's check, with the numerics of every shortcut against float64 references."""

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import sslfast as sf
from sslfast import mae
from sslfast.ops import _ema_plan
from sslfast.ops import ema as ema_ops

from tests.helpers import assert_close, leaf, tol


class _CountAten(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def _aten_ops(call) -> collections.Counter:
    with _CountAten() as mode:
        call()
    return mode.ops


def _nt_xent64(z1, z2, tau):
    z = torch.nn.functional.normalize(torch.cat([z1, z2]).double(), dim=1)
    n = z1.shape[0]
    s = (z @ z.T / tau).fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    return torch.nn.functional.cross_entropy(s, target)


def _stub_launches(monkeypatch) -> collections.Counter:
    """Triton path with every launch counted, not run, and no poisoned buffers: the ops' own host work only
    (as benchmarks/host_overhead.py measures it)."""
    from sslfast._backend import interpreting

    if not interpreting():
        pytest.skip("needs TRITON_INTERPRET=1")
    from triton.runtime.interpreter import InterpretedFunction

    from sslfast.kernels import _common

    launches = collections.Counter()
    monkeypatch.setenv("SSLFAST_BACKEND", "triton")

    def count(self, *args, grid, warmup, **kwargs):
        launches[self.fn.__name__] += 1

    monkeypatch.setattr(InterpretedFunction, "run", count)
    monkeypatch.setattr(_common, "poisoning", lambda: False)
    return launches


# ------------------------------------------------------------------------------------------ NT-Xent
@pytest.mark.parametrize("wants", [(True, True), (True, False), (False, True)])
def test_nt_xent_pair_gradients_without_a_concatenation_node(backend, seed, wants):
    """One device: [z1; z2] is made inside the loss's own node (no CatBackward, whose slices cost host
    calls in every backward) and its gradient reaches each view that wants one, as in float64."""
    n, d, tau = 7, 11, 0.3
    z1, z2 = torch.randn(n, d), torch.randn(n, d)
    a = leaf(z1) if wants[0] else z1.clone()
    b = leaf(z2) if wants[1] else z2.clone()
    loss = sf.nt_xent_loss(a, b, tau)
    assert loss.grad_fn.name() != "CatBackward0"
    assert all(f is None or f.name() != "CatBackward0" for f, _ in loss.grad_fn.next_functions)
    (2.5 * loss).backward()
    a64, b64 = leaf(z1, torch.float64), leaf(z2, torch.float64)
    (2.5 * _nt_xent64(a64, b64, tau)).backward()
    assert_close(loss, _nt_xent64(z1, z2, tau), tol(torch.float32) * 10, f"loss (seed {seed})")
    for x, x64, want in ((a, a64, wants[0]), (b, b64, wants[1])):
        if want:
            assert_close(x.grad, x64.grad, tol(torch.float32) * 10, f"gradient (seed {seed})")
        else:
            assert x.grad is None


def test_nt_xent_pair_double_backward_on_reference(seed, monkeypatch):
    """The pair path keeps the create_graph route of the reference backend (second derivatives in float64)."""
    monkeypatch.setenv("SSLFAST_BACKEND", "reference")
    z1, z2 = torch.randn(5, 6, dtype=torch.float64, requires_grad=True), torch.randn(5, 6, dtype=torch.float64)
    assert all(f is None or f.name() != "CatBackward0" for f, _ in sf.nt_xent_loss(z1, z2).grad_fn.next_functions)
    torch.autograd.gradgradcheck(lambda a: sf.nt_xent_loss(a, z2, 0.5), (z1,))


# ------------------------------------------------------------------------------------------ host work
def test_contrastive_losses_issue_fewer_aten_ops(seed, monkeypatch):
    """The eager Triton path of the contrastive losses: no dtype promotion through the dispatcher, no
    same-dtype `to`, no select of a one-split buffer, one allocation for the epilogue's gradients, one for
    the forward's partials, no `mul` for MoCo's positive, no reshape of a 0-d scale, no detach of a queue
    that has no gradient."""
    _stub_launches(monkeypatch)
    q, k = leaf(torch.randn(16, 32)), leaf(torch.randn(16, 32))
    queue, scale = torch.randn(64, 32), leaf(torch.tensor(14.0))
    budget = {
        "nt_xent": (lambda: sf.nt_xent_loss(q, k, 0.1), 16),  # 26, then 17 before
        "info_nce": (lambda: sf.info_nce_loss(q, k, queue, 0.2), 18),  # 26, then 21 before
        "clip": (lambda: sf.clip_loss(q, k, scale), 21),  # 32, then 25 before
    }
    for name, (loss, most) in budget.items():

        def call():
            q.grad = k.grad = scale.grad = None
            loss().backward()

        call()  # a first call makes the cached scalars
        ops = _aten_ops(call)
        assert ops["promote_types"] == 0 and ops["select"] == 0, (name, dict(ops))
        assert sum(ops.values()) <= most, (name, dict(ops))


def test_barlow_gram_products_without_matmul_views(seed, monkeypatch):
    """Barlow Twins' Gram products call bmm directly (matmul's batched expand/view/_unsafe_view are host calls)."""
    _stub_launches(monkeypatch)
    z1, z2 = leaf(torch.randn(12, 40)), leaf(torch.randn(12, 40))
    ops = _aten_ops(lambda: sf.barlow_twins_loss(z1, z2, algorithm="gram").backward())
    assert ops["expand"] == 0 and ops["_unsafe_view"] == 0 and ops["bmm"] == 2, dict(ops)


def test_mae_token_ops_host_work(seed, monkeypatch):
    """MAE token ops on the Triton path: the CPU range check is one reduction (aminmax), a batch-strided view
    is validated without slicing it, and a call with nothing to differentiate builds no autograd node."""
    monkeypatch.setenv("SSLFAST_BACKEND", "triton")
    b, L, d = 2, 12, 8
    x = torch.randn(b, L + 1, d)[:, 1:]  # batch-strided, dense rows: kept as is
    ids = torch.argsort(torch.rand(b, L), dim=1)[:, :5]
    ops = _aten_ops(lambda: mae.gather_tokens(x, ids))
    assert ops["min"] == ops["max"] == ops["slice"] == 0 and ops["aminmax"] == 1, dict(ops)
    out = mae.gather_tokens(x, ids)
    assert out.grad_fn is None
    assert torch.equal(out, torch.gather(x, 1, ids[..., None].expand(-1, -1, d)))
    with pytest.raises(ValueError, match="ids_keep"):
        mae.gather_tokens(x, ids + L)
    with pytest.raises(ValueError, match="ids_keep"):
        mae.gather_tokens(x, ids - L)


# ------------------------------------------------------------------------------------------ EMA plan check
def _ema_lists():
    shapes = [(4, 4), (6,), (3, 5), (1, 7), (2, 3, 2)]
    return [torch.randn(s) for s in shapes], [torch.randn(s) for s in shapes]


@pytest.fixture(params=["guard", "layout key"])
def plan_check(request, monkeypatch):
    """The plan's check with torch's C++ tensor guard, and with the fallback that compares `_layout_key`."""
    if request.param == "layout key":
        monkeypatch.setattr(_ema_plan, "_TensorGuards", None)
    elif _ema_plan._TensorGuards is None:
        pytest.skip("this torch has no TensorGuards")
    ema_ops._EMA_PLANS.clear()
    yield request.param
    ema_ops._EMA_PLANS.clear()


@pytest.mark.parametrize(
    "change",
    [
        "resize_",
        "t_ (square)",
        "unsqueeze_",
        "as_strided_",
        ".data = transpose",
        ".data = other dtype",
        ".data = other storage",
    ],
)
def test_ema_plan_detects_in_place_metadata_changes(plan_check, change, seed):
    """A cached plan is reused only for unchanged tensors: any in-place change of a tensor's sizes, strides,
    dtype or storage (identity kept) is seen at the next call, which rebuilds and re-validates."""
    teacher, student = _ema_lists()
    plan = ema_ops._ema_plan(teacher, student)
    assert ema_ops._ema_plan(teacher, student) is plan
    if plan_check == "guard":
        assert all(k.guard is not None for k in plan.keys)
    t = teacher[0]
    if change == "resize_":
        teacher[1].resize_(3)
    elif change == "t_ (square)":
        t.t_()
    elif change == "unsqueeze_":
        teacher[2].unsqueeze_(0)
    elif change == "as_strided_":
        teacher[2].as_strided_((3, 5), (1, 3))
    elif change == ".data = transpose":
        t.data = t.data.t()
    elif change == ".data = other dtype":
        t.data = t.data.to(torch.float16)
    else:
        t.data = torch.randn(4, 4)
    assert not plan.matches((teacher, student))
    if change in ("resize_", "unsqueeze_"):
        with pytest.raises(ValueError, match="shape"):
            sf.ema_update_(teacher, student, 0.9)
    else:
        before = [x.clone() for x in teacher]
        sf.ema_update_(teacher, student, 0.9)
        for x, x0, s in zip(teacher, before, student):
            assert_close(
                x, torch.lerp(x0.double(), s.double(), 0.1), tol(x.dtype) if x.dtype != torch.float32 else 1e-6, change
            )


def test_ema_plan_hit_keeps_results(plan_check, seed):
    """Repeated updates through the cached plan equal the float64 EMA."""
    teacher, student = _ema_lists()
    want = [x.double() for x in teacher]
    for m in (0.9, 0.5, 0.99):
        sf.ema_update_(teacher, student, m)
        want = [torch.lerp(w, s.double(), 1 - m) for w, s in zip(want, student)]
    for x, w in zip(teacher, want):
        assert_close(x, w, 1e-6, "ema")
