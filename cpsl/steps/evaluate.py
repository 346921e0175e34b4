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
    samples/<name>.png the predictions of the first ``samples`` images (of rank 0's shard) as palette PNGs: the
                       pixel values are train ids (255 = none) and viewers show them in the Cityscapes colours
    samples/index.json [{name, image, label, prediction}]: the source image, its label and the prediction file,
                       which ``cpsl collect`` lays out side by side for every stage
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
from cpsl.labels import palette
from cpsl.metrics import ConfusionMatrix
from cpsl.provenance import remove_stale_temps


def _recorded(cfg: EvaluateConfig, state: dict[str, Any]) -> tuple[str, str, int]:
    """stage, experiment, seed: from the settings, else from the checkpoint, else unknown / 0."""
    ck_cfg = state.get("config") if isinstance(state.get("config"), dict) else {}
    stage = cfg.stage or ck_cfg.get("stage") or "unknown"
    experiment = cfg.experiment or ck_cfg.get("experiment") or "unknown"
    seed = cfg.seed if cfg.seed is not None else state.get("seed", ck_cfg.get("seed", 0))
    return str(stage), str(experiment), int(seed if isinstance(seed, int) else 0)


def confusion(cfg: EvaluateConfig, setup: inference.Setup,
              samples: dict[int, np.ndarray] | None = None) -> np.ndarray:
    """This run's confusion matrix (int64, summed over ranks). ``samples``, if given, receives the predictions
    (uint8 train ids) of the split's first ``cfg.samples`` images that fall in this process's shard, by split index
    (``gather_samples`` brings them to rank 0: the same images whatever the number of processes)."""
    n_class = setup.model_config.n_class
    cm = ConfusionMatrix(n_class)
    hist = torch.zeros(n_class * n_class, dtype=torch.int64, device=setup.info.device)
    ignored = n_class * n_class  # one more bin, for the ignored pixels: fixed shapes, no host sync
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
            for index, pred, label in zip(batch.indices, preds, batch.labels):
                if samples is not None and index < cfg.samples:
                    samples[index] = pred.to("cpu", torch.uint8).numpy()
                gt = label.to(setup.info.device, torch.int64).flatten()
                cells = torch.where(gt < n_class, gt * n_class + pred.flatten(), ignored)
                hist += inference.count_ids(cells, ignored + 1)[:ignored]
    hist = inference.all_reduce_(hist.clone(), setup.info)
    cm.merge(hist.cpu().numpy().reshape(n_class, n_class))
    return cm.hist


def run(cfg: EvaluateConfig, out: Path) -> dict:
    """Evaluate ``cfg.checkpoint`` on ``cfg.data``; write confusion.npy and metrics.json into ``out``."""
    out = Path(out)
    with inference.session(cfg.device) as info:
        setup = inference.prepare_run(cfg, info)
        predictions: dict[int, np.ndarray] = {}
        hist = confusion(cfg, setup, predictions)
        predictions = gather_samples(predictions, info)
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
        if predictions and cfg.selection == "last":
            write_samples(out / "samples", setup.split, predictions)
        inference.write_json(out / f"metrics{suffix}.json", metrics)
        return metrics


def gather_samples(predictions: dict[int, np.ndarray], info: Any) -> dict[int, np.ndarray]:
    """Every rank's sample predictions (a few small arrays), merged on rank 0; as is on one process."""
    if not info.distributed:
        return predictions
    import torch.distributed as tdist

    parts: list = [None] * info.world_size
    tdist.all_gather_object(parts, predictions)
    return {k: v for part in parts for k, v in part.items()}


def write_samples(folder: Path, split: Any, predictions: dict[int, np.ndarray]) -> None:
    """``folder/<name>.png`` (palette PNG of train ids) per prediction and ``folder/index.json``, each atomic.
    The temp files that a killed run left in ``folder`` are removed first (``run_step`` only cleans ``out``)."""
    from PIL import Image

    remove_stale_temps(folder)

    pal = palette(split.classes).flatten().tolist()
    index = []
    for i, pred in sorted(predictions.items()):
        name = split.names[i].replace("/", "_")
        img = Image.frombytes("P", (pred.shape[1], pred.shape[0]), np.ascontiguousarray(pred).tobytes())
        img.putpalette(pal)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        write_bytes_atomic(folder / f"{name}.png", buf.getvalue())
        index.append({"name": split.names[i], "image": str(split.image_paths[i]), "label": str(split.label_paths[i]),
                      "prediction": f"{name}.png"})
    inference.write_json(folder / "index.json", index)
