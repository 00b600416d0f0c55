"""SwAV (Caron et al., 2020, "Unsupervised Learning of Visual Features by Contrasting Cluster Assignments",
arXiv:2006.09882; facebookresearch/swav main_swav.py).

Network: backbone → projection head 2048 → 2048 (BN, ReLU) → 128, L2-normalized embedding z → prototypes, a
bias-free Linear(128, K = 3000) whose weight rows are L2-normalized under no_grad at the start of every
forward (main_swav.py normalizes them at the start of each iteration), so the scores are cosines
s = z Cᵀ. Multi-crop (the `swav` preset): 2 × 224 + 6 × 96 crops, each resolution batched through the
backbone once, the head over all crops together. Codes: for each global crop i,
q_i = Sinkhorn-Knopp(exp(s_i / ε)) with ε = 0.05 and 3 iterations on the detached scores (`sf.sinkhorn_knopp`,
over the global batch with `gather_distributed`, as `distributed_sinkhorn`). Loss: the swapped prediction

    L = 1/2 Σ_{i < 2} 1/(V − 1) Σ_{v ≠ i} mean_b −Σ_k q_i[b, k] log softmax(s_v[b] / τ)_k,   τ = 0.1

with `fused_head=True` (the default) fused with the prototypes layer: the codes from the detached embeddings
and prototypes (`sf.prototype_teacher_probs`, mode="sinkhorn", per global crop) and the cross-entropy from z and
C (`sf.prototype_cross_entropy`, through `sslfast.nn.heads.multicrop_prototype_loss`), so the [V·B, K] scores,
their softmax and their gradient are never stored (the [G·B, K] codes remain). `fused_head=False`: the
materialized scores `prototypes(z)` into `sf.swav_loss`. Both give the same loss and gradients up to rounding,
and keep the parameters (`prototypes.weight`). The prototypes get no gradient during the first epoch
("freeze_prototypes_niters", one epoch in every published script). Queue (for small batches, main_swav.py's
`queue_length` / `epoch_queue_starts`; off by default, as in main_swav.py and the batch-4096 scripts): from epoch
`epoch_queue_starts` on, the embeddings of the global crops of past batches are kept (`queue_length` in all,
split evenly over the ranks, per global crop); once the queue is full, their scores against the current
prototypes are stacked above the batch's scores before Sinkhorn and only the batch's codes are used (fused:
the queue's embeddings are stacked above the batch's before `sf.prototype_teacher_probs`, whose scores are the
same rows, so the queue runs fused too).

RECIPE (scripts/swav_800ep_pretrain.sh, the paper's batch-4096 setting): LARS (main_swav.py: SGD wrapped in
LARC, trust coefficient 0.001), lr 4.8 at batch 4096, i.e. 0.3 · B/256, momentum 0.9, weight decay 1e-6, 10
warm-up epochs, then cosine. Deviations: the cosine goes to 0 (SwAV's goes to final_lr = lr/1000 = 0.0048 at
4096, and its warm-up starts at 0.3 instead of 0); biases and BN parameters are excluded from weight decay and
LARS adaptation (as in every LARS recipe here; LARC adapts and decays them too). SMALL (CPU digits demo): head
256 → 64, K = 100 prototypes, no queue, LARS lr 0.1 · B/256, 1 warm-up epoch. On the digits the embeddings
drift together as training goes on (mean pairwise cosine ≈ 0.3 at init, ≈ 0.7 after 4 epochs at lr 0.1, ≈ 0.9
at lr 0.3, the loss nearing log K); kNN after 10 epochs at batch 128 was best at lr 0.1 (73.0%; 71.0% at 0.3,
66.6% at 1.0; random init 63.2%).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import rank_and_world
from ..models.layers import mlp
from ..nn.heads import multicrop_prototype_loss
from ..ops.prototype_ce import prototype_teacher_probs
from ..ops.sinkhorn import sinkhorn_knopp
from ..ops.swav import swav_loss
from .base import BenchStep, Method, check_views, loss_region
from .dino import _multicrop


def _positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _non_negative(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not value >= 0 or value == float("inf"):
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return float(value)


class SwAV(Method):
    """SwAV: each crop predicts the Sinkhorn codes of the other global crops over learned prototypes.

    Args:
        backbone: the trunk (`num_features` wide).
        hidden_dim: the projector's hidden width.
        out_dim: the projection width.
        num_prototypes: the number of prototypes K.
        temperature: the softmax temperature of the predictions.
        epsilon: the Sinkhorn entropy regularization ε.
        sinkhorn_iterations: Sinkhorn-Knopp iterations.
        num_global_crops: the leading views whose codes are computed.
        freeze_prototypes_epochs: epochs during which the prototypes get no update.
        queue_length: embeddings kept per global crop over all ranks (0: no queue).
        epoch_queue_starts: the epoch from which the queue is used.
        gather_distributed: the Sinkhorn normalization over the global batch (all ranks).
        fused_head: the prototypes layer fused with the codes and the loss, without the [V·B, K] scores (module
            docstring); False: the materialized scores and `sf.swav_loss`.

    Raises:
        TypeError: a size or count is not an int, a temperature / epoch is not a number, or fused_head is not a
            bool.
        ValueError: a size or count is below 1 (`queue_length` below 0, or below the world size when not 0),
            `temperature` or `epsilon` is not > 0, or an epoch count is negative or not finite.
    """

    name = "swav"
    preset = "swav"
    default_backbone = {"small": "resnet_tiny", "paper": "resnet50"}
    min_batch_per_rank = 2  # BN in the projection head
    bench_step = BenchStep()  # ResNet-50, batch 256, 2 × 224 + 6 × 96 crops
    fsdp_refusal = (
        "swav rescales its prototypes in place at the start of every forward, on the gathered copy that FSDP2 "
        "frees afterwards (the sharded prototypes would never be normalized); use --strategy ddp"
    )
    graph_refusal = (
        "swav starts its queue and unfreezes its prototypes at epochs counted on the host; a captured step "
        "would keep the capture-time choice (use --compile)"
    )
    RECIPE = dict(optimizer="lars", lr=0.3, weight_decay=1e-6, warmup_epochs=10, momentum=0.9)
    SMALL = dict(hidden_dim=256, out_dim=64, num_prototypes=100, queue_length=0, lr=0.1, warmup_epochs=1)

    def __init__(
        self,
        backbone,
        *,
        hidden_dim: int = 2048,
        out_dim: int = 128,
        num_prototypes: int = 3000,
        temperature: float = 0.1,
        epsilon: float = 0.05,
        sinkhorn_iterations: int = 3,
        num_global_crops: int = 2,
        freeze_prototypes_epochs: float = 1.0,
        queue_length: int = 0,
        epoch_queue_starts: float = 15,
        gather_distributed: bool = False,
        fused_head: bool = True,
    ):
        for key, value in (
            ("hidden_dim", hidden_dim),
            ("out_dim", out_dim),
            ("num_prototypes", num_prototypes),
            ("sinkhorn_iterations", sinkhorn_iterations),
            ("num_global_crops", num_global_crops),
        ):
            _positive_int(key, value)
        _positive_int("queue_length", queue_length, minimum=0)
        for key, value in (("temperature", temperature), ("epsilon", epsilon)):
            if not _non_negative(key, value) > 0:
                raise ValueError(f"{key} must be > 0, got {value}")
        if not isinstance(fused_head, bool):
            raise TypeError(f"fused_head must be a bool, got {type(fused_head).__name__}")
        super().__init__(backbone, gather_distributed=gather_distributed)
        self.fused_head = fused_head
        self.temperature, self.epsilon = float(temperature), float(epsilon)
        self.sinkhorn_iterations, self.num_global_crops = sinkhorn_iterations, num_global_crops
        self.freeze_prototypes_epochs = _non_negative("freeze_prototypes_epochs", freeze_prototypes_epochs)
        self.epoch_queue_starts = _non_negative("epoch_queue_starts", epoch_queue_starts)
        self.projector = mlp(self.feature_dim, hidden_dim, out_dim, 2)
        self.prototypes = nn.Linear(out_dim, num_prototypes, bias=False)
        # main_swav.py: queue_length // world_size rows per rank
        world = rank_and_world()[1] if gather_distributed else 1
        rows = queue_length // world
        if queue_length and rows == 0:
            raise ValueError(f"queue_length must be 0 or at least the world size {world}, got {queue_length}")
        self.register_buffer("queue", torch.zeros(num_global_crops, rows, out_dim) if rows else None)
        self.register_buffer("queue_count", torch.zeros((), dtype=torch.long))  # embeddings pushed so far

    @torch.no_grad()
    def normalize_prototypes(self) -> None:
        """Rescales every prototype (row of `prototypes.weight`) to unit L2 norm, in place."""
        w = self.prototypes.weight
        w.copy_(F.normalize(w, dim=1))

    def forward(self, views):
        G = self.num_global_crops
        check_views(self.name, views, max(G, 2))
        B = views[0].shape[0]
        if any(v.shape[0] != B for v in views):
            raise ValueError(f"swav needs views of one batch size, got {[v.shape[0] for v in views]}")
        self.normalize_prototypes()
        z = F.normalize(self.projector(_multicrop(self.backbone, views)), dim=1)
        if self.fused_head:
            w = self.prototypes.weight
            with loss_region(z):
                codes = self._codes(z[: G * B].detach(), B, weight=w.detach())
                return multicrop_prototype_loss(
                    z, w.to(z.dtype), codes, num_global_crops=G, student_temp=self.temperature
                )
        scores = self.prototypes(z)  # [V·B, K] cosines, crop-major
        with loss_region(scores):
            codes = self._codes(z[: G * B].detach(), B, scores=scores[: G * B].detach())
            return swav_loss(scores, codes, temperature=self.temperature, num_global_crops=G)

    @torch.no_grad()
    def _codes(
        self, z: torch.Tensor, batch: int, *, scores: torch.Tensor | None = None, weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Sinkhorn codes [G·B, K] of the global crops (their queue's stacked above once it is full), then the
        queue update (main_swav.py's order: scores of the queue before this batch enters it). From the scores
        [G·B, K] (`sinkhorn_knopp`), or, without them, from the embeddings z [G·B, D] and the prototypes
        `weight` (`prototype_teacher_probs`: the same scores, not stored)."""
        use_queue = self.queue is not None and self.training and self.epoch_float >= self.epoch_queue_starts
        full = use_queue and int(self.queue_count) >= self.queue.shape[1]
        codes = []
        for i, f in enumerate(z.split(batch)):
            if scores is None:
                if full:  # in the queue's dtype, as the materialized queue scores
                    f = torch.cat([self.queue[i], f.to(self.queue.dtype)])
                q = prototype_teacher_probs(
                    f,
                    weight.to(f.dtype),
                    teacher_temp=self.epsilon,
                    mode="sinkhorn",
                    sinkhorn_iters=self.sinkhorn_iterations,
                    gather_distributed=self.gather_distributed,
                )
            else:
                s = scores[i * batch : (i + 1) * batch]
                if full:
                    s = torch.cat([(self.queue[i] @ self.prototypes.weight.t().to(self.queue.dtype)).to(s.dtype), s])
                q = sinkhorn_knopp(
                    s, self.epsilon, self.sinkhorn_iterations, gather_distributed=self.gather_distributed
                )
            codes.append(q[-batch:])
        if use_queue:
            rows = self.queue.shape[1]
            pushed = z.view(len(codes), batch, -1).to(self.queue.dtype)
            self.queue.copy_(torch.cat([pushed, self.queue], dim=1)[:, :rows])  # newest first
            self.queue_count.add_(batch)
        return torch.cat(codes)

    def before_optimizer_step(self):
        if self.steps_per_epoch and self.epoch_float < self.freeze_prototypes_epochs:
            self.prototypes.weight.grad = None
