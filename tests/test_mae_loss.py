"""MAE's norm-pix masked MSE loss (`sslfast.mae.masked_mse_loss`) against the official `forward_loss` in float64,
on both CPU paths (`backend` fixture), and the ops chained: batch-strided views, fp16, torch.compile."""

import pytest
import torch

from sslfast import mae
from sslfast.ops import mae_loss
from sslfast.reference import mae as R

from helpers import assert_close, leaf, tol
from mae_helpers import DTYPES, SHAPES, exact, gather, make_images, seeded


# ----------------------------------------------------------------------------------------- loss
@pytest.mark.parametrize("L,p,C", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_mse_loss(backend, seed, L, p, C, dtype):
    B = 2
    imgs = make_images(B, C, L, p, dtype)
    m = mae.random_masking(B, L, 0.75, generator=seeded(seed))
    pred = torch.randn(B, L, p * p * C).to(dtype)
    for norm in (True, False):
        a, b = leaf(pred), leaf(pred, torch.float64)
        loss = mae.masked_mse_loss(a, imgs, m.mask, p, norm_pix_loss=norm)
        ref = R.forward_loss_official(imgs.double(), b, m.mask.double(), p, norm)
        assert loss.dtype == torch.float32 and loss.dim() == 0
        assert_close(loss, ref, tol(dtype), f"loss norm_pix={norm}")
        (loss * 3).backward()
        (ref * 3).backward()
        assert_close(a.grad, b.grad, tol(dtype), f"d pred norm_pix={norm}")
        assert (a.grad.reshape(B * L, -1)[m.mask.reshape(-1) == 0] == 0).all(), "visible rows get zero gradient"
        # the eager loss computed that gradient in its forward; the custom op (what torch.compile records)
        # runs the separate backward
        c = leaf(pred)
        (mae_loss._masked_mse_op.custom_op(c, imgs, m.mask, p, norm)[0] * 3).backward()
        assert_close(c.grad, b.grad, tol(dtype), f"separate backward, d pred norm_pix={norm}")


def test_masked_mse_loss_weights_mixed_dtypes_and_nonfinite(backend, seed):
    B, C, L, p = 2, 3, 50, 4
    imgs = make_images(B, C, L, p)  # fp32 images, bf16 predictions (AMP)
    pred = torch.randn(B, L, p * p * C, dtype=torch.bfloat16)
    w = torch.rand(B, L) * (torch.rand(B, L) < 0.7)  # a weighted mask with zeros
    a, b = leaf(pred), leaf(pred, torch.float64)
    loss = mae.masked_mse_loss(a, imgs, w, p)
    ref = R.forward_loss_official(imgs.double(), b, w.double(), p)
    assert_close(loss, ref, 1e-2, "weighted loss")
    loss.backward()
    ref.backward()
    assert_close(a.grad, b.grad, 1e-2, "weighted d pred")
    boolmask = w > 0
    assert_close(
        mae.masked_mse_loss(pred, imgs, boolmask, p),
        R.forward_loss_official(imgs.double(), pred.double(), boolmask.double(), p),
        1e-2,
        "bool mask",
    )
    # a NaN in a visible (unweighted) row still poisons the loss, as in the official code
    bad = pred.clone()
    bad[0, int(torch.nonzero(w[0] == 0)[0])] = float("nan")
    assert torch.isnan(mae.masked_mse_loss(bad, imgs, w, p))
    bad_img = imgs.clone()
    bad_img[1, 0, 0, 0] = float("inf")
    assert not torch.isfinite(mae.masked_mse_loss(pred, bad_img, w, p))


# ----------------------------------------------------------------------------------------- torch.compile
def test_batch_strided_views(backend, seed):
    """The official decoder's slices x[:, 1:] and pred[:, 1:] are read in place (batch stride), not copied."""
    B, L, D, p, C = 2, 50, 24, 4, 3
    m = mae.random_masking(B, L, 0.75, generator=seeded(seed))
    K = m.ids_keep.shape[1]
    full = torch.randn(B, 1 + K, D, requires_grad=True)
    mt = torch.randn(D)
    out = mae.unshuffle(full[:, 1:], m.ids_restore, mt)
    ref = R.unshuffle_official(full[:, 1:].detach(), m.ids_restore, mt)
    exact(out, ref, "unshuffle of a slice")
    out.sum().backward()
    assert torch.equal(full.grad[:, 0], torch.zeros(B, D)) and torch.equal(full.grad[:, 1:], torch.ones(B, K, D))
    imgs = make_images(B, C, L, p)
    predf = torch.randn(B, 1 + L, p * p * C, requires_grad=True)
    b = leaf(predf, torch.float64)
    loss = mae.masked_mse_loss(predf[:, 1:], imgs, m.mask, p)
    ref = R.forward_loss_official(imgs.double(), b[:, 1:], m.mask.double(), p)
    assert_close(loss, ref, 1e-5, "loss of a slice")
    loss.backward()
    ref.backward()
    assert_close(predf.grad, b.grad, 1e-5, "d pred of a slice")
    x = torch.randn(B, L + 3, D)
    exact(mae.gather_tokens(x[:, 3:], m.ids_keep), gather(x[:, 3:], m.ids_keep), "gather_tokens of a slice")


def test_fp16(backend, seed):
    B, L, D, p, C = 2, 49, 24, 4, 3
    dt = torch.float16
    m = mae.random_masking(B, L, 0.75, generator=seeded(seed))
    K = m.ids_keep.shape[1]
    x = torch.randn(B, K, D).to(dt)
    mt = torch.randn(D).to(dt)
    a, b, mta, mtb = leaf(x), leaf(x, torch.float64), leaf(mt), leaf(mt, torch.float64)
    out = mae.unshuffle(mae.gather_tokens(mae.unshuffle(a, m.ids_restore, mta), m.ids_keep), m.ids_restore, mta)
    ref = R.unshuffle_official(gather(R.unshuffle_official(b, m.ids_restore, mtb), m.ids_keep), m.ids_restore, mtb)
    exact(out, ref.to(dt), "fp16 unshuffle/gather")
    g = torch.randn(B, L, D).to(dt)
    out.backward(g)
    ref.backward(g.double())
    exact(a.grad, b.grad.to(dt), "fp16 d x")
    assert_close(mta.grad, mtb.grad, 1e-2, "fp16 d mask_token")
    imgs = make_images(B, C, L, p, dt)
    pred = torch.randn(B, L, p * p * C).to(dt)
    pa, pb = leaf(pred), leaf(pred, torch.float64)
    loss = mae.masked_mse_loss(pa, imgs, m.mask, p)
    ref = R.forward_loss_official(imgs.double(), pb, m.mask.double(), p)
    assert_close(loss, ref, 1e-2, "fp16 loss")
    loss.backward()
    ref.backward()
    assert_close(pa.grad, pb.grad, 1e-2, "fp16 d pred")


def test_torch_compile_fullgraph(backend, seed):
    B, L, D, p, C = 2, 49, 16, 4, 3
    imgs = make_images(B, C, L, p)
    m = mae.random_masking(B, L, 0.75, generator=seeded(seed))
    K = m.ids_keep.shape[1]
    x = torch.randn(B, L, D, requires_grad=True)
    mt = torch.randn(1, 1, D, requires_grad=True)
    w = torch.randn(D, p * p * C, requires_grad=True)

    def step(x, mt, w, imgs, ids_keep, ids_restore, mask):
        v = mae.gather_tokens(x, ids_keep)
        full = mae.unshuffle(v, ids_restore, mt)
        pred = full @ w
        return mae.masked_mse_loss(pred, imgs, mask, p) + mae.gather_patches(imgs, ids_keep, p).sum() * 0

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(x, mt, w, imgs, *m)
    loss.backward()
    grads = [t.grad.clone() for t in (x, mt, w)]
    for t in (x, mt, w):
        t.grad = None
    ref = step(x, mt, w, imgs, *m)
    ref.backward()
    assert_close(loss, ref, 1e-6, "compiled loss")
    for got, t in zip(grads, (x, mt, w)):
        assert_close(got, t.grad, 1e-6, "compiled grad")
    assert K == m.ids_keep.shape[1]
