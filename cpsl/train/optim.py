"""SGD with the reference's parameter groups, and the poly learning-rate schedule.

Groups (spec §2.3): the backbone (conv1, bn1, layer1-4) at ``lr * backbone_lr_mult``; the head (layer5 and
``bn_pretrain``) at ``lr * head_lr_mult`` (10 in warm-up and KD, 5 in stage 1); extra groups (the learnable
prototypes in stage 1) at their own multipliers. Momentum 0.9 and weight decay 2e-4 on every group.

The reference lists every backbone parameter about three times in its optimizer (a duplicate-parameter bug),
which makes the effective backbone learning rate and weight decay about 3x nominal. We list each parameter
once; the paper presets set ``backbone_lr_mult: 3.0`` to reproduce the reference's effective behaviour.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

HEAD_PREFIXES = ("layer5.", "bn_pretrain.")


def split_backbone_head(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Trainable parameters of a DeepLab model split by name: (backbone, head)."""
    backbone, head = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (head if name.startswith(HEAD_PREFIXES) else backbone).append(p)
    return backbone, head


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
    """``max(1 - t / max_iters, 0) ** power``: t is the number of optimizer steps already taken.

    The factor is clamped at 0, so stepping past ``max_iters`` keeps the learning rate at 0 (the reference
    computes a complex number there and crashes). A class, not a lambda, so LambdaLR can save its state.
    """

    def __init__(self, max_iters: int, power: float = 0.9):
        if max_iters <= 0:
            raise ValueError(f"max_iters must be > 0 (got {max_iters})")
        self.max_iters = max_iters
        self.power = power

    def __call__(self, t: int) -> float:
        return max(1.0 - t / self.max_iters, 0.0) ** self.power


def poly_scheduler(optimizer: torch.optim.Optimizer, max_iters: int, power: float = 0.9):
    """LambdaLR applying PolyFactor to every group's initial learning rate; step once per iteration."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, PolyFactor(max_iters, power))
