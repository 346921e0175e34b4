"""GTA5 ("Playing for Data") in its released layout.

``images/NNNNN.png`` pairs with ``labels/NNNNN.png``; the labels are palettised PNGs whose palette *indices* are
Cityscapes labelIds (0..33, and 34 for license plates). The optional ``split.mat`` (MATLAB v5) holds 1-based
``trainIds``, ``valIds`` and ``testIds``; id ``k`` is file ``{k:05d}.png``.

Split ``all`` is every file in ``images/`` (24,966 in the release, like the reference code, which ignores the
split ids). The release has 25 images without labels: they are reported as Problems, never dropped silently.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cpsl import labels
from cpsl.data.common import Problem, Sample, pair_by_name, read_index_png, require_dir
from cpsl.errors import DataError

NAME = "gta5"
SPLITS = ("all", "train", "val", "test")
KNOWN_IDS: frozenset[int] = labels.GTA5_KNOWN_IDS
SPLIT_KEYS = {"train": "trainIds", "val": "valIds", "test": "testIds"}


def read_split_ids(path: Path, split: str) -> list[int]:
    """The sorted, de-duplicated 1-based ids of ``split`` from ``split.mat``."""
    if not path.is_file():
        raise DataError(f"{path}: not found; GTA5 split {split!r} needs split.mat (or use dataset.split: all)")
    import scipy.io  # local: only this path needs scipy

    try:
        mat = scipy.io.loadmat(str(path))
    except Exception as err:
        raise DataError(f"{path}: not a readable MATLAB file ({str(err).strip() or type(err).__name__})") from None
    key = SPLIT_KEYS[split]
    if key not in mat:
        raise DataError(f"{path}: no {key!r} variable (found {', '.join(k for k in mat if not k.startswith('__'))})")
    ids = np.asarray(mat[key]).ravel()
    if ids.size and (not np.issubdtype(ids.dtype, np.number) or (ids != np.round(ids)).any() or ids.min() < 1):
        raise DataError(f"{path}: {key} must hold positive integer ids")
    return sorted({int(v) for v in ids})


def scan(root: Path, split: str) -> tuple[list[Sample], list[Problem]]:
    """Pair images and labels by file stem; for train/val/test, restrict to the ids in ``split.mat``."""
    if split not in SPLITS:
        raise DataError(f"dataset.split: {split!r} is not a GTA5 split ({', '.join(SPLITS)})")
    root = Path(root)
    img_dir = require_dir(root / "images", "GTA5 images/NNNNN.png")
    lab_dir = root / "labels"
    images = {p.stem: p for p in img_dir.glob("*.png")}
    found = {p.stem: p for p in lab_dir.glob("*.png")} if lab_dir.is_dir() else {}
    expected = lambda name: lab_dir / f"{name}.png"  # noqa: E731
    if split == "all":
        return pair_by_name(images, found, expected)
    wanted = [f"{i:05d}" for i in read_split_ids(root / "split.mat", split)]
    images_s = {n: images[n] for n in wanted if n in images}
    labels_s = {n: found[n] for n in wanted if n in found}
    samples, problems = pair_by_name(images_s, labels_s, expected)
    for n in wanted:
        if n not in images and n not in found:
            problems.append(Problem(img_dir / f"{n}.png", f"listed in split.mat ({split}) but neither image nor label exists"))
    problems.sort(key=lambda p: str(p.file))
    return samples, problems


def read_raw_label(path: Path) -> np.ndarray:
    """Palette indices (= Cityscapes labelIds) of a P-mode label PNG; plain 8-bit grayscale is accepted too."""
    return read_index_png(path)


def lut(n_class: int) -> np.ndarray:
    """labelIds -> train ids; 34 (license plate) and void ids -> ignore."""
    return labels.cityscapes_lut(n_class)


def known_ids(n_class: int) -> frozenset[int]:
    return KNOWN_IDS


def classes(root: Path, n_class: int) -> tuple[str, ...]:
    return labels.class_names(n_class)
