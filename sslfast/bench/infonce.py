"""Benchmark cases for the InfoNCE family: fused forward+backward against the materialized losses users
run today (lightly / solo-learn NT-Xent, MoCo with a queue, open_clip's CLIP loss), at the baseline shapes.

FLOPs counted are the ones the fused kernels execute (tensor-core dot products, 2 per multiply-add):
  NT-Xent (M = 2N rows):   forward M²D (symmetric: tiles on and right of the diagonal only)
                           + backward 4M²D (G + Gᵀ in one pass)                         = 5M²D
  MoCo, queue of K:        forward 2NKD + backward 4NKD (only the query gets gradients)  = 6NKD
  CLIP (B pairs):          forward 2B²D + backward 2 × 4B²D (images, then texts)         = 10B²D
The materialized references do 6M²D, 6NKD and 6B²D respectively.

The fused losses compute their gradients in the forward when autograd will want them; "separate_backward"
times the same kernels with the backward ones launched from the backward pass (the custom-op path).
"""

import torch
import torch.nn.functional as F

from .. import ops
from ..reference import infonce as ref
from . import BF16_AND_FP32 as BOTH, fwd_bwd as _fwd_bwd, register, terminal_loss


def _views(n, d, device, dtype):
    return [torch.randn(n, d, device=device, dtype=dtype, requires_grad=True) for _ in range(2)]


def _ntxent(n, d=128, reference=True):
    def setup(device, dtype):
        z1, z2 = _views(n, d, device, dtype)
        m = 2 * n
        return terminal_loss(
            lambda: ops.nt_xent_loss(z1, z2, 0.1),
            z1,
            z2,
            reference=_fwd_bwd(lambda: ref.nt_xent_loss(z1, z2, 0.1), z1, z2) if reference else None,
            flops=5 * m * m * d,
            bytes=3 * m * d * z1.element_size(),
        )

    return setup


for _n in (4096, 8192, 16384, 32768):
    register("nt_xent", f"2x{_n} D=128", dtypes=BOTH)(_ntxent(_n))
register("nt_xent", "2x262144 D=128", dtypes=(torch.bfloat16,))(_ntxent(262144, reference=False))
register("nt_xent", "2x64 D=32 (smoke)", dtypes=(torch.float32,), device_types=("cpu",))(_ntxent(64, 32))


def _moco(n, k, d=128):
    def setup(device, dtype):
        q, key = _views(n, d, device, dtype)
        queue = F.normalize(torch.randn(k, d, device=device), dim=1).to(dtype)
        return terminal_loss(
            lambda: ops.info_nce_loss(q, key, queue, 0.2),
            q,
            key,
            reference=_fwd_bwd(lambda: ref.info_nce_loss(q, key, queue, 0.2), q, key),
            flops=6 * n * k * d,
            bytes=k * d * queue.element_size(),
        )

    return setup


for _n in (256, 1024, 4096):
    register("moco_queue", f"N={_n} K=65536 D=128")(_moco(_n, 65536))
register("moco_queue", "N=32 K=256 D=32 (smoke)", dtypes=(torch.float32,), device_types=("cpu",))(_moco(32, 256, 32))


def _clip(b, d):
    def setup(device, dtype):
        img, txt = _views(b, d, device, dtype)
        scale = torch.tensor(14.0, device=device, requires_grad=True)
        return terminal_loss(
            lambda: ops.clip_loss(img, txt, scale),
            img,
            txt,
            scale,
            reference=_fwd_bwd(lambda: ref.clip_loss(img, txt, scale), img, txt, scale),
            flops=10 * b * b * d,
            bytes=4 * b * d * img.element_size(),
        )

    return setup


for _b in (8192, 32768, 65536):
    for _d in (128, 256):
        register("clip", f"B={_b} D={_d}", dtypes=BOTH)(_clip(_b, _d))
register("clip", "B=64 D=32 (smoke)", dtypes=(torch.float32,), device_types=("cpu",))(_clip(64, 32))
