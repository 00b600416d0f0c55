"""Op families: validation, dispatch (Triton / csrc / reference) and `torch.library` custom ops."""
from .infonce import clip_loss, info_nce_loss, nt_xent_loss

__all__ = ["clip_loss", "info_nce_loss", "nt_xent_loss"]
