"""DeepLab-v2 with the CPSL/ProDA ASPP head (``Classifier_Module2``), on a dilated ResNet.

Layout and state-dict names follow the reference ``models/deeplabv2.py`` so that the released checkpoints
load with ``strict=True``::

    conv1, bn1, layer1..layer4           dilated ResNet (cpsl.models.resnet), output stride 8
    bn_pretrain                          optional BatchNorm(C) after layer4 (reference ``bn_clr``)
    layer5.conv2d_list.0                 [Conv1x1(C, H, bias), GroupNorm(G, H), ReLU]
    layer5.conv2d_list.1..4              [Conv3x3(C, H, dilation=padding=d, bias), GroupNorm, ReLU], d=6,12,18,24
    layer5.bottleneck                    [SEBlock(5H, r=16), Conv3x3(5H, H, bias), GroupNorm(G, H)]  (no ReLU)
    layer5.head                          [Dropout2d(0.1), Conv1x1(H, n_class, bias=False)]

with C = 2048 for ResNet-50/101 and 8*base_width for ResNet-18, H = ``head_channels`` (256) and
G = the largest divisor of H that is at most 32 (32 for H = 256).

``forward(x)`` returns ``{"out": logits (B, n_class, h, w), "feat": H-d features after Dropout2d}`` at 1/8
resolution (ceil-mode stem: 512x896 gives 65x113, 1024x2048 gives 129x257).

Initialisation reproduces the reference's *effective* init (spec 2.1): every Conv2d weight ~ N(0, 0.01)
(backbone, ASPP, bottleneck and classifier alike), BatchNorm weight 1 / bias 0, the bottleneck conv bias 0,
other conv biases (ASPP) and the GroupNorm and SE Linear layers keep torch's default init.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from cpsl.models.resnet import NormLayer, ResNet

ASPP_DILATIONS = (6, 12, 18, 24)


def gn_groups(channels: int, max_groups: int = 32) -> int:
    """The largest number of GroupNorm groups <= ``max_groups`` that divides ``channels``."""
    return max(g for g in range(1, min(max_groups, channels) + 1) if channels % g == 0)


class SEBlock(nn.Module):
    """Squeeze-and-excitation: x * sigmoid(W2 relu(W1 GAP(x))), with ``se`` = [Linear, ReLU, Linear, Sigmoid]."""

    def __init__(self, channels: int, r: int = 16) -> None:
        super().__init__()
        hidden = max(1, channels // r)
        self.global_pool = nn.AdaptiveAvgPool2d((1, 1))
        self.se = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(inplace=True),
                                nn.Linear(hidden, channels), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.se(self.global_pool(x).flatten(1))
        return x * w[:, :, None, None]


class ASPPHead(nn.Module):
    """The reference ``Classifier_Module2``: parallel dilated branches, SE bottleneck, dropout + classifier."""

    def __init__(self, in_channels: int, n_class: int, channels: int = 256,
                 dilations: tuple[int, ...] = ASPP_DILATIONS, dropout: float = 0.1) -> None:
        super().__init__()
        groups = gn_groups(channels)
        branches = [nn.Sequential(nn.Conv2d(in_channels, channels, 1, bias=True),
                                  nn.GroupNorm(groups, channels), nn.ReLU(inplace=True))]
        for d in dilations:
            branches.append(nn.Sequential(nn.Conv2d(in_channels, channels, 3, padding=d, dilation=d, bias=True),
                                          nn.GroupNorm(groups, channels), nn.ReLU(inplace=True)))
        self.conv2d_list = nn.ModuleList(branches)
        cat = channels * len(branches)
        self.bottleneck = nn.Sequential(SEBlock(cat, 16), nn.Conv2d(cat, channels, 3, padding=1, bias=True),
                                        nn.GroupNorm(groups, channels))
        self.head = nn.Sequential(nn.Dropout2d(dropout), nn.Conv2d(channels, n_class, 1, bias=False))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = torch.cat([branch(x) for branch in self.conv2d_list], dim=1)
        feat = self.head[0](self.bottleneck(out))
        return {"feat": feat, "out": self.head[1](feat)}


class DeepLabV2(ResNet):
    """DeepLab-v2: dilated ResNet (this class's own conv1..layer4) + optional ``bn_pretrain`` + ``layer5``."""

    def __init__(self, backbone: str = "resnet101", n_class: int = 19, base_width: int = 64,
                 head_channels: int = 256, bn_pretrain: bool = False,
                 aspp_dilations: tuple[int, ...] = ASPP_DILATIONS, dropout: float = 0.1,
                 norm_layer: NormLayer = nn.BatchNorm2d) -> None:
        super().__init__(backbone, base_width, norm_layer)
        self.n_class = n_class
        self.bn_pretrain = norm_layer(self.out_channels) if bn_pretrain else None
        self.layer5 = ASPPHead(self.out_channels, n_class, head_channels, tuple(aspp_dilations), dropout)
        reset_parameters(self)

    @property
    def feat_channels(self) -> int:
        return self.layer5.head[1].in_channels

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.forward_backbone(x)
        if self.bn_pretrain is not None:
            x = self.bn_pretrain(x)
        return self.layer5(x)

    def backbone_parameters(self) -> list[nn.Parameter]:
        """conv1, bn1, layer1-4: the reference's 1x group (each parameter once; see spec 2.3 defect 1)."""
        return [p for m in self.backbone_modules() for p in m.parameters()]

    def head_parameters(self) -> list[nn.Parameter]:
        """layer5 and bn_pretrain (if present): the reference's 10x group."""
        mods = [self.layer5] + ([self.bn_pretrain] if self.bn_pretrain is not None else [])
        return [p for m in mods for p in m.parameters()]


def reset_parameters(model: DeepLabV2) -> None:
    """The reference's effective init: all convs N(0, 0.01); BN 1/0; bottleneck conv bias 0; rest default."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, 0.0, 0.01)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            if m.weight is not None:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
    nn.init.zeros_(model.layer5.bottleneck[1].bias)


def output_size(size: int) -> int:
    """Spatial output size of the network for an input side of ``size`` pixels (stride 8, ceil-mode pool)."""
    after_conv1 = (size + 2 * 3 - 7) // 2 + 1
    after_pool = math.ceil((after_conv1 + 2 * 1 - 3) / 2) + 1
    if (after_pool - 1) * 2 >= after_conv1 + 1:  # torch drops a last window that starts in the right padding
        after_pool -= 1
    return (after_pool - 1) // 2 + 1
