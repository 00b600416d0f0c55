"""Contrastive loss modules (names and call signatures follow lightly)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import all_gather
from ..ops import infonce as _ops


class NTXentLoss(nn.Module):
    """SimCLR loss over two views; equals lightly `NTXentLoss(temperature, memory_bank_size=0)`."""

    def __init__(self, temperature: float = 0.5, gather_distributed: bool = False):
        super().__init__()
        self.temperature = temperature
        self.gather_distributed = gather_distributed

    def forward(self, out0: torch.Tensor, out1: torch.Tensor) -> torch.Tensor:
        return _ops.nt_xent_loss(out0, out1, self.temperature, gather_distributed=self.gather_distributed)


class InfoNCELoss(nn.Module):
    """MoCo's InfoNCE. With `queue_size > 0` the module owns a [queue_size, D] buffer of normalized keys
    (MoCo v1/v2); with `queue_size == 0` the other keys of the batch are the negatives (MoCo v3).

    The keys of a step enter the queue *after* that step: they are held and written into the ring buffer
    in place at the start of the next call (or by `flush()`), never by copying the queue, so the queue the
    current loss saved for its backward is not modified before that backward runs. With
    `gather_distributed` the enqueued keys are gathered from every rank (and, without a queue, the batch
    negatives too).
    """

    def __init__(self, temperature: float = 0.2, queue_size: int = 65536, embedding_dim: int | None = None,
                 gather_distributed: bool = False):
        super().__init__()
        if queue_size < 0:
            raise ValueError(f"queue_size must be >= 0, got {queue_size}")
        self.temperature = temperature
        self.queue_size = queue_size
        self.gather_distributed = gather_distributed
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
        # MoCo initializes the queue with random unit vectors.
        self.queue = F.normalize(torch.randn(self.queue_size, dim, device=device), dim=1).to(dtype)

    @torch.no_grad()
    def flush(self) -> None:
        """Writes the held keys into the ring buffer (in place)."""
        keys, self._pending = self._pending, None
        if keys is None:
            return
        keys = keys[-self.queue_size:]
        ptr, n = self._ptr, keys.shape[0]
        head = min(n, self.queue_size - ptr)
        self.queue[ptr:ptr + head].copy_(keys[:head])
        self.queue[: n - head].copy_(keys[head:])
        self._ptr = (ptr + n) % self.queue_size

    def forward(self, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        if self.queue_size == 0:
            return _ops.info_nce_loss(query, key, None, self.temperature, gather_distributed=self.gather_distributed)
        if self.queue is None:
            self._init_queue(key.shape[1], key.dtype, key.device)
        elif self.queue.dtype != query.dtype or self.queue.device != query.device:
            self.queue = self.queue.to(device=query.device, dtype=query.dtype)
        self.flush()
        loss = _ops.info_nce_loss(query, key, self.queue, self.temperature)
        with torch.no_grad():
            keys = F.normalize(key.detach().float(), dim=1).to(self.queue.dtype)
            self._pending = all_gather(keys) if self.gather_distributed else keys
        return loss


class CLIPLoss(nn.Module):
    """Symmetric CLIP loss; `logit_scale` is passed per call (a learnable tensor, usually `scale.exp()`)."""

    def __init__(self, gather_distributed: bool = False):
        super().__init__()
        self.gather_distributed = gather_distributed

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor,
                logit_scale: torch.Tensor) -> torch.Tensor:
        return _ops.clip_loss(image_features, text_features, logit_scale, gather_distributed=self.gather_distributed)
