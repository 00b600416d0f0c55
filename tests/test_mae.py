"""MAE ops (`sslfast.mae`) and the mask-first encoder front against the official MAE code.

Every op runs through both CPU paths (`backend` fixture: PyTorch reference and the Triton kernels under the
interpreter) and is compared, forward and gradients, with a float64 run of the official code given the same
permutation. Shapes: L in {49, 50 (5x10 grid, non-square images), 196}, p in {4, 16} and a few non-powers of
two (6, 14: padded patch tiles), C in {1, 3}.
"""
import os

import pytest
import torch

import sslfast as sf
from sslfast import mae
from sslfast.ops import mae as mae_ops
from sslfast.models.mae import MaskedPatchEmbed, sincos_pos_embed_2d
from sslfast.reference import mae as R

from aot_compile import check_compiles
from helpers import assert_close, leaf, tol

GRIDS = {49: (7, 7), 50: (5, 10), 196: (14, 14)}
DTYPES = [torch.float32, torch.bfloat16]


def _exact(out, ref, what=""):
    assert out.dtype == ref.dtype, f"{what}: dtype {out.dtype} != {ref.dtype}"
    assert torch.isfinite(out).all(), f"{what}: non-finite values (unwritten output?)"
    assert torch.equal(out, ref), f"{what}: max abs diff {(out.double() - ref.double()).abs().max().item():.3g}"


def _images(B, C, L, p, dtype=torch.float32):
    gh, gw = GRIDS[L]
    return (torch.randn(B, C, gh * p, gw * p) * 2 + 0.5).to(dtype)


def _seeded(seed):
    return torch.Generator().manual_seed(seed)


def _gather(x, ids):
    return torch.gather(x, 1, ids[:, :, None].expand(-1, -1, x.shape[2]))


# ----------------------------------------------------------------------------------------- random masking
@pytest.mark.parametrize("L", [49, 50, 196])
@pytest.mark.parametrize("ratio", [0.75, 0.4])
def test_random_masking_is_official_masking(backend, seed, L, ratio):
    B, D = 3, 8
    m = mae.random_masking(B, L, ratio, generator=_seeded(seed))
    keep = int(L * (1 - ratio))
    assert m.ids_keep.shape == (B, keep) and m.ids_keep.dtype == torch.int64
    assert m.ids_restore.shape == (B, L) and m.ids_restore.dtype == torch.int64
    assert m.mask.shape == (B, L) and m.mask.dtype == torch.float32
    # the official code, fed the same noise: identical mask, ids_restore and visible tokens
    s = torch.randint(0, 1 << 62, (1,), generator=_seeded(seed), dtype=torch.int64)
    noise = R.masking_noise(s, B, L, 1, L, "cpu").double()
    x = torch.randn(B, L, D)
    x_masked, mask, ids_restore = R.random_masking_official(x, ratio, noise)
    _exact(m.mask, mask, "mask")
    _exact(m.ids_restore, ids_restore, "ids_restore")
    _exact(mae.gather_tokens(x, m.ids_keep), x_masked, "x_masked")


def test_random_masking_backends_agree(monkeypatch, seed):
    """One seed, one permutation: the Triton kernel and the PyTorch path return identical MaskInfo."""
    outs = []
    for be in ("reference", "triton"):
        if be == "triton" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            pytest.skip("needs the Triton interpreter")
        monkeypatch.setenv("SSLFAST_BACKEND", be)
        outs.append(mae.random_masking(5, 196, 0.75, generator=_seeded(seed)))
        outs.append(mae.random_masking(5, 196, 0.5, generator=_seeded(seed), block_size=2))
    for a, b in zip(outs[:2], outs[2:]):
        for t_a, t_b in zip(a, b):
            _exact(t_a, t_b)


def test_random_masking_statistics(backend, seed):
    # The interpreter sorts slowly (~50 ms a sample); the kernel's permutations are bit-identical to the
    # PyTorch path's (test_random_masking_backends_agree), so it gets fewer draws and the looser bound.
    B, L, ratio = (1200 if backend == "reference" else 64), 49, 0.75
    m = mae.random_masking(B, L, ratio, generator=_seeded(seed))
    keep = int(L * (1 - ratio))
    ar = torch.arange(L)
    assert torch.equal(m.ids_restore.sort(1).values, ar.expand(B, L)), "ids_restore rows must be permutations"
    assert torch.equal(m.mask.sum(1), torch.full((B,), float(L - keep)))
    shuffle = m.ids_restore.argsort(1)
    assert torch.equal(shuffle[:, :keep], m.ids_keep), "ids_keep must be the first K of the shuffle"
    assert torch.equal(m.mask.gather(1, m.ids_keep), torch.zeros(B, keep))
    freq = m.mask.mean(0)
    p = (L - keep) / L
    bound = 5 * (p * (1 - p) / B) ** 0.5
    assert (freq - p).abs().max() < bound, f"per-position masking frequency off: {freq}"
    # every slot of ids_keep is uniform over the positions (mean (L-1)/2, sd sqrt((L²-1)/12/B))
    slot_mean = m.ids_keep.float().mean(0)
    assert (slot_mean - (L - 1) / 2).abs().max() < 5 * ((L * L - 1) / 12 / B) ** 0.5


