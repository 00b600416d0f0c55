"""The InfoNCE core op's pieces: each kernel (epilogue, split merge, index maps, fp16 unit operands, the
symmetric forward) against the chunked PyTorch path in float64, that path's chunking against the literal
losses, the custom ops under `torch.library.opcheck`, and the kernels' sm_90 builds."""

import math

import pytest
import torch
import torch.nn.functional as F

import sslfast as sf
from sslfast.ops._torch import infonce as T
from sslfast.ops.infonce import IndexMaps
from sslfast.reference import infonce as ref
from aot_compile import check_compiles
from helpers import TOL_GPU_FP32, assert_close, assert_loss_close, leaf


# ------------------------------------------------------------------------------------------ the core op
@pytest.mark.parametrize("m", [1, 37, 200])
@pytest.mark.parametrize("cols", [False, True])
def test_loss_epilogue_kernel_against_reference(seed, m, cols):
    """The one-launch epilogue (loss and the upstream gradients of the backward) against the float64 ATen
    one, with margins from −40 to 40, a row without negatives (lse = −inf) and, separately, a NaN."""
    from sslfast.kernels import infonce as kern

    lse_r, lse_c, pos = torch.randn(m) * 8, torch.randn(m if cols else 0) * 8, torch.randn(m) * 8
    lse_r[0], pos[-1] = float("-inf"), 40.0
    want = T.loss_epilogue(lse_r.double(), lse_c.double(), pos.double())
    got = kern.loss_epilogue(lse_r, lse_c, pos)
    for name, g, w in zip(("loss", "g_r", "g_c", "g_p"), got, want):
        if w is None:
            assert g is None, name
        else:
            assert g.dtype == torch.float32 and g.shape == w.shape, name
            assert_close(g, w, 1e-5, f"{name} (seed {seed})")  # fp32 margins: |x|·2⁻²⁴ of e^x
    lse_r[m // 2] = float("nan")
    loss, g_r, _, g_p = kern.loss_epilogue(lse_r, lse_c, pos)
    assert loss.isnan() and g_r[m // 2].isnan() and g_p[m // 2].isnan()


@pytest.mark.parametrize("splits", [1, 3, 37, 300])  # 300: one row a program
@pytest.mark.parametrize("bounded", [True, False])
def test_merge_splits_kernel_against_reference(seed, splits, bounded):
    """The one-launch split merge against the ATen formulas in float64: ln Σ_s l (plain sums) or the
    logsumexp of the base-2 (max, sum) partials, Σ_s pos, and the column LSEs (more columns than rows). A row
    whose every split is empty gives −inf, an empty split among full ones is skipped, and a NaN partial
    gives a NaN."""
    from sslfast.kernels import infonce as kern

    m, nb, scale = 45, 70, 37.5
    row_m, row_l = torch.randn(splits, m) * 30, torch.rand(splits, m) * 50 + 0.5
    row_m[0, 1], row_l[0, 1] = float("-inf"), 0.0  # empty split (a no-op unless it is the only one)
    row_m[:, 2], row_l[:, 2] = float("-inf"), 0.0  # no negatives at all
    pos, col_l = torch.randn(splits, m) * 9, torch.rand(nb) * 1e3 + 1e-3
    col_acc = torch.rand(nb, dtype=torch.float64) * 1e-200  # e^(s − scale) sums live far below fp32's range
    if bounded:
        want_r = row_l.double().sum(0).log()
        want_c = col_l.double().log()
    else:
        want_r = torch.logsumexp((row_m.double() + row_l.double().log2()) * math.log(2), dim=0)
        want_c = col_acc.log() + scale
    for want_pos, col_stats in ((True, True), (False, False)):
        lse_r, lse_c, got_p = kern.merge_splits(
            row_m,
            row_l,
            pos,
            col_l,
            col_acc,
            torch.tensor(scale),
            nb,
            want_pos=want_pos,
            col_stats=col_stats,
            bounded=bounded,
        )
        assert lse_r.dtype == lse_c.dtype == got_p.dtype == torch.float32
        assert torch.equal(lse_r.isinf(), want_r.isinf()) and (lse_r[want_r.isinf()] < 0).all()
        finite = want_r.isfinite()
        assert_close(lse_r[finite], want_r[finite], 1e-6, f"lse_r (seed {seed})")
        assert got_p.shape == (m if want_pos else 0,) and lse_c.shape == (nb if col_stats else 0,)
        if want_pos:
            assert_close(got_p, pos.double().sum(0), 1e-6, f"pos (seed {seed})")
        if col_stats:
            assert_close(lse_c, want_c, 1e-6, f"lse_c (seed {seed})")
    row_l[-1, 7] = float("nan")
    lse_r, _, _ = kern.merge_splits(
        row_m, row_l, pos, col_l, col_acc, torch.tensor(scale), nb, want_pos=False, col_stats=False, bounded=bounded
    )
    assert lse_r[7].isnan() and lse_r[8].isfinite()


@pytest.mark.parametrize("bounded", [True, False])
def test_core_index_maps_against_reference(seed, bounded):
    """Kernels vs the chunked PyTorch path on a rank's view of a gathered batch: shifted rows, two segments,
    NT-Xent pairing, self-exclusion, column statistics and every gradient term at once, on both the
    plain-sum (bounded) and the online-max statistics."""
    from sslfast._backend import interpreting
    from sslfast.kernels import infonce as kern

    if not interpreting():
        pytest.skip("interpreter-only (the GPU sweep covers the kernels on CUDA)")
    n, world, rank, d = 5, 3, 1, 20
    big = n * world
    a = torch.randn(2 * n, d)
    b = torch.randn(2 * big, d)
    b[rank * n : (rank + 1) * n] = a[:n]
    b[big + rank * n : big + (rank + 1) * n] = a[n:]
    scale = torch.tensor(2.5)
    maps = IndexMaps(row_off=rank * n, row_split=n, row_shift=big - n, pos_shift=big, pos_period=2 * big)
    kw = dict(exclude_self=True, want_pos=True, col_stats=True, bounded=bounded)
    a64, b64 = a.double(), b.double()
    rn = (T.row_rnorm(a64), T.row_rnorm(b64))
    want = T.similarity_lse(a64, b64, *rn, scale.double(), maps, **kw)
    got = kern.similarity_lse(a, b, kern.row_rnorm(a), kern.row_rnorm(b), scale, maps, **kw)
    for name, g, w in zip(("lse_r", "lse_c", "pos"), got, want):
        assert_close(g, w, 1e-5, f"{name} (seed {seed})")
    g_r, g_c, g_p = torch.rand(2 * n), torch.rand(2 * big), torch.randn(2 * n)
    terms = dict(lse_r=want[0], g_r=g_r, lse_c=want[1], g_c=g_c, g_pr=g_p)
    kw = dict(exclude_self=True, bounded=bounded, want_dscale=True)
    dw, sw = T.similarity_lse_rows_grad(
        a64, b64, *rn, scale.double(), maps, **kw, **{k: v.double() for k, v in terms.items()}
    )
    dg, sg = kern.similarity_lse_rows_grad(
        a, b, kern.row_rnorm(a), kern.row_rnorm(b), scale, maps, **kw, **{k: v.float() for k, v in terms.items()}
    )
    assert_close(dg, dw, 1e-5, f"rows grad (seed {seed})")
    assert_close(sg, sw, 1e-5, f"scale grad (seed {seed})")


@pytest.mark.parametrize("bounded", [True, False])
def test_split_partials_summed_by_the_normalize_backwards(seed, bounded):
    """Many column splits leave [S, M, D] partials of ∂L/∂r̂, which the row-normalization backwards sum (no
    reduction of their own); the pair backward (MoCo's queue mode) also gives the partner's and the scale's
    gradients from one launch. Against the PyTorch path in float64."""
    from sslfast._backend import interpreting
    from sslfast.kernels import infonce as kern

    if not interpreting():
        pytest.skip("interpreter-only (the split count depends on the machine)")
    m, nb, d = 7, 101, 20
    a, b, p = torch.randn(m, d), torch.randn(nb, d), torch.randn(m, d)
    scale = torch.tensor(3.0)
    a64, b64, p64, s64 = a.double(), b.double(), p.double(), scale.double()
    rn_a, rn_p, _ = kern.row_rnorm(a, p, scale)
    rn64, rn_p64, _ = T.row_rnorm(a64, p64, s64)
    rn_b, rn_b64 = kern.row_rnorm(b), T.row_rnorm(b64)
    maps = IndexMaps()
    lse = T.similarity_lse(
        a64, b64, rn64, rn_b64, s64, maps, exclude_self=False, want_pos=False, col_stats=False, bounded=bounded
    )[0]
    g_r, g_p = torch.rand(m), torch.randn(m)
    kw = dict(exclude_self=False, bounded=bounded, want_dscale=True)
    dg, sg = kern.similarity_lse_rows_grad(a, b, rn_a, rn_b, scale, maps, lse_r=lse.float(), g_r=g_r, **kw)
    dw, sw = T.similarity_lse_rows_grad(a64, b64, rn64, rn_b64, s64, maps, lse_r=lse, g_r=g_r.double(), **kw)
    assert dg.dim() == 3 and dg.shape[0] > kern.MAX_ATOMIC_SPLITS, dg.shape
    assert_close(kern.row_normalize_backward(a, rn_a, dg), T.row_normalize_backward(a64, rn64, dw), 1e-5, "da")
    got = kern.pair_normalize_backward(a, rn_a, dg, p, rn_p, g_p, scale, sg)
    want = T.pair_normalize_backward(a64, rn64, dw, p64, rn_p64, g_p.double(), s64, sw)
    for name, g, w in zip(("da", "dpartner", "dscale"), got, want):
        assert_close(g, w, 1e-5, f"pair {name} (seed {seed})")
    da, dp, none = kern.pair_normalize_backward(a, rn_a, dg[0], p, rn_p, g_p, scale)
    want = T.pair_normalize_backward(a64, rn64, dg[0].double(), p64, rn_p64, g_p.double(), s64)
    assert none is None and want[2] is None
    assert_close(da, want[0], 1e-5, "da, one split")
    assert_close(dp, want[1], 1e-5, "dpartner, one split")


@pytest.mark.parametrize("loss", ["nt_xent", "info_nce", "clip"])
def test_fp32_inputs_with_fp16_unit_operands(seed, loss, monkeypatch):
    """The GPU's fp32 path (tiles over fp16 unit rows, forced here under the interpreter) meets the GPU fp32
    tolerance against float64, every gradient included; and it really ran on fp16 operands."""
    from sslfast._backend import interpreting
    from sslfast.kernels import infonce as kern

    if not interpreting():
        pytest.skip("interpreter-only (on a GPU this is the fp32 path itself)")
    monkeypatch.setenv("SSLFAST_BACKEND", "triton")
    monkeypatch.setattr(kern, "fp32_operand_dtype", lambda: torch.float16)
    seen = []
    unit_rows = kern._unit_rows
    monkeypatch.setattr(kern, "_unit_rows", lambda x, rn: seen.append(x.shape) or unit_rows(x, rn))
    n, d = 37, 48
    x, y = torch.randn(n, d) * 30, torch.randn(n, d) * 1e-3  # far from unit norm: the rows are normalized first
    queue = F.normalize(torch.randn(77, d), dim=1)
    scale = torch.tensor(14.3)
    fused = {
        "nt_xent": lambda a, b, s: sf.nt_xent_loss(a, b, 0.1),
        "info_nce": lambda a, b, s: sf.info_nce_loss(a, b, queue.to(a.dtype), 0.2),
        "clip": lambda a, b, s: sf.clip_loss(a, b, s),
    }[loss]
    literal = {
        "nt_xent": lambda a, b, s: ref.nt_xent_loss(a, b, 0.1),
        "info_nce": lambda a, b, s: ref.info_nce_loss(a, b, queue.double(), 0.2),
        "clip": lambda a, b, s: ref.clip_loss(a, b, s),
    }[loss]
    a, b, s = leaf(x), leaf(y), leaf(scale)
    got = fused(a, b, s)
    got.backward()
    assert seen, "the fp16 unit-row operands were not used"
    a64, b64, s64 = leaf(x, torch.float64), leaf(y, torch.float64), leaf(scale, torch.float64)
    want = literal(a64, b64, s64)
    want.backward()
    assert_loss_close(got, want, TOL_GPU_FP32, f"loss (seed {seed})")
    grads = {"a": (a.grad, a64.grad), "b": (b.grad, b64.grad)}
    if loss == "clip":
        grads["logit_scale"] = (s.grad, s64.grad)
    for name, (g, w) in grads.items():
        assert_close(g, w, TOL_GPU_FP32, f"{name} grad (seed {seed})")


@pytest.mark.parametrize("n,d", [(2, 3), (37, 48), (70, 130), (128, 3)])
def test_symmetric_forward_computes_half_the_tiles(seed, n, d, monkeypatch):
    """NT-Xent's symmetric forward (tiles on and right of the diagonal, columns mirrored into the rows) equals
    the float64 reference and the full-square schedule that torch.use_deterministic_algorithms selects."""
    from sslfast._backend import interpreting
    from sslfast.kernels import infonce as kern

    if not interpreting():
        pytest.skip("interpreter-only (the GPU sweep covers the kernels on CUDA)")
    z = torch.randn(2 * n, d)
    scale = torch.tensor(1 / 0.07)
    maps = IndexMaps(pos_shift=n, pos_period=2 * n)
    kw = dict(exclude_self=True, want_pos=True, col_stats=False, bounded=True)
    spans = []
    span = kern._triangle_span
    monkeypatch.setattr(kern, "_triangle_span", lambda *a: spans.append(span(*a)) or spans[-1])
    rn = kern.row_rnorm(z)
    got = kern.similarity_lse(z, z, rn, rn, scale, maps, **kw)
    assert len(spans) == 1, "the symmetric schedule was not taken"
    torch.use_deterministic_algorithms(True)
    try:
        square = kern.similarity_lse(z, z, rn, rn, scale, maps, **kw)
    finally:
        torch.use_deterministic_algorithms(False)
    assert len(spans) == 1, "deterministic mode must take the full-square schedule"
    z64 = z.double()
    want = T.similarity_lse(z64, z64, T.row_rnorm(z64), T.row_rnorm(z64), scale.double(), maps, **kw)
    for name, g, s, w in zip(("lse_r", "lse_c", "pos"), got, square, want):
        assert_close(g, w, 1e-5, f"{name} (seed {seed})")
        assert_close(s, w, 1e-5, f"{name}, full square (seed {seed})")


# ------------------------------------------------------------------------------------------ compile
# The variants the ops launch: forward (EXCLUDE_SELF, WANT_POS, COL_STATS, BOUNDED) and backward (ROW_TERM,
# COL_TERM, POS_ROW, POS_COL, EXCLUDE_SELF, WANT_DSCALE, BOUNDED) for NT-Xent (one device and gathered),
# paired InfoNCE (rows, swapped), the queue, and CLIP (rows, swapped).
# (EXCLUDE_SELF, WANT_POS, COL_STATS, BOUNDED, TRIANGLE): NT-Xent symmetric / gathered / unbounded, MoCo, CLIP
_FWD_VARIANTS = [
    (True, True, False, True, True),
    (True, True, False, True, False),
    (True, True, False, False, False),
    (False, True, False, True, False),
    (False, False, False, True, False),
    (False, True, True, False, False),
]
_BWD_VARIANTS = [
    (True, True, True, True, True, False, True),
    (True, False, True, False, True, False, True),
    (False, True, False, True, True, False, True),
    (True, False, True, False, False, False, True),
    (False, True, False, True, False, False, True),
    (True, False, False, False, False, False, True),
    (True, True, True, False, False, True, False),
    (True, True, False, True, False, False, False),
    (True, True, True, True, True, False, False),
]


def test_kernels_compile_for_sm90():
    """Every kernel variant the ops launch compiles ahead of time to an sm_90 cubin at the GPU tile shapes,
    with the JIT's alignment specialization (no GPU needed), and none spills registers."""
    out = check_compiles(f"""
    import sslfast.kernels.infonce as K

    ALIGNED = ("D", "stride_r", "stride_c", "stride_dr", "stride_ds", "stride_x", "stride_p", "stride_dxh", "stride_dx",
               "stride_dxs", "stride_dp", "cols_per_split", "M", "NB")
    FWD = dict(zip(("EXCLUDE_SELF", "WANT_POS", "COL_STATS", "BOUNDED", "TRIANGLE"), range(5)))
    BWD = dict(zip(("ROW_TERM", "COL_TERM", "POS_ROW", "POS_COL", "EXCLUDE_SELF", "WANT_DSCALE", "BOUNDED"),
                   range(7)))

    def tiles(kind, one, bounded, **extra):
        bd = 128 if one else 64
        t = dict(K.gpu_tiles(kind, one, bounded, bd), BLOCK_D=bd, ONE_CHUNK=one, UPCAST=False, **extra)
        return t, t.pop("num_warps"), t.pop("num_stages")

    for dt in ("bf16", "fp32"):
        for partner in (True, False):
            build(K._rownorm_kernel, dict(X="*" + dt, RN="*fp32", P="*" + dt, RN_P="*fp32", POS="*fp32",
                                          SCALE="*fp32", eps="fp32"),
                  dict(HAS_PARTNER=partner, BLOCK_M=32, BLOCK_D=128), aligned=ALIGNED)
            build(K._normalize_bwd_kernel, dict(X="*" + dt, RN="*fp32", DXH="*fp32", P="*" + dt, RN_P="*fp32",
                                                COEF="*fp32", DX="*" + dt),
                  dict(HAS_DXH=True, HAS_PARTNER=partner, BLOCK_M=32, BLOCK_D=128), aligned=ALIGNED)
            build(K._pair_normalize_bwd_kernel, dict(X="*" + dt, RN="*fp32", DXH="*fp32", P="*" + dt,
                                                     RN_P="*fp32", G_P="*fp32", POS="*fp32", SCALE="*fp32",
                                                     DX="*" + dt, DP="*" + dt, DSCALE="*fp32"),
                  dict(WANT_DSCALE=partner, BLOCK_M=16, BLOCK_D=128), aligned=ALIGNED)
    build(K._unit_rows_kernel, dict(X="*fp32", RN="*fp32", XH="*fp16"), dict(BLOCK_M=32, BLOCK_D=128),
          aligned=ALIGNED)
    merges = ((True, False, True), (True, False, False), (False, False, True), (True, True, False))
    for want_pos, cols, bounded in merges:  # NT-Xent bounded / unbounded, MoCo's queue, CLIP
        for bs in (1, 8, 1024):  # splits: NT-Xent's triangle, MoCo, a few row blocks over many columns
            build(K._merge_splits_kernel, dict(ROW_M="*fp32", ROW_L="*fp32", POS_S="*fp32", COL_L="*fp32",
                  COL_ACC="*fp64", SCALE="*fp32", LSE_R="*fp32", POS="*fp32", LSE_C="*fp32"),
                  dict(WANT_POS=want_pos, COL_STATS=cols, BOUNDED=bounded, BLOCK=max(1, 1024 // bs), BLOCK_S=bs))
    for cols in (False, True):
        build(K._loss_epilogue_kernel, dict(LSE_R="*fp32", LSE_C="*fp32", POS="*fp32", LOSS="*fp32", G_R="*fp32",
              G_C="*fp32", G_P="*fp32", w_over_m="fp32"), dict(COLS=cols, BLOCK=1024))
    for dt in ("bf16", "fp16"):  # fp32 inputs tile fp16 unit rows
        ptrs = dict(R="*" + dt, C="*" + dt, RN_R="*fp32", RN_C="*fp32", SCALE="*fp32", ROW_M="*fp32",
                    ROW_L="*fp32", POS="*fp32", COL_L="*fp32", COL_ACC="*fp64")
        for one in (True, False):
            for v in ({_FWD_VARIANTS} if dt == "bf16" and one else {_FWD_VARIANTS}[::5]):
                t, warps, stages = tiles("fwd", one, v[3])
                build(K._lse_fwd_kernel, ptrs, dict(t, **{{k: v[i] for k, i in FWD.items()}}), warps, stages,
                      aligned=ALIGNED)
        ptrs = dict(R="*" + dt, C="*" + dt, RN_R="*fp32", RN_C="*fp32", SCALE="*fp32", LSE_R="*fp32",
                    G_R="*fp32", LSE_C="*fp32", G_C="*fp32", G_PR="*fp32", G_PC="*fp32", DR="*fp32",
                    DSCALE="*fp32", g_norm="fp32")
        for one in (True, False):
            for v in ({_BWD_VARIANTS} if dt == "bf16" and one else {_BWD_VARIANTS}[::6]):
                t, warps, stages = tiles("bwd", one, v[6], BLOCK_DO=128, ATOMIC=True)
                build(K._lse_bwd_kernel, ptrs, dict(t, **{{k: v[i] for k, i in BWD.items()}}), warps, stages,
                      aligned=ALIGNED)
    """)
    built = [line for line in out.splitlines() if line.startswith('{"kernel"')]
    assert len(built) >= 30, out
    spills = [line for line in built if '"spills": 0,' not in line]
    assert not spills, "register spills:\n" + "\n".join(spills[:10])
