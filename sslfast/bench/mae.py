"""MAE benchmark cases: ViT-B/16, B=256, 224 px, bf16 (the `mae_ref_*` shapes of benchmarks/reference_ops_bench.py).

Each fused op is timed against the official MAE code (`sslfast.reference.mae`). Byte floors count the
minimal device-memory traffic of the fused design (bf16 = 2 bytes, int64 ids = 8, fp32 mask = 4); at the
measured 3.0 TB/s copy ceiling of the reference H100 they give the floor time in each comment.

ViT-B/16 at B=256: L=196, K=49 visible, D=768, p·p·C=768; one [B, L, 768] bf16 tensor is 77.07 MB, its visible
quarter [B, K, 768] 19.27 MB; the images [256, 3, 224, 224] bf16 are 77.07 MB.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import mae
from ..models.mae import MaskedPatchEmbed, sincos_pos_embed_2d
from ..reference import mae as R
from . import Setup, fwd_bwd, reference_backend, register, terminal_loss

B, IMG, P, C, D, RATIO = 256, 224, 16, 3, 768, 0.75
SMALL_CASES: list = []  # the same cases at tiny sizes (tests run them on the CPU)


def _shape(b, img, p):
    L = (img // p) ** 2
    return L, int(L * (1 - RATIO))


def _nbytes(*numels_and_sizes) -> float:
    return float(sum(n * s for n, s in numels_and_sizes))


def _both(op: str, name: str, small_args: tuple, **kw):
    """Registers `factory(device, dtype, *big_args)` under `name` and keeps a tiny variant for the tests."""

    def wrap(factory):
        register(op, name, **kw)(lambda device, dtype: factory(device, dtype, B, IMG, P, C, D))
        SMALL_CASES.append(lambda device, dtype: factory(device, dtype, *small_args))
        return factory

    return wrap


SMALL = (2, 32, 8, 3, 32)


# --------------------------------------------------------------------------------------------- ops
@_both("mae", "random_masking+gather_tokens ViT-B/16 B=256", SMALL)
def _masking_gather(device, dtype, b, img, p, c, d):
    """Baseline `mae_ref_masking_only_B256`: official random_masking of the embedded tokens (noise, argsort
    twice, gather with a repeated index, mask). Floor: read the K visible rows + write them (2 × 19.27 MB),
    ids_keep + ids_restore + mask (0.10 + 0.40 + 0.20 MB) = 39.2 MB -> 13 µs."""
    L, K = _shape(b, img, p)
    x = torch.randn(b, L, d, device=device, dtype=dtype)

    def fused():
        m = mae.random_masking(b, L, RATIO, device=device)
        return mae.gather_tokens(x, m.ids_keep), m

    e = x.element_size()
    return Setup(
        fused=fused,
        reference=lambda: R.random_masking_official(x, RATIO),
        bytes=_nbytes((2 * b * K * d, e), (b * K, 8), (b * L, 8), (b * L, 4)),
    )


@_both("mae", "gather_patches ViT-B/16 B=256", SMALL)
def _gather_patches(device, dtype, b, img, p, c, d):
    """Visible patches straight from the images vs official patchify + gather. Floor: read the visible quarter
    of the images + write it (2 × 19.27 MB) + ids (0.1 MB) = 38.6 MB -> 13 µs."""
    L, K = _shape(b, img, p)
    imgs = torch.randn(b, c, img, img, device=device, dtype=dtype)
    ids = mae.random_masking(b, L, RATIO, device=device).ids_keep
    ref_ids = ids[:, :, None].expand(-1, -1, p * p * c)
    return Setup(
        fused=lambda: mae.gather_patches(imgs, ids, p),
        reference=lambda: torch.gather(R.patchify_official(imgs, p), 1, ref_ids),
        bytes=_nbytes((2 * b * K * p * p * c, imgs.element_size()), (b * K, 8)),
    )


@_both("mae", "patchify ViT-B/16 B=256", SMALL)
def _patchify(device, dtype, b, img, p, c, d):
    """Floor: read + write the images (2 × 77.07 MB) = 154 MB -> 51 µs."""
    imgs = torch.randn(b, c, img, img, device=device, dtype=dtype)
    return Setup(
        fused=lambda: mae.patchify(imgs, p),
        reference=lambda: R.patchify_official(imgs, p),
        bytes=_nbytes((2 * imgs.numel(), imgs.element_size())),
    )


def _unshuffle_inputs(device, dtype, b, img, p, d, grad):
    L, K = _shape(b, img, p)
    m = mae.random_masking(b, L, RATIO, device=device)
    xv = torch.randn(b, K, d, device=device, dtype=dtype, requires_grad=grad)
    mt = torch.randn(1, 1, d, device=device, dtype=dtype, requires_grad=grad)
    pos = torch.randn(1, L, d, device=device, dtype=dtype)
    return L, K, m, xv, mt, pos


@_both("mae", "unshuffle fwd ViT-B/16 B=256 D=768", SMALL)
def _unshuffle_fwd(device, dtype, b, img, p, c, d):
    """Baseline `mae_ref_unshuffle_B256` (cat repeated mask tokens + gather, no pos). Floor: read the visible
    tokens (19.27 MB) + ids_restore (0.40 MB) + write [B, L, D] (77.07 MB) = 96.7 MB -> 32 µs."""
    L, K, m, xv, mt, _ = _unshuffle_inputs(device, dtype, b, img, p, d, False)
    e = xv.element_size()
    return Setup(
        fused=lambda: mae.unshuffle(xv, m.ids_restore, mt),
        reference=lambda: R.unshuffle_official(xv, m.ids_restore, mt),
        bytes=_nbytes((b * K * d, e), (b * L, 8), (b * L * d, e)),
    )


@_both("mae", "unshuffle+pos fwd+bwd ViT-B/16 B=256 D=768", SMALL)
def _unshuffle_fwdbwd(device, dtype, b, img, p, c, d):
    """Decoder unshuffle with the (fixed) pos embedding, forward + backward into x_visible and mask_token.
    Floor: forward 96.7 MB (+0.3 MB pos), backward read g (77.07) + ids (0.40) + write dx (19.27) = 193.7 MB
    -> 65 µs."""
    L, K, m, xv, mt, pos = _unshuffle_inputs(device, dtype, b, img, p, d, True)
    g = torch.randn(b, L, d, device=device, dtype=dtype)

    def run(fn):
        def call():
            xv.grad = mt.grad = None
            fn(xv, m.ids_restore, mt, pos).backward(g)

        return call

    e = xv.element_size()
    return Setup(
        fused=run(mae.unshuffle),
        reference=run(R.unshuffle_official),
        bytes=_nbytes((b * K * d, 2 * e), (b * L, 16), (b * L * d, 2 * e), (L * d, e)),
    )


@_both("mae", "norm-pix masked_mse fwd+bwd ViT-B/16 B=256", SMALL)
def _masked_mse(device, dtype, b, img, p, c, d):
    """Baseline `mae_ref_normpix_loss_fwdbwd_B256`: official forward_loss (patchify, normalized target tensor)
    forward + backward. Fused design: the forward reads all of pred and the images (so any non-finite value
    shows in the loss, as officially: 2 × 77.07 MB) and writes dpred for an upstream 1 from the same registers
    (77.07 MB); the backward's in-place scaling reads only the upstream gradient when it is 1, as here:
    231.2 MB -> 77 µs. "separate_backward": the backward recomputes and reads only the masked 75% of pred
    and the images (115.6 MB) and writes dpred: 346.8 MB -> 116 µs."""
    L, K = _shape(b, img, p)
    E = p * p * c
    imgs = torch.randn(b, c, img, img, device=device, dtype=dtype)
    pred = torch.randn(b, L, E, device=device, dtype=dtype, requires_grad=True)
    mask = mae.random_masking(b, L, RATIO, device=device).mask

    return terminal_loss(
        lambda: mae.masked_mse_loss(pred, imgs, mask, p),
        pred,
        reference=fwd_bwd(lambda: R.forward_loss_official(imgs, pred, mask, p).float(), pred),
        bytes=_nbytes((3 * b * L * E, pred.element_size()), (2 * b * L, 4)),
    )


# --------------------------------------------------------------------------------------------- encoder front
def _front_inputs(device, dtype, b, img, p, c, d):
    front = MaskedPatchEmbed(img, p, c, d).to(device=device, dtype=dtype)
    imgs = torch.randn(b, c, img, img, device=device, dtype=dtype)
    return front, imgs


def _front_floor(b, img, p, c, d, e):
    L, K = _shape(b, img, p)
    E = p * p * c
    return 2.0 * b * K * E * d, _nbytes((b * K * E, e), (b * K * d, e), (E * d + L * d, e), (b * (K + 2 * L), 8))


@_both("mae", "mask-first encoder front fwd ViT-B/16 B=256", SMALL)
def _front_fwd(device, dtype, b, img, p, c, d):
    """Baseline `mae_ref_embed_all_then_mask_B256`: Conv2d of all 196 patches + pos, then official masking.
    Fused: mask, read only the visible pixels, one [B·K, 768] × [768, 768] GEMM whose accumulator starts at the
    visible (pos + bias) rows. Floor: 14.8 GFLOP (19 µs at 781 TFLOP/s); read visible pixels (19.27 MB) +
    write tokens (19.27 MB) + weights, pos, ids (2.2 MB) = 40.7 MB -> 14 µs."""
    front, imgs = _front_inputs(device, dtype, b, img, p, c, d)
    flops, nbytes = _front_floor(b, img, p, c, d, imgs.element_size())
    return Setup(
        fused=lambda: front(imgs, RATIO),
        reference=lambda: R.embed_all_then_mask_official(imgs, front.proj, front.pos_embed, RATIO),
        flops=flops,
        bytes=nbytes,
    )


@_both("mae", "mask-first encoder front fwd+bwd ViT-B/16 B=256", SMALL)
def _front_fwdbwd(device, dtype, b, img, p, c, d):
    """Forward + backward into the patch-embedding weights (pos embed fixed, as MAE). Floor: 3 × 14.8 GFLOP
    (the dX GEMM is not needed: images take no gradient -> 2 × 14.8 = 29.6 GFLOP, 38 µs)."""
    front, imgs = _front_inputs(device, dtype, b, img, p, c, d)
    L, K = _shape(b, img, p)
    g = torch.randn(b, K, d, device=device, dtype=dtype)

    def fused():
        front.zero_grad(set_to_none=True)
        front(imgs, RATIO)[0].backward(g)

    def reference():
        front.zero_grad(set_to_none=True)
        R.embed_all_then_mask_official(imgs, front.proj, front.pos_embed, RATIO)[0].backward(g)

    flops, nbytes = _front_floor(b, img, p, c, d, imgs.element_size())
    return Setup(
        fused=fused, reference=reference, flops=2 * flops, bytes=2 * nbytes + _nbytes((b * K * d, imgs.element_size()))
    )


# --------------------------------------------------------------------------------------------- whole MAE step
class _Block(nn.Module):
    """Pre-norm ViT block (timm layout) with torch SDPA attention."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.fc1 = nn.Linear(dim, int(dim * mlp_ratio))
        self.fc2 = nn.Linear(int(dim * mlp_ratio), dim)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class _MAEViT(nn.Module):
    """The official MAE ViT (encoder with cls token, 8-block 512-wide decoder, norm-pix loss) in two forms:
    `loss_fused` (mask-first front, fused unshuffle and loss) and `loss_official` (models_mae.py)."""

    def __init__(self, img=224, p=16, c=3, dim=768, depth=12, heads=12, ddim=512, ddepth=8, dheads=16):
        super().__init__()
        self.p = p
        self.front = MaskedPatchEmbed(img, p, c, dim, cls_token=True)
        L = self.front.num_patches
        self.blocks = nn.ModuleList(_Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.decoder_embed = nn.Linear(dim, ddim)
        self.mask_token = nn.Parameter(torch.randn(1, 1, ddim) * 0.02)
        pos = torch.cat([torch.zeros(1, ddim), sincos_pos_embed_2d(ddim, *self.front.grid_size)])
        self.decoder_pos_embed = nn.Parameter(pos[None], requires_grad=False)
        self.decoder_blocks = nn.ModuleList(_Block(ddim, dheads) for _ in range(ddepth))
        self.decoder_norm = nn.LayerNorm(ddim, eps=1e-6)
        self.decoder_pred = nn.Linear(ddim, p * p * c)
        self.num_patches = L

    def _encode_decode_tail(self, x):
        for blk in self.blocks:
            x = blk(x)
        return self.decoder_embed(self.norm(x))

    def _decode(self, x):
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def loss_fused(self, imgs, ratio=RATIO):
        x, m = self.front(imgs, ratio)
        x = self._encode_decode_tail(x)
        body = mae.unshuffle(x[:, 1:], m.ids_restore, self.mask_token, self.decoder_pos_embed[:, 1:])
        x = torch.cat([x[:, :1] + self.decoder_pos_embed[:, :1], body], dim=1)
        return mae.masked_mse_loss(self._decode(x), imgs, m.mask, self.p)

    def loss_official(self, imgs, ratio=RATIO):
        x, mask, ids_restore = R.embed_all_then_mask_official(imgs, self.front.proj, self.front.pos_embed, ratio)
        x = torch.cat([self.front.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self._encode_decode_tail(x)
        mask_tokens = self.mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
        x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
        x = torch.cat([x[:, :1, :], x_], dim=1) + self.decoder_pos_embed
        return R.forward_loss_official(imgs, self._decode(x), mask, self.p)


def _mae_step_factory(device, dtype, b, img, p, c, d, model_kw):
    """One MAE ViT-B/16 training step at B=256: forward (bf16 autocast, fp32 master weights), backward, fused
    AdamW. `reference` is the official models_mae.py code path with the same modules; `others` adds the fused
    code under SSLFAST_BACKEND=reference (sslfast's PyTorch path). FLOPs: the transformer GEMMs (6 × params ×
    tokens: encoder on 1 + K tokens, decoder on 1 + L) plus attention."""
    torch.manual_seed(0)
    model = _MAEViT(img, p, c, d, **model_kw).to(device)
    opt = torch.optim.AdamW(
        [q for q in model.parameters() if q.requires_grad],
        lr=1e-4,
        **({"fused": True} if device.type == "cuda" else {}),
    )
    imgs = torch.randn(b, c, img, img, device=device)
    amp = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def step(loss_fn):
        def call():
            opt.zero_grad(set_to_none=True)
            with amp:
                loss = loss_fn(imgs)
            loss.backward()
            opt.step()

        return call

    def with_reference_backend():
        with reference_backend():
            step(model.loss_fused)()

    L, K = _shape(b, img, p)
    enc = sum(q.numel() for q in model.blocks.parameters())
    dec = sum(q.numel() for q in model.decoder_blocks.parameters())
    dd = model.decoder_embed.out_features
    attn = 4 * b * ((1 + K) ** 2 * d * len(model.blocks) + (1 + L) ** 2 * dd * len(model.decoder_blocks))
    flops = 6.0 * (enc * b * (1 + K) + dec * b * (1 + L)) + 3.0 * attn
    params = sum(q.numel() for q in model.parameters())
    return Setup(
        fused=step(model.loss_fused),
        reference=step(model.loss_official),
        others={"sslfast_backend_reference": with_reference_backend},
        flops=flops,
        bytes=_nbytes((params, 16)),
    )


register("mae", "MAE ViT-B/16 training step B=256 (fwd+bwd+AdamW)", dtypes=(torch.bfloat16,))(
    lambda device, dtype: _mae_step_factory(device, dtype, B, IMG, P, C, D, {})
)
SMALL_CASES.append(
    lambda device, dtype: _mae_step_factory(
        device, dtype, 2, 32, 8, 3, 32, dict(depth=1, heads=2, ddim=16, ddepth=1, dheads=2)
    )
)
