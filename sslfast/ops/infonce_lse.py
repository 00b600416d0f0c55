"""The InfoNCE family's op, `sslfast::similarity_lse`: per-row (and optionally per-column) log-sum-exps of
S = scale · norm(a) norm(b)ᵀ over the negatives plus the positives' logits, without storing S (math in
`sslfast.kernels.infonce`), and its backward `sslfast::similarity_lse_backward` (tiles recomputed, never
stored). The family (`InfoNCEImpl`) runs the Triton kernels on CUDA tensors and the chunked PyTorch path
(`sslfast.ops._torch.infonce`) elsewhere, which also takes float64 and is differentiable twice (the kernels
raise `DoubleBackwardError`).

A problem travels as an `LseSpec` (its `IndexMaps` and flags); it is flattened to ints and bools only as the
custom ops' arguments (`*spec`, its fields in schema order) and rebuilt by `_spec`. The losses over it are in
`sslfast.ops.infonce`.
"""

from __future__ import annotations

from typing import Protocol

import torch

from .._backend import without_autocast
from .._custom_op import TRITON_DOUBLE_BACKWARD, custom_op, differentiable_grads, double_backward_unsupported
from ._family import Family
from .infonce_spec import LseSpec, _spec


class InfoNCEImpl(Protocol):
    """What `kernels.infonce` and `ops._torch.infonce` both define (math in `sslfast.kernels.infonce`)."""

    def row_rnorm(self, x, partner=None, scale=None):
        """1/max(‖x_i‖, 1e-12) [M]; with a partner, (that, its inverse norms, scale · x̂_i·p̂_i)."""

    def tile_operands(self, r, c, rn_r, rn_c):
        """(r, c, rn_r, rn_c) as the two functions below take them, made once per pass; one matrix stays one."""

    def similarity_lse(self, r, c, rn_r, rn_c, scale, maps, *, exclude_self, want_pos, col_stats, bounded):
        """(lse_r [M], lse_c [Nc] or empty, pos [M] or empty) of rows r against columns c; maps: `IndexMaps`."""

    def similarity_lse_rows_grad(
        self,
        r,
        c,
        rn_r,
        rn_c,
        scale,
        maps,
        *,
        exclude_self,
        bounded,
        lse_r=None,
        g_r=None,
        lse_c=None,
        g_c=None,
        g_pr=None,
        g_pc=None,
        want_dscale=False,
    ):
        """(∂L/∂r̂ [M, D] or split partials [S, M, D] summing to it, which only `row_normalize_backward` and
        `pair_normalize_backward` read; ∂L/∂scale or None) for the upstream gradients given (None: left out)."""

    def row_normalize_backward(self, x, rn, dxh=None, partner=None, rn_p=None, coef=None):
        """∂L/∂x in x's dtype from ∂L/∂x̂ (optional, as `similarity_lse_rows_grad` returns it) plus the
        gradient of coef_i · x̂_i·p̂_i."""

    def pair_normalize_backward(self, x, rn, dxh, partner, rn_p, g_p, scale, dscale=None):
        """(∂L/∂x, ∂L/∂partner, dscale + Σ g_p·x̂·p̂ or None) of a positive pos_i = scale · x̂_i·p̂_i (the
        kernels add into `dscale` in place: use the returned value only)."""

    def loss_epilogue(self, lse_r, lse_c, pos):
        """(`contrastive_loss`, ∂/∂lse_r, ∂/∂lse_c or None, ∂/∂pos) for an upstream 1."""


FAMILY = Family("infonce", InfoNCEImpl)
_impl = FAMILY.impl


def _stat_dtype(x: torch.Tensor) -> torch.dtype:
    """The statistics' and scale's dtype: fp32, fp64 for fp64 inputs (promote_types without a dispatch)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _as(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x in `dtype`: x itself when it already is (`Tensor.to` costs a dispatcher call even then)."""
    return x if x.dtype == dtype else x.to(dtype)


