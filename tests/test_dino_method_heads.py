"""The `dino` method's fused head (`fused_head=True`: features and prototypes into `sf.prototype_teacher_probs` and
`sf.prototype_cross_entropy`) against its materialized path (`fused_head=False`: logits into `sf.dino_loss`):
the same loss, center update and gradients on every parameter, step after step, no [V·B, K] student tensor
saved for backward, the same state_dict keys."""

import copy

import pytest
import torch

from sslfast.methods import build_method
from sslfast.models import build_backbone
from helpers import assert_close, assert_loss_close

K = 37  # odd prototype count


def _pair(dtype, G=2, **kw):
    """Two copies of one small DINO (BN in the head, τ_t warm-up), fused and materialized."""
    fused = build_method(
        "dino",
        build_backbone("resnet_tiny", image_size=16),
        profile="small",
        out_dim=K,
        hidden_dim=24,
        bottleneck_dim=12,
        num_global_crops=G,
        warmup_teacher_temp=0.02,
        warmup_teacher_temp_epochs=2,
        **kw,
    ).to(dtype)
    with torch.no_grad():  # a teacher away from the student and a non-zero center
        for p in fused.ema.teacher.parameters():
            p.mul_(1 + 0.3 * torch.rand_like(p))
        fused.criterion.center.normal_()
    plain = copy.deepcopy(fused)
    plain.fused_head = False
    for m in (fused, plain):
        m.configure(total_steps=6, steps_per_epoch=2)
    assert fused.fused_head and not plain.fused_head
    return fused, plain


def _views(B, G, n_local, dtype):
    return [torch.randn(B, 3, 16, 16, dtype=dtype) for _ in range(G)] + [
        torch.randn(B, 3, 8, 8, dtype=dtype) for _ in range(n_local)
    ]


def _step(method, views):
    method.zero_grad(set_to_none=True)
    loss = method(views)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in method.named_parameters()}


@pytest.mark.parametrize("G,n_local", [(2, 3), (1, 2), (3, 1), (2, 0)])
def test_fused_equals_materialized_float64(seed, G, n_local):
    """Three steps (τ_t changes with the epoch, the center with every step): loss, the gradient of every
    parameter (the last layer's included) and the center agree; in eval() the center stays."""
    fused, plain = _pair(torch.float64, G)
    B = 5
    for step in range(3):
        views = _views(B, G, n_local, torch.float64)
        (lf, gf), (lp, gp) = _step(fused, views), _step(plain, views)
        what = f"step {step}, G={G}, locals {n_local}, seed {seed}"
        assert_loss_close(lf, lp, 1e-12, what)
        assert gf.keys() == gp.keys()
        for name in gp:
            assert (gf[name] is None) == (gp[name] is None), name
            if gp[name] is not None:  # (atol: biases before BN have gradients of pure rounding noise)
                torch.testing.assert_close(
                    gf[name], gp[name], rtol=1e-9, atol=1e-13, msg=lambda m, name=name: f"d {name}, {what}: {m}"
                )
        assert gf["head.last_layer.weight"].abs().sum() > 0
        assert_close(fused.criterion.center, plain.criterion.center, 1e-12, f"center, {what}")
        for m in (fused, plain):
            m.global_step += 1
    assert fused.criterion.teacher_temperature(2 / 2) != fused.criterion.teacher_temperature(0.0)  # step 2: warmed up
    fused.eval()
    center = fused.criterion.center.clone()
    with torch.no_grad():
        fused(_views(B, G, n_local, torch.float64))
    assert torch.equal(fused.criterion.center, center)


def test_fused_equals_materialized_backends(backend, seed):
    """fp32 on the reference and Triton (interpreted) paths: the two heads agree to fp32 rounding."""
    fused, plain = _pair(torch.float32)
    views = _views(4, 2, 2, torch.float32)
    (lf, gf), (lp, gp) = _step(fused, views), _step(plain, views)
    assert_loss_close(lf, lp, 1e-5, f"{backend}, seed {seed}")
    for name in ("head.last_layer.weight", "head.mlp.0.weight", "backbone.conv1.weight"):
        assert_close(gf[name], gp[name], 1e-4, f"d {name}, {backend}, seed {seed}")
    assert_close(fused.criterion.center, plain.criterion.center, 1e-5, "center")


def test_no_student_logits_saved_and_same_state_dict():
    """The fused graph saves no differentiable [V·B, K] tensor (only the targets); the materialized one does. Both have
    the same state_dict keys, and a checkpoint of one loads into the other."""
    fused, plain = _pair(torch.float32)
    B, V = 4, 5
    views = _views(B, 2, V - 2, torch.float32)

    def saved_logits(method):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            method(views)
        return [tuple(t.shape) for t in saved if t.shape[-1:] == (K,) and t.numel() >= V * B * K and t.requires_grad]

    assert saved_logits(fused) == [] and saved_logits(plain)
    assert fused.state_dict().keys() == plain.state_dict().keys()
    assert "head.last_layer.weight" in fused.state_dict() and "criterion.center" in fused.state_dict()
    plain.load_state_dict(fused.state_dict())


def test_bad_arguments():
    with pytest.raises(TypeError, match="fused_head"):
        build_method("dino", build_backbone("resnet_tiny", image_size=16), profile="small", fused_head=1)
    fused, _ = _pair(torch.float32)
    center = fused.criterion.center.clone()
    with pytest.raises(ValueError, match="V·B rows"):  # crops of different batch sizes, refused before the update
        fused([torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16), torch.randn(3, 3, 8, 8)])
    assert torch.equal(fused.criterion.center, center)
