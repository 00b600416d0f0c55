"""SigLIP's pairwise sigmoid loss: forward and every gradient (features, logit_scale, logit_bias) against the
float64 literal reference, on the reference path and on the Triton kernels (interpreted on CPU, real on
`-m gpu`); distributed parity, torch.compile, the module and bad input."""

import math

import pytest
import torch
import torch.nn.functional as F

import sslfast as sf
from sslfast._custom_op import DoubleBackwardError
from sslfast.reference import siglip as ref
from aot_compile import check_compiles
from distributed_harness import run_ranks
from helpers import assert_close, assert_loss_close, leaf, tol

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# D = 48 and 33 take the kernels' chunked path under the interpreter (two output chunks), D = 20 the resident one.
SHAPES = [(37, 48), (5, 33), (9, 20)]
SCALES = [1.0, 10.0, 1e3]
BIASES = [-20.0, -10.0, 5.0]


def _cases():
    """Every shape with every dtype; (scale, bias) in a Latin square, so each dtype sees every scale and every
    bias and the nine cases cover the nine (scale, bias) pairs."""
    for s, (n, d) in enumerate(SHAPES):
        for k, dtype in enumerate(DTYPES):
            t, b = SCALES[(s + k) % 3], BIASES[(2 * s + k) % 3]
            yield pytest.param(n, d, dtype, t, b, id=f"N{n}-D{d}-{str(dtype)[6:]}-t{t:g}-b{b:g}")


def _inputs(n, d, dtype, t, b):
    return torch.randn(n, d).to(dtype), torch.randn(n, d).to(dtype), torch.tensor(t), torch.tensor(b)


def _oracle(x, y, t, b, pos_off=0):
    """The float64 literal loss and its gradients, plus Σ|g_ij c_ij| and Σ|g_ij| (g = ∂L/∂logits): the sums of
    the terms behind ∂L/∂t and ∂L/∂b, which cancel (positives and negatives pull opposite ways)."""
    x64, y64, t64, b64 = (leaf(v, torch.float64) for v in (x, y, t, b))
    loss = ref.siglip_loss(x64, y64, t64, b64, pos_off=pos_off)
    loss.backward()
    cos = F.normalize(x64.detach(), dim=1) @ F.normalize(y64.detach(), dim=1).T
    logits = (t64.detach() * cos + b64.detach()).requires_grad_(True)
    rows, cols = torch.arange(logits.shape[0]), torch.arange(logits.shape[1])
    z = torch.where(cols[None, :] == (rows + pos_off)[:, None], 1.0, -1.0).double()
    (-F.logsigmoid(z * logits).sum() / logits.shape[0]).backward()
    g = logits.grad
    return loss, (x64.grad, y64.grad, t64.grad, b64.grad), ((g * cos).abs().sum().item(), g.abs().sum().item())


def _bound(dtype, t, device="cpu"):
    """Relative bound on the gradients: the dtype's tolerance, or an fp32 logit's own rounding, t·2⁻²⁴ (times a
    few ulps of the dot and the norms), when the scale makes that larger."""
    return max(tol(dtype, device), 8 * t * 2.0**-24)


def _check(loss, grads, want, dtype, t, seed, device="cpu"):
    want_loss, want_grads, (terms_t, terms_b) = want
    assert loss.dtype == torch.float32
    assert_loss_close(loss, want_loss, tol(dtype, device), f"loss (seed {seed})")
    bound = _bound(dtype, t, device)
    for name, got, w in zip(("image_features", "text_features"), grads[:2], want_grads[:2]):
        assert got is not None, f"{name}: no gradient"
        assert_close(got, w, bound, f"{name} grad (seed {seed})")
    for name, got, w, terms in zip(("logit_scale", "logit_bias"), grads[2:], want_grads[2:], (terms_t, terms_b)):
        _assert_scalar_grad(got, w, terms, bound, f"{name} grad (seed {seed})")


