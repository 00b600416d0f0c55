"""Contrastive losses at large inverse temperatures: CLIP's learned `logit_scale` from 1 to 1e5 (and negative),
NT-Xent and InfoNCE at τ = 1e-3 and 1e-4, against float64 formulas written out here, on both backends.

Past |scale| ≈ 333 a column's largest logit can sit so far under |scale| that the kernels' fp64 column sums
underflow; those columns must be recomputed rather than reported as −inf (half the loss, NaN gradients).

Tolerances: an fp32 logit s carries an absolute error of a few ulps, ~|s|·2⁻²³, and exp() turns it into that
relative error of each softmax weight, so gradients are compared at max(dtype tolerance, 8·|scale|·2⁻²⁴).
"""

import contextlib

import pytest
import torch
import torch.nn.functional as F

import sslfast as sf
from helpers import assert_close, assert_loss_close, leaf, tol

SCALES = [1.0, 1e2, 1e3, 1e4, 1e5]


def _bound(dtype, scale: float) -> float:
    return max(tol(dtype), 8 * abs(scale) * 2.0**-24)


def _cross_entropy64(logits: torch.Tensor, target: torch.Tensor, exclude_self: bool = False) -> torch.Tensor:
    """mean_i −log softmax(logits_i)[target_i] as mean_i softplus(logsumexp(negatives_i) − positive_i): no
    1 − softmax cancellation, so tiny row losses keep their gradients. `exclude_self` drops j = i."""
    rows = torch.arange(logits.shape[0])
    pos = logits[rows, target]
    drop = torch.zeros(logits.shape, dtype=torch.bool)
    drop[rows, target] = True
    if exclude_self:
        drop[rows, rows] = True
    return F.softplus(torch.logsumexp(logits.masked_fill(drop, float("-inf")), dim=1) - pos).mean()


def _clip64(img, txt, scale):
    logits = scale * F.normalize(img, dim=1) @ F.normalize(txt, dim=1).T
    target = torch.arange(logits.shape[0])
    return (_cross_entropy64(logits, target) + _cross_entropy64(logits.T, target)) / 2


def _run_clip(img, txt, scale, dtype, *, gather_distributed=False, separate=False):
    """(loss, grads) of sf.clip_loss on fp32/bf16/fp16 leaves (inside `sf.separate_backward()` if `separate`),
    and of the float64 formula on the same values."""
    a, b, s = leaf(img, dtype), leaf(txt, dtype), torch.tensor(scale, requires_grad=True)
    with sf.separate_backward() if separate else contextlib.nullcontext():
        loss = sf.clip_loss(a, b, s, gather_distributed=gather_distributed)
    loss.backward()
    a64, b64 = leaf(a, torch.float64), leaf(b, torch.float64)
    s64 = torch.tensor(scale, dtype=torch.float64, requires_grad=True)
    want = _clip64(a64, b64, s64)
    want.backward()
    return (loss, a.grad, b.grad, s.grad), (want, a64.grad, b64.grad, s64.grad), (a64, b64)


def _check_clip(got, want, inputs, dtype, scale, seed):
    what = f"scale {scale:g}, seed {seed}"
    assert_loss_close(got[0], want[0], tol(dtype), f"loss ({what})")
    bound = _bound(dtype, scale)
    assert_close(got[1], want[1], bound, f"image grad ({what})")
    assert_close(got[2], want[2], bound, f"text grad ({what})")
    # ∂L/∂scale = Σ G∘cos cancels (each row of G sums to 0): its error is bounded relative to Σ|G∘cos|.
    a64, b64 = (x.detach() for x in inputs)
    cos = F.normalize(a64, dim=1) @ F.normalize(b64, dim=1).T
    logits = (scale * cos).requires_grad_(True)
    target = torch.arange(cos.shape[0])
    ((_cross_entropy64(logits, target) + _cross_entropy64(logits.T, target)) / 2).backward()
    terms = (logits.grad * cos).abs().sum().item()
    assert torch.isfinite(got[3]), f"logit_scale grad ({what}): {got[3].item()}"
    err = abs(got[3].item() - want[3].item())
    assert err <= max(bound * terms, 1e-30), f"logit_scale grad ({what}): error {err:.3g}, Σ|G∘cos| = {terms:.3g}"


# ------------------------------------------------------------------------------------------ CLIP
@pytest.mark.parametrize("scale", SCALES + [-1e3])
@pytest.mark.parametrize("n", [8, 37])
def test_clip_large_logit_scale(backend, seed, n, scale):
    """Random features at D = 48: every column's largest cosine is ~0.5, so from 1e3 on every column's fp64
    sum underflows and must be recomputed. A negative scale puts the reference at |scale|."""
    img, txt = torch.randn(n, 48), torch.randn(n, 48)
    got, want, inputs = _run_clip(img, txt, scale, torch.float32)
    _check_clip(got, want, inputs, torch.float32, scale, seed)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scale", [1e3, 1e4])
