"""`DINOLoss`: DINO's multi-crop loss with its teacher-temperature warm-up and center EMA (names as lightly)."""

from __future__ import annotations

import math
from numbers import Real
from typing import Sequence

import torch
from torch import nn

from ..ops import dino as _ops


class DINOLoss(nn.Module):
    """Centered, sharpened cross-entropy between the teacher's global crops and every other student crop.

    Arguments as lightly's `DINOLoss(output_dim, warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs,
    student_temp, center_momentum, center_mode)`; defaults are DINO's (Caron et al. 2021, main_dino.py):
    τ_s = 0.1, τ_t = 0.04 after a linear warm-up (`teacher_temperature`), center momentum 0.9. The center is a
    [1, K] buffer, updated after each training-mode call (all-reduced over ranks when torch.distributed is
    initialized); in `eval()` it is left as it is.

    forward(teacher_out, student_out, teacher_temp=None, epoch=None), as lightly >= 1.5: each of teacher_out,
    student_out a list of per-crop [B, K] tensors (globals first) or the crops already concatenated ([G·B, K]
    and [V·B, K], G = `num_global_crops`). τ_t is `teacher_temp` when given, else the warm-up schedule's value
    at `epoch`, else the final `teacher_temp`. The third positional argument is `teacher_temp` (older lightly
    took the epoch there): an int there raises TypeError, and passing both raises ValueError.

    Args:
        output_dim: K, the head's output size (the center's length).
        warmup_teacher_temp: τ_t at epoch 0.
        teacher_temp: τ_t after the warm-up.
        warmup_teacher_temp_epochs: W, the warm-up's length in epochs, an int >= 0.
        student_temp: τ_s.
        center_momentum: the center EMA's momentum, in [0, 1].
        center_mode: "mean", the only mode.
        num_global_crops: G for concatenated inputs (a list of crops gives G by its length).

    Raises:
        ValueError: `center_mode` is not "mean"; `warmup_teacher_temp_epochs` is not an int >= 0.
    """

    def __init__(
        self,
        output_dim: int = 65536,
        warmup_teacher_temp: float = 0.04,
        teacher_temp: float = 0.04,
        warmup_teacher_temp_epochs: int = 30,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        center_mode: str = "mean",
        *,
        num_global_crops: int = 2,
    ):
        super().__init__()
        if center_mode != "mean":
            raise ValueError(f"center_mode must be 'mean' (the only mode lightly has), got {center_mode!r}")
        if (
            isinstance(warmup_teacher_temp_epochs, bool)
            or not isinstance(warmup_teacher_temp_epochs, int)
            or warmup_teacher_temp_epochs < 0
        ):
            raise ValueError(f"warmup_teacher_temp_epochs must be an int >= 0, got {warmup_teacher_temp_epochs!r}")
        self.num_global_crops = num_global_crops
        self.output_dim = output_dim
        self.warmup_teacher_temp = warmup_teacher_temp
        self.teacher_temp = teacher_temp
        self.warmup_teacher_temp_epochs = warmup_teacher_temp_epochs
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, output_dim))

    def teacher_temperature(self, epoch: float | None) -> float:
        """main_dino.py's schedule, indexed by the epoch e (a fractional epoch is floored: τ_t is constant
        within an epoch), with W = `warmup_teacher_temp_epochs`:

            concatenate(linspace(warmup_teacher_temp, teacher_temp, W), [teacher_temp, ...])[⌊e⌋]

        i.e. τ_t(e) = warmup_teacher_temp + ⌊e⌋ · (teacher_temp − warmup_teacher_temp) / (W − 1) for ⌊e⌋ < W
        (warmup_teacher_temp when W = 1), reaching `teacher_temp` at epoch W − 1; `teacher_temp` from then on
        and for epoch=None.
        """
        if epoch is None:
            return self.teacher_temp
        if isinstance(epoch, bool) or not isinstance(epoch, Real) or not math.isfinite(epoch) or epoch < 0:
            raise ValueError(f"epoch must be a finite number >= 0, got {epoch!r}")
        e, W = math.floor(epoch), self.warmup_teacher_temp_epochs
        if e >= W:
            return self.teacher_temp
        if e == W - 1:  # linspace's endpoint is exact
            return self.teacher_temp if W > 1 else self.warmup_teacher_temp
        return self.warmup_teacher_temp + e * ((self.teacher_temp - self.warmup_teacher_temp) / (W - 1))

    def forward(
        self,
        teacher_out: Sequence[torch.Tensor] | torch.Tensor,
        student_out: Sequence[torch.Tensor] | torch.Tensor,
        teacher_temp: float | None = None,
        epoch: float | None = None,
    ) -> torch.Tensor:
        """The DINO loss of one step; in training mode the center is then updated (`sslfast.ops.dino.dino_loss`).

        Args:
            teacher_out: the teacher's G global crops, a list of [B, K] tensors or one [G·B, K] tensor.
            student_out: the student's V crops (globals first), a list of [B, K] tensors or one [V·B, K] tensor.
            teacher_temp: τ_t for this call (a float), overriding the schedule.
            epoch: the epoch at which the warm-up schedule is read (`teacher_temperature`).

        Returns:
            The loss, a 0-d fp32 tensor (fp64 for fp64 inputs).

        Raises:
            TypeError: `teacher_temp` is an int (the epoch passed where lightly < 1.5 took it); as `dino_loss`.
            ValueError: both `teacher_temp` and `epoch` given; a negative or non-finite epoch; as `dino_loss`.
        """
        if isinstance(teacher_temp, int):  # bool included
            raise TypeError(
                f"teacher_temp must be a float, got {teacher_temp!r}: the third argument of forward is "
                "the teacher temperature (as in lightly >= 1.5); pass the epoch as epoch="
            )
        if teacher_temp is not None and epoch is not None:
            raise ValueError("pass teacher_temp or epoch, not both: teacher_temp would override the schedule")
        tau_t = teacher_temp if teacher_temp is not None else self.teacher_temperature(epoch)
        if isinstance(teacher_out, torch.Tensor):
            t, num_global = teacher_out, self.num_global_crops
        else:
            t, num_global = torch.cat(list(teacher_out)), len(teacher_out)
        s = student_out if isinstance(student_out, torch.Tensor) else torch.cat(list(student_out))
        if self.center.device != t.device:
            self.center = self.center.to(t.device)
        return _ops.dino_loss(
            s,
            t,
            self.center,
            self.student_temp,
            tau_t,
            num_global_crops=num_global,
            center_momentum=self.center_momentum if self.training else None,
        )
