"""iBOT masked-patch loss against DINOv2's literal `iBOTPatchLoss.forward` / `forward_masked` (float64 oracles)."""

import contextlib

import pytest
import torch

import sslfast as sf
from sslfast.ops._torch import ibot as T
from sslfast.reference import ibot as R
from tests.aot_compile import check_compiles
from tests.helpers import assert_close, assert_loss_close, leaf, tol


def _inputs(B, L, K, dtype=torch.float32):
    """Student logits, teacher probabilities (rows rescaled by 0.9-1.1: a path that assumes Σ_k t = 1 fails)
    and a mask [B, L] in which image 1 has no masked token and every other image at least one."""
    s = torch.randn(B, L, K, dtype=torch.float64) * 3
    t = torch.softmax(torch.randn(B, L, K, dtype=torch.float64) * 2, -1)
    t = t * (0.9 + 0.2 * torch.rand(B, L, 1, dtype=torch.float64))
    mask = torch.rand(B, L) < 0.5
    mask[:, 0] = True
    mask[1] = False
    return s.to(dtype), t.to(dtype), mask


def _grad_of(loss, x):
    (g,) = torch.autograd.grad(loss, x)
    return loss, g


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("separate", [False, True], ids=["grad_in_forward", "separate_backward"])
def test_matches_literal(backend, seed, dtype, separate, monkeypatch):
    """B = 3, L = 7, K = 53 with an image without masked tokens; fp64 on the reference path only."""
    if dtype == torch.float64 and backend == "triton":
        pytest.skip("float64 runs on the reference path only")
    s, t, mask = _inputs(3, 7, 53, dtype)
    temp = 0.1 + 0.05 * torch.rand(()).item()
    s64 = leaf(s, torch.float64)
    ref, gref = _grad_of(R.ibot_patch_loss_literal(s64, t.double(), mask, temp), s64)
    monkeypatch.setattr(T, "CHUNK_ELEMS", 53 * 3 * 2)  # several chunks of rows
    x = leaf(s)
    with sf.separate_backward() if separate else contextlib.nullcontext():
        out = sf.ibot_patch_loss(x, t, mask, student_temp=temp)
    _, g = _grad_of(out, x)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_loss_close(out, ref, 1e-12 if dtype == torch.float64 else tol(dtype), f"loss, seed {seed}")
    assert g.dtype == dtype
    assert_close(g, gref, 1e-10 if dtype == torch.float64 else tol(dtype), f"grad, seed {seed}")
    assert not g[~mask].any()  # unmasked tokens (image 1 entirely) get an exact zero gradient


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("padding", [0, 4])
def test_masked_variant_matches_forward_masked(backend, seed, dtype, padding):
    """The masked tokens only, DINOv2's default weights, with `padding` rows after the n_masked_patches counted
    ones (DINOv2's fixed-size buffers): equal to `forward_masked` and to `forward` on the full tokens; the
    padding rows get a zero gradient."""
    B, L, K = 3, 7, 53
    s, t, mask = _inputs(B, L, K, dtype)
    n = int(mask.sum())
    pad_s, pad_t = torch.randn(padding, K).to(dtype), torch.rand(padding, K).to(dtype)
    sm, tm = torch.cat([s[mask], pad_s]), torch.cat([t[mask], pad_t])
    weights = (1 / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(mask)[mask]
    s64 = leaf(sm, torch.float64)
    ref, gref = _grad_of(R.ibot_patch_loss_masked_literal(s64, tm.double(), mask, 0.1, n_masked_patches=n), s64)
    full = R.ibot_patch_loss_literal(s.double(), t.double(), mask, 0.1)
    assert_loss_close(ref, full, 1e-6, "forward_masked vs forward")  # DINOv2's default weights are fp32
    x = leaf(sm)
    out, g = _grad_of(
        sf.ibot_patch_loss_masked(x, tm, masks_weight=weights, n_images=B, n_masked_patches=n if padding else None), x
    )
    assert_loss_close(out, ref, tol(dtype), f"loss, seed {seed}")
    assert_close(g, gref, tol(dtype), f"grad, seed {seed}")
    assert not g[n:].any()


def test_masked_variant_explicit_weights(backend, seed):
    """Arbitrary per-token weights and image count: −Σ_m w_m Σ_k t log softmax(s/τ) / n_images."""
    M, K = 11, 29
    s, t, _ = _inputs(2, M, K)
    s, t = s[0], t[0]
    w = torch.rand(M)
    w[3] = 0.0
    s64 = leaf(s, torch.float64)
    ref, gref = _grad_of(
        R.ibot_patch_loss_masked_literal(s64, t.double(), torch.zeros(5, 2), 0.07, masks_weight=w.double()), s64
    )
    x = leaf(s)
    out, g = _grad_of(sf.ibot_patch_loss_masked(x, t, masks_weight=w, n_images=5, student_temp=0.07), x)
    assert_loss_close(out, ref, tol(torch.float32), f"loss, seed {seed}")
    assert_close(g, gref, tol(torch.float32), f"grad, seed {seed}")


@pytest.mark.parametrize("separate", [False, True], ids=["grad_in_forward", "separate_backward"])
def test_double_backward(backend, separate):
    """create_graph=True: a true second derivative on the reference path (gradgradcheck in float64), sslfast's
    DoubleBackwardError on the kernels, never a detached gradient."""
    s, t, mask = _inputs(2, 3, 4, torch.float64 if backend == "reference" else torch.float32)

    def loss(x):
        with sf.separate_backward() if separate else contextlib.nullcontext():
            return sf.ibot_patch_loss(x, t, mask, student_temp=0.5)

    x = leaf(s)
    if backend == "reference":
        assert torch.autograd.gradgradcheck(loss, (x,))
    else:
        with pytest.raises(sf.ops.DoubleBackwardError, match="ibot_patch_loss"):
            torch.autograd.grad(loss(x), x, create_graph=True)


def test_nothing_masked(backend):
    """No masked token anywhere: the loss is 0 (DINOv2's too) and so is the gradient."""
    s, t, mask = _inputs(2, 5, 9)
    x = leaf(s)
    out, g = _grad_of(sf.ibot_patch_loss(x, t, mask & False), x)
    assert out.item() == 0.0 and not g.any()


def test_teacher_gets_no_gradient(backend):
    s, t, mask = _inputs(2, 5, 9)
    x, y = leaf(s), leaf(t)
    sf.ibot_patch_loss(x, y, mask).backward()
    assert x.grad is not None and y.grad is None


def test_non_finite_masked_token_propagates(backend):
    s, t, mask = _inputs(2, 5, 9)
    s[0, 0, 3] = float("nan")  # token 0 of image 0 is masked
    assert torch.isnan(sf.ibot_patch_loss(s, t, mask))


def _bad(**kwargs):
    base = dict(
        student_patch_logits=torch.randn(2, 3, 8),
        teacher_patch_probs=torch.rand(2, 3, 8),
        mask=torch.ones(2, 3, dtype=torch.bool),
    )
    return dict(base, **kwargs)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (_bad(student_patch_logits=torch.randn(6, 8)), ValueError, "student_patch_logits"),
        (
            _bad(student_patch_logits=torch.randn(2, 3, 0), teacher_patch_probs=torch.rand(2, 3, 0)),
            ValueError,
            "student_patch_logits",
        ),
        (_bad(student_patch_logits=torch.ones(2, 3, 8, dtype=torch.long)), TypeError, "student_patch_logits"),
        (_bad(teacher_patch_probs=torch.rand(2, 3, 7)), ValueError, "teacher_patch_probs"),
        (_bad(teacher_patch_probs=[0.5]), TypeError, "teacher_patch_probs"),
        (_bad(teacher_patch_probs=torch.rand(2, 3, 8, device="meta")), ValueError, "teacher_patch_probs"),
        (_bad(teacher_patch_probs=torch.ones(2, 3, 8, dtype=torch.int32)), TypeError, "teacher_patch_probs"),
        (_bad(mask=torch.ones(2, 4, dtype=torch.bool)), ValueError, "mask"),
        (_bad(mask=torch.ones(2, 3)), TypeError, "mask"),
        (_bad(mask=None), TypeError, "mask"),
        (_bad(student_temp=0.0), ValueError, "student_temp"),
    ],
)
def test_bad_input(kwargs, error, match):
    with pytest.raises(error, match=match):
        sf.ibot_patch_loss(**kwargs)


