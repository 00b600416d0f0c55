"""Contrastive losses: NT-Xent (SimCLR), InfoNCE (MoCo, with or without a queue) and CLIP.

All three are thin compositions over one custom op, `sslfast::similarity_lse`, that returns per-row (and
optionally per-column) log-sum-exps of S = scale · norm(a) norm(b)ᵀ plus the positives' logits, without
storing S (math in `sslfast.kernels.infonce`). The positive is kept out of the log-sum-exps (they run over
the negatives only), so each row's cross-entropy −log softmax(s_i)[pos] is the cancellation-free
softplus(lse_i − pos_i), and the loss is O(N) vector arithmetic:

    NT-Xent:  mean_i softplus(lse_i − s_{i,i±N}),   j = i also excluded from row i's negatives
    InfoNCE:  mean_i softplus(lse_i − s_ii)  or, with a queue, mean_i softplus(lse_queue_i − q̂_i·k̂_i/τ)
    CLIP:     ½ mean_i softplus(lse_r[i] − s_ii) + ½ mean_j softplus(lse_c[j] − s_jj)

Backward goes through `sslfast::similarity_lse_backward` (tiles recomputed, never stored). An eager call
that will be differentiated runs that backward inside its forward instead (`_custom_op.loss_with_grads`),
with the closed-form gradients of the epilogue (softplus' = sigmoid, one launch: `loss_epilogue`) as its
upstream gradients; autograd's backward then only scales the stored input gradients. CUDA tensors run the
Triton kernels, CPU tensors the chunked PyTorch reference (`sslfast._backend`), which also takes float64 and
is differentiable twice (create_graph=True recomputes the statistics in plain autograd; the kernels raise
`DoubleBackwardError`).
"""
from __future__ import annotations

import functools

import torch

from .. import _validate as V
from .._backend import use_triton, without_autocast
from .._custom_op import (TRITON_DOUBLE_BACKWARD, custom_op, differentiable_grads, double_backward_unsupported,
                          grads_in_forward, loss_with_grads, scalar_constant)
from ..distributed import all_gather, rank_and_world
from ..reference import infonce as _reference

_NO_SPLIT = 1 << 30  # "never": index maps with no second segment, identity pairing
BOUNDED_SCALE = 64.0  # plain-sum statistics hold for |logits| <= 64 (sslfast.kernels.infonce)


_KERNELS = None


def _impl(*tensors):
    global _KERNELS
    if use_triton(*tensors):
        if _KERNELS is None:
            from ..kernels import infonce as kernels

            _KERNELS = kernels
        return _KERNELS
    return _reference


def _maps(row_off=0, row_split=_NO_SPLIT, row_shift=0, pos_shift=0, pos_period=_NO_SPLIT) -> list[int]:
    """Global index maps (rows: idx + off + [idx >= split]·shift; columns: identity) and the pairing
    π(g) = (g + pos_shift) mod pos_period."""
    return [row_off, row_split, row_shift, 0, _NO_SPLIT, 0, pos_shift, pos_period]


def _swap(maps: list[int]) -> list[int]:
    return maps[3:6] + maps[0:3] + maps[6:8]


def _stat_dtype(x: torch.Tensor) -> torch.dtype:
    """The statistics' and scale's dtype: fp32, fp64 for fp64 inputs (reference path only); promote_types(dtype,
    fp32) for the float dtypes the ops take, without its dispatcher call."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _as(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x in `dtype`: x itself when it already is (`Tensor.to` costs a dispatcher call even then)."""
    return x if x.dtype == dtype else x.to(dtype)


# ------------------------------------------------------------------------------------------- the op
@without_autocast
def _forward(a, b, partner, scale, maps, symmetric, exclude_self, want_pos, col_stats, bounded):
    """similarity_lse's outputs, then the partner's inverse norms (or None) for a backward in the same call."""
    *out, rn_p = _stats(_impl(a, b, scale), a, b, partner, scale, maps, symmetric, exclude_self, want_pos,
                        col_stats, bounded)
    if symmetric:
        out[4] = out[3].new_empty(0)  # outputs may not alias each other
    return (*out, rn_p)


