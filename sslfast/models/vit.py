"""Vision Transformers (Dosovitskiy et al., 2021) with torch SDPA attention, parameter names as timm's.

The patch front is `sslfast.models.mae.MaskedPatchEmbed`, so one model serves both ways:

* `forward(imgs)` embeds every patch (images of another size than `img_size`, e.g. DINO's local crops, get a
  bicubically resized position embedding) and returns the final-norm cls token [B, D]
  (`global_pool="avg"`: the mean patch token);
* `forward_masked(imgs, mask_ratio)` is the MAE encoder: only the visible patches are read from the images
  and embedded (mask first), then run through the blocks; returns (tokens [B, 1 + K, D], MaskInfo).
* `embed(imgs, masks=masks)` is iBOT's / DINOv2's masked-image-modeling input: every patch is embedded, and
  the patch tokens at `masks` [B, L] (True = masked) are replaced by the learnable `mask_token` before the
  position embedding is added (`init_mask_token()` creates it; a model without one has no such parameter, so
  its state dict is unchanged).

Attention is `F.scaled_dot_product_attention` (flash / memory-efficient kernels on CUDA); there is no
xformers dependency.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .mae import MaskedPatchEmbed


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def init_transformer_(module: nn.Module) -> None:
    """MAE / MoCo v3 init: xavier-uniform linears with zero bias, unit LayerNorms."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class VisionTransformer(nn.Module):
    """ViT trunk with a cls token; `num_features` = embed_dim; `forward` returns the normed cls token
    (`global_pool="token"`) or the mean of the normed patch tokens ("avg"), [B, embed_dim].

    Args:
        img_size: the training resolution (the position embedding's grid; other sizes interpolate it).
        patch_size: the patch side in pixels.
        in_chans: input channels.
        embed_dim: the token width.
        depth: transformer blocks.
        num_heads: attention heads per block.
        mlp_ratio: the blocks' MLP width / embed_dim.
        pos_embed: "sincos" (fixed; MAE, MoCo v3) or "learned" (DINO, timm).
        global_pool: "token" or "avg".

    Raises:
        ValueError: an unknown `global_pool` or `pos_embed`, or `img_size` not divisible by `patch_size`.
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        *,
        pos_embed: str = "sincos",
        global_pool: str = "token",
    ):
        super().__init__()
        if global_pool not in ("token", "avg"):
            raise ValueError(f"global_pool must be 'token' or 'avg', got {global_pool!r}")
        self.patch_embed = MaskedPatchEmbed(
            img_size, patch_size, in_chans, embed_dim, pos_embed=pos_embed, cls_token=True
        )
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.num_features = self.embed_dim = embed_dim
        self.patch_size = patch_size
        self.global_pool = global_pool
        self.mask_token: nn.Parameter | None = None
        init_transformer_(self.blocks)
        init_transformer_(self.norm)

    def init_mask_token(self) -> nn.Parameter:
        """Creates the learnable mask token [1, 1, D] used by `embed(..., masks=)` (zeros, as DINOv2's ViT) and
        returns it; a second call keeps the existing one."""
        if self.mask_token is None:
            weight = self.patch_embed.proj.weight
            self.mask_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim, device=weight.device, dtype=weight.dtype))
        return self.mask_token

    @property
    def num_patches(self) -> int:
        """Patches per image at the training resolution."""
        return self.patch_embed.num_patches

    def _pos_embed(self, grid: tuple[int, int]) -> torch.Tensor:
        pe = self.patch_embed
        if grid == pe.grid_size:
            return pe.pos_embed
        gh, gw = pe.grid_size
        pos = pe.pos_embed.reshape(1, gh, gw, -1).permute(0, 3, 1, 2)
        pos = F.interpolate(pos.float(), size=grid, mode="bicubic", align_corners=False).to(pe.pos_embed.dtype)
        return pos.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1)

    def embed(self, imgs: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """All patch tokens plus the cls token, [B, 1 + L, D] (any image size divisible by the patch).

        `masks` [B, L] bool (row-major patch order): the patch embedding of each True position is replaced by
        `mask_token` before the position embedding is added (DINOv2's `prepare_tokens_with_masks`):
        x[b, l] = (mask_token if masks[b, l] else proj(patch[b, l])) + pos[l]."""
        pe = self.patch_embed
        h, w = imgs.shape[-2:]
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"image size {h}x{w} must be divisible by patch_size={self.patch_size}")
        grid = (h // self.patch_size, w // self.patch_size)
        if masks is not None:
            self._check_masks(masks, imgs.shape[0], grid[0] * grid[1], imgs.device)
            x = pe.proj(imgs).flatten(2).transpose(1, 2)
            x = torch.where(masks[..., None], self.mask_token.to(x.dtype), x) + self._pos_embed(grid)
        elif (h, w) == pe.img_size:
            x = pe.embed_all(imgs)
        else:
            x = pe.proj(imgs).flatten(2).transpose(1, 2) + self._pos_embed(grid)
        return torch.cat([pe.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)

    def _check_masks(self, masks, batch: int, num_patches: int, device: torch.device) -> None:
        if self.mask_token is None:
            raise ValueError("masks given but this VisionTransformer has no mask_token: call init_mask_token() first")
        if not isinstance(masks, torch.Tensor) or masks.dtype != torch.bool:
            raise TypeError(
                f"masks must be a bool tensor [B, L], got "
                f"{masks.dtype if isinstance(masks, torch.Tensor) else type(masks).__name__}"
            )
        if tuple(masks.shape) != (batch, num_patches):
            raise ValueError(
                f"masks must be [B, L] = [{batch}, {num_patches}] (images and patch grid), got shape "
                f"{tuple(masks.shape)}"
            )
        if masks.device != device:
            raise ValueError(f"masks must be on the images' device {device}, got {masks.device}")

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The blocks and the final norm on embedded tokens [B, T, D] -> [B, T, D]."""
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        x = self.forward_tokens(self.embed(imgs))
        return x[:, 0] if self.global_pool == "token" else x[:, 1:].mean(1)

    def forward_masked(self, imgs: torch.Tensor, mask_ratio: float = 0.75, *, masking=None, generator=None):
        """MAE encoder: (normed tokens of the cls + visible patches [B, 1 + K, D], MaskInfo)."""
        x, info = self.patch_embed(imgs, mask_ratio, masking=masking, generator=generator)
        return self.forward_tokens(x), info


_VIT = {  # name: (embed_dim, depth, num_heads)
    "vit_micro": (96, 4, 3),  # CPU demo size (not a paper model)
    "vit_tiny": (192, 12, 3),  # DeiT-Ti
    "vit_small": (384, 12, 6),  # DeiT-S / DINO ViT-S
    "vit_base": (768, 12, 12),  # ViT-B
}


def default_patch_size(image_size: int) -> int:
    """16 px for ImageNet-size inputs; an 8×8 grid below 128 px (e.g. 4 px patches at 32 px)."""
    return 16 if image_size >= 128 else max(1, image_size // 8)


def vit(
    name: str, *, image_size: int = 224, patch_size: int | None = None, in_chans: int = 3, **kw
) -> VisionTransformer:
    """A built-in ViT by name.

    Args:
        name: "vit_micro" (96 wide, 4 blocks: the CPU demo), "vit_tiny", "vit_small" or "vit_base".
        image_size: the training resolution.
        patch_size: the patch side; None: `default_patch_size(image_size)`.
        in_chans: input channels.
        **kw: further `VisionTransformer` arguments (`pos_embed`, `global_pool`).

    Returns:
        The `VisionTransformer`.

    Raises:
        KeyError: an unknown name (`sslfast.models.build_backbone` checks names first).
    """
    dim, depth, heads = _VIT[name]
    return VisionTransformer(
        image_size, patch_size or default_patch_size(image_size), in_chans, dim, depth, heads, **kw
    )
