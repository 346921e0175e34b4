"""Confusion matrix, per-class IoU, mIoU (and mIoU-13 from a 16-class model), pixel accuracy."""

from __future__ import annotations

import math

import numpy as np
import torch

from cpsl.labels import CLASSES_13, CLASSES_16


class ConfusionMatrix:
    """Accumulates ``hist[gt, pred]`` over pixels with ``0 <= gt < n_class`` (everything else is ignored).

    Works on numpy arrays or torch tensors on any device; the matrix itself is int64 on the CPU.
    """

    def __init__(self, n_class: int):
        self.n_class = n_class
        self.hist = np.zeros((n_class, n_class), dtype=np.int64)

    def update(self, gt, pred) -> None:
        if isinstance(gt, torch.Tensor):
            gt = gt.detach().to("cpu", torch.int64).numpy()
        if isinstance(pred, torch.Tensor):
            pred = pred.detach().to("cpu", torch.int64).numpy()
        gt = np.asarray(gt, dtype=np.int64).ravel()
        pred = np.asarray(pred, dtype=np.int64).ravel()
        if gt.shape != pred.shape:
            raise ValueError(f"ground truth and prediction differ in size: {gt.shape} vs {pred.shape}")
        valid = (gt >= 0) & (gt < self.n_class)
        idx = self.n_class * gt[valid] + pred[valid]
        self.hist += np.bincount(idx, minlength=self.n_class**2).reshape(self.n_class, self.n_class)

    def merge(self, other: "ConfusionMatrix | np.ndarray") -> None:
        self.hist += other.hist if isinstance(other, ConfusionMatrix) else np.asarray(other, dtype=np.int64)

    def iou(self) -> np.ndarray:
        """Per-class IoU in [0, 1]; NaN for a class absent from both ground truth and prediction."""
        tp = np.diag(self.hist).astype(np.float64)
        union = self.hist.sum(0) + self.hist.sum(1) - np.diag(self.hist)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(union > 0, tp / np.maximum(union, 1), np.nan)

    def pixel_accuracy(self) -> float:
        total = self.hist.sum()
        return float(np.diag(self.hist).sum() / total) if total else float("nan")

    def summary(self, class_names: tuple[str, ...] | list[str]) -> dict:
        """Percent values: miou (nanmean over classes), per_class (None where absent), pixel_acc.

        For a 16-class model (SYNTHIA protocol) also ``miou13``: the mean over the 13 classes of the
        13-class protocol, taken from the same per-class IoUs.
        """
        if len(class_names) != self.n_class:
            raise ValueError(f"{len(class_names)} class names for a {self.n_class}-class matrix")
        iou = self.iou()
        out = {
            "miou": _pct(_nanmean(iou)),
            "per_class": {name: _pct(v) for name, v in zip(class_names, iou)},
            "pixel_acc": _pct(self.pixel_accuracy()),
            "n_class": self.n_class,
        }
        if tuple(class_names) == CLASSES_16:
            idx = [CLASSES_16.index(c) for c in CLASSES_13]
            out["miou13"] = _pct(_nanmean(iou[idx]))
        return out


def _nanmean(values: np.ndarray) -> float:
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else float("nan")


def _pct(value: float) -> float | None:
    """Percent rounded to 4 decimals; None (JSON null) for NaN, i.e. a class that never occurred."""
    return None if value is None or math.isnan(value) else round(100.0 * float(value), 4)
