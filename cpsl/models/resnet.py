"""Dilated ResNet backbones in the DeepLab-v2 (Caffe) layout used by CPSL/ProDA.

Differences from torchvision's ResNet (reference ``models/deeplabv2.py``):

* ``Bottleneck`` puts the stride on the 1x1 ``conv1`` (Caffe style); ``conv2`` (3x3) has stride 1 and
  padding = dilation.
* The stem max-pool uses ``ceil_mode=True`` (512x896 in gives 65x113 out, not 64x112).
* ``layer3`` and ``layer4`` keep stride 1 and use dilation 2 and 4: output stride 8.
* A first block gets a downsample (1x1 conv + norm) whenever its stride, width or dilation changes; with
  Bottleneck blocks that is every first block, as in the reference.

Parameter names (``conv1``, ``bn1``, ``layerL.B.{conv1,bn1,...}``, ``layerL.0.downsample.{0,1}``) match
torchvision, so ImageNet state dicts load by name (see ``cpsl.models.weights``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn

NormLayer = Callable[[int], nn.Module]

# block type and number of blocks per stage
ARCHS: dict[str, tuple[str, tuple[int, int, int, int]]] = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
}


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34 block); the stride is on ``conv1``, both convs use ``dilation``."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None, norm_layer: NormLayer = nn.BatchNorm2d) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)
        self.bn1 = norm_layer(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 (stride here, Caffe style) -> 3x3 (dilated, stride 1) -> 1x1 expanding by 4."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None, norm_layer: NormLayer = nn.BatchNorm2d) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False)
        self.bn1 = norm_layer(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = norm_layer(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = norm_layer(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """Stem + four stages, output stride 8 (stages 3 and 4 dilated by 2 and 4).

    ``base_width`` is the stem width and the width of stage 1 (64 in the standard networks); stages
    2-4 use 2x, 4x and 8x. ``out_channels`` is the width of ``layer4``'s output.
    """

    def __init__(self, arch: str = "resnet101", base_width: int = 64,
                 norm_layer: NormLayer = nn.BatchNorm2d) -> None:
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"unknown backbone {arch!r} (expected one of {', '.join(ARCHS)})")
        kind, layers = ARCHS[arch]
        block = Bottleneck if kind == "bottleneck" else BasicBlock
        self.arch = arch
        self._norm_layer = norm_layer
        self.inplanes = base_width
        self.conv1 = nn.Conv2d(3, base_width, 7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(base_width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)
        self.layer1 = self._make_layer(block, base_width, layers[0], stride=1, dilation=1)
        self.layer2 = self._make_layer(block, base_width * 2, layers[1], stride=2, dilation=1)
        self.layer3 = self._make_layer(block, base_width * 4, layers[2], stride=1, dilation=2)
        self.layer4 = self._make_layer(block, base_width * 8, layers[3], stride=1, dilation=4)
        self.out_channels = base_width * 8 * block.expansion

    def _make_layer(self, block: type[nn.Module], planes: int, blocks: int, stride: int,
                    dilation: int) -> nn.Sequential:
        norm_layer = self._norm_layer
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion or dilation != 1:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride=stride, bias=False),
                norm_layer(planes * block.expansion),
            )
        mods = [block(self.inplanes, planes, stride, dilation, downsample, norm_layer)]
        self.inplanes = planes * block.expansion
        mods += [block(self.inplanes, planes, 1, dilation, None, norm_layer) for _ in range(1, blocks)]
        return nn.Sequential(*mods)

    def backbone_modules(self) -> list[nn.Module]:
        """The modules that ImageNet weights initialise (the 1x learning-rate group)."""
        return [self.conv1, self.bn1, self.layer1, self.layer2, self.layer3, self.layer4]

    def forward_backbone(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_backbone(x)


def iter_norm_modules(model: nn.Module) -> Iterator[nn.Module]:
    """Every BatchNorm-like module (BatchNorm1d/2d/3d, SyncBatchNorm) in ``model``."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            yield m
