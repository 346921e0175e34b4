"""Stage 1 of CPSL: class-balanced pixel-level self-labeling (spec 3.5, the reference ``CustomModel.step``).

One iteration (B target crops, each with its source crop; all maps of the target live on the *quarter grid*,
1/4 of the crop: 128 x 224 for a 512 x 896 crop, pixel (i, j) at the centre of the crop's 4x4 cell; ``up`` is
the bilinear ``align_corners=True`` upsampling of the student's outputs, as in every stage and the reference)::

    1. L_src  = CE(up(G(xs)), ys)                                  backward at once (as the reference)
    2. CutMix with probability cutmix_p: one box (``rand_bbox``, half the crop's area) for the whole batch,
       source pixels pasted into the weak target crops; the box's labels become the source labels
    3. EMA network Ge (no grad) on the FULL target image -> features f and logits o on the full-image grid,
       carried into the weak crop on the quarter grid with ``full_to_weak_batch`` (exact, at their resolution)
    4. rectified labels  y = argmax_k softmax_k(cos(f, Pe_k) / tau) * soft_k    (``rectify``; soft = the stored
       warm-up soft pseudo label, carried into the weak crop by the data loader: ``SoftLabelExtras``)
    5. L_CTS  = alpha CE + beta RCE (symmetric CE, ``sce_loss``) of up(G(xt_mixed)) against y (CutMix-pasted);
       up() puts the student's stride-8 samples (sample i on crop pixel 8i) 1.07 px on average and at most 2.5 px
       (per axis, at 512 x 896) from the label cells' centres; align_corners=False would give 2.00 / 4.4 px
    6. L_SL   = class-balanced self-labeling of the learnable prototypes P on pixels sampled from the EMA maps,
       with Sinkhorn over feature / logit queues (``cpsl.methods.sinkhorn``; ``sinkhorn_iters`` x 19 / K
       iterations, rounded up, unless ``train.reference_class_scaling``: ``losses.sinkhorn_iterations``);
       gradient to P only
    7. L_con  = pixel contrastive loss of the student's weak-crop features against the feature queue, only when
       no CutMix happened this iteration and the queue was full before the push of one of the batch's images
       (the reference's ``use_the_queue``, decided before the push: with 65536 = 64 x 4 x 256 rows, from
       iteration 65 on) (``contrastive_loss``)
       backward  L_CTS + sl_weight L_SL + contrast_weight L_con
    8. L_cons = KL(softmax(warp(cos(f, Pe))/tau) || softmax(cos(up(G(x_strong).feat), Pe)/tau)), the scores
       warped into the strong view, then the softmax (``consistency_teacher``, ``consistency_loss``); backward
       consist_weight L_cons
    9. SGD step (backbone, head, prototypes); EMA of the student's weights and of the prototypes (Pe <- P). After
       the first step Pe = P, as in the reference, whose P and Pe are one tensor until Pe's first EMA update

Reported terms: ``ce_source``, ``cts``, ``consist``, ``sl``, ``contrast``, ``loss`` (= L_CTS + consist_weight
L_cons + sl_weight L_SL + contrast_weight L_con, the reference's total without the source CE), ``cutmix`` (0/1).

Where we differ from the reference on purpose (spec 7, 9), and the switches that restore its behaviour:

* queue and contrastive labels are the labels of the sampled pixels (the reference misaligns both, item 3):
  the queue samples ``pixels_per_image`` pixels of the *weak crop's quarter grid*, where the EMA features, EMA
  logits and rectified labels all live, with one index set per image used for all three. The reference samples
  the full-image EMA grid and pairs the features with unrelated labels; ``reference_queue_labels: true``
  reproduces that (full-grid features, the crop labels stretched onto the full grid and taken unpermuted, and
  contrastive anchors on the student's own grid, one permutation per image, with labels indexed on the
  stretched map);
* queue scores with normalised prototypes (item 4; ``reference_queue_scores``) — see ``sinkhorn.py``;
* the EMA network labels in eval mode (item 6; ``ema_mode: train`` for the reference's train mode with dropout
  and batch statistics). Its buffers (BatchNorm statistics) are *copied* from the student after every step, as
  the reference does, not averaged; so in eval mode the teacher normalises the target with statistics of the
  student's weights (not its own averaged ones) and of the student's source, CutMix and strong-view passes. On
  the generated 2-class pair of #27 (``benchmarks/few_class.py``) that let the rectified labels run away from
  the class marginal within 20-60 iterations (few2 seed 2: stage 1 45.1 against 88.5 in train mode, warm-up
  78.4); the ``my_pair`` template of config.yaml therefore sets ``ema_mode: train``;
* Pe receives no gradient (item 14: the reference lets gradients accumulate in it, unused);
* the consistency teacher's scores are warped into the strong view bilinearly, with the same composed matrix
  as the image (``warp_maps_batch``); the reference samples them nearest (``label_strong_T``, item 5). Both then
  take the softmax. Measured against the exact teacher at each strong pixel's pre-image (stride-8 features
  with 40 regions of 19 classes, 64 dims, tau 0.08, 80 strong views of a 256 x 448 crop): mean total-variation
  distance 0.0012 bilinear, 0.0063 nearest (0.0071 for the softmax warped bilinearly, our former order);
  mean KL 0.0005, 0.0165 (0.0064); argmax agreement 99.93 %, 99.43 % (99.72 %);
* the stored soft labels are never upsampled to the image size (spec 6): the loader maps the (C, 129, 257)
  map straight onto the quarter grid; and the EMA maps are carried into the crop exactly at their own
  resolution instead of upsampling to 256 x 512 first;
* the pixel indices and the CutMix draw come from a generator seeded by (seed, iteration), identical on every
  rank, and the Sinkhorn/queue loop runs on the pixels gathered from all ranks: 2 processes give what 1 gives.
  The reference draws one pixel permutation per batch; we draw one per image;
* losses averaged over pixels are averaged over the valid pixels of the *global* batch (as DataParallel does);
* the student's weak and strong forward passes each get their own backward (the same gradient as one backward
  of the sum; less memory); under DDP all but the last accumulate locally (``no_sync``), so the gradients are
  all-reduced once per iteration.

``accumulate: k`` (one optimizer step over k micro-batches). Per step: the CutMix decision and box (one for the
step's images, as for one batch) and the pixel keys (drawn for all the step's images, each micro-batch takes its
rows), the SGD step, the EMA of the weights and of the prototypes, the DDP all-reduce (the last backward of
the last micro-batch). Per micro-batch, in order: the source CE (divided by the step's valid source pixels: as
one batch), the EMA teacher, the rectified labels, the queue pushes with their Sinkhorn and L_SL (image by image
as for one batch, so the same as one batch: the prototypes do not change within the step), L_CTS, the
contrastive and consistency terms. The micro-batch means (L_CTS, L_cons over valid pixels; L_SL, L_con over
images) are scaled by 1/k: L_SL equals one batch's (with ``reference_queue_labels`` each micro-batch draws its
own pixel permutation, as the reference draws one per batch); L_CTS and L_cons equal it when the micro-batches
have equal numbers of valid pixels; L_con reads the queue after its own micro-batch's pushes, not after the
whole step's, and starts when the queue was full before a push of its micro-batch. BatchNorm in train mode (the
student, and the EMA network with ``ema_mode: train``) normalises with each micro-batch's statistics.
"""

