"""The prototype cross-entropy family's PyTorch implementation (the contract
`sslfast.ops.prototype_ce.PrototypeCEImpl`; math in `sslfast.reference.prototype_ce`), for CPU tensors, fp64
and ``SSLFAST_BACKEND=reference``. Work is in fp32 (fp64 for fp64 inputs).

Student side, with s = x Wᵀ/τ_s and r_i = Σ_k p_ik: `prototype_ce_forward` / `prototype_ce_backward` walk blocks
of at most `CHUNK_ELEMS` logits (`ROW_BLOCK` rows by CHUNK_ELEMS / ROW_BLOCK prototypes), so memory beyond the
inputs and outputs stays O(CHUNK_ELEMS + B + K·D). The backward recomputes each block's logits from the saved
lse and adds that block's share of both dX and dW before moving on: no block outlives its iteration.

Teacher side: `prototype_teacher_softmax` writes each block's centered logits t = (x Wᵀ − c)/τ_t straight into
the [B, K] result while merging the rows' log-sum-exps, then exponentiates the result in place, t − lse: the
result is the only B×K tensor. `prototype_teacher_logits` is x Wᵀ itself (what Sinkhorn-Knopp takes).
"""

from __future__ import annotations

import torch

CHUNK_ELEMS = 1 << 22  # logits per block: 16 MiB in fp32 (a block has a few temporaries of this size)
ROW_BLOCK = 512


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def _blocks(B: int, K: int):
    """(row slice, prototype slice) pairs covering [B, K] in blocks of at most CHUNK_ELEMS logits."""
    rb = max(1, min(B, ROW_BLOCK))
    cb = max(1, CHUNK_ELEMS // rb)
    for r0 in range(0, B, rb):
        for c0 in range(0, K, cb):
            yield slice(r0, min(B, r0 + rb)), slice(c0, min(K, c0 + cb))


def _logits(x, w, rows, cols, student_temp, ct):
    return (x[rows].to(ct) @ w[cols].to(ct).T).div_(student_temp)


def prototype_ce_forward(x: torch.Tensor, w: torch.Tensor, p: torch.Tensor, student_temp: float):
    """(loss, lse [B], r [B]) in fp32 (fp64 for fp64 inputs), over blocks of logits."""
    ct = _compute_dtype(x)
    B, K = x.shape[0], w.shape[0]
    lse = torch.full((B,), float("-inf"), dtype=ct, device=x.device)
    rsum = torch.zeros(B, dtype=ct, device=x.device)
    ps = torch.zeros(B, dtype=ct, device=x.device)
    for rows, cols in _blocks(B, K):
        s = _logits(x, w, rows, cols, student_temp, ct)
        pb = p[rows, cols].to(ct)
        rsum[rows] += pb.sum(1)
        ps[rows] += (pb * s).sum(1)
        lse[rows] = torch.logaddexp(lse[rows], torch.logsumexp(s, dim=1))
    return (rsum * lse - ps).mean(), lse, rsum


def prototype_ce_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    w: torch.Tensor,
    p: torch.Tensor,
    lse: torch.Tensor,
    rsum: torch.Tensor,
    student_temp: float,
    *,
    want_x: bool = True,
    want_w: bool = True,
):
    """(dL/dx in x's dtype or an empty tensor, dL/dW in W's dtype or an empty tensor) for the upstream gradient
    `grad` of the mean loss: each block of logits recomputed once and used for both."""
    ct = lse.dtype
    B, K = x.shape[0], w.shape[0]
    dx = torch.zeros(x.shape if want_x else (0,), dtype=ct, device=x.device)
    dw = torch.zeros(w.shape if want_w else (0,), dtype=ct, device=w.device)
    if want_x or want_w:
        for rows, cols in _blocks(B, K):
            s = _logits(x, w, rows, cols, student_temp, ct)
            ds = s.sub_(lse[rows, None]).exp_().mul_(rsum[rows, None]).sub_(p[rows, cols].to(ct))
            if want_x:
                dx[rows] += ds @ w[cols].to(ct)
            if want_w:
                dw[cols] += ds.T @ x[rows].to(ct)
    coef = grad.to(ct) / (B * student_temp)
    return dx.mul_(coef).to(x.dtype), dw.mul_(coef).to(w.dtype)


def prototype_teacher_softmax(x: torch.Tensor, w: torch.Tensor, center: torch.Tensor, teacher_temp: float):
    """softmax((x Wᵀ − c)/τ_t) per row, [B, K] in fp32 (fp64 for fp64 inputs); `center` a [K] vector in that
    dtype. The result doubles as the blocks' logits buffer: no other B×K tensor."""
    ct = _compute_dtype(x)
    B, K = x.shape[0], w.shape[0]
    out = torch.empty((B, K), dtype=ct, device=x.device)
    lse = torch.full((B,), float("-inf"), dtype=ct, device=x.device)
    for rows, cols in _blocks(B, K):
        t = (x[rows].to(ct) @ w[cols].to(ct).T).sub_(center[cols]).div_(teacher_temp)
        lse[rows] = torch.logaddexp(lse[rows], torch.logsumexp(t, dim=1))
        out[rows, cols] = t
    return out.sub_(lse[:, None]).exp_()


def prototype_teacher_logits(x: torch.Tensor, w: torch.Tensor):
    """x Wᵀ, [B, K] in fp32 (fp64 for fp64 inputs)."""
    ct = _compute_dtype(x)
    return x.to(ct) @ w.to(ct).T
