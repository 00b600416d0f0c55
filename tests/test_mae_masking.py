"""MAE random masking and BERT masking (`sslfast.mae`): the official masking logic on Philox noise, identical
permutations on the PyTorch path and the Triton kernels (`backend` fixture: the interpreter on CPU), statistics,
seeding, SimMIM block masking and torch.compile."""

import os

import pytest
import torch

from sslfast import mae
from sslfast.ops._torch import mae as pt
from sslfast.reference import mae as R

from mae_helpers import exact, seeded


# ----------------------------------------------------------------------------------------- random masking
@pytest.mark.parametrize("L", [49, 50, 196])
@pytest.mark.parametrize("ratio", [0.75, 0.4])
def test_random_masking_is_official_masking(backend, seed, L, ratio):
    B, D = 3, 8
    m = mae.random_masking(B, L, ratio, generator=seeded(seed))
    keep = int(L * (1 - ratio))
    assert m.ids_keep.shape == (B, keep) and m.ids_keep.dtype == torch.int64
    assert m.ids_restore.shape == (B, L) and m.ids_restore.dtype == torch.int64
    assert m.mask.shape == (B, L) and m.mask.dtype == torch.float32
    # the official code, fed the same noise: identical mask, ids_restore and visible tokens
    s = torch.randint(0, 1 << 62, (1,), generator=seeded(seed), dtype=torch.int64)
    noise = pt.masking_noise(s, B, L, 1, L, "cpu").double()
    x = torch.randn(B, L, D)
    x_masked, mask, ids_restore = R.random_masking_official(x, ratio, noise)
    exact(m.mask, mask, "mask")
    exact(m.ids_restore, ids_restore, "ids_restore")
    exact(mae.gather_tokens(x, m.ids_keep), x_masked, "x_masked")


def test_random_masking_backends_agree(monkeypatch, seed):
    """One seed, one permutation: the Triton kernel and the PyTorch path return identical MaskInfo."""
    outs = []
    for be in ("reference", "triton"):
        if be == "triton" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            pytest.skip("needs the Triton interpreter")
        monkeypatch.setenv("SSLFAST_BACKEND", be)
        outs.append(mae.random_masking(5, 196, 0.75, generator=seeded(seed)))
        outs.append(mae.random_masking(5, 196, 0.5, generator=seeded(seed), block_size=2))
    for a, b in zip(outs[:2], outs[2:]):
        for t_a, t_b in zip(a, b):
            exact(t_a, t_b)


def test_random_masking_statistics(backend, seed):
    # The interpreter sorts slowly (~50 ms a sample); the kernel's permutations are bit-identical to the
    # PyTorch path's (test_random_masking_backends_agree), so it gets fewer draws and the looser bound.
    B, L, ratio = (1200 if backend == "reference" else 64), 49, 0.75
    m = mae.random_masking(B, L, ratio, generator=seeded(seed))
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
    a = mae.random_masking(4, 50, 0.75, generator=seeded(seed))
    b = mae.random_masking(4, 50, 0.75, generator=seeded(seed))
    for t_a, t_b in zip(a, b):
        exact(t_a, t_b)
    g = seeded(seed)
    c, d = mae.random_masking(4, 50, 0.75, generator=g), mae.random_masking(4, 50, 0.75, generator=g)
    assert not torch.equal(c.ids_keep, d.ids_keep), "the generator must advance between calls"
    assert not torch.equal(c.mask[0], c.mask[1]), "samples of one batch must differ"
    torch.manual_seed(seed)
    e = mae.random_masking(4, 50, 0.75)
    torch.manual_seed(seed)
    exact(mae.random_masking(4, 50, 0.75).mask, e.mask, "default generator")


@pytest.mark.parametrize("grid,block,ratio", [((14, 14), 2, 0.6), ((4, 8), 4, 0.5), ((6, 6), 3, 0.75)])
def test_block_masking(backend, seed, grid, block, ratio):
    h, w = grid
    L, B = h * w, 4
    m = mae.random_masking(B, L, ratio, generator=seeded(seed), block_size=block, grid_size=grid)
    cells = L // block**2
    keep = int(cells * (1 - ratio)) * block**2
    assert m.ids_keep.shape == (B, keep)
    assert torch.equal(m.mask.sum(1), torch.full((B,), float(L - keep)))
    cellmask = m.mask.reshape(B, h // block, block, w // block, block)
    assert torch.equal(cellmask.amax((2, 4)), cellmask.amin((2, 4))), "cells must be masked whole"
    assert torch.equal(m.ids_restore.sort(1).values, torch.arange(L).expand(B, L))
    assert torch.equal(m.mask.gather(1, m.ids_keep), torch.zeros(B, keep))


# ----------------------------------------------------------------------------------------- BERT masking
def test_bert_masking(backend, seed):
    V, N = 1000, 20000
    ids = torch.randint(5, V, (4, N // 4))
    special = torch.zeros_like(ids, dtype=torch.bool)
    special[:, 0] = True
    out, labels = mae.bert_masking(ids, 3, V, special_tokens_mask=special, generator=seeded(seed))
    sel = labels != -100
    assert torch.equal(labels[sel], ids[sel]) and not sel[:, 0].any()
    assert torch.equal(out[~sel], ids[~sel])
    frac = sel.float().mean().item()
    assert abs(frac - 0.15) < 0.02
    n = sel.sum().item()
    replaced = (out[sel] == 3).float().sum().item() / n
    same = (out[sel] == ids[sel]).float().sum().item() / n
    assert abs(replaced - 0.8) < 0.04 and abs(same - 0.1) < 0.03, (replaced, same)
    o2, l2 = mae.bert_masking(ids, 3, V, special_tokens_mask=special, generator=seeded(seed))
    assert torch.equal(o2, out) and torch.equal(l2, labels)
    s = torch.randint(0, 1 << 62, (1,), generator=seeded(seed), dtype=torch.int64)
    ro, rl = pt.bert_masking(s, ids, special.to(torch.int8), 3, V, 0.15, 0.8, 0.5, -100)
    assert torch.equal(ro, out) and torch.equal(rl, labels)


def test_random_masking_compiles(backend, seed):
    fn = torch.compile(lambda: mae.random_masking(3, 49, 0.75), fullgraph=True, backend="aot_eager")
    torch.manual_seed(seed)
    got = fn()
    torch.manual_seed(seed)
    expect = mae.random_masking(3, 49, 0.75)
    for a, b in zip(got, expect):
        exact(a, b)


def test_kernel_host_seed_path(backend, seed):
    """A CPU generator with CUDA outputs passes the seed by value (SEED_IN_MEMORY=False): same permutation."""
    if backend != "triton":
        pytest.skip("kernel launcher detail")
    from sslfast.kernels import mae as K

    s = torch.randint(0, 1 << 62, (1,), generator=seeded(seed), dtype=torch.int64)
    B, L, keep = 3, 50, 12
    expect = pt.random_masking(s, B, L, keep, 1, L, "cpu")
    outs = [torch.full((B, keep), -1), torch.full((B, L), -1), torch.full((B, L), float("nan"))]
    K._random_masking_kernel[(B,)](
        outs[0], int(s), *outs, L, keep, L, 1, L, L, SEED_IN_MEMORY=False, BLOCK_L=64, num_warps=1
    )
    for a, b in zip(outs, expect):
        exact(a, b)
