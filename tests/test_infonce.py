"""NT-Xent, InfoNCE (MoCo) and CLIP: forward and every gradient against the float64 literal reference, on
the reference path and on the Triton kernels (interpreted on CPU, real on `-m gpu`)."""
import itertools
import math
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import sslfast as sf
from sslfast.reference import infonce as ref
from distributed_harness import run_ranks
from aot_compile import check_compiles
from helpers import TOL_GPU_FP32, assert_close, assert_loss_close, leaf, tol, with_and_without_autocast

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (N, D) pairs covering N in {2, 3, 37, 130} and D in {3, 48, 130}; each case also picks a temperature.
SHAPES = [(2, 3), (3, 130), (37, 48), (130, 3), (37, 130), (130, 48)]
TEMPERATURES = [0.05, 0.5, 1.0]


def _cases():
    for i, ((n, d), dtype) in enumerate(itertools.product(SHAPES, DTYPES)):
        yield pytest.param(n, d, dtype, TEMPERATURES[i % 3], id=f"N{n}-D{d}-{str(dtype)[6:]}")


def _check_grads(pairs, dtype, seed, device="cpu"):
    for name, (got, want) in pairs.items():
        assert got is not None, f"{name}: no gradient"
        assert_close(got, want, tol(dtype, device), f"{name} grad (seed {seed})")


# ------------------------------------------------------------------------------------------ correctness
@pytest.mark.parametrize("n,d,dtype,temperature", list(_cases()))
def test_nt_xent(backend, seed, n, d, dtype, temperature):
    z1, z2 = torch.randn(n, d, dtype=dtype), torch.randn(n, d, dtype=dtype)
    a, b = leaf(z1), leaf(z2)
    loss = sf.nt_xent_loss(a, b, temperature)
    loss.backward()
    a64, b64 = leaf(z1, torch.float64), leaf(z2, torch.float64)
    want = ref.nt_xent_loss(a64, b64, temperature)
    want.backward()
    assert loss.dtype == torch.float32
    assert_loss_close(loss, want, tol(dtype), f"loss (seed {seed})")
    _check_grads({"z1": (a.grad, a64.grad), "z2": (b.grad, b64.grad)}, dtype, seed)


@pytest.mark.parametrize("k", [None, 0, 77])
@pytest.mark.parametrize("n,d,dtype,temperature", list(_cases())[::2])
def test_info_nce(backend, seed, n, d, dtype, temperature, k):
    q, key = torch.randn(n, d, dtype=dtype), torch.randn(n, d, dtype=dtype)
    queue = None if k is None else F.normalize(torch.randn(k, d), dim=1).to(dtype)
    a, b = leaf(q), leaf(key)
    loss = sf.info_nce_loss(a, b, queue, temperature)
    loss.backward()
    a64, b64 = leaf(q, torch.float64), leaf(key, torch.float64)
    want = ref.info_nce_loss(a64, b64, None if queue is None else queue.double(), temperature)
    want.backward()
    if k == 0:  # only the positive logit: log(1) = 0 exactly, zero gradients
        assert loss.item() == 0.0 and want.item() == pytest.approx(0.0, abs=1e-12)
        assert a.grad.abs().max() == 0 and b.grad.abs().max() == 0
        return
    assert_loss_close(loss, want, tol(dtype), f"loss (seed {seed})")
    _check_grads({"query": (a.grad, a64.grad), "key": (b.grad, b64.grad)}, dtype, seed)