def _bad_masked(**kwargs):
    base = dict(
        student_logits_masked=torch.randn(5, 8),
        teacher_probs_masked=torch.rand(5, 8),
        masks_weight=torch.rand(5),
        n_images=2,
    )
    return dict(base, **kwargs)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (_bad_masked(student_logits_masked=torch.randn(5, 2, 8)), ValueError, "student_logits_masked"),
        (
            _bad_masked(student_logits_masked=torch.randn(0, 8), teacher_probs_masked=torch.rand(0, 8)),
            ValueError,
            "student_logits_masked",
        ),
        (_bad_masked(teacher_probs_masked=torch.rand(4, 8)), ValueError, "teacher_probs_masked"),
        (_bad_masked(teacher_probs_masked=torch.rand(5, 8, device="meta")), ValueError, "teacher_probs_masked"),
        (_bad_masked(masks_weight=torch.rand(4)), ValueError, "masks_weight"),
        (_bad_masked(masks_weight=torch.rand(5), n_masked_patches=3), ValueError, "masks_weight"),
        (_bad_masked(masks_weight=torch.rand(5, 1)), ValueError, "masks_weight"),
        (_bad_masked(n_masked_patches=6), ValueError, "n_masked_patches"),
        (_bad_masked(n_masked_patches=2.0), TypeError, "n_masked_patches"),
        (_bad_masked(n_images=0), ValueError, "n_images"),
        (_bad_masked(n_images=None), TypeError, "n_images"),
        (_bad_masked(student_temp=-1.0), ValueError, "student_temp"),
    ],
)
def test_bad_input_masked(kwargs, error, match):
    with pytest.raises(error, match=match):
        sf.ibot_patch_loss_masked(**kwargs)


