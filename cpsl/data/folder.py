"""A generic folder of images and train-id label PNGs, for datasets of your own.

Layout::

    <root>/classes.txt               one class name per line; train id = line index (0-based)
    <root>/images/[<split>/]*.png|jpg|jpeg
    <root>/labels/[<split>/]*.png    8-bit train ids 0..n_class-1, 255 = ignore

Split ``all`` uses the top level of ``images/`` and ``labels/``; any other split name is a sub-folder.
Images and labels pair by file stem. ``n_class`` in the config must equal the number of classes in classes.txt.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cpsl import labels
from cpsl.data.common import IMAGE_SUFFIXES, Problem, Sample, pair_by_name, read_index_png, require_dir
from cpsl.errors import ConfigError, DataError

NAME = "folder"
CLASSES_FILE = "classes.txt"


def _split_dir(base: Path, split: str) -> Path:
    return base if split == "all" else base / split


def scan(root: Path, split: str) -> tuple[list[Sample], list[Problem]]:
    """Pair images and labels of ``split`` by file stem, sorted by stem."""
    root = Path(root)
    if split != "all" and (Path(split).name != split or split in (".", "..")):
        raise DataError(f"dataset.split: {split!r} must be 'all' or a plain sub-folder name")
    img_dir = require_dir(_split_dir(root / "images", split), "folder-format images")
    lab_dir = _split_dir(root / "labels", split)
    images: dict[str, Path] = {}
    problems: list[Problem] = []
    for p in sorted(img_dir.iterdir()):
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
            if p.stem in images:
                problems.append(Problem(p, f"two images named {p.stem!r} ({images[p.stem].name} is used)"))
                continue
            images[p.stem] = p
    found = {p.stem: p for p in lab_dir.glob("*.png")} if lab_dir.is_dir() else {}
    samples, pair_problems = pair_by_name(images, found, lambda name: lab_dir / f"{name}.png")
    return samples, sorted(problems + pair_problems, key=lambda p: str(p.file))


def class_names(root: Path) -> tuple[str, ...]:
    """Class names from ``<root>/classes.txt`` (free text, one per line; trailing blank lines and a UTF-8 byte
    order mark ignored). Blank lines before the last name, duplicate names and more than 255 classes are errors
    naming the file and line."""
    path = Path(root) / CLASSES_FILE
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataError(f"{path}: not found; the folder format needs one class name per line") from None
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read ({err})") from None
    lines = [line.strip() for line in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    for i, line in enumerate(lines):
        if not line:
            raise DataError(f"{path}: line {i + 1} is blank; every line up to the last must name a class")
    if not lines:
        raise DataError(f"{path}: no class names")
    seen: dict[str, int] = {}
    for i, line in enumerate(lines):
        if line in seen:
            raise DataError(f"{path}: line {i + 1}: class name {line!r} repeats line {seen[line] + 1}; every "
                            "class needs its own name")
        seen[line] = i
    if len(lines) > 255:
        raise DataError(f"{path}: {len(lines)} classes; at most 255 fit 8-bit labels with 255 = ignore")
    return tuple(lines)


def classes(root: Path, n_class: int) -> tuple[str, ...]:
    """Class names, checked against the configured ``n_class``."""
    names = class_names(root)
    if len(names) != n_class:
        raise ConfigError(
            f"dataset.n_class: {n_class} does not match the {len(names)} classes in {Path(root) / CLASSES_FILE}"
        )
    return names


def read_raw_label(path: Path) -> np.ndarray:
    """Train ids as stored (8-bit grayscale or palette indices)."""
    return read_index_png(path)


def lut(n_class: int) -> np.ndarray:
    """Identity over 0..n_class-1; everything else (255 included) -> ignore."""
    return labels.identity_lut(n_class)


def known_ids(n_class: int) -> frozenset[int]:
    """0..n_class-1 and the ignore value 255."""
    return frozenset(range(n_class)) | {labels.IGNORE_INDEX}
