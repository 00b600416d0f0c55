"""`DINOLoss`: DINO's multi-crop loss with its teacher-temperature warm-up and center EMA (names as lightly)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..ops import dino as _ops


class DINOLoss(nn.Module):
    """Centered, sharpened cross-entropy between the teacher's global crops and every other student crop.

    Defaults are DINO's (Caron et al. 2021, main_dino.py): τ_s = 0.1, τ_t warmed up linearly from 0.04 to
    `teacher_temp` over `warmup_teacher_temp_epochs`, center momentum 0.9. The center is a [1, K] buffer,
    updated after each training-mode call (all-reduced over ranks when torch.distributed is initialized).

    forward(teacher_out, student_out, epoch=None): each a list of per-crop [B, K] tensors (globals first) or
    the crops already concatenated ([G·B, K] and [V·B, K], G = `num_global_crops`); `epoch` (fractional
    allowed) selects the teacher temperature (None: the final one).
    """

    def __init__(self, output_dim: int = 65536, warmup_teacher_temp: float = 0.04, teacher_temp: float = 0.04,
                 warmup_teacher_temp_epochs: int = 30, student_temp: float = 0.1, center_momentum: float = 0.9,
                 num_global_crops: int = 2):
        super().__init__()
        self.num_global_crops = num_global_crops
        self.output_dim = output_dim
        self.warmup_teacher_temp = warmup_teacher_temp
        self.teacher_temp = teacher_temp
        self.warmup_teacher_temp_epochs = warmup_teacher_temp_epochs
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, output_dim))

    def teacher_temperature(self, epoch: float | None) -> float:
        """Linear warm-up from `warmup_teacher_temp` to `teacher_temp` (fractional epochs allowed)."""
        if epoch is None or epoch >= self.warmup_teacher_temp_epochs:
            return self.teacher_temp
        frac = max(0.0, epoch) / self.warmup_teacher_temp_epochs
        return self.warmup_teacher_temp + frac * (self.teacher_temp - self.warmup_teacher_temp)

    def forward(self, teacher_out: Sequence[torch.Tensor] | torch.Tensor,
                student_out: Sequence[torch.Tensor] | torch.Tensor, epoch: float | None = None) -> torch.Tensor:
        if isinstance(teacher_out, torch.Tensor):
            t, num_global = teacher_out, self.num_global_crops
        else:
            t, num_global = torch.cat(list(teacher_out)), len(teacher_out)
        s = student_out if isinstance(student_out, torch.Tensor) else torch.cat(list(student_out))
        if self.center.device != t.device:
            self.center = self.center.to(t.device)
        return _ops.dino_loss(s, t, self.center, self.student_temp, self.teacher_temperature(epoch),
                              num_global_crops=num_global,
                              center_momentum=self.center_momentum if self.training else None)
