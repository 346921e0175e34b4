"""SGD (or AdamW) with the reference's parameter groups, and the poly learning-rate schedule with an optional
linear warm-up.

Groups (spec §2.3): the backbone (conv1, bn1, layer1-4) at ``lr * backbone_lr_mult``; the head (layer5 and
``bn_pretrain``) at ``lr * head_lr_mult`` (10 in warm-up and KD, 5 in stage 1); extra groups (the learnable
prototypes in stage 1) at their own multipliers. Momentum 0.9 and weight decay 2e-4 on every group.

The reference lists every backbone parameter about three times in its optimizer (a duplicate-parameter bug),
which makes the effective backbone learning rate and weight decay about 3x nominal. We list each parameter
once; the paper presets set ``backbone_lr_mult: 3.0`` to reproduce the reference's effective behaviour.

The transformer recipe (``build_optimizer`` with ``optim.name: adamw``): AdamW, the same backbone/head groups,
and with ``norm_decay_mult`` != 1 the normalisation layers' parameters in groups of their own
(``backbone_norm``, ``head_norm``) with weight decay ``weight_decay * norm_decay_mult`` (DAFormer: 0). MiT has
no position-embedding tensors (its Mix-FFN depth-wise convolution is the position information), so there is
no separate position-embedding group. ``warmup_iters``: linear warm-up (mmcv's rule) times the poly factor.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

HEAD_PREFIXES = ("layer5.", "bn_pretrain.")
NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)


def split_backbone_head(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Trainable parameters of a DeepLab model split by name: (backbone, head)."""
    backbone, head = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (head if name.startswith(HEAD_PREFIXES) else backbone).append(p)
    return backbone, head


def norm_parameter_ids(model: nn.Module) -> set[int]:
    """ids of the parameters of every LayerNorm / GroupNorm / BatchNorm in ``model``."""
    return {id(p) for m in model.modules() if isinstance(m, NORM_TYPES) for p in m.parameters(recurse=False)}


def param_groups(model: nn.Module, lr: float, *, head_lr_mult: float = 10.0, backbone_lr_mult: float = 1.0,
                 extra_groups: Iterable[tuple[str, Iterable[nn.Parameter], float]] = (),
                 weight_decay: float = 0.0, norm_decay_mult: float = 1.0) -> list[dict]:
    """Named groups ``backbone``, ``head`` (and ``backbone_norm`` / ``head_norm`` when ``norm_decay_mult`` is
    not 1), then each ``(name, params, lr_mult)`` of extra_groups; empty groups left out."""
    backbone, head = split_backbone_head(model)
    groups = []
    if norm_decay_mult != 1.0:
        norms = norm_parameter_ids(model)
        for name, params, mult in (("backbone", backbone, backbone_lr_mult), ("head", head, head_lr_mult)):
            groups.append({"name": name, "params": [p for p in params if id(p) not in norms], "lr": lr * mult})
            groups.append({"name": f"{name}_norm", "params": [p for p in params if id(p) in norms],
                           "lr": lr * mult, "weight_decay": weight_decay * norm_decay_mult})
    else:
        groups += [{"name": "backbone", "params": backbone, "lr": lr * backbone_lr_mult},
                   {"name": "head", "params": head, "lr": lr * head_lr_mult}]
    for name, params, mult in extra_groups:
        groups.append({"name": name, "params": list(params), "lr": lr * mult})
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, o: Any,
                    extra_groups: Iterable[tuple[str, Iterable[nn.Parameter], float]] = ()) -> torch.optim.Optimizer:
    """The optimizer an ``OptimConfig`` describes: SGD (momentum) or AdamW (betas), over ``param_groups``."""
    groups = param_groups(model, o.lr, head_lr_mult=o.head_lr_mult, backbone_lr_mult=o.backbone_lr_mult,
                          extra_groups=extra_groups, weight_decay=o.weight_decay, norm_decay_mult=o.norm_decay_mult)
    if o.name == "adamw":
        return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
    return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, max_iters: int, o: Any):
    """Poly decay (``o.poly_power``) with ``o.warmup_iters`` steps of linear warm-up from ``o.warmup_ratio``."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, PolyFactor(max_iters, o.poly_power, o.warmup_iters, o.warmup_ratio))


def build_sgd(
    model: nn.Module,
    lr: float,
    *,
    head_lr_mult: float = 10.0,
    backbone_lr_mult: float = 1.0,
    extra_groups: Iterable[tuple[str, Iterable[nn.Parameter], float]] = (),
    momentum: float = 0.9,
    weight_decay: float = 2e-4,
) -> torch.optim.SGD:
    """SGD over named groups ``backbone``, ``head`` and each ``(name, params, lr_mult)`` in extra_groups."""
    backbone, head = split_backbone_head(model)
    groups = [
        {"name": "backbone", "params": backbone, "lr": lr * backbone_lr_mult},
        {"name": "head", "params": head, "lr": lr * head_lr_mult},
    ]
    for name, params, mult in extra_groups:
        groups.append({"name": name, "params": list(params), "lr": lr * mult})
    groups = [g for g in groups if g["params"]]
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)


class PolyFactor:
    """``max(1 - t / max_iters, 0) ** power``: t is the number of optimizer steps already taken; for
    t < ``warmup_iters`` times ``1 - (1 - t / warmup_iters) (1 - warmup_ratio)`` (mmcv's linear warm-up).

    The factor is clamped at 0, so stepping past ``max_iters`` keeps the learning rate at 0 (the reference
    computes a complex number there and crashes). A class, not a lambda, so LambdaLR can save its state.
    """

    def __init__(self, max_iters: int, power: float = 0.9, warmup_iters: int = 0, warmup_ratio: float = 1e-6):
        if max_iters <= 0:
            raise ValueError(f"max_iters must be > 0 (got {max_iters})")
        self.max_iters = max_iters
        self.power = power
        self.warmup_iters = warmup_iters
        self.warmup_ratio = warmup_ratio

    def __call__(self, t: int) -> float:
        factor = max(1.0 - t / self.max_iters, 0.0) ** self.power
        if t < self.warmup_iters:
            factor *= 1.0 - (1.0 - t / self.warmup_iters) * (1.0 - self.warmup_ratio)
        return factor


def poly_scheduler(optimizer: torch.optim.Optimizer, max_iters: int, power: float = 0.9):
    """LambdaLR applying PolyFactor to every group's initial learning rate; step once per iteration."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, PolyFactor(max_iters, power))