# ------------------------------------------------------------------------------------------- the op
@without_autocast
def _forward(a, b, partner, scale, spec: LseSpec):
    """similarity_lse's outputs, then the partner's inverse norms (or None) for a backward in the same call."""
    *out, rn_p, _ = _stats(_impl(a, b, scale), a, b, partner, scale, spec)
    if spec.symmetric:  # fresh placeholders: outputs may not alias each other (the triangle's lse_c is a view)
        out[4] = out[3].new_empty(0)
        if out[1]._is_view():
            out[1] = out[3].new_empty(0)
    return (*out, rn_p)


def _stats(impl, a, b, partner, scale, spec: LseSpec):
    """`_forward` on `impl`, except that rn_b is None when symmetric, then the tile operands (`tiles` of
    `_grads`, for a backward in the same call)."""
    rn_p = None
    if partner is None:
        rn_a = impl.row_rnorm(a)
    else:
        rn_a, rn_p, pos = impl.row_rnorm(a, partner, scale)
    rn_b = rn_a if spec.symmetric else impl.row_rnorm(b)
    tiles = impl.tile_operands(a, b, rn_a, rn_b)
    lse_r, lse_c, tile_pos = impl.similarity_lse(
        *tiles,
        scale,
        spec.maps,
        exclude_self=spec.exclude_self,
        want_pos=spec.want_pos,
        col_stats=spec.col_stats,
        bounded=spec.bounded,
    )
    if partner is None:
        pos = tile_pos
    st = _stat_dtype(a)
    sym = spec.symmetric
    return _as(lse_r, st), _as(lse_c, st), _as(pos, st), _as(rn_a, st), None if sym else _as(rn_b, st), rn_p, tiles


@without_autocast
def _backward(
    a, b, partner, scale, lse_r, lse_c, pos, rn_a, rn_b, g_r, g_c, g_p, spec: LseSpec, *, want_b: bool, want_scale: bool
):
    """similarity_lse_backward's outputs: a fresh empty tensor for each gradient not computed (outputs may not
    alias each other)."""
    da, db, dpartner, dscale = _grads(
        _impl(a, b, scale),
        a,
        b,
        partner,
        scale,
        lse_r,
        lse_c,
        rn_a,
        rn_b,
        g_r,
        g_c,
        g_p,
        spec,
        want_b=want_b,
        want_scale=want_scale,
    )
    return (
        da,
        a.new_empty(0) if db is None else db,
        a.new_empty(0) if dpartner is None else dpartner,
        scale.new_empty(0) if dscale is None else dscale,
    )


def _grads(
    impl,
    a,
    b,
    partner,
    scale,
    lse_r,
    lse_c,
    rn_a,
    rn_b,
    g_r,
    g_c,
    g_p,
    spec: LseSpec,
    *,
    want_b,
    want_scale,
    rn_p=None,
    tiles=None,
):
    """`_backward` on `impl` (the positives' logits are not needed), with None for the gradients it does not
    compute. `rn_p`, `tiles`: what `_stats` returned, when the backward runs in the same call (not recomputed:
    one unit-rows launch fewer)."""
    maps, symmetric, exclude_self, bounded = spec.maps, spec.symmetric, spec.exclude_self, spec.bounded
    if symmetric:
        lse_c, g_c, rn_b = lse_r, g_r, rn_a
    with_c = g_c is not None
    tile_pos = g_p if partner is None else None
    ta, tb, trn_a, trn_b = impl.tile_operands(a, b, rn_a, rn_b) if tiles is None else tiles  # once for both roles
    dah, dscale = impl.similarity_lse_rows_grad(
        ta,
        tb,
        trn_a,
        trn_b,
        scale,
        maps,
        exclude_self=exclude_self,
        bounded=bounded,
        lse_r=lse_r,
        g_r=g_r,
        lse_c=lse_c if with_c else None,
        g_c=g_c,
        g_pr=tile_pos,
        g_pc=tile_pos if symmetric else None,
        want_dscale=want_scale,
    )
    db = dpartner = None
    if partner is None:
        da = impl.row_normalize_backward(a, rn_a, dah)
    else:
        rn_p = impl.row_rnorm(partner) if rn_p is None else rn_p
        da, dpartner, dscale = impl.pair_normalize_backward(a, rn_a, dah, partner, rn_p, g_p, scale, dscale)
    if want_b and not symmetric:
        dbh, _ = impl.similarity_lse_rows_grad(
            tb,
            ta,
            trn_b,
            trn_a,
            scale,
            maps.swapped(),
            exclude_self=exclude_self,
            bounded=bounded,
            lse_r=lse_c if with_c else None,
            g_r=g_c,
            lse_c=lse_r,
            g_c=g_r,
            g_pc=tile_pos,
        )
        db = impl.row_normalize_backward(b, rn_b, dbh)
    return da, db, dpartner, _as(dscale, scale.dtype) if want_scale else None  # 0-d, as scale


