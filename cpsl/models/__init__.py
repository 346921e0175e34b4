"""Networks: DeepLab-v2 (ResNet-101/50/18 backbones), SegFormer (MiT-B0..B5 backbones, cpsl.models.mit), the
warm-up discriminator, init weights, checkpoints.

``build_model(cfg)`` is the one entry point for the segmentation network (``model_stride`` /
``model_output_size``: its output grid, 8 for DeepLab-v2 and 4 for MiT); ``place`` puts a network on its
device; ``freeze_bn``, ``convert_sync_bn`` and ``revert_sync_bn`` are the BatchNorm helpers the training code
applies.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from cpsl.config import ModelConfig
from cpsl.models.deeplabv2 import DeepLabV2
from cpsl.models import deeplabv2, mit
from cpsl.models.discriminator import FCDiscriminator, build_discriminator
from cpsl.models.mit import SegFormer
from cpsl.models.resnet import iter_norm_modules
from cpsl.models.weights import load_init_weights

__all__ = ["DeepLabV2", "FCDiscriminator", "SegFormer", "build_discriminator", "build_model", "convert_sync_bn",
           "freeze_bn", "model_output_size", "model_stride", "place", "revert_sync_bn", "uses_channels_last"]

log = logging.getLogger(__name__)


def build_model(cfg: ModelConfig, key: str = "model") -> DeepLabV2 | SegFormer:
    """Build the network described by ``cfg`` and, if ``cfg.init`` is set, load those initial weights.

    ``key`` is the config key used in error messages (``model.init: file not found: ...``). The init report
    (``{file, loaded, missing, unexpected}``) is kept as ``model.init_report`` (None without ``init``).
    BatchNorm is plain ``nn.BatchNorm2d``; call ``convert_sync_bn`` under DDP.
    """
    if cfg.is_mit:
        model = SegFormer(cfg.backbone, cfg.n_class, cfg.head_channels, cfg.mit_depths, cfg.mit_widths,
                          cfg.decoder_channels, cfg.dropout, cfg.drop_path)
    else:
        model = DeepLabV2(backbone=cfg.backbone, n_class=cfg.n_class, base_width=cfg.base_width,
                          head_channels=cfg.head_channels, bn_pretrain=cfg.bn_pretrain,
                          aspp_dilations=tuple(cfg.aspp_dilations), dropout=cfg.dropout)
    model.init_report = None
    if cfg.init_file is not None:
        model.init_report = load_init_weights(model, cfg.init_file, cfg.init_format, key=f"{key}.init")
    return model


def model_stride(cfg: ModelConfig) -> int:
    """The output stride of the network ``cfg`` describes: 8 (DeepLab-v2) or 4 (MiT)."""
    return mit.STRIDE if cfg.is_mit else 8


def model_output_size(cfg: ModelConfig, size: int) -> int:
    """The network's output side for an input side of ``size`` pixels (129 for 1024 on DeepLab-v2, 256 on MiT)."""
    return mit.output_size(size) if cfg.is_mit else deeplabv2.output_size(size)


def uses_channels_last(setting: bool | str, device: torch.device | str) -> bool:
    """Whether a network goes into the channels_last memory format: the ``channels_last`` setting of a training
    stage (true / false), or ``auto``: on CUDA only."""
    if setting == "auto":
        return torch.device(device).type == "cuda"
    return bool(setting)


def place(model: nn.Module, device: torch.device | str, channels_last: bool | str = "auto") -> nn.Module:
    """``model`` on ``device``, in the channels_last memory format when ``uses_channels_last(channels_last,
    device)`` (by default on CUDA: cuDNN's fast layout for bf16 / fp16 convolutions; the inputs follow the
    weights), and on CUDA with cuDNN's autotuner on (``cudnn.benchmark``: the crops have fixed shapes and the
    dilated convolutions have several algorithms). By default on the CPU the model is only moved, so CPU results
    stay those of the NCHW layout."""
    model = model.to(device)
    if torch.device(device).type == "cuda":
        torch.backends.cudnn.benchmark = True
    if uses_channels_last(channels_last, device):
        model = model.to(memory_format=torch.channels_last)
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


def revert_sync_bn(model: nn.Module) -> nn.Module:
    """Replace every ``nn.SyncBatchNorm`` by an ``nn.BatchNorm2d`` holding the same parameters, buffers, mode and
    ``requires_grad`` (the inverse of ``convert_sync_bn``); returns the model. For networks that must not take
    part in collectives: stage 1's EMA teacher runs its forward passes on each rank's own images."""
    if isinstance(model, nn.SyncBatchNorm):
        bn = nn.BatchNorm2d(model.num_features, model.eps, model.momentum, model.affine,
                            model.track_running_stats)
        if model.affine:
            bn.weight, bn.bias = model.weight, model.bias
        if model.track_running_stats:
            bn.running_mean, bn.running_var = model.running_mean, model.running_var
            bn.num_batches_tracked = model.num_batches_tracked
        bn.train(model.training)
        return bn
    for name, child in model.named_children():
        new = revert_sync_bn(child)
        if new is not child:
            setattr(model, name, new)
    return model