def test_random_masking_seeding(backend, seed):
    a = mae.random_masking(4, 50, 0.75, generator=_seeded(seed))
    b = mae.random_masking(4, 50, 0.75, generator=_seeded(seed))
    for t_a, t_b in zip(a, b):
        _exact(t_a, t_b)
    g = _seeded(seed)
    c, d = mae.random_masking(4, 50, 0.75, generator=g), mae.random_masking(4, 50, 0.75, generator=g)
    assert not torch.equal(c.ids_keep, d.ids_keep), "the generator must advance between calls"
    assert not torch.equal(c.mask[0], c.mask[1]), "samples of one batch must differ"
    torch.manual_seed(seed)
    e = mae.random_masking(4, 50, 0.75)
    torch.manual_seed(seed)
    _exact(mae.random_masking(4, 50, 0.75).mask, e.mask, "default generator")


@pytest.mark.parametrize("grid,block,ratio", [((14, 14), 2, 0.6), ((4, 8), 4, 0.5), ((6, 6), 3, 0.75)])
def test_block_masking(backend, seed, grid, block, ratio):
    h, w = grid
    L, B = h * w, 4
    m = mae.random_masking(B, L, ratio, generator=_seeded(seed), block_size=block, grid_size=grid)
    cells = L // block ** 2
    keep = int(cells * (1 - ratio)) * block ** 2
    assert m.ids_keep.shape == (B, keep)
    assert torch.equal(m.mask.sum(1), torch.full((B,), float(L - keep)))
    cellmask = m.mask.reshape(B, h // block, block, w // block, block)
    assert torch.equal(cellmask.amax((2, 4)), cellmask.amin((2, 4))), "cells must be masked whole"
    assert torch.equal(m.ids_restore.sort(1).values, torch.arange(L).expand(B, L))
    assert torch.equal(m.mask.gather(1, m.ids_keep), torch.zeros(B, keep))


# ----------------------------------------------------------------------------------------- patches
SHAPES = [(L, p, C) for L in (49, 50, 196) for p in (4, 16) for C in (1, 3)] + [(49, 6, 3), (50, 6, 1), (49, 14, 3)]


@pytest.mark.parametrize("L,p,C", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_patchify_and_gather_patches(backend, seed, L, p, C, dtype):
    B = 2
    imgs = _images(B, C, L, p, dtype)
    ref = R.patchify_official(imgs, p)
    _exact(mae.patchify(imgs, p), ref, "patchify")
    m = mae.random_masking(B, L, 0.75, generator=_seeded(seed))
    _exact(mae.gather_patches(imgs, m.ids_keep, p), _gather(ref, m.ids_keep), "gather_patches")


def test_gather_patches_gradient(backend, seed):
    B, C, L, p = 2, 3, 50, 4
    imgs = _images(B, C, L, p)
    m = mae.random_masking(B, L, 0.6, generator=_seeded(seed))
    a, b = leaf(imgs), leaf(imgs.double())
    g = torch.randn(B, m.ids_keep.shape[1], p * p * C)
    mae.gather_patches(a, m.ids_keep, p).backward(g)
    _gather(R.patchify_official(b, p), m.ids_keep).backward(g.double())
    assert_close(a.grad, b.grad, 1e-6, "d imgs (gather_patches)")
    a2 = leaf(imgs)
    mae.patchify(a2, p).backward(R.patchify_official(torch.ones_like(imgs), p))
    assert torch.equal(a2.grad, torch.ones_like(imgs))


# ----------------------------------------------------------------------------------------- tokens
@pytest.mark.parametrize("L", [49, 50, 196])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gather_tokens(backend, seed, L, dtype):
    B, D = 2, 40
    m = mae.random_masking(B, L, 0.75, generator=_seeded(seed))
    x = torch.randn(B, L, D).to(dtype)
    a, b = leaf(x), leaf(x, torch.float64)
    out = mae.gather_tokens(a, m.ids_keep)
    _exact(out, _gather(x, m.ids_keep), "gather_tokens")
    g = torch.randn(out.shape).to(dtype)
    out.backward(g)
    _gather(b, m.ids_keep).backward(g.double())
    _exact(a.grad, b.grad.to(dtype), "d x")


def test_gather_tokens_repeated_ids(backend):
    """Repeated indices (not produced by random_masking, but legal for a gather) sum in the backward."""
    x = torch.randn(2, 20, 24)
    ids = torch.tensor([[3, 3, 7, 19, 3], [0, 1, 0, 5, 6]])
    a, b = leaf(x), leaf(x, torch.float64)
    g = torch.randn(2, 5, 24)
    mae.gather_tokens(a, ids).backward(g)
    _gather(b, ids).backward(g.double())
    assert_close(a.grad, b.grad, 1e-6, "d x with repeats")


@pytest.mark.parametrize("L", [49, 50, 196])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_pos", [True, False])
def test_unshuffle(backend, seed, L, dtype, with_pos):
    B, D = 2, 40
    m = mae.random_masking(B, L, 0.75, generator=_seeded(seed))
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
        _exact(out, ref.to(dtype), "unshuffle")
    g = torch.randn(B, L, D).to(dtype)
    out.backward(g)
    ref.backward(g.double())
    _exact(xa.grad, xb.grad.to(dtype), "d x_visible")
    assert_close(mta.grad, mtb.grad, tol(dtype), "d mask_token")
    assert mta.grad.shape == mt.shape
    if with_pos:
        assert_close(posa.grad, posb.grad, tol(dtype), "d pos_embed")


def test_unshuffle_dtype_promotion_and_shapes(backend, seed):
    """bf16 tokens with fp32 parameters (autocast): the output promotes like the official cat + add."""
    B, L, D = 2, 49, 24
    m = mae.random_masking(B, L, 0.75, generator=_seeded(seed))
    x = torch.randn(B, m.ids_keep.shape[1], D, dtype=torch.bfloat16)
    mt, pos = torch.randn(D), torch.randn(L, D)
    xa, mta, posa = leaf(x), leaf(mt), leaf(pos)
    out = mae.unshuffle(xa, m.ids_restore, mta, posa)
    ref = R.unshuffle_official(x, m.ids_restore, mt, pos)
    assert out.dtype == ref.dtype == torch.float32
    _exact(out, ref, "promoted unshuffle")
    out.sum().backward()
    assert xa.grad.dtype == torch.bfloat16 and mta.grad.dtype == torch.float32 and mta.grad.shape == (D,)
    assert_close(mta.grad, torch.full((D,), float(B * (L - x.shape[1]))), 1e-6, "d mask_token")
    assert_close(posa.grad, torch.full((L, D), float(B)), 1e-6, "d pos")


# ----------------------------------------------------------------------------------------- loss
@pytest.mark.parametrize("L,p,C", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_mse_loss(backend, seed, L, p, C, dtype):
    B = 2
    imgs = _images(B, C, L, p, dtype)
    m = mae.random_masking(B, L, 0.75, generator=_seeded(seed))
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
        (mae_ops._masked_mse_op.custom_op(c, imgs, m.mask, p, norm)[0] * 3).backward()
        assert_close(c.grad, b.grad, tol(dtype), f"separate backward, d pred norm_pix={norm}")


def test_masked_mse_loss_weights_mixed_dtypes_and_nonfinite(backend, seed):
    B, C, L, p = 2, 3, 50, 4
    imgs = _images(B, C, L, p)                                      # fp32 images, bf16 predictions (AMP)
    pred = torch.randn(B, L, p * p * C, dtype=torch.bfloat16)
    w = torch.rand(B, L) * (torch.rand(B, L) < 0.7)                  # a weighted mask with zeros
    a, b = leaf(pred), leaf(pred, torch.float64)
    loss = mae.masked_mse_loss(a, imgs, w, p)
    ref = R.forward_loss_official(imgs.double(), b, w.double(), p)
    assert_close(loss, ref, 1e-2, "weighted loss")
    loss.backward()
    ref.backward()
    assert_close(a.grad, b.grad, 1e-2, "weighted d pred")
    boolmask = w > 0
    assert_close(mae.masked_mse_loss(pred, imgs, boolmask, p),
                 R.forward_loss_official(imgs.double(), pred.double(), boolmask.double(), p), 1e-2, "bool mask")
    # a NaN in a visible (unweighted) row still poisons the loss, as in the official code
    bad = pred.clone()
    bad[0, int(torch.nonzero(w[0] == 0)[0])] = float("nan")
    assert torch.isnan(mae.masked_mse_loss(bad, imgs, w, p))
    bad_img = imgs.clone()
    bad_img[1, 0, 0, 0] = float("inf")
    assert not torch.isfinite(mae.masked_mse_loss(pred, bad_img, w, p))


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
    imgs = _images(B, C, L, p)
    m = mae.random_masking(B, L, 0.75, generator=_seeded(seed))
    out, m_out = front(imgs, masking=m)
    assert m_out is m
    s = torch.randint(0, 1 << 62, (1,), generator=_seeded(seed), dtype=torch.int64)
    noise = R.masking_noise(s, B, L, 1, L, "cpu").double()
    expect, mask, ids_restore = R.embed_all_then_mask_official(imgs.double(), ref.proj, ref.pos_embed, 0.75, noise)
    if cls:
        expect = torch.cat([ref.cls_token.expand(B, -1, -1), expect], 1)
    _exact(mask, m.mask)
    assert_close(out, expect, 1e-5, "front")
    g = torch.randn(out.shape)
    out.backward(g)
    expect.backward(g.double())
    for name, prm in front.named_parameters():
        assert_close(prm.grad, dict(ref.named_parameters())[name].grad, 1e-5, f"d {name}")
    # drawing the mask inside the module: same generator state, same result
    out2, m2 = front(imgs, generator=_seeded(seed))
    _exact(m2.ids_keep, m.ids_keep)
    assert_close(out2, out, 1e-6, "front with its own masking")
    # under autocast: the official dtype (bf16 conv + fp32 pos -> fp32 tokens) and values
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out3, _ = front(imgs, masking=m)
        x = front.embed_all(imgs)
        expect3 = _gather(x, m.ids_keep)
        if cls:
            expect3 = torch.cat([front.cls_token.expand(B, -1, -1), expect3], 1)
    assert out3.dtype == expect3.dtype == torch.float32
    assert_close(out3, expect3, 1e-2, "front under autocast")


def test_front_sincos_pos_embed_is_official():
    import numpy as np

    def one_d(d, pos):  # the official get_1d_sincos_pos_embed_from_grid
        omega = np.arange(d // 2, dtype=np.float64) / (d / 2.0)
        omega = 1.0 / 10000 ** omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    gs, d = 7, 32
    grid = np.stack(np.meshgrid(np.arange(gs, dtype=np.float32), np.arange(gs, dtype=np.float32)), 0)
    expect = np.concatenate([one_d(d // 2, grid[0]), one_d(d // 2, grid[1])], axis=1)
    assert_close(sincos_pos_embed_2d(d, gs, gs), torch.from_numpy(expect), 1e-6, "sincos")
    front = MaskedPatchEmbed(28, 4, 3, d)
    assert not front.pos_embed.requires_grad
    assert_close(front.pos_embed[0], torch.from_numpy(expect), 1e-6, "front pos_embed")


# ----------------------------------------------------------------------------------------- BERT masking
def test_bert_masking(backend, seed):
    V, N = 1000, 20000
    ids = torch.randint(5, V, (4, N // 4))
    special = torch.zeros_like(ids, dtype=torch.bool)
    special[:, 0] = True
    out, labels = mae.bert_masking(ids, 3, V, special_tokens_mask=special, generator=_seeded(seed))
    sel = labels != -100
    assert torch.equal(labels[sel], ids[sel]) and not sel[:, 0].any()
    assert torch.equal(out[~sel], ids[~sel])
    frac = sel.float().mean().item()
    assert abs(frac - 0.15) < 0.02
    n = sel.sum().item()
    replaced = (out[sel] == 3).float().sum().item() / n
    same = (out[sel] == ids[sel]).float().sum().item() / n
    assert abs(replaced - 0.8) < 0.04 and abs(same - 0.1) < 0.03, (replaced, same)
    o2, l2 = mae.bert_masking(ids, 3, V, special_tokens_mask=special, generator=_seeded(seed))
    assert torch.equal(o2, out) and torch.equal(l2, labels)
    s = torch.randint(0, 1 << 62, (1,), generator=_seeded(seed), dtype=torch.int64)
    ro, rl = R.bert_masking(s, ids, special.to(torch.int8), 3, V, 0.15, 0.8, 0.5, -100)
    assert torch.equal(ro, out) and torch.equal(rl, labels)


# ----------------------------------------------------------------------------------------- torch.compile
def test_batch_strided_views(backend, seed):
    """The official decoder's slices x[:, 1:] and pred[:, 1:] are read in place (batch stride), not copied."""
    B, L, D, p, C = 2, 50, 24, 4, 3
    m = mae.random_masking(B, L, 0.75, generator=_seeded(seed))
    K = m.ids_keep.shape[1]
    full = torch.randn(B, 1 + K, D, requires_grad=True)
    mt = torch.randn(D)
    out = mae.unshuffle(full[:, 1:], m.ids_restore, mt)
    ref = R.unshuffle_official(full[:, 1:].detach(), m.ids_restore, mt)
    _exact(out, ref, "unshuffle of a slice")
    out.sum().backward()
    assert torch.equal(full.grad[:, 0], torch.zeros(B, D)) and torch.equal(full.grad[:, 1:], torch.ones(B, K, D))
    imgs = _images(B, C, L, p)
    predf = torch.randn(B, 1 + L, p * p * C, requires_grad=True)
    b = leaf(predf, torch.float64)
    loss = mae.masked_mse_loss(predf[:, 1:], imgs, m.mask, p)
    ref = R.forward_loss_official(imgs.double(), b[:, 1:], m.mask.double(), p)
    assert_close(loss, ref, 1e-5, "loss of a slice")
    loss.backward()
    ref.backward()
    assert_close(predf.grad, b.grad, 1e-5, "d pred of a slice")
    x = torch.randn(B, L + 3, D)
    _exact(mae.gather_tokens(x[:, 3:], m.ids_keep), _gather(x[:, 3:], m.ids_keep), "gather_tokens of a slice")


def test_random_masking_compiles(backend, seed):
    fn = torch.compile(lambda: mae.random_masking(3, 49, 0.75), fullgraph=True, backend="aot_eager")
    torch.manual_seed(seed)
    got = fn()
    torch.manual_seed(seed)
    expect = mae.random_masking(3, 49, 0.75)
    for a, b in zip(got, expect):
        _exact(a, b)


def test_fp16(backend, seed):
    B, L, D, p, C = 2, 49, 24, 4, 3
    dt = torch.float16
    m = mae.random_masking(B, L, 0.75, generator=_seeded(seed))
    K = m.ids_keep.shape[1]
    x = torch.randn(B, K, D).to(dt)
    mt = torch.randn(D).to(dt)
    a, b, mta, mtb = leaf(x), leaf(x, torch.float64), leaf(mt), leaf(mt, torch.float64)
    out = mae.unshuffle(mae.gather_tokens(mae.unshuffle(a, m.ids_restore, mta), m.ids_keep), m.ids_restore, mta)
    ref = R.unshuffle_official(_gather(R.unshuffle_official(b, m.ids_restore, mtb), m.ids_keep), m.ids_restore, mtb)
    _exact(out, ref.to(dt), "fp16 unshuffle/gather")
    g = torch.randn(B, L, D).to(dt)
    out.backward(g)
    ref.backward(g.double())
    _exact(a.grad, b.grad.to(dt), "fp16 d x")
    assert_close(mta.grad, mtb.grad, 1e-2, "fp16 d mask_token")
    imgs = _images(B, C, L, p, dt)
    pred = torch.randn(B, L, p * p * C).to(dt)
    pa, pb = leaf(pred), leaf(pred, torch.float64)
    loss = mae.masked_mse_loss(pa, imgs, m.mask, p)
    ref = R.forward_loss_official(imgs.double(), pb, m.mask.double(), p)
    assert_close(loss, ref, 1e-2, "fp16 loss")
    loss.backward()
    ref.backward()
    assert_close(pa.grad, pb.grad, 1e-2, "fp16 d pred")


def test_kernel_host_seed_path(backend, seed):
    """A CPU generator with CUDA outputs passes the seed by value (SEED_IN_MEMORY=False): same permutation."""
    if backend != "triton":
        pytest.skip("kernel launcher detail")
    from sslfast.kernels import mae as K

    s = torch.randint(0, 1 << 62, (1,), generator=_seeded(seed), dtype=torch.int64)
    B, L, keep = 3, 50, 12
    expect = R.random_masking(s, B, L, keep, 1, L, "cpu")
    outs = [torch.full((B, keep), -1), torch.full((B, L), -1), torch.full((B, L), float("nan"))]
    K._random_masking_kernel[(B,)](outs[0], int(s), *outs, L, keep, L, 1, L, L, SEED_IN_MEMORY=False,
                                   BLOCK_L=64, num_warps=1)
    for a, b in zip(outs, expect):
        _exact(a, b)


def test_torch_compile_fullgraph(backend, seed):
    B, L, D, p, C = 2, 49, 16, 4, 3
    imgs = _images(B, C, L, p)
    m = mae.random_masking(B, L, 0.75, generator=_seeded(seed))
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


# ----------------------------------------------------------------------------------------- bad input
def test_bad_inputs(backend):
    imgs = torch.randn(2, 3, 16, 16)
    m = mae.random_masking(2, 16, 0.5)
    with pytest.raises(ValueError, match="mask_ratio"):
        mae.random_masking(2, 16, 0.0)
    with pytest.raises(ValueError, match="mask_ratio"):
        mae.random_masking(2, 16, 1.0)
    with pytest.raises(ValueError, match="mask_ratio"):
        mae.random_masking(2, 16, -0.2)
    with pytest.raises(ValueError, match="mask_ratio"):
        mae.random_masking(2, 16, 0.99)  # keeps no patch
    with pytest.raises(TypeError, match="mask_ratio"):
        mae.random_masking(2, 16, "0.5")
    with pytest.raises(ValueError, match="batch_size"):
        mae.random_masking(0, 16, 0.5)
    with pytest.raises(TypeError, match="num_patches"):
        mae.random_masking(2, 16.0, 0.5)
    with pytest.raises(TypeError, match="generator"):
        mae.random_masking(2, 16, 0.5, generator=3)
    with pytest.raises(ValueError, match="grid_size"):
        mae.random_masking(2, 50, 0.5, block_size=2)
    with pytest.raises(ValueError, match="block_size"):
        mae.random_masking(2, 36, 0.5, block_size=4)
    with pytest.raises(ValueError, match="grid_size"):
        mae.random_masking(2, 32, 0.5, block_size=2, grid_size=(4, 4))
    # images and patch size
    with pytest.raises(ValueError, match="patch_size"):
        mae.patchify(torch.randn(2, 3, 16, 18), 4)
    with pytest.raises(ValueError, match="patch_size"):
        mae.gather_patches(torch.randn(2, 3, 18, 16), m.ids_keep, 4)
    with pytest.raises(ValueError, match="imgs"):
        mae.patchify(torch.randn(3, 16, 16), 4)
    with pytest.raises(TypeError, match="imgs"):
        mae.patchify(torch.randint(0, 9, (2, 3, 16, 16)), 4)
    with pytest.raises(ValueError, match="patch_size"):
        mae.patchify(imgs, 0)
    # ids out of range / wrong shape / dtype
    with pytest.raises(ValueError, match="ids_keep"):
        mae.gather_patches(imgs, m.ids_keep + 16, 4)
    with pytest.raises(ValueError, match="ids_keep"):
        mae.gather_patches(imgs, -m.ids_keep - 1, 4)
    with pytest.raises(ValueError, match="ids_keep"):
        mae.gather_patches(imgs, m.ids_keep[:1], 4)
    with pytest.raises(TypeError, match="ids_keep"):
        mae.gather_patches(imgs, m.ids_keep.float(), 4)
    x = torch.randn(2, 16, 8)
    with pytest.raises(ValueError, match="ids_keep"):
        mae.gather_tokens(x, m.ids_keep * 3)
    with pytest.raises(ValueError, match="x"):
        mae.gather_tokens(x[0], m.ids_keep)
    xv = torch.randn(2, m.ids_keep.shape[1], 8)
    mt = torch.zeros(1, 1, 8)
    with pytest.raises(ValueError, match="ids_restore"):
        mae.unshuffle(xv, m.ids_restore + 1, mt)
    with pytest.raises(ValueError, match="ids_restore"):
        mae.unshuffle(xv, m.ids_restore[:, :4], mt)
    with pytest.raises(ValueError, match="ids_restore"):
        mae.unshuffle(xv, m.ids_restore[0], mt)
    with pytest.raises(ValueError, match="mask_token"):
        mae.unshuffle(xv, m.ids_restore, torch.zeros(1, 1, 7))
    with pytest.raises(ValueError, match="pos_embed"):
        mae.unshuffle(xv, m.ids_restore, mt, torch.zeros(1, 15, 8))
    with pytest.raises(ValueError, match="x_visible"):
        mae.unshuffle(xv[:1], m.ids_restore, mt)
    with pytest.raises(TypeError, match="mask_token"):
        mae.unshuffle(xv, m.ids_restore, torch.zeros(1, 1, 8, dtype=torch.int64))
    # loss shapes
    pred = torch.randn(2, 16, 48)
    with pytest.raises(ValueError, match="pred"):
        mae.masked_mse_loss(pred[:, :, :47], imgs, m.mask, 4)
    with pytest.raises(ValueError, match="pred"):
        mae.masked_mse_loss(pred, imgs, m.mask, 2)
    with pytest.raises(ValueError, match="mask"):
        mae.masked_mse_loss(pred, imgs, m.mask[:, :15], 4)
    with pytest.raises(TypeError, match="mask"):
        mae.masked_mse_loss(pred, imgs, m.mask.long(), 4)
    with pytest.raises(ValueError, match="patch_size"):
        mae.masked_mse_loss(pred, torch.randn(2, 3, 16, 15), m.mask, 4)
    with pytest.raises(TypeError, match="norm_pix_loss"):
        mae.masked_mse_loss(pred, imgs, m.mask, 4, norm_pix_loss=1)
    with pytest.raises(ValueError, match="mlm_probability"):
        mae.bert_masking(torch.ones(4, dtype=torch.long), 1, 10, 1.5)


def test_public_exports():
    assert sf.mae.random_masking is mae.random_masking
    assert sf.ops.mae.MaskInfo is mae.MaskInfo
    from sslfast.ops import masked_mse_loss, unshuffle  # noqa: F401


def test_bench_cases_run_on_cpu(backend, monkeypatch):
    """The GPU bench cases, shrunk: every fused/reference callable runs and the floors are positive."""
    from sslfast.bench import mae as bench_mae

    for make in bench_mae.SMALL_CASES:
        st = make(torch.device("cpu"), torch.float32)
        st.fused()
        st.reference()
        for fn in st.others.values():
            fn()
        assert st.bytes > 0


def test_kernels_compile_for_sm90():
    """Every kernel compiles ahead of time to an sm_90 cubin at the launchers' GPU tiles (no GPU needed), without
    register spills; at p=16 the patch kernels read images and predictions as 16-byte vectors."""
    out = check_compiles("""
import sslfast.kernels.mae as K

ALIGNED = ("n_rows", "stride_pb")  # patch kernels: multiples of 16 at B=256, 224 px (the JIT specializes them)

def loads(k, img, p):  # bf16 images, p=16: 16-byte and 2-byte global loads, warp shuffles
    if img == "bf16" and p == 16:
        ptx = k.asm["ptx"]
        print("loads", ptx.count("ld.global.v4.b32"), ptx.count("ld.global.b16"), ptx.count("shfl."))

for mem in (True, False):
    build(K._random_masking_kernel, dict(SEED="*i64", seed_val="i64", IDS_KEEP="*i64", IDS_RESTORE="*i64",
          MASK="*fp32"), dict(SEED_IN_MEMORY=mem, BLOCK_L=256), 2)
for dt in ("bf16", "fp32"):
    for p, C in ((16, 3), (16, 1), (14, 3)):
        cfg = K._patch_cfg(p, C, K.GATHER_LANES_PER_THREAD)
        warps = cfg.pop("num_warps")
        for all_ in (True, False):
            k = build(K._gather_patches_kernel, dict(IMG="*" + dt, IDS="*i64", OUT="*" + dt),
                      dict(P=p, C=C, ALL=all_, **cfg), warps, aligned=ALIGNED)
            loads(k, dt, p)
        cfg = K._patch_cfg(p, C, K.MSE_LANES_PER_THREAD)
        warps = cfg.pop("num_warps")
        for kern, flags in ((K._masked_mse_fwd_kernel, dict(WANT_GRAD=False)),
                            (K._masked_mse_fwd_kernel, dict(WANT_GRAD=True)), (K._masked_mse_bwd_kernel, {})):
            for img in sorted({dt, "fp32"}):  # fp32 images with bf16 predictions: AMP
                k = build(kern, dict(G="*fp32", WSUM="*fp32", PRED="*" + dt, IMG="*" + img, MASK="*fp32",
                          PART="*fp32", DPRED="*" + dt, eps="fp32", stride_pb="i64"),
                          dict(P=p, C=C, NORM=True, **flags, **cfg), warps, aligned=ALIGNED)
                loads(k, img, p)
    for mt in (True, False):
        build(K._gather_rows_kernel, dict(X="*" + dt, IDX="*i64", OUT="*fp32", MT="*" + dt, POS="*fp32",
              stride_xb="i64"), dict(HAS_MT=mt, HAS_POS=mt, BLOCK_R=4, BLOCK_D=256))
    for bo, bs in ((64, 64), (128, 32)):
        build(K._index_sum_kernel, dict(G="*" + dt, IDX="*i64", OUT="*" + dt, REST="*fp32"),
              dict(WANT_REST=bo == 64, IEEE=dt == "fp32", UPCAST=False, BLOCK_O=bo, BLOCK_S=bs, BLOCK_D=64), 8)
build(K._bert_masking_kernel, dict(SEED="*i64", seed_val="i64", IDS="*i64", SPECIAL="*i8", OUT="*i64",
      LABELS="*i64", prob="fp32", replace_prob="fp32", random_prob="fp32"),
      dict(SEED_IN_MEMORY=True, HAS_SPECIAL=True, BLOCK=1024))
""")
    built = [line for line in out.splitlines() if line.startswith('{"kernel"')]
    assert len(built) == 2 + 12 + 27 + 8 + 1, out  # masking, gather_patches, masked_mse, token kernels, bert
    spills = [line for line in built if '"spills": 0,' not in line]
    assert not spills, "register spills:\n" + "\n".join(spills)
    # bf16, p=16: images and predictions are read as 16-byte vectors, never 2 bytes at a time, and the patch
    # gather to MAE order goes through shared memory (as warp shuffles it would take 1024 per lane)
    loads = [[int(n) for n in line.split()[1:]] for line in out.splitlines() if line.startswith("loads ")]
    assert len(loads) == 10 and all(vec > 0 and scalar == 0 and shfl < 100 for vec, scalar, shfl in loads), out


# ----------------------------------------------------------------------------------------- GPU (real kernels)
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_vitb_ops(dtype):
    """ViT-B/16, B=256, 224 px: every op and gradient against the official code on the real kernels."""
    dev = torch.device("cuda")
    B, C, p, L, D = 256, 3, 16, 196, 768
    g = torch.Generator(device=dev).manual_seed(1)
    m = mae.random_masking(B, L, 0.75, device=dev, generator=g)
    s = torch.randint(0, 1 << 62, (1,), dtype=torch.int64, device=dev,
                      generator=torch.Generator(device=dev).manual_seed(1))
    ref_m = R.random_masking(s, B, L, 49, 1, L, dev)
    for a, b in zip(m, ref_m):
        assert torch.equal(a, b), "kernel and PyTorch Philox permutations differ"
    imgs = torch.randn(B, C, 224, 224, device=dev).to(dtype)
    assert torch.equal(mae.patchify(imgs, p), R.patchify_official(imgs, p))
    assert torch.equal(mae.gather_patches(imgs, m.ids_keep, p), _gather(R.patchify_official(imgs, p), m.ids_keep))
    x = torch.randn(B, L, D, device=dev, dtype=dtype)
    a = leaf(x)
    out = mae.gather_tokens(a, m.ids_keep)
    assert torch.equal(out, _gather(x, m.ids_keep))
    gk = torch.randn_like(out)
    out.backward(gk)
    assert torch.equal(a.grad, torch.zeros_like(x).scatter(1, m.ids_keep[:, :, None].expand(-1, -1, D), gk))
    xv, mt, pos = (torch.randn(B, 49, D, device=dev, dtype=dtype), torch.randn(1, 1, D, device=dev, dtype=dtype),
                   torch.randn(1, L, D, device=dev, dtype=dtype))
    xa, mta, posa = leaf(xv), leaf(mt), leaf(pos)
    xb, mtb, posb = leaf(xv, torch.float64), leaf(mt, torch.float64), leaf(pos, torch.float64)
    out = mae.unshuffle(xa, m.ids_restore, mta, posa)
    ref = R.unshuffle_official(xb, m.ids_restore, mtb, posb)
    assert_close(out, ref, tol(dtype, "cuda"), "unshuffle")
    gu = torch.randn(B, L, D, device=dev, dtype=dtype)
    out.backward(gu)
    ref.backward(gu.double())
    assert torch.equal(xa.grad, xb.grad.to(dtype)), "d x_visible must be an exact gather"
    assert_close(mta.grad, mtb.grad, tol(dtype, "cuda"), "d mask_token")
    assert_close(posa.grad, posb.grad, tol(dtype, "cuda"), "d pos")
    pred = torch.randn(B, L, p * p * C, device=dev, dtype=dtype)
    for norm in (True, False):
        pa, pb = leaf(pred), leaf(pred, torch.float64)
        loss = mae.masked_mse_loss(pa, imgs, m.mask, p, norm)
        ref = R.forward_loss_official(imgs.double(), pb, m.mask.double(), p, norm)
        assert_close(loss, ref, tol(dtype, "cuda"), "loss")
        loss.backward()
        ref.backward()
        assert_close(pa.grad, pb.grad, tol(dtype, "cuda"), "d pred")


@pytest.mark.gpu
def test_gpu_front_and_bad_ids():
    dev = torch.device("cuda")
    B, p, D = 64, 16, 768
    front = MaskedPatchEmbed(224, p, 3, D, pos_embed="learned").to(dev)
    imgs = torch.randn(B, 3, 224, 224, device=dev)
    m = mae.random_masking(B, 196, 0.75, device=dev)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out, _ = front(imgs, masking=m)
        ref = mae.gather_tokens(front.embed_all(imgs), m.ids_keep)
    assert out.dtype == ref.dtype == torch.float32  # bf16 conv + fp32 pos, as the official front under AMP
    assert_close(out, ref, 2e-2, "front bf16 autocast")
    out32, _ = front(imgs, masking=m)
    assert_close(out32, mae.gather_tokens(front.embed_all(imgs), m.ids_keep), 5e-3, "front fp32 (cuDNN TF32)")
    bf = MaskedPatchEmbed(224, p, 3, D, pos_embed="learned").to(dev, torch.bfloat16)
    outb, _ = bf(imgs.bfloat16(), masking=m)
    assert outb.dtype == torch.bfloat16
    assert_close(outb, mae.gather_tokens(bf.embed_all(imgs.bfloat16()), m.ids_keep), 2e-2, "front bf16")
    # out-of-range ids on CUDA: no check (it would sync), no fault: NaN rows
    bad = m.ids_keep.clone()
    bad[0, 0] = 10_000
    got = mae.gather_tokens(torch.randn(B, 196, 8, device=dev), bad)
    assert torch.isnan(got[0, 0]).all() and torch.isfinite(got[1:]).all()
    assert torch.isnan(mae.gather_patches(imgs, bad, p)[0, 0]).all()
    torch.cuda.synchronize()


@pytest.mark.gpu
def test_gpu_compile_and_block_masking():
    dev = torch.device("cuda", torch.cuda.current_device())
    m = mae.random_masking(32, 196, 0.6, device=dev, block_size=2)
    cm = m.mask.reshape(32, 7, 2, 7, 2)
    assert torch.equal(cm.amax((2, 4)), cm.amin((2, 4)))
    B, L, D, p = 8, 196, 64, 16
    imgs = torch.randn(B, 3, 224, 224, device=dev, dtype=torch.bfloat16)
    w = torch.randn(D, p * p * 3, device=dev, dtype=torch.bfloat16, requires_grad=True)
    mt = torch.randn(D, device=dev, dtype=torch.bfloat16, requires_grad=True)

    def step(imgs, w, mt):
        mm = mae.random_masking(B, L, 0.75, device=dev)
        v = mae.gather_patches(imgs, mm.ids_keep, p) @ w.t()
        full = mae.unshuffle(v, mm.ids_restore, mt)
        return mae.masked_mse_loss(full @ w, imgs, mm.mask, p)

    loss = torch.compile(step, fullgraph=True)(imgs, w, mt)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(w.grad).all() and torch.isfinite(mt.grad).all()
