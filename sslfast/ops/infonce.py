"""Contrastive losses: NT-Xent (SimCLR), InfoNCE (MoCo, with or without a queue) and CLIP.

All three are thin compositions over one custom op, `sslfast::similarity_lse` (`sslfast.ops.infonce_lse`),
that returns per-row (and optionally per-column) log-sum-exps of S = scale · norm(a) norm(b)ᵀ plus the
positives' logits, without storing S (math in `sslfast.kernels.infonce`). The positive is kept out of the
log-sum-exps (they run over the negatives only), so each row's cross-entropy −log softmax(s_i)[pos] is the
cancellation-free softplus(lse_i − pos_i), and the loss is O(N) vector arithmetic:

    NT-Xent:  mean_i softplus(lse_i − s_{i,i±N}),   j = i also excluded from row i's negatives
    InfoNCE:  mean_i softplus(lse_i − s_ii)  or, with a queue, mean_i softplus(lse_queue_i − q̂_i·k̂_i/τ)
    CLIP:     ½ mean_i softplus(lse_r[i] − s_ii) + ½ mean_j softplus(lse_c[j] − s_jj)

An eager call that will be differentiated runs the op's backward inside its forward (`_custom_op.loss_with_grads`),
with the closed-form gradients of the epilogue (one launch: `loss_epilogue`) as its upstream gradients. CPU
tensors and float64 take the chunked PyTorch path, differentiable twice.
"""

from __future__ import annotations

import functools

import torch

from .. import _validate as V
from .._backend import without_autocast
from .._custom_op import TRITON_DOUBLE_BACKWARD, grads_in_forward, loss_with_grads, scalar_constant
from ..distributed import all_gather, rank_and_world
from ._torch.infonce import contrastive_loss
from .infonce_lse import FAMILY, _differentiable_stats, _grads, _impl, _stat_dtype, _stats, similarity_lse_op
from .infonce_lse import InfoNCEImpl, similarity_lse_backward  # noqa: F401  (the family's contract and ops, here too)
from .infonce_spec import _CLIP_SPEC, _QUEUE_SPECS, BOUNDED_SCALE, IndexMaps, LseSpec, _pair_spec, _rows_spec


# ------------------------------------------------------------------------------------------- the losses
@without_autocast
def _loss_and_input_grads(spec: LseSpec, needs, a, b, partner, scale):
    """`loss_with_grads`' function: the loss, then the backward with the epilogue's gradients."""
    impl = _impl(a, b, scale)
    lse_r, lse_c, pos, rn_a, rn_b, rn_p, tiles = _stats(impl, a, b, partner, scale, spec)
    loss, *grads = impl.loss_epilogue(lse_r, lse_c, pos)
    da, db, dp, ds = _grads(
        impl,
        a,
        b,
        partner,
        scale,
        lse_r,
        lse_c,
        rn_a,
        rn_b,
        *grads,
        spec,
        want_b=needs[1] and not spec.symmetric,
        want_scale=needs[3],
        rn_p=rn_p,
        tiles=tiles,
    )
    return loss, (da if needs[0] else None, db, dp if needs[2] else None, ds)


def _pair_loss_and_input_grads(spec: LseSpec, needs, z1, z2, scale):
    """`_loss_and_input_grads` of z = [z1; z2] against itself (single-device NT-Xent), the concatenation made
    here, outside autograd: the graph gets no concatenation node, and z's gradient is handed on as two views."""
    n, z = z1.shape[0], torch.cat([z1, z2])
    loss, (dz, _, _, ds) = _loss_and_input_grads(
        spec, (needs[0] or needs[1], False, False, needs[2]), z, z, None, scale
    )
    return loss, (dz[:n] if needs[0] else None, dz[n:] if needs[1] else None, ds)


def _differentiable_loss(spec: LseSpec, a, b, partner, scale) -> torch.Tensor:
    return contrastive_loss(*_differentiable_stats(spec)(a, b, partner, scale))


def _differentiable_pair_loss(spec: LseSpec, z1, z2, scale) -> torch.Tensor:
    z = torch.cat([z1, z2])
    return _differentiable_loss(spec, z, z, None, scale)


