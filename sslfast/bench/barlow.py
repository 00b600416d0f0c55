"""Benchmark cases for Barlow Twins and VICReg: the fused op (forward + backward) against the materialized
losses users run today (the official code's D x D cross-correlation / covariances; for Barlow Twins, the
`barlow_reference` of benchmarks/reference_ops_bench.py, except that eps sits inside the square root of the
biased variance, as in BatchNorm1d, where that script adds it to the std), at the baseline shapes.

FLOPs counted are the ones the fused path executes (2 per multiply-add):
  Gram path (N < D):   two N x N x D Gram GEMMs forward + two N x N x D products backward      = 8·N²·D
                       (6·N²·D when the symmetric dual-Gram kernel computes only the upper tiles)
  Tiled path (N >= D): C tiles forward 2·N·D², backward each P x D slab twice (once per branch)
                       plus its two products                                                     = 10·N·D²
The materialized references do 6·N·D² (Barlow; VICReg 12·N·D², two covariances).
Bytes: the floor of one call, read z1, z2 and write both gradients = 4·N·D·element size.
"""

import torch

from .. import ops
from ..reference import barlow as ref
from . import BF16_AND_FP32 as BOTH, Setup, fwd_bwd as _fwd_bwd, register


def _forced_gram_forward(fn, variant):
    """`fn` with the Gram path's forward forced to one variant (see sslfast.kernels.barlow.GRAM_FORWARD)."""

    def run():
        from ..kernels import barlow as kernels

        saved, kernels.GRAM_FORWARD = kernels.GRAM_FORWARD, variant
        try:
            fn()
        finally:
            kernels.GRAM_FORWARD = saved

    return run


def _case(fused, literal, n, d, algorithm="auto", variants=False):
    """`variants`: also time both Gram-path forwards (the Triton symmetric dual-Gram kernel and the two cuBLAS
    Gram GEMMs + epilogue kernel) so that one run shows which one the automatic choice should take."""

    def setup(device, dtype):
        z1, z2 = (torch.randn(n, d, device=device, dtype=dtype, requires_grad=True) for _ in range(2))
        gram = ops.barlow.choose_algorithm(algorithm, n, d) == "gram"
        run = _fwd_bwd(lambda: fused(z1, z2, algorithm=algorithm), z1, z2)
        others = {}
        if variants and gram and device.type == "cuda":
            others = {f"gram_fwd_{v}": _forced_gram_forward(run, v) for v in ("triton", "cublas")}
        if not gram:
            flops = 10 * n * d * d
        else:
            from ..kernels import barlow as kernels

            flops = (6 if device.type == "cuda" and kernels.symmetric_gram_forward(n, device) else 8) * n * n * d
        return Setup(
            fused=run,
            reference=_fwd_bwd(lambda: literal(z1, z2).float(), z1, z2),
            flops=flops,
            bytes=4 * n * d * z1.element_size(),
            others=others,
        )

    return setup


for _op, _fused, _literal in (
    ("barlow_twins", ops.barlow_twins_loss, ref.barlow_twins_loss),
    ("vicreg", ops.vicreg_loss, ref.vicreg_loss),
):
    for _n, _d in ((256, 8192), (2048, 8192), (1024, 16384)):
        register(_op, f"N={_n} D={_d}", dtypes=BOTH)(_case(_fused, _literal, _n, _d, variants=_n >= 1024))
    register(_op, "N=8192 D=2048 (tiled)")(_case(_fused, _literal, 8192, 2048))
    register(_op, "N=64 D=256 (smoke)", dtypes=(torch.float32,), device_types=("cpu",))(
        _case(_fused, _literal, 64, 256)
    )
