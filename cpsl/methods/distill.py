"""Stages 2 and 3 (spec 3.6, the reference's ``CustomModel.step_distillation``): hard pseudo labels + KD.

One iteration, with ``x`` the target image the student sees (the strong view ``image_strong`` by default, the
weak crop with ``distill.strong_view: false``)::

    ce_source = CE(up(G(xs)), ys)                                  source weak crop, crop resolution
    y         = hard pseudo label of the target crop at 1/label_stride of the crop, warped into x's view
    ce_pseudo = CE(up(G(x)), y)                                    255 (low confidence / outside / cutout) ignored
    kd        = KD(up(T(x)), up(G(x)))                             teacher T: previous stage, eval, no grad
    loss      = ce_source + ce_pseudo + distill.kd_weight * kd     one backward, one SGD step

``up`` is the bilinear ``align_corners=True`` upsampling of the logits (``losses.upsample``), as in every stage.

Hard pseudo labels (``cpsl pseudo-hard`` folder of the previous stage's model, flip-averaged, spec 3.2) are read
per sample by ``HardLabelExtras`` in the data workers, carried into the weak crop exactly like the image's
label (``transforms.weak_label``: the same nearest resize, crop with 255 padding and flip as ``apply_weak``), with
the confidence threshold applied there (``pseudo.threshold_hard``: ``conf <= threshold`` -> 255).
They reach the batch as ``pseudo_label`` (uint8, crop size). In ``step`` they are reduced to
1/``label_stride`` of the crop by taking the pixel under each cell's centre (``downsample_labels``; the
reference takes each cell's top-left pixel with ``F.interpolate(nearest)``), then warped into the strong view
with the recorded geometry at that resolution (``transforms.warp_maps_batch``, ``onehot`` label mode; 255
outside the image and in the cutout box). ``label_stride: 4`` (default) is the reference's 128x224 for a
512x896 crop; ``1`` computes both terms on the full crop.

KD term (``distill.kd_mode``), teacher and student logits both upsampled to the label resolution:

* ``kl`` (default, correct): ``KL(t || s) = sum_k t_k (log t_k - log s_k)`` with ``log_softmax`` on both, summed
  over classes and averaged over the *valid* pixels: those showing image content (the strong view's validity
  mask: inside the frame and outside the cutout box; the in-image part of the weak crop without the strong
  view). Under DDP the count is the global one, like ``seg_cross_entropy``. Zero iff student == teacher.
* ``reference`` (paper presets, spec 7 item 2): the reference's ``F.kl_div(softmax(s), softmax(t), 'none')``
  summed and divided by the element count ``B*C*H*W``, i.e. ``sum t (log t - p_s) / (B C H W)`` with ``p_s``
  the student's *probability* (not its log). Its gradient is ``-t / (B C H W)`` per element: KD is
  effectively off, and the term can be negative. No mask (the reference's mask ``teacher != 250`` is always 1).

Networks. The student is built by ``Method`` (``build_student``): stage 2 from ``model.init`` (SimCLRv2 with
``model.bn_pretrain: true`` and a new head) or from ``init_checkpoint`` (a whole network: the demo's stage-2
student is the stage-1 model), random init when neither is configured; stage 3 from ``init_checkpoint`` (the
stage-2 model). ``check_model_fits`` refuses a ``model.bn_pretrain`` mismatch with ``init_checkpoint``. The
teacher is ``distill.teacher`` loaded by ``load_teacher``: its architecture, ``bn_pretrain`` included, comes
from its checkpoint's ``model_config`` (no user flag; the reference's ``--ema_bn`` trap cannot happen). It is in
eval mode, has no gradients, is not in any optimizer and not in the resumable checkpoint (it is reloaded from
its file; ``describe`` records its path and ``bn_pretrain``).

Differences from the reference, on purpose:

* the teacher sees the same image as the student; the reference always feeds it ``img_strong``, even when the
  student trains on the weak crop (``--S_pseudo 0``);
* the strong-view labels use the corrected warp (``transforms``: ops in the order applied, x shifts by the
  width, one composed resampling shared with the image) and the cell-centre downsampling above;
* the two CE terms and KD are summed and back-propagated once (the reference backpropagates ``ce_source``
  first to free memory: the same gradients);
* ``kl`` mode is the corrected KD (the paper presets select ``reference``).

``accumulate: k``: the pseudo targets of the step's k micro-batches are built first (``step_counts``), so that
both CE terms and the ``kl`` KD divide by the valid pixels of the whole step: with frozen BatchNorm the step
equals one of a k times larger batch (``tests/test_accumulate.py``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cpsl.config import TrainConfig
from cpsl.data import pseudo
from cpsl.data.prepared import PreparedSplit
from cpsl.data.transforms import (WeakParams, full_to_weak_batch, strong_params_from_batch, warp_maps_batch,
                                  weak_label, weak_params_from_batch)
from cpsl.errors import ConfigError, DataError
from cpsl.inference import load_model_from_checkpoint
from cpsl.labels import IGNORE_INDEX
from cpsl.methods.base import Method, Micro, TrainContext, scaled, set_requires_grad
from cpsl.methods.losses import class_divisor, global_mean, seg_cross_entropy, upsample
from cpsl.methods.shares import class_map
from cpsl.methods.selflabel import load_class_marginal
from cpsl.train.dist import host_to_device

KD_MODES = ("kl", "reference")


# ---------------------------------------------------------------------------------------------------------
# Hard pseudo labels in the data pipeline


def check_hard_labels(root: str | Path, split: PreparedSplit, n_class: int, key: str = "distill.hard_labels"
                      ) -> dict[str, Any]:
    """Check a ``cpsl pseudo-hard`` folder against the target split before training; returns its meta.json.

    It must be a hard-label folder (``kind: hard``) for ``n_class`` classes with a label and a confidence file
    for every sample of the split. Errors are ConfigError / DataError naming ``key`` and the folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"{key}: folder not found: {root}")
    try:
        meta = json.loads((root / "meta.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{root}: no meta.json (is {key} the output folder of `cpsl pseudo-hard`?)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{root / 'meta.json'}: corrupt ({err})") from None
    if not isinstance(meta, dict) or meta.get("kind") != "hard":
        raise DataError(f"{root}: {key} is not a hard pseudo-label folder (meta.json kind "
                        f"{meta.get('kind') if isinstance(meta, dict) else None!r}, expected 'hard')")
    if int(meta.get("n_class", n_class)) != n_class:
        raise ConfigError(f"{key}: {root} has {meta['n_class']} classes, model.n_class is {n_class}")
    for name in split.names:
        paths = pseudo.hard_paths(root, name)
        for kind in ("label", "conf"):
            if not paths[kind].is_file():
                raise DataError(f"{root}: no hard pseudo label for target sample {name!r} ({paths[kind].name} "
                                f"missing); was {key} made from data.target ({split.root})?")
    return meta


class HardLabelExtras:
    """``TrainDataset`` extras: the thresholded hard pseudo label of sample ``index`` in its weak crop.

    Returns ``{"pseudo_label": uint8 tensor (crop h, crop w)}``; pixels with confidence ``<= threshold``, and the
    crop's padding, are 255. Picklable (DataLoader workers).
    """

    def __init__(self, root: str | Path, names: Sequence[str], threshold: float) -> None:
        self.root, self.names, self.threshold = Path(root), list(names), float(threshold)

    def __call__(self, index: int, params: WeakParams, rng: np.random.Generator) -> dict[str, Any]:
        name = self.names[index]
        label = pseudo.load_hard(self.root, name)
        if label.shape != tuple(params.orig_hw):
            raise DataError(f"{pseudo.hard_paths(self.root, name)['label']}: hard pseudo label is "
                            f"{label.shape[0]}x{label.shape[1]}, the image is {params.orig_hw[0]}x"
                            f"{params.orig_hw[1]} (made from another split or at another size?)")
        conf = pseudo.load_hard_conf(self.root, name)
        if conf.shape != label.shape:
            raise DataError(f"{pseudo.hard_paths(self.root, name)['conf']}: shape {conf.shape} differs from the "
                            f"label's {label.shape}")
        # crop both maps first, then threshold: the same pixels as thresholding the whole map (load_hard)
        crop = pseudo.threshold_hard(weak_label(label, params), weak_label(conf, params), self.threshold)
        return {"pseudo_label": torch.from_numpy(crop)}


# ---------------------------------------------------------------------------------------------------------
# Labels at the training resolution


def label_size(crop_hw: Sequence[int], stride: int) -> tuple[int, int]:
    """The pseudo-label resolution for a crop: ``(H // stride, W // stride)``, at least 1x1."""
    return max(1, int(crop_hw[0]) // stride), max(1, int(crop_hw[1]) // stride)


def downsample_labels(labels: torch.Tensor, out_hw: tuple[int, int]) -> torch.Tensor:
    """(B, H, W) labels -> (B, h, w): output pixel (i, j) takes the crop pixel under its centre
    ``((i + 0.5) H / h, (j + 0.5) W / w)`` (the ``align_corners=False`` grid the strong-view warp assumes).

    The reference's ``F.interpolate(nearest, 0.25)`` takes each cell's top-left pixel instead (1.5 px off).
    """
    h_in, w_in = labels.shape[-2:]
    h, w = out_hw
    if (h, w) == (h_in, w_in):
        return labels
    ys = ((torch.arange(h, device=labels.device) * 2 + 1) * h_in) // (2 * h)
    xs = ((torch.arange(w, device=labels.device) * 2 + 1) * w_in) // (2 * w)
    return labels[:, ys][:, :, xs]


def weak_valid_mask(params: Sequence[WeakParams], out_hw: tuple[int, int], device: torch.device) -> torch.Tensor:
    """(B, h, w) bool: the output pixels of each weak crop that lie inside the scaled image (not padding)."""
    ones = torch.ones(len(params), 1, 1, 1)
    inside = full_to_weak_batch(ones, params, out_hw, src_align_corners=False)
    return host_to_device(inside[:, 0] > 0.5, device)


def pseudo_targets(target: dict[str, Any], stride: int, strong_view: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The CE targets (long (B, h, w), 255 = ignore) and the KD mask (bool (B, h, w)) of a target batch.

    ``target`` holds ``pseudo_label`` (uint8 (B, H, W), the weak crop), ``weak_params`` and, for the strong
    view, ``strong_params``. The labels are reduced to 1/``stride`` of the crop and, with ``strong_view``,
    warped into the strong view (``warp_maps_batch``: 255 and mask False outside the image and in the cutout).
    """
    labels = target["pseudo_label"]
    out_hw = label_size(labels.shape[-2:], stride)
    small = downsample_labels(labels, out_hw)
    if strong_view:
        warped, valid = warp_maps_batch(small, strong_params_from_batch(target["strong_params"]))
        return warped.long(), valid
    valid = weak_valid_mask(weak_params_from_batch(target["weak_params"]), out_hw, labels.device)
    return small.long(), valid


# ---------------------------------------------------------------------------------------------------------
# KD terms


def kd_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
          valid: torch.Tensor | None = None, count: torch.Tensor | None = None) -> torch.Tensor:
    """``KL(teacher || student)`` per pixel (summed over classes), averaged over the valid pixels of the global
    batch (the ``seg_cross_entropy`` normalisation under DDP); 0 when no pixel is valid. ``count``: divide by
    this count of valid pixels instead (those of an accumulated step's micro-batches).

    Both arguments are logits (B, C, h, w) at the same resolution; the teacher's carry no gradient. Computed in
    float32 on log-probabilities (``log_softmax``), so it is exactly 0 when the logits are equal.
    """
    log_s = F.log_softmax(student_logits.float(), dim=1)
    log_t = F.log_softmax(teacher_logits.detach().float(), dim=1)
    per_pixel = (log_t.exp() * (log_t - log_s)).sum(1)
    if valid is None:
        valid = torch.ones_like(per_pixel, dtype=torch.bool)
    return global_mean((per_pixel * valid).sum(), valid.sum() if count is None else count)


def kd_reference(student_logits: torch.Tensor, teacher_logits: torch.Tensor, divisor: float) -> torch.Tensor:
    """The reference's KD term: ``F.kl_div(softmax(s), softmax(t), reduction='none')`` summed over classes and
    averaged over the ``B*H*W`` pixels, divided by ``divisor``: C, i.e. the reference's mean over the element count
    ``B*C*H*W``, with ``train.reference_class_scaling`` (the paper presets), or 19 whatever C is (the default,
    ``losses.class_divisor``): ``sum t (log t - p_s) / (B H W divisor)`` with ``p_s`` a probability (spec 7
    item 2). Its per-pixel gradient w.r.t. the student's logits, ``-p_j (t_j - t.p) / divisor``, has a class sum
    bounded independently of C, so dividing by C made a weight 19/C times stronger with C classes. Kept for the
    paper presets; not a divergence (it is not 0 for equal inputs and can be negative).
    """
    p_s = F.softmax(student_logits.float(), dim=1)
    p_t = F.softmax(teacher_logits.detach().float(), dim=1)
    return F.kl_div(p_s, p_t, reduction="none").sum() / (p_s[:, 0].numel() * divisor)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, valid: torch.Tensor | None,
            mode: str = "kl", divisor: float | None = None, count: torch.Tensor | None = None) -> torch.Tensor:
    """``kd_kl`` (mode ``kl``, masked by ``valid``, divided by ``count`` when given; free of the class count) or
    ``kd_reference`` (mode ``reference``, no mask, divided by ``divisor``: required in that mode, see
    ``losses.class_divisor``)."""
    if mode == "kl":
        return kd_kl(student_logits, teacher_logits, valid, count)
    if mode == "reference":
        if divisor is None:
            raise ValueError("kd_loss: mode 'reference' needs the class divisor (losses.class_divisor)")
        return kd_reference(student_logits, teacher_logits, divisor)
    raise ValueError(f"unknown KD mode {mode!r} (expected one of {', '.join(KD_MODES)})")


# ---------------------------------------------------------------------------------------------------------
# The method


def load_teacher(path: str | Path, n_class: int, device: torch.device, key: str = "distill.teacher",
                 channels_last: bool | str = "auto") -> tuple[nn.Module, bool]:
    """The teacher network from its ``checkpoint.pt``: eval mode, no gradients, on ``device`` (in the
    ``channels_last`` format of the stage); and whether it has ``bn_pretrain``, which is read from the
    checkpoint's ``model_config`` (never a setting)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{key}: checkpoint file not found: {path}")
    model, mcfg, _ = load_model_from_checkpoint(path, device, channels_last)
    if mcfg.n_class != n_class:
        raise ConfigError(f"{key}: {path} has {mcfg.n_class} classes, model.n_class is {n_class}")
    set_requires_grad(model, False)
    return model.eval(), bool(mcfg.bn_pretrain)


class Distill(Method):
    """Hard-label CE on the target (strong view) + KD from a frozen teacher + source CE (module docstring)."""

    name = "distill"

    def __init__(self, cfg: TrainConfig, ctx: TrainContext) -> None:
        super().__init__(cfg, ctx)
        d = cfg.distill
        if d.hard_labels is None or d.teacher is None:
            raise ConfigError(f"distill.hard_labels and distill.teacher: required for stage {cfg.stage!r}")
        if cfg.data.target is None:
            raise ConfigError(f"data.target: required for stage {cfg.stage!r} (a prepared target train split)")
        target = PreparedSplit(cfg.data.target)
        check_hard_labels(d.hard_labels, target, cfg.model.n_class)
        self.teacher, self.teacher_bn_pretrain = load_teacher(d.teacher, cfg.model.n_class, ctx.device,
                                                              channels_last=cfg.channels_last)
        marginal = None if d.class_dist is None else load_class_marginal(d.class_dist, cfg.model.n_class)
        self.share_monitor(marginal)
        self._targets: list[tuple[torch.Tensor, torch.Tensor]] = []   # the step's pseudo targets (accumulate > 1)
        views = ("weak", "strong") if d.strong_view else ("weak",)
        self.domains = {
            "source": {"label": True},
            "target": {"label": False, "views": views,
                       "extras": HardLabelExtras(d.hard_labels, target.names, d.threshold)},
        }

    def train_mode(self) -> None:
        super().train_mode()
        self.teacher.eval()

    def describe(self) -> dict[str, Any]:
        d = self.cfg.distill
        return {**super().describe(), "teacher": str(d.teacher), "teacher_bn_pretrain": self.teacher_bn_pretrain,
                "hard_labels": str(d.hard_labels), "kd_mode": d.kd_mode}

    def step_counts(self, batches: list[dict[str, dict[str, Any]]]) -> dict[str, torch.Tensor]:
        """The base counts plus the valid pixels of the pseudo labels (``pseudo``) and of the KD mask (``kd``)
        over the step's micro-batches; their targets are kept for ``losses``."""
        counts = super().step_counts(batches)
        d = self.cfg.distill
        self._targets = [pseudo_targets(b["target"], d.label_stride, d.strong_view) for b in batches]
        counts["pseudo"] = sum((labels != IGNORE_INDEX).sum() for labels, _ in self._targets)
        counts["kd"] = sum(valid.sum() for _, valid in self._targets)
        return counts

    def losses(self, batch: dict[str, dict[str, Any]], micro: Micro | None = None) -> dict[str, torch.Tensor]:
        """``{"ce_source", "ce_pseudo", "kd"}`` of one batch (differentiable w.r.t. the student); with ``micro``
        (``accumulate: k``) the micro-batch's shares of the step's means: the pixel means divided by the step's
        valid pixels (``step_counts``), the ``reference`` KD (a mean over all pixels) by k."""
        d = self.cfg.distill
        micro = micro or Micro()
        src, tgt = batch["source"], batch["target"]
        image = tgt["image_strong"] if d.strong_view else tgt["image"]
        if micro.counts:
            labels, valid = self._targets[micro.index]
        else:
            labels, valid = pseudo_targets(tgt, d.label_stride, d.strong_view)
        size = labels.shape[-2:]
        with torch.no_grad(), self.amp.autocast():
            t_logits = upsample(self.teacher(image)["out"], size).float()
        with self.amp.autocast():
            ps = upsample(self.net(src["image"])["out"], src["label"].shape[-2:])
            ce_source = seg_cross_entropy(ps, src["label"], count=micro.count_for("label/source"))
            s_logits = upsample(self.net(image)["out"], size)
            ce_pseudo = seg_cross_entropy(s_logits, labels, count=micro.count_for("pseudo"))
        self.shares.add(class_map(s_logits.detach()), class_map(t_logits), valid)
        kd = kd_loss(s_logits, t_logits, valid, d.kd_mode,
                     class_divisor(self.cfg.model.n_class, self.cfg.reference_class_scaling),
                     count=micro.count_for("kd"))
        if d.kd_mode == "reference":
            kd = scaled(kd, micro.scale)
        return {"ce_source": ce_source, "ce_pseudo": ce_pseudo, "kd": kd}

    def forward_backward(self, batch: dict[str, dict[str, Any]], micro: Micro) -> dict[str, Any]:
        losses = self.losses(batch, micro)
        total = losses["ce_source"] + losses["ce_pseudo"] + self.cfg.distill.kd_weight * losses["kd"]
        self.amp.backward(total)
        return {k: v.detach() for k, v in losses.items()}

    def optimizer_step(self) -> None:
        super().optimizer_step()
        self._targets = []


class Stage2(Distill):
    """Stage 2: a fresh student (``model.init``: SimCLRv2 with bn_pretrain in the paper) taught by stage 1."""

    name = "stage2"


class Stage3(Distill):
    """Stage 3: the stage-2 model (``init_checkpoint``) refined with its own labels, taught by itself."""

    name = "stage3"