from __future__ import annotations

import contextlib
import copy
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from cpsl.config import TrainConfig
from cpsl.data.prepared import PreparedSplit
from cpsl.data.pseudo import load_soft, soft_path
from cpsl.data.transforms import (StrongParams, WeakParams, full_to_weak, full_to_weak_batch,
                                  strong_params_from_batch, warp_maps_batch, weak_params_from_batch)
from cpsl.errors import CheckpointError, ConfigError, DataError
from cpsl.inference import normalize_image
from cpsl.labels import IGNORE_INDEX
from cpsl.methods.base import Method, Micro, TrainContext, scaled, set_requires_grad
from cpsl.methods.losses import (class_divisor, logit_sinkhorn_epsilon, seg_cross_entropy, sinkhorn_iterations,
                                 upsample)
from cpsl.methods.shares import class_map
from cpsl.methods.sinkhorn import PixelQueue, safe_normalize, self_label_loss
from cpsl.models import freeze_bn, revert_sync_bn
from cpsl.train.data import _seed_int
from cpsl.train.dist import all_gather_cat, all_reduce_mean_, host_to_device
from cpsl.train.optim import build_optimizer, build_scheduler

RCE_LOG_CLAMP = 1e-4     # log clamp(onehot, 1e-4, 1): -log(1e-4) = 9.2103 per unit of wrong-class mass
RCE_PROB_CLAMP = 1e-7


# ---------------------------------------------------------------------------------------------------------
# Inputs: initial prototypes, class marginal, soft labels in the data loader


def load_prototypes(path: str | Path, n_class: int, dim: int) -> tuple[Tensor, list[int]]:
    """The initial prototypes, L2-normalised, float32 (n_class, dim), and the classes whose prototype is zero.

    ``path``: ``prototypes.pt`` of ``cpsl prototypes`` (a dict with ``"prototypes"`` [C, D]) or a bare [C, D]
    tensor (the reference's file), read with ``weights_only=True``. A class the warm-up model never predicted
    has a zero prototype: it stays zero (cosine 0 with every feature, no gradient; see ``safe_normalize``).
    """
    path = Path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConfigError(f"selflabel.prototypes: {path}: file not found") from None
    except Exception as err:  # noqa: BLE001
        raise DataError(f"{path}: not a readable prototypes file ({str(err).splitlines()[0][:200]})") from None
    protos = obj.get("prototypes") if isinstance(obj, dict) else obj
    if not isinstance(protos, Tensor) or tuple(protos.shape) != (n_class, dim):
        shape = tuple(protos.shape) if isinstance(protos, Tensor) else type(protos).__name__
        raise DataError(f"{path}: prototypes must be a [{n_class}, {dim}] tensor (model.n_class x "
                        f"model.head_channels), got {shape}")
    protos = protos.detach().float()
    if not torch.isfinite(protos).all():
        raise DataError(f"{path}: prototypes contain NaN or Inf")
    zero = [k for k in range(n_class) if float(protos[k].norm()) <= 1e-12]
    return safe_normalize(protos, dim=1), zero


def load_class_marginal(path: str | Path, n_class: int) -> Tensor:
    """The Sinkhorn class marginal: ``class_distribution.npy`` (float (C,), non-negative), renormalised, float64."""
    path = Path(path)
    try:
        arr = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise ConfigError(f"selflabel.class_dist: {path}: file not found") from None
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: not a readable .npy file ({err})") from None
    arr = np.asarray(arr, np.float64).reshape(-1)
    if arr.shape != (n_class,) or not np.isfinite(arr).all() or (arr < 0).any() or arr.sum() <= 0:
        raise DataError(f"{path}: class distribution must be {n_class} non-negative finite numbers with a positive "
                        f"sum, got shape {arr.shape}")
    return torch.from_numpy(arr / arr.sum())


