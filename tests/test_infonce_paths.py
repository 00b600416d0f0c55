"""InfoNCE family: the chunked PyTorch path against the literal losses, the index maps, and `torch.library.opcheck`
of the custom ops on both paths."""

import pytest
import torch

import sslfast as sf
from sslfast.ops._torch import infonce as T
from sslfast.ops.infonce import IndexMaps, LseSpec
from sslfast.reference import infonce as ref
from helpers import assert_close, assert_loss_close, leaf


# ------------------------------------------------------------------------------------------ the PyTorch path
@pytest.mark.parametrize("loss", ["nt_xent", "info_nce", "moco_v3", "clip"])
def test_torch_path_chunks_against_literal(seed, loss, monkeypatch):
    """The chunked PyTorch path with chunks of a few rows (odd-sized, many chunks, a last partial one) equals
    the float64 literal losses to float64 accuracy, every gradient included (float64 runs that path)."""
    monkeypatch.setenv("SSLFAST_BACKEND", "reference")
    n, d = 13, 7
    monkeypatch.setattr(T, "CHUNK_ELEMS", 3 * 2 * n)  # 3 rows of NT-Xent's 2N columns a chunk
    x, y, queue = (
        torch.randn(n, d, dtype=torch.float64),
        torch.randn(n, d, dtype=torch.float64),
        torch.randn(11, d, dtype=torch.float64),
    )
    chunks = []
    tiles = T._tiles
    monkeypatch.setattr(T, "_tiles", lambda *a: (chunks.append(1) or t for t in tiles(*a)))
    fused = {
        "nt_xent": lambda a, b, s: sf.nt_xent_loss(a, b, 0.3),
        "info_nce": lambda a, b, s: sf.info_nce_loss(a, b, queue, 0.3),
        "moco_v3": lambda a, b, s: sf.info_nce_loss(a, b, None, 0.3),
        "clip": lambda a, b, s: sf.clip_loss(a, b, s),
    }[loss]
    literal = {
        "nt_xent": lambda a, b, s: ref.nt_xent_loss(a, b, 0.3),
        "info_nce": lambda a, b, s: ref.info_nce_loss(a, b, queue, 0.3),
        "moco_v3": lambda a, b, s: ref.info_nce_loss(a, b, None, 0.3),
        "clip": lambda a, b, s: ref.clip_loss(a, b, s),
    }[loss]
    s = torch.tensor(3.7, dtype=torch.float64)
    a, b, sc = leaf(x), leaf(y), leaf(s)
    got = fused(a, b, sc)
    got.backward()
    assert len(chunks) >= 4, f"{loss}: the path did not run in chunks ({len(chunks)})"
    a64, b64, s64 = leaf(x), leaf(y), leaf(s)
    want = literal(a64, b64, s64)
    want.backward()
    assert_loss_close(got, want, 1e-12, f"{loss} loss (seed {seed})")
    for name, g, w in (("a", a.grad, a64.grad), ("b", b.grad, b64.grad), ("scale", sc.grad, s64.grad)):
        if loss == "clip" or name != "scale":
            assert_close(g, w, 1e-10, f"{loss} {name} grad (seed {seed})")


def test_index_maps_swapped(seed):
    """`IndexMaps.swapped` exchanges the row and column maps and keeps the pairing; twice is the identity."""
    maps = IndexMaps(*torch.randint(1, 100, (8,)).tolist())
    sw = maps.swapped()
    assert (sw.row_off, sw.row_split, sw.row_shift) == (maps.col_off, maps.col_split, maps.col_shift)
    assert (sw.col_off, sw.col_split, sw.col_shift) == (maps.row_off, maps.row_split, maps.row_shift)
    assert (sw.pos_shift, sw.pos_period) == (maps.pos_shift, maps.pos_period) and sw.swapped() == maps


# ------------------------------------------------------------------------------------------ custom ops
def _opcheck_cases():
    n, d = 5, 6
    leaf_ = lambda *s: torch.randn(*s, requires_grad=True)  # noqa: E731
    z = leaf_(2 * n, d)
    return {
        "nt_xent": (
            z,
            z,
            None,
            torch.tensor(2.0),
            LseSpec(IndexMaps(pos_shift=n, pos_period=2 * n), symmetric=True, exclude_self=True, bounded=True),
        ),
        "nt_xent_gathered": (
            leaf_(2 * n, d),
            leaf_(4 * n, d),
            None,
            torch.tensor(2.0),
            LseSpec(
                IndexMaps(row_off=n, row_split=n, row_shift=n, pos_shift=2 * n, pos_period=4 * n),
                exclude_self=True,
                bounded=True,
            ),
        ),
        "moco_queue": (
            leaf_(n, d),
            torch.randn(7, d),
            leaf_(n, d),
            torch.tensor(2.0),
            LseSpec(IndexMaps(), want_pos=False, bounded=True),
        ),
        "clip": (
            leaf_(n, d),
            leaf_(n, d),
            None,
            torch.tensor(2.0, requires_grad=True),
            LseSpec(IndexMaps(), col_stats=True),
        ),
    }


@pytest.mark.parametrize("case", list(_opcheck_cases()))
def test_custom_ops_opcheck(backend, seed, case):
    """`torch.library.opcheck` on `sslfast::similarity_lse` and `sslfast::similarity_lse_backward` for every
    problem the losses pose (schema, no output aliasing an input or another output, fake tensors, autograd
    registration, AOT dispatch)."""
    from sslfast.ops import infonce as O

    a, b, partner, scale, spec = _opcheck_cases()[case]
    torch.library.opcheck(O.similarity_lse_op.custom_op, (a, b, partner, scale, *spec))
    out = O.similarity_lse_op.custom_op(a, b, partner, scale, *spec)
    g_r = torch.rand(out[0].shape)
    g_c = torch.rand(out[1].shape) if spec.col_stats else None
    g_p = torch.randn(out[2].shape) if out[2].numel() else None
    detached = [x.detach() if x is not None else None for x in (a, b, partner, scale)]
    args = (*detached, *(o.detach() for o in out), g_r, g_c, g_p, *spec, not spec.symmetric, scale.requires_grad)
    torch.library.opcheck(O.similarity_lse_backward.custom_op, args)