@pytest.mark.parametrize("logit_scale", [1.0, 14.3, 100.0])
@pytest.mark.parametrize("n,d,dtype,temperature", list(_cases())[1::2])
def test_clip(backend, seed, n, d, dtype, temperature, logit_scale):
    img, txt = torch.randn(n, d, dtype=dtype), torch.randn(n, d, dtype=dtype)
    a, b = leaf(img), leaf(txt)
    s = torch.tensor(logit_scale, requires_grad=True)
    loss = sf.clip_loss(a, b, s)
    loss.backward()
    a64, b64 = leaf(img, torch.float64), leaf(txt, torch.float64)
    s64 = torch.tensor(logit_scale, dtype=torch.float64, requires_grad=True)
    want = ref.clip_loss(a64, b64, s64)
    want.backward()
    assert_loss_close(loss, want, tol(dtype), f"loss (seed {seed})")
    _check_grads({"image_features": (a.grad, a64.grad), "text_features": (b.grad, b64.grad)}, dtype, seed)
    # ∂L/∂scale = Σ G∘cos (G = ∂L/∂logits) sums terms of both signs that largely cancel. Every fp32 path
    # carries each logit to ~|logit|·2⁻²⁴, so its error is bounded relative to Σ|G∘cos|, not to the sum. When
    # every term is below fp32's normal range (N = 2 at scale 100: ~1e-71), fp32's exact answer is 0.
    cos = F.normalize(img.double(), dim=1) @ F.normalize(txt.double(), dim=1).T
    logits = (logit_scale * cos).requires_grad_(True)
    target = torch.arange(n)
    ((ref._cross_entropy(logits, target) + ref._cross_entropy(logits.T, target)) / 2).backward()
    terms = (logits.grad * cos).abs().sum().item()
    err = abs(s.grad.item() - s64.grad.item())
    bound = max(max(tol(dtype), 2 * logit_scale * 2.0 ** -24) * terms, torch.finfo(torch.float32).tiny)
    assert err <= bound, f"logit_scale grad (seed {seed}): error {err:.3g} > {bound:.3g} (Σ|G∘cos| = {terms:.3g})"


def test_clip_column_statistics_extreme_scale(backend, seed):
    """Column log-sum-exps far below the fixed reference (scale = 300, nearly antipodal pairs) stay exact."""
    img = torch.randn(9, 16)
    txt = -img + 0.05 * torch.randn(9, 16)
    a, b = leaf(img), leaf(txt)
    s = torch.tensor(300.0, requires_grad=True)
    loss = sf.clip_loss(a, b, s)
    loss.backward()
    a64, b64, s64 = leaf(img, torch.float64), leaf(txt, torch.float64), leaf(s, torch.float64)
    want = ref.clip_loss(a64, b64, s64)
    want.backward()
    assert_loss_close(loss, want, 1e-5, f"loss (seed {seed})")
    # fp32 logits of size ~300 carry ~300·2⁻²⁴ absolute error, which exp() turns into ~2e-5 relative error.
    for name, got, w in (("img", a.grad, a64.grad), ("txt", b.grad, b64.grad), ("scale", s.grad, s64.grad)):
        assert_close(got, w, 1e-4, f"{name} grad (seed {seed})")


def test_noncontiguous_inputs(backend, seed):
    z = torch.randn(40, 2 * 24)
    z1, z2 = z[:, ::2], z[:, 1::2]  # strided views
    want = ref.nt_xent_loss(z1.double(), z2.double(), 0.3)
    assert_loss_close(sf.nt_xent_loss(z1, z2, 0.3), want, 1e-5, f"loss (seed {seed})")


# ------------------------------------------------------------------------------------------ the core op
@pytest.mark.parametrize("m", [1, 37, 200])
@pytest.mark.parametrize("cols", [False, True])
def test_loss_epilogue_kernel_against_reference(seed, m, cols):
    """The one-launch epilogue (loss and the upstream gradients of the backward) against the float64 ATen
    one, with margins from −40 to 40, a row without negatives (lse = −inf) and, separately, a NaN."""
    from sslfast.kernels import infonce as kern

    lse_r, lse_c, pos = torch.randn(m) * 8, torch.randn(m if cols else 0) * 8, torch.randn(m) * 8
    lse_r[0], pos[-1] = float("-inf"), 40.0
    want = ref.loss_epilogue(lse_r.double(), lse_c.double(), pos.double())
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
        lse_r, lse_c, got_p = kern.merge_splits(row_m, row_l, pos, col_l, col_acc, torch.tensor(scale), nb,
                                                want_pos=want_pos, col_stats=col_stats, bounded=bounded)
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
    lse_r, _, _ = kern.merge_splits(row_m, row_l, pos, col_l, col_acc, torch.tensor(scale), nb, want_pos=False,
                                    col_stats=False, bounded=bounded)
    assert lse_r[7].isnan() and lse_r[8].isfinite()


