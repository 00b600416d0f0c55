"""Prototype heads without B×K student logits: the last layer of DINO / iBOT / SwAV heads and a loss over it.

    head = sf.nn.PrototypeHead(256, 65536)                       # DINO: weight-normalized, norm fixed at 1
    loss_fn = sf.nn.PrototypeLoss(65536, student_temp=0.1, teacher_temp=0.04)
    loss = loss_fn(head.features(z_student), head.prototypes(), teacher_head.features(z_teacher),
                   teacher_head.prototypes())

`PrototypeLoss` computes the teacher's targets with `sf.prototype_teacher_probs` (DINO's centered softmax and
center EMA, or Sinkhorn-Knopp for DINOv2 / SwAV) and the student's cross-entropy with
`sf.prototype_cross_entropy`, so neither the student logits [V·B, K], their softmax nor their gradient is
stored. `head(x)` still returns the materialized logits, for evaluation or the plain-logits losses
(`sf.dino_loss`, `sf.swav_loss`, `sf.ibot_patch_loss`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import _validate as V
from ..ops.prototype_ce import _unit_momentum, prototype_cross_entropy, prototype_teacher_probs

_NORMS = ("weight", "l2", None)


class PrototypeHead(nn.Module):
    """A head's last layer: K prototypes of dimension D, with the input optionally L2-normalized first.

    norm="weight" is DINO's / iBOT's `weight_norm(nn.Linear(D, K, bias=False))`: prototypes W = g·v/‖v‖ per
    row, the gain g fixed at 1 (DINO's norm_last_layer) or learned (`learn_norm=True`, initialized to 1).
    norm="l2" is SwAV's: the stored weight is rescaled to unit rows in place, without gradient, whenever
    `prototypes()` runs in training mode, and is itself W. norm=None: W is the weight as it is.

    Args:
        in_dim: D, the bottleneck dimension.
        num_prototypes: K.
        norm: "weight", "l2" or None (see above).
        learn_norm: norm="weight" only: learn the per-prototype gain g.
        normalize_input: L2-normalize the features before the prototypes (DINO, iBOT and SwAV do).
        freeze_epochs: `cancel_gradients(epoch)` drops the prototypes' gradients while epoch < freeze_epochs
            (DINO's freeze_last_layer, SwAV's freeze_prototypes_niters in epochs).

    Raises:
        ValueError: a non-positive dimension, an unknown norm, learn_norm without norm="weight", or a negative
            or non-finite freeze_epochs.
    """

    def __init__(
        self,
        in_dim: int,
        num_prototypes: int,
        *,
        norm: str | None = "weight",
        learn_norm: bool = False,
        normalize_input: bool = True,
        freeze_epochs: float = 0.0,
    ):
        super().__init__()
        for name, value in (("in_dim", in_dim), ("num_prototypes", num_prototypes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if norm not in _NORMS:
            raise ValueError(f"norm must be one of {_NORMS}, got {norm!r}")
        if learn_norm and norm != "weight":
            raise ValueError("learn_norm applies to norm='weight' only")
        self.norm = norm
        self.normalize_input = bool(normalize_input)
        self.freeze_epochs = V.non_negative("freeze_epochs", freeze_epochs)
        self.weight = nn.Parameter(torch.empty(num_prototypes, in_dim))
        if norm == "l2":  # SwAV's nn.Linear(D, K, bias=False)
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        else:  # DINO's trunc_normal_(std=0.02)
            nn.init.trunc_normal_(self.weight, std=0.02)
        self.weight_g = nn.Parameter(torch.ones(num_prototypes, 1)) if learn_norm else None

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The features the prototypes see.

        Args:
            x: [N, D] bottleneck features.

        Returns:
            x / ‖x‖ per row when `normalize_input`, else x.
        """
        return F.normalize(x, dim=-1) if self.normalize_input else x

    def prototypes(self) -> torch.Tensor:
        """The effective weight W [K, D] (see the class docstring); differentiable in the parameters.

        Returns:
            W: g·v/‖v‖ (norm="weight"), the in-place normalized weight (norm="l2") or the weight (None).
        """
        if self.norm == "weight":
            w = F.normalize(self.weight, dim=1)
            return w if self.weight_g is None else w * self.weight_g
        if self.norm == "l2" and self.training:
            with torch.no_grad():
                self.weight.copy_(F.normalize(self.weight, dim=1))
        return self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The materialized logits features(x) · Wᵀ.

        Args:
            x: [N, D] bottleneck features.

        Returns:
            [N, K] logits.
        """
        return F.linear(self.features(x), self.prototypes())

    def cancel_gradients(self, epoch: float) -> None:
        """Drops the prototypes' gradients (sets them to None) while `epoch` < `freeze_epochs`; call it between
        backward and the optimizer step.

        Args:
            epoch: the (fractional) epoch of the current step.
        """
        if epoch < self.freeze_epochs:
            for p in self.parameters(recurse=False):
                p.grad = None


class PrototypeLoss(nn.Module):
    """DINO's multi-crop loss over prototype heads (SwAV's and DINOv2's with mode="sinkhorn"), without the student
    logits.

    With G global crops and V crops in all (each B rows, crop-major, globals first), q_g the teacher targets of
    global crop g (`sf.prototype_teacher_probs`) and x_v the student features of crop v:

        loss = 1/(G·(V − 1)) Σ_g Σ_{v≠g} mean_b CE(q_g,b, softmax(x_v,b Wᵀ/τ_s))

    computed as one `sf.prototype_cross_entropy` over all V·B student rows against Σ_{g≠v} q_g. That equals
    `sf.dino_loss` on the materialized logits (mode="centering", with its center EMA) and SwAV's swapped
    prediction on Sinkhorn codes (mode="sinkhorn", teacher = the student's own detached global crops).

    Args:
        num_prototypes: K (the size of the center buffer).
        student_temp: τ_s.
        teacher_temp: τ_t (SwAV: ε), unless `forward` gets one.
        mode: "centering" (DINO) or "sinkhorn" (DINOv2, SwAV).
        center_momentum: "centering": the center EMA's momentum, applied after each training-mode call (the
            center buffer [1, K] is all-reduced over ranks when torch.distributed is initialized).
        sinkhorn_iters: "sinkhorn": the number of iterations.
        sinkhorn_per_crop: "sinkhorn": normalize each global crop's B rows on their own, as SwAV (its codes of
            crop g come from `distributed_sinkhorn` of that crop's scores); False normalizes all G·B teacher
            rows together, as DINOv2's `SinkhornKnoppTeacher`.
        num_global_crops: G.
        gather_distributed: "sinkhorn": normalize the codes over the global batch.

    Raises:
        ValueError: an unknown mode, or bad temperatures, momentum or crop counts.
    """

    def __init__(
        self,
        num_prototypes: int,
        *,
        student_temp: float = 0.1,
        teacher_temp: float = 0.04,
        mode: str = "centering",
        center_momentum: float = 0.9,
        sinkhorn_iters: int = 3,
        sinkhorn_per_crop: bool = False,
        num_global_crops: int = 2,
        gather_distributed: bool = False,
    ):
        super().__init__()
        if mode not in ("centering", "sinkhorn"):
            raise ValueError(f"mode must be 'centering' or 'sinkhorn', got {mode!r}")
        if isinstance(num_global_crops, bool) or not isinstance(num_global_crops, int) or num_global_crops < 1:
            raise ValueError(f"num_global_crops must be an int >= 1, got {num_global_crops!r}")
        self.student_temp = V.positive("student_temp", student_temp)
        self.teacher_temp = V.positive("teacher_temp", teacher_temp)
        self.center_momentum = _unit_momentum(center_momentum)
        self.mode, self.sinkhorn_iters, self.num_global_crops = mode, sinkhorn_iters, num_global_crops
        self.gather_distributed, self.sinkhorn_per_crop = gather_distributed, bool(sinkhorn_per_crop)
        self.register_buffer("center", torch.zeros(1, num_prototypes) if mode == "centering" else None)

    def _crop_rows(self, teacher_feats) -> int:
        """B, the rows per crop of `teacher_feats` [G·B, D]."""
        if not isinstance(teacher_feats, torch.Tensor):
            raise TypeError(f"teacher_feats must be a torch.Tensor, got {type(teacher_feats).__name__}")
        G = self.num_global_crops
        if teacher_feats.dim() == 0 or teacher_feats.shape[0] == 0 or teacher_feats.shape[0] % G:
            raise ValueError(
                f"teacher_feats must have G·B rows with G = num_global_crops = {G}, got shape "
                f"{tuple(teacher_feats.shape)}"
            )
        return teacher_feats.shape[0] // G

    def teacher_probs(
        self, teacher_feats: torch.Tensor, teacher_weight: torch.Tensor, teacher_temp: float | None = None
    ) -> torch.Tensor:
        """The teacher targets [G·B, K] (and, in training mode with mode="centering", the center update).

        Args:
            teacher_feats: [G·B, D] the teacher's features of the global crops.
            teacher_weight: [K, D] the teacher's prototypes.
            teacher_temp: τ_t for this call; default the module's.

        Returns:
            The targets, fp32 (fp64 for fp64 features), without gradient.

        Raises:
            TypeError: teacher_feats is not a tensor.
            ValueError: its rows are not a positive multiple of G (or as `sf.prototype_teacher_probs`).
        """
        self._crop_rows(teacher_feats)
        tau = self.teacher_temp if teacher_temp is None else teacher_temp
        if self.mode == "sinkhorn":
            crops = teacher_feats.chunk(self.num_global_crops) if self.sinkhorn_per_crop else (teacher_feats,)
            codes = [
                prototype_teacher_probs(
                    f,
                    teacher_weight,
                    teacher_temp=tau,
                    mode="sinkhorn",
                    sinkhorn_iters=self.sinkhorn_iters,
                    gather_distributed=self.gather_distributed,
                )
                for f in crops
            ]
            return codes[0] if len(codes) == 1 else torch.cat(codes)
        if self.center.device != teacher_feats.device:
            self.center = self.center.to(teacher_feats.device)
        return prototype_teacher_probs(
            teacher_feats,
            teacher_weight,
            teacher_temp=tau,
            center=self.center,
            center_momentum=self.center_momentum if self.training else None,
        )

    def forward(
        self,
        student_feats: torch.Tensor,
        student_weight: torch.Tensor,
        teacher_feats: torch.Tensor,
        teacher_weight: torch.Tensor,
        teacher_temp: float | None = None,
    ) -> torch.Tensor:
        """The loss (class docstring).

        Args:
            student_feats: [V·B, D] the student's features of every crop, globals first (e.g.
                `PrototypeHead.features`); gets a gradient.
            student_weight: [K, D] the student's prototypes (`PrototypeHead.prototypes()`); gets a gradient.
            teacher_feats: [G·B, D] the teacher's features of the global crops; no gradient.
            teacher_weight: [K, D] the teacher's prototypes; no gradient.
            teacher_temp: τ_t for this call (e.g. DINO's warm-up schedule); default the module's.

        Returns:
            The scalar loss, fp32 (fp64 for fp64 inputs).

        Raises:
            TypeError: a non-tensor input (or as `sf.prototype_teacher_probs`, `sf.prototype_cross_entropy`).
            ValueError: teacher rows not a multiple of G, or student rows not V·B with V >= max(G, 2).
        """
        if not isinstance(student_feats, torch.Tensor) or student_feats.dim() == 0:
            raise TypeError(f"student_feats must be a torch.Tensor [V·B, D], got {type(student_feats).__name__}")
        G = self.num_global_crops
        self._crop_rows(teacher_feats)
        multicrop_rows(student_feats.shape[0], teacher_feats.shape[0], num_global_crops=G)
        q = self.teacher_probs(teacher_feats, teacher_weight, teacher_temp)  # after the checks: it updates the center
        return multicrop_prototype_loss(
            student_feats, student_weight, q, num_global_crops=G, student_temp=self.student_temp
        )


def multicrop_rows(student_rows: int, teacher_rows: int, *, num_global_crops: int) -> tuple[int, int]:
    """(B, V): the rows per crop and the number of student crops of a multi-crop loss.

    Args:
        student_rows: V·B, the student's rows (every crop, globals first).
        teacher_rows: G·B, the teacher's rows (the global crops).
        num_global_crops: G.

    Returns:
        (B, V).

    Raises:
        ValueError: teacher_rows not a positive multiple of G, or student_rows not V·B with V >= max(G, 2).
    """
    G = num_global_crops
    if teacher_rows == 0 or teacher_rows % G:
        raise ValueError(f"the teacher's rows must be G·B with G = num_global_crops = {G}, got {teacher_rows}")
    B = teacher_rows // G
    if student_rows % B or student_rows // B < max(G, 2):
        raise ValueError(
            f"student_feats must have V·B rows with B = {B} and V >= {max(G, 2)} crops, got {student_rows}"
        )
    return B, student_rows // B


def multicrop_prototype_loss(
    student_feats: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_probs: torch.Tensor,
    *,
    num_global_crops: int,
    student_temp: float,
) -> torch.Tensor:
    """DINO's / SwAV's multi-crop cross-entropy from the teacher targets q_g of the G global crops, without the
    student logits:

        loss = 1/(G·(V − 1)) Σ_g Σ_{v≠g} mean_b CE(q_g,b, softmax(x_v,b Wᵀ/τ_s))

    as one `sf.prototype_cross_entropy` over the V·B student rows against t_v = Σ_{g≠v} q_g (t_v = Σ_g q_g for
    a local crop v >= G), times V/(G·(V − 1)). It equals `sf.dino_loss` / `sf.swav_loss` on the materialized
    logits x Wᵀ with the same targets.

    Args:
        student_feats: [V·B, D] the student's features of every crop, crop-major, globals first.
        student_weight: [K, D] the student's prototypes, in student_feats' dtype.
        teacher_probs: [G·B, K] the targets of the G global crops (no gradient).
        num_global_crops: G.
        student_temp: τ_s.

    Returns:
        The scalar loss, fp32 (fp64 for fp64 inputs).

    Raises:
        TypeError: as `sf.prototype_cross_entropy`.
        ValueError: row counts as `multicrop_rows`, or as `sf.prototype_cross_entropy`.
    """
    G = num_global_crops
    B, V = multicrop_rows(student_feats.shape[0], teacher_probs.shape[0], num_global_crops=G)
    q = teacher_probs.reshape(G, B, -1)
    if G == 1:  # the only global crop has no other teacher crop: zero targets
        own = torch.zeros_like(q)
    elif G == 2:  # each global crop against the other's targets
        own = torch.stack([q[1], q[0]])
    else:
        own = torch.stack([sum(q[g] for g in range(G) if g != v) for v in range(G)])
    targets = own.reshape(G * B, -1)
    if V > G:
        targets = torch.cat([targets, q.sum(0).repeat(V - G, 1)])
    ce = prototype_cross_entropy(student_feats, student_weight, targets, student_temp=student_temp)
    return ce * V / (G * (V - 1))
