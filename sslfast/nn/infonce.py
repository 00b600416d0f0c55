"""Contrastive loss modules (names and call signatures follow lightly)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import _validate as V
from ..distributed import all_gather
from ..ops import infonce as _ops


def _bank_size(memory_bank_size) -> tuple[int, int | None]:
    """lightly's `memory_bank_size`: (K, D), or an int K (lightly < 1.6; D is taken from the first batch)."""
    is_int = lambda x: isinstance(x, int) and not isinstance(x, bool)  # noqa: E731
    if is_int(memory_bank_size):
        size, dim = memory_bank_size, None
    elif (
        isinstance(memory_bank_size, (tuple, list))
        and len(memory_bank_size) == 2
        and all(map(is_int, memory_bank_size))
    ):
        size, dim = memory_bank_size
    else:
        raise TypeError(
            "memory_bank_size must be an int K or a (K, D) tuple of ints (gather_distributed is the "
            f"third argument, as in lightly), got {memory_bank_size!r}"
        )
    if size < 0 or (dim is not None and size > 0 and dim <= 0):
        raise ValueError(f"memory_bank_size must be K >= 0 or (K, D) with D > 0, got {memory_bank_size!r}")
    return size, dim


class _KeyQueue(nn.Module):
    """A [queue_size, D] buffer of L2-normalized keys (no gradient): MoCo's queue, lightly's memory bank.

    Created at construction when D is known, else at the first call; it is drawn as lightly and MoCo do,
    normalize(randn(queue_size, D)), on the CPU generator whatever the device (same seed, same bank as
    lightly), and takes the dtype and device of the inputs. The keys of a step enter the queue *after* that
    step: they are held and written into the buffer in place at the start of the next call (or by `flush()`),
    never by copying the queue, so the queue the current loss saved for its backward is not modified before
    that backward runs. With `gather_distributed` the enqueued keys are gathered from every rank.

    `drop_overflow` picks what a batch that reaches the end of the buffer does: written up to the end, the
    rest dropped and the pointer reset to 0 (lightly's MemoryBankModule), or wrapped around (a ring).
    """

    def __init__(self, queue_size: int, embedding_dim: int | None, gather_distributed: bool, *, drop_overflow: bool):
        super().__init__()
        if isinstance(queue_size, bool) or not isinstance(queue_size, int) or queue_size < 0:
            raise ValueError(f"queue_size must be an int >= 0, got {queue_size!r}")
        self.queue_size = queue_size
        self.gather_distributed = gather_distributed
        self.drop_overflow = drop_overflow
        self.register_buffer("queue", None)
        self._ptr = 0  # host-side ring position: enqueueing never syncs with the device
        self._pending: torch.Tensor | None = None
        if queue_size and embedding_dim is not None:
            self._init_queue(embedding_dim, torch.float32, None)
        self.register_state_dict_pre_hook(lambda module, prefix, keep_vars: module.flush())

    def get_extra_state(self):
        return {"queue_ptr": self._ptr}

    def set_extra_state(self, state):
        self._ptr = int(state["queue_ptr"])

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if self.queue is None and prefix + "queue" in state_dict:  # lazily created queue: take its shape
            self.queue = torch.empty_like(state_dict[prefix + "queue"])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _init_queue(self, dim: int, dtype: torch.dtype, device) -> None:
        self.queue = F.normalize(torch.randn(self.queue_size, dim), dim=1).to(device=device, dtype=dtype)

    @torch.no_grad()
    def flush(self) -> None:
        """Writes the held keys into the buffer (in place)."""
        keys, self._pending = self._pending, None
        if keys is None:
            return
        ptr, size = self._ptr, self.queue_size
        if self.drop_overflow and ptr + keys.shape[0] >= size:
            self.queue[ptr:].copy_(keys[: size - ptr])
            self._ptr = 0
            return
        keys = keys[-size:]
        n = keys.shape[0]
        head = min(n, size - ptr)
        self.queue[ptr : ptr + head].copy_(keys[:head])
        self.queue[: n - head].copy_(keys[head:])
        self._ptr = (ptr + n) % size

    def _negatives(self, like: torch.Tensor) -> torch.Tensor:
        """The queue as it stands before this step, in the dtype and on the device of `like`."""
        if self.queue is None:
            self._init_queue(like.shape[1], like.dtype, like.device)
        elif self.queue.dtype != like.dtype or self.queue.device != like.device:
            self.queue = self.queue.to(device=like.device, dtype=like.dtype)
        self.flush()
        return self.queue

    @torch.no_grad()
    def _enqueue(self, key: torch.Tensor) -> None:
        """Holds norm(key) for the next `flush` (normalized in at least float32)."""
        work = torch.promote_types(key.dtype, torch.float32)
        keys = F.normalize(key.detach().to(work), dim=1).to(self.queue.dtype)
        self._pending = all_gather(keys) if self.gather_distributed else keys


def _updates_queue(module: nn.Module) -> bool:
    """Queues and banks take a step's keys only in training mode with gradients enabled (never in `eval()`,
    under `torch.no_grad()` or `torch.inference_mode()`)."""
    return module.training and torch.is_grad_enabled()