@pytest.mark.parametrize("bounded", [True, False])
def test_core_index_maps_against_reference(seed, bounded):
    """Kernels vs chunked reference on a rank's view of a gathered batch: shifted rows, two segments,
    NT-Xent pairing, self-exclusion, column statistics and every gradient term at once, on both the
    plain-sum (bounded) and the online-max statistics."""
    from sslfast._backend import interpreting
    from sslfast.kernels import infonce as kern
    from sslfast.ops.infonce import _maps

    if not interpreting():
        pytest.skip("interpreter-only (the GPU sweep covers the kernels on CUDA)")
    n, world, rank, d = 5, 3, 1, 20
    big = n * world
    a = torch.randn(2 * n, d)
    b = torch.randn(2 * big, d)
    b[rank * n:(rank + 1) * n] = a[:n]
    b[big + rank * n: big + (rank + 1) * n] = a[n:]
    scale = torch.tensor(2.5)
    maps = _maps(row_off=rank * n, row_split=n, row_shift=big - n, pos_shift=big, pos_period=2 * big)
    kw = dict(exclude_self=True, want_pos=True, col_stats=True, bounded=bounded)
    a64, b64 = a.double(), b.double()
    rn = (ref.row_rnorm(a64), ref.row_rnorm(b64))
    want = ref.similarity_lse(a64, b64, *rn, scale.double(), maps, **kw)
    got = kern.similarity_lse(a, b, kern.row_rnorm(a), kern.row_rnorm(b), scale, maps, **kw)
    for name, g, w in zip(("lse_r", "lse_c", "pos"), got, want):
        assert_close(g, w, 1e-5, f"{name} (seed {seed})")
    g_r, g_c, g_p = torch.rand(2 * n), torch.rand(2 * big), torch.randn(2 * n)
    terms = dict(lse_r=want[0], g_r=g_r, lse_c=want[1], g_c=g_c, g_pr=g_p)
    kw = dict(exclude_self=True, bounded=bounded, want_dscale=True)
    dw, sw = ref.similarity_lse_rows_grad(a64, b64, *rn, scale.double(), maps, **kw,
                                          **{k: v.double() for k, v in terms.items()})
    dg, sg = kern.similarity_lse_rows_grad(a, b, kern.row_rnorm(a), kern.row_rnorm(b), scale, maps, **kw,
                                           **{k: v.float() for k, v in terms.items()})
    assert_close(dg, dw, 1e-5, f"rows grad (seed {seed})")
    assert_close(sg, sw, 1e-5, f"scale grad (seed {seed})")


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
    fused = {"nt_xent": lambda a, b, s: sf.nt_xent_loss(a, b, 0.1),
             "info_nce": lambda a, b, s: sf.info_nce_loss(a, b, queue.to(a.dtype), 0.2),
             "clip": lambda a, b, s: sf.clip_loss(a, b, s)}[loss]
    literal = {"nt_xent": lambda a, b, s: ref.nt_xent_loss(a, b, 0.1),
               "info_nce": lambda a, b, s: ref.info_nce_loss(a, b, queue.double(), 0.2),
               "clip": lambda a, b, s: ref.clip_loss(a, b, s)}[loss]
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
    from sslfast.ops.infonce import _maps

    if not interpreting():
        pytest.skip("interpreter-only (the GPU sweep covers the kernels on CUDA)")
    z = torch.randn(2 * n, d)
    scale = torch.tensor(1 / 0.07)
    maps = _maps(pos_shift=n, pos_period=2 * n)
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
    want = ref.similarity_lse(z64, z64, ref.row_rnorm(z64), ref.row_rnorm(z64), scale.double(), maps, **kw)
    for name, g, s, w in zip(("lse_r", "lse_c", "pos"), got, square, want):
        assert_close(g, w, 1e-5, f"{name} (seed {seed})")
        assert_close(s, w, 1e-5, f"{name}, full square (seed {seed})")


