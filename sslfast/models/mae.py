"""MAE encoder front, mask first: only the visible patches are read and embedded.

The official MAE (and solo-learn, mmpretrain) embeds all L patches with a Conv2d, adds the position
embedding and only then drops 75% of the tokens. `MaskedPatchEmbed` draws the mask first, reads the K visible
patches straight from the images (`sslfast.mae.gather_patches`), and applies the same Conv2d weights as one
[B·K, p·p·C] × [p·p·C, D] matmul whose accumulator starts from the visible tokens' (pos_embed + bias) rows
(under autocast: the matmul with bias in the autocast dtype, then + pos, the official rounding and dtype):

    x[b, j] = W · patch(imgs[b], ids_keep[b, j]) + bias + pos_embed[ids_keep[b, j]]

which equals `gather(proj(imgs).flatten(2).transpose(1, 2) + pos_embed, ids_keep)` (checked in the tests,
gradients included). Parameter names follow timm's PatchEmbed (`proj.weight`, `proj.bias`) so weights load
from a standard ViT/MAE checkpoint (its pos_embed minus the cls slot).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.mae import MaskInfo, gather_patches, random_masking


def sincos_pos_embed_2d(dim: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """The official MAE fixed 2-D sin-cos position embedding [grid_h·grid_w, dim] (no cls slot): the first
    half of the channels encodes the column index, the second half the row index (as `get_2d_sincos_pos_embed`,
    whose meshgrid puts w first)."""
    if dim % 4:
        raise ValueError(f"dim must be divisible by 4 for the 2-D sin-cos embedding, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4.0))
    rows, cols = torch.meshgrid(
        torch.arange(grid_h, dtype=torch.float64), torch.arange(grid_w, dtype=torch.float64), indexing="ij"
    )

    def one_d(pos):
        out = pos.reshape(-1, 1) * omega[None, :]
        return torch.cat([out.sin(), out.cos()], dim=1)

    return torch.cat([one_d(cols), one_d(rows)], dim=1).float()


class MaskedPatchEmbed(nn.Module):
    """Patch embedding + position embedding of the visible patches only (MAE encoder front).

    Args:
        img_size: int or (H, W); patch_size: p; in_chans: C; embed_dim: D.
        pos_embed: "sincos" (fixed, official MAE) or "learned" (trunc-normal init, std 0.02).
        cls_token: prepend a learned cls token (official MAE: cls_token + pos_embed[:, :1], whose sin-cos
            slot is zero) to the visible tokens.

    forward(imgs, mask_ratio=0.75, *, masking=None, generator=None) -> (tokens [B, (1+)K, D], MaskInfo)
    `masking` reuses a given MaskInfo (e.g. the same mask for two views); otherwise one is drawn with
    `sslfast.mae.random_masking` from `generator`.

    Raises:
        ValueError: `img_size` not divisible by `patch_size`, or an unknown `pos_embed`.
    """

    def __init__(
        self,
        img_size=224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        *,
        pos_embed: str = "sincos",
        cls_token: bool = False,
    ):
        super().__init__()
        h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        if h % patch_size or w % patch_size:
            raise ValueError(f"img_size {h}x{w} must be divisible by patch_size={patch_size}")
        if pos_embed not in ("sincos", "learned"):
            raise ValueError(f"pos_embed must be 'sincos' or 'learned', got {pos_embed!r}")
        self.img_size = (h, w)
        self.patch_size = patch_size
        self.grid_size = (h // patch_size, w // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.embed_dim = embed_dim
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, embed_dim), requires_grad=pos_embed == "learned")
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if cls_token else None
        self._pos_kind = pos_embed
        self.reset_parameters()

    def reset_parameters(self):
        """Official MAE init: xavier-uniform on the flattened conv weight, sin-cos (or std-0.02) pos embed,
        std-0.02 cls token."""
        nn.init.xavier_uniform_(self.proj.weight.view(self.embed_dim, -1))
        nn.init.zeros_(self.proj.bias)
        with torch.no_grad():
            if self._pos_kind == "sincos":
                self.pos_embed.copy_(sincos_pos_embed_2d(self.embed_dim, *self.grid_size)[None])
            else:
                nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=0.02)

    def patch_weight(self) -> torch.Tensor:
        """The conv weight as a [D, p·p·C] matrix in MAE's patch order (p q c)."""
        return self.proj.weight.permute(0, 2, 3, 1).reshape(self.embed_dim, -1)

    def _add_cls(self, x: torch.Tensor) -> torch.Tensor:
        if self.cls_token is None:
            return x
        return torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)

    def forward(
        self,
        imgs: torch.Tensor,
        mask_ratio: float = 0.75,
        *,
        masking: MaskInfo | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, MaskInfo]:
        B = imgs.shape[0]
        if masking is None:
            masking = random_masking(B, self.num_patches, mask_ratio, device=imgs.device, generator=generator)
        patches = gather_patches(imgs, masking.ids_keep, self.patch_size)  # [B, K, p·p·C]
        if torch.is_autocast_enabled(imgs.device.type):
            # as the official front under AMP: the conv output (with bias) in the autocast dtype, + pos in the
            # parameter dtype (fp32 tokens from fp32 parameters)
            x = F.linear(patches, self.patch_weight(), self.proj.bias)
            return self._add_cls(x + F.embedding(masking.ids_keep, self.pos_embed[0])), masking
        start = F.embedding(masking.ids_keep, self.pos_embed[0] + self.proj.bias)  # [B, K, D]
        K = patches.shape[1]
        x = torch.addmm(start.reshape(B * K, -1), patches.reshape(B * K, -1), self.patch_weight().t())
        return self._add_cls(x.reshape(B, K, self.embed_dim)), masking

    def embed_all(self, imgs: torch.Tensor) -> torch.Tensor:
        """The official front before masking: proj(imgs) + pos for all L patches, [B, L, D] (no cls)."""
        return self.proj(imgs).flatten(2).transpose(1, 2) + self.pos_embed
