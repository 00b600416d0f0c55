"""MAE masking ops: `random_masking` (per-sample permutations of the patches, optionally in s×s blocks) and
`bert_masking` (BERT's 80/10/10 token masking). Both draw one int64 seed from the caller's generator and run
Philox on it, one kernel per call on CUDA with no host synchronization, and the same streams on the PyTorch
path (`sslfast.ops._torch.mae.philox`), so one generator state gives the same masks on either backend.
"""

from __future__ import annotations

import functools
import math
from numbers import Integral

import torch

from .. import _validate as V
from .._custom_op import custom_op
from .mae_common import FAMILY, ID_DTYPES, MaskInfo, check_int

_SEED_HIGH = 1 << 62
_impl = FAMILY.impl


@functools.lru_cache(maxsize=16)
def _device_probe(device: torch.device) -> torch.Tensor:
    """An empty tensor on `device`, for the backend choice of ops that take no tensor (one per device)."""
    with torch.inference_mode(False):
        return torch.empty(0, device=device)


# ------------------------------------------------------------------------------------------- custom ops
def _fake_masking(seed, batch, num_patches, keep, block, grid_w, device):
    return (
        torch.empty(batch, keep, dtype=torch.int64, device=device),
        torch.empty(batch, num_patches, dtype=torch.int64, device=device),
        torch.empty(batch, num_patches, dtype=torch.float32, device=device),
    )


