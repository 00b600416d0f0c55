"""The MAE op family's contract (`MAEImpl`, `FAMILY`), its `MaskInfo` and the argument checks that the masking,
token and loss ops (`sslfast.ops.mae_masking`, `.mae_tokens`, `.mae_loss`) share.

Index checks: ids are checked against their range on the CPU (free) and raise a ValueError naming the
argument. On CUDA that check would cost a device synchronization per call, so it is not made: the kernels
mask every access instead, an out-of-range id yields a row of NaN (never a memory fault, never a silent
finite value), and its gradient contribution is dropped.
"""

from __future__ import annotations

from numbers import Integral
from typing import NamedTuple, Protocol

import torch

from .. import _validate as V
from ._family import Family

ID_DTYPES = (torch.int64, torch.int32)


class MAEImpl(Protocol):
    """What `kernels.mae` and `ops._torch.mae` both define (shapes in `sslfast.kernels.mae`'s notation)."""

    def random_masking(self, seed, batch, num_patches, keep, block, grid_w, device):
        """(ids_keep int64 [B, keep], ids_restore int64 [B, L], mask fp32 [B, L]) from one int64 seed."""

    def gather_patches(self, imgs, ids, p):
        """[B, K, p·p·C] patches (MAE order) of `imgs` at `ids` [B, K]; all L patches when ids is None."""

    def gather_tokens(self, x, ids):
        """x [B, L, D] at ids [B, K] -> [B, K, D] in x's dtype."""

    def gather_tokens_backward(self, g, ids, num_tokens):
        """dL/dx [B, num_tokens, D] in g's dtype from g [B, K, D]."""

    def unshuffle(self, x, ids_restore, mask_token, pos, out_dtype):
        """[B, L, D] in out_dtype: x's rows at ids_restore, mask_token where the id is >= K, plus pos."""

    def unshuffle_backward(self, g, ids_restore, keep, x_dtype, want_mask_token):
        """(dx [B, K, D] in x_dtype, d mask_token [D] or None) from g [B, L, D]."""

    def masked_mse(self, pred, imgs, mask, p, norm_pix, want_grad=False):
        """(loss, Σ mask, ∂loss/∂pred in pred's dtype when want_grad else None)."""

    def masked_mse_backward(self, g, pred, imgs, mask, wsum, p, norm_pix):
        """∂loss/∂pred in pred's dtype for the 0-d upstream gradient g."""

    def bert_masking(
        self, seed, input_ids, special, mask_token_id, vocab_size, prob, replace_prob, random_prob, ignore_index
    ):
        """(masked input_ids, labels) in input_ids' dtype and shape."""


FAMILY = Family("mae", MAEImpl)


class MaskInfo(NamedTuple):
    """Output of `random_masking`, in the official MAE conventions.

    Args:
        ids_keep: int64 [B, K], the visible patches (K = int(L·(1 − mask_ratio)) for every sample).
        ids_restore: int64 [B, L], position of each patch in the shuffled order (argsort of ids_shuffle).
        mask: fp32 [B, L], 1 = masked (removed), 0 = visible.
    """

    ids_keep: torch.Tensor
    ids_restore: torch.Tensor
    mask: torch.Tensor


def check_int(name: str, value, low: int = 1) -> int:
    """`value` as an int >= `low`; TypeError for a non-int (bools included), ValueError below `low`."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return int(value)


def check_images(name: str, imgs, patch_size) -> tuple[torch.Tensor, int]:
    """(imgs, p): a non-empty floating [B, C, H, W] tensor whose H and W are multiples of the patch size."""
    p = check_int("patch_size", patch_size)
    imgs = V.tensor(name, imgs, ndim=4, shape_hint="[B, C, H, W]")
    B, C, H, W = imgs.shape
    if B == 0 or C == 0:
        raise ValueError(f"{name} must be a non-empty [B, C, H, W] tensor, got shape {tuple(imgs.shape)}")
    if H == 0 or W == 0 or H % p or W % p:
        raise ValueError(f"{name} height and width must be positive multiples of patch_size={p}, got H={H}, W={W}")
    return imgs, p


def check_ids(name: str, ids, batch: int, upper: int, what: str, batch_of: str, hint: str = "[B, K]") -> torch.Tensor:
    """Integer ids [B, N] in [0, upper), contiguous. The range is checked only off-CUDA and outside
    torch.compile tracing (see the module docstring)."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {hint} of {what}, got {type(ids).__name__}")
    if ids.dtype not in ID_DTYPES:
        raise TypeError(f"{name} must have dtype int64 or int32, got {ids.dtype}")
    if ids.dim() != 2 or ids.shape[0] != batch or ids.shape[1] == 0:
        raise ValueError(
            f"{name} must be a non-empty {hint} tensor with B={batch} (the batch of {batch_of}), got "
            f"shape {tuple(ids.shape)}"
        )
    ids = ids.contiguous()
    if not ids.is_cuda and not torch.compiler.is_compiling():
        lo, hi = torch.aminmax(ids)
        lo, hi = V.host_scalar(lo), V.host_scalar(hi)
        if lo < 0 or hi >= upper:
            raise ValueError(f"{name} must hold {what} in [0, {upper}), got values in [{lo}, {hi}]")
    return ids


def check_tokens(name: str, x, shape_hint: str) -> torch.Tensor:
    """A non-empty [B, N, D] floating tensor; batch-strided views with dense rows (e.g. `x[:, 1:]`) are kept as
    they are (the kernels take the batch stride), anything else is made contiguous."""
    if isinstance(x, torch.Tensor) and x.dim() == 3 and x.stride(2) == 1 and x.stride(1) == x.shape[2]:
        V.check(name, x, ndim=3, shape_hint=shape_hint)  # rank and dtype checks without a copy
    else:
        x = V.tensor(name, x, ndim=3, shape_hint=shape_hint)
    if 0 in x.shape:
        raise ValueError(f"{name} must be a non-empty {shape_hint} tensor, got shape {tuple(x.shape)}")
    return x
