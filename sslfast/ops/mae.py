"""MAE ops: random masking, patchify / patch gather straight from images, token gather, unshuffle with mask
tokens, and the norm-pix masked MSE loss (math in `sslfast.kernels.mae`).

Every op is a `torch.library.custom_op` (`sslfast::mae_*`) with a fake kernel and, where differentiable, an
autograd formula, so `torch.compile(fullgraph=True)` traces through them; eager calls skip the dispatcher
(`sslfast._custom_op`), and an eager loss that will be differentiated gets its gradient from its forward
pass (`loss_with_grads`). CUDA tensors run the Triton kernels, CPU tensors the PyTorch path in
`sslfast.reference.mae` (`sslfast._backend`).

Index checks: ids are checked against their range on the CPU (free) and raise a ValueError naming the
argument. On CUDA that check would cost a device synchronization per call, so it is not made: the kernels
mask every access instead, an out-of-range id yields a row of NaN (never a memory fault, never a silent
finite value), and its gradient contribution is dropped.
"""
from __future__ import annotations

import functools
import math
from numbers import Integral
from typing import NamedTuple

import torch

from .. import _validate as V
from .._backend import use_triton
from .._custom_op import (TRITON_DOUBLE_BACKWARD, backward_on_reference, custom_op, differentiable_grads,
                          grads_in_forward, loss_with_grads)
from ..reference import mae as _reference

_SEED_HIGH = 1 << 62
_ID_DTYPES = (torch.int64, torch.int32)


class MaskInfo(NamedTuple):
    """Output of `random_masking`, in the official MAE conventions.

    ids_keep:    int64 [B, K], the visible patches (K = int(L·(1 − mask_ratio)) for every sample)
    ids_restore: int64 [B, L], position of each patch in the shuffled order (argsort of ids_shuffle)
    mask:        fp32 [B, L], 1 = masked (removed), 0 = visible
    """
    ids_keep: torch.Tensor
    ids_restore: torch.Tensor
    mask: torch.Tensor


_KERNELS = None


def _impl(*tensors):
    global _KERNELS
    if use_triton(*tensors):
        if _KERNELS is None:
            from ..kernels import mae as kernels

            _KERNELS = kernels
        return _KERNELS
    return _reference


@functools.lru_cache(maxsize=16)
def _device_probe(device: torch.device) -> torch.Tensor:
    """An empty tensor on `device`, for the backend choice of ops that take no tensor (one per device)."""
    with torch.inference_mode(False):
        return torch.empty(0, device=device)


# ------------------------------------------------------------------------------------------- custom ops
def _fake_masking(seed, batch, num_patches, keep, block, grid_w, device):
    return (torch.empty(batch, keep, dtype=torch.int64, device=device),
            torch.empty(batch, num_patches, dtype=torch.int64, device=device),
            torch.empty(batch, num_patches, dtype=torch.float32, device=device))