# ------------------------------------------------------------------------------------------ modules
def _lightly_ntxent(out0, out1, temperature):
    """lightly NTXentLoss(memory_bank_size=0) forward, written from its definition: the block logits
    [[out0 out0ᵀ, out0 out1ᵀ], [out1 out0ᵀ, out1 out1ᵀ]]/τ with the two self-similarity diagonals removed,
    labels pointing at the other view, cross-entropy averaged over the 2N rows."""
    n = out0.shape[0]
    out0, out1 = F.normalize(out0, dim=1), F.normalize(out1, dim=1)
    diag = torch.eye(n, dtype=torch.bool)
    l00 = (out0 @ out0.T / temperature)[~diag].view(n, n - 1)
    l11 = (out1 @ out1.T / temperature)[~diag].view(n, n - 1)
    l01, l10 = out0 @ out1.T / temperature, out1 @ out0.T / temperature
    logits = torch.cat([torch.cat([l01, l00], 1), torch.cat([l10, l11], 1)], 0)
    labels = torch.arange(n).repeat(2)
    return F.cross_entropy(logits, labels)


def test_ntxent_module_matches_lightly(backend, seed):
    z1, z2 = torch.randn(11, 24), torch.randn(11, 24)
    got = sf.nn.NTXentLoss(temperature=0.2)(z1, z2)
    assert_loss_close(got, _lightly_ntxent(z1.double(), z2.double(), 0.2), 1e-5, f"seed {seed}")


def test_infonce_module_queue(backend, seed):
    """MoCo semantics: negatives are the queue *before* this step; this step's normalized keys enter the
    ring buffer afterwards, in place (the buffer is never reallocated), wrapping around its end."""
    k_size, n, d = 10, 4, 12
    module = sf.nn.InfoNCELoss(temperature=0.2, queue_size=k_size, embedding_dim=d)
    buffer = module.queue.data_ptr()
    expected, ptr = module.queue.clone(), 0
    for step in range(4):
        q, k = torch.randn(n, d), torch.randn(n, d)
        loss = module(q, k)
        want = ref.info_nce_loss(q.double(), k.double(), expected.double(), 0.2)
        assert_loss_close(loss, want, 1e-5, f"step {step} (seed {seed})")
        for row in F.normalize(k, dim=1):
            expected[ptr], ptr = row, (ptr + 1) % k_size
    module.flush()
    assert module.queue.data_ptr() == buffer
    assert_close(module.queue, expected, 1e-6, "queue contents")
    clone = sf.nn.InfoNCELoss(temperature=0.2, queue_size=k_size, embedding_dim=d)
    clone.load_state_dict(module.state_dict())
    assert clone._ptr == ptr and torch.equal(clone.queue, module.queue)


