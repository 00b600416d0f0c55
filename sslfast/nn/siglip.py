"""SigLIP's loss as a module with its learnable temperature and bias (argument names follow open_clip)."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..distributed import rank_and_world
from ..ops import siglip as _ops

_DIST_IMPLS = (None, "bidir", "shift", "reduce", "gather")


class SigLIPLoss(nn.Module):
    """Pairwise sigmoid loss (`sslfast.siglip_loss`) with the paper's learnable parameters:

        L = −(1/N) Σ_ij log σ(z_ij (t · x̂_i·ŷ_j + b)),   t = exp(logit_scale), b = logit_bias

    `logit_scale` is stored as a log (initialized to log 10) and `logit_bias` initialized to −10, as in Zhai et
    al. (2023). `forward(image_features, text_features, logit_scale=None, logit_bias=None, output_dict=False)`:
    pass `logit_scale` (already exponentiated) and `logit_bias` to use a model's own parameters, as open_clip's
    `SigLipLoss.forward` takes them; without them the module's parameters are used.

    Constructor arguments as open_clip's `SigLipLoss(cache_labels, rank, world_size, dist_impl, bidir)`, with
    these differences:

    * `cache_labels` is accepted and has no effect: no label matrix is built (nor any N x N tensor);
    * `world_size > 1` turns on the distributed loss; `rank` and `world_size` must then match
      torch.distributed's (a ValueError otherwise). Every `dist_impl` ("bidir", "shift", "reduce", "gather",
      None) and `bidir` give the same loss and gradients (each rank's images against all texts, divided by the
      local batch, as open_clip): this module always all-gathers the texts, whose backward sums the gradients
      over ranks, rather than exchanging them between neighbours;
    * `init_logit_scale` / `init_logit_bias` (keyword-only) set the parameters' initial values.
    """

    def __init__(
        self,
        cache_labels: bool = False,
        rank: int = 0,
        world_size: int = 1,
        dist_impl: str | None = None,
        bidir: bool = True,
        *,
        init_logit_scale: float = math.log(10.0),
        init_logit_bias: float = -10.0,
    ):
        """
        Args:
            cache_labels: accepted for open_clip's signature; no effect.
            rank, world_size: this process's rank and the world size (world_size > 1: the distributed loss).
            dist_impl: one of None, "bidir", "shift", "reduce", "gather" (all give the same loss here).
            bidir: accepted for open_clip's signature; no effect.
            init_logit_scale: the initial log t.
            init_logit_bias: the initial b.

        Raises:
            ValueError: an unknown `dist_impl`, world_size not an int >= 1, or rank not in [0, world_size).
        """
        super().__init__()
        if dist_impl not in _DIST_IMPLS:
            raise ValueError(f"dist_impl must be one of {_DIST_IMPLS}, got {dist_impl!r}")
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be an integer >= 1, got {world_size!r}")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be an integer in [0, world_size={world_size}), got {rank!r}")
        self.cache_labels = cache_labels
        self.rank, self.world_size = rank, world_size
        self.dist_impl, self.bidir = dist_impl, bidir
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))
        self.logit_bias = nn.Parameter(torch.tensor(float(init_logit_bias)))

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor | None = None,
        logit_bias: torch.Tensor | None = None,
        output_dict: bool = False,
    ):
        """
        Args:
            image_features, text_features: [N, D].
            logit_scale: t, already exponentiated (a model's own); None uses exp(self.logit_scale).
            logit_bias: b (a model's own); None uses self.logit_bias.
            output_dict: return {"contrastive_loss": loss}, as open_clip.

        Returns:
            The loss, a 0-d fp32 tensor (fp64 for fp64 inputs), or the dict.

        Raises:
            ValueError: rank and world_size differ from torch.distributed's; otherwise as `sslfast.siglip_loss`.
            TypeError: as `sslfast.siglip_loss`.
        """
        gather = self.world_size > 1
        if gather and rank_and_world() != (self.rank, self.world_size):
            raise ValueError(
                f"rank={self.rank} and world_size={self.world_size} do not match torch.distributed's "
                f"(rank, world_size) = {rank_and_world()}"
            )
        scale = self.logit_scale.exp() if logit_scale is None else logit_scale
        bias = self.logit_bias if logit_bias is None else logit_bias
        loss = _ops.siglip_loss(image_features, text_features, scale, bias, gather_distributed=gather)
        return {"contrastive_loss": loss} if output_dict else loss
