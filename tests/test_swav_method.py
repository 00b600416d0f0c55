"""The `swav` method: main_swav.py's loss, codes and queue (float64 re-implementation of its training loop),
prototype normalization and freezing, its preset, and a short `sslfast pretrain --method swav` run."""

import copy
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import sslfast.data.presets as P
from sslfast.cli import main
from sslfast.methods import METHODS, build_method
from sslfast.models import build_backbone
from sslfast.train import PretrainConfig, preset_for, resolve, setup, train_step


def _cfg(**kw):
    kw.setdefault("batch_size", 10)
    kw.setdefault("epochs", 2)
    kw.setdefault("lr", 1.0)  # LARS steps are small (trust ratio 1e-3): a visible prototype update
    return resolve(PretrainConfig(method="swav", out="unused", workers=1, **kw))


def _views(batch, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(batch, 3, v.size, v.size, generator=g, dtype=dtype)
        for v in preset_for(_cfg(), METHODS["swav"]).expanded()
    ]


def _method(dtype=torch.float64, **kw):
    method = build_method("swav", build_backbone("resnet_tiny", image_size=16), profile="small", **kw)
    return method.to(dtype)


def _capture(method):
    """Records the (normalized embedding, scores, prototype weight) of every forward (from the projector's
    output, the prototypes already normalized: the same on the fused and materialized paths)."""
    seen = []

    def hook(mod, args, out):
        z = F.normalize(out.detach(), dim=1)
        w = method.prototypes.weight.detach().clone()
        seen.append((z, z @ w.t(), w))

    method.projector.register_forward_hook(hook)
    return seen


def _sinkhorn(out, epsilon, iters):
    """main_swav.py distributed_sinkhorn on one process."""
    Q = torch.exp(out / epsilon).t()
    B, K = Q.shape[1], Q.shape[0]
    Q /= torch.sum(Q)
    for _ in range(iters):
        Q /= torch.sum(Q, dim=1, keepdim=True)
        Q /= K
        Q /= torch.sum(Q, dim=0, keepdim=True)
        Q /= B
    Q *= B
    return Q.t()


def _main_swav_loss(embedding, output, weight, queue, bs, nmb_crops, *, temperature=0.1, epsilon=0.05, iters=3):
    """The loss loop of main_swav.py's train() for crops_for_assign = [0, 1] (queue updated in place)."""
    loss = 0
    for i, crop_id in enumerate([0, 1]):
        out = output[bs * crop_id : bs * (crop_id + 1)]
        if queue is not None:
            if not torch.all(queue[i, -1, :] == 0):
                out = torch.cat((torch.mm(queue[i], weight.t()), out))
            queue[i, bs:] = queue[i, :-bs].clone()
            queue[i, :bs] = embedding[crop_id * bs : (crop_id + 1) * bs]
        q = _sinkhorn(out, epsilon, iters)[-bs:]
        subloss = 0
        for v in np.delete(np.arange(nmb_crops), crop_id):
            x = output[bs * v : bs * (v + 1)] / temperature
            subloss -= torch.mean(torch.sum(q * F.log_softmax(x, dim=1), dim=1))
        loss += subloss / (nmb_crops - 1)
    return loss / 2