def test_clip_large_logit_scale_half_inputs(backend, seed, dtype, scale):
    img, txt = torch.randn(37, 48), torch.randn(37, 48)
    got, want, inputs = _run_clip(img, txt, scale, dtype)
    _check_clip(got, want, inputs, dtype, scale, seed)


@pytest.mark.parametrize("separate", [False, True], ids=["grad_in_forward", "separate_backward"])
@pytest.mark.parametrize("gather", [False, True], ids=["local", "gathered"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale", [0.0, 1e-30, -1e-30])
def test_clip_zero_logit_scale(backend, seed, monkeypatch, scale, dtype, gather, separate):
    """logit_scale = 0 is legal: every logit is 0, the loss is log N, and ∂L/∂scale = Σ_ij G_ij·â_i·b̂_j =
    (Σ_i â_i)·(Σ_j b̂_j)/N² − Σ_i â_i·b̂_i/N is finite; it must not come out as (Σ G∘S)/scale = 0/0. A tiny
    scale of either sign sits next to it. `gathered` runs the all-gathered path (rows against all columns,
    twice) on one process: a world of 2 whose all-gather returns the local rows, which is then the same loss."""
    if gather:
        import sslfast.ops.infonce as ops_infonce

        monkeypatch.setattr(ops_infonce, "rank_and_world", lambda: (0, 2))
        monkeypatch.setattr(ops_infonce, "all_gather", lambda x: x)
    img, txt = torch.randn(13, 20), torch.randn(13, 20)
    got, want, inputs = _run_clip(img, txt, scale, dtype, gather_distributed=gather, separate=separate)
    _check_clip(got, want, inputs, dtype, scale, seed)
    if scale == 0.0:
        a64, b64 = (F.normalize(x.detach(), dim=1) for x in inputs)
        closed = a64.sum(0) @ b64.sum(0) / 13**2 - (a64 * b64).sum() / 13
        assert abs(want[3].item() - closed.item()) < 1e-12, "the float64 formula's ∂L/∂scale at scale 0"


@pytest.mark.parametrize("scale", [0.0, -1e-30, 3.0])
def test_queue_positive_logit_scale_grad(backend, seed, scale):
    """The queue form (positive q̂_i·k̂_i scored in the row-norm pass, `pair_normalize_backward`) with a scale
    that requires grad, against float64 autograd: ∂pos_i/∂scale comes from the rows, not pos_i/scale."""
    from sslfast.ops.infonce import _contrastive
    from sslfast.ops.infonce_spec import _QUEUE_SPECS

    n, k, d = 11, 17, 24
    q, key, queue = torch.randn(n, d), torch.randn(n, d), torch.randn(k, d)
    a, b, s = leaf(q), leaf(key), torch.tensor(scale, requires_grad=True)
    loss = _contrastive(a, queue, b, s, _QUEUE_SPECS[False])
    loss.backward()
    a64, b64, s64 = leaf(q, torch.float64), leaf(key, torch.float64), leaf(torch.tensor(scale, dtype=torch.float64))
    qh, kh = F.normalize(a64, dim=1), F.normalize(b64, dim=1)
    logits = torch.cat([(qh * kh).sum(1, keepdim=True), qh @ F.normalize(queue.double(), dim=1).T], dim=1)
    want = _cross_entropy64(s64 * logits, torch.zeros(n, dtype=torch.long))
    want.backward()
    what = f"scale {scale:g}, seed {seed}"
    assert_loss_close(loss, want, tol(torch.float32), f"loss ({what})")
    assert_close(a.grad, a64.grad, tol(torch.float32), f"query grad ({what})")
    assert_close(b.grad, b64.grad, tol(torch.float32), f"key grad ({what})")
    assert torch.isfinite(s.grad), f"logit_scale grad ({what}): {s.grad.item()}"
    got, want = s.grad.item(), s64.grad.item()
    assert abs(got - want) < 1e-5, f"logit_scale grad ({what}): {got} vs {want}"


def test_clip_some_columns_underflow(backend, seed):
    """Columns 0..15 (the interpreter's first tile of rows in the recompute) each have a negative at cosine
    ~1 and keep their fp64 sums, as does column 30; the others underflow at scale 1e4. Row blocks without an
    underflowed column skip the recompute, the others recompute only those columns."""
    n, d = 37, 48
    img = torch.randn(n, d)
    txt = torch.randn(n, d)
    near = list(range(16)) + [30]
    txt[near] = img[[(j + 1) % n for j in near]] + 1e-3 * torch.randn(len(near), d)
    got, want, inputs = _run_clip(img, txt, 1e4, torch.float32)
    _check_clip(got, want, inputs, torch.float32, 1e4, seed)


def test_column_statistics_core_with_index_maps(seed):
    """The column log-sum-exps of the core op at scale 2000 on a rank's view of a gathered batch (shifted rows,
    two segments, NT-Xent pairing and self-exclusion): the recompute runs with the index maps swapped."""
    from sslfast._backend import interpreting
    from sslfast.kernels import infonce as kern
    from sslfast.ops._torch import infonce as T
    from sslfast.ops.infonce import IndexMaps

    if not interpreting():
        pytest.skip("interpreter-only")
    n, world, rank, d = 5, 3, 1, 20
    big = n * world
    a, b = torch.randn(2 * n, d), torch.randn(2 * big, d)
    b[rank * n : (rank + 1) * n] = a[:n]
    b[big + rank * n : big + (rank + 1) * n] = a[n:]
    scale = torch.tensor(2000.0)
    maps = IndexMaps(row_off=rank * n, row_split=n, row_shift=big - n, pos_shift=big, pos_period=2 * big)
    kw = dict(exclude_self=True, want_pos=True, col_stats=True, bounded=False)
    a64, b64 = a.double(), b.double()
    want = T.similarity_lse(a64, b64, T.row_rnorm(a64), T.row_rnorm(b64), scale.double(), maps, **kw)
    got = kern.similarity_lse(a, b, kern.row_rnorm(a), kern.row_rnorm(b), scale, maps, **kw)
    for name, g, w in zip(("lse_r", "lse_c", "pos"), got, want):
        assert torch.equal(g.isinf(), w.isinf()), f"{name}: infinities differ (seed {seed})"
        finite = w.isfinite()
        assert_close(g[finite], w[finite], 1e-6, f"{name} (seed {seed})")


# ------------------------------------------------------------------------------------------ NT-Xent, InfoNCE
@pytest.mark.parametrize("temperature", [1e-3, 1e-4])
def test_nt_xent_tiny_temperature(backend, seed, temperature):
    n = 19
    z1, z2 = torch.randn(n, 48), torch.randn(n, 48)
    a, b = leaf(z1), leaf(z2)
    loss = sf.nt_xent_loss(a, b, temperature)
    loss.backward()
    a64, b64 = leaf(z1, torch.float64), leaf(z2, torch.float64)
    z = F.normalize(torch.cat([a64, b64]), dim=1)
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    want = _cross_entropy64(z @ z.T / temperature, target, exclude_self=True)
    want.backward()
    what = f"τ {temperature:g}, seed {seed}"
    assert_loss_close(loss, want, tol(torch.float32), f"loss ({what})")
    bound = _bound(torch.float32, 1 / temperature)
    assert_close(a.grad, a64.grad, bound, f"z1 grad ({what})")
    assert_close(b.grad, b64.grad, bound, f"z2 grad ({what})")


@pytest.mark.parametrize("queue_size", [None, 23])
@pytest.mark.parametrize("temperature", [1e-3, 1e-4])
def test_info_nce_tiny_temperature(backend, seed, temperature, queue_size):
    n, d = 19, 48
    q, k = torch.randn(n, d), torch.randn(n, d)
    queue = None if queue_size is None else torch.randn(queue_size, d)
    a, b = leaf(q), leaf(k)
    loss = sf.info_nce_loss(a, b, queue, temperature)
    loss.backward()
    a64, b64 = leaf(q, torch.float64), leaf(k, torch.float64)
    qh, kh = F.normalize(a64, dim=1), F.normalize(b64, dim=1)
    if queue is None:
        want = _cross_entropy64(qh @ kh.T / temperature, torch.arange(n))
    else:
        logits = torch.cat([(qh * kh).sum(1, keepdim=True), qh @ F.normalize(queue.double(), dim=1).T], dim=1)
        want = _cross_entropy64(logits / temperature, torch.zeros(n, dtype=torch.long))
    want.backward()
    what = f"τ {temperature:g}, queue {queue_size}, seed {seed}"
    assert_loss_close(loss, want, tol(torch.float32), f"loss ({what})")
    bound = _bound(torch.float32, 1 / temperature)
    assert_close(a.grad, a64.grad, bound, f"query grad ({what})")
    assert_close(b.grad, b64.grad, bound, f"key grad ({what})")


# ------------------------------------------------------------------------------------------ compile
def test_recompute_kernel_compiles_for_sm90():
    """The column recompute (`_lse_redo_kernel`) compiles to sm_90 cubins at the forward's GPU tile shapes
    without register spills."""
    from aot_compile import check_compiles

    out = check_compiles("""
    import sslfast.kernels.infonce as K

    ALIGNED = ("D", "stride_r", "stride_c", "M", "NB")
    for dt in ("bf16", "fp16"):
        ptrs = dict(R="*" + dt, C="*" + dt, RN_R="*fp32", RN_C="*fp32", SCALE="*fp32", LSE="*fp32",
                    COL_ACC="*fp64")
        for one in (True, False):
            bd = 128 if one else 64
            t = dict(K.gpu_tiles("fwd", one, False, bd), BLOCK_D=bd, ONE_CHUNK=one, UPCAST=False)
            warps, stages = t.pop("num_warps"), t.pop("num_stages")
            build(K._lse_redo_kernel, ptrs, dict(t, EXCLUDE_SELF=False, WANT_POS=True), warps, stages,
                  aligned=ALIGNED)
    """)
    built = [line for line in out.splitlines() if line.startswith('{"kernel"')]
    assert len(built) == 4, out
    spills = [line for line in built if '"spills": 0,' not in line]
    assert not spills, "register spills:\n" + "\n".join(spills)