def test_clip_module(backend, seed):
    img, txt, s = torch.randn(7, 10), torch.randn(7, 10), torch.tensor(5.0)
    assert_loss_close(sf.nn.CLIPLoss()(img, txt, s), ref.clip_loss(img.double(), txt.double(), s.double()), 1e-5,
                 f"seed {seed}")


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("call,match", [
    (lambda: sf.nt_xent_loss(torch.randn(4, 8), torch.randn(5, 8)), "z1 and z2"),
    (lambda: sf.nt_xent_loss(torch.randn(4, 8), torch.randn(4, 8), temperature=0.0), "temperature"),
    (lambda: sf.nt_xent_loss(torch.randn(4, 8), torch.randn(4, 8), temperature=-1), "temperature"),
    (lambda: sf.nt_xent_loss(torch.randn(4, 8), torch.randn(4, 8), temperature=float("nan")), "temperature"),
    (lambda: sf.nt_xent_loss(torch.randn(1, 8), torch.randn(1, 8)), "N >= 2"),
    (lambda: sf.nt_xent_loss(torch.randn(0, 8), torch.randn(0, 8)), "non-empty"),
    (lambda: sf.nt_xent_loss(torch.randn(8), torch.randn(8)), r"z1 must be a 2-D tensor \[N, D\]"),
    (lambda: sf.nt_xent_loss(torch.randint(0, 5, (4, 8)), torch.randn(4, 8)), "z1 must have a floating dtype"),
    (lambda: sf.nt_xent_loss(torch.randn(4, 8), torch.randn(4, 8, device="meta")), "one device"),
    (lambda: sf.nt_xent_loss(torch.randn(4, 8), torch.randn(4, 8, dtype=torch.float16)), "one dtype"),
    (lambda: sf.info_nce_loss(torch.randn(4, 8), torch.randn(4, 8), torch.randn(9, 7)), "queue must be"),
    (lambda: sf.info_nce_loss(torch.randn(1, 8), torch.randn(1, 8)), "at least 2 rows"),
    (lambda: sf.info_nce_loss(torch.randn(4, 8), torch.randn(4, 8), torch.randn(9)), "queue must be a 2-D"),
    (lambda: sf.clip_loss(torch.randn(4, 8), torch.randn(4, 8), 2.0), "logit_scale"),
    (lambda: sf.clip_loss(torch.randn(4, 8), torch.randn(4, 8), torch.ones(2)), "logit_scale"),
])
def test_bad_input(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


_LOSSES = {"nt_xent": lambda a, b, s: sf.nt_xent_loss(a, b, 0.3),
           "moco_v3": lambda a, b, s: sf.info_nce_loss(a, b, None, 0.2),
           "moco_queue": lambda a, b, s: sf.info_nce_loss(a, b, _QUEUE, 0.2),
           "clip": lambda a, b, s: sf.clip_loss(a, b, s)}
_QUEUE = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))  # D = 8 below


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("loss", list(_LOSSES))
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_non_finite_input_gives_non_finite_loss(backend, bad, loss, grad):
    z1, z2 = torch.randn(6, 8), torch.randn(6, 8)
    z1[3, 2] = bad
    a, b = (leaf(z1), leaf(z2)) if grad else (z1, z2)
    out = _LOSSES[loss](a, b, torch.tensor(3.0))
    assert not torch.isfinite(out)
    if grad:
        out.backward()
        assert not torch.isfinite(a.grad).all()


@pytest.mark.parametrize("scale_kernel_from", [0, 1 << 62])  # every gradient by the Triton kernel / foreach
@pytest.mark.parametrize("loss", list(_LOSSES))
def test_gradients_computed_in_forward(backend, seed, loss, scale_kernel_from, monkeypatch):
    """An eager call that autograd will differentiate computes its input gradients in the forward: the loss
    equals the no-grad call's (to rounding: one fused epilogue against ATen ops), the backward scales by
    the upstream gradient (both ways it can), a second backward through a retained graph is refused with a
    clear message (and works under `separate_backward`), and create_graph gives a true second order (reference)
    or sslfast's DoubleBackwardError (kernels)."""
    monkeypatch.setattr(sf._custom_op, "SCALE_KERNEL_MIN_NUMEL", scale_kernel_from)
    z1, z2, s = torch.randn(7, 8), torch.randn(7, 8), torch.tensor(2.5)
    with torch.no_grad():
        plain = _LOSSES[loss](z1, z2, s)
    a, b, sc = leaf(z1), leaf(z2), leaf(s)
    out = _LOSSES[loss](a, b, sc)
    assert_loss_close(out.detach(), plain, 1e-6, f"{loss}: loss with gradients against the no-grad loss")
    (out * 3.0).backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="separate_backward"):
        out.backward()
    a1, b1, sc1 = leaf(z1), leaf(z2), leaf(s)
    with sf.separate_backward():
        twice = _LOSSES[loss](a1, b1, sc1)
    twice.backward(retain_graph=True)
    twice.backward()
    for got, two in ((a.grad, a1.grad), (b.grad, b1.grad)):
        assert_close(got, 1.5 * two, 1e-6, f"{loss}: 3·g against 2·g")
    if loss == "clip":  # one fp32 scalar summing terms that cancel, from two different paths: fp32's tolerance
        assert_close(sc.grad, 1.5 * sc1.grad, 1e-5, f"{loss}: logit_scale 3·g against 2·g")
    if backend == "reference":  # the reference path recomputes through plain autograd: a real second order
        second = torch.autograd.grad(_LOSSES[loss](leaf(z1), b1, sc1), b1, create_graph=True)[0]
        assert second.requires_grad, f"{loss}: create_graph=True must give a differentiable gradient"
    else:  # the kernels have no second order: sslfast's own error, never a silently constant gradient
        with pytest.raises(sf.ops.DoubleBackwardError, match="SSLFAST_BACKEND=reference"):
            torch.autograd.grad(_LOSSES[loss](leaf(z1), b1, sc1), b1, create_graph=True)


