"""Loss functions shared by the training methods (plain torch, device-agnostic)."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from cpsl.labels import IGNORE_INDEX

SOURCE_LABEL = 0.0  # domain labels of the reference's discriminator (spec 3.0)
TARGET_LABEL = 1.0

# Class-count scaling (#27). The reference's weights were tuned for K = 19 classes (GTA5 -> Cityscapes), and
# two of its terms carry an explicit factor of K: a sum over classes divided by K (the prototype-consistency KL,
# the reference KD term) and the Sinkhorn temperature of the logit branch (logits L2-normalised over K). By
# default (``train.reference_class_scaling: false``) both are scaled as for 19 classes whatever K is, so that a
# weight means the same per pixel for 2 and for 19 classes and equals the reference's at K = 19; with the switch
# (the paper presets) they follow the actual K, as the reference does. Every other stage-1/2/3 term is free of K
# already; per term, what bounds its per-pixel scale:
#   CE (source, CTS, pseudo labels, SCE's alpha term), KD ``kl``, L_SL (CE against Sinkhorn assignments): the
#     gradient w.r.t. the logits is p - q, a difference of two distributions, whatever K is;
#   SCE's reverse term: -sum_k p_k log clamp(onehot_k, 1e-4) = 9.21 (1 - p_y), the mass off the label, in [0, 9.21]
#     for any K;
#   tau (rectification, consistency, L_SL) and the contrastive temperature divide cosine similarities of
#     D-dimensional features, which do not involve K;
#   rectification: an argmax of softmax(cos / tau) x soft, whose pairwise ratios exp((c_k - c_j) / tau) do not
#     involve K; ``train_threshold`` is a top-class share (floor 1/K), 0 (off) by default;
#   Sinkhorn, feature branch: cosine scores, as tau. The contrastive term's positives are the queue rows of the
#     anchor's class: their number follows the class *shares* (the data's balance), not K.
# A third K-dependent quantity is not a loss scale but the Sinkhorn's rate of convergence: with a fixed number of
# iterations, the class-balanced assignment meets its class marginal far less closely with 2 classes than with
# 19, so stage 1's class balancing stops working on a few-class pair (``sinkhorn_iterations``).
REFERENCE_N_CLASS = 19


def class_divisor(n_class: int, reference: bool) -> float:
    """What a per-pixel sum over the K classes is divided by: K as the reference does (``reference``), else 19.

    A KL or KD term summed over classes has a per-pixel gradient w.r.t. the logits bounded independently of K
    (``s - t`` for the KL); dividing by K makes it 19/K times stronger with K classes than with 19. Dividing by
    the constant 19 keeps the per-pixel scale of a weight independent of K and equal to the reference's at 19.
    """
    return float(n_class) if reference else float(REFERENCE_N_CLASS)


def logit_sinkhorn_epsilon(epsilon: float, n_class: int, reference: bool) -> float:
    """The Sinkhorn epsilon of stage 1's logit branch: ``epsilon`` (``reference``), else ``epsilon sqrt(19/K)``.

    The logit rows are L2-normalised over the K classes, so an entry is about 1/sqrt(K) of the rows' RMS and the
    score gaps that epsilon divides scale as 1/sqrt(K): at a fixed epsilon the assignment is sqrt(19/K) times
    sharper with K classes than with 19 (3.1 times for 2). ``epsilon sqrt(19/K)`` keeps gap / epsilon at its
    19-class value (and is ``epsilon`` itself at K = 19). The feature branch needs nothing: cosine similarities to
    the prototypes do not depend on K.
    """
    return float(epsilon) if reference else float(epsilon) * math.sqrt(REFERENCE_N_CLASS / n_class)


def sinkhorn_iterations(iters: int, n_class: int, reference: bool) -> int:
    """Stage 1's Sinkhorn iterations: ``iters`` (``reference``), else ``ceil(iters 19 / K)``.

    Why (#27). The Sinkhorn is a fixed-point iteration on the class potentials ``g_k = epsilon log u_k``,
    ``g_k <- g_k + epsilon log(r_k / m_k(g))``, where ``m_k`` is the mean assignment of class k and ``r`` the
    class marginal. Linearised about its solution, the error of the potentials is multiplied per iteration by
    ``I - diag(1/r) C``, with ``C_kj = mean_n q_nk (delta_kj - q_nj)`` the covariance of the pixels'
    assignments (epsilon cancels): what moves a class total toward its marginal is the assignment mass that
    pixels hold outside their top class. Let every pixel's K - 1 competitors lie a score gap Delta below its
    class, ``a = exp(-Delta / epsilon)`` small, and the classes have equal shares ``1/K``. Then
    ``diag(1/r) C`` has ``2 (K - 1) a`` on its diagonal and ``-2 a`` off it, and every error that keeps the
    total mass (orthogonal to the ones vector) shrinks by ``1 - lambda`` per iteration with ``lambda = 2 K a``:
    ``T`` iterations leave ``(1 - 2 K a)^T``, about ``exp(-2 K a T)``. At the same score gaps the contraction
    of T iterations therefore depends on K T, and the reference's 3 iterations, set at K = 19, correspond to
    ``3 x 19 / K``: 29 for 2 classes (rounded up), 19 for 3, 3 at 19 (the reference's, bit for bit). With 3
    iterations a 2-class pair gets ``exp(-12 a)`` where 19 classes get ``exp(-114 a)``: its class balancing
    barely acts. Measured (``tests/test_class_scaling.py``): gap 0.3, epsilon 0.05, a marginal tilted by 2 %
    from the assignment: 3 iterations at 19 classes leave 0.76 of the class-total error, 29 at 2 classes 0.71,
    3 at 2 classes 0.97. On stage 1 of the generated 2-class pair (``benchmarks/few_class.py``, few2 seed 0,
    the features separated after the drift of #27): 3 iterations give the minority class 0.41 of the queue's
    assignment against a marginal of 0.13, so L_SL pulls the prototypes *with* the drift; 50 give 0.13.
    """
    if reference:
        return int(iters)
    return int(math.ceil(iters * REFERENCE_N_CLASS / n_class - 1e-9))


def upsample(logits: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """Bilinear upsampling of network outputs to the crop size, ``align_corners=True`` as in the reference."""
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=True)


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def seg_cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                      count: torch.Tensor | None = None) -> torch.Tensor:
    """Pixel cross-entropy averaged over the valid (non-ignored) pixels of the whole *global* batch.

    On one process this is ``F.cross_entropy(..., ignore_index)`` with mean reduction (but 0, not NaN, when
    every pixel is ignored). Under DDP the valid-pixel count is summed over the ranks, and the local sum is
    divided by ``count / world_size``: after DDP averages the gradients, they equal those of the mean over
    the global batch, as the reference's DataParallel computes it, whatever the per-rank counts are.
    ``count``: divide by this (per-rank) count instead of ``target``'s own: the valid pixels of every
    micro-batch of an accumulated step (``cpsl.methods.base.Micro``).
    """
    loss_sum = F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="sum")
    return global_mean(loss_sum, (target != ignore_index).sum() if count is None else count)


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
