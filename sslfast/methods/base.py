"""What every method shares: the training-loss interface, the recipe (optimizer settings) and the parameter
groups the trainer builds its optimizer from."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..nn.ema import EMA


class Method(nn.Module):
    """A self-supervised method: `forward(views) -> loss` on the list of augmented views of one batch.

    Class attributes:
      name:    the CLI name (`sslfast pretrain --method NAME`);
      preset:  the `sslfast.data` augmentation preset giving its views;
      RECIPE:  the paper's training settings: `optimizer` (lars | adamw | sgd), `lr` (the base learning rate for
               a batch of 256: lr = lr · batch / 256), `weight_decay`, `warmup_epochs`, and for sgd / lars
               `momentum`, for adamw `betas`;
      SMALL:   overrides (head widths, temperatures, recipe keys) for the CPU-sized backbones of the embedded
               digits demo (`profile="small"`); each method documents them.

    Traits the trainer, tests and benches read instead of branching on the name:
      needs_vit:          the method only runs on a ViT backbone (patch tokens);
      default_backbone:   the backbone per profile ({"small": ..., "paper": ...});
      min_batch_per_rank: images each rank needs per step (batch statistics, in-batch negatives);
      pictures:           extra PNG files the trainer writes at the end (`write_pictures`).

    Attributes set by subclasses: `backbone` (the student trunk), `ema` (an `sslfast.EMA` teacher or None;
    the trainer fuses its update into the optimizer step).
    """

    name = "method"
    preset = "simclr"
    RECIPE: dict = {}
    SMALL: dict = {}
    needs_vit = False
    default_backbone = {"small": "resnet_tiny", "paper": "resnet50"}
    min_batch_per_rank = 1
    pictures: tuple[str, ...] = ()

    def __init__(self, backbone: nn.Module, *, gather_distributed: bool = False):
        super().__init__()
        self.backbone = backbone
        self.ema: EMA | None = None
        self.gather_distributed = gather_distributed
        self.total_steps: int | None = None
        self.steps_per_epoch: int | None = None
        self.global_step = 0

    @property
    def feature_dim(self) -> int:
        return int(self.backbone.num_features)

    @classmethod
    def recipe(cls, profile: str = "paper", *, vit: bool = False) -> dict:
        """The training settings (RECIPE, with SMALL's recipe keys for `profile="small"`); `vit` says whether
        the backbone is a ViT (a method whose paper has a separate ViT recipe overrides this)."""
        out = dict(cls.RECIPE)
        if profile == "small":
            out.update({k: v for k, v in cls.SMALL.items() if k in _RECIPE_KEYS})
        return out

    @classmethod
    def head_config(cls, profile: str = "paper") -> dict:
        """Constructor keyword arguments of `profile` (SMALL's non-recipe keys for "small")."""
        if profile == "small":
            return {k: v for k, v in cls.SMALL.items() if k not in _RECIPE_KEYS}
        return {}

    def configure(self, total_steps: int, steps_per_epoch: int) -> None:
        """Called once by the trainer before the first step: schedules that depend on the run length."""
        self.total_steps, self.steps_per_epoch = total_steps, steps_per_epoch
        if self.ema is not None and self.ema.total_steps is None and self.ema.final_momentum != self.ema.base_momentum:
            self.ema.total_steps = total_steps

    @property
    def epoch_float(self) -> float:
        return self.global_step / self.steps_per_epoch if self.steps_per_epoch else 0.0

    def eval_backbone(self) -> nn.Module:
        """The trunk whose features are evaluated (the student's; DINO evaluates its teacher)."""
        return self.backbone

    def param_groups(self) -> list[dict]:
        """Trainable parameters, weights (decayed) and biases / norm parameters (no weight decay, no LARS
        adaptation) apart. Extra keys read by the trainer: `lr_scale` (× the group's lr), `fixed_lr` (no
        schedule), `weight_decay_scale`."""
        decay, no_decay = [], []
        for p in self.parameters():
            if p.requires_grad:
                (no_decay if p.ndim <= 1 else decay).append(p)
        return [g for g in (dict(params=decay), dict(params=no_decay, weight_decay_scale=0.0)) if g["params"]]

    def write_pictures(self, out_dir: str, images: torch.Tensor, *, denormalize, seed: int = 0) -> None:
        """Writes the files named in `pictures` to `out_dir` from a batch of held-out images (`denormalize`
        maps them back to [0, 1]; `seed` fixes any randomness); nothing by default."""

    def before_optimizer_step(self) -> None:
        """Hook between backward and the optimizer step (DINO freezes its last layer here)."""

    def after_step(self) -> None:
        self.global_step += 1

    def get_extra_state(self):
        return {"global_step": self.global_step}

    def set_extra_state(self, state):
        self.global_step = int(state["global_step"])

    def forward(self, views: Sequence[torch.Tensor]) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


_RECIPE_KEYS = {"optimizer", "lr", "weight_decay", "warmup_epochs", "momentum", "betas"}


def loss_region(x: torch.Tensor):
    """Context for calling an sslfast loss op: autocast off. The ops choose their own precision (inputs in
    their dtype, bf16 / fp16 on tensor cores, fp32 accumulation), so under `--precision bf16` they receive the
    bf16 projections as they are instead of having autocast re-cast their internals."""
    return torch.autocast(x.device.type, enabled=False)


def negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """−cos(p, sg(z)), batch mean (SimSiam's D; BYOL's loss is 2 + 2·this)."""
    return -nn.functional.cosine_similarity(p, z.detach(), dim=-1).mean()


def check_views(name: str, views: Sequence[torch.Tensor], at_least: int) -> None:
    if not isinstance(views, (list, tuple)) or len(views) < at_least:
        got = len(views) if isinstance(views, (list, tuple)) else type(views).__name__
        raise ValueError(f"{name} needs a list of at least {at_least} views [B, C, H, W], got {got}")

