"""MAE patch and token ops (`sslfast.mae`) and the mask-first encoder front against the official MAE code.

Every op runs through both CPU paths (`backend` fixture: PyTorch path and the Triton kernels under the
interpreter) and is compared, forward and gradients, with a float64 run of the official code given the same
permutation. Shapes: L in {49, 50 (5x10 grid, non-square images), 196}, p in {4, 16} and a few non-powers of
two (6, 14: padded patch tiles), C in {1, 3}.
"""

import pytest
import torch

from sslfast import mae
from sslfast.models.mae import MaskedPatchEmbed, sincos_pos_embed_2d
from sslfast.ops._torch import mae as pt
from sslfast.reference import mae as R

from helpers import assert_close, leaf, tol
from mae_helpers import DTYPES, GRIDS, SHAPES, exact, gather, make_images, seeded


# ----------------------------------------------------------------------------------------- patches


@pytest.mark.parametrize("L,p,C", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_patchify_and_gather_patches(backend, seed, L, p, C, dtype):
    B = 2
    imgs = make_images(B, C, L, p, dtype)
    ref = R.patchify_official(imgs, p)
    exact(mae.patchify(imgs, p), ref, "patchify")
    m = mae.random_masking(B, L, 0.75, generator=seeded(seed))
    exact(mae.gather_patches(imgs, m.ids_keep, p), gather(ref, m.ids_keep), "gather_patches")


def test_gather_patches_gradient(backend, seed):
    B, C, L, p = 2, 3, 50, 4
    imgs = make_images(B, C, L, p)
    m = mae.random_masking(B, L, 0.6, generator=seeded(seed))
    a, b = leaf(imgs), leaf(imgs.double())
    g = torch.randn(B, m.ids_keep.shape[1], p * p * C)
    mae.gather_patches(a, m.ids_keep, p).backward(g)
    gather(R.patchify_official(b, p), m.ids_keep).backward(g.double())
    assert_close(a.grad, b.grad, 1e-6, "d imgs (gather_patches)")
    a2 = leaf(imgs)
    mae.patchify(a2, p).backward(R.patchify_official(torch.ones_like(imgs), p))
    assert torch.equal(a2.grad, torch.ones_like(imgs))


# ----------------------------------------------------------------------------------------- tokens
@pytest.mark.parametrize("L", [49, 50, 196])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gather_tokens(backend, seed, L, dtype):
    B, D = 2, 40
    m = mae.random_masking(B, L, 0.75, generator=seeded(seed))
    x = torch.randn(B, L, D).to(dtype)
    a, b = leaf(x), leaf(x, torch.float64)
    out = mae.gather_tokens(a, m.ids_keep)
    exact(out, gather(x, m.ids_keep), "gather_tokens")
    g = torch.randn(out.shape).to(dtype)
    out.backward(g)
    gather(b, m.ids_keep).backward(g.double())
    exact(a.grad, b.grad.to(dtype), "d x")


def test_gather_tokens_repeated_ids(backend):
    """Repeated indices (not produced by random_masking, but legal for a gather) sum in the backward."""
    x = torch.randn(2, 20, 24)
    ids = torch.tensor([[3, 3, 7, 19, 3], [0, 1, 0, 5, 6]])
    a, b = leaf(x), leaf(x, torch.float64)
    g = torch.randn(2, 5, 24)
    mae.gather_tokens(a, ids).backward(g)
    gather(b, ids).backward(g.double())
    assert_close(a.grad, b.grad, 1e-6, "d x with repeats")


@pytest.mark.parametrize("L", [49, 50, 196])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_pos", [True, False])
def test_unshuffle(backend, seed, L, dtype, with_pos):
    B, D = 2, 40
    m = mae.random_masking(B, L, 0.75, generator=seeded(seed))
    K = m.ids_keep.shape[1]
    x, mt, pos = torch.randn(B, K, D).to(dtype), torch.randn(1, 1, D).to(dtype), torch.randn(1, L, D).to(dtype)
    xa, mta, posa = leaf(x), leaf(mt), leaf(pos)
    xb, mtb, posb = leaf(x, torch.float64), leaf(mt, torch.float64), leaf(pos, torch.float64)
    out = mae.unshuffle(xa, m.ids_restore, mta, posa if with_pos else None)
    ref = R.unshuffle_official(xb, m.ids_restore, mtb, posb if with_pos else None)
    assert out.dtype == dtype and out.shape == (B, L, D)
    if with_pos:
        assert_close(out, ref, tol(dtype), "unshuffle")
    else:
        exact(out, ref.to(dtype), "unshuffle")
    g = torch.randn(B, L, D).to(dtype)
    out.backward(g)
    ref.backward(g.double())
    exact(xa.grad, xb.grad.to(dtype), "d x_visible")
    assert_close(mta.grad, mtb.grad, tol(dtype), "d mask_token")
    assert mta.grad.shape == mt.shape
    if with_pos:
        assert_close(posa.grad, posb.grad, tol(dtype), "d pos_embed")


def test_unshuffle_dtype_promotion_and_shapes(backend, seed):
    """bf16 tokens with fp32 parameters (autocast): the output promotes like the official cat + add."""
    B, L, D = 2, 49, 24
    m = mae.random_masking(B, L, 0.75, generator=seeded(seed))
    x = torch.randn(B, m.ids_keep.shape[1], D, dtype=torch.bfloat16)
    mt, pos = torch.randn(D), torch.randn(L, D)
    xa, mta, posa = leaf(x), leaf(mt), leaf(pos)
    out = mae.unshuffle(xa, m.ids_restore, mta, posa)
    ref = R.unshuffle_official(x, m.ids_restore, mt, pos)
    assert out.dtype == ref.dtype == torch.float32
    exact(out, ref, "promoted unshuffle")
    out.sum().backward()
    assert xa.grad.dtype == torch.bfloat16 and mta.grad.dtype == torch.float32 and mta.grad.shape == (D,)
    assert_close(mta.grad, torch.full((D,), float(B * (L - x.shape[1]))), 1e-6, "d mask_token")
    assert_close(posa.grad, torch.full((L, D), float(B)), 1e-6, "d pos")


# ----------------------------------------------------------------------------------------- encoder front
@pytest.mark.parametrize("L,p,C", [(49, 4, 3), (50, 4, 1), (196, 16, 3)])
@pytest.mark.parametrize("cls", [False, True])
def test_mask_first_front_equals_embed_all_then_mask(backend, seed, L, p, C, cls):
    gh, gw = GRIDS[L]
    D, B = 32, 2
    front = MaskedPatchEmbed((gh * p, gw * p), p, C, D, pos_embed="learned", cls_token=cls)
    with torch.no_grad():
        front.proj.bias.normal_()
    ref = MaskedPatchEmbed((gh * p, gw * p), p, C, D, pos_embed="learned", cls_token=cls).double()
    ref.load_state_dict(front.state_dict())
    imgs = make_images(B, C, L, p)
    m = mae.random_masking(B, L, 0.75, generator=seeded(seed))
    out, m_out = front(imgs, masking=m)
    assert m_out is m
    s = torch.randint(0, 1 << 62, (1,), generator=seeded(seed), dtype=torch.int64)
    noise = pt.masking_noise(s, B, L, 1, L, "cpu").double()
    expect, mask, ids_restore = R.embed_all_then_mask_official(imgs.double(), ref.proj, ref.pos_embed, 0.75, noise)
    if cls:
        expect = torch.cat([ref.cls_token.expand(B, -1, -1), expect], 1)
    exact(mask, m.mask)
    assert_close(out, expect, 1e-5, "front")
    g = torch.randn(out.shape)
    out.backward(g)
    expect.backward(g.double())
    for name, prm in front.named_parameters():
        assert_close(prm.grad, dict(ref.named_parameters())[name].grad, 1e-5, f"d {name}")
    # drawing the mask inside the module: same generator state, same result
    out2, m2 = front(imgs, generator=seeded(seed))
    exact(m2.ids_keep, m.ids_keep)
    assert_close(out2, out, 1e-6, "front with its own masking")
    # under autocast: the official dtype (bf16 conv + fp32 pos -> fp32 tokens) and values
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out3, _ = front(imgs, masking=m)
        x = front.embed_all(imgs)
        expect3 = gather(x, m.ids_keep)
        if cls:
            expect3 = torch.cat([front.cls_token.expand(B, -1, -1), expect3], 1)
    assert out3.dtype == expect3.dtype == torch.float32
    assert_close(out3, expect3, 1e-2, "front under autocast")


def test_front_sincos_pos_embed_is_official():
    import numpy as np

    def one_d(d, pos):  # the official get_1d_sincos_pos_embed_from_grid
        omega = np.arange(d // 2, dtype=np.float64) / (d / 2.0)
        omega = 1.0 / 10000**omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    gs, d = 7, 32
    grid = np.stack(np.meshgrid(np.arange(gs, dtype=np.float32), np.arange(gs, dtype=np.float32)), 0)
    expect = np.concatenate([one_d(d // 2, grid[0]), one_d(d // 2, grid[1])], axis=1)
    assert_close(sincos_pos_embed_2d(d, gs, gs), torch.from_numpy(expect), 1e-6, "sincos")
    front = MaskedPatchEmbed(28, 4, 3, d)
    assert not front.pos_embed.requires_grad
    assert_close(front.pos_embed[0], torch.from_numpy(expect), 1e-6, "front pos_embed")