@custom_op("mae_random_masking", fake=_fake_masking)
def _random_masking_op(seed: torch.Tensor, batch: int, num_patches: int, keep: int, block: int, grid_w: int,
                       device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    impl = _impl(_device_probe(device))
    return impl.random_masking(seed, batch, num_patches, keep, block, grid_w, device)


def _fake_gather_patches(imgs, ids, p):
    B, C, H, W = imgs.shape
    k = (H // p) * (W // p) if ids is None else ids.shape[1]
    return imgs.new_empty(B, k, p * p * C)


def _gather_patches_setup(ctx, inputs, output):
    imgs, ids, p = inputs
    ctx.save_for_backward(ids)
    ctx.cfg = (p, tuple(imgs.shape))


def _gather_patches_backward(ctx, g):
    (ids,) = ctx.saved_tensors
    p, shape = ctx.cfg
    return _reference.gather_patches_backward(g, ids, p, shape), None, None


@custom_op("mae_gather_patches", fake=_fake_gather_patches, backward=_gather_patches_backward,
           setup_context=_gather_patches_setup, double_backward=_gather_patches_backward)
def _gather_patches_op(imgs: torch.Tensor, ids: torch.Tensor | None, p: int) -> torch.Tensor:
    out = _impl(imgs, ids).gather_patches(imgs, ids, p)
    return out.clone() if out.data_ptr() == imgs.data_ptr() else out


@custom_op("mae_gather_tokens_backward", fake=lambda g, ids, num_tokens: g.new_empty(g.shape[0], num_tokens,
                                                                                   g.shape[2]))
def _gather_tokens_backward_op(g: torch.Tensor, ids: torch.Tensor, num_tokens: int) -> torch.Tensor:
    return _impl(g, ids).gather_tokens_backward(g, ids, num_tokens)


def _gather_tokens_setup(ctx, inputs, output):
    x, ids = inputs
    ctx.save_for_backward(ids)
    ctx.num_tokens = x.shape[1]


def _gather_tokens_backward(ctx, g):
    (ids,) = ctx.saved_tensors
    return _gather_tokens_backward_op(g.contiguous(), ids, ctx.num_tokens), None


def _gather_tokens_backward_literal(ctx, g):
    (ids,) = ctx.saved_tensors
    return _reference.gather_tokens_backward(g, ids, ctx.num_tokens), None


@custom_op("mae_gather_tokens", fake=lambda x, ids: x.new_empty(x.shape[0], ids.shape[1], x.shape[2]),
           backward=_gather_tokens_backward, setup_context=_gather_tokens_setup,
           double_backward=backward_on_reference("gather_tokens", _gather_tokens_backward_literal))
def _gather_tokens_op(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return _impl(x, ids).gather_tokens(x, ids)


def _unshuffle_dtype(x, mask_token, pos) -> torch.dtype:
    dt = x.dtype if mask_token.dtype == x.dtype else torch.promote_types(x.dtype, mask_token.dtype)
    return dt if pos is None or pos.dtype == dt else torch.promote_types(dt, pos.dtype)


def _fake_unshuffle_backward(g, ids_restore, keep, x_dtype, want_mask_token):
    B, _, D = g.shape
    return (g.new_empty(B, keep, D, dtype=x_dtype),
            g.new_empty(D if want_mask_token else 0, dtype=torch.float32))


@custom_op("mae_unshuffle_backward", fake=_fake_unshuffle_backward)
def _unshuffle_backward_op(g: torch.Tensor, ids_restore: torch.Tensor, keep: int, x_dtype: torch.dtype,
                           want_mask_token: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx [B, K, D] in x_dtype, d mask_token fp32 [D] or [0])."""
    dx, dmt = _impl(g, ids_restore).unshuffle_backward(g, ids_restore, keep, x_dtype, want_mask_token)
    return dx.contiguous(), (dmt.float().contiguous() if want_mask_token else g.new_empty(0, dtype=torch.float32))


def _unshuffle_setup(ctx, inputs, output):
    x, ids_restore, mask_token, pos = inputs
    ctx.save_for_backward(ids_restore)
    ctx.cfg = (x.shape[1], x.dtype, mask_token.dtype, None if pos is None else pos.dtype)


def _unshuffle_backward(ctx, g):
    (ids_restore,) = ctx.saved_tensors
    keep, x_dtype, mt_dtype, pos_dtype = ctx.cfg
    g = g.contiguous()
    want_mt = ctx.needs_input_grad[2]
    dx, dmt = _unshuffle_backward_op(g, ids_restore, keep, x_dtype, want_mt)
    dpos = g.sum(0, dtype=torch.float32).to(pos_dtype) if pos_dtype is not None and ctx.needs_input_grad[3] else None
    return (dx if ctx.needs_input_grad[0] else None, None, dmt.to(mt_dtype) if want_mt else None, dpos)


def _fake_unshuffle(x, ids_restore, mask_token, pos):
    return x.new_empty(x.shape[0], ids_restore.shape[1], x.shape[2], dtype=_unshuffle_dtype(x, mask_token, pos))


def _unshuffle_backward_literal(ctx, g):
    (ids_restore,) = ctx.saved_tensors
    keep, x_dtype, mt_dtype, pos_dtype = ctx.cfg
    want_mt = ctx.needs_input_grad[2]
    dx, dmt = _reference.unshuffle_backward(g, ids_restore, keep, x_dtype, want_mt)
    dpos = g.sum(0, dtype=torch.float32).to(pos_dtype) if pos_dtype is not None and ctx.needs_input_grad[3] else None
    return (dx if ctx.needs_input_grad[0] else None, None, dmt.to(mt_dtype) if want_mt else None, dpos)


@custom_op("mae_unshuffle", fake=_fake_unshuffle, backward=_unshuffle_backward, setup_context=_unshuffle_setup,
           double_backward=backward_on_reference("unshuffle", _unshuffle_backward_literal))
def _unshuffle_op(x: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor,
                  pos: torch.Tensor | None) -> torch.Tensor:
    impl = _impl(x, ids_restore, mask_token, pos)
    return impl.unshuffle(x, ids_restore, mask_token, pos, _unshuffle_dtype(x, mask_token, pos))


@custom_op("mae_masked_mse_backward", fake=lambda g, pred, imgs, mask, wsum, p, norm_pix: torch.empty_like(pred))
def _masked_mse_backward_op(g: torch.Tensor, pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor,
                            wsum: torch.Tensor, p: int, norm_pix: bool) -> torch.Tensor:
    return _impl(pred, imgs, mask).masked_mse_backward(g, pred, imgs, mask, wsum, p, norm_pix)


def _masked_mse_setup(ctx, inputs, output):
    pred, imgs, mask, p, norm_pix = inputs
    ctx.save_for_backward(pred, imgs, mask, output[1])
    ctx.cfg = (p, norm_pix)


def _masked_mse_backward(ctx, g_loss, g_wsum):
    pred, imgs, mask, wsum = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return None, None, None, None, None
    dpred = _masked_mse_backward_op(g_loss.float().reshape(()).contiguous(), pred, imgs, mask, wsum, *ctx.cfg)
    return dpred, None, None, None, None


def _fake_masked_mse(pred, imgs, mask, p, norm_pix):
    return pred.new_empty((), dtype=torch.float32), pred.new_empty((), dtype=torch.float32)


def _masked_mse_literal(cfg, pred, imgs, mask):
    """The loss in plain autograd (the reference path's formula): the double-backward route."""
    return _reference.masked_mse(pred, imgs, mask, *cfg)[0]


def _masked_mse_double_backward(ctx, g_loss, g_wsum):
    pred, imgs, mask, _ = ctx.saved_tensors
    (dpred,) = differentiable_grads(lambda x: _masked_mse_literal(ctx.cfg, x, imgs, mask), [pred],
                                    [ctx.needs_input_grad[0]], [g_loss])
    return dpred, None, None, None, None


@custom_op("mae_masked_mse", fake=_fake_masked_mse, backward=_masked_mse_backward, setup_context=_masked_mse_setup,
           non_differentiable=(1,),
           double_backward=backward_on_reference("masked_mse_loss", _masked_mse_double_backward))
def _masked_mse_op(pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor, p: int,
                   norm_pix: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, Σ mask) as fp32 scalars."""
    loss, wsum, _ = _impl(pred, imgs, mask).masked_mse(pred, imgs, mask, p, norm_pix)
    return loss.float().clone(), wsum.float().clone()


def _masked_mse_and_grad(cfg, needs, pred, imgs, mask):
    """`loss_with_grads`' function: the loss and ∂loss/∂pred from one pass (imgs and mask get none)."""
    loss, _, dpred = _impl(pred, imgs, mask).masked_mse(pred, imgs, mask, *cfg, True)
    return loss.float(), (dpred, None, None)


def _fake_bert_masking(seed, input_ids, special, mask_token_id, vocab_size, prob, replace_prob, random_prob,
                       ignore_index):
    return torch.empty_like(input_ids), torch.empty_like(input_ids)


@custom_op("mae_bert_masking", fake=_fake_bert_masking)
def _bert_masking_op(seed: torch.Tensor, input_ids: torch.Tensor, special: torch.Tensor | None,
                     mask_token_id: int, vocab_size: int, prob: float, replace_prob: float, random_prob: float,
                     ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    impl = _impl(input_ids, special)
    return impl.bert_masking(seed, input_ids, special, mask_token_id, vocab_size, prob, replace_prob,
                             random_prob, ignore_index)


def _int(name: str, value, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return int(value)


def _normalize_device(device, name: str = "device") -> torch.device:
    """`device` as a torch.device with its CUDA index filled in. An unknown device string, or a CUDA device
    this process cannot use, is a ValueError naming `name`, raised before anything runs (instead of torch's
    "not compiled with CUDA" AssertionError from deep inside the first allocation)."""
    if not isinstance(device, (str, int, torch.device)) or isinstance(device, bool):
        raise TypeError(f"{name} must be a torch.device or a device string (e.g. 'cuda'), got "
                        f"{type(device).__name__}")
    try:
        device = torch.device(device)
    except RuntimeError:
        raise ValueError(f"{name} must name a device (e.g. 'cpu', 'cuda', 'cuda:1'), got {device!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{name}={str(device)!r} was requested but CUDA is not available (no GPU, or this "
                             "torch build has no CUDA support)")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        elif device.index >= torch.cuda.device_count():
            raise ValueError(f"{name}={str(device)!r}: there are only {torch.cuda.device_count()} CUDA devices")
    return device


def _draw_seed(generator, device: torch.device) -> torch.Tensor:
    """An int64 seed tensor drawn from `generator` on the generator's device (the target device's default
    generator when None). On a CUDA generator this is a tiny device-side draw: no host synchronization."""
    if generator is None:
        return torch.randint(0, _SEED_HIGH, (1,), dtype=torch.int64, device=device)
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    gdev = _normalize_device(generator.device, "generator.device")
    if gdev.type != "cpu" and gdev != device:
        raise ValueError(f"generator must live on the CPU or on the output device {device}, got one on {gdev}")
    return torch.randint(0, _SEED_HIGH, (1,), dtype=torch.int64, device=gdev, generator=generator)


def _images(name: str, imgs, patch_size) -> tuple[torch.Tensor, int]:
    p = _int("patch_size", patch_size)
    imgs = V.tensor(name, imgs, ndim=4, shape_hint="[B, C, H, W]")
    B, C, H, W = imgs.shape
    if B == 0 or C == 0:
        raise ValueError(f"{name} must be a non-empty [B, C, H, W] tensor, got shape {tuple(imgs.shape)}")
    if H == 0 or W == 0 or H % p or W % p:
        raise ValueError(f"{name} height and width must be positive multiples of patch_size={p}, got "
                         f"H={H}, W={W}")
    return imgs, p


def _ids(name: str, ids, batch: int, upper: int, what: str, batch_of: str, hint: str = "[B, K]") -> torch.Tensor:
    """Integer ids [B, N] in [0, upper). The range is checked only off-CUDA and outside torch.compile tracing
    (see the module docstring)."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {hint} of {what}, got {type(ids).__name__}")
    if ids.dtype not in _ID_DTYPES:
        raise TypeError(f"{name} must have dtype int64 or int32, got {ids.dtype}")
    if ids.dim() != 2 or ids.shape[0] != batch or ids.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty {hint} tensor with B={batch} (the batch of {batch_of}), got "
                         f"shape {tuple(ids.shape)}")
    ids = ids.contiguous()
    if not ids.is_cuda and not torch.compiler.is_compiling():
        lo, hi = torch.aminmax(ids)
        lo, hi = int(lo), int(hi)
        if lo < 0 or hi >= upper:
            raise ValueError(f"{name} must hold {what} in [0, {upper}), got values in [{lo}, {hi}]")
    return ids


def _tokens(name: str, x, shape_hint: str) -> torch.Tensor:
    """A [B, N, D] floating tensor; batch-strided views with dense rows (e.g. `x[:, 1:]`) are kept as they are
    (the kernels take the batch stride), anything else is made contiguous."""
    if isinstance(x, torch.Tensor) and x.dim() == 3 and x.stride(2) == 1 and x.stride(1) == x.shape[2]:
        V.check(name, x, ndim=3, shape_hint=shape_hint)  # rank and dtype checks without a copy
    else:
        x = V.tensor(name, x, ndim=3, shape_hint=shape_hint)
    if 0 in x.shape:
        raise ValueError(f"{name} must be a non-empty {shape_hint} tensor, got shape {tuple(x.shape)}")
    return x


def _masking_grid(num_patches: int, block: int, grid_size) -> tuple[int, int]:
    if block == 1 and grid_size is None:
        return 1, num_patches
    if grid_size is None:
        h = math.isqrt(num_patches)
        if h * h != num_patches:
            raise ValueError(f"grid_size (h, w) is needed for block masking when num_patches={num_patches} is "
                             "not a square")
        grid_size = (h, h)
    if (not isinstance(grid_size, (tuple, list)) or len(grid_size) != 2
            or any(isinstance(g, bool) or not isinstance(g, Integral) or g < 1 for g in grid_size)):
        raise ValueError(f"grid_size must be a pair of positive ints (h, w), got {grid_size!r}")
    h, w = int(grid_size[0]), int(grid_size[1])
    if h * w != num_patches:
        raise ValueError(f"grid_size {h}x{w} must hold num_patches={num_patches} patches")
    if h % block or w % block:
        raise ValueError(f"grid_size {h}x{w} must be divisible by block_size={block}")
    return h, w


# ------------------------------------------------------------------------------------------- public API
def random_masking(batch_size: int, num_patches: int, mask_ratio: float, *, device=None,
                   generator: torch.Generator | None = None, block_size: int = 1,
                   grid_size: tuple[int, int] | None = None) -> MaskInfo:
    """MAE random masking: every sample keeps exactly K = int(L·(1 − mask_ratio)) patches, as the official code.

    Returns `MaskInfo(ids_keep [B, K], ids_restore [B, L], mask [B, L])` (int64, int64, fp32; mask 1 =
    masked). The permutation is the stable argsort of per-patch Philox noise, one kernel per call on CUDA with
    no host synchronization; it is a function of one seed drawn from `generator` (a CPU generator, or one on
    `device`; the device's default generator when None), so the same generator state gives the same mask on
    either backend.

    Block-wise (SimMIM style) masking: with `block_size=s > 1`, the h×w patch grid (`grid_size`, default
    square) is cut into s×s cells that are kept or masked whole; K = int(L/s²·(1 − mask_ratio))·s². BEiT's
    rejection-sampled rectangles are not offered (their count varies per sample).
    """
    B = _int("batch_size", batch_size)
    L = _int("num_patches", num_patches)
    ratio = V.in_open_interval("mask_ratio", mask_ratio, 0.0, 1.0)
    block = _int("block_size", block_size)
    _, grid_w = _masking_grid(L, block, grid_size)
    cells = L // (block * block)
    keep_cells = int(cells * (1 - ratio))
    if keep_cells < 1:
        raise ValueError(f"mask_ratio={ratio} keeps no patch out of {L} (K = int(L·(1 − mask_ratio)) = 0)")
    device = _normalize_device(device if device is not None else "cpu")
    seed = _draw_seed(generator, device)
    ids_keep, ids_restore, mask = _random_masking_op(seed, B, L, keep_cells * block * block, block, grid_w, device)
    return MaskInfo(ids_keep, ids_restore, mask)


def patchify(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, L, p·p·C] in MAE's order (h w p q c); L = (H/p)·(W/p). Differentiable."""
    imgs, p = _images("imgs", imgs, patch_size)
    return _gather_patches_op(imgs, None, p)


def gather_patches(imgs: torch.Tensor, ids_keep: torch.Tensor, patch_size: int) -> torch.Tensor:
    """The visible patches read straight from the images: equals `patchify(imgs, p)` gathered at ids_keep
    ([B, K, p·p·C]), without building the patchified tensor. Differentiable in imgs (rarely needed; the
    backward is a PyTorch scatter)."""
    imgs, p = _images("imgs", imgs, patch_size)
    B, _, H, W = imgs.shape
    ids = _ids("ids_keep", ids_keep, B, (H // p) * (W // p), "patch indices", "imgs")
    V.same_device(imgs=imgs, ids_keep=ids)
    return _gather_patches_op(imgs, ids, p)


def gather_tokens(x: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
    """x [B, L, D] gathered at ids_keep [B, K] -> [B, K, D] (`torch.gather` with the official repeated index,
    without building it). Differentiable: the backward sums the gradient rows into their positions."""
    x = _tokens("x", x, "[B, L, D]")
    ids = _ids("ids_keep", ids_keep, x.shape[0], x.shape[1], "token indices", "x")
    V.same_device(x=x, ids_keep=ids)
    return _gather_tokens_op(x, ids)


def unshuffle(x_visible: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor,
              pos_embed: torch.Tensor | None = None) -> torch.Tensor:
    """MAE decoder unshuffle: out[b, l] = x_visible[b, ids_restore[b, l]] if ids_restore[b, l] < K else
    mask_token, plus pos_embed[l] when given; [B, L, D] in the promoted dtype of the inputs (as the official
    cat + gather + add). The cls token is the caller's (official: x[:, 1:] in, cat it back after).

    x_visible [B, K, D]; ids_restore [B, L] (L >= K); mask_token with D elements ([1, 1, D] or [D]);
    pos_embed [L, D] or [1, L, D]. One pass: the mask token is broadcast, never repeated in memory.
    Differentiable in x_visible, mask_token and pos_embed.
    """
    x = _tokens("x_visible", x_visible, "[B, K, D]")
    B, K, D = x.shape
    if not isinstance(ids_restore, torch.Tensor) or ids_restore.dim() != 2:
        shape = tuple(ids_restore.shape) if isinstance(ids_restore, torch.Tensor) else type(ids_restore).__name__
        raise ValueError(f"ids_restore must be a [B, L] tensor, got {shape}")
    L = ids_restore.shape[1]
    if L < K:
        raise ValueError(f"ids_restore must be [B, L] with L >= K={K} (x_visible's rows), got L={L}")
    ids = _ids("ids_restore", ids_restore, B, L, "positions", "x_visible", "[B, L]")
    mask_token = V.tensor("mask_token", mask_token, shape_hint="[1, 1, D]")
    if mask_token.numel() != D:
        raise ValueError(f"mask_token must have D={D} elements ([1, 1, D] or [D]), got shape {tuple(mask_token.shape)}")
    pos = None
    if pos_embed is not None:
        pos_embed = V.tensor("pos_embed", pos_embed, shape_hint="[L, D]")
        if (pos_embed.dim() not in (2, 3) or pos_embed.numel() != L * D or pos_embed.shape[-1] != D
                or pos_embed.shape[-2] != L):
            raise ValueError(f"pos_embed must be [L, D] or [1, L, D] with L={L}, D={D}, got shape "
                             f"{tuple(pos_embed.shape)}")
        pos = pos_embed.reshape(L, D)
    V.same_device(x_visible=x, ids_restore=ids, mask_token=mask_token, pos_embed=pos)
    return _unshuffle_op(x, ids, mask_token.reshape(D), pos)


def _detached(x: torch.Tensor) -> torch.Tensor:
    """x cut from the graph; x itself when it is not in one (`detach` is a dispatcher call)."""
    return x.detach() if x.requires_grad else x


def masked_mse_loss(pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor, patch_size: int,
                    norm_pix_loss: bool = True) -> torch.Tensor:
    """The official MAE `forward_loss`: target = patchify(imgs), per patch normalized to mean 0 and
    (unbiased) variance 1 (eps 1e-6) when norm_pix_loss; loss = Σ mask·mean_e (pred − target)² / Σ mask.

    pred [B, L, p·p·C] (MAE patch order), imgs [B, C, H, W], mask [B, L] (1 = masked; bool or floating; a
    floating mask acts as weights). The target is computed on the fly from the images; the fused backward
    gives pred its gradient (imgs and mask get none). Returns an fp32 scalar.
    """
    pred = _tokens("pred", pred, "[B, L, p*p*C]")
    imgs, p = _images("imgs", imgs, patch_size)
    B, C, H, W = imgs.shape
    L, E = (H // p) * (W // p), p * p * C
    if pred.shape != (B, L, E):
        raise ValueError(f"pred must be [B, L, p*p*C] = [{B}, {L}, {E}] for imgs {tuple(imgs.shape)} and "
                         f"patch_size={p}, got {tuple(pred.shape)}")
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor [B, L], got {type(mask).__name__}")
    if mask.dtype == torch.bool:
        mask = mask.float()
    mask = V.tensor("mask", mask, ndim=2, shape_hint=f"[B, L] = [{B}, {L}]")
    if mask.shape != (B, L):
        raise ValueError(f"mask must be [B, L] = [{B}, {L}], got {tuple(mask.shape)}")
    if not isinstance(norm_pix_loss, bool):
        raise TypeError(f"norm_pix_loss must be a bool, got {type(norm_pix_loss).__name__}")
    V.same_device(pred=pred, imgs=imgs, mask=mask)
    if grads_in_forward(pred):
        cfg = (p, norm_pix_loss)
        literal = functools.partial(_masked_mse_literal, cfg) if not use_triton(pred, imgs, mask) else None
        return loss_with_grads(functools.partial(_masked_mse_and_grad, cfg), pred, _detached(imgs), _detached(mask),
                               op="masked_mse_loss", differentiable=literal, hint=TRITON_DOUBLE_BACKWARD)
    loss, _ = _masked_mse_op(pred, imgs, _detached(mask), p, norm_pix_loss)
    return loss


def bert_masking(input_ids: torch.Tensor, mask_token_id: int, vocab_size: int, mlm_probability: float = 0.15,
                 *, special_tokens_mask: torch.Tensor | None = None, replace_prob: float = 0.8,
                 random_prob: float = 0.1, ignore_index: int = -100,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT-style token masking (HF `DataCollatorForLanguageModeling`): each token (not special) is selected
    with probability mlm_probability; a selected token becomes mask_token_id with probability replace_prob,
    a uniform random token in [0, vocab_size) with probability random_prob, and stays otherwise. Returns
    (masked input_ids, labels) with labels = ignore_index where not selected. One elementwise kernel on CUDA,
    seeded like `random_masking` (same Philox streams on both backends)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in _ID_DTYPES:
        raise TypeError("input_ids must be an int64 or int32 tensor")
    if input_ids.numel() == 0:
        raise ValueError(f"input_ids must be non-empty, got shape {tuple(input_ids.shape)}")
    input_ids = input_ids.contiguous()
    mask_token_id = _int("mask_token_id", mask_token_id, 0)
    vocab_size = _int("vocab_size", vocab_size)
    prob = V.in_open_interval("mlm_probability", mlm_probability, 0.0, 1.0)
    rep = float(replace_prob)
    rnd = float(random_prob)
    if not (0.0 <= rep <= 1.0 and 0.0 <= rnd <= 1.0 and rep + rnd <= 1.0):
        raise ValueError(f"replace_prob and random_prob must be in [0, 1] with a sum <= 1, got {rep} and {rnd}")
    special = None
    if special_tokens_mask is not None:
        if not isinstance(special_tokens_mask, torch.Tensor) or special_tokens_mask.shape != input_ids.shape:
            raise ValueError(f"special_tokens_mask must be a tensor shaped like input_ids {tuple(input_ids.shape)}")
        special = special_tokens_mask.to(torch.int8).contiguous()
        V.same_device(input_ids=input_ids, special_tokens_mask=special)
    device = _normalize_device(input_ids.device)
    seed = _draw_seed(generator, device)
    rnd_cond = rnd / (1.0 - rep) if rep < 1.0 else 0.0
    return _bert_masking_op(seed, input_ids, special, mask_token_id, vocab_size, prob, rep, rnd_cond,
                            _int("ignore_index", ignore_index, -(1 << 62)))
