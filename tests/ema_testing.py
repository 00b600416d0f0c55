"""Inputs and oracles shared by the EMA family's tests (tests/test_ema*.py)."""

import torch
from torch import nn

SHAPES = [(37, 3, 3, 3), (37,), (1, 5, 48), (48, 37), (48,), (0, 4), (3,), (129, 65)]
M = 0.996


def lists(shapes, t_dtype=torch.float32, s_dtype=torch.float32, device="cpu"):
    """Fresh random (teacher, student) lists of `shapes`."""
    teacher = [torch.randn(s, device=device).to(t_dtype) for s in shapes]
    student = [torch.randn(s, device=device).to(s_dtype) for s in shapes]
    return teacher, student


def lerp_oracle(teacher, student, momentum):
    """fp32 lerp of the upcast tensors, rounded once to the teacher dtype."""
    return [t.float().lerp(s.float(), 1 - momentum).to(t.dtype) for t, s in zip(teacher, student)]


def ulp_close(out, ref, what=""):
    """Equal up to one unit in the last place of the output dtype (rounding of a tie-breaking difference)."""
    assert out.dtype == ref.dtype and out.shape == ref.shape, what
    if out.numel() == 0:
        return
    eps = torch.finfo(out.dtype).eps
    tol = eps * ref.double().abs().clamp_min(torch.finfo(out.dtype).tiny)
    bad = (out.double() - ref.double()).abs() > tol
    assert not bad.any(), f"{what}: {int(bad.sum())} elements differ by more than 1 ulp"


class Net(nn.Module):
    """Conv, BatchNorm (buffers that move in training mode) and a linear head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3)
        self.bn = nn.BatchNorm2d(5)
        self.head = nn.Linear(5, 4)

    def forward(self, x):
        return self.head(self.bn(self.conv(x)).mean((2, 3)))


def mlp():
    """Conv (4-D weight + bias), BatchNorm (1-D weight + bias), two Linears: 7 parameter tensors."""
    return nn.Sequential(
        nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.Flatten(), nn.Linear(6 * 4 * 4, 9), nn.Linear(9, 5, bias=False)
    )
