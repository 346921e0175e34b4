"""``cpsl evaluate``: mIoU of a checkpoint on a prepared split (spec 3.7).

Protocol (the reference's): every image at its own size (or resized to ``input_size``), eval mode, logits
upsampled bilinearly (``align_corners`` true) to the label size, argmax, confusion matrix over pixels with
``0 <= label < n_class``; IoU per class, mIoU = mean over the classes present in labels or predictions. With
``flip`` the probabilities of the flipped pass (flipped back) are averaged in. Under torchrun each rank
evaluates its shard and the confusion matrices are summed.

Writes into ``out`` (which may be a stage's folder that already holds its checkpoint, so the folder is not
replaced; each file is written atomically, ``metrics.json`` last)::

    confusion.npy      int64 (n_class, n_class), rows = label, columns = prediction
    metrics.json       stage, experiment, seed, iteration, miou, per_class, n_class, selection ("last"),
                       [miou13 for a 16-class model], pixel_acc, checkpoint, flip, data, n_images, input_size
    (metrics_best.json / confusion_best.npy instead when ``selection`` is "best_on_val")
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cpsl import inference
from cpsl.config import EvaluateConfig
from cpsl.data.common import write_bytes_atomic
from cpsl.metrics import ConfusionMatrix


def _recorded(cfg: EvaluateConfig, state: dict[str, Any]) -> tuple[str, str, int]:
    """stage, experiment, seed: from the settings, else from the checkpoint, else unknown / 0."""
    ck_cfg = state.get("config") if isinstance(state.get("config"), dict) else {}
    stage = cfg.stage or ck_cfg.get("stage") or "unknown"
    experiment = cfg.experiment or ck_cfg.get("experiment") or "unknown"
    seed = cfg.seed if cfg.seed is not None else state.get("seed", ck_cfg.get("seed", 0))
    return str(stage), str(experiment), int(seed if isinstance(seed, int) else 0)


def confusion(cfg: EvaluateConfig, setup: inference.Setup) -> np.ndarray:
    """This run's confusion matrix (int64, summed over ranks)."""
    n_class = setup.model_config.n_class
    cm = ConfusionMatrix(n_class)
    hist = torch.zeros(n_class * n_class, dtype=torch.int64, device=setup.info.device)
    input_size = tuple(cfg.input_size) if cfg.input_size else None
    for batch in inference.iter_batches(setup.split, setup.indices, cfg, setup.info.device, "evaluate",
                                        labels=True, input_size=input_size, show_progress=setup.info.is_main):
        same = len(set(batch.sizes)) == 1
        if same:
            probs = inference.predict_probs(setup.model, batch.images, out_size=batch.sizes[0], flip=cfg.flip,
                                            align_corners=cfg.align_corners, upsample_logits=True, amp=cfg.amp)
            preds = list(probs.argmax(1))
        else:  # resized inputs of different original sizes: upsample each to its own label size
            probs = inference.predict_probs(setup.model, batch.images, out_size=None, flip=cfg.flip,
                                            align_corners=cfg.align_corners, amp=cfg.amp)
            preds = [F.interpolate(p[None], size=s, mode="bilinear", align_corners=cfg.align_corners)[0].argmax(0)
                     for p, s in zip(probs, batch.sizes)]
        with torch.inference_mode():
            for pred, label in zip(preds, batch.labels):
                gt = label.to(setup.info.device, torch.int64).flatten()
                valid = gt < n_class
                hist += torch.bincount(gt[valid] * n_class + pred.flatten()[valid], minlength=n_class * n_class)
    hist = inference.all_reduce_(hist.clone(), setup.info)
    cm.merge(hist.cpu().numpy().reshape(n_class, n_class))
    return cm.hist


def run(cfg: EvaluateConfig, out: Path) -> dict:
    """Evaluate ``cfg.checkpoint`` on ``cfg.data``; write confusion.npy and metrics.json into ``out``."""
    out = Path(out)
    with inference.session(cfg.device) as info:
        setup = inference.prepare_run(cfg, info)
        hist = confusion(cfg, setup)
        if not info.is_main:
            return {}
        cm = ConfusionMatrix(setup.model_config.n_class)
        cm.merge(hist)
        summary = cm.summary(setup.split.classes)
        stage, experiment, seed = _recorded(cfg, setup.checkpoint)
        metrics: dict[str, Any] = {
            "stage": stage, "experiment": experiment, "seed": seed,
            "iteration": int(setup.checkpoint.get("iteration", 0)),
            "miou": summary["miou"], "per_class": summary["per_class"], "n_class": summary["n_class"],
            "selection": cfg.selection,
        }
        if "miou13" in summary:
            metrics["miou13"] = summary["miou13"]
        metrics.update({"pixel_acc": summary["pixel_acc"], "checkpoint": str(os.path.abspath(cfg.checkpoint)),
                        "flip": cfg.flip, "data": str(setup.split.root), "n_images": len(setup.split),
                        "input_size": list(cfg.input_size) if cfg.input_size else None,
                        "pixels": int(hist.sum())})
        out.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        np.save(buf, hist.astype(np.int64))
        suffix = "" if cfg.selection == "last" else "_best"
        write_bytes_atomic(out / f"confusion{suffix}.npy", buf.getvalue())
        inference.write_json(out / f"metrics{suffix}.json", metrics)
        return metrics