def _backward_inputs(ctx, g_r, g_c, g_p):
    """Arguments of `similarity_lse_backward` from an autograd context (custom op or autograd.Function). The
    upstream gradients are made contiguous: autograd may hand on an expanded one (that of a sum, say), whose
    stride 0 the kernels' row indexing would read past."""
    a, b, partner, scale, lse_r, lse_c, pos, rn_a, rn_b = ctx.saved_tensors
    spec = ctx.spec
    st = lse_r.dtype
    g_c = _as(g_c, st).contiguous() if spec.col_stats else None
    g_p = _as(g_p, st).contiguous() if spec.want_pos or partner is not None else None
    return (
        a,
        b,
        partner,
        scale,
        lse_r,
        lse_c,
        pos,
        rn_a,
        rn_b,
        _as(g_r, st).contiguous(),
        g_c,
        g_p,
        *spec,
        ctx.needs_input_grad[1] and not spec.symmetric,
        ctx.needs_input_grad[3],
    )


def _input_grads(ctx, da, db, dp, dscale):
    """similarity_lse's input gradients: a, b, partner, scale, then None for the six flat `LseSpec` fields."""
    needs = ctx.needs_input_grad
    return (
        da,
        db if needs[1] and not ctx.spec.symmetric else None,
        dp if ctx.saved_tensors[2] is not None else None,
        dscale if needs[3] else None,
        None,
        None,
        None,
        None,
        None,
        None,
    )


def _save(ctx, inputs, output):
    a, b, partner, scale, maps, *flags = inputs
    ctx.save_for_backward(a, b, partner, scale, *output)
    ctx.spec = _spec(tuple(maps), *flags)


def _fake_lse(a, b, partner, scale, maps, symmetric, exclude_self, want_pos, col_stats, bounded):
    m, nb = a.shape[0], b.shape[0]
    f32 = dict(dtype=_stat_dtype(a), device=a.device)
    has_pos = want_pos or partner is not None
    return (
        a.new_empty(m, **f32),
        a.new_empty(nb if col_stats else 0, **f32),
        a.new_empty(m if has_pos else 0, **f32),
        a.new_empty(m, **f32),
        a.new_empty(0 if symmetric else nb, **f32),
    )


def _fake_lse_backward(
    a,
    b,
    partner,
    scale,
    lse_r,
    lse_c,
    pos,
    rn_a,
    rn_b,
    g_r,
    g_c,
    g_p,
    maps,
    symmetric,
    exclude_self,
    want_pos,
    col_stats,
    bounded,
    want_b,
    want_scale,
):
    db = torch.empty_like(b) if want_b and not symmetric else a.new_empty(0)
    dp = a.new_empty(0) if partner is None else torch.empty_like(partner)
    return torch.empty_like(a), db, dp, scale.new_empty(() if want_scale else (0,))


