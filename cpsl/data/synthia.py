"""SYNTHIA-RAND-CITYSCAPES in its released layout.

``RGB/NNNNNNN.png`` pairs with ``GT/LABELS/NNNNNNN.png``, a 16-bit PNG whose first channel (R, in RGB order) is
the class id and whose second channel is an instance id (ignored here). OpenCV decodes it as BGR(A), so the class
id is OpenCV channel 2. A single-channel 16-bit PNG is accepted too. No FreeImage plugin is needed.

Sample order is sorted by name (the reference uses filesystem order, which is not reproducible).
Split ``all`` is every image; any other split name ``S`` reads the sample names, one per line, from
``<root>/S.txt`` (an optional file list).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cpsl import labels
from cpsl.data.common import Problem, Sample, pair_by_name, read_png_unchanged, require_dir
from cpsl.errors import DataError

NAME = "synthia"
KNOWN_IDS: frozenset[int] = labels.SYNTHIA_KNOWN_IDS


def _names_from_list(root: Path, split: str) -> list[str]:
    path = root / f"{split}.txt"
    if not path.is_file():
        raise DataError(f"{path}: not found; SYNTHIA split {split!r} needs this file list (or use dataset.split: all)")
    names = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line:
            names.append(Path(line).stem)
    return sorted(set(names))


def scan(root: Path, split: str) -> tuple[list[Sample], list[Problem]]:
    """Pair ``RGB/*.png`` with ``GT/LABELS/*.png`` by file stem, sorted by stem."""
    root = Path(root)
    img_dir = require_dir(root / "RGB", "SYNTHIA images RGB/*.png")
    lab_dir = root / "GT" / "LABELS"
    images = {p.stem: p for p in img_dir.glob("*.png")}
    found = {p.stem: p for p in lab_dir.glob("*.png")} if lab_dir.is_dir() else {}
    expected = lambda name: lab_dir / f"{name}.png"  # noqa: E731
    if split == "all":
        return pair_by_name(images, found, expected)
    wanted = _names_from_list(root, split)
    samples, problems = pair_by_name(
        {n: images[n] for n in wanted if n in images}, {n: found[n] for n in wanted if n in found}, expected
    )
    for n in wanted:
        if n not in images and n not in found:
            problems.append(Problem(img_dir / f"{n}.png", f"listed in {split}.txt but neither image nor label exists"))
    problems.sort(key=lambda p: str(p.file))
    return samples, problems


def read_raw_label(path: Path) -> np.ndarray:
    """SYNTHIA class ids (uint16, H x W): channel 0 in RGB order of a 16-bit label PNG."""
    arr = read_png_unchanged(path)
    if arr.ndim == 3:
        if arr.shape[2] not in (3, 4):
            raise DataError(f"{path}: label PNG with {arr.shape[2]} channels; expected 3 (RGB) or 1")
        arr = arr[:, :, 2]  # OpenCV order is B, G, R(, A): R is the class id
    return np.ascontiguousarray(arr.astype(np.uint16, copy=False))


def lut(n_class: int) -> np.ndarray:
    """SYNTHIA ids -> train ids of the 19/16/13-class protocol (65536 entries)."""
    return labels.synthia_lut(n_class)


def known_ids(n_class: int) -> frozenset[int]:
    return KNOWN_IDS


def classes(root: Path, n_class: int) -> tuple[str, ...]:
    return labels.class_names(n_class)
