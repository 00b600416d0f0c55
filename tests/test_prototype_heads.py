"""`sf.nn.PrototypeHead` + `sf.nn.PrototypeLoss` against the materialized formulas in float64: logits = f Wᵀ, then
DINO's loss with its center update (`dino_loss_literal`), or SwAV's swapped prediction on Sinkhorn codes
(`swav_loss_literal`), in value and in the gradients of the student's input features and head parameters."""

import pytest
import torch
import torch.nn.functional as F

import sslfast as sf
from sslfast.reference import dino as R_dino
from sslfast.reference import sinkhorn as R_sinkhorn
from sslfast.reference import swav as R_swav
from helpers import assert_close, assert_loss_close

B, K, D = 5, 53, 24


def _heads(learn_norm: bool, norm: str = "weight"):
    student = sf.nn.PrototypeHead(D, K, norm=norm, learn_norm=learn_norm)
    teacher = sf.nn.PrototypeHead(D, K, norm=norm, learn_norm=learn_norm)
    with torch.no_grad():
        for p in student.parameters():
            p.mul_(1 + 0.5 * torch.rand_like(p))  # rows of different norms, gains away from 1
        for p in teacher.parameters():
            p.copy_(p * (1 + 0.5 * torch.rand_like(p)))
    return student, teacher


def _materialized_prototypes(head, params64):
    """The head's W in float64 from float64 copies of its parameters: g·v/‖v‖ (DINO's weight_norm)."""
    w = params64["weight"] / params64["weight"].norm(dim=1, keepdim=True)
    return w * params64["weight_g"] if "weight_g" in params64 else w


@pytest.mark.parametrize("V", [2, 5])
@pytest.mark.parametrize("learn_norm", [False, True])
def test_dino_head_matches_materialized(backend, seed, V, learn_norm):
    """V crops (2 global), τ_t = 0.04 (0.02 at the second step): two training steps, so the second uses the
    center the first updated."""
    G = 2
    student, teacher = _heads(learn_norm)
    loss_fn = sf.nn.PrototypeLoss(K, student_temp=0.1, teacher_temp=0.04, center_momentum=0.9)
    center64 = torch.zeros(1, K, dtype=torch.float64)
    for step, tau_t in enumerate((0.04, 0.02)):
        xs = torch.randn(V * B, D)
        xt = torch.randn(G * B, D)
        # the op
        xs_l = xs.clone().requires_grad_()
        loss = loss_fn(
            student.features(xs_l), student.prototypes(), teacher.features(xt), teacher.prototypes(), teacher_temp=tau_t
        )
        grads = torch.autograd.grad(loss, [xs_l, *student.parameters()])
        # the materialized formula in float64
        ps = {n: p.detach().double().requires_grad_() for n, p in student.named_parameters()}
        pt = {n: p.detach().double() for n, p in teacher.named_parameters()}
        xs64 = xs.double().requires_grad_()
        logits_s = F.normalize(xs64, dim=1) @ _materialized_prototypes(student, ps).T
        logits_t = F.normalize(xt.double(), dim=1) @ _materialized_prototypes(teacher, pt).T
        want = R_dino.dino_loss_literal(logits_s, logits_t, center64, 0.1, tau_t, G)
        want_grads = torch.autograd.grad(want, [xs64, *ps.values()])
        center64 = center64 * 0.9 + logits_t.mean(0, keepdim=True) * 0.1  # DINO's update_center
        what = f"step {step}, V={V}, learn_norm={learn_norm}, seed {seed}"
        assert_loss_close(loss, want, 1e-5, f"loss, {what}")
        for name, got, ref in zip(["features", *ps], grads, want_grads):
            assert_close(got, ref, 2e-5, f"d {name}, {what}")
        assert_close(loss_fn.center, center64, 1e-5, f"center, {what}")


@pytest.mark.parametrize("per_crop", [True, False])
def test_swav_head_matches_materialized(backend, seed, per_crop):
    """SwAV: L2-normalized prototypes (renormalized in place each training step), the teacher is the student's
    own detached global crops, codes by Sinkhorn-Knopp (ε = 0.05, 3 iterations) per global crop (SwAV) or over
    both together (DINOv2); the loss is main_swav.py's swapped prediction."""
    G, V = 2, 4
    head = sf.nn.PrototypeHead(D, K, norm="l2")
    loss_fn = sf.nn.PrototypeLoss(K, student_temp=0.1, teacher_temp=0.05, mode="sinkhorn", sinkhorn_per_crop=per_crop)
    x = torch.randn(V * B, D, requires_grad=True)
    w = head.prototypes()
    assert_close(w.norm(dim=1), torch.ones(K), 1e-6, "unit prototypes after the in-place normalization")
    z = head.features(x)
    loss = loss_fn(z, w, z[: G * B].detach(), w.detach())
    gx, gw = torch.autograd.grad(loss, (x, head.weight))

    x64, w64 = x.detach().double().requires_grad_(), head.weight.detach().double().requires_grad_()
    scores = F.normalize(x64, dim=1) @ w64.T
    t = scores[: G * B].detach()
    codes = (
        torch.cat([R_sinkhorn.sinkhorn_knopp_literal(c, 0.05, 3) for c in t.chunk(G)])
        if per_crop
        else R_sinkhorn.sinkhorn_knopp_literal(t, 0.05, 3)
    )
    want = R_swav.swav_loss_literal(scores, codes, 0.1, G)
    want_gx, want_gw = torch.autograd.grad(want, (x64, w64))
    assert_loss_close(loss, want, 1e-5, f"loss, seed {seed}")
    assert_close(gx, want_gx, 2e-5, f"d features, seed {seed}")
    assert_close(gw, want_gw, 2e-5, f"d prototypes, seed {seed}")


