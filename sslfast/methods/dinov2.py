"""DINOv2 (Oquab et al., 2023, "DINOv2: Learning Robust Visual Features without Supervision", arXiv:2304.07193;
facebookresearch/dinov2, `dinov2/train/ssl_meta_arch.py`).

Student: a ViT, a DINO head on the class token and an iBOT head on the patch tokens (the same head by default,
`ibot_separate_head=False`); each head is DINO's `DINOHead` (3-layer MLP with GELU, L2-normalized bottleneck,
then a weight-normalized linear layer to K prototypes). Teacher: an EMA of backbone + heads (`sslfast.EMA`,
0.992 → 1 on a cosine). Multi-crop: the student sees the 2 global crops (with iBOT masks) and the local crops,
the teacher the 2 unmasked global crops.

Masking (`ibot_masks`, DINOv2's `collate_data_and_cast` + `MaskingGenerator`): of the 2B global crops
⌊2B·p⌋ are masked (p = `mask_sample_probability`, 0.5), the i-th of them with ratio r ~ U(r_i, r_{i+1}), the
r_i evenly spaced over `mask_ratio_min_max` = [0.1, 0.5], ⌊L·r⌋ patches as random rectangles (area ≥ 4,
aspect in [0.3, 1/0.3], at most L/2 patches) added until the count is reached; the masks are shuffled over
the crops. The student's masked patch embeddings are replaced by the backbone's learnable `mask_token`
(`VisionTransformer.embed(imgs, masks=)`).

Teacher targets (`centering`): "sinkhorn_knopp" (the DINOv2 training configs, e.g. vitl14.yaml; `sf
.sinkhorn_knopp`, 3 iterations, over the 2B class tokens and, separately, over the M masked patch tokens) or
"centering" (ssl_default_config.yaml's value: DINO's softmax((t − c)/τ_t) with a center EMA of momentum 0.9,
one center per head). τ_t goes linearly per step from 0.04 to 0.07 over the first 30 epochs, τ_s = 0.1.

Loss (weights from ssl_default_config.yaml):

    L = 1.0 · L_dino + 1.0 · L_ibot + 0.1 · Σ_{c ∈ global crops} KoLeo(student cls tokens of crop c)

* L_dino: mean over the 2(V − 1) (teacher global crop g, student crop v ≠ g) pairs of the batch-mean
  cross-entropy between the teacher's targets of g and softmax(s_v/τ_s), as DINO (DINOv2 divides the same sum
  by 2 + max(2N, 1): equal for N ≥ 1 local crops). It runs through `sf.prototype_cross_entropy` on the head's
  normalized bottleneck features and the last layer's effective (row-normalized) weight, with each student
  crop's targets summed over its teacher crops: the [V·B, K] student logits are never stored.
* L_ibot: on the M masked tokens of the global crops: each token's cross-entropy weighted by w_m = 1/(masked
  tokens of its image), the sum divided by 2B (crops without a mask count in the denominator), as DINOv2's
  `forward_masked`. `fused_head=True` (the default): `sf.prototype_cross_entropy` on the tokens' bottleneck
  features and the iBOT head's prototypes against the targets scaled by w_m·M/(2B), so neither the [M, K]
  student logits (M ≤ B·L) nor their softmax or gradient is stored; and both heads' teacher targets come from
  the teacher's features and prototypes (`sf.prototype_teacher_probs`: Sinkhorn-Knopp, or the centered softmax
  with the center update). `fused_head=False`: the materialized [M, K] logits into
  `sf.ibot_patch_loss_masked` and the teacher's materialized logits into `sf.sinkhorn_knopp` / the centered
  softmax (`update_center_`). Both paths give the same terms, center updates and gradients up to rounding, and
  have the same parameters and buffers.
* KoLeo (`sf.koleo_loss`): on the student's backbone class tokens, per global crop, per rank.

RECIPE (ssl_default_config.yaml): AdamW, betas (0.9, 0.999), base_lr 0.004 for a batch of 1024 with DINOv2's
`sqrt_wrt_1024` rule (lr = 0.004·sqrt(B/1024)); the trainer scales linearly (lr = lr_256·B/256), so lr_256 =
0.001 gives DINOv2's lr at B = 1024 (at B = 256 DINOv2 would use 0.002, at B = 4096 0.008 against 0.016 here).
Weight decay 0.04 (DINOv2 raises it on a cosine to 0.4, 0.2 in vitl14.yaml; the trainer's is constant), 10
warm-up epochs then cosine, the last layer(s) frozen during the first epoch (`freeze_last_layer_epochs`).
`param_groups`: layer-wise lr decay (`layerwise_decay` 0.9, 1.0 disables; vitl14.yaml uses 1.0): block i of
n gets 0.9^(n − i), the patch embedding, position embedding, cls and mask tokens 0.9^(n + 1), the final norm
and the heads 1; the patch embedding's lr × `patch_embed_lr_mult` = 0.2; no weight decay on biases and norms
(DINOv2's name rule, so the cls / mask tokens and a learned position embedding are decayed).

Not reproduced: gradient clipping (3.0), stochastic depth (drop_path 0.3) and LayerScale (the backbone has
neither), the weight-decay and final-lr schedules, the learned gain of the last layer's weight norm (its rows
have norm 1 here, DINO's `norm_last_layer`), xFormers' fused head pass; DINOv2's 98 px local crops at 224
(the `dino` preset's are 96 px). The teacher is the evaluated network.

SMALL (the digits demo, vit_micro): heads 256 → 64 → 1024 prototypes, lr 2e-3, 1 warm-up epoch, teacher
temperature warm-up over 4 epochs.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops as _ops
from ..models.vit import VisionTransformer
from ..nn.ema import EMA
from ..ops.prototype_ce import prototype_teacher_probs
from .base import BenchStep, Method, check_views, loss_region
from ..data.ibot_masks import check_mask_args, ibot_masks
from .dino import DINOHead, _multicrop

NUM_GLOBAL_CROPS = 2  # DINOv2's forward_backward asserts it


# ------------------------------------------------------------------------------------------------ method
@dataclasses.dataclass
class DINOv2Outputs:
    """What one forward computed: the weighted `loss`, its unweighted `terms` (dino, ibot, koleo; a disabled
    or empty term is absent) and the tensors they came from."""

    loss: torch.Tensor
    terms: dict
    masks: torch.Tensor  # [2B, L] bool, the global crops' iBOT masks
    student_cls: torch.Tensor  # [2B, D] student backbone class tokens of the global crops (KoLeo's input)
    dino_feats: torch.Tensor  # [V·B, d] normalized head bottleneck features, globals then locals
    dino_prototypes: torch.Tensor  # [K, d] the DINO head's effective last-layer weight
    teacher_dino: torch.Tensor  # [2B, K] teacher targets of the global crops (crop 0, then crop 1)
    ibot_logits: torch.Tensor | None  # [M, K'] student logits of the masked tokens (image-major); None if fused
    teacher_ibot: torch.Tensor | None  # [M, K'] teacher targets of the same tokens
    ibot_feats: torch.Tensor | None = None  # [M, d'] normalized iBOT bottleneck features of the masked tokens
    ibot_prototypes: torch.Tensor | None = None  # [K', d'] the iBOT head's effective last-layer weight


def _tokens(backbone: VisionTransformer, imgs: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
    return backbone.forward_tokens(backbone.embed(imgs, masks=masks))


class DINOv2(Method):
    """DINOv2: DINO's class-token loss, iBOT's masked-patch loss and KoLeo on a ViT with a mask token.

    Args:
        backbone: a `VisionTransformer` (its mask token is initialized here).
        out_dim: the DINO head's prototypes K.
        hidden_dim: the DINO head's hidden width.
        bottleneck_dim: the DINO head's bottleneck width.
        ibot_separate_head: a separate iBOT head (else the DINO head serves both losses).
        ibot_out_dim: the iBOT head's prototypes.
        ibot_hidden_dim: the iBOT head's hidden width.
        ibot_bottleneck_dim: the iBOT head's bottleneck width.
        momentum: the teacher's initial EMA momentum (→ 1 on a cosine).
        student_temp: τ_s.
        teacher_temp: τ_t after its warm-up.
        warmup_teacher_temp: τ_t at the start of its warm-up.
        warmup_teacher_temp_epochs: epochs of the linear τ_t warm-up.
        centering: the teacher's targets, "sinkhorn_knopp" or "centering" (softmax of centered logits).
        sinkhorn_iters: Sinkhorn-Knopp iterations.
        center_momentum: the centers' EMA momentum ("centering").
        dino_loss_weight: the weight of the DINO term.
        ibot_loss_weight: the weight of the iBOT term.
        koleo_loss_weight: the weight of the KoLeo term.
        mask_ratio_min_max: the range of the masked fraction of a masked crop.
        mask_sample_probability: the fraction of global crops that are masked.
        layerwise_decay: the lr decay per block from the top (`lr_scale`).
        patch_embed_lr_mult: the extra lr factor of the patch embedding.
        freeze_last_layer_epochs: epochs during which the prototypes get no update.
        gather_distributed: Sinkhorn-Knopp and the centers over the global batch (all ranks).
        fused_head: the iBOT student loss and both teachers' targets without [N, K] logits (module docstring).

    Raises:
        ValueError: `backbone` is not a `VisionTransformer`, `centering` is unknown, a loss weight or epoch
            count is negative or not finite, `layerwise_decay` is outside (0, 1], `patch_embed_lr_mult` is not
            > 0, or the mask arguments are out of range.
    """

    name = "dinov2"
    preset = "dino"
    needs_vit = True
    default_backbone = {"small": "vit_micro", "paper": "vit_small"}
    min_batch_per_rank = 2  # KoLeo: each class token's nearest other one in its crop
    bench_step = BenchStep(batch=64)  # ViT-S/16 at DINOv2's per-GPU batch 64, 2 × 224 + 8 × 96 crops
    exact_across_ranks = False  # each rank draws its own iBOT masks
    graph_refusal = (
        "dinov2 draws its iBOT masks on the host, and its teacher temperature and last-layer freeze follow the "
        "step count there; a captured step would replay one mask and the capture-time values (use --compile)"
    )
    RECIPE = dict(optimizer="adamw", lr=1e-3, weight_decay=0.04, warmup_epochs=10, betas=(0.9, 0.999))
    SMALL = dict(
        out_dim=1024,
        hidden_dim=256,
        bottleneck_dim=64,
        ibot_out_dim=1024,
        ibot_hidden_dim=256,
        ibot_bottleneck_dim=64,
        warmup_teacher_temp_epochs=4,
        lr=2e-3,
        warmup_epochs=1,
    )

    def __init__(
        self,
        backbone,
        *,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        ibot_separate_head: bool = False,
        ibot_out_dim: int = 65536,
        ibot_hidden_dim: int = 2048,
        ibot_bottleneck_dim: int = 256,
        momentum: float = 0.992,
        student_temp: float = 0.1,
        teacher_temp: float = 0.07,
        warmup_teacher_temp: float = 0.04,
        warmup_teacher_temp_epochs: float = 30,
        centering: str = "sinkhorn_knopp",
        sinkhorn_iters: int = 3,
        center_momentum: float = 0.9,
        dino_loss_weight: float = 1.0,
        ibot_loss_weight: float = 1.0,
        koleo_loss_weight: float = 0.1,
        mask_ratio_min_max: tuple[float, float] = (0.1, 0.5),
        mask_sample_probability: float = 0.5,
        layerwise_decay: float = 0.9,
        patch_embed_lr_mult: float = 0.2,
        freeze_last_layer_epochs: float = 1,
        gather_distributed: bool = False,
        fused_head: bool = True,
    ):
        if not isinstance(fused_head, bool):
            raise TypeError(f"fused_head must be a bool, got {type(fused_head).__name__}")
        if not isinstance(backbone, VisionTransformer):
            raise ValueError(
                f"dinov2 needs a ViT backbone (sslfast VisionTransformer: vit_micro, vit_tiny, "
                f"vit_small, vit_base), got {type(backbone).__name__}"
            )
        if centering not in ("sinkhorn_knopp", "centering"):
            raise ValueError(f"centering must be 'sinkhorn_knopp' or 'centering', got {centering!r}")
        for key, value in (
            ("dino_loss_weight", dino_loss_weight),
            ("ibot_loss_weight", ibot_loss_weight),
            ("koleo_loss_weight", koleo_loss_weight),
            ("warmup_teacher_temp_epochs", warmup_teacher_temp_epochs),
            ("freeze_last_layer_epochs", freeze_last_layer_epochs),
        ):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{key} must be a finite number >= 0, got {value!r}")
        if not (0 < layerwise_decay <= 1 and 0 < patch_embed_lr_mult):
            raise ValueError(
                f"layerwise_decay must be in (0, 1] and patch_embed_lr_mult > 0, got {layerwise_decay!r}"
                f" and {patch_embed_lr_mult!r}"
            )
        check_mask_args(mask_ratio_min_max, mask_sample_probability)
        super().__init__(backbone, gather_distributed=gather_distributed)
        backbone.init_mask_token()
        self.dino_head = DINOHead(self.feature_dim, out_dim, hidden_dim, bottleneck_dim)
        self.ibot_head = (
            DINOHead(self.feature_dim, ibot_out_dim, ibot_hidden_dim, ibot_bottleneck_dim)
            if ibot_separate_head
            else None
        )
        # the teacher follows backbone + heads (a ModuleList kept unregistered: no duplicate state-dict keys)
        self.ema = EMA(
            nn.ModuleList([m for m in (backbone, self.dino_head, self.ibot_head) if m is not None]),
            momentum=momentum,
            final_momentum=1.0,
        )
        self.student_temp, self.teacher_temp = student_temp, teacher_temp
        self.warmup_teacher_temp, self.warmup_teacher_temp_epochs = warmup_teacher_temp, warmup_teacher_temp_epochs
        self.centering, self.sinkhorn_iters, self.center_momentum = centering, sinkhorn_iters, center_momentum
        self.loss_weights = dict(dino=dino_loss_weight, ibot=ibot_loss_weight, koleo=koleo_loss_weight)
        self.mask_ratio_min_max, self.mask_sample_probability = tuple(mask_ratio_min_max), mask_sample_probability
        self.layerwise_decay, self.patch_embed_lr_mult = layerwise_decay, patch_embed_lr_mult
        self.freeze_last_layer_epochs, self.fused_head = freeze_last_layer_epochs, fused_head
        if centering == "centering":
            self.register_buffer("dino_center", torch.zeros(1, out_dim))
            self.register_buffer("ibot_center", torch.zeros(1, ibot_out_dim if ibot_separate_head else out_dim))

    # -------------------------------------------------------------------------------------- schedules
    def teacher_temperature(self) -> float:
        """DINOv2's per-iteration schedule: linspace(warmup_teacher_temp, teacher_temp, W)[step] over the first
        W = warmup_teacher_temp_epochs × steps_per_epoch steps, then teacher_temp (before `configure`: the
        warm-up's first value)."""
        if self.warmup_teacher_temp_epochs == 0:
            return self.teacher_temp
        if not self.steps_per_epoch:
            return self.warmup_teacher_temp
        warmup = round(self.warmup_teacher_temp_epochs * self.steps_per_epoch)
        if self.global_step >= warmup:
            return self.teacher_temp
        if warmup == 1:
            return self.warmup_teacher_temp
        step = (self.teacher_temp - self.warmup_teacher_temp) / (warmup - 1)
        return self.warmup_teacher_temp + self.global_step * step

    def _teacher_probs(self, head: DINOHead, tokens: torch.Tensor, center: str, temp: float) -> torch.Tensor:
        """Targets [N, K] of the teacher's head on tokens [N, D]: Sinkhorn-Knopp, or centered softmax (then the
        center EMA, in training mode, from the logits of this call). fused_head: from the head's features and
        prototypes (`prototype_teacher_probs`), without the logits; else from the materialized logits, in fp32
        (fp64 logits stay fp64)."""
        sinkhorn = self.centering == "sinkhorn_knopp"
        if self.fused_head:
            x = head.features(tokens)
            w = head.prototypes().to(x.dtype)
            if sinkhorn:
                return prototype_teacher_probs(
                    x,
                    w,
                    teacher_temp=temp,
                    mode="sinkhorn",
                    sinkhorn_iters=self.sinkhorn_iters,
                    gather_distributed=self.gather_distributed,
                )
            return prototype_teacher_probs(
                x,
                w,
                teacher_temp=temp,
                center=getattr(self, center),
                center_momentum=self.center_momentum if self.training else None,
            )
        logits = head(tokens)
        logits = logits if logits.dtype == torch.float64 else logits.float()
        if sinkhorn:
            return _ops.sinkhorn_knopp(logits, temp, self.sinkhorn_iters, gather_distributed=self.gather_distributed)
        c = getattr(self, center)
        probs = F.softmax((logits - c) / temp, dim=-1)
        if self.training:
            _ops.update_center_(c, logits, self.center_momentum)
        return probs

    # -------------------------------------------------------------------------------------- loss
    def forward(self, views) -> torch.Tensor:
        return self.compute(views).loss

    def compute(self, views, *, masks: torch.Tensor | None = None) -> DINOv2Outputs:
        """The loss of one batch of views (2 global crops, then the local ones) and its parts; `masks`
        [2B, L] bool replaces the drawn iBOT masks (tests)."""
        check_views(self.name, views, NUM_GLOBAL_CROPS)
        if views[0].shape != views[1].shape:
            raise ValueError(
                f"dinov2's 2 global crops must have one shape, got {tuple(views[0].shape)} and {tuple(views[1].shape)}"
            )
        B, G = views[0].shape[0], NUM_GLOBAL_CROPS
        V = len(views)
        glob = torch.cat(list(views[:G]))
        bb = self.backbone
        grid = (glob.shape[-2] // bb.patch_size, glob.shape[-1] // bb.patch_size)
        if masks is None:
            masks = ibot_masks(
                G * B,
                grid,
                mask_ratio_min_max=self.mask_ratio_min_max,
                mask_sample_probability=self.mask_sample_probability,
            ).to(glob.device)
        teacher = self.ema.teacher
        t_dino_head, t_ibot_head = teacher[1], (teacher[2] if self.ibot_head is not None else teacher[1])
        ibot_head = self.ibot_head if self.ibot_head is not None else self.dino_head
        temp = self.teacher_temperature()
        with torch.no_grad():
            t_tokens = _tokens(teacher[0], glob)
            t_masked = t_tokens[:, 1:][masks]
            teacher_dino = self._teacher_probs(t_dino_head, t_tokens[:, 0], "dino_center", temp)
            teacher_ibot = self._teacher_probs(t_ibot_head, t_masked, "ibot_center", temp) if len(t_masked) else None

        s_tokens = _tokens(bb, glob, masks)
        s_cls = s_tokens[:, 0]
        cls_all = s_cls
        if V > G:
            local_cls = _multicrop(lambda x: _tokens(bb, x)[:, 0], views[G:])
            cls_all = torch.cat([s_cls, local_cls])
        s_masked = s_tokens[:, 1:][masks]
        if ibot_head is self.dino_head:  # one pass of the shared head's MLP over class and masked tokens
            z = self.dino_head.features(torch.cat([cls_all, s_masked]))
            z_dino, z_ibot = z[: len(cls_all)], z[len(cls_all) :]
        else:
            z_dino, z_ibot = self.dino_head.features(cls_all), ibot_head.features(s_masked)

        terms, ibot_logits, w_ibot = {}, None, None
        with loss_region(z_dino):
            w_dino = self.dino_head.prototypes().to(z_dino.dtype)
            if self.loss_weights["dino"]:
                q0, q1 = teacher_dino[:B], teacher_dino[B:]
                # each student crop's targets summed over its teacher crops: g0 ← q1, g1 ← q0, local ← q0 + q1
                targets = torch.cat([q1, q0, (q0 + q1).repeat(V - G, 1)])
                ce = _ops.prototype_cross_entropy(z_dino, w_dino, targets, student_temp=self.student_temp)
                terms["dino"] = ce * V / (G * (V - 1))  # mean over rows → mean over the G·V − G pairs
            if teacher_ibot is not None and self.loss_weights["ibot"]:
                w_ibot = w_dino if ibot_head is self.dino_head else ibot_head.prototypes().to(z_ibot.dtype)
                m = masks.to(torch.float32)
                masks_weight = (1.0 / m.sum(-1, keepdim=True).clamp(min=1.0)).expand_as(m)[masks]
                if self.fused_head:  # mean over the M rows of (w_m·M/(2B))·CE_m = Σ_m w_m·CE_m / (2B)
                    scaled = teacher_ibot * (masks_weight.to(teacher_ibot.dtype) * (len(z_ibot) / (G * B)))[:, None]
                    terms["ibot"] = _ops.prototype_cross_entropy(z_ibot, w_ibot, scaled, student_temp=self.student_temp)
                else:
                    ibot_logits = F.linear(z_ibot, w_ibot)
                    terms["ibot"] = _ops.ibot_patch_loss_masked(
                        ibot_logits,
                        teacher_ibot,
                        masks_weight=masks_weight,
                        n_images=G * B,
                        student_temp=self.student_temp,
                    )
            if self.loss_weights["koleo"]:
                terms["koleo"] = sum(_ops.koleo_loss(c) for c in s_cls.chunk(G))
            loss = sum(self.loss_weights[k] * v for k, v in terms.items())
            if not terms:
                loss = z_dino.sum() * 0.0
        return DINOv2Outputs(
            loss, terms, masks, s_cls, z_dino, w_dino, teacher_dino, ibot_logits, teacher_ibot, z_ibot, w_ibot
        )

    # -------------------------------------------------------------------------------------- trainer hooks
    def before_optimizer_step(self):
        if self.steps_per_epoch and self.epoch_float < self.freeze_last_layer_epochs:
            for head in (self.dino_head, self.ibot_head):
                if head is not None:
                    for p in head.last_layer.parameters():
                        p.grad = None

    def eval_backbone(self):
        return self.ema.teacher[0]

    def lr_scale(self, name: str) -> float:
        """DINOv2's `get_vit_lr_decay_rate` (× `patch_embed_lr_mult` for the patch embedding) of a parameter
        name of this module: layer 0 = patch / position embedding, cls and mask tokens; layer i + 1 = block i;
        n + 1 = the final norm and everything outside the backbone; scale = layerwise_decay^(n + 1 − layer)."""
        n = len(self.backbone.blocks)
        layer = n + 1
        if name.startswith("backbone."):
            rel = name[len("backbone.") :]
            if rel.startswith("patch_embed.") or rel == "mask_token":
                layer = 0
            elif rel.startswith("blocks."):
                layer = int(rel.split(".")[1]) + 1
        scale = self.layerwise_decay ** (n + 1 - layer)
        if name.startswith("backbone.patch_embed.proj."):
            scale *= self.patch_embed_lr_mult
        return scale

    def param_groups(self) -> list[dict]:
        """One group per (lr_scale, weight_decay_scale): `lr_scale` from `lr_scale(name)`, no weight decay for
        biases and norm parameters (DINOv2's rule: name ends in '.bias' or contains 'norm')."""
        groups: dict[tuple[float, float], list] = {}
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            wd = 0.0 if name.endswith(".bias") or "norm" in name else 1.0
            groups.setdefault((self.lr_scale(name), wd), []).append(p)
        return [dict(params=ps, lr_scale=lr, weight_decay_scale=wd) for (lr, wd), ps in groups.items()]
