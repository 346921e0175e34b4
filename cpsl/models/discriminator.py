"""The output-space discriminator of the warm-up stage (reference ``models/discriminator.py:FCDiscriminator``).

Four 3x3 convs with stride 2 and padding 1 (widths w, 2w, 4w, 8w; w = 64 in the reference), ReLU after the
first three, LeakyReLU(0.2) after the fourth, then a 1x1 conv to one channel. A 512x896 input gives 32x56.
Parameter names (``conv1``..``conv4``, ``classifier``) match the reference, so its state dict loads strictly.
Torch's default init is kept, as in the reference.
"""

from __future__ import annotations

import torch
from torch import nn


class FCDiscriminator(nn.Module):
    """Fully-convolutional discriminator on ``in_channels``-channel maps (softmax outputs: ``n_class``)."""

    def __init__(self, in_channels: int, width: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(width, width * 2, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(width * 2, width * 4, 3, stride=2, padding=1)
        self.conv4 = nn.Conv2d(width * 4, width * 8, 3, stride=2, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.leaky_relu = nn.LeakyReLU(0.2, inplace=True)
        self.classifier = nn.Conv2d(width * 8, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.conv1(x))
        x = self.relu(self.conv2(x))
        x = self.relu(self.conv3(x))
        x = self.leaky_relu(self.conv4(x))
        return self.classifier(x)


def build_discriminator(n_class: int, width: int = 64) -> FCDiscriminator:
    """The warm-up discriminator for ``n_class``-channel softmax maps."""
    return FCDiscriminator(n_class, width)