def _stats(impl, a, b, partner, scale, maps, symmetric, exclude_self, want_pos, col_stats, bounded):
    """`_forward` on `impl` (kernels or reference), except that rn_b is None when symmetric."""
    rn_p = None
    if partner is None:
        rn_a = impl.row_rnorm(a)
    else:
        rn_a, rn_p, pos = impl.row_rnorm(a, partner, scale)
    rn_b = rn_a if symmetric else impl.row_rnorm(b)
    lse_r, lse_c, tile_pos = impl.similarity_lse(*impl.tile_operands(a, b, rn_a, rn_b), scale, maps,
                                                 exclude_self=exclude_self, want_pos=want_pos, col_stats=col_stats,
                                                 bounded=bounded)
    if partner is None:
        pos = tile_pos
    st = _stat_dtype(a)
    return _as(lse_r, st), _as(lse_c, st), _as(pos, st), _as(rn_a, st), None if symmetric else _as(rn_b, st), rn_p


@without_autocast
def _backward(a, b, partner, scale, lse_r, lse_c, pos, rn_a, rn_b, g_r, g_c, g_p, maps, symmetric, exclude_self,
              bounded, want_b, want_scale, rn_p=None):
    da, db, dpartner, dscale = _grads(_impl(a, b, scale), a, b, partner, scale, lse_r, lse_c, pos, rn_a, rn_b, g_r,
                                      g_c, g_p, maps, symmetric, exclude_self, bounded, want_b, want_scale, rn_p)
    return (da, a.new_empty(0) if db is None else db, a.new_empty(0) if dpartner is None else dpartner,
            scale.new_empty(0) if dscale is None else dscale)  # outputs may not alias each other


def _grads(impl, a, b, partner, scale, lse_r, lse_c, pos, rn_a, rn_b, g_r, g_c, g_p, maps, symmetric, exclude_self,
           bounded, want_b, want_scale, rn_p):
    """`_backward` on `impl`, with None for the gradients it does not compute."""
    if symmetric:
        lse_c, g_c, rn_b = lse_r, g_r, rn_a
    with_c = g_c is not None
    tile_pos = g_p if partner is None else None
    ta, tb, trn_a, trn_b = impl.tile_operands(a, b, rn_a, rn_b)  # once for both roles
    dah, dscale = impl.similarity_lse_rows_grad(
        ta, tb, trn_a, trn_b, scale, maps, exclude_self=exclude_self, bounded=bounded, lse_r=lse_r, g_r=g_r,
        lse_c=lse_c if with_c else None, g_c=g_c, g_pr=tile_pos, g_pc=tile_pos if symmetric else None,
        want_dscale=want_scale)
    db = dpartner = None
    if partner is None:
        da = impl.row_normalize_backward(a, rn_a, dah)
    else:
        rn_p = impl.row_rnorm(partner) if rn_p is None else rn_p
        coef = g_p * scale
        da = impl.row_normalize_backward(a, rn_a, dah, partner, rn_p, coef)
        dpartner = impl.row_normalize_backward(partner, rn_p, None, a, rn_a, coef)
        if want_scale:
            dscale = dscale + (g_p * pos).sum() / scale
    if want_b and not symmetric:
        dbh, _ = impl.similarity_lse_rows_grad(
            tb, ta, trn_b, trn_a, scale, _swap(maps), exclude_self=exclude_self, bounded=bounded,
            lse_r=lse_c if with_c else None, g_r=g_c, lse_c=lse_r, g_c=g_r, g_pc=tile_pos)
        db = impl.row_normalize_backward(b, rn_b, dbh)
    return da, db, dpartner, _as(dscale, scale.dtype).reshape(()) if want_scale else None


def _backward_inputs(ctx, g_r, g_c, g_p):
    """Arguments of `_backward` from an autograd context (custom op or autograd.Function alike)."""
    a, b, partner, scale, lse_r, lse_c, pos, rn_a, rn_b = ctx.saved_tensors
    maps, symmetric, exclude_self, has_pos, col_stats, bounded = ctx.cfg
    want_b = ctx.needs_input_grad[1] and not symmetric
    st = lse_r.dtype
    return (a, b, partner, scale, lse_r, lse_c, pos, rn_a, rn_b, _as(g_r, st), _as(g_c, st) if col_stats else None,
            _as(g_p, st) if has_pos else None, maps, symmetric, exclude_self, bounded, want_b,
            ctx.needs_input_grad[3])


def _input_grads(ctx, da, db, dp, dscale):
    partner = ctx.saved_tensors[2]
    return (da, db if ctx.needs_input_grad[1] and not ctx.cfg[1] else None, dp if partner is not None else None,
            dscale if ctx.needs_input_grad[3] else None, None, None, None, None, None, None)


def _save(ctx, inputs, output):
    a, b, partner, scale, maps, symmetric, exclude_self, want_pos, col_stats, bounded = inputs
    lse_r, lse_c, pos, rn_a, rn_b = output
    ctx.save_for_backward(a, b, partner, scale, lse_r, lse_c, pos, rn_a, rn_b)
    ctx.cfg = (maps, symmetric, exclude_self, want_pos or partner is not None, col_stats, bounded)


