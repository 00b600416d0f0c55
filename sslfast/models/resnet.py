"""ResNets as SSL backbones (He et al., 2016), parameter names as torchvision's so weights load both ways.

`forward(x)` returns the pooled features [B, num_features] (no classifier). `small_stem=True` replaces the
7×7/2 conv + max-pool by one 3×3/1 conv (the CIFAR variant of SimCLR §B.9, solo-learn's `cifar=True`) for
images of 64 px and less; by default it is chosen from `image_size`.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(inplanes, planes, stride, self.expansion)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)  # stride on the 3×3 (ResNet v1.5)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(inplanes, planes, stride, self.expansion)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def _downsample(inplanes, planes, stride, expansion):
    if stride == 1 and inplanes == planes * expansion:
        return None
    return nn.Sequential(
        nn.Conv2d(inplanes, planes * expansion, 1, stride, bias=False), nn.BatchNorm2d(planes * expansion)
    )


class ResNet(nn.Module):
    """ResNet trunk: stem, four stages, global average pool; `num_features` is the pooled width.

    Args:
        block: `BasicBlock` (expansion 1) or `Bottleneck` (expansion 4).
        layers: blocks per stage (four ints).
        widths: the stages' base planes.
        in_chans: input channels.
        small_stem: one 3×3/1 conv instead of the 7×7/2 conv + max-pool (images of 64 px and less).
        zero_init_residual: zero the last BN's scale of every block (each starts as the identity).
    """

    def __init__(
        self,
        block,
        layers,
        *,
        widths=(64, 128, 256, 512),
        in_chans: int = 3,
        small_stem: bool = False,
        zero_init_residual: bool = True,
    ):
        super().__init__()
        self.small_stem = small_stem
        w0 = widths[0]
        if small_stem:
            self.conv1 = nn.Conv2d(in_chans, w0, 3, 1, 1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_chans, w0, 7, 2, 3, bias=False)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.bn1 = nn.BatchNorm2d(w0)
        self.relu = nn.ReLU(inplace=True)
        inplanes = w0
        for i, (planes, n) in enumerate(zip(widths, layers)):
            blocks = []
            for j in range(n):
                blocks.append(block(inplanes, planes, 2 if (j == 0 and i > 0) else 1))
                inplanes = planes * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.num_features = inplanes
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:  # Goyal et al. 2017; used by SimCLR, BYOL, Barlow Twins
            for m in self.modules():
                last = getattr(m, "bn3", None) if isinstance(m, Bottleneck) else getattr(m, "bn2", None)
                if isinstance(m, (BasicBlock, Bottleneck)):
                    nn.init.zeros_(last.weight)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's feature map [B, C, h, w]."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.avgpool(self.forward_features(x)), 1)


def _small(image_size, small_stem):
    return small_stem if small_stem is not None else (image_size is not None and image_size <= 64)


def resnet18(*, image_size: int | None = None, small_stem: bool | None = None, in_chans: int = 3, **kw) -> ResNet:
    """ResNet-18 (basic blocks 2-2-2-2, 512 features).

    Args:
        image_size: the training resolution; picks `small_stem` (64 px and less) when that is None.
        small_stem: force the small (True) or the ImageNet (False) stem.
        in_chans: input channels.
        **kw: further `ResNet` arguments (`zero_init_residual`).

    Returns:
        The `ResNet`.
    """
    return ResNet(BasicBlock, (2, 2, 2, 2), in_chans=in_chans, small_stem=_small(image_size, small_stem), **kw)


def resnet50(*, image_size: int | None = None, small_stem: bool | None = None, in_chans: int = 3, **kw) -> ResNet:
    """ResNet-50 (bottlenecks 3-4-6-3, 2048 features).

    Args:
        image_size: the training resolution; picks `small_stem` (64 px and less) when that is None.
        small_stem: force the small (True) or the ImageNet (False) stem.
        in_chans: input channels.
        **kw: further `ResNet` arguments (`zero_init_residual`).

    Returns:
        The `ResNet`.
    """
    return ResNet(Bottleneck, (3, 4, 6, 3), in_chans=in_chans, small_stem=_small(image_size, small_stem), **kw)


def resnet_tiny(*, image_size: int | None = None, small_stem: bool | None = None, in_chans: int = 3, **kw) -> ResNet:
    """A ResNet-10 of width 16 (stages 16-32-64-128, one basic block each, 128 features): the CPU
    backbone of the embedded-data demo; ~0.3 M parameters.

    Args:
        image_size: the training resolution; picks `small_stem` (64 px and less) when that is None.
        small_stem: force the small (True) or the ImageNet (False) stem.
        in_chans: input channels.
        **kw: further `ResNet` arguments (`zero_init_residual`).

    Returns:
        The `ResNet`.
    """
    return ResNet(
        BasicBlock,
        (1, 1, 1, 1),
        widths=(16, 32, 64, 128),
        in_chans=in_chans,
        small_stem=_small(image_size, small_stem),
        **kw,
    )
