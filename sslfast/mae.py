"""`sslfast.mae`: fused MAE masking, patch gather, unshuffle and norm-pix loss (see `sslfast.ops.mae`).

    m = sf.mae.random_masking(B, L, 0.75, device="cuda")          # MaskInfo(ids_keep, ids_restore, mask)
    patches = sf.mae.gather_patches(imgs, m.ids_keep, 16)        # visible patches straight from the images
    x = sf.mae.unshuffle(x_visible, m.ids_restore, mask_token, pos_embed)
    loss = sf.mae.masked_mse_loss(pred, imgs, m.mask, 16)

The mask-first encoder front (embed only the visible patches) is `sslfast.models.mae.MaskedPatchEmbed`.
"""

from .ops.mae import (
    MaskInfo,
    bert_masking,
    gather_patches,
    gather_tokens,
    masked_mse_loss,
    patchify,
    random_masking,
    unshuffle,
)

__all__ = [
    "MaskInfo",
    "bert_masking",
    "gather_patches",
    "gather_tokens",
    "masked_mse_loss",
    "patchify",
    "random_masking",
    "unshuffle",
]
