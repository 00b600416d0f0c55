"""MAE kernels: random masking, patch gather straight from images, token gather/unshuffle, norm-pix loss.

Notation: images [B, C, H, W], patch size p, patch grid h×w = (H/p)×(W/p), L = h·w patches, E = p·p·C
values per patch in MAE's (p q c) order (`patchify`: x[b, l, (i·p + j)·C + c] = img[b, c, hp·p + i, wp·p + j]
with l = hp·w + wp), K patches kept per sample.

random_masking (one program per sample, the whole row in registers):

    u_l   = philox(seed, b·Lc + cell(l)) >> 1          31 random bits per (coarse) cell, Triton's Philox 4x32-10
    key_l = u_l · 2³² + l                               packed int64: sorting keys = stable argsort of the noise
    ids_shuffle = low 32 bits of sort(key)              the official `argsort(noise)`
    ids_keep = ids_shuffle[:K];  ids_restore[ids_shuffle[j]] = j;  mask[ids_shuffle[j]] = (j >= K)

cell(l) = l without blocks; with SimMIM-style blocks of s×s patches, cell(l) is the coarse cell holding l, so
whole cells are kept or masked together (equal keys sort adjacent; ties broken by l). The seed is a device
scalar (SEED_IN_MEMORY, drawn from a device generator without a host sync) or a host integer.
`sslfast.ops._torch.mae.philox` is the same generator in PyTorch, so both paths give the same permutation.

gather_rows (gather_tokens and unshuffle forward, one [BLOCK_R rows, BLOCK_D] tile loop per program):

    out[b, i] = x[b, idx[b, i]]                      if 0 <= idx < n_src
              = mask_token                           if n_src <= idx < valid_hi     (unshuffle only, broadcast)
              = NaN                                  otherwise (bad index: memory-safe, never a silent value)
    out[b, i] += pos[i]                              (optional, same pass)

index_sum (the adjoint of gather_rows, i.e. both backwards) as one-hot tensor-core products per sample:

    out[b, o] = Σ_s [idx[b, s] = o] · g[b, s]        o < n_out; exact (0/1 weights, fp32 accumulation)
    rest[b]   = Σ_s [n_out <= idx[b, s] < rest_hi] · g[b, s]     (∂/∂mask_token: one-hot row n_out, summed later)

No atomics and no zero-fill: every output row is written once, repeated indices sum correctly. A NaN in g
spreads to the other rows of its one-hot block (0·NaN); a non-finite gradient stays non-finite.

Token inputs (x of gather_tokens / unshuffle, pred) may be batch-strided views such as `x[:, 1:]` (rows
dense, any batch stride): the official decoder's cls-token slices are read in place, not copied.

Patch reads (gather_patches / patchify, masked_mse's targets; whole patches per program). A patch's C·p image
rows of p pixels ("segments") are loaded as a [BLOCK_S ≥ C·p, BLOCK_P ≥ p] tile with the pixels innermost
(coalesced; 16-byte vectors when p·itemsize is a multiple of 16, e.g. p=16 in bf16 or fp32, narrower ones
otherwise), then put in MAE order by one gather through shared memory:

    seg[s, j] = img[b, c, hp·p + i, wp·p + j]                         s = c·p + i
    x[e]      = seg[(e mod C)·p + ⌊e / (C·p)⌋, ⌊e / C⌋ mod p]         e = (i·p + j)·C + c

(with C = 1 and p a power of two the two orders coincide and there is no gather).

masked_mse (rows of whole patches in registers; the target is read from the images, never materialized):

    t      = patch pixels;  with norm_pix: t = (t − mean) / sqrt(var + 1e-6), var unbiased (x.var(-1))
    ℓ_r    = mean_e (pred_r − t_r)²;   loss = Σ_r w_r ℓ_r / Σ_r w_r          (w = mask, 1 = masked)
    ∂loss/∂pred_r = g · 2 w_r (pred_r − t_r) / (E · Σ w)                     (rows with w = 0: zeros)

The forward reads every row (so a non-finite value anywhere gives a non-finite loss, as the official code);
per-program partial sums go to an [n_programs] buffer that the launcher sums (deterministic), Σ w is one
reduction of the mask before it. A forward that will be differentiated also writes ∂loss/∂pred for g = 1
from the same registers (the loss is terminal: autograd's backward then only scales it); the separate
backward kernel recomputes only the rows with w != 0 and writes zeros without reading the others.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._backend import interpreting
from ._common import cdiv, empty, next_pow2, upcast_dots
from ._launch import cached_launch

NORM_PIX_EPS = 1e-6  # as the official forward_loss
_PAD_KEY = tl.constexpr(9223372036854775807)  # int64 max: padding lanes sort last (constexpr: a @jit global)


# --------------------------------------------------------------------------------------------- kernels
@cached_launch
@triton.jit
def _random_masking_kernel(
    SEED,
    seed_val,
    IDS_KEEP,
    IDS_RESTORE,
    MASK,
    L,
    keep,
    grid_w,
    block,
    coarse_w,
    n_coarse,
    SEED_IN_MEMORY: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    # Grid (B,): one sample per program, its L keys sorted in registers (bitonic sort of packed int64).
    b = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, BLOCK_L)
    ok = i < L
    if SEED_IN_MEMORY:
        seed = tl.load(SEED)
    else:
        seed = seed_val
    row = i // grid_w
    col = i % grid_w
    cell = (row // block) * coarse_w + col // block
    r = tl.randint(seed, b * n_coarse + cell.to(tl.int64))
    key = ((r >> 1).to(tl.int64) << 32) | i.to(tl.int64)
    key = tl.where(ok, key, _PAD_KEY)
    key = tl.sort(key)
    ids = key - ((key >> 32) << 32)
    tl.store(IDS_KEEP + b * keep + i, ids, mask=i < keep)
    tl.store(IDS_RESTORE + b * L + ids, i.to(tl.int64), mask=ok)
    tl.store(MASK + b * L + ids, (i >= keep).to(tl.float32), mask=ok)


@triton.jit
def _patches(
    IMG,
    b,
    l,
    load_ok,
    L,
    grid_w,
    P: tl.constexpr,
    C: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """Patches l of samples b: [BLOCK_R, BLOCK_E] rows in MAE order, IMG's dtype, 0 where not load_ok and at e >= E.
    Segments in, one gather to MAE order (see the module docstring)."""
    # W = w·p and H·W = L·p·p: strides the compiler knows are multiples of p (aligned vectors without the JIT's
    # divisibility specialization)
    W = grid_w * P
    base = b.to(tl.int64) * (L * (C * P * P)) + ((l // grid_w) * P).to(tl.int64) * W + (l % grid_w) * P
    s = tl.arange(0, BLOCK_S)
    j = tl.arange(0, BLOCK_P)
    seg = (s // P).to(tl.int64) * (L * (P * P)) + (s % P) * W
    x = tl.load(
        IMG + base[:, None, None] + seg[None, :, None] + j[None, None, :],
        mask=load_ok[:, None, None] & (s < C * P)[None, :, None] & (j < P)[None, None, :],
        other=0.0,
    )
    if C > 1 or BLOCK_P > P:  # otherwise segment order is MAE order
        e = tl.arange(0, BLOCK_E)
        src = ((e % C) * P + e // (C * P)) * BLOCK_P + (e // C) % P
        # e >= E reads the tile's last lane, a zero (BLOCK_E > E = C·p·p means BLOCK_S > C·p or BLOCK_P > p)
        src = tl.where(e < C * P * P, src, BLOCK_S * BLOCK_P - 1)
        src = tl.arange(0, BLOCK_R)[:, None] * (BLOCK_S * BLOCK_P) + src[None, :]
        # flattened to 1-D, the gather goes through shared memory (one st.shared.v4 per 8 bf16, one ld.shared per
        # value); Triton lowers a 2-D gather to warp shuffles instead: 1024 per lane at p=16, C=3
        x = tl.gather(tl.reshape(x, (BLOCK_R * BLOCK_S * BLOCK_P,)), tl.reshape(src, (BLOCK_R * BLOCK_E,)), 0)
    return tl.reshape(x, (BLOCK_R, BLOCK_E))


@cached_launch
@triton.jit
def _gather_patches_kernel(
    IMG,
    IDS,
    OUT,
    n_rows,
    K,
    L,
    grid_w,
    P: tl.constexpr,
    C: tl.constexpr,
    ALL: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    # Grid (cdiv(B·K, BLOCK_R),): BLOCK_R whole output patches per program, contiguous rows out.
    # ALL: patchify (patch index = row).
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    if ALL:
        l = rows % K
    else:
        l = tl.load(IDS + rows, mask=row_ok, other=0)
    good = (l >= 0) & (l < L)
    E = P * P * C
    x = _patches(
        IMG, rows // K, tl.where(good, l, 0), row_ok & good, L, grid_w, P, C, BLOCK_R, BLOCK_E, BLOCK_S, BLOCK_P
    )
    x = tl.where(good[:, None], x.to(tl.float32), float("nan"))
    e = tl.arange(0, BLOCK_E)
    tl.store(
        OUT + rows.to(tl.int64)[:, None] * E + e[None, :],
        x.to(OUT.dtype.element_ty),
        mask=row_ok[:, None] & (e < E)[None, :],
    )


@cached_launch
@triton.jit
def _gather_rows_kernel(
    X,
    IDX,
    OUT,
    MT,
    POS,
    n_rows,
    n_idx,
    n_src,
    valid_hi,
    D,
    stride_xb,
    HAS_MT: tl.constexpr,
    HAS_POS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # Grid (cdiv(B·n_idx, BLOCK_R),): BLOCK_R output rows per program, D walked BLOCK_D at a time. Masked rows
    # (unshuffle) read only the mask token (one [BLOCK_D] vector, broadcast), never a materialized repeat.
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    b = (rows // n_idx).to(tl.int64)
    i = rows % n_idx
    idx = tl.load(IDX + rows, mask=row_ok, other=0)
    take = (idx >= 0) & (idx < n_src)
    src = b * stride_xb + tl.where(take, idx, 0).to(tl.int64) * D
    if HAS_MT:
        fill = (idx >= n_src) & (idx < valid_hi)
        bad = ~(take | fill)
    else:
        bad = ~take
    dst = rows.to(tl.int64) * D
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_ok = d < D
        x = tl.load(X + src[:, None] + d[None, :], mask=(row_ok & take)[:, None] & d_ok[None, :], other=0.0)
        x = x.to(tl.float32)
        if HAS_MT:
            mt = tl.load(MT + d, mask=d_ok, other=0.0).to(tl.float32)
            x = tl.where(fill[:, None], mt[None, :], x)
        if HAS_POS:
            x += tl.load(
                POS + i.to(tl.int64)[:, None] * D + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0
            ).to(tl.float32)
        x = tl.where(bad[:, None], float("nan"), x)
        tl.store(OUT + dst[:, None] + d[None, :], x.to(OUT.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@cached_launch
@triton.jit
def _index_sum_kernel(
    G,
    IDX,
    OUT,
    REST,
    n_out,
    n_src,
    rest_hi,
    D,
    WANT_REST: tl.constexpr,
    IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # Grid (B, cdiv(n_out (+1 with WANT_REST), BLOCK_O), cdiv(D, BLOCK_D)): a program owns BLOCK_O output rows ×
    # BLOCK_D features of one sample and sweeps its n_src gradient rows BLOCK_S at a time: acc += onehot @ g
    # (fp32). With WANT_REST, one-hot row n_out (a padding row) marks the indices in [n_out, rest_hi), so the
    # same product also sums the mask-token rows.
    b = tl.program_id(0).to(tl.int64)
    pid_o = tl.program_id(1)
    o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < D
    acc = tl.zeros((BLOCK_O, BLOCK_D), dtype=tl.float32)
    for s0 in range(0, n_src, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        s_ok = s < n_src
        idx = tl.load(IDX + b * n_src + s, mask=s_ok, other=-1).to(tl.int32)
        if WANT_REST:
            idx = tl.where((idx >= n_out) & (idx < rest_hi), n_out, idx)
        g = tl.load(G + (b * n_src + s)[:, None] * D + d[None, :], mask=s_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            g = g.to(tl.float32)
        oh = (o[:, None] == idx[None, :]).to(g.dtype)
        if IEEE:
            acc = tl.dot(oh, g, acc, input_precision="ieee")
        else:
            acc = tl.dot(oh, g, acc)
    tl.store(
        OUT + (b * n_out + o)[:, None] * D + d[None, :],
        acc.to(OUT.dtype.element_ty),
        mask=(o < n_out)[:, None] & d_ok[None, :],
    )
    if WANT_REST:
        if (n_out >= pid_o * BLOCK_O) & (n_out < pid_o * BLOCK_O + BLOCK_O):
            rest = tl.sum(tl.where((o == n_out)[:, None], acc, 0.0), axis=0)
            tl.store(REST + b * D + d, rest, mask=d_ok)


@triton.jit
def _patch_targets(
    IMG,
    rows,
    load_ok,
    L,
    grid_w,
    e_ok,
    eps,
    P: tl.constexpr,
    C: tl.constexpr,
    NORM: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """Target rows [BLOCK_R, BLOCK_E] (fp32) read straight from the images; normalized per patch when NORM."""
    t = _patches(IMG, rows // L, rows % L, load_ok, L, grid_w, P, C, BLOCK_R, BLOCK_E, BLOCK_S, BLOCK_P)
    t = t.to(tl.float32)
    if NORM:
        E = P * P * C
        mean = tl.sum(t, axis=1) / E
        dev = tl.where(e_ok[None, :], t - mean[:, None], 0.0)
        var = tl.sum(dev * dev, axis=1) / (E - 1)
        t = dev / tl.sqrt_rn(var + eps)[:, None]
    return t


@triton.jit
def _residual(
    PRED,
    IMG,
    rows,
    load_ok,
    L,
    grid_w,
    stride_pb,
    eps,
    P: tl.constexpr,
    C: tl.constexpr,
    NORM: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """(pred − target) of patch rows `rows` [BLOCK_R, BLOCK_E] in fp32 (0 at e >= E and where not load_ok, whose
    pred and image values are not read), the lane indices e and e < E."""
    E = P * P * C
    e = tl.arange(0, BLOCK_E)
    e_ok = e < E
    t = _patch_targets(IMG, rows, load_ok, L, grid_w, e_ok, eps, P, C, NORM, BLOCK_R, BLOCK_E, BLOCK_S, BLOCK_P)
    prow = (rows // L).to(tl.int64) * stride_pb + (rows % L) * E
    pr = tl.load(PRED + prow[:, None] + e[None, :], mask=load_ok[:, None] & e_ok[None, :], other=0.0).to(tl.float32)
    return tl.where(e_ok[None, :], pr - t, 0.0), e, e_ok


@triton.jit
def _store_dpred(DPRED, rows, row_ok, act, dif, w, scale, e, e_ok, E):
    """dpred rows = scale · w · dif where act, zeros elsewhere (rows < n_rows)."""
    dp = tl.where(act[:, None], dif * (w * scale)[:, None], 0.0)
    tl.store(
        DPRED + rows.to(tl.int64)[:, None] * E + e[None, :],
        dp.to(DPRED.dtype.element_ty),
        mask=row_ok[:, None] & e_ok[None, :],
    )


@cached_launch
@triton.jit
def _masked_mse_fwd_kernel(
    PRED,
    IMG,
    MASK,
    WSUM,
    PART,
    DPRED,
    n_rows,
    L,
    grid_w,
    stride_pb,
    eps,
    P: tl.constexpr,
    C: tl.constexpr,
    NORM: tl.constexpr,
    WANT_GRAD: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    # Grid (cdiv(B·L, BLOCK_R),): BLOCK_R whole patch rows per program; writes Σ w·ℓ of its rows and, with
    # WANT_GRAD, their gradient for an upstream 1 from the same registers (pred and the images read once).
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    dif, e, e_ok = _residual(
        PRED, IMG, rows, row_ok, L, grid_w, stride_pb, eps, P, C, NORM, BLOCK_R, BLOCK_E, BLOCK_S, BLOCK_P
    )
    E = P * P * C
    w = tl.load(MASK + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(PART + pid, tl.sum(tl.where(row_ok, w * tl.sum(dif * dif, axis=1) / E, 0.0), axis=0))
    if WANT_GRAD:
        _store_dpred(DPRED, rows, row_ok, row_ok & (w != 0.0), dif, w, 2.0 / (E * tl.load(WSUM)), e, e_ok, E)


@cached_launch
@triton.jit
def _masked_mse_bwd_kernel(
    G,
    WSUM,
    PRED,
    IMG,
    MASK,
    DPRED,
    n_rows,
    L,
    grid_w,
    stride_pb,
    eps,
    P: tl.constexpr,
    C: tl.constexpr,
    NORM: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    # Grid (cdiv(B·L, BLOCK_R),): recomputes the targets of rows with w != 0 and writes their gradient;
    # rows with w = 0 are written as zeros without reading pred or the images.
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    w = tl.load(MASK + rows, mask=row_ok, other=0.0).to(tl.float32)
    act = row_ok & (w != 0.0)
    dif, e, e_ok = _residual(
        PRED, IMG, rows, act, L, grid_w, stride_pb, eps, P, C, NORM, BLOCK_R, BLOCK_E, BLOCK_S, BLOCK_P
    )
    E = P * P * C
    scale = tl.load(G).to(tl.float32) * 2.0 / (E * tl.load(WSUM).to(tl.float32))
    _store_dpred(DPRED, rows, row_ok, act, dif, w, scale, e, e_ok, E)


@cached_launch
@triton.jit
def _bert_masking_kernel(
    SEED,
    seed_val,
    IDS,
    SPECIAL,
    OUT,
    LABELS,
    n,
    prob,
    replace_prob,
    random_prob,
    mask_token_id,
    vocab_size,
    ignore_index,
    SEED_IN_MEMORY: tl.constexpr,
    HAS_SPECIAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # Grid (cdiv(n, BLOCK),): elementwise; one Philox call gives the three uniforms and the random token.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    if SEED_IN_MEMORY:
        seed = tl.load(SEED)
    else:
        seed = seed_val
    r0, r1, r2, r3 = tl.randint4x(seed, offs)
    u_sel = (r0 >> 8).to(tl.float32) * (1.0 / 16777216.0)
    u_rep = (r1 >> 8).to(tl.float32) * (1.0 / 16777216.0)
    u_rnd = (r2 >> 8).to(tl.float32) * (1.0 / 16777216.0)
    tok = tl.load(IDS + offs, mask=ok, other=0)
    sel = u_sel < prob
    if HAS_SPECIAL:
        sel = sel & (tl.load(SPECIAL + offs, mask=ok, other=0) == 0)
    rand_tok = ((r3 >> 1).to(tl.int64) % vocab_size).to(tok.dtype)
    out = tl.where(sel & (u_rep < replace_prob), mask_token_id, tok)
    out = tl.where(sel & (u_rep >= replace_prob) & (u_rnd < random_prob), rand_tok, out)
    tl.store(OUT + offs, out.to(tok.dtype), mask=ok)
    tl.store(LABELS + offs, tl.where(sel, tok, ignore_index).to(tok.dtype), mask=ok)


# --------------------------------------------------------------------------------------------- launchers
def _seed_args(seed: torch.Tensor, placeholder: torch.Tensor):
    """(pointer, value, in_memory): a seed on the output's device is read by the kernel; a host seed (CPU
    generator, CUDA output) is passed by value (reading a CPU tensor never synchronizes the device), with a
    device tensor as the unused pointer (Triton rejects host pointers)."""
    if seed.device == placeholder.device:
        return seed, 0, True
    return placeholder, int(seed.reshape(-1)[0]), False


def random_masking(
    seed: torch.Tensor, batch: int, num_patches: int, keep: int, block: int, grid_w: int, device: torch.device
):
    """(ids_keep int64 [B, keep], ids_restore int64 [B, L], mask fp32 [B, L]) in one launch."""
    L = num_patches
    ids_keep = empty((batch, keep), dtype=torch.int64, device=device)
    ids_restore = empty((batch, L), dtype=torch.int64, device=device)
    mask = empty((batch, L), dtype=torch.float32, device=device)
    ptr, val, in_mem = _seed_args(seed, ids_restore)
    bl = next_pow2(L)
    _random_masking_kernel[(batch,)](
        ptr,
        val,
        ids_keep,
        ids_restore,
        mask,
        L,
        keep,
        grid_w,
        block,
        grid_w // block,
        L // (block * block),
        SEED_IN_MEMORY=in_mem,
        BLOCK_L=bl,
        num_warps=1 if interpreting() else max(1, min(8, bl // 128)),
    )
    return ids_keep, ids_restore, mask


def _patch_cfg(p: int, C: int, lanes_per_thread: int) -> dict:
    """Launch config of the kernels that read whole patches from the images (gather_patches, masked_mse).

    A patch is BLOCK_E values in MAE order and BLOCK_S segments of BLOCK_P pixels in the images (powers of two)."""
    blocks = dict(BLOCK_E=next_pow2(p * p * C), BLOCK_S=next_pow2(C * p), BLOCK_P=next_pow2(p))
    lanes = blocks["BLOCK_S"] * blocks["BLOCK_P"]  # >= BLOCK_E
    if interpreting():
        return dict(BLOCK_R=16, **blocks, num_warps=1)
    # 4096 lanes a program (4 patches at p=16, C=3), larger patches one per program. Warps from the lanes each
    # thread holds: gather_patches is fastest at 32 (4 warps), masked_mse at 64 (2 warps: 0.104 against 0.117
    # ms for the one-pass norm-pix loss on an H200, benchmarks/tune_mae.py)
    br = max(1, 4096 // lanes)
    return dict(BLOCK_R=br, **blocks, num_warps=max(1, min(16, br * lanes // (32 * lanes_per_thread))))


GATHER_LANES_PER_THREAD, MSE_LANES_PER_THREAD = 32, 64


def gather_patches(imgs: torch.Tensor, ids: torch.Tensor | None, p: int) -> torch.Tensor:
    """[B, K, p·p·C] patches (MAE order) of `imgs` at `ids` [B, K]; all L patches when ids is None."""
    B, C, H, W = imgs.shape
    grid_w = W // p
    L = (H // p) * grid_w
    K = L if ids is None else ids.shape[1]
    E = p * p * C
    out = empty((B, K, E), dtype=imgs.dtype, device=imgs.device)
    n_rows = B * K
    cfg = _patch_cfg(p, C, GATHER_LANES_PER_THREAD)
    _gather_patches_kernel[(cdiv(n_rows, cfg["BLOCK_R"]),)](
        imgs, imgs if ids is None else ids, out, n_rows, K, L, grid_w, P=p, C=C, ALL=ids is None, **cfg
    )
    return out


def _gather_rows(x, idx, n_src, valid_hi, out_dtype, mask_token=None, pos=None):
    B, n_idx = idx.shape
    D = x.shape[-1]
    out = empty((B, n_idx, D), dtype=out_dtype, device=x.device)
    n_rows = B * n_idx
    if interpreting():
        br, bd = 4, min(32, next_pow2(D))
    else:
        br, bd = 4, min(256, max(16, next_pow2(D)))  # 32 registers (sm_90): full occupancy, 16 CTAs/SM
    _gather_rows_kernel[(cdiv(n_rows, br),)](
        x,
        idx,
        out,
        x if mask_token is None else mask_token,
        x if pos is None else pos,
        n_rows,
        n_idx,
        n_src,
        valid_hi,
        D,
        x.stride(0),
        HAS_MT=mask_token is not None,
        HAS_POS=pos is not None,
        BLOCK_R=br,
        BLOCK_D=bd,
        num_warps=1 if interpreting() else 4,
    )
    return out


def _index_sum(g, idx, n_out, out_dtype, want_rest=False, rest_hi=0):
    B, n_src, D = g.shape
    out = empty((B, n_out, D), dtype=out_dtype, device=g.device)
    rest = empty((B, D), dtype=torch.float32, device=g.device) if want_rest else out
    if interpreting():
        bo, bs, bd, nw = 16, 16, min(32, max(16, next_pow2(D))), 1
    else:
        # 8 warps: 95 registers at 64x64x64, 112 at 128x32x64 (sm_90); larger BLOCK_O spills
        bo = min(128, max(16, next_pow2(n_out + int(want_rest))))
        bs, bd, nw = (64 if bo <= 64 else 32), 64, 8
    grid = (B, cdiv(n_out + int(want_rest), bo), cdiv(D, bd))
    _index_sum_kernel[grid](
        g,
        idx,
        out,
        rest,
        n_out,
        n_src,
        rest_hi,
        D,
        WANT_REST=want_rest,
        IEEE=g.dtype == torch.float32,
        UPCAST=upcast_dots(),
        BLOCK_O=bo,
        BLOCK_S=bs,
        BLOCK_D=bd,
        num_warps=nw,
    )
    return out, (rest.sum(0) if want_rest else None)


def gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """x [B, L, D], ids [B, K] -> [B, K, D] in x's dtype."""
    L = x.shape[1]
    return _gather_rows(x, ids, L, L, x.dtype)


