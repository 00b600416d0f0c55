"""Kernels shared by several ops (`sslfast.kernels._common`), on the interpreter (real on `-m gpu`)."""

import pytest
import torch

from sslfast._backend import interpreting
from sslfast.kernels._common import scale_unless_one_
from aot_compile import check_compiles
from helpers import assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [1, 1023, 5000, pytest.param((1 << 22) + 3, marks=pytest.mark.gpu)])
def test_scale_unless_one(seed, dtype, n):
    x = torch.randn(n, device=DEVICE).to(dtype)
    for g in (2.5, -0.75, 1.0):
        got = scale_unless_one_(x.clone(), torch.tensor(g, device=DEVICE))
        want = (x.float() * g).to(dtype)  # one rounding, from fp32
        if dtype == torch.bfloat16 and interpreting():  # the interpreter truncates to bf16 instead of rounding
            assert_close(got, want, 1e-2, f"g={g} (seed {seed})")
        else:
            assert torch.equal(got, want), f"g={g} (seed {seed})"
    poisoned = torch.full((n,), float("nan"), device=DEVICE, dtype=dtype)
    assert scale_unless_one_(poisoned, torch.tensor(1.0, device=DEVICE)).isnan().all(), "g = 1 must not write"
    assert scale_unless_one_(x.clone(), torch.tensor(float("nan"), device=DEVICE)).isnan().all()


def test_scale_kernel_compiles_for_sm90():
    """The scale kernel compiles ahead of time for sm_90 (its runtime branch on g included) with 16-byte
    accesses, for every dtype a gradient may have."""
    out = check_compiles("""
import sslfast.kernels._common as K
for dt in ("fp32", "bf16", "fp16"):
    k = build(K._scale_unless_one_kernel, dict(X="*" + dt, G="*fp32"), dict(BLOCK=4096), 4, aligned=("n",))
    ptx = k.asm["ptx"]
    print("vec", ptx.count("ld.global.v4") + ptx.count("ld.global.L1::evict_last.v4"), ptx.count("st.global.v4"))
""")
    built = [line for line in out.splitlines() if line.startswith('{"kernel"')]
    assert len(built) == 3 and all('"spills": 0,' in line for line in built), out
    vec = [[int(n) for n in line.split()[1:]] for line in out.splitlines() if line.startswith("vec ")]
    assert len(vec) == 3 and all(ld > 0 and st > 0 for ld, st in vec), out