# --------------------------------------------------------------------------------------------- loss and codes
@pytest.mark.parametrize("fused_head", [True, False])
def test_loss_is_main_swav_loss(seed, fused_head):
    method = _method(fused_head=fused_head)
    seen = _capture(method)
    views = _views(7, seed, torch.float64)
    loss = method(views)
    z, scores, weight = seen[0]
    assert loss.dtype == torch.float64 and scores.shape == (8 * 7, 100)
    torch.testing.assert_close(weight.norm(dim=1), torch.ones(100, dtype=torch.float64))
    torch.testing.assert_close(z.norm(dim=1), torch.ones(8 * 7, dtype=torch.float64))
    want = _main_swav_loss(z, scores, weight, None, 7, 8)
    torch.testing.assert_close(loss.detach(), want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("fused_head", [True, False])
def test_queue_is_main_swav_queue(seed, fused_head):
    """queue_length 2·B from epoch 0: two batches fill it (codes from the batch alone), the third batch's codes
    come from Sinkhorn over [queue; batch]; the queue holds the newest embeddings first."""
    B = 5
    method = _method(queue_length=2 * B, epoch_queue_starts=0, fused_head=fused_head)
    method.configure(total_steps=10, steps_per_epoch=5)
    seen = _capture(method)
    queue = torch.zeros(2, 2 * B, 64, dtype=torch.float64)
    for step in range(3):
        with torch.no_grad():
            loss = method(_views(B, seed + step, torch.float64))
        z, scores, weight = seen[-1]
        want = _main_swav_loss(z, scores, weight, queue, B, 8)
        torch.testing.assert_close(loss, want, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(method.queue, queue, rtol=0, atol=0 if not fused_head else 1e-15)
        if step == 2:  # the queue changes the codes: not the loss without it
            assert not torch.allclose(loss, _main_swav_loss(z, scores, weight, None, B, 8), rtol=1e-6, atol=0)
    assert int(method.queue_count) == 3 * B


def _step(method, views):
    method.zero_grad(set_to_none=True)
    loss = method(views)
    loss.backward()
    method.before_optimizer_step()
    return loss.detach(), {n: p.grad for n, p in method.named_parameters()}


@pytest.mark.parametrize("queue", [False, True])
def test_fused_head_equals_materialized(seed, queue):
    """float64, 4 steps of two copies (fused_head True / False) of one SwAV with un-normalized prototypes: the
    same loss and gradients of every parameter, prototypes dropped during epoch 0 and normalized in place by
    both, and (queue) the same queue, full from the third step on; the same state_dict keys."""
    kw = dict(queue_length=8, epoch_queue_starts=0) if queue else {}
    fused = _method(**kw)
    plain = copy.deepcopy(fused)
    plain.fused_head = False
    assert fused.fused_head and fused.state_dict().keys() == plain.state_dict().keys()
    B = 4
    for step in range(4):
        for m in (fused, plain):
            m.configure(total_steps=4, steps_per_epoch=2)
            m.global_step = step
        views = _views(B, seed + step, torch.float64)
        (lf, gf), (lp, gp) = _step(fused, views), _step(plain, views)
        what = f"step {step}, queue {queue}, seed {seed}"
        torch.testing.assert_close(lf, lp, rtol=1e-12, atol=1e-12, msg=what)
        for name in gp:  # atol: biases before BN have gradients of pure rounding noise
            assert (gf[name] is None) == (gp[name] is None) == (name == "prototypes.weight" and step < 2), name
            if gp[name] is not None:
                torch.testing.assert_close(
                    gf[name], gp[name], rtol=1e-9, atol=1e-13, msg=lambda m, name=name: f"d {name}, {what}: {m}"
                )
        torch.testing.assert_close(fused.prototypes.weight, plain.prototypes.weight, rtol=0, atol=1e-15)
        torch.testing.assert_close(fused.prototypes.weight.norm(dim=1), torch.ones(100, dtype=torch.float64))
        if queue:
            torch.testing.assert_close(fused.queue, plain.queue, rtol=0, atol=1e-15)
        with torch.no_grad():  # the next step's prototypes: moved, off the sphere until the next forward
            for m in (fused, plain):
                m.prototypes.weight.add_(0.1 * m.prototypes.weight.flip(0))
    if queue:
        assert int(fused.queue_count) == 4 * B


def test_fused_head_saves_no_scores_backends(backend, seed):
    """fp32 on the reference and Triton (interpreted) paths: the fused head agrees with the materialized one
    and its graph saves no differentiable [V·B, K] tensor."""
    fused = _method(torch.float32)
    plain = copy.deepcopy(fused)
    plain.fused_head = False
    views = _views(4, seed, torch.float32)
    for m in (fused, plain):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            loss = m(views)
        big = [t for t in saved if t.shape[-1:] == (100,) and t.numel() >= 8 * 4 * 100 and t.requires_grad]
        assert (big == []) == m.fused_head
        m.grads = torch.autograd.grad(loss, [m.prototypes.weight, m.projector[0].weight])
        m.loss = loss.detach()
    torch.testing.assert_close(fused.loss, plain.loss, rtol=1e-5, atol=1e-5)
    for a, b in zip(fused.grads, plain.grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_queue_waits_for_its_epoch(seed):
    method = _method(queue_length=8, epoch_queue_starts=1)
    method.configure(total_steps=4, steps_per_epoch=2)
    with torch.no_grad():
        method(_views(4, seed, torch.float64))
        assert int(method.queue_count) == 0 and not method.queue.any()
        method.global_step = 2  # epoch 1
        method(_views(4, seed + 1, torch.float64))
    assert int(method.queue_count) == 4 and method.queue[:, :4].any() and not method.queue[:, 4:].any()


# --------------------------------------------------------------------------------------------- training steps
def test_two_steps_move_weights_and_normalize_prototypes(seed):
    """steps_per_epoch=1: step 1 (epoch 0) keeps the prototypes frozen, step 2 moves them; every forward sees
    unit-norm prototypes (the optimizer's step leaves them off the sphere until the next forward)."""
    run = setup(_cfg(), steps_per_epoch=1, device="cpu")
    method = run.method
    seen = _capture(method)
    w0 = method.prototypes.weight.detach().clone()
    assert not torch.allclose(w0.norm(dim=1), torch.ones(100))  # nn.Linear's init is not normalized
    backbone0 = {k: v.clone() for k, v in method.backbone.state_dict().items() if v.is_floating_point()}
    losses = [train_step(run, _views(10, seed + i)).item() for i in range(2)]
    assert all(math.isfinite(v) for v in losses)
    for _, _, weight in seen:
        torch.testing.assert_close(weight.norm(dim=1), torch.ones(100))
    torch.testing.assert_close(seen[1][2], F.normalize(w0, dim=1))  # frozen during epoch 0: only normalized
    assert not torch.allclose(method.prototypes.weight, seen[1][2])  # the epoch-1 step moved them
    assert any(not torch.equal(v, method.backbone.state_dict()[k]) for k, v in backbone0.items())
    assert method.global_step == 2


def test_prototypes_frozen_for_the_first_epoch(seed):
    run = setup(_cfg(), steps_per_epoch=3, device="cpu")
    method = run.method
    method.normalize_prototypes()
    w0 = method.prototypes.weight.detach().clone()
    head0 = method.projector[0].weight.detach().clone()
    for i in range(3):  # epoch 0, 1/3, 2/3
        train_step(run, _views(10, seed + i))
        torch.testing.assert_close(method.prototypes.weight, w0, rtol=0, atol=1e-7)
    assert not torch.equal(method.projector[0].weight, head0)
    train_step(run, _views(10, seed + 3))  # epoch 1
    assert (method.prototypes.weight - w0).abs().max() > 1e-6  # LARS steps are small: trust ratio 1e-3


# --------------------------------------------------------------------------------------------- settings, input
def test_paper_settings():
    method = build_method("swav", build_backbone("resnet50", image_size=224))
    assert method.prototypes.weight.shape == (3000, 128) and method.prototypes.bias is None
    assert [m.out_features for m in method.projector if isinstance(m, torch.nn.Linear)] == [2048, 128]
    assert (method.temperature, method.epsilon, method.sinkhorn_iterations) == (0.1, 0.05, 3)
    assert method.queue is None and method.freeze_prototypes_epochs == 1.0
    recipe = METHODS["swav"].recipe("paper")
    assert recipe["optimizer"] == "lars" and recipe["lr"] * 4096 / 256 == pytest.approx(4.8)
    assert (recipe["weight_decay"], recipe["warmup_epochs"], recipe["momentum"]) == (1e-6, 10, 0.9)
    small = METHODS["swav"].head_config("small")
    assert small["num_prototypes"] == 100 and small["queue_length"] == 0
    assert METHODS["swav"].min_batch_per_rank == 2 and METHODS["swav"].preset == "swav"


def test_swav_preset():
    p = P.get_preset("swav")
    assert p.sizes() == [224] * 2 + [96] * 6 and p.sources
    assert [v.scale for v in p.views] == [(0.14, 1.0), (0.05, 0.14)]
    for v in p.views:
        assert (v.brightness, v.contrast, v.saturation, v.hue, v.jitter_p, v.gray_p) == (0.8, 0.8, 0.8, 0.2, 0.8, 0.2)
        assert (v.blur_p, v.blur_sigma, v.solarize_p, v.flip_p) == (0.5, (0.1, 2.0), 0.0, 0.5)
    assert P.get_preset("swav", 16).sizes() == [16, 16] + [7] * 6


@pytest.mark.parametrize(
    "kw, exc, match",
    [
        (dict(num_prototypes=0), ValueError, "num_prototypes"),
        (dict(out_dim=2.0), TypeError, "out_dim"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(epsilon=-1.0), ValueError, "epsilon"),
        (dict(queue_length=-1), ValueError, "queue_length"),
        (dict(sinkhorn_iterations=True), TypeError, "sinkhorn_iterations"),
        (dict(freeze_prototypes_epochs=float("nan")), ValueError, "freeze_prototypes_epochs"),
        (dict(fused_head=None), TypeError, "fused_head"),
    ],
)
def test_bad_arguments(kw, exc, match):
    with pytest.raises(exc, match=match):
        build_method("swav", build_backbone("resnet_tiny", image_size=16), profile="small", **kw)


def test_bad_views(seed):
    method = _method(torch.float32)
    views = _views(4, seed)
    with pytest.raises(ValueError, match="at least 2 views"):
        method(views[:1])
    with pytest.raises(ValueError, match="batch size"):
        method(views[:-1] + [views[-1][:3]])


# --------------------------------------------------------------------------------------------- CLI
def test_pretrain_cli(tmp_path):
    out = str(tmp_path / "run")
    assert main(
        ["pretrain", "--method", "swav", "--epochs", "2", "--batch-size", "128", "--no-progress", "--out", out]
    ) in (0, None)
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert metrics["finished"] and metrics["knn"]["pretrained"] > 0.1