def test_memory_frugal_backward_saves_no_softmax(backend):
    """With a separate backward, the graph keeps the inputs, the [R] weights and the [2, R] row statistics."""
    B, L, K = 2, 5, 500
    s, t, mask = _inputs(B, L, K)
    x = leaf(s)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda z: saved.append(z) or z, lambda z: z), sf.separate_backward():
        sf.ibot_patch_loss(x, t, mask)
    extra = sum(z.numel() for z in saved if z.data_ptr() not in (x.data_ptr(), t.data_ptr()))
    assert extra <= 3 * B * L, f"saved {extra} extra elements"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_kernels_at_dinov2_size(seed, dtype):
    """The real kernels at DINOv2's iBOT head size (K = 65536 prototypes, 16 images of 196 patch tokens)."""
    s, t, mask = (x.cuda() for x in _inputs(16, 196, 65536, dtype))
    s64 = leaf(s, torch.float64)
    ref, gref = _grad_of(R.ibot_patch_loss_literal(s64, t.double(), mask, 0.1), s64)
    x = leaf(s)
    out, g = _grad_of(sf.ibot_patch_loss(x, t, mask), x)
    assert_loss_close(out, ref, tol(dtype, "cuda"), f"loss, seed {seed}")
    assert_close(g, gref, tol(dtype, "cuda"), f"grad, seed {seed}")


def test_kernels_compile_for_sm90():
    """The iBOT kernels compile ahead of time to sm_90 at the launchers' GPU tiles, without register spills."""
    out = check_compiles("""
import sslfast.kernels.ibot as K

for dt in ("bf16", "fp16", "fp32"):
    ptrs = dict(S="*" + dt, T="*" + dt, W="*fp32", STATS="*fp32", PART="*fp32", GRAD="*fp32", DS="*" + dt,
                s2="fp32", inv_temp="fp32")
    build(K._forward_kernel, ptrs, dict(BLOCK_K=1024), aligned=("K", "stride_s", "stride_t"))
    build(K._backward_kernel, ptrs, dict(BLOCK_K=1024), aligned=("K", "stride_s", "stride_t", "stride_ds"))
""")
    built = [line for line in out.splitlines() if line.startswith('{"kernel"')]
    assert len(built) == 6, out
    spills = [line for line in built if '"spills": 0,' not in line]
    assert not spills, "register spills:\n" + "\n".join(spills)