class NTXentLoss(nn.Module):
    """lightly's `NTXentLoss(temperature, memory_bank_size, gather_distributed)`, same arguments, same numbers.

    Without a memory bank (`memory_bank_size=0`): SimCLR's NT-Xent over the 2N views (`sf.nt_xent_loss`).
    With one (`memory_bank_size` = K or (K, D)), MoCo's loss as lightly computes it: with q̂ = norm(out0),
    k̂ = norm(out1) and the bank's K unit rows b_j,

        loss = mean_i −log( exp(q̂_i·k̂_i/τ) / (exp(q̂_i·k̂_i/τ) + Σ_j exp(q̂_i·b_j/τ)) )

    (`sf.info_nce_loss` with the bank as its queue; the gradient reaches out0 and out1, never the bank).
    The bank holds no gradient; after the loss, norm(out1) enters it (gathered over ranks with
    `gather_distributed`) when lightly would (out0 requires grad) and, unlike lightly, only in training mode
    with gradients enabled. A batch reaching the bank's end fills it up to the end, the rest is dropped and
    the pointer returns to 0, as in lightly's MemoryBankModule. The bank is `memory_bank.queue`, [K, D], in
    the state dict (lightly's is not saved).
    """

    def __init__(
        self, temperature: float = 0.5, memory_bank_size: int | tuple[int, int] = 0, gather_distributed: bool = False
    ):
        """
        Args:
            temperature: τ > 0.
            memory_bank_size: 0 (no bank: NT-Xent), K, or (K, D) (a bank of K keys of width D; with an int
                K, D is taken from the first batch).
            gather_distributed: all-gather over ranks (NT-Xent's rows, or the keys entering the bank).

        Raises:
            ValueError: τ not a finite number > 0, or a negative K or non-positive D.
            TypeError: τ not a real number, `memory_bank_size` not an int or a pair of ints, or
                `gather_distributed` not a bool.
        """
        super().__init__()
        V.positive("temperature", temperature)
        if not isinstance(gather_distributed, bool):
            raise TypeError(f"gather_distributed must be a bool, got {type(gather_distributed).__name__}")
        size, dim = _bank_size(memory_bank_size)
        self.temperature = temperature
        self.gather_distributed = gather_distributed
        self.memory_bank = _KeyQueue(size, dim, gather_distributed, drop_overflow=True) if size else None

    def forward(self, out0: torch.Tensor, out1: torch.Tensor) -> torch.Tensor:
        """
        Args:
            out0, out1: [N, D] projections of the two views (or queries and keys, with a bank).

        Returns:
            The loss, a 0-d fp32 tensor (fp64 for fp64 inputs).

        Raises:
            ValueError, TypeError: as `sslfast.nt_xent_loss` (`sslfast.info_nce_loss` with a bank), naming
                out0 / out1.
        """
        if self.memory_bank is None:
            return _ops.nt_xent_loss(out0, out1, self.temperature, gather_distributed=self.gather_distributed)
        out0, out1 = V.view_pair("out0", out0, "out1", out1)
        loss = _ops.info_nce_loss(out0, out1, self.memory_bank._negatives(out1), self.temperature)
        if _updates_queue(self) and out0.requires_grad:
            self.memory_bank._enqueue(out1)
        return loss


class InfoNCELoss(_KeyQueue):
    """MoCo's InfoNCE. With `queue_size > 0` the module owns a [queue_size, D] ring buffer of normalized keys
    (MoCo v1/v2, `_KeyQueue`); with `queue_size == 0` the other keys of the batch are the negatives (MoCo v3).

    After the loss the step's keys enter the queue (wrapping around its end) in training mode with gradients
    enabled; in `eval()` or under `torch.no_grad()` the queue is left as it is. With `gather_distributed` the
    enqueued keys are gathered from every rank (and, without a queue, the batch negatives too).
    """

    def __init__(
        self,
        temperature: float = 0.2,
        queue_size: int = 65536,
        embedding_dim: int | None = None,
        gather_distributed: bool = False,
    ):
        """
        Args:
            temperature: τ > 0.
            queue_size: K >= 0 keys in the queue; 0 uses the batch's other keys as negatives (MoCo v3).
            embedding_dim: D, to create the queue now; None creates it at the first call.
            gather_distributed: gather the enqueued keys (and, without a queue, the negatives) over ranks.

        Raises:
            ValueError: K not an int >= 0, or τ not a finite number > 0.
            TypeError: τ not a real number.
        """
        super().__init__(queue_size, embedding_dim, gather_distributed, drop_overflow=False)
        V.positive("temperature", temperature)
        self.temperature = temperature

    def forward(self, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """
        Args:
            query, key: [N, D] (the key usually from the momentum encoder, without gradient).

        Returns:
            The loss, a 0-d fp32 tensor (fp64 for fp64 inputs).

        Raises:
            ValueError, TypeError: as `sslfast.info_nce_loss`.
        """
        if self.queue_size == 0:
            return _ops.info_nce_loss(query, key, None, self.temperature, gather_distributed=self.gather_distributed)
        query, key = V.view_pair("query", query, "key", key)
        loss = _ops.info_nce_loss(query, key, self._negatives(query), self.temperature)
        if _updates_queue(self):
            self._enqueue(key)
        return loss


class CLIPLoss(nn.Module):
    """Symmetric CLIP loss; `logit_scale` is passed per call (a learnable tensor, usually `scale.exp()`)."""

    def __init__(self, gather_distributed: bool = False):
        """
        Args:
            gather_distributed: open_clip's local loss over ranks (see `sslfast.clip_loss`).
        """
        super().__init__()
        self.gather_distributed = gather_distributed

    def forward(
        self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor
    ) -> torch.Tensor:
        """
        Args:
            image_features, text_features: [B, D].
            logit_scale: one-element floating tensor, already exponentiated.

        Returns:
            The loss, a 0-d fp32 tensor (fp64 for fp64 inputs).

        Raises:
            ValueError, TypeError: as `sslfast.clip_loss`.
        """
        return _ops.clip_loss(image_features, text_features, logit_scale, gather_distributed=self.gather_distributed)
