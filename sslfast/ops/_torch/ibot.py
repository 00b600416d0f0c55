"""iBOT's masked-patch loss, its PyTorch implementation (the contract `sslfast.ops.ibot.IbotImpl`; math in
`sslfast.reference.ibot`): loss = Σ_r w_r ℓ(t_r, s_r) over the weighted token rows only, in chunks of rows
whose temporaries stay within `CHUNK_ELEMS` floats. Work is in fp32 (fp64 for fp64 student logits).
"""

from __future__ import annotations

import torch

CHUNK_ELEMS = 1 << 24  # fp32 elements of temporaries per chunk (64 MiB)


def _work(student: torch.Tensor) -> torch.dtype:
    return torch.promote_types(student.dtype, torch.float32)


def _chunks(n: int, K: int):
    """(r0, r1) ranges over n rows of K columns, each within `CHUNK_ELEMS` elements of temporaries."""
    step = max(1, CHUNK_ELEMS // max(1, 3 * K))
    return ((r0, min(n, r0 + step)) for r0 in range(0, n, step))


def ibot_forward(
    student: torch.Tensor, teacher: torch.Tensor, weights: torch.Tensor, student_temp: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss [], row statistics [2, R]: lse(s/τ), then Σ_k t, per row; 0 where w = 0), fp32 (fp64 for fp64
    student logits); student, teacher [R, K], weights [R]."""
    work = _work(student)
    stats = torch.zeros(2, student.shape[0], dtype=work, device=student.device)
    total = torch.zeros((), dtype=work, device=student.device)
    rows = torch.nonzero(weights != 0).squeeze(1)  # only the weighted rows are read
    for r0, r1 in _chunks(rows.numel(), student.shape[1]):
        r = rows[r0:r1]
        s = student[r].to(work) / student_temp
        t = teacher[r].to(work)
        lse, t_sum = torch.logsumexp(s, dim=-1), t.sum(-1)
        stats[0, r], stats[1, r] = lse, t_sum
        total = total + (weights[r].to(work) * (t_sum * lse - (t * s).sum(-1))).sum()
    return total, stats


def ibot_backward(
    grad: torch.Tensor,
    student: torch.Tensor,
    teacher: torch.Tensor,
    weights: torch.Tensor,
    stats: torch.Tensor,
    student_temp: float,
) -> torch.Tensor:
    """∂loss/∂student [R, K] in the student's dtype (0 on rows with w = 0); `stats` from the forward."""
    work = _work(student)
    out = torch.zeros_like(student)
    rows = torch.nonzero(weights != 0).squeeze(1)
    for r0, r1 in _chunks(rows.numel(), student.shape[1]):
        r = rows[r0:r1]
        lse, t_sum = stats[0, r, None].to(work), stats[1, r, None].to(work)
        softmax = torch.exp(student[r].to(work) / student_temp - lse)
        scale = grad.to(work) * weights[r, None].to(work) / student_temp
        out[r] = ((t_sum * softmax - teacher[r].to(work)) * scale).to(student.dtype)
    return out