def test_temperature_scalar_reused_across_modes(backend, seed):
    """Eager calls share one device scalar per temperature; one first made under inference_mode still
    works in a training call that saves it for backward (the separate backward does)."""
    tau = 0.3 + torch.rand(()).item()  # a value no other test has cached
    z1, z2 = torch.randn(9, 8), torch.randn(9, 8)
    with torch.inference_mode():
        first = sf.nt_xent_loss(z1, z2, tau)
    a, b = leaf(z1), leaf(z2)
    with sf.separate_backward():
        loss = sf.nt_xent_loss(a, b, tau)
    loss.backward()
    assert torch.equal(loss.detach(), first) and torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()
    assert_loss_close(sf.nt_xent_loss(leaf(z1), z2, tau), first, 1e-6, "loss with gradients in the forward")
    assert sf._custom_op.scalar_constant(1 / tau, z1) is sf._custom_op.scalar_constant(1 / tau, z1)


# ------------------------------------------------------------------------------------------ compile
def test_torch_compile_fullgraph(seed, monkeypatch):
    monkeypatch.setenv("SSLFAST_BACKEND", "reference")

    def step(z1, z2, queue, scale):
        return (sf.nt_xent_loss(z1, z2, 0.3) + sf.info_nce_loss(z1, z2, queue, 0.2)
                + sf.info_nce_loss(z1, z2, None, 0.2) + sf.clip_loss(z1, z2, scale))

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    z1, z2, queue, s = torch.randn(6, 8), torch.randn(6, 8), torch.randn(11, 8), torch.tensor(2.0)
    a, b, sc = leaf(z1), leaf(z2), leaf(s)
    got = compiled(a, b, queue, sc)
    got.backward()
    a0, b0, sc0 = leaf(z1), leaf(z2), leaf(s)
    want = step(a0, b0, queue, sc0)
    want.backward()
    assert_loss_close(got, want, 1e-6, "compiled loss")
    for g, w in ((a.grad, a0.grad), (b.grad, b0.grad), (sc.grad, sc0.grad)):
        assert_close(g, w, 1e-6, "compiled grad")


# ------------------------------------------------------------------------------------------ memory
_RSS_SCRIPT = textwrap.dedent("""
    import resource, torch, sslfast as sf
    torch.manual_seed(0)
    z1 = torch.randn({n}, 128, requires_grad=True); z2 = torch.randn({n}, 128, requires_grad=True)
    sf.nt_xent_loss(z1[:64], z2[:64], 0.1).backward()          # warm up allocator and kernels
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    sf.nt_xent_loss(z1, z2, 0.1).backward()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert torch.isfinite(z1.grad).all()
    print((after - before) / 1024)
""")


def test_cpu_memory_stays_linear():
    """NT-Xent at 12000 rows per view, D=128, fp32, forward+backward on the CPU path: the 2N x 2N logits
    alone would be 2.3 GB; the chunked path must raise peak RSS by at most 512 MiB."""
    out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT.format(n=12000)], capture_output=True, text=True,
                         env={**__import__("os").environ, "SSLFAST_BACKEND": "reference"}, timeout=600)
    assert out.returncode == 0, out.stderr
    extra_mib = float(out.stdout.strip().splitlines()[-1])
    assert extra_mib <= 512, f"peak RSS grew by {extra_mib:.0f} MiB"


