"""What every method shares: the training-loss interface, the recipe (optimizer settings), the parameter
groups the trainer builds its optimizer from, and the traits the trainer, tests and benches read."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
from torch import nn

from ..nn.ema import EMA


@dataclasses.dataclass(frozen=True)
class BenchStep:
    """The whole training step `sslfast bench --ops step` times for a method (and `benchmarks/max_batch.py`
    searches from): the paper's heads on `backbone`, a global batch of `batch` images of `image_size` px (each
    view at the method's preset size for that resolution), bf16 autocast.

    Args:
        batch: images per step, >= 1.
        image_size: the training resolution in pixels, >= 1.
        backbone: a backbone name; None: the method's `default_backbone["paper"]`.

    Raises:
        TypeError: `batch` or `image_size` is not an int, or `backbone` is neither None nor a str.
        ValueError: `batch` or `image_size` is below 1.
    """

    batch: int = 256
    image_size: int = 224
    backbone: str | None = None

    def __post_init__(self):
        for key in ("batch", "image_size"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"BenchStep.{key} must be an int, got {type(value).__name__}")
            if value < 1:
                raise ValueError(f"BenchStep.{key} must be >= 1, got {value}")
        if self.backbone is not None and not isinstance(self.backbone, str):
            raise TypeError(f"BenchStep.backbone must be None or a backbone name, got {type(self.backbone).__name__}")


class Method(nn.Module):
    """A self-supervised method: `forward(views) -> loss` on the list of augmented views of one batch.

    A new method is one module declaring a subclass and one `sslfast.methods.register_method` line: the trainer,
    the CLI, the tests and the benches read everything else from the class attributes below, never from the
    method's name.

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
      pictures:           extra PNG files the trainer writes at the end (`write_pictures`);
      bench_step:         the `BenchStep` (backbone, batch, resolution) of its `sslfast bench --ops step` case,
                          or None for no case;
      exact_across_ranks: one step of the digits profile on R ranks with B/R images each gives, to fp32
                          rounding, the weights of one process stepping on all B images (the batch-wide terms
                          are gathered or all-reduced, nothing random is drawn per rank); a method setting it
                          False says why beside it;
      short_run:          constructor overrides for runs of a few dozen steps (a learning check): a setting of
                          `SMALL` that needs a longer run to show learning (MoCo v2's queue fills after
                          queue_size / batch steps);
      fsdp_refusal:       why `--strategy fsdp` cannot train the method (one line), or None.
      graph_refusal:      why `--cuda-graph` cannot capture the method's step (one line), or None. A captured
                          step replays the kernels of its capture: a method may declare None only when its
                          forward and hooks read nothing from the host that changes between steps (no Python
                          schedule of the step count, no host-side ring position, no masks drawn on the
                          host); what the trainer changes per step (the learning rate, the EMA momentum) it
                          feeds through device tensors (`sslfast.train.graphed`).

    Attributes set by subclasses: `backbone` (the student trunk), `ema` (an `sslfast.EMA` teacher or None;
    the trainer fuses its update into the optimizer step).

    Args:
        backbone: the trunk; `backbone.num_features` is the feature width the heads are built on.
        gather_distributed: compute the batch-wide loss terms over all ranks (all-gather / all-reduce).
    """

    name = "method"
    preset = "simclr"
    RECIPE: dict = {}
    SMALL: dict = {}
    needs_vit = False
    default_backbone = {"small": "resnet_tiny", "paper": "resnet50"}
    min_batch_per_rank = 1
    pictures: tuple[str, ...] = ()
    bench_step: BenchStep | None = BenchStep()
    exact_across_ranks = True
    short_run: dict = {}
    fsdp_refusal: str | None = None
    graph_refusal: str | None = None

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
        """The backbone's feature width (`backbone.num_features`)."""
        return int(self.backbone.num_features)

    @classmethod
    def recipe(cls, profile: str = "paper", *, vit: bool = False) -> dict:
        """The training settings of `profile`.

        Args:
            profile: "paper" (RECIPE) or "small" (RECIPE updated with SMALL's recipe keys).
            vit: whether the backbone is a ViT (a method whose paper has a separate ViT recipe overrides this).

        Returns:
            A new dict with the keys of `RECIPE` (optimizer, lr, weight_decay, warmup_epochs, momentum | betas).
        """
        out = dict(cls.RECIPE)
        if profile == "small":
            out.update({k: v for k, v in cls.SMALL.items() if k in _RECIPE_KEYS})
        return out

    @classmethod
    def head_config(cls, profile: str = "paper") -> dict:
        """Constructor keyword arguments of `profile`.

        Args:
            profile: "paper" (the constructor's defaults: nothing to override) or "small".

        Returns:
            A new dict: SMALL's non-recipe keys for "small", empty for "paper".
        """
        if profile == "small":
            return {k: v for k, v in cls.SMALL.items() if k not in _RECIPE_KEYS}
        return {}

    @classmethod
    def bench_case(cls) -> tuple[str, int, int] | None:
        """The step benchmark case this class declares (`bench_step`), its backbone resolved.

        Returns:
            (backbone, global batch, image size), the backbone `default_backbone["paper"]` unless `bench_step`
            names one; None when `bench_step` is None.
        """
        bench = cls.bench_step
        if bench is None:
            return None
        return bench.backbone or cls.default_backbone["paper"], bench.batch, bench.image_size

    def configure(self, total_steps: int, steps_per_epoch: int) -> None:
        """Called once by the trainer before the first step: schedules that depend on the run length (an EMA
        whose momentum follows a cosine gets `total_steps`).

        Args:
            total_steps: optimizer steps of the whole run.
            steps_per_epoch: optimizer steps per epoch (`epoch_float` = global_step / steps_per_epoch).
        """
        self.total_steps, self.steps_per_epoch = total_steps, steps_per_epoch
        if self.ema is not None and self.ema.total_steps is None and self.ema.final_momentum != self.ema.base_momentum:
            self.ema.total_steps = total_steps

    @property
    def epoch_float(self) -> float:
        """Epochs done, fractional: global_step / steps_per_epoch (0 before `configure`)."""
        return self.global_step / self.steps_per_epoch if self.steps_per_epoch else 0.0

    def eval_backbone(self) -> nn.Module:
        """The trunk whose features are evaluated.

        Returns:
            The student's backbone by default; a method evaluating its teacher (DINO) returns the teacher's.
        """
        return self.backbone

    def param_groups(self) -> list[dict]:
        """Trainable parameters, weights (decayed) and biases / norm parameters (no weight decay, no LARS
        adaptation) apart.

        Returns:
            Optimizer parameter groups (empty ones left out), each a dict with `params` and optionally the keys
            the trainer reads: `lr_scale` (× the group's lr), `fixed_lr` (no schedule), `weight_decay_scale`.
        """
        decay, no_decay = [], []
        for p in self.parameters():
            if p.requires_grad:
                (no_decay if p.ndim <= 1 else decay).append(p)
        return [g for g in (dict(params=decay), dict(params=no_decay, weight_decay_scale=0.0)) if g["params"]]

    def write_pictures(self, out_dir: str, images: torch.Tensor, *, denormalize, seed: int = 0) -> None:
        """Writes the files named in `pictures` (nothing by default).

        Args:
            out_dir: the folder to write them to.
            images: a batch of held-out images [B, C, H, W], normalized as the training views.
            denormalize: maps such images back to [0, 1].
            seed: fixes any randomness (e.g. the masks drawn).
        """

    def before_optimizer_step(self) -> None:
        """Hook between backward and the optimizer step (DINO freezes its last layer here)."""

    def after_step(self) -> None:
        """Hook after the optimizer step: counts `global_step`."""
        self.global_step += 1

    def get_extra_state(self):
        """Checkpointed with the state dict: {"global_step": int}."""
        return {"global_step": self.global_step}

    def set_extra_state(self, state):
        """Restores `get_extra_state`'s dict."""
        self.global_step = int(state["global_step"])

    def forward(self, views: Sequence[torch.Tensor]) -> torch.Tensor:  # pragma: no cover - abstract
        """The training loss of one batch.

        Args:
            views: the augmented views of the batch, each [B, C, H, W], in the order of the method's preset.

        Returns:
            The scalar loss.

        Raises:
            ValueError: fewer views than the method needs (`check_views`).
        """
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
    """Checks that `views` is a list or tuple of at least `at_least` tensors.

    Raises:
        ValueError: naming the method `name` and the count (or type) received.
    """
    if not isinstance(views, (list, tuple)) or len(views) < at_least:
        got = len(views) if isinstance(views, (list, tuple)) else type(views).__name__
        raise ValueError(f"{name} needs a list of at least {at_least} views [B, C, H, W], got {got}")
