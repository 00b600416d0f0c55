"""Augmentation presets that reproduce each paper's view distribution, with the source of every number.

A preset is a tuple of `ViewSpec`s (one per view, in the order the method consumes them) plus the
normalization. Every backend (native fused kernel, DALI, the PyTorch CPU path) reads the same specs.

Common to all presets unless stated: RandomResizedCrop aspect ratio (3/4, 4/3) — torchvision's default,
used by every official code base below; horizontal flip p = 0.5; ImageNet normalization mean
(0.485, 0.456, 0.406), std (0.229, 0.224, 0.225). Colour jitter (when applied) runs its four ops in a
random per-sample order, as torchvision's `ColorJitter` and SimCLR's `color_jitter(random_order=True)` do.
Blur sigma is drawn from U(0.1, 2.0) pixels in every paper; the kernel is 23 taps wide (BYOL: "23×23";
SimCLR: 10% of the 224 side, made odd): a Gaussian truncated at ≥ 5.5σ (tail mass < 1e-7), i.e. the
untruncated Gaussian that PIL's `GaussianBlur(radius=σ)` approximates with box filters in the DINO,
Barlow Twins, VICReg and MoCo v2 codes. Solarize inverts x ≥ 0.5 (BYOL:
"x ↦ x·1{x<0.5} + (1−x)·1{x≥0.5}") or x ≥ 128/255 (PIL `ImageOps.solarize`, threshold 128, in the
Barlow Twins, VICReg and DINO codes).

Known deviations (all backends): bilinear resize instead of the codes' bicubic (DINO, Barlow Twins,
VICReg, MAE, SimCLR's TF code) — see `sslfast.reference.augment` for the exact math.

| preset  | views            | crop scale             | jitter (b, c, s, h), p    | gray | blur p         | solarize p |
|---------|------------------|------------------------|---------------------------|------|----------------|------------|
| simclr  | 2 × 224          | (0.08, 1)              | (0.8, 0.8, 0.8, 0.2), 0.8 | 0.2  | 0.5, 0.5       | 0, 0       |
| moco_v2 | 2 × 224          | (0.2, 1)               | (0.4, 0.4, 0.4, 0.1), 0.8 | 0.2  | 0.5, 0.5       | 0, 0       |
| byol    | 2 × 224          | (0.08, 1)              | (0.4, 0.4, 0.2, 0.1), 0.8 | 0.2  | 1.0, 0.1       | 0, 0.2     |
| barlow  | 2 × 224          | (0.08, 1)              | (0.4, 0.4, 0.2, 0.1), 0.8 | 0.2  | 1.0, 0.1       | 0, 0.2     |
| vicreg  | 2 × 224          | (0.08, 1)              | (0.4, 0.4, 0.2, 0.1), 0.8 | 0.2  | 1.0, 0.1       | 0, 0.2     |
| dino    | 2 × 224, 8 × 96  | (0.4, 1) / (0.05, 0.4) | (0.4, 0.4, 0.2, 0.1), 0.8 | 0.2  | 1.0, 0.1 / 0.5 | 0, 0.2 / 0 |
| mae     | 1 × 224          | (0.2, 1)               | none                      | none | none           | none       |
| swav    | 2 × 224, 6 × 96  | (0.14, 1) / (.05, .14) | (0.8, 0.8, 0.8, 0.2), 0.8 | 0.2  | 0.5 / 0.5      | 0 / 0      |
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PIL_SOLARIZE_THRESHOLD = 128 / 255  # PIL ImageOps.solarize(img, threshold=128) on [0, 255]


@dataclass(frozen=True)
class ViewSpec:
    """One view's random augmentation (all probabilities per sample, all ranges uniform); the fields are the
    torchvision / paper parameters of the module's table.

    Args:
        size: output side (square).
        scale, ratio: RandomResizedCrop's area fraction and (log-uniform) aspect ratio ranges.
        flip_p: horizontal flip probability.
        jitter_p, brightness, contrast, saturation, hue: ColorJitter's probability and strengths (factors
            ~ U(max(0, 1 − s), 1 + s); hue shift ~ U(−h, h) turns), applied in a random order per sample.
        gray_p: RandomGrayscale probability.
        blur_p, blur_sigma, blur_kernel: Gaussian blur probability, σ range and kernel size.
        solarize_p, solarize_threshold: solarization probability and threshold (in [0, 1]).
        count: identical views of this kind (DINO's local crops).
    """

    size: int = 224  # output side (square)
    scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop area fraction
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # RandomResizedCrop aspect ratio (log-uniform)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4  # factor ~ U(max(0, 1 − b), 1 + b)
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1  # shift ~ U(−h, h) turns
    gray_p: float = 0.2
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_kernel: int = 23
    solarize_p: float = 0.0
    solarize_threshold: float = 0.5
    count: int = 1  # identical views of this kind (DINO's local crops)

    @property
    def has_jitter(self) -> bool:
        """Whether colour jitter can change anything (p > 0 and a non-zero strength)."""
        return self.jitter_p > 0 and any((self.brightness, self.contrast, self.saturation, self.hue))


@dataclass(frozen=True)
class Preset:
    """A method's view distribution.

    Args:
        name: the preset's name (a key of `PRESETS` for the built-in ones).
        views: one `ViewSpec` per kind of view, in output order (`count` views each).
        mean: the per-channel normalization mean (RGB, [0, 1] scale).
        std: the per-channel normalization std.
        sources: where each number comes from (papers, code), for the record; not compared.
    """

    name: str
    views: tuple[ViewSpec, ...]
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    sources: dict = field(default_factory=dict, compare=False)

    @property
    def num_views(self) -> int:
        """Views per image (the specs' counts summed)."""
        return sum(v.count for v in self.views)

    def expanded(self) -> list[ViewSpec]:
        """One spec per output view, in output order."""
        return [dataclasses.replace(v, count=1) for v in self.views for _ in range(v.count)]

    def sizes(self) -> list[int]:
        """The side of each output view, in output order."""
        return [v.size for v in self.expanded()]

    def with_image_size(self, image_size: int | None) -> "Preset":
        """The same preset at another resolution.

        Args:
            image_size: the first view's new side; every other view keeps its size ratio to it (DINO's 96/224,
                rounded, at least 1); None: unchanged.

        Returns:
            A new `Preset` (or this one for None).

        Raises:
            ValueError: `image_size` below 1.
        """
        if image_size is None:
            return self
        image_size = int(image_size)
        if image_size < 1:
            raise ValueError(f"image_size must be a positive int, got {image_size}")
        ref = self.views[0].size
        views = tuple(dataclasses.replace(v, size=max(1, round(v.size * image_size / ref))) for v in self.views)
        return dataclasses.replace(self, views=views)

    def replace_views(self, **changes) -> "Preset":
        """The same preset with `changes` applied to every view (e.g. jitter_p=0 for a probe)."""
        return dataclasses.replace(self, views=tuple(dataclasses.replace(v, **changes) for v in self.views))


# Colour jitter shared by BYOL, Barlow Twins, VICReg and DINO: ColorJitter(0.4, 0.4, 0.2, 0.1), p = 0.8.
_BYOL_VIEW = ViewSpec()


def simclr(image_size: int | None = None) -> Preset:
    """SimCLR's 2 views (the module's table).

    Args:
        image_size: the first view's side (None: 224); the other views keep their ratio to it.

    Returns:
        The `Preset`.
    """
    s = 1.0  # colour distortion strength (ImageNet)
    v = ViewSpec(
        scale=(0.08, 1.0),
        brightness=0.8 * s,
        contrast=0.8 * s,
        saturation=0.8 * s,
        hue=0.2 * s,
        jitter_p=0.8,
        gray_p=0.2,
        blur_p=0.5,
    )
    return Preset(
        "simclr",
        (dataclasses.replace(v, count=2),),
        sources={
            "paper": "Chen et al. 2020, A Simple Framework for Contrastive Learning of Visual Representations, "
            "Appendix A (Data Augmentation Details) and its PyTorch pseudo-code",
            "crop": "random crop, area U(0.08, 1.0), aspect ratio U(3/4, 4/3), resized to 224",
            "jitter": "ColorJitter(0.8s, 0.8s, 0.8s, 0.2s), s = 1.0, applied with p = 0.8, random order",
            "gray": "RandomGrayscale(p = 0.2)",
            "blur": "p = 0.5, sigma U(0.1, 2.0), kernel 10% of the image side (23 at 224)",
            "brightness": "multiplicative (SimCLR v2 code, torchvision); v1's TF code added a random delta",
        },
    ).with_image_size(image_size)


def moco_v2(image_size: int | None = None) -> Preset:
    """MoCo v2's 2 views ("aug-plus"; also SimSiam's).

    Args:
        image_size: the first view's side (None: 224); the other views keep their ratio to it.

    Returns:
        The `Preset`.
    """
    v = ViewSpec(scale=(0.2, 1.0), brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, blur_p=0.5, count=2)
    return Preset(
        "moco_v2",
        (v,),
        sources={
            "paper": "Chen, Fan, Girshick, He 2020, Improved Baselines with Momentum Contrastive Learning",
            "code": "facebookresearch/moco main_moco.py, --aug-plus: RandomResizedCrop(224, scale=(0.2, 1.)), "
            "RandomApply([ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), RandomGrayscale(p=0.2), "
            "RandomApply([GaussianBlur([.1, 2.])], p=0.5), RandomHorizontalFlip()",
        },
    ).with_image_size(image_size)


def byol(image_size: int | None = None) -> Preset:
    """BYOL's asymmetric views T and T' (also MoCo v3's).

    Args:
        image_size: the first view's side (None: 224); the other views keep their ratio to it.

    Returns:
        The `Preset`.
    """
    v1 = dataclasses.replace(_BYOL_VIEW, blur_p=1.0, solarize_p=0.0, solarize_threshold=0.5)
    v2 = dataclasses.replace(_BYOL_VIEW, blur_p=0.1, solarize_p=0.2, solarize_threshold=0.5)
    return Preset(
        "byol",
        (v1, v2),
        sources={
            "paper": "Grill et al. 2020, Bootstrap Your Own Latent, Appendix B, Table 6 (T and T')",
            "crop": "random crop, area U(0.08, 1), aspect U(3/4, 4/3), 224",
            "jitter": "p = 0.8, brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1, order random per patch",
            "gray": "color dropping p = 0.2",
            "blur": "p = 1.0 (T), 0.1 (T'); sigma U(0.1, 2.0), 23×23 kernel",
            "solarize": "p = 0.0 (T), 0.2 (T'); threshold 0.5",
        },
    ).with_image_size(image_size)


def _barlow_like(name: str, sources: dict, image_size) -> Preset:
    t = PIL_SOLARIZE_THRESHOLD
    v1 = dataclasses.replace(_BYOL_VIEW, blur_p=1.0, solarize_p=0.0, solarize_threshold=t)
    v2 = dataclasses.replace(_BYOL_VIEW, blur_p=0.1, solarize_p=0.2, solarize_threshold=t)
    return Preset(name, (v1, v2), sources=sources).with_image_size(image_size)


def barlow(image_size: int | None = None) -> Preset:
    """Barlow Twins' 2 views (BYOL's, PIL solarize threshold).

    Args:
        image_size: the first view's side (None: 224); the other views keep their ratio to it.

    Returns:
        The `Preset`.
    """
    return _barlow_like(
        "barlow",
        {
            "paper": "Zbontar et al. 2021, Barlow Twins, Section 3 (augmentations follow BYOL)",
            "code": "facebookresearch/barlowtwins main.py Transform: RandomResizedCrop(224, BICUBIC), flip 0.5, "
            "RandomApply([ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8), RandomGrayscale(0.2), "
            "GaussianBlur(p=1.0 | 0.1) with PIL radius U(0.1, 2.0), Solarization(p=0.0 | 0.2) "
            "(ImageOps.solarize, threshold 128)",
        },
        image_size,
    )


def vicreg(image_size: int | None = None) -> Preset:
    """VICReg's 2 views (BYOL's, PIL solarize threshold).

    Args:
        image_size: the first view's side (None: 224); the other views keep their ratio to it.

    Returns:
        The `Preset`.
    """
    return _barlow_like(
        "vicreg",
        {
            "paper": "Bardes, Ponce, LeCun 2022, VICReg, Appendix (augmentations follow BYOL / Barlow Twins)",
            "code": "facebookresearch/vicreg augmentations.py TrainTransform: RandomResizedCrop(224, BICUBIC), "
            "flip 0.5, RandomApply([ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8), RandomGrayscale(0.2), "
            "GaussianBlur(p=1.0 | 0.1) sigma U(0.1, 2.0), Solarization(p=0.0 | 0.2)",
        },
        image_size,
    )


def dino(image_size: int | None = None, local_crops: int = 8, local_size: int = 96) -> Preset:
    """DINO's multi-crop: 2 global views, then `local_crops` local ones (also DINOv2's).

    Args:
        image_size: the first view's side (None: 224); the other views keep their ratio to it.
        local_crops: local views (0: none).
        local_size: the local views' side at image_size 224.

    Returns:
        The `Preset`.
    """
    t = PIL_SOLARIZE_THRESHOLD
    g1 = dataclasses.replace(_BYOL_VIEW, scale=(0.4, 1.0), blur_p=1.0)
    g2 = dataclasses.replace(_BYOL_VIEW, scale=(0.4, 1.0), blur_p=0.1, solarize_p=0.2, solarize_threshold=t)
    loc = dataclasses.replace(_BYOL_VIEW, size=local_size, scale=(0.05, 0.4), blur_p=0.5, count=int(local_crops))
    views = (g1, g2, loc) if local_crops > 0 else (g1, g2)
    return Preset(
        "dino",
        views,
        sources={
            "paper": "Caron et al. 2021, Emerging Properties in Self-Supervised Vision Transformers, Section 3.1 "
            "(2 global views at 224, several local views at 96)",
            "code": "facebookresearch/dino main_dino.py DataAugmentationDINO and its defaults: "
            "global_crops_scale=(0.4, 1.), local_crops_scale=(0.05, 0.4), local_crops_number=8; "
            "flip 0.5 + RandomApply(ColorJitter(0.4, 0.4, 0.2, 0.1), p=0.8) + RandomGrayscale(0.2); "
            "global 1: GaussianBlur(1.0); global 2: GaussianBlur(0.1) + Solarization(0.2); "
            "local: GaussianBlur(p=0.5); blur radius U(0.1, 2.0); solarize threshold 128",
        },
    ).with_image_size(image_size)


def mae(image_size: int | None = None) -> Preset:
    """MAE's single view: crop and flip only.

    Args:
        image_size: the first view's side (None: 224); the other views keep their ratio to it.

    Returns:
        The `Preset`.
    """
    v = ViewSpec(scale=(0.2, 1.0), jitter_p=0.0, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0, gray_p=0.0)
    return Preset(
        "mae",
        (v,),
        sources={
            "paper": "He et al. 2021, Masked Autoencoders Are Scalable Vision Learners, Section 4 / Appendix A.1",
            "code": "facebookresearch/mae main_pretrain.py: RandomResizedCrop(224, scale=(0.2, 1.0), "
            "interpolation=BICUBIC), RandomHorizontalFlip(), Normalize(ImageNet)",
        },
    ).with_image_size(image_size)


def swav(image_size: int | None = None, local_crops: int = 6, local_size: int = 96) -> Preset:
    """SwAV's multi-crop: 2 × 224, then `local_crops` local views.

    Args:
        image_size: the first view's side (None: 224); the other views keep their ratio to it.
        local_crops: local views (0: none).
        local_size: the local views' side at image_size 224.

    Returns:
        The `Preset`.
    """
    s = 1.0  # colour distortion strength, get_color_distortion(s=1.0)
    g = ViewSpec(
        scale=(0.14, 1.0),
        brightness=0.8 * s,
        contrast=0.8 * s,
        saturation=0.8 * s,
        hue=0.2 * s,
        jitter_p=0.8,
        gray_p=0.2,
        blur_p=0.5,
        count=2,
    )
    loc = dataclasses.replace(g, size=local_size, scale=(0.05, 0.14), count=int(local_crops))
    views = (g, loc) if local_crops > 0 else (g,)
    return Preset(
        "swav",
        views,
        sources={
            "paper": "Caron et al. 2020, Unsupervised Learning of Visual Features by Contrasting Cluster Assignments, "
            "Section 3.2 (multi-crop: 2 × 224 + V × 96) and Appendix A",
            "code": "facebookresearch/swav src/multicropdataset.py MultiCropDataset with "
            "scripts/swav_800ep_pretrain.sh: "
            "nmb_crops 2 6, size_crops 224 96, min_scale_crops 0.14 0.05, max_scale_crops 1 0.14; every crop: "
            "RandomResizedCrop, RandomHorizontalFlip(0.5), get_color_distortion(s=1.0) = "
            "RandomApply([ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8) + RandomGrayscale(0.2), "
            "PILRandomGaussianBlur(p=0.5, radius U(0.1, 2.0))",
            "normalization": "the code's std is (0.228, 0.224, 0.225); the ImageNet std (0.229, ...) is kept here, as "
            "in the evaluation transforms",
        },
    ).with_image_size(image_size)


PRESETS = {
    "simclr": simclr,
    "moco_v2": moco_v2,
    "byol": byol,
    "barlow": barlow,
    "vicreg": vicreg,
    "dino": dino,
    "mae": mae,
    "swav": swav,
}


def get_preset(preset, image_size: int | None = None) -> Preset:
    """A preset by name, or a given one, optionally resized.

    Args:
        preset: a name in PRESETS (any case, '-' or '_') or a `Preset`.
        image_size: see `Preset.with_image_size` (None: the preset's sizes).

    Returns:
        The `Preset`.

    Raises:
        TypeError: `preset` is neither a str nor a Preset.
        ValueError: an unknown name, or `image_size` below 1.
    """
    if isinstance(preset, Preset):
        return preset.with_image_size(image_size)
    if not isinstance(preset, str):
        raise TypeError(f"preset must be a name ({', '.join(PRESETS)}) or a Preset, got {type(preset).__name__}")
    key = preset.lower().replace("-", "_")
    if key not in PRESETS:
        raise ValueError(f"preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    return PRESETS[key](image_size)
