"""Tiny prepared splits, checkpoints and fake models for the inference-step tests."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from cpsl.config import DatasetConfig, ModelConfig, PrepareConfig
from cpsl.labels import CLASSES_19
from cpsl.models import build_model
from cpsl.models.checkpoint import make_checkpoint, save_checkpoint
from cpsl.steps import prepare

TINY = ModelConfig(backbone="resnet18", base_width=8, head_channels=16, n_class=19)
# Cityscapes labelId of each 19-class train id (hand-written from the Cityscapes label table).
TRAIN_TO_LABEL_ID = [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33]


def _write_rgb(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.ascontiguousarray(rgb[:, :, ::-1]))


def _write_gray(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8), mode="L").save(path)


def make_split(tmp: Path, images: list[np.ndarray], labels: list[np.ndarray], layout: str = "folder",
               name: str = "split", classes: tuple[str, ...] = CLASSES_19) -> Path:
    """Write images (uint8 HxWx3) and train-id labels (uint8 HxW, 255 ignore) in a dataset layout, prepare it,
    and return the prepared folder. ``folder``: names img0, img1 ...; ``cityscapes``: names city/..."""
    raw = tmp / f"{name}_raw"
    if layout == "folder":
        (raw / "images").mkdir(parents=True)
        (raw / "classes.txt").write_text("\n".join(classes) + "\n")
        for i, (img, lab) in enumerate(zip(images, labels)):
            _write_rgb(raw / "images" / f"img{i}.png", img)
            _write_gray(raw / "labels" / f"img{i}.png", lab)
        # min_side 1: the fake models of the hand-checked tests take images of any size
        ds = DatasetConfig(format="folder", root=raw, split="all", n_class=len(classes), workers=0, min_side=1)
    else:
        lut = np.full(256, 0, np.uint8)  # ignore (255) -> labelId 0 (unlabeled)
        lut[:19] = TRAIN_TO_LABEL_ID
        for i, (img, lab) in enumerate(zip(images, labels)):
            city = ("aachen", "bochum")[i % 2]
            stem = f"{city}_{i:06d}_000019"
            _write_rgb(raw / "leftImg8bit" / "train" / city / f"{stem}_leftImg8bit.png", img)
            _write_gray(raw / "gtFine" / "train" / city / f"{stem}_gtFine_labelIds.png", lut[lab])
        ds = DatasetConfig(format="cityscapes", root=raw, split="train", n_class=19, workers=0, min_side=1)
    out = tmp / name
    prepare.run(PrepareConfig(dataset=ds, lab_stats=False), out)
    return out


def random_split(tmp: Path, n: int = 3, size: tuple[int, int] = (33, 65), layout: str = "folder",
                 seed: int = 0, name: str = "split") -> Path:
    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 256, (*size, 3), dtype=np.uint8) for _ in range(n)]
    labels = [rng.integers(0, 19, size, dtype=np.uint8) for _ in range(n)]
    for lab in labels:
        lab[0, :5] = 255
    return make_split(tmp, images, labels, layout, name)


def tiny_checkpoint(path: Path, seed: int = 0, n_class: int = 19, iteration: int = 42, **parts) -> Path:
    """A checkpoint of the tiny network, re-initialised (Kaiming) so that its softmax is far from uniform."""
    torch.manual_seed(seed)
    cfg = ModelConfig(backbone="resnet18", base_width=8, head_channels=16, n_class=n_class)
    model = build_model(cfg)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight)
    with torch.no_grad():
        model.layer5.head[1].weight.mul_(2.0)
    return save_checkpoint(path, make_checkpoint(model, cfg, iteration=iteration, **parts))


class FakeModel(nn.Module):
    """Output at input resolution: the red channel (x 255) is the predicted class (logit 10 for it, 0 else);
    ``feat`` is the (green, blue) channels x 255 (D = 2)."""

    def __init__(self, n_class: int = 19) -> None:
        super().__init__()
        self.n_class = n_class
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        cls = (x[:, 0] * 255).round().long().clamp(0, self.n_class - 1)
        out = F.one_hot(cls, self.n_class).permute(0, 3, 1, 2).float() * 10.0
        return {"out": out, "feat": (x[:, 1:3] * 255).round()}


def use_fake_model(monkeypatch, n_class: int = 19, iteration: int = 7) -> None:
    from cpsl import inference

    def fake_load(path, device):
        return FakeModel(n_class).to(device).eval(), ModelConfig(n_class=n_class, head_channels=16), \
            {"iteration": iteration, "seed": 5, "config": {"stage": "stage1", "experiment": "demo"}}

    monkeypatch.setattr(inference, "load_model_from_checkpoint", fake_load)
