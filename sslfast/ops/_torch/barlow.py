"""Barlow Twins' and VICReg's PyTorch implementation (the contract `sslfast.ops.barlow.BarlowImpl`; the
papers' literal losses are `sslfast.reference.barlow`).

`forward` and `backward` take and return what `sslfast.kernels.barlow`'s do, computed in fp32 (fp64 for fp64
inputs). Neither forms a D x D matrix: the Gram path works with the N x N Gram matrices (the path chosen
when N < D), the tiled path with P x D slabs of the cross-correlation (P·D <= `SLAB_ELEMS`). The math,
including the distributed split L_r = base + W·u_r, is written out in `sslfast.kernels.barlow`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BARLOW, VICREG = 0, 1
NCOL = 9  # rows of the per-feature statistics tensor (layout in sslfast.kernels.barlow)
SLAB_ELEMS = 1 << 22  # tiled path: at most this many cross-correlation entries held at once (16 MiB fp32)


def operand_dtype(dtype: torch.dtype, rows: int, algorithm: str) -> torch.dtype:
    """The dtype of `forward`'s operands `ops` and of all its work: fp32 for fp32/bf16/fp16 inputs, fp64 for
    fp64, whatever `rows` and `algorithm` (the kernels' choice depends on them)."""
    return torch.promote_types(dtype, torch.float32)


def _slabs(d: int):
    """P x D slabs of the cross-correlation, P·D <= SLAB_ELEMS, at least two: never the D x D matrix."""
    p = max(1, min((d + 1) // 2, SLAB_ELEMS // max(1, d)))
    for p0 in range(0, d, p):
        yield p0, min(d, p0 + p)


def _cross_slab(a: torch.Tensor, b: torch.Tensor, p0: int, p1: int) -> torch.Tensor:
    """Rows p0:p1 of aᵀb (a P x D slab) with its entries on the global diagonal set to zero."""
    s = a[:, p0:p1].T @ b
    s[:, p0:p1].diagonal().zero_()
    return s


def forward(z1, z2, kind, coef, eps, rows, world, algorithm):
    """Same contract as `sslfast.kernels.barlow.forward`: (loss_r, u_r, col, scal, ops, grams, pdiag).

    fp32 throughout (fp64 for fp64 inputs); `ops` are the exact standardized (Barlow) or centered (VICReg)
    features, the operand scales `scal` are 1, and `grams` hold the partner's off-diagonal Gram rows unscaled.
    Plain autograd can differentiate loss_r through it (the double-backward route of the op): the one in-place
    update of a tensor that autograd saves is made out of place when grad mode records."""
    m, d = z1.shape
    r0, n = rows
    w = float(world)
    dev = z1.device
    work = operand_dtype(z1.dtype, m, algorithm)
    ops = torch.stack([z1, z2]).to(work)  # [2, M, D], updated in place below
    shift = ops[:, :1].clone()
    ops -= shift  # shifted by row 0: constant columns are exact zeros
    mean_y = ops.mean(1, keepdim=True)
    ops -= mean_y  # centered
    col = torch.zeros(NCOL, d, device=dev, dtype=work)
    col[0:2] = (shift + mean_y).squeeze(1)
    m2 = torch.linalg.vector_norm(ops, dim=1).square()  # [2, D]
    if kind == BARLOW:
        rstd = torch.rsqrt(m2 / m + eps)
        ops = ops * rstd[:, None, :] if ops.requires_grad else ops.mul_(rstd[:, None, :])  # standardized
        col[2:4] = rstd
        col[4] = col[5] = (ops[0] * ops[1]).sum(0) / m
        col[6:8] = torch.linalg.vector_norm(ops, dim=1).square()
    else:
        var = m2 / (m - 1)
        col[2:4] = torch.sqrt(var + eps)
        col[4:6] = var
        col[6:8] = m2
        col[8] = (z1[r0 : r0 + n].to(work) - z2[r0 : r0 + n].to(work)).pow(2).sum(0)
    scal = torch.ones(2, device=dev, dtype=work)
    s_a = s_b = torch.zeros((), device=dev, dtype=work)
    if algorithm == "gram":
        g = torch.bmm(ops[:, r0 : r0 + n], ops.transpose(1, 2))  # [2, n, M] Gram rows of this rank
        if kind == BARLOW:
            s_a = (g[0] * g[1]).sum()
            partner = g.flip(0)  # Ẑ1 pairs with B = Ẑ2Ẑ2ᵀ and back
        else:
            s_a, s_b = g[0].pow(2).sum(), g[1].pow(2).sum()
            partner = g
        i = torch.arange(n, device=dev)
        pdiag = partner[:, i, r0 + i].clone()
        grams = partner.clone()
        grams[:, i, r0 + i] = 0
    else:
        grams, pdiag = ops.new_empty(2, 0, 0), ops.new_empty(2, 0)
        if kind == BARLOW:
            s_a = sum(_cross_slab(ops[0], ops[1], p0, p1).pow(2).sum() for p0, p1 in _slabs(d))
        else:
            s_a = sum(_cross_slab(ops[0], ops[0], p0, p1).pow(2).sum() for p0, p1 in _slabs(d))
            s_b = sum(_cross_slab(ops[1], ops[1], p0, p1).pow(2).sum() for p0, p1 in _slabs(d))
    loss, u = _loss(col, s_a, s_b, kind, coef, m, d, n, w, algorithm)
    return loss, u, col, scal, ops, grams, pdiag


def _loss(col, s_a, s_b, kind, coef, m, d, n, w, algorithm):
    """(loss_r, u_r) from the per-feature statistics and the reduced Gram / tile sums (see the kernels doc)."""
    if kind == BARLOW:
        lambd = coef[0]
        on = (1 - col[4]).pow(2).sum()
        if algorithm == "gram":
            return on + lambd * (w * s_a / m**2 - col[5].pow(2).sum()), lambd * s_a / m**2
        return on + lambd * s_a / m**2, col.new_zeros(())
    sim, std_c, cov_c = coef
    inv = col[8].sum()
    hinge = F.relu(1 - col[2:4]).sum()
    if algorithm == "gram":
        sub = (col[6:8] / (m - 1)).pow(2).sum()
        cov = (w * (s_a + s_b) / (m - 1) ** 2 - sub) / d
        u = sim * inv / (m * d) + cov_c * (s_a + s_b) / ((m - 1) ** 2 * d)
    else:
        cov = (s_a + s_b) / ((m - 1) ** 2 * d)
        u = sim * inv / (m * d)
    return sim * inv / (n * d) + std_c * hinge / (2 * d) + cov_c * cov, u


def backward(grad, z1, z2, col, scal, ops, grams, pdiag, kind, coef, eps, rows, world, algorithm):
    """Same contract as `sslfast.kernels.barlow.backward`: (dz1, dz2) for the upstream gradient `grad`.
    Works in place on one [2, M, D] buffer `g` (the CPU path's memory is a few N x D buffers)."""
    m, d = z1.shape
    r0, n = rows
    w = float(world)
    mine = slice(r0, r0 + n)
    grad = grad.to(ops.dtype)
    if algorithm == "gram":
        # t = ∂S_r/∂ops: the off-diagonal partner Gram rows times the operands, from both sides of the rank's
        # rows, plus the diagonal term kept apart (it is the exact, dominant one in the kernels).
        if n == m:
            g = torch.bmm(grams, ops).mul_(2)
        else:
            g = torch.bmm(grams.transpose(1, 2), ops[:, mine])
            g[:, mine] += torch.bmm(grams, ops)
        g[:, mine].addcmul_(pdiag[:, :, None], ops[:, mine], value=2)
    else:
        # t = ops_other · C_offᵀ (Barlow, C_1 = C, C_2 = Cᵀ) or X̃ · Cov_off (VICReg), P columns at a time
        g = torch.empty_like(ops)
        other = (1, 0) if kind == BARLOW else (0, 1)
        norm = m if kind == BARLOW else m - 1
        for x in range(2):
            a, b = ops[x], ops[other[x]]
            for p0, p1 in _slabs(d):
                g[x, :, p0:p1] = b @ _cross_slab(a, b, p0, p1).T
            g[x] /= norm
    if kind == BARLOW:
        lambd = coef[0]
        if algorithm == "gram":
            cross = (-2 * (1 - col[4]) - 2 * lambd * col[5]) / m
            g *= lambd * w / m**2
        else:
            cross = -2 * (1 - col[4]) / m
            g *= 2 * lambd / m
        g[0].addcmul_(ops[1], cross)
        g[1].addcmul_(ops[0], cross)
        # standardization backward: rstd (g − mean g − ẑ mean(g ẑ))
        proj = torch.stack([(g[x] * ops[x]).mean(0) for x in range(2)])
        g -= g.mean(1, keepdim=True)
        g.addcmul_(ops, proj[:, None, :], value=-1)
        g *= col[2:4, None, :]
        g *= grad
    else:
        sim, std_c, cov_c = coef
        std = col[2:4]
        self_coef = -(std_c / (2 * d)) * (std < 1).to(std.dtype) / (std * (m - 1))
        if algorithm == "gram":
            g *= cov_c / d * 2 * w / (m - 1) ** 2
            self_coef = self_coef - cov_c / d * 4 * (col[6:8] / (m - 1)) / (m - 1)
        else:
            g *= cov_c / d * 4 / (m - 1)
        g.addcmul_(ops, self_coef[:, None, :])
        g -= g.mean(1, keepdim=True)  # centering backward
        g *= grad
        inv = (z1[mine].to(g.dtype) - z2[mine].to(g.dtype)).mul_(2 * sim / (n * d) * grad)
        g[0, mine] += inv
        g[1, mine] -= inv
    return g[0].to(z1.dtype, copy=True), g[1].to(z2.dtype, copy=True)