def test_one_global_crop(backend, seed):
    """G = 1: the global student crop has no pair; each other crop is scored against the one teacher crop."""
    student, teacher = _heads(False)
    loss_fn = sf.nn.PrototypeLoss(K, num_global_crops=1).eval()
    xs, xt = torch.randn(3 * B, D), torch.randn(B, D)
    got = loss_fn(student.features(xs), student.prototypes(), teacher.features(xt), teacher.prototypes())
    with torch.no_grad():
        want = R_dino.dino_loss_literal(student(xs).double(), teacher(xt).double(), torch.zeros(1, K), 0.1, 0.04, 1)
    assert_loss_close(got, want, 1e-5, f"seed {seed}")
    assert torch.equal(loss_fn.center, torch.zeros(1, K))  # eval(): no update


def test_no_student_logits_saved(backend):
    """The graph holds no [V·B, K] tensor besides the targets: no logits, softmax or their gradient."""
    V = 4
    student, teacher = _heads(False)
    loss_fn = sf.nn.PrototypeLoss(K)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss = loss_fn(
            student.features(torch.randn(V * B, D)),
            student.prototypes(),
            teacher.features(torch.randn(2 * B, D)),
            teacher.prototypes(),
        )
    big = [tuple(t.shape) for t in saved if t.shape[-1:] == (K,) and t.numel() >= V * B * K]
    assert len(big) == 1, big
    loss.backward()


def test_head_forward_and_freeze(seed):
    head = sf.nn.PrototypeHead(D, K, learn_norm=True, freeze_epochs=1.0)
    x = torch.randn(B, D)
    want = F.normalize(x, dim=1) @ (F.normalize(head.weight, dim=1) * head.weight_g).T
    assert_close(head(x), want, 1e-6, f"logits, seed {seed}")
    head(x).sum().backward()
    head.cancel_gradients(0.5)
    assert head.weight.grad is None and head.weight_g.grad is None
    head(x).sum().backward()
    head.cancel_gradients(1.0)
    assert head.weight.grad is not None and head.weight_g.grad is not None
    raw = sf.nn.PrototypeHead(D, K, norm=None, normalize_input=False)
    assert_close(raw(x), x @ raw.weight.T, 1e-6, "plain linear")
    swav = sf.nn.PrototypeHead(D, K, norm="l2").eval()
    before = swav.weight.detach().clone()
    swav.prototypes()
    assert torch.equal(swav.weight, before)  # eval(): not renormalized


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(in_dim=0), ValueError, "in_dim"),
        (dict(num_prototypes=2.0), ValueError, "num_prototypes"),
        (dict(norm="batch"), ValueError, "norm"),
        (dict(norm="l2", learn_norm=True), ValueError, "learn_norm"),
        (dict(freeze_epochs=-1), ValueError, "freeze_epochs"),
    ],
)
def test_head_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        sf.nn.PrototypeHead(**{"in_dim": D, "num_prototypes": K, **kwargs})


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(mode="swav"), ValueError, "mode"),
        (dict(student_temp=0.0), ValueError, "student_temp"),
        (dict(teacher_temp=float("nan")), ValueError, "teacher_temp"),
        (dict(center_momentum=1.5), ValueError, "center_momentum"),
        (dict(num_global_crops=0), ValueError, "num_global_crops"),
    ],
)
def test_loss_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        sf.nn.PrototypeLoss(K, **kwargs)


@pytest.mark.parametrize(
    "n_student,n_teacher,match",
    [(3 * B + 1, 2 * B, "student_feats"), (B, 2 * B, "student_feats"), (4 * B, 2 * B + 1, "teacher_feats")],
)
def test_loss_bad_crops_leave_center(n_student, n_teacher, match):
    student, teacher = _heads(False)
    loss_fn = sf.nn.PrototypeLoss(K)
    with pytest.raises(ValueError, match=match):
        loss_fn(torch.randn(n_student, D), student.prototypes(), torch.randn(n_teacher, D), teacher.prototypes())
    assert torch.equal(loss_fn.center, torch.zeros(1, K))