# ------------------------------------------------------------------------------------------ distributed
def _rank_losses(rank, world, loss_name, n, d, seed):
    torch.manual_seed(seed)
    x1, x2 = torch.randn(world * n, d), torch.randn(world * n, d)
    s = torch.tensor(3.0, requires_grad=True)
    a, b = leaf(x1[rank * n:(rank + 1) * n]), leaf(x2[rank * n:(rank + 1) * n])
    loss = {"nt_xent": lambda: sf.nt_xent_loss(a, b, 0.3, gather_distributed=True),
            "info_nce": lambda: sf.info_nce_loss(a, b, None, 0.3, gather_distributed=True),
            "clip": lambda: sf.clip_loss(a, b, s, gather_distributed=True)}[loss_name]()
    loss.backward()
    return loss.item(), a.grad, b.grad, s.grad


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("loss_name", ["nt_xent", "info_nce", "clip"])
def test_gather_distributed_matches_single_process(backend, seed, world, loss_name):
    """Each rank's loss averages to the single-process loss, and each rank's input gradients, after DDP's
    average over ranks (÷ world), equal the single-process gradients of its slice: no world_size factor."""
    n, d = 3, 10
    ranks = run_ranks(world, _rank_losses, loss_name, n, d, seed)
    torch.manual_seed(seed)
    x1, x2 = torch.randn(world * n, d), torch.randn(world * n, d)
    a, b, s = leaf(x1, torch.float64), leaf(x2, torch.float64), torch.tensor(3.0, dtype=torch.float64,
                                                                           requires_grad=True)
    want = {"nt_xent": lambda: ref.nt_xent_loss(a, b, 0.3), "info_nce": lambda: ref.info_nce_loss(a, b, None, 0.3),
            "clip": lambda: ref.clip_loss(a, b, s)}[loss_name]()
    want.backward()
    assert sum(r[0] for r in ranks) / world == pytest.approx(want.item(), rel=1e-5)
    for rank, (_, ga, gb, gs) in enumerate(ranks):
        rows = slice(rank * n, (rank + 1) * n)
        assert_close(ga / world, a.grad[rows], 1e-5, f"rank {rank} first input grad (seed {seed})")
        assert_close(gb / world, b.grad[rows], 1e-5, f"rank {rank} second input grad (seed {seed})")
    if loss_name == "clip":
        assert_close(sum(r[3] for r in ranks) / world, s.grad, 1e-5, "logit_scale grad")


# ------------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.parametrize("n,d,dtype", [(4096, 128, torch.float32), (4096, 128, torch.bfloat16),
                                       (4096, 128, torch.float16), (4097, 96, torch.bfloat16),
                                       (16384, 128, torch.bfloat16), (1000, 384, torch.float32)])
