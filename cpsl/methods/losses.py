"""Loss functions shared by the training methods (plain torch, device-agnostic)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from cpsl.labels import IGNORE_INDEX

SOURCE_LABEL = 0.0  # domain labels of the reference's discriminator (spec 3.0)
TARGET_LABEL = 1.0


def upsample(logits: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """Bilinear upsampling of network outputs to the crop size, ``align_corners=True`` as in the reference."""
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=True)


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def seg_cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Pixel cross-entropy averaged over the valid (non-ignored) pixels of the whole *global* batch.

    On one process this is ``F.cross_entropy(..., ignore_index)`` with mean reduction (but 0, not NaN, when
    every pixel is ignored). Under DDP the valid-pixel count is summed over the ranks, and the local sum is
    divided by ``count / world_size``: after DDP averages the gradients, they equal those of the mean over
    the global batch, as the reference's DataParallel computes it, whatever the per-rank counts are.
    """
    loss_sum = F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="sum")
    return global_mean(loss_sum, (target != ignore_index).sum())


def global_mean(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """``total / count`` where ``count`` is the per-rank number of valid pixels: under DDP the count is summed
    over the ranks and the local sum divided by ``count / world_size``, so that the averaged gradients equal
    those of the mean over the global batch. At least one pixel, so an all-ignored batch gives 0.
    """
    count = count.to(total.dtype)
    world = _world_size()
    if world > 1:
        count = count.detach().clone()
        dist.all_reduce(count)
        count = count / world
    return total / count.clamp(min=1.0)


def gan_loss(d_out: torch.Tensor, label: float, kind: str = "LS") -> torch.Tensor:
    """Discriminator loss against a constant domain label: ``LS`` MSE or ``vanilla`` BCE-with-logits."""
    d_out = d_out.float()
    target = torch.full_like(d_out, float(label))
    if kind == "LS":
        return F.mse_loss(d_out, target)
    if kind == "vanilla":
        return F.binary_cross_entropy_with_logits(d_out, target)
    raise ValueError(f"unknown GAN loss {kind!r} (expected 'LS' or 'vanilla')")