@custom_op("mae_random_masking", fake=_fake_masking)
def _random_masking_op(
    seed: torch.Tensor, batch: int, num_patches: int, keep: int, block: int, grid_w: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    impl = _impl(_device_probe(device))
    return impl.random_masking(seed, batch, num_patches, keep, block, grid_w, device)


def _fake_bert_masking(
    seed, input_ids, special, mask_token_id, vocab_size, prob, replace_prob, random_prob, ignore_index
):
    return torch.empty_like(input_ids), torch.empty_like(input_ids)


@custom_op("mae_bert_masking", fake=_fake_bert_masking)
def _bert_masking_op(
    seed: torch.Tensor,
    input_ids: torch.Tensor,
    special: torch.Tensor | None,
    mask_token_id: int,
    vocab_size: int,
    prob: float,
    replace_prob: float,
    random_prob: float,
    ignore_index: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    impl = _impl(input_ids, special)
    return impl.bert_masking(
        seed, input_ids, special, mask_token_id, vocab_size, prob, replace_prob, random_prob, ignore_index
    )


def _normalize_device(device, name: str = "device") -> torch.device:
    """`device` as a torch.device with its CUDA index filled in. An unknown device string, or a CUDA device
    this process cannot use, is a ValueError naming `name`, raised before anything runs (instead of torch's
    "not compiled with CUDA" AssertionError from deep inside the first allocation)."""
    if not isinstance(device, (str, int, torch.device)) or isinstance(device, bool):
        raise TypeError(f"{name} must be a torch.device or a device string (e.g. 'cuda'), got {type(device).__name__}")
    try:
        device = torch.device(device)
    except RuntimeError:
        raise ValueError(f"{name} must name a device (e.g. 'cpu', 'cuda', 'cuda:1'), got {device!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"{name}={str(device)!r} was requested but CUDA is not available (no GPU, or this "
                "torch build has no CUDA support)"
            )
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


def _masking_grid(num_patches: int, block: int, grid_size) -> tuple[int, int]:
    if block == 1 and grid_size is None:
        return 1, num_patches
    if grid_size is None:
        h = math.isqrt(num_patches)
        if h * h != num_patches:
            raise ValueError(
                f"grid_size (h, w) is needed for block masking when num_patches={num_patches} is not a square"
            )
        grid_size = (h, h)
    if (
        not isinstance(grid_size, (tuple, list))
        or len(grid_size) != 2
        or any(isinstance(g, bool) or not isinstance(g, Integral) or g < 1 for g in grid_size)
    ):
        raise ValueError(f"grid_size must be a pair of positive ints (h, w), got {grid_size!r}")
    h, w = int(grid_size[0]), int(grid_size[1])
    if h * w != num_patches:
        raise ValueError(f"grid_size {h}x{w} must hold num_patches={num_patches} patches")
    if h % block or w % block:
        raise ValueError(f"grid_size {h}x{w} must be divisible by block_size={block}")
    return h, w


# ------------------------------------------------------------------------------------------- public API
def random_masking(
    batch_size: int,
    num_patches: int,
    mask_ratio: float,
    *,
    device=None,
    generator: torch.Generator | None = None,
    block_size: int = 1,
    grid_size: tuple[int, int] | None = None,
) -> MaskInfo:
    """MAE random masking: every sample keeps exactly K = int(L·(1 − mask_ratio)) patches, as the official code.

    Returns `MaskInfo(ids_keep [B, K], ids_restore [B, L], mask [B, L])` (int64, int64, fp32; mask 1 =
    masked). The permutation is the stable argsort of per-patch Philox noise, one kernel per call on CUDA with
    no host synchronization; it is a function of one seed drawn from `generator` (a CPU generator, or one on
    `device`; the device's default generator when None), so the same generator state gives the same mask on
    either backend.

    Block-wise (SimMIM style) masking: with `block_size=s > 1`, the h×w patch grid (`grid_size`, default
    square) is cut into s×s cells that are kept or masked whole; K = int(L/s²·(1 − mask_ratio))·s². BEiT's
    rejection-sampled rectangles are not offered (their count varies per sample).

    Args:
        batch_size: B >= 1.
        num_patches: L >= 1, the patches of one image.
        mask_ratio: the masked fraction, in (0, 1).
        device: where the outputs live (default CPU); a CUDA device must be usable by this process.
        generator: a CPU `torch.Generator` or one on `device`; None: `device`'s default generator.
        block_size: s, the side of the s×s cells kept or masked whole (1: single patches).
        grid_size: (h, w) of the patch grid, h·w = L (default square); needed for blocks on a non-square grid.

    Returns:
        `MaskInfo(ids_keep, ids_restore, mask)`.

    Raises:
        TypeError: a count that is not an int, a `device` or `generator` of the wrong type.
        ValueError: a count below 1, a ratio outside (0, 1) or one that keeps no patch, a grid that does not
            hold L patches or is not divisible by `block_size`, an unusable device, a generator on another device.
    """
    B = check_int("batch_size", batch_size)
    L = check_int("num_patches", num_patches)
    ratio = V.in_open_interval("mask_ratio", mask_ratio, 0.0, 1.0)
    block = check_int("block_size", block_size)
    _, grid_w = _masking_grid(L, block, grid_size)
    cells = L // (block * block)
    keep_cells = int(cells * (1 - ratio))
    if keep_cells < 1:
        raise ValueError(f"mask_ratio={ratio} keeps no patch out of {L} (K = int(L·(1 − mask_ratio)) = 0)")
    device = _normalize_device(device if device is not None else "cpu")
    seed = _draw_seed(generator, device)
    ids_keep, ids_restore, mask = _random_masking_op(seed, B, L, keep_cells * block * block, block, grid_w, device)
    return MaskInfo(ids_keep, ids_restore, mask)


def bert_masking(
    input_ids: torch.Tensor,
    mask_token_id: int,
    vocab_size: int,
    mlm_probability: float = 0.15,
    *,
    special_tokens_mask: torch.Tensor | None = None,
    replace_prob: float = 0.8,
    random_prob: float = 0.1,
    ignore_index: int = -100,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT-style token masking (HF `DataCollatorForLanguageModeling`): each token (not special) is selected
    with probability mlm_probability; a selected token becomes mask_token_id with probability replace_prob,
    a uniform random token in [0, vocab_size) with probability random_prob, and stays otherwise. Returns
    (masked input_ids, labels) with labels = ignore_index where not selected. One elementwise kernel on CUDA,
    seeded like `random_masking` (same Philox streams on both backends).

    Args:
        input_ids: int64 or int32 token ids, any non-empty shape.
        mask_token_id: the id written where a token is replaced by the mask token (>= 0).
        vocab_size: random replacements are uniform in [0, vocab_size).
        mlm_probability: the selection probability, in (0, 1).
        special_tokens_mask: tokens never selected (nonzero = special), shaped like input_ids; None: none.
        replace_prob: P(mask token | selected).
        random_prob: P(random token | selected); replace_prob + random_prob <= 1.
        ignore_index: the label of tokens not selected.
        generator: a CPU `torch.Generator` or one on input_ids' device; None: the device's default generator.

    Returns:
        (masked input_ids, labels), both in input_ids' dtype and shape.

    Raises:
        TypeError: input_ids not an integer tensor, a non-int id or size, a generator of the wrong type.
        ValueError: empty input_ids, probabilities out of range, a special_tokens_mask of another shape or
            device, a generator on another device.
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in ID_DTYPES:
        raise TypeError("input_ids must be an int64 or int32 tensor")
    if input_ids.numel() == 0:
        raise ValueError(f"input_ids must be non-empty, got shape {tuple(input_ids.shape)}")
    input_ids = input_ids.contiguous()
    mask_token_id = check_int("mask_token_id", mask_token_id, 0)
    vocab_size = check_int("vocab_size", vocab_size)
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
    return _bert_masking_op(
        seed,
        input_ids,
        special,
        mask_token_id,
        vocab_size,
        prob,
        rep,
        rnd_cond,
        check_int("ignore_index", ignore_index, -(1 << 62)),
    )