def test_gpu_sweep(seed, dtype, n, d):
    """The real kernels at realistic sizes against the float64 reference (on the GPU)."""
    dev = "cuda"
    z1, z2 = torch.randn(n, d, device=dev, dtype=dtype), torch.randn(n, d, device=dev, dtype=dtype)
    s = torch.tensor(14.3, device=dev)
    queue = F.normalize(torch.randn(4099, d, device=dev), dim=1).to(dtype)
    checks = {
        "nt_xent": (lambda x, y, sc: sf.nt_xent_loss(x, y, 0.1), lambda x, y, sc: ref.nt_xent_loss(x, y, 0.1)),
        "moco_v3": (lambda x, y, sc: sf.info_nce_loss(x, y, None, 0.2),
                    lambda x, y, sc: ref.info_nce_loss(x, y, None, 0.2)),
        "moco_queue": (lambda x, y, sc: sf.info_nce_loss(x, y, queue, 0.2),
                       lambda x, y, sc: ref.info_nce_loss(x, y, queue.double(), 0.2)),
        "clip": (lambda x, y, sc: sf.clip_loss(x, y, sc), lambda x, y, sc: ref.clip_loss(x, y, sc)),
    }
    for name, (fused, literal) in checks.items():
        if n > 8192 and name != "nt_xent":
            continue
        a, b, sc = leaf(z1), leaf(z2), leaf(s)
        fused(a, b, sc).backward()
        a64, b64, s64 = leaf(z1, torch.float64), leaf(z2, torch.float64), leaf(s, torch.float64)
        want = literal(a64, b64, s64)
        want.backward()
        got = fused(leaf(z1), leaf(z2), leaf(s))
        assert_loss_close(got, want, tol(dtype, dev), f"{name} loss (seed {seed})")
        _check_grads({f"{name} a": (a.grad, a64.grad), f"{name} b": (b.grad, b64.grad)}, dtype, seed, dev)
        if name == "clip":
            # Σ G·cos cancels (each row of G sums to ~0) while TF32 cosines carry ~1e-3 relative error.
            bound = 5e-3 if dtype == torch.float32 else tol(dtype, dev)
            assert_close(sc.grad, s64.grad, bound, f"clip logit_scale grad (seed {seed})")


# ------------------------------------------------------------------------------------------ compile
# The variants the ops launch: forward (EXCLUDE_SELF, WANT_POS, COL_STATS, BOUNDED) and backward (ROW_TERM,
# COL_TERM, POS_ROW, POS_COL, EXCLUDE_SELF, WANT_DSCALE, BOUNDED) for NT-Xent (one device and gathered),
# paired InfoNCE (rows, swapped), the queue, and CLIP (rows, swapped).
# (EXCLUDE_SELF, WANT_POS, COL_STATS, BOUNDED, TRIANGLE): NT-Xent symmetric / gathered / unbounded, MoCo, CLIP
_FWD_VARIANTS = [(True, True, False, True, True), (True, True, False, True, False), (True, True, False, False, False),
                 (False, True, False, True, False), (False, False, False, True, False),
                 (False, True, True, False, False)]
_BWD_VARIANTS = [(True, True, True, True, True, False, True), (True, False, True, False, True, False, True),
                 (False, True, False, True, True, False, True), (True, False, True, False, False, False, True),
                 (False, True, False, True, False, False, True), (True, False, False, False, False, False, True),
                 (True, True, True, False, False, True, False), (True, True, False, True, False, False, False),
                 (True, True, True, True, True, False, False)]


def test_kernels_compile_for_sm90():
    """Every kernel variant the ops launch compiles ahead of time to an sm_90 cubin at the GPU tile shapes,
    with the JIT's alignment specialization (no GPU needed), and none spills registers."""
    out = check_compiles(f"""
    import sslfast.kernels.infonce as K

    ALIGNED = ("D", "stride_r", "stride_c", "stride_dr", "stride_ds", "stride_x", "stride_p", "stride_dxh", "stride_dx",
               "cols_per_split", "M", "NB")
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


@pytest.mark.parametrize("loss", ["nt_xent", "info_nce", "clip"])
def test_autocast_does_not_change_the_op(backend, seed, loss):
    """Inside a bf16 autocast region the losses still compute in their inputs' dtype (same value and
    gradients as outside it): the ops pick their own precision."""
    z1, z2, queue = torch.randn(9, 16), torch.randn(9, 16), torch.randn(13, 16)
    call = {"nt_xent": lambda a, b: sf.nt_xent_loss(a, b, 0.3),
            "info_nce": lambda a, b: sf.info_nce_loss(a, b, queue, 0.3),
            "clip": lambda a, b: sf.clip_loss(a, b, torch.tensor(4.0))}[loss]
    got, (a, _), want, (a0, _) = with_and_without_autocast(call, z1, z2)
    assert got.dtype == torch.float32
    assert_loss_close(got, want, 1e-6, f"loss (seed {seed})")
    assert_close(a.grad, a0.grad, 1e-6, "grad")