def _fake_lse(a, b, partner, scale, maps, symmetric, exclude_self, want_pos, col_stats, bounded):
    m, nb = a.shape[0], b.shape[0]
    f32 = dict(dtype=_stat_dtype(a), device=a.device)
    has_pos = want_pos or partner is not None
    return (a.new_empty(m, **f32), a.new_empty(nb if col_stats else 0, **f32),
            a.new_empty(m if has_pos else 0, **f32), a.new_empty(m, **f32), a.new_empty(0 if symmetric else nb, **f32))


def _fake_lse_backward(a, b, partner, scale, lse_r, lse_c, pos, rn_a, rn_b, g_r, g_c, g_p, maps, symmetric,
                       exclude_self, bounded, want_b, want_scale):
    db = torch.empty_like(b) if want_b and not symmetric else a.new_empty(0)
    dp = a.new_empty(0) if partner is None else torch.empty_like(partner)
    return torch.empty_like(a), db, dp, scale.new_empty(() if want_scale else (0,))


@custom_op("similarity_lse_backward", fake=_fake_lse_backward)
def similarity_lse_backward(a: torch.Tensor, b: torch.Tensor, partner: torch.Tensor | None, scale: torch.Tensor,
                            lse_r: torch.Tensor, lse_c: torch.Tensor, pos: torch.Tensor, rn_a: torch.Tensor,
                            rn_b: torch.Tensor, g_r: torch.Tensor, g_c: torch.Tensor | None,
                            g_p: torch.Tensor | None, maps: list[int], symmetric: bool, exclude_self: bool,
                            bounded: bool, want_b: bool, want_scale: bool
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(da, db or [0], dpartner or [0], dscale or [0]) for upstream gradients g_r (of lse_r), g_c (of lse_c),
    g_p (of pos).

    Rows of a see G directly; rows of b see Gᵀ, i.e. the same kernel with the roles swapped. In the
    symmetric case both roles land on a and a single launch computes G + Gᵀ. A partner's positive
    s_i = scale·â_i·p̂_i adds g_p[i]·scale·p̂_i to ∂L/∂â_i (and the mirror term to p) in the row-norm backward."""
    return _backward(a, b, partner, scale, lse_r, lse_c, pos, rn_a, rn_b, g_r, g_c, g_p, maps, symmetric,
                     exclude_self, bounded, want_b, want_scale)


def _op_backward(ctx, g_r, g_c, g_p, *_):
    return _input_grads(ctx, *similarity_lse_backward(*_backward_inputs(ctx, g_r, g_c, g_p)))


def _differentiable_stats(cfg):
    """(a, b, partner, scale) -> (lse_r, lse_c, pos) in plain autograd: the reference path's forward."""
    def stats(a, b, partner, scale):
        if _impl(a, b, scale) is not _reference:
            raise double_backward_unsupported("similarity_lse", TRITON_DOUBLE_BACKWARD)
        return _forward(a, b, partner, scale, *cfg)[:3]
    return stats


def _op_double_backward(ctx, g_r, g_c, g_p, *_):
    """create_graph=True: the statistics recomputed in plain autograd (reference path), so the input gradients
    are differentiable in the inputs and in g_r, g_c, g_p."""
    a, b, partner, scale = ctx.saved_tensors[:4]
    maps, symmetric, exclude_self, has_pos, col_stats, bounded = ctx.cfg
    stats = _differentiable_stats((maps, symmetric, exclude_self, has_pos and partner is None, col_stats, bounded))
    grads = differentiable_grads(stats, (a, b, partner, scale), ctx.needs_input_grad[:4], (g_r, g_c, g_p))
    return _input_grads(ctx, *grads)


@custom_op("similarity_lse", fake=_fake_lse, backward=_op_backward, setup_context=_save, non_differentiable=(3, 4),
           double_backward=_op_double_backward)
def similarity_lse(a: torch.Tensor, b: torch.Tensor, partner: torch.Tensor | None, scale: torch.Tensor,
                   maps: list[int], symmetric: bool, exclude_self: bool, want_pos: bool, col_stats: bool,
                   bounded: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(lse_r [M], lse_c [Nb] or [0], pos [M] or [0], rn_a, rn_b or [0] if symmetric), in fp32.

    `want_pos`: the positives are columns of b (row i's at π(i)); they are read from the tiles and left out
    of lse_r and lse_c. `partner` (MoCo's queue mode): the positive of row i is partner[i] instead, scored
    in the row-norm pass. `symmetric`: b is a (NT-Xent on one device). `bounded`: |scale| <= 64 is known, so
    the kernels may use plain fp32 sums (see `sslfast.kernels.infonce`). The inverse row norms are returned
    for the backward; they get no gradient."""
    return _forward(a, b, partner, scale, maps, symmetric, exclude_self, want_pos, col_stats, bounded)[:5]


# ------------------------------------------------------------------------------------------- the losses
@without_autocast
def _loss_and_input_grads(cfg, needs, a, b, partner, scale):
    """`loss_with_grads`' function: the loss, then the backward with the epilogue's gradients."""
    maps, symmetric, exclude_self, _, _, bounded = cfg
    impl = _impl(a, b, scale)
    *stats, rn_p = _stats(impl, a, b, partner, scale, *cfg)
    loss, *grads = impl.loss_epilogue(*stats[:3])
    want_b = needs[1] and not symmetric
    da, db, dp, ds = _grads(impl, a, b, partner, scale, *stats, *grads, maps, symmetric, exclude_self, bounded,
                            want_b, needs[3], rn_p)
    return loss, (da if needs[0] else None, db, dp if needs[2] else None, ds)


def _pair_loss_and_input_grads(cfg, needs, z1, z2, scale):
    """`_loss_and_input_grads` of z = [z1; z2] against itself (single-device NT-Xent), the concatenation made
    here, outside autograd: the graph gets no concatenation node, and z's gradient is handed on as two views."""
    n, z = z1.shape[0], torch.cat([z1, z2])
    loss, (dz, _, _, ds) = _loss_and_input_grads(cfg, (needs[0] or needs[1], False, False, needs[2]), z, z, None,
                                                 scale)
    return loss, (dz[:n] if needs[0] else None, dz[n:] if needs[1] else None, ds)


def _differentiable_pair_loss(cfg, z1, z2, scale) -> torch.Tensor:
    z = torch.cat([z1, z2])
    return _differentiable_loss(cfg, z, z, None, scale)


def _differentiable_loss(cfg, a, b, partner, scale) -> torch.Tensor:
    return _reference.contrastive_loss(*_differentiable_stats(cfg)(a, b, partner, scale))


def _contrastive(a, b, partner, scale, maps, symmetric, exclude_self, want_pos, col_stats, bounded) -> torch.Tensor:
    """The loss from `similarity_lse`'s statistics (`reference.infonce.contrastive_loss`); with the input
    gradients in the same forward when eager autograd will want them."""
    cfg = (maps, symmetric, exclude_self, want_pos, col_stats, bounded)
    if grads_in_forward(a, b, partner, scale):
        # a create_graph backward recomputes the loss in plain autograd (reference path only)
        differentiable = functools.partial(_differentiable_loss, cfg) if _impl(a, b, scale) is _reference else None
        return loss_with_grads(functools.partial(_loss_and_input_grads, cfg), a, b, partner, scale,
                               op="similarity_lse", differentiable=differentiable, hint=TRITON_DOUBLE_BACKWARD)
    lse_r, lse_c, pos, _, _ = similarity_lse(a, b, partner, scale, *cfg)
    return _reference.contrastive_loss(lse_r, lse_c, pos)


# ------------------------------------------------------------------------------------------- validation
def _inverse_temperature(temperature, like: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """1/τ as a device scalar (a fill, no host-to-device copy) and whether it allows the plain-sum kernels."""
    inv = 1.0 / V.positive("temperature", temperature)
    return scalar_constant(inv, like, _stat_dtype(like)), inv <= BOUNDED_SCALE


def _paired(a: torch.Tensor, b_local: torch.Tensor, scale: torch.Tensor, bounded: bool, gather: bool):
    """Rows of `a` against the (gathered) rows of `b_local`, the positive of row i being column i."""
    rank, _ = rank_and_world() if gather else (0, 1)
    b = all_gather(b_local) if gather else b_local
    return _contrastive(a, b, None, scale, _maps(row_off=rank * a.shape[0]), False, False, True, False, bounded)


# ------------------------------------------------------------------------------------------- public API
def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5, *,
                 gather_distributed: bool = False) -> torch.Tensor:
    """SimCLR's NT-Xent over 2N views: z = norm([z1; z2]), S = z zᵀ/τ, row i's positive is i ± N and its
    denominator every k ≠ i; the loss is the mean over the 2N rows (lightly `NTXentLoss(memory_bank_size=0)`).

    z1, z2: [N, D], N >= 2. With `gather_distributed`, each rank scores its 2N rows against all ranks' 2N·W
    rows; after DDP averages gradients they equal the single-process gradients on the whole batch.
    """
    z1, z2 = V.view_pair("z1", z1, "z2", z2)
    n = z1.shape[0]
    if n < 2:
        raise ValueError(f"z1 and z2 need at least 2 rows (N >= 2) so that every row has a negative, got N={n}")
    scale, bounded = _inverse_temperature(temperature, z1)
    rank, world = rank_and_world() if gather_distributed else (0, 1)
    if world == 1:
        cfg = (_maps(pos_shift=n, pos_period=2 * n), True, True, True, False, bounded)
        if grads_in_forward(z1, z2, scale):
            differentiable = (functools.partial(_differentiable_pair_loss, cfg) if _impl(z1, z2, scale) is _reference
                              else None)
            return loss_with_grads(functools.partial(_pair_loss_and_input_grads, cfg), z1, z2, scale,
                                   op="similarity_lse", differentiable=differentiable, hint=TRITON_DOUBLE_BACKWARD)
        z = torch.cat([z1, z2])
        return _contrastive(z, z, None, scale, *cfg)
    z = torch.cat([z1, z2])
    big_n = n * world
    zg = torch.cat([all_gather(z1), all_gather(z2)])
    maps = _maps(row_off=rank * n, row_split=n, row_shift=big_n - n, pos_shift=big_n, pos_period=2 * big_n)
    return _contrastive(z, zg, None, scale, maps, False, True, True, False, bounded)


def info_nce_loss(query: torch.Tensor, key: torch.Tensor, queue: torch.Tensor | None = None,
                  temperature: float = 0.2, *, gather_distributed: bool = False) -> torch.Tensor:
    """MoCo's InfoNCE.

    With a queue [K, D] (MoCo v1/v2): logits_i = [q̂_i·k̂_i, q̂_i·queuê_1, …]/τ with target 0; the queue
    gets no gradient (gather the keys into the queue instead: `sslfast.nn.InfoNCELoss` does).
    Without (MoCo v3, one direction of CLIP): logits = q̂ k̂ᵀ/τ over the batch, target i; with
    `gather_distributed` the keys are all-gathered and row i's positive is its own key.
    """
    query, key = V.view_pair("query", query, "key", key)
    scale, bounded = _inverse_temperature(temperature, query)
    if queue is None:
        world = rank_and_world()[1] if gather_distributed else 1
        if query.shape[0] * world < 2:
            raise ValueError("query needs at least 2 rows when queue is None (the other keys are the negatives), "
                             f"got N={query.shape[0]}")
        return _paired(query, key, scale, bounded, gather_distributed)
    queue = V.tensor("queue", queue, ndim=2, shape_hint="[K, D]", reference_dtypes=V.REFERENCE_DTYPES)
    if queue.shape[1] != query.shape[1]:
        raise ValueError(f"queue must be [K, D] with D = {query.shape[1]} (the query's), got {tuple(queue.shape)}")
    V.same_device(query=query, queue=queue)
    V.same_dtype(query=query, queue=queue)
    if queue.shape[0] == 0:  # no negatives: softplus(-inf) = 0 for every row, and no gradient
        return (query * 0).sum() + (key * 0).sum()
    return _contrastive(query, queue.detach(), key, scale, _maps(), False, False, False, False, bounded)


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor, *,
              gather_distributed: bool = False) -> torch.Tensor:
    """CLIP: L = logit_scale · norm(img) norm(txt)ᵀ, loss = (CE(L, arange) + CE(Lᵀ, arange)) / 2.

    Row and column statistics come from the same tiles in one pass; the gradient reaches `logit_scale`
    (a tensor with one element). With `gather_distributed`, each rank's images are scored against all texts
    and its texts against all images (open_clip's local loss), with exact gradients.
    """
    img, txt = V.view_pair("image_features", image_features, "text_features", text_features)
    if not isinstance(logit_scale, torch.Tensor) or logit_scale.numel() != 1 or not logit_scale.is_floating_point():
        raise TypeError("logit_scale must be a floating tensor with one element (e.g. model.logit_scale.exp())")
    V.same_device(image_features=img, logit_scale=logit_scale)
    scale = logit_scale.reshape(()).to(_stat_dtype(img))
    if gather_distributed and rank_and_world()[1] > 1:
        return (_paired(img, txt, scale, False, True) + _paired(txt, img, scale, False, True)) / 2
    return _contrastive(img, txt, None, scale, _maps(), False, False, True, True, False)