class SoftLabelExtras:
    """``TrainDataset`` extras of the stage-1 target: the stored soft pseudo label carried into the weak crop.

    Returns ``{"soft": float32 (C, h, w)}`` on ``out_hw`` (the quarter grid of the crop; zero where the crop is
    padding). The file's (C, 129, 257) map (uint8 on disk) is resampled once with ``full_to_weak`` at its own
    resolution (its corner samples on the image's corner pixels, ``align_corners=True``, as the reference
    upsamples it): about 2 x C*h*w*4 bytes of memory per sample instead of the reference's C x 1024 x 2048
    floats (159-413 MB). Picklable, so DataLoader workers can run it.
    """

    def __init__(self, root: str | Path, names: Sequence[str], out_hw: tuple[int, int], n_class: int) -> None:
        self.root, self.names, self.out_hw, self.n_class = Path(root), list(names), tuple(out_hw), n_class

    def __call__(self, index: int, weak_params: WeakParams, rng: Any = None) -> dict[str, Tensor]:
        path = soft_path(self.root, self.names[index])
        soft = load_soft(path)
        if soft.shape[0] != self.n_class:
            raise DataError(f"{path}: soft label has {soft.shape[0]} classes, model.n_class is {self.n_class}")
        return {"soft": torch.from_numpy(full_to_weak(soft, weak_params, self.out_hw, src_align_corners=True))}


# ---------------------------------------------------------------------------------------------------------
# CutMix (source into target)


def rand_bbox(hw: tuple[int, int], rng: np.random.Generator | Tensor | torch.Generator,
              prop: float = 0.5) -> tuple[int, int, int, int]:
    """The reference's CutMix box ``(y1, x1, y2, x2)`` (end-exclusive) covering ``prop`` of an (H, W) image.

    ``y_prop = exp(u0 ln prop)`` in [prop, 1], ``x_prop = prop / y_prop``; sizes ``round([y_prop H, x_prop W])``;
    position ``round((shape - sizes) * [u1, u2])``. ``rng``: a numpy Generator, a torch Generator, or the three
    uniforms (u0, u1, u2) as a tensor/array.
    """
    if isinstance(rng, np.random.Generator):
        u = rng.uniform(0.0, 1.0, 3)
    elif isinstance(rng, torch.Generator):
        u = torch.rand(3, generator=rng, dtype=torch.float64).numpy()
    else:
        u = np.asarray(rng, np.float64).reshape(3)
    shape = np.asarray(hw, np.float64)
    y_prop = math.exp(float(u[0]) * math.log(prop))
    sizes = np.round(np.array([y_prop, prop / y_prop]) * shape)
    pos = np.round((shape - sizes) * u[1:3])
    y1, x1 = int(pos[0]), int(pos[1])
    return y1, x1, y1 + int(sizes[0]), x1 + int(sizes[1])


def cutmix_images(target: Tensor, source: Tensor, box: tuple[int, int, int, int]) -> Tensor:
    """A copy of ``target`` (B, 3, H, W) with ``source``'s pixels in ``box`` (the batch's inputs are untouched)."""
    y1, x1, y2, x2 = box
    out = target.clone()
    out[..., y1:y2, x1:x2] = source[..., y1:y2, x1:x2]
    return out


def grid_centres(n_out: int, n_in: int) -> Tensor:
    """Input pixel (floor) under each output pixel centre, for an output grid tiling the input (align_corners=False)."""
    return ((torch.arange(n_out, dtype=torch.float64) + 0.5) * (n_in / n_out)).floor().long().clamp_(0, n_in - 1)


def cutmix_labels(labels: Tensor, source_label: Tensor, box: tuple[int, int, int, int]) -> Tensor:
    """Labels (B, h, w) on a reduced grid of the crop, with the source labels pasted where the box is.

    A quarter-grid pixel takes the source label of the crop pixel under its centre when that pixel is in the box
    (the reference upsamples x4 nearest, pastes, and downsamples x0.25 nearest, i.e. reads the top-left crop
    pixel of each 4x4 cell; we read the cell centre, the convention of every other quarter-grid map).
    """
    h, w = labels.shape[-2:]
    hh, ww = source_label.shape[-2:]
    ys, xs = host_to_device(grid_centres(h, hh), labels.device), host_to_device(grid_centres(w, ww), labels.device)
    pasted = source_label[:, ys][:, :, xs].to(labels.dtype)
    return torch.where(box_on_grid((h, w), (hh, ww), box, labels.device)[None], pasted, labels)


def box_on_grid(grid_hw: tuple[int, int], crop_hw: tuple[int, int], box: tuple[int, int, int, int],
                device: torch.device | str) -> Tensor:
    """(h, w) bool: the cells of an (h, w) grid over an (H, W) crop whose centre pixel lies in the CutMix box."""
    (h, w), (hh, ww) = grid_hw, crop_hw
    ys, xs = host_to_device(grid_centres(h, hh), device), host_to_device(grid_centres(w, ww), device)
    y1, x1, y2, x2 = box
    return ((ys >= y1) & (ys < y2))[:, None] & ((xs >= x1) & (xs < x2))[None, :]


# ---------------------------------------------------------------------------------------------------------
# Prototype rectification, losses


def cosine_scores(feat: Tensor, prototypes: Tensor) -> Tensor:
    """``cos(feat, prototype_k)`` (B, K, h, w) for features (B, D, h, w) and prototypes (K, D)."""
    return torch.einsum("bdhw,kd->bkhw", safe_normalize(feat.float(), dim=1),
                        safe_normalize(prototypes.float(), dim=1))