def _assert_scalar_grad(got, want, terms: float, bound: float, what: str):
    """∂L/∂t and ∂L/∂b are sums of terms that cancel (positives and negatives pull opposite ways): their error
    is bounded against the size of the terms (`_oracle`'s Σ|g c| and Σ|g|), not of the sum, whose relative
    error is ill-conditioned (1.5e-5 at one seed of a 1e-5 relative check, in CI)."""
    assert got is not None and torch.isfinite(got).all(), f"{what}: no gradient"
    err = abs(got.item() - want.item())
    limit = max(bound * terms, torch.finfo(torch.float32).tiny)
    assert err <= limit, f"{what}: error {err:.3g} > {limit:.3g} (terms {terms:.3g})"


# ------------------------------------------------------------------------------------------ correctness
@pytest.mark.parametrize("n,d,dtype,t,b", list(_cases()))
def test_siglip(backend, seed, n, d, dtype, t, b):
    x, y, ts, bs = _inputs(n, d, dtype, t, b)
    leaves = [leaf(v) for v in (x, y, ts, bs)]
    loss = sf.siglip_loss(*leaves)
    loss.backward()
    _check(loss, [v.grad for v in leaves], _oracle(x, y, ts, bs), dtype, t, seed)


@pytest.mark.parametrize(
    "needs",
    [(True, True, True, True), (False, True, False, False), (True, False, False, True), (False, False, True, False)],
    ids=["all", "text", "image+bias", "scale"],
)
def test_separate_backward_and_partial_grads(backend, seed, needs):
    """The custom op's own backward (`separate_backward`), with only some inputs requiring gradients (each pass
    and output is then skipped or kept), against the gradients of the fused eager call and the oracle."""
    x, y, ts, bs = _inputs(5, 33, torch.float32, 10.0, -10.0)
    want_loss, want_grads, terms = _oracle(x, y, ts, bs)
    for separate in (True, False):
        leaves = [v.clone().requires_grad_(need) for v, need in zip((x, y, ts, bs), needs)]
        if separate:
            with sf.separate_backward():
                loss = sf.siglip_loss(*leaves)
                loss.backward()
        else:
            loss = sf.siglip_loss(*leaves)
            loss.backward()
        assert_loss_close(loss, want_loss, 1e-5, f"loss (seed {seed})")
        for k, (name, v, w, need) in enumerate(zip(("img", "txt", "scale", "bias"), leaves, want_grads, needs)):
            what = f"{name} grad, separate={separate} (seed {seed})"
            if not need:
                assert v.grad is None
            elif k < 2:
                assert_close(v.grad, w, 1e-5, what)
            else:
                _assert_scalar_grad(v.grad, w, terms[k - 2], 1e-5, what)
    with torch.no_grad():
        assert_loss_close(sf.siglip_loss(x, y, ts, bs), want_loss, 1e-5, f"no-grad loss (seed {seed})")


def test_separate_backward_upstream_gradient(backend, seed):
    """An upstream gradient other than 1 reaches every input gradient (the custom op's weight = g / N)."""
    x, y, ts, bs = _inputs(5, 20, torch.float32, 3.0, -2.0)
    _, want_grads, terms = _oracle(x, y, ts, bs)
    leaves = [leaf(v) for v in (x, y, ts, bs)]
    with sf.separate_backward():
        (-2.5 * sf.siglip_loss(*leaves)).backward()
    for v, w in zip(leaves[:2], want_grads[:2]):
        assert_close(v.grad, -2.5 * w, 1e-5, f"scaled grad (seed {seed})")
    for v, w, t in zip(leaves[2:], want_grads[2:], terms):
        _assert_scalar_grad(v.grad, -2.5 * w, 2.5 * t, 1e-5, f"scaled scalar grad (seed {seed})")


