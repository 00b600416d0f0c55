"""DINO loss benchmark cases: the fused op (forward + backward into the student logits) against the
facebookresearch/dino `DINOLoss` code (`sslfast.reference.dino.dino_loss_literal`) and against sslfast's own
chunked PyTorch path, at DINO's head size K = 65536 and its multi-crop layout (2 global + 8 local crops).

Bytes (the fused design, per crop L = B·K logits): the forward reads the teacher's G crops twice and the
student's V crops once, the backward reads both once and writes the student gradient:
(2G + V) L + (G + 2V) L = 3(G + V) L elements. "separate_backward": the same kernels, the backward one
launched from the backward pass instead of the forward.
"""

import torch

from .. import ops
from ..reference import dino as R
from . import fwd_bwd, reference_backend, register, terminal_loss

G, V = 2, 10


def _case(batch: int, k: int):
    def setup(device, dtype):
        student = torch.randn(V * batch, k, device=device, dtype=dtype, requires_grad=True)
        teacher = torch.randn(G * batch, k, device=device, dtype=dtype)
        center = torch.randn(1, k, device=device) * 0.1
        st = terminal_loss(
            lambda: ops.dino_loss(student, teacher, center),
            student,
            reference=fwd_bwd(lambda: R.dino_loss_literal(student, teacher, center, 0.1, 0.04, G), student),
            bytes=float(3 * (G + V) * batch * k * student.element_size()),
        )

        def chunked():
            with reference_backend():
                st.fused()

        st.others["chunked_reference"] = chunked
        return st

    return setup


for _b in (64, 128):
    register("dino", f"loss K=65536 2x global + 8 local crops, B={_b}", dtypes=(torch.bfloat16, torch.float32))(
        _case(_b, 65536)
    )
register("dino", "loss K=512 B=4 (smoke)", dtypes=(torch.float32,), device_types=("cpu",))(_case(4, 512))