def gather_tokens_backward(g: torch.Tensor, ids: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """dL/dx [B, L, D] (g's dtype) from g [B, K, D]."""
    return _index_sum(g, ids, num_tokens, g.dtype)[0]


def unshuffle(x, ids_restore, mask_token, pos, out_dtype):
    """x [B, K, D], ids_restore [B, L], mask_token [D], pos [L, D] or None -> [B, L, D] in out_dtype."""
    L = ids_restore.shape[1]
    return _gather_rows(x, ids_restore, x.shape[1], L, out_dtype, mask_token=mask_token, pos=pos)


def unshuffle_backward(g, ids_restore, keep, x_dtype, want_mask_token):
    """(dx [B, K, D] in x_dtype, d mask_token fp32 [D] or None) from g [B, L, D]."""
    return _index_sum(g, ids_restore, keep, x_dtype, want_rest=want_mask_token, rest_hi=ids_restore.shape[1])


def _grid_args(imgs, p):
    B, C, H, W = imgs.shape
    return B, C, W // p, (H // p) * (W // p)


def masked_mse(pred, imgs, mask, p: int, norm_pix: bool, want_grad: bool = False):
    """(loss, Σ mask, ∂loss/∂pred in pred's dtype or None) as fp32 scalars (tensors, no host sync); with
    `want_grad` the gradient (for an upstream 1) comes from the same pass."""
    B, C, grid_w, L = _grid_args(imgs, p)
    cfg = _patch_cfg(p, C, MSE_LANES_PER_THREAD)
    n_rows = B * L
    n_prog = cdiv(n_rows, cfg["BLOCK_R"])
    wsum = mask.sum(dtype=torch.float32)
    part = empty((n_prog,), dtype=torch.float32, device=pred.device)
    dpred = empty(tuple(pred.shape), dtype=pred.dtype, device=pred.device) if want_grad else None
    _masked_mse_fwd_kernel[(n_prog,)](
        pred,
        imgs,
        mask,
        wsum,
        part,
        pred if dpred is None else dpred,
        n_rows,
        L,
        grid_w,
        pred.stride(0),
        NORM_PIX_EPS,
        P=p,
        C=C,
        NORM=norm_pix,
        WANT_GRAD=want_grad,
        **cfg,
    )
    return part.sum() / wsum, wsum, dpred


def masked_mse_backward(g, pred, imgs, mask, wsum, p: int, norm_pix: bool):
    """dL/dpred in pred's dtype for the upstream gradient g (fp32 scalar tensor)."""
    B, C, grid_w, L = _grid_args(imgs, p)
    cfg = _patch_cfg(p, C, MSE_LANES_PER_THREAD)
    n_rows = B * L
    dpred = empty(tuple(pred.shape), dtype=pred.dtype, device=pred.device)
    _masked_mse_bwd_kernel[(cdiv(n_rows, cfg["BLOCK_R"]),)](
        g,
        wsum,
        pred,
        imgs,
        mask,
        dpred,
        n_rows,
        L,
        grid_w,
        pred.stride(0),
        NORM_PIX_EPS,
        P=p,
        C=C,
        NORM=norm_pix,
        **cfg,
    )
    return dpred


def bert_masking(seed, input_ids, special, mask_token_id, vocab_size, prob, replace_prob, random_prob, ignore_index):
    """(masked input ids, labels) in input_ids' dtype and shape; see `sslfast.ops._torch.mae.bert_masking`."""
    n = input_ids.numel()
    out = empty(input_ids.shape, dtype=input_ids.dtype, device=input_ids.device)
    labels = empty(input_ids.shape, dtype=input_ids.dtype, device=input_ids.device)
    ptr, val, in_mem = _seed_args(seed, labels)
    block = 128 if interpreting() else 1024
    _bert_masking_kernel[(cdiv(n, block),)](
        ptr,
        val,
        input_ids,
        input_ids if special is None else special,
        out,
        labels,
        n,
        prob,
        replace_prob,
        random_prob,
        mask_token_id,
        vocab_size,
        ignore_index,
        SEED_IN_MEMORY=in_mem,
        HAS_SPECIAL=special is not None,
        BLOCK=block,
        num_warps=1 if interpreting() else 4,
    )
    return out, labels