@pytest.mark.parametrize("t,b", [(1e5, -1e4), (1e5, 1e4), (1e-3, 50.0), (-30.0, 0.0)])
def test_extreme_scale_and_bias(backend, seed, t, b):
    """Any finite t and b: no overflow in exp, no log of 0, no NaN, and the loss and gradients still match.
    The texts are near copies of the images, so positives and negatives sit far apart at large t."""
    x = torch.randn(7, 20)
    y = x + 0.1 * torch.randn(7, 20)
    ts, bs = torch.tensor(t), torch.tensor(b)
    leaves = [leaf(v) for v in (x, y, ts, bs)]
    loss = sf.siglip_loss(*leaves)
    loss.backward()
    want_loss, want_grads, (terms_t, terms_b) = _oracle(x, y, ts, bs)
    assert_loss_close(loss, want_loss, max(1e-5, 8 * abs(t) * 2.0**-24), f"loss (seed {seed})")
    bound = max(1e-5, 8 * abs(t) * 2.0**-24)
    for name, v, w in zip(("img", "txt"), leaves, want_grads):
        assert_close(v.grad, w, bound, f"{name} grad (seed {seed})")
    for name, v, w, terms in zip(("scale", "bias"), leaves[2:], want_grads[2:], (terms_t, terms_b)):
        assert abs(v.grad.item() - w.item()) <= max(bound * terms, 1e-30), f"{name} grad (seed {seed})"


def test_noncontiguous_and_shaped_scalars(backend, seed):
    """Strided feature views, and scale / bias of shape [1] in float64 (the gradient keeps their shape and dtype)."""
    z = torch.randn(11, 2 * 24)
    x, y = z[:, ::2], z[:, 1::2]
    ts = torch.tensor([4.0], dtype=torch.float64, requires_grad=True)
    bs = torch.tensor([-3.0], dtype=torch.float64, requires_grad=True)
    loss = sf.siglip_loss(x, y, ts, bs)
    loss.backward()
    want_loss, want_grads, _ = _oracle(x, y, ts.detach(), bs.detach())
    assert_loss_close(loss, want_loss, 1e-5, f"loss (seed {seed})")
    assert ts.grad.shape == (1,) and ts.grad.dtype == torch.float64
    assert_close(ts.grad, want_grads[2].reshape(1), 1e-5, "scale grad")
    assert_close(bs.grad, want_grads[3].reshape(1), 1e-5, "bias grad")


def test_float64_reference_path(seed, monkeypatch):
    """float64 runs on the reference path, to float64 accuracy, and gradcheck passes."""
    monkeypatch.setenv("SSLFAST_BACKEND", "reference")
    x, y = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    ts, bs = torch.tensor(2.0, dtype=torch.float64), torch.tensor(-1.0, dtype=torch.float64)
    want_loss, _, _ = _oracle(x, y, ts, bs)
    assert abs(sf.siglip_loss(x, y, ts, bs).item() - want_loss.item()) < 1e-12 * abs(want_loss.item())
    with sf.separate_backward():  # gradcheck backpropagates through one graph several times
        assert torch.autograd.gradcheck(sf.siglip_loss, [leaf(v) for v in (x, y, ts, bs)])


def test_double_backward(backend, seed):
    """create_graph=True: differentiable again on the reference path, a clear error on the kernels."""
    x, y, ts, bs = _inputs(4, 6, torch.float32, 2.0, -1.0)
    a, b_, t_, bias = (leaf(v) for v in (x, y, ts, bs))
    loss = sf.siglip_loss(a, b_, t_, bias)
    if backend == "triton":
        with pytest.raises(DoubleBackwardError, match="siglip"):
            torch.autograd.grad(loss, a, create_graph=True)
        return
    (g,) = torch.autograd.grad(loss, a, create_graph=True)
    g.square().sum().backward()
    a64, b64, t64, bias64 = (leaf(v, torch.float64) for v in (x, y, ts, bs))
    (g64,) = torch.autograd.grad(ref.siglip_loss(a64, b64, t64, bias64), a64, create_graph=True)
    g64.square().sum().backward()
    assert_close(a.grad, a64.grad, 1e-5, "second derivative")
    assert_close(t_.grad, t64.grad, 1e-5, "mixed second derivative")


