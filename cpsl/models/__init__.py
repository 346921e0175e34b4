"""Networks: DeepLab-v2 (ResNet-101/50/18 backbones), the warm-up discriminator, init weights, checkpoints.

``build_model(cfg)`` is the one entry point for the segmentation network; ``freeze_bn`` and
``convert_sync_bn`` are the BatchNorm helpers the training code applies.
"""

from __future__ import annotations

import logging

from torch import nn

from cpsl.config import ModelConfig
from cpsl.models.deeplabv2 import DeepLabV2
from cpsl.models.discriminator import FCDiscriminator, build_discriminator
from cpsl.models.resnet import iter_norm_modules
from cpsl.models.weights import load_init_weights

__all__ = ["DeepLabV2", "FCDiscriminator", "build_discriminator", "build_model", "convert_sync_bn", "freeze_bn"]

log = logging.getLogger(__name__)


def build_model(cfg: ModelConfig, key: str = "model") -> DeepLabV2:
    """Build the network described by ``cfg`` and, if ``cfg.init`` is set, load those initial weights.

    ``key`` is the config key used in error messages (``model.init: file not found: ...``). The init report
    (``{file, loaded, missing, unexpected}``) is kept as ``model.init_report`` (None without ``init``).
    BatchNorm is plain ``nn.BatchNorm2d``; call ``convert_sync_bn`` under DDP.
    """
    model = DeepLabV2(backbone=cfg.backbone, n_class=cfg.n_class, base_width=cfg.base_width,
                      head_channels=cfg.head_channels, bn_pretrain=cfg.bn_pretrain,
                      aspp_dilations=tuple(cfg.aspp_dilations), dropout=cfg.dropout)
    model.init_report = None
    if cfg.init_file is not None:
        model.init_report = load_init_weights(model, cfg.init_file, cfg.init_format, key=f"{key}.init")
    return model


def freeze_bn(model: nn.Module) -> nn.Module:
    """Put every BatchNorm in eval mode and stop gradients to its affine parameters (reference --freeze_bn).

    ``model.train()`` switches BatchNorm back to train mode, so apply this after every ``train()`` call.
    """
    for m in iter_norm_modules(model):
        m.eval()
        for p in m.parameters(recurse=False):
            p.requires_grad_(False)
    return model


def convert_sync_bn(model: nn.Module) -> nn.Module:
    """Replace BatchNorm layers by ``nn.SyncBatchNorm`` (for DDP on GPUs); returns the converted model."""
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)
