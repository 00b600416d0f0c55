"""Benchmark cases for SigLIP: the fused pairwise sigmoid loss (forward+backward) against the materialized one
open_clip's `SigLipLoss` computes (B x B logits, labels, logsigmoid), at SigLIP's batch sizes.

FLOPs counted are the ones the fused kernels execute (tensor-core dot products, 2 per multiply-add): the
row pass computes the logits and Σ_j g_ij ŷ_j (2·2B²D), the column pass the same for the texts (2·2B²D),
8B²D in all (the logits' recomputation per output chunk of wide rows not counted); the materialized
reference does 6B²D. Bytes: the two inputs read and their gradients written once, 4BD elements.

The fused loss computes its gradients in the forward when autograd will want them.
"""

import math

import torch

from .. import ops
from ..reference import siglip as ref
from . import fwd_bwd as _fwd_bwd, register, terminal_loss


def _siglip(b, d):
    def setup(device, dtype):
        img, txt = (torch.randn(b, d, device=device, dtype=dtype, requires_grad=True) for _ in range(2))
        log_t = torch.tensor(math.log(10.0), device=device, requires_grad=True)
        bias = torch.tensor(-10.0, device=device, requires_grad=True)
        return terminal_loss(
            lambda: ops.siglip_loss(img, txt, log_t.exp(), bias),
            img,
            txt,
            log_t,
            bias,
            reference=_fwd_bwd(lambda: ref.siglip_loss(img, txt, log_t.exp(), bias), img, txt, log_t, bias),
            flops=8 * b * b * d,
            bytes=4 * b * d * img.element_size(),
        )

    return setup


for _b in (8192, 32768):
    for _d in (512, 768):
        register("siglip", f"B={_b} D={_d}", dtypes=(torch.bfloat16,))(_siglip(_b, _d))
register("siglip", "B=64 D=32 (smoke)", dtypes=(torch.float32,), device_types=("cpu",))(_siglip(64, 32))