@custom_op("similarity_lse_backward", fake=_fake_lse_backward)
def similarity_lse_backward(
    a: torch.Tensor,
    b: torch.Tensor,
    partner: torch.Tensor | None,
    scale: torch.Tensor,
    lse_r: torch.Tensor,
    lse_c: torch.Tensor,
    pos: torch.Tensor,
    rn_a: torch.Tensor,
    rn_b: torch.Tensor,
    g_r: torch.Tensor,
    g_c: torch.Tensor | None,
    g_p: torch.Tensor | None,
    maps: list[int],
    symmetric: bool,
    exclude_self: bool,
    want_pos: bool,
    col_stats: bool,
    bounded: bool,
    want_b: bool,
    want_scale: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(da, db or [0], dpartner or [0], dscale or [0]) for upstream gradients g_r (of lse_r), g_c (of lse_c),
    g_p (of pos); `maps` … `bounded` are the flat `LseSpec`.

    Rows of a see G directly; rows of b see Gᵀ, i.e. the same kernel with the roles swapped. In the
    symmetric case both roles land on a and a single launch computes G + Gᵀ. A partner's positive
    s_i = scale·â_i·p̂_i adds g_p[i]·scale·p̂_i to ∂L/∂â_i (and the mirror term to p) in the row-norm backward."""
    return _backward(
        a,
        b,
        partner,
        scale,
        lse_r,
        lse_c,
        pos,
        rn_a,
        rn_b,
        g_r,
        g_c,
        g_p,
        _spec(tuple(maps), symmetric, exclude_self, want_pos, col_stats, bounded),
        want_b=want_b,
        want_scale=want_scale,
    )


def _op_backward(ctx, g_r, g_c, g_p, *_):
    return _input_grads(ctx, *similarity_lse_backward(*_backward_inputs(ctx, g_r, g_c, g_p)))


def _differentiable_stats(spec: LseSpec):
    """(a, b, partner, scale) -> (lse_r, lse_c, pos) in plain autograd: the PyTorch path's forward."""

    def stats(a, b, partner, scale):
        if _impl(a, b, scale) is not FAMILY.torch:
            raise double_backward_unsupported("similarity_lse", TRITON_DOUBLE_BACKWARD)
        return _forward(a, b, partner, scale, spec)[:3]

    return stats


def _op_double_backward(ctx, g_r, g_c, g_p, *_):
    """create_graph=True: the statistics recomputed in plain autograd (PyTorch path), so the input gradients
    are differentiable in the inputs and in g_r, g_c, g_p."""
    grads = differentiable_grads(
        _differentiable_stats(ctx.spec), ctx.saved_tensors[:4], ctx.needs_input_grad[:4], (g_r, g_c, g_p)
    )
    return _input_grads(ctx, *grads)


@custom_op(
    "similarity_lse",
    fake=_fake_lse,
    backward=_op_backward,
    setup_context=_save,
    non_differentiable=(3, 4),
    double_backward=_op_double_backward,
)
def similarity_lse_op(
    a: torch.Tensor,
    b: torch.Tensor,
    partner: torch.Tensor | None,
    scale: torch.Tensor,
    maps: list[int],
    symmetric: bool,
    exclude_self: bool,
    want_pos: bool,
    col_stats: bool,
    bounded: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`sslfast::similarity_lse`: (lse_r [M], lse_c [Nb] or [0], pos [M] or [0], rn_a, rn_b or [0] if
    symmetric), fp32 (fp64 for fp64 inputs); `maps` … `bounded` are the flat `LseSpec`.

    `partner` (MoCo's queue mode): the positive of row i is partner[i] instead of a column of b, scored in the
    row-norm pass. The inverse row norms are returned for the backward; they get no gradient."""
    return _forward(a, b, partner, scale, _spec(tuple(maps), symmetric, exclude_self, want_pos, col_stats, bounded))[:5]
