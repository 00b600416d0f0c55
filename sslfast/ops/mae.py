"""MAE ops: random masking, patchify / patch gather straight from images, token gather, unshuffle with mask
tokens, and the norm-pix masked MSE loss (math in `sslfast.kernels.mae`).

The family's contract `MAEImpl` and `FAMILY` are declared in `sslfast.ops.mae_common`, the ops in
`sslfast.ops.mae_masking` (`random_masking`, `bert_masking`), `sslfast.ops.mae_tokens` (`patchify`,
`gather_patches`, `gather_tokens`, `unshuffle`) and `sslfast.ops.mae_loss` (`masked_mse_loss`); this module
gathers them.

Every op is a `torch.library.custom_op` (`sslfast::mae_*`) with a fake kernel and, where differentiable, an
autograd formula, so `torch.compile(fullgraph=True)` traces through them; eager calls skip the dispatcher
(`sslfast._custom_op`), and an eager loss that will be differentiated gets its gradient from its forward
pass (`loss_with_grads`). CUDA tensors run the Triton kernels, CPU tensors the PyTorch path in
`sslfast.ops._torch.mae` (`sslfast.ops._family`).
"""

from __future__ import annotations

from .mae_common import FAMILY, MAEImpl, MaskInfo
from .mae_loss import masked_mse_loss
from .mae_masking import bert_masking, random_masking
from .mae_tokens import gather_patches, gather_tokens, patchify, unshuffle

__all__ = [
    "FAMILY",
    "MAEImpl",
    "MaskInfo",
    "bert_masking",
    "gather_patches",
    "gather_tokens",
    "masked_mse_loss",
    "patchify",
    "random_masking",
    "unshuffle",
]