def rectify(soft: Tensor, feat: Tensor, prototypes_ema: Tensor, tau: float = 0.08,
            threshold: float = 0.0) -> tuple[Tensor, Tensor]:
    """Prototype-rectified pseudo labels (the reference's ``get_prototype_weight`` + argmax).

    ``soft`` (B, K, h, w): stored soft labels on the quarter grid (0 on padding); ``feat`` (B, D, h, w): EMA
    features on the same grid. ``W = softmax_k(cos(feat, Pe_k) / tau)``, ``R = W * soft``,
    ``label = argmax_k R``; ignored (255) where ``max_k R / sum_k R < threshold`` and where ``soft`` is empty
    (crop padding). Returns ``(labels (B, h, w) long, W)``.
    """
    weights = F.softmax(cosine_scores(feat, prototypes_ema) / tau, dim=1)
    rect = weights * soft.float()
    total = rect.sum(1)
    conf, labels = rect.max(1)
    ignore = soft.float().sum(1) <= 0.5
    if threshold > 0:
        ignore |= conf < threshold * total
    return labels.masked_fill(ignore, IGNORE_INDEX), weights


def _global_count(count: Tensor) -> Tensor:
    """``count`` summed over the DDP ranks and divided by the world size (identity on one process): dividing a
    rank's local sum by it makes DDP's gradient average equal the gradient of the global mean."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        count = count.detach().clone()
        dist.all_reduce(count)
        count = count / dist.get_world_size()
    return count


def sce_loss(logits: Tensor, labels: Tensor, alpha: float = 0.1, beta: float = 1.0
             ) -> tuple[Tensor, Tensor, Tensor]:
    """Symmetric cross entropy ``alpha CE + beta RCE`` (reference ``CustomModel.rce``); returns (total, ce, rce).

    ``RCE = -sum_k p_k log clamp(onehot_k, 1e-4, 1)`` with ``p = clamp(softmax, 1e-7, 1)``, i.e. 9.2103 x the
    (clamped) probability mass off the label. Both terms are means over the valid (non-255) pixels of the
    global batch.
    """
    ce = seg_cross_entropy(logits, labels)
    valid = labels != IGNORE_INDEX
    p = F.softmax(logits.float(), dim=1).clamp(RCE_PROB_CLAMP, 1.0)
    onehot = F.one_hot(labels.masked_fill(~valid, 0), logits.shape[1]).permute(0, 3, 1, 2).float()
    rce_map = -(p * torch.log(onehot.clamp(RCE_LOG_CLAMP, 1.0))).sum(1)
    rce = (rce_map * valid).sum() / _global_count(valid.sum().float()).clamp(min=1.0)
    return alpha * ce + beta * rce, ce, rce


def consistency_loss(teacher: Tensor, valid: Tensor, student_log_probs: Tensor, divisor: float) -> Tensor:
    """``sum_valid sum_k t_k (log t_k - s_k) / (divisor * #valid)``: the per-pixel KL(t || s) averaged over the
    valid pixels (global batch) and divided by ``divisor``: K as the reference normalises it (its mask counts every
    channel), or 19 whatever K is (the default, ``losses.class_divisor``).

    Why 19: the per-pixel KL's gradient w.r.t. the student's scores is ``(s - t) / tau``, bounded independently
    of K, so dividing by K makes ``consist_weight`` 19/K times stronger per pixel with K classes than with 19
    (9.5 times for 2 classes, #27); a constant divisor keeps it the reference's strength at every K.

    ``teacher`` (B, K, h, w) probabilities (no grad), ``valid`` (B, h, w) bool, ``student_log_probs`` (B, K, h, w).
    """
    t = teacher.detach().float()
    kl = (torch.xlogy(t, t) - t * student_log_probs.float()).sum(1)
    return (kl * valid).sum() / _global_count(valid.sum().float() * divisor).clamp(min=1.0)


def consistency_teacher(scores: Tensor, in_crop: Tensor, params: Sequence[StrongParams], tau: float = 0.08
                        ) -> tuple[Tensor, Tensor]:
    """The prototype-consistency teacher in the strong view: ``softmax(warp(D) / tau)`` and its validity.

    ``scores`` D (B, K, h, w): cos(EMA features, Pe) on the weak crop's quarter grid; ``in_crop`` (B, h, w) bool
    (not padding). D is warped with the strong view's geometry (bilinear, ``warp_maps_batch``), then the softmax
    is taken, as the reference does (it warps D, then takes the softmax; it samples nearest). Returns
    ``(teacher (B, K, h, w), valid (B, h, w))``: valid = inside the image, outside the cutout, not padding.
    """
    warped, valid = warp_maps_batch(torch.cat([scores.float(), in_crop[:, None].float()], 1), params)
    return F.softmax(warped[:, :-1] / tau, dim=1), valid & (warped[:, -1] > 0.5)


class _ContrastTerms(torch.autograd.Function):
    """Per-anchor terms ``-sum_pos log_prob / (#pos + 1e-5)`` (B, n) of ``contrastive_loss``, with a written-out
    backward that recomputes the (B, n, L) logits from the anchors and the queue: between the forward and the
    backward pass nothing of size B*n*L stays alive (autograd would keep two float and two bool tensors of that
    size per image, until the iteration's backward), and each pass holds two float and two bool tensors of that
    size at a time (in-place steps). Both passes do the arithmetic autograd does on the loss as written before
    #26 (one image at a time), step for step, so values and gradients are the same bit for bit (up to the sign
    of zeros); the backward's steps, with e = exp(logit), N = sum_neg e, g = -grad / (#pos + 1e-5)::

        d/d denom = -g pos / denom,   d/d e = d/d denom + neg sum_L(d/d denom),
        d/d logit = g pos + e d/d e,  d/d anchors = (d/d logit / tau) @ queue
    """

    @staticmethod
    def _logits(anchors: Tensor, queue_feats: Tensor, tau: float) -> Tensor:
        logits = anchors @ queue_feats.t()
        logits.div_(tau)
        return logits.sub_(logits.amax(-1, keepdim=True))

    @staticmethod
    def _masks(anchor_labels: Tensor, queue_labels: Tensor) -> tuple[Tensor, Tensor]:
        """(not positive, not negative) (B, n, L): the queue rows to leave out of each sum."""
        ignored = queue_labels == IGNORE_INDEX
        same = anchor_labels[..., None] == queue_labels
        not_neg = same | ignored
        return same.logical_not_().logical_or_(ignored), not_neg

    @staticmethod
    def _n_pos(anchor_labels: Tensor, queue_labels: Tensor) -> Tensor:
        """Positives per anchor (B, n), int64: the queue rows with the anchor's label, none for an ignored anchor.
        Counted per label (labels are 0..254 or 255, ``config`` caps n_class at 255), not over a (B, n, L) mask."""
        counts = torch.zeros(IGNORE_INDEX + 1, dtype=torch.long, device=queue_labels.device)
        counts.scatter_add_(0, queue_labels.long(), (queue_labels != IGNORE_INDEX).long())   # ignored rows add 0
        return counts[anchor_labels.long()]

    @staticmethod
    def forward(ctx: Any, anchors: Tensor, anchor_labels: Tensor, queue_feats: Tensor, queue_labels: Tensor,
                tau: float) -> Tensor:
        not_pos, not_neg = _ContrastTerms._masks(anchor_labels, queue_labels)
        log_prob = _ContrastTerms._logits(anchors, queue_feats, tau)
        exp = torch.exp(log_prob)
        neg_sum = exp.masked_fill_(not_neg, 0.0).sum(-1, keepdim=True)
        del not_neg
        torch.exp(log_prob, out=exp)
        log_prob.sub_(exp.add_(neg_sum).log_())                       # logit - log(exp(logit) + neg_sum)
        del exp
        n_pos = _ContrastTerms._n_pos(anchor_labels, queue_labels) + 1e-5
        ctx.save_for_backward(anchors, anchor_labels, queue_feats, queue_labels, neg_sum, n_pos)
        ctx.tau = tau
        return -log_prob.masked_fill_(not_pos, 0.0).sum(-1) / n_pos

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        anchors, anchor_labels, queue_feats, queue_labels, neg_sum, n_pos = ctx.saved_tensors
        not_pos, not_neg = _ContrastTerms._masks(anchor_labels, queue_labels)
        g = (-(grad / n_pos))[..., None]
        exp = _ContrastTerms._logits(anchors, queue_feats, ctx.tau).exp_()
        d = torch.add(exp, neg_sum)                                      # denom
        torch.div(-g, d, out=d).masked_fill_(not_pos, 0.0)               # d/d denom
        torch.where(not_neg, d, d.sum(-1, keepdim=True), out=d)          # d/d e
        d.mul_(exp)
        d.add_(torch.where(not_pos, g.new_zeros(()), g, out=exp))       # d/d logit
        del exp
        return d.div_(ctx.tau) @ queue_feats, None, None, None, None


def contrastive_loss(anchors: Tensor, anchor_labels: Tensor, queue_feats: Tensor, queue_labels: Tensor,
                     tau: float = 0.08) -> Tensor:
    """The reference's pixel contrastive loss (``CustomModel.contrastive``), averaged over B images.

    ``anchors`` (B, n, D) L2-normalised student features with ``anchor_labels`` (B, n) (or (n, D) and (n,):
    one image); ``queue_feats`` (L, D) normalised EMA features with ``queue_labels`` (L,) (no gradient to the
    queue; its row order changes only the rounding of the sums). ``logit_j = a.q_j / tau - max_j``; negatives:
    queue rows with another label; ``log_prob_j = logit_j - log(exp(logit_j) + sum_neg exp(logit))``; per anchor
    ``-sum_pos log_prob / (#pos + 1e-5)``; per image the mean over its anchors with a valid label (0 for an image
    without one); the mean over the images. Queue rows labelled 255 are neither positives nor negatives (our
    addition; the reference has no ignored rows).

    One computation for the batch with fixed shapes: masks select and weight, so nothing waits for the device
    (no ``bool()``, no boolean-mask indexing); the (B, n, L) work is in ``_ContrastTerms``.
    """
    if anchors.dim() == 2:
        anchors, anchor_labels = anchors[None], anchor_labels[None]
    per_anchor = _ContrastTerms.apply(anchors.float(), anchor_labels, queue_feats.float().detach(), queue_labels,
                                      tau)
    valid = (anchor_labels != IGNORE_INDEX).float()
    per_image = (per_anchor * valid).sum(-1) / valid.sum(-1).clamp(min=1.0)
    return per_image.mean()


# ---------------------------------------------------------------------------------------------------------
# EMA and pixel sampling


@torch.no_grad()
def ema_update(ema: nn.Module, student: nn.Module, momentum: float) -> None:
    """``theta_ema = m theta_ema + (1 - m) theta`` for every parameter; buffers (BatchNorm running statistics,
    counters) copied from the student, as the reference does. Multi-tensor (``torch._foreach``) operations: a
    few kernel launches per dtype instead of three per tensor on a GPU; the same arithmetic as one tensor at a time."""
    ema_params, params = list(ema.parameters()), [p.detach() for p in student.parameters()]
    torch._foreach_mul_(ema_params, momentum)
    torch._foreach_add_(ema_params, params, alpha=1.0 - momentum)
    buffers = list(ema.buffers())
    if buffers:   # a network without BatchNorm (MiT: LayerNorm / GroupNorm only) has none
        torch._foreach_copy_(buffers, list(student.buffers()))


def sample_indices(keys: Tensor, valid: Tensor, n: int) -> Tensor:
    """(B, n) pixel indices: the n valid pixels with the smallest random ``keys`` (B, P); invalid pixels only
    when an image has fewer than n valid ones. ``keys`` in [0, 1)."""
    order = torch.argsort(keys + 2.0 * (~valid).to(keys.dtype), dim=1, stable=True)
    return order[:, :n]


def take_pixels(maps: Tensor, idx: Tensor) -> Tensor:
    """Rows of ``maps`` (B, C, h, w) or (B, h, w) at flat pixel indices ``idx`` (B, n): (B*n, C) or (B*n,)."""
    if maps.dim() == 3:
        return maps.flatten(1).gather(1, idx).reshape(-1)
    flat = maps.flatten(2)
    return flat.gather(2, idx[:, None, :].expand(-1, flat.shape[1], -1)).permute(0, 2, 1).reshape(-1, flat.shape[1])


# ---------------------------------------------------------------------------------------------------------
# The method


class SelfLabel(Method):
    """CPSL stage 1 (see the module docstring). Checkpoint entries beyond the base method: ``ema_model``,
    ``prototypes`` (P), ``prototypes_ema`` (Pe) and ``queues`` (``PixelQueue.state_dict``)."""

    name = "stage1"

    def __init__(self, cfg: TrainConfig, ctx: TrainContext) -> None:
        super().__init__(cfg, ctx)
        sl, o = cfg.selflabel, cfg.optim
        for key in ("soft_labels", "prototypes", "class_dist"):
            if getattr(sl, key) is None:
                raise ConfigError(f"selflabel.{key}: required for stage 'stage1'")
        n_class, dim = cfg.model.n_class, cfg.model.head_channels
        self.quarter = (int(cfg.data.crop[0]) // 4, int(cfg.data.crop[1]) // 4)
        target = PreparedSplit(cfg.data.target)
        extras = SoftLabelExtras(sl.soft_labels, target.names, self.quarter, n_class)
        self.domains = {"source": {"label": True},
                        "target": {"label": False, "views": ("weak", "strong", "full"), "extras": extras}}

        # plain BatchNorm in the teacher: it labels each rank's own images, with no collectives (SyncBN would
        # all_gather in every BatchNorm layer of every train-mode forward)
        self.ema = revert_sync_bn(copy.deepcopy(self.student))
        set_requires_grad(self.ema, False)
        self.nets["ema_model"] = self.ema

        init, zero = load_prototypes(sl.prototypes, n_class, dim)
        if zero and ctx.dist.is_main:
            print(f"cpsl train: stage1: {len(zero)} class(es) with a zero initial prototype stay inert (cosine 0): "
                  f"{zero}", file=sys.stderr, flush=True)
        self.zero_prototypes = zero
        self.prototypes = nn.Parameter(init.clone().to(ctx.device))
        self.prototypes_ema = init.clone().to(ctx.device)
        self.marginal = load_class_marginal(sl.class_dist, n_class).to(ctx.device)
        self.queue = PixelQueue(sl.queue_length, dim, n_class, ctx.device)
        self.share_monitor(self.marginal)

        # The base optimizer again, plus the prototypes' group (reference: 5x lr for head and prototypes).
        self.optimizer = build_optimizer(self.student, o,
                                         extra_groups=[("prototypes", [self.prototypes], sl.proto_lr_mult)])
        self.optimizers["optimizer"] = self.optimizer
        self.schedulers["student"] = build_scheduler(self.optimizer, cfg.max_iters, o)

    # -- per iteration ------------------------------------------------------------------------------------
    def train_mode(self) -> None:
        super().train_mode()
        self.ema.train(self.cfg.selflabel.ema_mode == "train")
        if self.cfg.freeze_bn:
            freeze_bn(self.ema)

    def iteration_generator(self, iteration: int) -> torch.Generator:
        """The CPU generator of this iteration's CutMix draw and pixel samples: a function of (seed, iteration)
        only, so every rank (and a resumed run) draws the same."""
        return torch.Generator().manual_seed(_seed_int(self.cfg.seed, 11, iteration))

    def _world(self) -> tuple[int, int]:
        return self.ctx.dist.rank, self.ctx.dist.world_size

    def begin_step(self, batches: list[dict[str, dict[str, Any]]]) -> dict[str, Tensor]:
        """The step's draws, for all its micro-batches: one CutMix decision and box, and the pixel keys of the
        step's images (global batch order: micro-batch, rank, image), so that the k micro-batches draw what one
        k times larger batch draws."""
        counts = super().begin_step(batches)
        rank, world = self._world()
        shape = batches[0]["target"]["image"].shape
        n_images = shape[0] * world * len(batches)
        gen = self.iteration_generator(self.schedulers["student"].last_epoch)
        cutmix = bool(torch.rand(1, generator=gen).item() < self.cfg.selflabel.cutmix_p)
        box = rand_bbox(tuple(shape[-2:]), gen)
        qh, qw = self.quarter
        keys_queue = torch.rand(n_images, qh * qw, generator=gen)
        keys_anchor = torch.rand(n_images, qh * qw, generator=gen)
        self._draws = (gen, cutmix, box, keys_queue, keys_anchor)
        return counts

    def forward_backward(self, batch: dict[str, dict[str, Any]], micro: Micro) -> dict[str, Any]:
        sl = self.cfg.selflabel
        src, tgt = batch["source"], batch["target"]
        rank, world = self._world()
        b = tgt["image"].shape[0]
        b_global = b * world
        gen, cutmix, box, keys_queue, keys_anchor = self._draws
        rows = slice((micro.index * world + rank) * b, (micro.index * world + rank + 1) * b)
        keys_queue = host_to_device(keys_queue[rows], self.ctx.device)
        keys_anchor = host_to_device(keys_anchor[rows], self.ctx.device)
        # under DDP, the backward passes before the last one accumulate their gradients locally (no_sync): one
        # all-reduce of the sum per iteration instead of one per backward pass
        local = contextlib.ExitStack()
        if isinstance(self.net, nn.parallel.DistributedDataParallel):
            local.enter_context(self.net.no_sync())

        # 1. source cross-entropy, backward at once
        with self.amp.autocast():
            ps = upsample(self.net(src["image"])["out"], src["label"].shape[-2:])
            ce_src = seg_cross_entropy(ps, src["label"], count=micro.count_for("label/source"))
        self.amp.backward(ce_src)
        del ps

        # 3-4. EMA teacher on the full image, carried into the weak crop; rectified labels
        weak = weak_params_from_batch(tgt["weak_params"])
        with torch.no_grad():
            with self.amp.autocast():
                ema_out = self.ema(normalize_image(tgt["image_full"]))
            ema_feat, ema_logits = ema_out["feat"].float(), ema_out["out"].float()
            f_weak = full_to_weak_batch(ema_feat, weak, self.quarter)
            labels, _ = rectify(tgt["soft"], f_weak, self.prototypes_ema, sl.tau, sl.train_threshold)

        # 6a. pixel samples for the queues (aligned features, logits and labels), gathered over the ranks
        with torch.no_grad():
            if sl.reference_queue_labels:
                q_feats, q_logits, q_labels, stretched = self._reference_samples(ema_feat, ema_logits, labels, gen)
            else:
                o_weak = full_to_weak_batch(ema_logits, weak, self.quarter)
                idx = sample_indices(keys_queue, labels.flatten(1) != IGNORE_INDEX, sl.pixels_per_image)
                q_feats = safe_normalize(take_pixels(f_weak, idx), dim=1)
                q_logits = safe_normalize(take_pixels(o_weak, idx), dim=1)
                q_labels = take_pixels(labels, idx)
            q_feats, q_logits, q_labels = (all_gather_cat(t.contiguous()) for t in (q_feats, q_logits, q_labels))

        # 2 + 5. CutMix and the student on the weak crop: L_CTS
        if sl.consist_weight <= 0:
            local.close()  # the last backward of the iteration
        x = tgt["image"]
        train_labels = labels
        if cutmix:
            x = cutmix_images(x, src["image"], box)
            train_labels = cutmix_labels(labels, src["label"], box)
        with self.amp.autocast():
            so = self.net(x)
        out_q = upsample(so["out"].float(), self.quarter)
        # class shares of the student's prediction and of its rectified labels, on the target pixels (not the
        # CutMix box, not padding)
        shown = labels != IGNORE_INDEX
        if cutmix:
            shown = shown & ~box_on_grid(self.quarter, tuple(x.shape[-2:]), box, x.device)[None]
        self.shares.add(class_map(out_q.detach()), labels, shown)
        if sl.sce:
            l_cts, _, _ = sce_loss(out_q, train_labels, sl.sce_alpha, sl.sce_beta)
        else:
            l_cts = seg_cross_entropy(out_q, train_labels)

        # 6b. class-balanced self-labeling of P over the global batch (every rank the same). The contrastive term
        # runs when the queue is full before the push of some image of the batch, i.e. before the last one's
        # (the reference's use_the_queue), not after this iteration's pushes: it starts one iteration later.
        contrast_ready = self.queue.filled + (b_global - 1) * sl.pixels_per_image >= self.queue.length
        l_sl, _ = self_label_loss(q_feats, q_logits, q_labels, self.prototypes, self.queue, self.marginal,
                                  n_images=b_global, tau=sl.tau, epsilon=sl.epsilon,
                                  iters=sinkhorn_iterations(sl.sinkhorn_iters, self.cfg.model.n_class,
                                                            self.cfg.reference_class_scaling),
                                  reference_scores=sl.reference_queue_scores,
                                  logit_epsilon=logit_sinkhorn_epsilon(sl.epsilon, self.cfg.model.n_class,
                                                                       self.cfg.reference_class_scaling))

        # 7. pixel contrastive term (queue full before a push of this batch, no CutMix)
        l_con = out_q.new_zeros(())
        if contrast_ready and not cutmix and sl.contrast_weight > 0:
            l_con = self._contrastive(so["feat"], labels, keys_anchor, gen if sl.reference_queue_labels else None,
                                      stretched if sl.reference_queue_labels else None)
        self.amp.backward(scaled(l_cts + sl.sl_weight * l_sl + sl.contrast_weight * l_con, micro.scale))
        del so, out_q

        # 8. prototype consistency on the strong view
        l_cons = torch.zeros((), device=self.ctx.device)
        if sl.consist_weight > 0:
            with torch.no_grad():
                teacher, valid = consistency_teacher(cosine_scores(f_weak, self.prototypes_ema),
                                                     tgt["soft"].float().sum(1) > 0.5,
                                                     strong_params_from_batch(tgt["strong_params"]), sl.tau)
            local.close()  # the last backward of the iteration
            with self.amp.autocast():
                ss = self.net(tgt["image_strong"])
            feat_s = upsample(ss["feat"].float(), self.quarter)
            log_s = F.log_softmax(cosine_scores(feat_s, self.prototypes_ema) / sl.tau, dim=1)
            l_cons = consistency_loss(teacher, valid, log_s,
                                      class_divisor(self.cfg.model.n_class, self.cfg.reference_class_scaling))
            # 0 x logits: the classifier takes part in every backward (DDP without find_unused_parameters)
            self.amp.backward(scaled(sl.consist_weight * l_cons + 0.0 * ss["out"].float().sum(), micro.scale))
            del ss

        total = l_cts + sl.consist_weight * l_cons + sl.sl_weight * l_sl + sl.contrast_weight * l_con
        m = micro.scale
        return {"ce_source": ce_src.detach(), "cts": scaled(l_cts.detach(), m),
                "consist": scaled(l_cons.detach(), m), "sl": scaled(l_sl.detach(), m),
                "contrast": scaled(l_con.detach(), m), "loss": scaled(total.detach(), m), "cutmix": float(cutmix)}

    def optimizer_step(self) -> None:
        sl = self.cfg.selflabel
        iteration = self.schedulers["student"].last_epoch
        # 9. optimizer step, then the EMAs. After the first step Pe = P: the reference initialises P and Pe with
        # one tensor, so its Pe takes P's first step (its EMA update then makes a new tensor). P is outside DDP:
        # average its gradient over the ranks (they agree as long as every rank computes the same L_SL; this keeps
        # them together if they ever do not)
        if self.prototypes.grad is not None:
            all_reduce_mean_(self.prototypes.grad)
        self.amp.step(self.optimizer)
        m = sl.ema_momentum
        ema_update(self.ema, self.student, m)
        with torch.no_grad():
            if iteration == 0:
                self.prototypes_ema.copy_(self.prototypes.detach())
            else:
                self.prototypes_ema.mul_(m).add_(self.prototypes.detach(), alpha=1.0 - m)

    def _contrastive(self, student_feat: Tensor, labels: Tensor, keys: Tensor, gen: torch.Generator | None,
                     stretched: Tensor | None) -> Tensor:
        """Mean over this rank's images of ``contrastive_loss`` with ``pixels_per_image`` anchors each.

        Default: anchors on the quarter grid (student features upsampled there, align_corners=True), labelled by
        the rectified labels of the same pixels. Reference mode: anchors on the student's own grid, one permutation
        per image (as the reference's loop draws them; drawn for the global batch, each rank takes its images'
        rows), labels read at the same flat indices of the crop labels stretched onto the full-image grid
        (misaligned, spec 7 item 3). The queue is read in queue order (newest first), as the shifting queue was:
        the same float sums (a copy of the feature queue per iteration; the pushes copy nothing).
        """
        n = self.cfg.selflabel.pixels_per_image
        if stretched is None:
            feat = upsample(student_feat.float(), self.quarter)
            idx = sample_indices(keys, labels.flatten(1) != IGNORE_INDEX, n)
            anchors = safe_normalize(take_pixels(feat, idx), dim=1)
            a_labels = take_pixels(labels, idx)
        else:
            feat = student_feat.float()
            b, hw = feat.shape[0], feat.shape[-2] * feat.shape[-1]
            rank, world = self._world()
            perms = torch.stack([torch.randperm(hw, generator=gen)[:n] for _ in range(b * world)])
            idx = host_to_device(perms[rank * b:(rank + 1) * b], feat.device)
            anchors = safe_normalize(take_pixels(feat, idx), dim=1)
            a_labels = stretched.flatten(1).gather(1, idx.clamp(max=stretched[0].numel() - 1)).reshape(-1)
        return contrastive_loss(anchors.reshape(-1, n, anchors.shape[-1]), a_labels.reshape(-1, n),
                                self.queue.newest_first(self.queue.feats), self.queue.newest_first(self.queue.labels),
                                self.cfg.selflabel.tau)

    def _reference_samples(self, ema_feat: Tensor, ema_logits: Tensor, labels: Tensor, gen: torch.Generator
                           ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The reference's queue samples (``reference_queue_labels``): one permutation of the full-image EMA grid
        shared by the batch for the features and logits, and the first n entries (unpermuted) of the crop labels
        stretched (nearest) onto that grid. Returns (feats, logits, labels, stretched labels)."""
        n = self.cfg.selflabel.pixels_per_image
        hf, wf = ema_feat.shape[-2:]
        perm = torch.randperm(hf * wf, generator=gen)[:n].to(ema_feat.device)
        idx = perm[None].expand(ema_feat.shape[0], -1)
        stretched = F.interpolate(labels[:, None].float(), size=(hf, wf), mode="nearest")[:, 0].long()
        feats = safe_normalize(take_pixels(ema_feat, idx), dim=1)
        logits = safe_normalize(take_pixels(ema_logits, idx), dim=1)
        q_labels = stretched.flatten(1)[:, :n].reshape(-1)
        return feats, logits, q_labels, stretched

    # -- checkpoints ------------------------------------------------------------------------------------
    def state_dict(self, full: bool = True) -> dict[str, Any]:
        """The base entries (student, ``ema_model``; optimizer and scheduler when ``full``) plus ``prototypes``,
        ``prototypes_ema`` and the ``queues``. The queues are in the final checkpoint too (about 69 MB at the
        paper's 65536 x (256 + 19) floats, next to 2 x 260 MB of networks): they are the state of the
        class-balanced assignment, which the multi-process tests compare and one may want to inspect."""
        state = super().state_dict(full)
        state["prototypes"] = self.prototypes.detach().clone()
        state["prototypes_ema"] = self.prototypes_ema.detach().clone()
        state["queues"] = self.queue.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any], path: Any = "checkpoint", resumable: bool = True) -> None:
        for k in ("prototypes", "prototypes_ema", "queues"):
            if k not in state:
                raise CheckpointError(f"{path}: no {k!r} entry (not a resumable stage1 checkpoint)")
        super().load_state_dict(state, path, resumable)
        for name, t in (("prototypes", self.prototypes), ("prototypes_ema", self.prototypes_ema)):
            if tuple(state[name].shape) != tuple(t.shape):
                raise CheckpointError(f"{path}: {name} has shape {tuple(state[name].shape)}, expected {tuple(t.shape)}")
            with torch.no_grad():
                t.copy_(state[name])
        try:
            self.queue.load_state_dict(state["queues"])
        except (KeyError, ValueError) as err:
            raise CheckpointError(f"{path}: bad queues entry ({err})") from None
