"""Cityscapes in its released layout.

``leftImg8bit/<split>/<city>/<stem>_leftImg8bit.png`` pairs with ``gtFine/<split>/<city>/<stem>_gtFine_labelIds.png``
(uint8 Cityscapes labelIds 0..33). The sample name is ``<city>/<stem>``, e.g. ``aachen/aachen_000000_000019``.
Other gtFine files (color, instanceIds, polygons) are ignored.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cpsl import labels
from cpsl.data.common import Problem, Sample, pair_by_name, read_index_png, require_dir
from cpsl.errors import DataError

NAME = "cityscapes"
SPLITS = ("train", "val", "test")
KNOWN_IDS: frozenset[int] = labels.CITYSCAPES_KNOWN_IDS
IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelIds.png"


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DataError(f"dataset.split: {split!r} is not a Cityscapes split ({', '.join(SPLITS)})")


def label_path(root: Path, split: str, name: str) -> Path:
    """Where the labelIds PNG of sample ``name`` (``city/stem``) lives."""
    return Path(root) / "gtFine" / split / f"{name}{LABEL_SUFFIX}"


def scan(root: Path, split: str) -> tuple[list[Sample], list[Problem]]:
    """Pair every image of ``split`` with its labelIds PNG, sorted by ``city/stem``."""
    _check_split(split)
    root = Path(root)
    img_dir = require_dir(root / "leftImg8bit" / split, "Cityscapes images leftImg8bit/<split>/<city>/")
    gt_dir = root / "gtFine" / split
    images = {
        f"{p.parent.name}/{p.name[: -len(IMAGE_SUFFIX)]}": p for p in img_dir.glob(f"*/*{IMAGE_SUFFIX}")
    }
    found = {f"{p.parent.name}/{p.name[: -len(LABEL_SUFFIX)]}": p for p in gt_dir.glob(f"*/*{LABEL_SUFFIX}")}
    return pair_by_name(images, found, lambda name: label_path(root, split, name))


def read_raw_label(path: Path) -> np.ndarray:
    """labelIds as stored (uint8, H x W)."""
    return read_index_png(path)


def lut(n_class: int) -> np.ndarray:
    """labelIds -> train ids of the 19/16/13-class protocol."""
    return labels.cityscapes_lut(n_class)


def known_ids(n_class: int) -> frozenset[int]:
    return KNOWN_IDS


def classes(root: Path, n_class: int) -> tuple[str, ...]:
    return labels.class_names(n_class)
