"""MAE (He et al., 2022, "Masked Autoencoders Are Scalable Vision Learners", arXiv:2111.06377;
facebookresearch/mae).

Encoder: a `VisionTransformer` run on the visible 25% of the patches only (`forward_masked`: the mask is drawn
first and only the visible patches are read and embedded, `sslfast.models.mae.MaskedPatchEmbed`). Decoder:
linear to 512, `sslfast.mae.unshuffle` (mask tokens + fixed sin-cos position embedding in one pass), 8 blocks
of width 512 with 16 heads, linear to p·p·3 pixels; loss `sslfast.mae.masked_mse_loss` on the masked patches
with per-patch normalized pixel targets (norm_pix_loss).

RECIPE (App. A.1): AdamW lr 1.5e-4 · B/256, betas (0.9, 0.95), weight decay 0.05, 40 warm-up epochs, cosine;
mask ratio 0.75. SMALL: decoder 64 wide, 2 blocks, 4 heads; lr 1e-3, 1 warm-up epoch.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from .. import mae as _mae
from ..models.mae import sincos_pos_embed_2d
from ..models.vit import Block, VisionTransformer, init_transformer_
from .base import BenchStep, Method, check_views, loss_region


class MAE(Method):
    """MAE: a ViT encoder on the visible patches, a light decoder predicting the pixels of the masked ones.

    Args:
        backbone: a `VisionTransformer`.
        mask_ratio: the fraction of patches masked per image.
        decoder_dim: the decoder's width.
        decoder_depth: the decoder's transformer blocks.
        decoder_heads: the decoder's attention heads.
        norm_pix_loss: regress each patch's pixels normalized by their own mean and variance.
        gather_distributed: unused (the loss is per image).

    Raises:
        ValueError: `backbone` is not a `VisionTransformer`.
    """

    name = "mae"
    preset = "mae"
    needs_vit = True
    default_backbone = {"small": "vit_micro", "paper": "vit_small"}
    pictures = ("reconstructions.png",)
    bench_step = BenchStep(backbone="vit_base")  # the paper's smallest model
    exact_across_ranks = False  # each rank draws its own masks
    RECIPE = dict(optimizer="adamw", lr=1.5e-4, weight_decay=0.05, warmup_epochs=40, betas=(0.9, 0.95))
    SMALL = dict(decoder_dim=64, decoder_depth=2, decoder_heads=4, lr=1e-3, warmup_epochs=1)

    def __init__(
        self,
        backbone,
        *,
        mask_ratio: float = 0.75,
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_heads: int = 16,
        norm_pix_loss: bool = True,
        gather_distributed: bool = False,
    ):
        if not isinstance(backbone, VisionTransformer):
            raise ValueError(
                f"mae needs a ViT backbone (vit_micro, vit_tiny, vit_small, vit_base), got {type(backbone).__name__}"
            )
        super().__init__(backbone, gather_distributed=gather_distributed)
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        pe = backbone.patch_embed
        self.patch_size = pe.patch_size
        self.decoder_embed = nn.Linear(backbone.embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.register_buffer(
            "decoder_pos_embed", sincos_pos_embed_2d(decoder_dim, *pe.grid_size)[None], persistent=False
        )
        self.decoder_blocks = nn.ModuleList(Block(decoder_dim, decoder_heads) for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_dim, self.patch_size**2 * pe.proj.in_channels)
        for m in (self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred):
            init_transformer_(m)
        nn.init.normal_(self.mask_token, std=0.02)

    def predict(self, imgs: torch.Tensor, generator=None):
        """The decoder's pixel predictions for every patch.

        Args:
            imgs: images [B, C, H, W] at the backbone's training resolution.
            generator: draws the mask (None: the default generator).

        Returns:
            (predictions [B, L, p·p·C] in MAE patch order, the `MaskInfo` of the mask drawn).
        """
        latent, info = self.backbone.forward_masked(imgs, self.mask_ratio, generator=generator)
        x = self.decoder_embed(latent)
        cls, vis = x[:, :1], x[:, 1:]
        x = _mae.unshuffle(vis, info.ids_restore, self.mask_token, self.decoder_pos_embed)
        x = torch.cat([cls, x.to(cls.dtype)], dim=1)  # the official decoder's cls slot (its position is zero)
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:], info

    def forward(self, views):
        check_views(self.name, views, 1)
        imgs = views[0]
        pred, info = self.predict(imgs)
        with loss_region(pred):
            return _mae.masked_mse_loss(pred, imgs, info.mask, self.patch_size, self.norm_pix_loss)

    @torch.no_grad()
    def write_pictures(self, out_dir: str, images: torch.Tensor, *, denormalize, seed: int = 0) -> None:
        """reconstructions.png: a row of images, a row of their masked versions, a row of reconstructions."""
        from .._plot import save_image_grid

        imgs = images[:8]
        masked, recon = self.reconstruct(imgs, generator=torch.Generator(imgs.device).manual_seed(seed))
        save_image_grid([denormalize(x).cpu() for x in (imgs, masked, recon)], os.path.join(out_dir, self.pictures[0]))

    def reconstruct(self, imgs: torch.Tensor, generator=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(masked images, reconstructions with the visible patches pasted back), both [B, C, H, W], for the
        reconstruction grid. With norm_pix_loss the predicted patches are de-normalized with the statistics
        of the true patches (as the official visualization)."""
        pred, info = self.predict(imgs, generator=generator)
        p = self.patch_size
        target = _mae.patchify(imgs, p).float()
        pred = pred.float()
        if self.norm_pix_loss:
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            pred = pred * (var + 1e-6).sqrt() + mean
        m = info.mask[..., None]
        masked = _unpatchify(target * (1 - m), p, imgs.shape)
        recon = _unpatchify(pred * m + target * (1 - m), p, imgs.shape)
        return masked, recon


def _unpatchify(x: torch.Tensor, p: int, shape) -> torch.Tensor:
    B, C, H, W = shape
    h, w = H // p, W // p
    return x.reshape(B, h, w, p, p, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, H, W)
