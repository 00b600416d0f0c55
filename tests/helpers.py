"""Comparison helpers: relative error against a float64 oracle, with the tolerances of CONTRIBUTING.md."""

import torch

# ‖out − ref‖ / ‖ref‖ bounds (CONTRIBUTING.md, "Numerics"). On a GPU fp32 dots run in TF32.
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
TOL_GPU_FP32 = 1e-3


def tol(dtype: torch.dtype, device="cpu") -> float:
    if dtype == torch.float32 and torch.device(device).type == "cuda":
        return TOL_GPU_FP32
    return TOL[dtype]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    assert torch.isfinite(out).all(), "non-finite values in the output (unwritten or NaN)"
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def assert_close(out, ref, bound: float, what: str = ""):
    err = rel_err(out, ref)
    assert err < bound, f"{what}: relative error {err:.3g} >= {bound:.1g}"


def leaf(x: torch.Tensor, dtype=None) -> torch.Tensor:
    """A detached copy that requires grad (optionally cast), for running the same inputs through two paths."""
    return x.detach().clone().to(dtype or x.dtype).requires_grad_(True)


def assert_loss_close(out, ref, bound: float, what: str = "loss"):
    """A loss is a difference of O(scale) terms (log-sum-exp minus positive logit), so no fp32 or bf16
    implementation resolves it better than relative to max(|ref|, 1): compare on that scale."""
    out, ref = float(torch.as_tensor(out).detach()), float(torch.as_tensor(ref).detach())
    assert out == out, f"{what}: NaN"
    err = abs(out - ref) / max(abs(ref), 1.0)
    assert err < bound, f"{what}: error {err:.3g} (got {out!r}, want {ref!r}) >= {bound:.1g}"


def with_and_without_autocast(call, *inputs):
    """`call` on fresh leaves of `inputs` inside a bf16 CPU autocast region and again outside it, each loss
    backpropagated: (loss inside, its leaves, loss outside, its leaves)."""
    inside = [leaf(x) for x in inputs]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = call(*inside)
    got.backward()
    outside = [leaf(x) for x in inputs]
    want = call(*outside)
    want.backward()
    return got, inside, want, outside