def _contrastive(a, b, partner, scale, spec: LseSpec) -> torch.Tensor:
    """The loss from `similarity_lse`'s statistics (`contrastive_loss`); with the input gradients in the same
    forward when eager autograd will want them."""
    if grads_in_forward(a, b, partner, scale):
        # a create_graph backward recomputes the loss in plain autograd (PyTorch path only)
        differentiable = functools.partial(_differentiable_loss, spec) if _impl(a, b, scale) is FAMILY.torch else None
        return loss_with_grads(
            functools.partial(_loss_and_input_grads, spec),
            a,
            b,
            partner,
            scale,
            op="similarity_lse",
            differentiable=differentiable,
            hint=TRITON_DOUBLE_BACKWARD,
        )
    lse_r, lse_c, pos, _, _ = similarity_lse_op(a, b, partner, scale, *spec)
    return contrastive_loss(lse_r, lse_c, pos)


# ------------------------------------------------------------------------------------------- validation
def _inverse_temperature(temperature, like: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """1/τ as a device scalar (a fill, no host-to-device copy) and whether it allows the plain-sum kernels."""
    inv = 1.0 / V.positive("temperature", temperature)
    return scalar_constant(inv, like, _stat_dtype(like)), inv <= BOUNDED_SCALE


def _paired(a: torch.Tensor, b_local: torch.Tensor, scale: torch.Tensor, *, bounded: bool, gather: bool):
    """Rows of `a` against the (gathered) rows of `b_local`, the positive of row i being column i."""
    rank, _ = rank_and_world() if gather else (0, 1)
    b = all_gather(b_local) if gather else b_local
    return _contrastive(a, b, None, scale, _rows_spec(rank * a.shape[0], bounded))


# ------------------------------------------------------------------------------------------- public API
def nt_xent_loss(
    z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5, *, gather_distributed: bool = False
) -> torch.Tensor:
    """SimCLR's NT-Xent over 2N views (lightly's `NTXentLoss(memory_bank_size=0)`).

    With z = norm([z1; z2]) and S = z zᵀ/τ, row i's positive is i ± N and its denominator every k ≠ i:
    loss = mean_i −log(exp(S_{i,i±N}) / Σ_{k≠i} exp(S_ik)) over the 2N rows.

    Args:
        z1, z2: [N, D] projections of the two views, N >= 2, same dtype (fp32 / bf16 / fp16; fp64 on the
            PyTorch path) and device; rows are normalized inside.
        temperature: τ > 0.
        gather_distributed: score each rank's 2N rows against all ranks' 2N·W rows (all-gathered); after DDP
            averages the gradients they equal the single-process gradients on the whole batch.

    Returns:
        The loss, a 0-d fp32 tensor (fp64 for fp64 inputs).

    Raises:
        ValueError: z1 or z2 not a non-empty [N, D] tensor, shapes or devices differ, N < 2, or τ not a
            finite number > 0.
        TypeError: a non-tensor or non-floating input (float64 on the Triton path), dtypes differ, or τ not
            a real number.
    """
    z1, z2 = V.view_pair("z1", z1, "z2", z2)
    n = z1.shape[0]
    if n < 2:
        raise ValueError(f"z1 and z2 need at least 2 rows (N >= 2) so that every row has a negative, got N={n}")
    scale, bounded = _inverse_temperature(temperature, z1)
    rank, world = rank_and_world() if gather_distributed else (0, 1)
    if world == 1:
        spec = _pair_spec(n, bounded)
        if grads_in_forward(z1, z2, scale):
            differentiable = (
                functools.partial(_differentiable_pair_loss, spec) if _impl(z1, z2, scale) is FAMILY.torch else None
            )
            return loss_with_grads(
                functools.partial(_pair_loss_and_input_grads, spec),
                z1,
                z2,
                scale,
                op="similarity_lse",
                differentiable=differentiable,
                hint=TRITON_DOUBLE_BACKWARD,
            )
        z = torch.cat([z1, z2])
        return _contrastive(z, z, None, scale, spec)
    z = torch.cat([z1, z2])
    big_n = n * world
    zg = torch.cat([all_gather(z1), all_gather(z2)])
    maps = IndexMaps(row_off=rank * n, row_split=n, row_shift=big_n - n, pos_shift=big_n, pos_period=2 * big_n)
    return _contrastive(z, zg, None, scale, LseSpec(maps, exclude_self=True, bounded=bounded))


def info_nce_loss(
    query: torch.Tensor,
    key: torch.Tensor,
    queue: torch.Tensor | None = None,
    temperature: float = 0.2,
    *,
    gather_distributed: bool = False,
) -> torch.Tensor:
    """MoCo's InfoNCE.

    With a queue (MoCo v1/v2): logits_i = [q̂_i·k̂_i, q̂_i·queuê_1, …]/τ with target 0. Without (MoCo v3, one
    direction of CLIP): logits = q̂ k̂ᵀ/τ over the batch, target i. loss = mean_i cross-entropy(logits_i).

    Args:
        query, key: [N, D], same dtype (fp32 / bf16 / fp16; fp64 on the PyTorch path) and device.
        queue: [K, D] negatives, or None for the other keys of the batch. The queue gets no gradient (gather
            the keys into the queue instead: `sslfast.nn.InfoNCELoss` does); K = 0 gives a zero loss.
        temperature: τ > 0.
        gather_distributed: without a queue, all-gather the keys; row i's positive is its own key.

    Returns:
        The loss, a 0-d fp32 tensor (fp64 for fp64 inputs).

    Raises:
        ValueError: query or key not a non-empty [N, D] tensor, shapes or devices (queue included) differ,
            N < 2 (world-wide) without a queue, a queue that is not [K, D], or τ not a finite number > 0.
        TypeError: a non-tensor or non-floating input (float64 on the Triton path), dtypes (queue included)
            differ, or τ not a real number.
    """
    query, key = V.view_pair("query", query, "key", key)
    scale, bounded = _inverse_temperature(temperature, query)
    if queue is None:
        world = rank_and_world()[1] if gather_distributed else 1
        if query.shape[0] * world < 2:
            raise ValueError(
                "query needs at least 2 rows when queue is None (the other keys are the negatives), "
                f"got N={query.shape[0]}"
            )
        return _paired(query, key, scale, bounded=bounded, gather=gather_distributed)
    queue = V.tensor("queue", queue, ndim=2, shape_hint="[K, D]", reference_dtypes=V.REFERENCE_DTYPES)
    if queue.shape[1] != query.shape[1]:
        raise ValueError(f"queue must be [K, D] with D = {query.shape[1]} (the query's), got {tuple(queue.shape)}")
    V.same_device(query=query, queue=queue)
    V.same_dtype(query=query, queue=queue)
    if queue.shape[0] == 0:  # no negatives: softplus(-inf) = 0 for every row, and no gradient
        return (query * 0).sum() + (key * 0).sum()
    queue = queue.detach() if queue.requires_grad else queue  # no gradient (a detach costs a dispatch)
    return _contrastive(query, queue, key, scale, _QUEUE_SPECS[bounded])


def clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    *,
    gather_distributed: bool = False,
) -> torch.Tensor:
    """CLIP's symmetric loss: L = logit_scale · norm(img) norm(txt)ᵀ, loss = (CE(L, arange) + CE(Lᵀ, arange)) / 2.

    Row and column statistics come from the same tiles in one pass; the gradient reaches `logit_scale`.

    Args:
        image_features, text_features: [B, D], same dtype (fp32 / bf16 / fp16; fp64 on the PyTorch path) and
            device; rows are normalized inside.
        logit_scale: a floating tensor with one element, already exponentiated (e.g. `model.logit_scale.exp()`).
        gather_distributed: score each rank's images against all texts and its texts against all images
            (open_clip's local loss), with exact gradients.

    Returns:
        The loss, a 0-d fp32 tensor (fp64 for fp64 inputs).

    Raises:
        ValueError: a feature tensor not a non-empty [B, D] tensor, shapes or devices (logit_scale included)
            differ.
        TypeError: a non-tensor or non-floating input (float64 on the Triton path), dtypes differ, or
            `logit_scale` not a one-element floating tensor.
    """
    img, txt = V.view_pair("image_features", image_features, "text_features", text_features)
    if not isinstance(logit_scale, torch.Tensor) or logit_scale.numel() != 1 or not logit_scale.is_floating_point():
        raise TypeError("logit_scale must be a floating tensor with one element (e.g. model.logit_scale.exp())")
    V.same_device(image_features=img, logit_scale=logit_scale)
    scale = (logit_scale if logit_scale.dim() == 0 else logit_scale.reshape(())).to(_stat_dtype(img))
    if gather_distributed and rank_and_world()[1] > 1:
        return (
            _paired(img, txt, scale, bounded=False, gather=True) + _paired(txt, img, scale, bounded=False, gather=True)
        ) / 2
    return _contrastive(img, txt, None, scale, _CLIP_SPEC)
