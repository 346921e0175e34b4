"""Reader of a prepared split (the output folder of ``cpsl prepare``): what every later step loads.

A prepared split is format-independent: a list of images, train-id label PNGs (255 = ignore), the class names,
per-class pixel counts and optional per-image LAB statistics. See ``cpsl.steps.prepare`` for the layout.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
from torch.utils.data import Dataset

from cpsl.data.common import read_image, read_train_id_png
from cpsl.errors import DataError


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: not found (is this the output folder of `cpsl prepare`?)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: corrupt JSON ({err})") from None


class PreparedSplit:
    """The samples of one prepared split, with their class names and statistics.

    Attributes: ``root`` (the prepared folder), ``names``, ``image_paths``, ``label_paths`` (absolute; None in
    an unlabelled split), ``labelled``, ``classes``, ``n_class``, ``class_counts`` (dict from class_counts.json),
    ``lab_stats`` (float32 (N, 2, 3) or None), ``meta`` (dict from meta.json), ``image_bits`` (the 16-bit rule).
    """

    def __init__(self, out_dir: str | Path):
        self.root = Path(out_dir).absolute()
        if not self.root.is_dir():
            raise DataError(f"{self.root}: prepared dataset folder not found")
        self.meta: dict = _read_json(self.root / "meta.json")
        if not isinstance(self.meta, dict) or "classes" not in self.meta or "n_class" not in self.meta:
            raise DataError(f"{self.root / 'meta.json'}: corrupt (missing 'classes' or 'n_class')")
        self.classes: tuple[str, ...] = tuple(self.meta["classes"])
        self.n_class: int = int(self.meta["n_class"])
        if len(self.classes) != self.n_class:
            raise DataError(f"{self.root / 'meta.json'}: n_class {self.n_class} but {len(self.classes)} classes")

        self.labelled: bool = bool(self.meta.get("labels", True))
        self.image_bits: int = int(self.meta.get("image_bits", 16))
        self.names: list[str] = []
        self.image_paths: list[Path] = []
        self.label_paths: list[Path | None] = []
        list_path = self.root / "list.txt"
        try:
            text = list_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise DataError(f"{list_path}: not found (is this the output folder of `cpsl prepare`?)") from None
        except (OSError, UnicodeDecodeError) as err:
            raise DataError(f"{list_path}: cannot read ({err})") from None
        for i, line in enumerate(text.splitlines()):
            parts = line.split("\t")
            if len(parts) != 3 or not all(parts):
                raise DataError(f"{list_path}: line {i + 1} is not 'name<TAB>image<TAB>label'")
            self.names.append(parts[0])
            self.image_paths.append(Path(parts[1]))
            self.label_paths.append(self.root / parts[2] if self.labelled else None)
        if len(self.names) != int(self.meta.get("n_images", len(self.names))):
            raise DataError(f"{list_path}: {len(self.names)} lines but meta.json says {self.meta['n_images']} images")

        counts_path = self.root / "class_counts.json"
        self.class_counts: dict | None = _read_json(counts_path) if counts_path.exists() else None

        stats_path = self.root / "lab_stats.npy"
        self.lab_stats: np.ndarray | None = None
        if stats_path.exists():
            try:
                stats = np.load(stats_path, allow_pickle=False)
            except Exception as err:
                raise DataError(f"{stats_path}: corrupt ({err})") from None
            if stats.shape != (len(self.names), 2, 3):
                raise DataError(f"{stats_path}: shape {stats.shape}, expected ({len(self.names)}, 2, 3)")
            self.lab_stats = stats

    def __len__(self) -> int:
        return len(self.names)

    def class_pixels(self) -> np.ndarray:
        """Pixels per train id (int64, n_class), from class_counts.json."""
        if self.class_counts is None:
            raise DataError(f"{self.root / 'class_counts.json'}: not found")
        return np.asarray(self.class_counts["pixels"], dtype=np.int64)

    def labelled_pixels(self) -> int:
        """Pixels with a class label (not ignore) in the whole split; 0 for an unlabelled split."""
        return int(self.class_pixels().sum()) if self.labelled else 0

    def require_labels(self, key: str, why: str) -> None:
        """DataError naming the split and the setting ``key`` unless it has labelled pixels (``why``: who needs
        them)."""
        if not self.labelled:
            raise DataError(f"{self.root}: {key}: this split is unlabelled (prepared with dataset.labels: false); "
                            f"{why} needs labels")
        if self.class_counts is not None and self.labelled_pixels() == 0:
            raise DataError(f"{self.root}: {key}: every label pixel is 255 (ignore), so there is nothing to learn "
                            f"from; {why} needs labels (see the warning in {self.root / 'meta.json'})")

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Image (uint8 H x W x 3, RGB) and train-id label (uint8 H x W; all 255 = ignore in an unlabelled split)
        of sample ``i``."""
        image = self.load_image(i)
        return image, self.load_label(i, image.shape[:2])

    def load_image(self, i: int) -> np.ndarray:
        """Image of sample ``i`` (uint8 H x W x 3, RGB), without its label (a training domain that does not
        train on its labels never decodes them)."""
        return read_image(self.image_paths[i], self.image_bits)

    def load_label(self, i: int, image_hw: tuple[int, int]) -> np.ndarray:
        """Train-id label of sample ``i`` (uint8 H x W; all 255 = ignore in an unlabelled split), checked against
        its image's size ``image_hw``."""
        path = self.label_paths[i]
        if path is None:
            return np.full(image_hw, 255, np.uint8)
        label = read_train_id_png(path)
        if tuple(image_hw) != label.shape:
            raise DataError(f"{path}: label is {label.shape} but image is {tuple(image_hw)}")
        return label


class PreparedDataset(Dataset):
    """A torch Dataset over a PreparedSplit; items are dicts ``{"image", "label", "name", "index"}``.

    ``image`` is uint8 H x W x 3 RGB and ``label`` uint8 H x W (numpy); ``transform``, if given, is called on the
    dict and its return value is the item.
    """

    def __init__(self, split: PreparedSplit | str | Path, transform: Callable[[dict], Any] | None = None):
        self.split = split if isinstance(split, PreparedSplit) else PreparedSplit(split)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> Any:
        image, label = self.split.load(index)
        item = {"image": image, "label": label, "name": self.split.names[index], "index": int(index)}
        return self.transform(item) if self.transform is not None else item
