"""Generated stand-ins for the paper presets' inputs, in the real on-disk layouts (#21 item 1).

- GTA5: ``images/NNNNN.png``, palettised ``labels/NNNNN.png`` (palette indices = Cityscapes labelIds), and one
  image without a label, as in the release (which has 25; the preset's ``allow_skip`` is for them);
- SYNTHIA-RAND-CITYSCAPES: ``RGB/NNNNNNN.png``, 16-bit ``GT/LABELS/NNNNNNN.png`` (class id in the R channel,
  an instance id in G);
- Cityscapes: ``leftImg8bit/<split>/<city>/<stem>_leftImg8bit.png``, ``gtFine/.../<stem>_gtFine_labelIds.png``;
- torchvision's ImageNet ResNet-101 file (a state dict with torchvision's names, random values), named like
  torchvision's, ``resnet101-<first 8 hex digits of its sha256>.pth``, so that the hash check passes;
- the reference's SimCLRv2 file layout (``{'state_dict': {...}}`` with torchvision's names, other values).

The images are street-like bands (sky, building, vegetation, sidewalk, road, a car and a person) in per-class
colours with noise, so that every split holds the same few classes in both domains.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import cv2
import numpy as np
import torch
import torchvision
from PIL import Image

# (Cityscapes labelId, SYNTHIA id, RGB colour) of the classes drawn; void is Cityscapes id 0 / SYNTHIA id 0.
CLASSES = {"sky": (23, 1, (70, 130, 180)), "building": (11, 2, (70, 70, 70)), "vegetation": (21, 6, (107, 142, 35)),
           "sidewalk": (8, 4, (244, 35, 232)), "road": (7, 3, (128, 64, 128)), "car": (26, 8, (0, 0, 142)),
           "person": (24, 10, (220, 20, 60))}


def scene(rng: np.random.Generator, h: int, w: int, shift: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """An RGB street scene and the mask of each class (bands with random borders, a car, a person)."""
    horizon, street = int(h * rng.uniform(0.25, 0.4)), int(h * rng.uniform(0.55, 0.7))
    rows = np.arange(h)[:, None] * np.ones((1, w), dtype=int)
    cols = np.ones((h, 1), dtype=int) * np.arange(w)[None, :]
    split = int(w * rng.uniform(0.3, 0.7))
    masks = {"sky": rows < horizon,
             "building": (rows >= horizon) & (rows < street) & (cols < split),
             "vegetation": (rows >= horizon) & (rows < street) & (cols >= split),
             "sidewalk": (rows >= street) & (rows < street + h // 8),
             "road": rows >= street + h // 8}
    x0, y0 = int(rng.integers(0, w - w // 4)), street
    car = (rows >= y0) & (rows < y0 + h // 6) & (cols >= x0) & (cols < x0 + w // 4)
    px = int(rng.integers(0, w - w // 16))
    person = (rows >= street - h // 5) & (rows < street + h // 16) & (cols >= px) & (cols < px + w // 16)
    for name in masks:
        masks[name] &= ~car & ~person
    masks["car"], masks["person"] = car & ~person, person
    img = np.zeros((h, w, 3), dtype=np.float32)
    for name, mask in masks.items():
        img[mask] = np.clip(np.array(CLASSES[name][2]) + shift, 0, 255)
    img += rng.normal(0, 12, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), masks


def _write_rgb(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.ascontiguousarray(rgb[:, :, ::-1]))


def _ids(masks: dict[str, np.ndarray], column: int, dtype: type) -> np.ndarray:
    shape = next(iter(masks.values())).shape
    ids = np.zeros(shape, dtype=dtype)  # void where no class is drawn
    for name, mask in masks.items():
        ids[mask] = CLASSES[name][column]
    return ids


def make_gta5(root: Path, n: int, hw: tuple[int, int], seed: int = 0, unlabelled: int = 1) -> Path:
    """``n`` labelled images and ``unlabelled`` more without a label file."""
    rng = np.random.default_rng(seed)
    pal = np.random.default_rng(7).integers(0, 256, 768).astype(np.uint8).tobytes()
    for i in range(1, n + unlabelled + 1):
        rgb, masks = scene(rng, *hw, shift=25)
        _write_rgb(root / "images" / f"{i:05d}.png", rgb)
        if i <= n:
            lab = Image.fromarray(_ids(masks, 0, np.uint8), mode="P")
            lab.putpalette(pal)
            (root / "labels").mkdir(parents=True, exist_ok=True)
            lab.save(root / "labels" / f"{i:05d}.png")
    return root


def make_synthia(root: Path, n: int, hw: tuple[int, int], seed: int = 1) -> Path:
    rng = np.random.default_rng(seed)
    (root / "GT" / "LABELS").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        rgb, masks = scene(rng, *hw, shift=-20)
        _write_rgb(root / "RGB" / f"{i:07d}.png", rgb)
        lab = np.zeros((*hw, 3), dtype=np.uint16)
        lab[:, :, 0] = _ids(masks, 1, np.uint16)                             # R: class id
        lab[:, :, 1] = rng.integers(0, 60000, hw, dtype=np.uint16)          # G: instance id (ignored)
        assert cv2.imwrite(str(root / "GT" / "LABELS" / f"{i:07d}.png"), np.ascontiguousarray(lab[:, :, ::-1]))
    return root


def make_cityscapes(root: Path, per_city: dict[str, int], hw: tuple[int, int], seed: int = 2) -> Path:
    """``per_city[split]`` images in each of two cities per split."""
    rng = np.random.default_rng(seed)
    for split, n in per_city.items():
        for city in ("aachen", "bremen"):
            for k in range(n):
                stem = f"{city}_{k:06d}_000019"
                rgb, masks = scene(rng, *hw, shift=-10)
                _write_rgb(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", rgb)
                gt = root / "gtFine" / split / city
                gt.mkdir(parents=True, exist_ok=True)
                Image.fromarray(_ids(masks, 0, np.uint8), mode="L").save(gt / f"{stem}_gtFine_labelIds.png")
    return root


def resnet101_state(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return torchvision.models.resnet101().state_dict()


def torchvision_file(folder: Path, seed: int = 0) -> Path:
    """A ResNet-101 file in torchvision's layout, named as torchvision names its files (hash prefix)."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "resnet101.tmp"
    torch.save(resnet101_state(seed), tmp)
    prefix = hashlib.sha256(tmp.read_bytes()).hexdigest()[:8]
    path = folder / f"resnet101-{prefix}.pth"
    tmp.rename(path)
    return path


def simclr_file(path: Path, seed: int = 1) -> Path:
    """The reference's r101_1x_sk0.pth layout: ``{'state_dict': {...}}`` with torchvision's names."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": resnet101_state(seed)}, path)
    return path
