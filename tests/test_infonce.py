"""NT-Xent, InfoNCE (MoCo) and CLIP: forward and every gradient against the float64 literal reference, on
the PyTorch path and on the Triton kernels (interpreted on CPU, real on `-m gpu`); the modules, bad input,
gradients in the forward, memory and the distributed losses. The core op's kernels are in
test_infonce_kernels.py, torch.compile in test_infonce_compile.py."""

import itertools
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import sslfast as sf
from sslfast.reference import infonce as ref
from distributed_harness import run_ranks
from helpers import assert_close, assert_loss_close, leaf, tol, with_and_without_autocast

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
    bound = max(max(tol(dtype), 2 * logit_scale * 2.0**-24) * terms, torch.finfo(torch.float32).tiny)
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
    assert_loss_close(
        sf.nn.CLIPLoss()(img, txt, s), ref.clip_loss(img.double(), txt.double(), s.double()), 1e-5, f"seed {seed}"
    )


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "call,match",
    [
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
    ],
)
def test_bad_input(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


_LOSSES = {
    "nt_xent": lambda a, b, s: sf.nt_xent_loss(a, b, 0.3),
    "moco_v3": lambda a, b, s: sf.info_nce_loss(a, b, None, 0.2),
    "moco_queue": lambda a, b, s: sf.info_nce_loss(a, b, _QUEUE, 0.2),
    "clip": lambda a, b, s: sf.clip_loss(a, b, s),
}
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
    out = subprocess.run(
        [sys.executable, "-c", _RSS_SCRIPT.format(n=12000)],
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "SSLFAST_BACKEND": "reference"},
        timeout=600,
    )
    assert out.returncode == 0, out.stderr
    extra_mib = float(out.stdout.strip().splitlines()[-1])
    assert extra_mib <= 512, f"peak RSS grew by {extra_mib:.0f} MiB"


# ------------------------------------------------------------------------------------------ distributed
def _rank_losses(rank, world, loss_name, n, d, seed):
    torch.manual_seed(seed)
    x1, x2 = torch.randn(world * n, d), torch.randn(world * n, d)
    s = torch.tensor(3.0, requires_grad=True)
    a, b = leaf(x1[rank * n : (rank + 1) * n]), leaf(x2[rank * n : (rank + 1) * n])
    loss = {
        "nt_xent": lambda: sf.nt_xent_loss(a, b, 0.3, gather_distributed=True),
        "info_nce": lambda: sf.info_nce_loss(a, b, None, 0.3, gather_distributed=True),
        "clip": lambda: sf.clip_loss(a, b, s, gather_distributed=True),
    }[loss_name]()
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
    a, b, s = (
        leaf(x1, torch.float64),
        leaf(x2, torch.float64),
        torch.tensor(3.0, dtype=torch.float64, requires_grad=True),
    )
    want = {
        "nt_xent": lambda: ref.nt_xent_loss(a, b, 0.3),
        "info_nce": lambda: ref.info_nce_loss(a, b, None, 0.3),
        "clip": lambda: ref.clip_loss(a, b, s),
    }[loss_name]()
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
@pytest.mark.parametrize(
    "n,d,dtype",
    [
        (4096, 128, torch.float32),
        (4096, 128, torch.bfloat16),
        (4096, 128, torch.float16),
        (4097, 96, torch.bfloat16),
        (16384, 128, torch.bfloat16),
        (1000, 384, torch.float32),
    ],
)
def test_gpu_sweep(seed, dtype, n, d):
    """The real kernels at realistic sizes against the float64 reference (on the GPU)."""
    dev = "cuda"
    z1, z2 = torch.randn(n, d, device=dev, dtype=dtype), torch.randn(n, d, device=dev, dtype=dtype)
    s = torch.tensor(14.3, device=dev)
    queue = F.normalize(torch.randn(4099, d, device=dev), dim=1).to(dtype)
    checks = {
        "nt_xent": (lambda x, y, sc: sf.nt_xent_loss(x, y, 0.1), lambda x, y, sc: ref.nt_xent_loss(x, y, 0.1)),
        "moco_v3": (
            lambda x, y, sc: sf.info_nce_loss(x, y, None, 0.2),
            lambda x, y, sc: ref.info_nce_loss(x, y, None, 0.2),
        ),
        "moco_queue": (
            lambda x, y, sc: sf.info_nce_loss(x, y, queue, 0.2),
            lambda x, y, sc: ref.info_nce_loss(x, y, queue.double(), 0.2),
        ),
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


@pytest.mark.parametrize("loss", ["nt_xent", "info_nce", "clip"])
def test_autocast_does_not_change_the_op(backend, seed, loss):
    """Inside a bf16 autocast region the losses still compute in their inputs' dtype (same value and
    gradients as outside it): the ops pick their own precision."""
    z1, z2, queue = torch.randn(9, 16), torch.randn(9, 16), torch.randn(13, 16)
    call = {
        "nt_xent": lambda a, b: sf.nt_xent_loss(a, b, 0.3),
        "info_nce": lambda a, b: sf.info_nce_loss(a, b, queue, 0.3),
        "clip": lambda a, b: sf.clip_loss(a, b, torch.tensor(4.0)),
    }[loss]
    got, (a, _), want, (a0, _) = with_and_without_autocast(call, z1, z2)
    assert got.dtype == torch.float32
    assert_loss_close(got, want, 1e-6, f"loss (seed {seed})")
    assert_close(a.grad, a0.grad, 1e-6, "grad")