def test_autocast_is_ignored(seed):
    """Inside a bf16 autocast region the op keeps its own precision (fp32 inputs stay fp32)."""
    x, y, ts, bs = _inputs(5, 20, torch.float32, 10.0, -10.0)
    want = sf.siglip_loss(x, y, ts, bs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = sf.siglip_loss(x, y, ts, bs)
    assert got.dtype == torch.float32 and torch.equal(got, want)


# ------------------------------------------------------------------------------------------ module
def test_module(seed):
    x, y = torch.randn(6, 10), torch.randn(6, 10)
    loss_fn = sf.nn.SigLIPLoss()
    assert loss_fn.logit_scale.item() == pytest.approx(math.log(10.0)) and loss_fn.logit_bias.item() == -10.0
    a, b = leaf(x), leaf(y)
    loss = loss_fn(a, b)
    loss.backward()
    want_loss, want_grads, (terms_t, terms_b) = _oracle(x, y, torch.tensor(10.0), torch.tensor(-10.0))
    assert_loss_close(loss, want_loss, 1e-5, "module loss")
    assert_close(a.grad, want_grads[0], 1e-5, "module image grad")
    _assert_scalar_grad(loss_fn.logit_scale.grad, want_grads[2] * 10.0, terms_t * 10.0, 1e-5, "d/d log t = t · d/dt")
    _assert_scalar_grad(loss_fn.logit_bias.grad, want_grads[3], terms_b, 1e-5, "logit_bias grad")
    # open_clip's call: the model's own (exponentiated) scale and bias, and output_dict
    out = loss_fn(x, y, torch.tensor(3.0), torch.tensor(-1.0), output_dict=True)
    assert_loss_close(out["contrastive_loss"], ref.siglip_loss(x.double(), y.double(), 3.0, -1.0), 1e-5, "dict")
    with pytest.raises(ValueError, match="dist_impl"):
        sf.nn.SigLIPLoss(dist_impl="ring")
    with pytest.raises(ValueError, match="rank"):
        sf.nn.SigLIPLoss(rank=2, world_size=2)
    with pytest.raises(ValueError, match="world_size"):
        sf.nn.SigLIPLoss(rank=0, world_size=2)(x, y)  # no process group of 2


# ------------------------------------------------------------------------------------------ compile
def test_torch_compile(backend, seed):
    """A training step with the loss compiles whole (the custom ops' fake implementations) and matches eager."""

    def step(x, y, log_t, b):
        return sf.siglip_loss(x * 2.0, y, log_t.exp(), b)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x, y, ts, bs = _inputs(7, 20, torch.float32, math.log(10.0), -10.0)
    got_leaves, want_leaves = [leaf(v) for v in (x, y, ts, bs)], [leaf(v) for v in (x, y, ts, bs)]
    got = compiled(*got_leaves)
    got.backward()
    want = step(*want_leaves)
    want.backward()
    assert_loss_close(got, want, 1e-6, "compiled loss")
    for g, w in zip(got_leaves, want_leaves):
        assert_close(g.grad, w.grad, 1e-6, "compiled grad")


def test_opcheck(backend, seed):
    """torch.library.opcheck on the ops torch.compile traces: schema, fake implementations, autograd."""
    from sslfast.ops import siglip as ops_siglip

    x, y, ts, bs = (leaf(v) for v in _inputs(5, 20, torch.float32, 10.0, -10.0))
    torch.library.opcheck(ops_siglip.siglip_forward.custom_op, (x, y, ts, bs, 0))
    rn = torch.rand(5) + 0.5
    torch.library.opcheck(
        ops_siglip.siglip_backward.custom_op,
        (x.detach(), y.detach(), ts.detach(), bs.detach(), rn, rn, torch.tensor(0.2), 0, True, True, True),
    )


# ------------------------------------------------------------------------------------------ bad input
def _bad_cases():
    x, y, t, b = torch.randn(4, 8), torch.randn(4, 8), torch.tensor(1.0), torch.tensor(0.0)
    yield "img-1d", (x[0], y, t, b), ValueError, "image_features"
    yield "txt-3d", (x, y[None], t, b), ValueError, "text_features"
    yield "n-mismatch", (x, y[:3], t, b), ValueError, "same shape"
    yield "d-mismatch", (x, y[:, :7], t, b), ValueError, "same shape"
    yield "int-features", (x.long(), y, t, b), TypeError, "image_features"
    yield "dtype-mismatch", (x, y.half(), t, b), TypeError, "dtype"
    yield "empty", (x[:0], y[:0], t, b), ValueError, "non-empty"
    yield "scale-float", (x, y, 10.0, b), TypeError, "logit_scale"
    yield "bias-none", (x, y, t, None), TypeError, "logit_bias"
    yield "scale-2", (x, y, torch.ones(2), b), ValueError, "logit_scale"
    yield "bias-empty", (x, y, t, torch.ones(0)), ValueError, "logit_bias"
    yield "scale-int", (x, y, torch.tensor(3), b), TypeError, "logit_scale"
    yield "scale-nan", (x, y, torch.tensor(float("nan")), b), ValueError, "logit_scale"
    yield "bias-inf", (x, y, t, torch.tensor(float("-inf"))), ValueError, "logit_bias"
    yield "scale-meta", (x, y, torch.tensor(1.0, device="meta"), b), ValueError, "logit_scale"


@pytest.mark.parametrize("args,error,match", [pytest.param(*c[1:], id=c[0]) for c in _bad_cases()])
def test_bad_input(backend, args, error, match, monkeypatch):
    from sslfast.kernels import siglip as K

    def no_launch(*a, **k):
        raise AssertionError("a kernel ran before validation")

    monkeypatch.setattr(K, "siglip_rows", no_launch)
    with pytest.raises(error, match=match):
        sf.siglip_loss(*args)


def test_float64_refused_on_kernels(monkeypatch):
    monkeypatch.setenv("SSLFAST_BACKEND", "triton")
    x = torch.randn(3, 4, dtype=torch.float64)
    with pytest.raises(TypeError, match="image_features"):
        sf.siglip_loss(x, x, torch.tensor(1.0), torch.tensor(0.0))


# ------------------------------------------------------------------------------------------ distributed
def _rank_siglip(rank, world, n, d, seed, use_module):
    torch.manual_seed(seed)
    x, y = torch.randn(world * n, d), torch.randn(world * n, d)
    rows = slice(rank * n, (rank + 1) * n)
    a, b = leaf(x[rows]), leaf(y[rows])
    if use_module:
        loss_fn = sf.nn.SigLIPLoss(rank=rank, world_size=world, init_logit_scale=math.log(3.0), init_logit_bias=-2.0)
        loss = loss_fn(a, b)
        loss.backward()
        return loss.item(), a.grad, b.grad, loss_fn.logit_scale.grad / 3.0, loss_fn.logit_bias.grad
    t, bias = torch.tensor(3.0, requires_grad=True), torch.tensor(-2.0, requires_grad=True)
    loss = sf.siglip_loss(a, b, t, bias, gather_distributed=True)
    loss.backward()
    return loss.item(), a.grad, b.grad, t.grad, bias.grad


@pytest.mark.slow
@pytest.mark.parametrize("use_module", [False, True], ids=["function", "module"])
def test_gather_distributed_matches_single_process(backend, seed, use_module):
    """2 gloo ranks: the ranks' losses average to the whole batch's loss, and every gradient, after DDP's
    average over ranks, equals the single-process gradient (no world_size factor)."""
    world, n, d = 2, 3, 10
    ranks = run_ranks(world, _rank_siglip, n, d, seed, use_module)
    torch.manual_seed(seed)
    x, y = torch.randn(world * n, d), torch.randn(world * n, d)
    want_loss, (gx, gy, gt, gb), (terms_t, terms_b) = _oracle(x, y, torch.tensor(3.0), torch.tensor(-2.0))
    assert sum(r[0] for r in ranks) / world == pytest.approx(want_loss.item(), rel=1e-5)
    for rank, (_, ga, gb_, _, _) in enumerate(ranks):
        rows = slice(rank * n, (rank + 1) * n)
        assert_close(ga / world, gx[rows], 1e-5, f"rank {rank} image grad (seed {seed})")
        assert_close(gb_ / world, gy[rows], 1e-5, f"rank {rank} text grad (seed {seed})")
    # ∂L/∂t and ∂L/∂b are sums of terms that cancel: their error is bounded against the terms' size (as `_check`)
    for name, got, want, terms in (
        ("logit_scale", sum(r[3] for r in ranks) / world, gt, terms_t),
        ("logit_bias", sum(r[4] for r in ranks) / world, gb, terms_b),
    ):
        err = abs(float(got) - want.item())
        assert err <= 1e-5 * terms, f"{name} grad (seed {seed}): error {err:.3g} > 1e-5 · {terms:.3g}"


# ------------------------------------------------------------------------------------------ sm_90 compile
def test_kernel_compiles_for_sm90():
    """Every variant the op launches (forward; eager row pass; backward row pass; column pass) compiles ahead of
    time to an sm_90 cubin at the GPU tiles, resident and chunked rows, for each input dtype, without
    register spills (no GPU needed)."""
    out = check_compiles("""
    import sslfast.kernels.siglip as K

    ALIGNED = ("D", "stride_r", "stride_c", "stride_dr")
    FLAGS = [(True, False, False), (True, True, True), (False, True, True), (False, True, False)]
    for dt in ("bf16", "fp16", "fp32"):
        ptrs = dict(R="*" + dt, C="*" + dt, RN_R="*fp32", RN_C="*fp32", SCALE="*fp32", BIAS="*fp32",
                    WEIGHT="*fp32", LOSS="*fp32", DR="*fp32", DSCALE="*fp32", DBIAS="*fp32")
        for d in (128, 768):
            t = K._tiles(d)
            warps, stages = t.pop("num_warps"), t.pop("num_stages")
            for loss, grad, scalars in FLAGS if dt != "fp16" else FLAGS[1:2]:  # fp16: as fp32 but the logits' dot
                build(K._siglip_rows_kernel, ptrs, dict(t, WANT_LOSS=loss, WANT_GRAD=grad, WANT_SCALARS=scalars,
                                                        G_FP32=dt != "bf16", UPCAST=False), warps, stages,
                      aligned=ALIGNED)
    """)
    built = [line for line in out.splitlines() if line.startswith('{"kernel"')]
    assert len(built) == 18, out
    spills = [line for line in built if '"spills": 0,' not in line]
    assert not spills, "register spills:\n" + "\n".join(spills[:10])


# ------------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.parametrize(
    "n,d,dtype",
    [
        (4096, 768, torch.bfloat16),
        (4097, 512, torch.bfloat16),
        (2048, 256, torch.float16),
        (1000, 96, torch.float32),
        (1000, 768, torch.float32),
    ],
)
def test_gpu_sweep(seed, n, d, dtype):
    """The real kernels at realistic sizes (the paper's t = 10, b = −10) against the float64 reference."""
    dev = "cuda"
    x, y = torch.randn(n, d, device=dev).to(dtype), torch.randn(n, d, device=dev).to(dtype)
    ts, bs = torch.tensor(10.0, device=dev), torch.tensor(-10.0, device=dev)
    leaves = [leaf(v) for v in (x, y, ts, bs)]
    loss = sf.siglip_loss(*leaves)
    loss.backward()
    _check(loss, [v.grad for v in leaves], _oracle(x, y, ts, bs), dtype, 10.0, seed, dev)
    with sf.separate_backward():
        sep = [leaf(v) for v in (x, y, ts, bs)]
        sf.siglip_loss(*sep).backward()
    for g, w in zip(sep, leaves):
        assert_close(g.grad, w.grad, tol(dtype, dev), f"separate backward (seed {seed})")
