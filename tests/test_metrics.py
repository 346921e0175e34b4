"""Confusion-matrix metrics against hand-computed values."""

import numpy as np
import pytest
import torch

from cpsl.labels import CLASSES_16, IGNORE_INDEX
from cpsl.metrics import ConfusionMatrix


def test_hand_made_confusion_matrix():
    # 3 classes. gt/pred pairs: class 0: 4 px, 3 right, 1 predicted as 1; class 1: 2 px, both right;
    # class 2 never occurs and is never predicted; one ignored pixel (predicted 2) and one gt id >= n_class.
    gt = np.array([0, 0, 0, 0, 1, 1, IGNORE_INDEX, 7])
    pred = np.array([0, 0, 0, 1, 1, 1, 2, 2])
    cm = ConfusionMatrix(3)
    cm.update(gt, pred)
    assert cm.hist.tolist() == [[3, 1, 0], [0, 2, 0], [0, 0, 0]]
    # IoU0 = 3 / (4 + 3 - 3) = 0.75; IoU1 = 2 / (2 + 3 - 2) = 2/3; IoU2 absent -> NaN -> null
    s = cm.summary(["a", "b", "c"])
    assert s["per_class"] == {"a": 75.0, "b": pytest.approx(66.6667, abs=1e-4), "c": None}
    assert s["miou"] == pytest.approx((75.0 + 200 / 3) / 2, abs=1e-4)
    assert s["pixel_acc"] == pytest.approx(500 / 6, abs=1e-4)
    assert "miou13" not in s


def test_class_predicted_but_absent_from_ground_truth_counts_as_zero():
    cm = ConfusionMatrix(2)
    cm.update(torch.tensor([[0, 0], [0, 0]]), torch.tensor([[0, 1], [0, 0]]))
    s = cm.summary(["a", "b"])
    assert s["per_class"] == {"a": 75.0, "b": 0.0}
    assert s["miou"] == 37.5


def test_accumulates_and_merges():
    a, b = ConfusionMatrix(2), ConfusionMatrix(2)
    a.update([0, 1], [0, 0])
    b.update([1, 1], [1, 1])
    a.merge(b)
    assert a.hist.tolist() == [[1, 0], [1, 2]]
    with pytest.raises(ValueError, match="differ in size"):
        a.update([0, 1, 1], [0, 1])


def test_miou13_from_a_16_class_model():
    cm = ConfusionMatrix(16)
    gt = np.arange(16)
    pred = gt.copy()
    pred[[3, 4, 5]] = 0            # wall, fence, pole wrong: IoU 0; road IoU 1/4
    cm.update(gt, pred)
    s = cm.summary(CLASSES_16)
    assert s["per_class"]["wall"] == 0.0 and s["per_class"]["road"] == 25.0
    assert s["miou"] == pytest.approx((25 + 12 * 100) / 16, abs=1e-4)
    assert s["miou13"] == pytest.approx((25 + 12 * 100) / 13, abs=1e-4)
