"""Label definitions: the Cityscapes table, the GTA5 and SYNTHIA raw-id maps, class subsets, palette.

Every on-disk label format is turned into *train ids* by one lookup table (``build_lut`` + ``apply_lut``):
``train_id = lut[raw_id]``. Train ids index the classes of the chosen class set (19, 16 or 13 classes, in
Cityscapes train-id order); everything else becomes ``IGNORE_INDEX``.

The official CPSL code marks ignored pixels with 250. We store and train with 255, the value Cityscapes'
own ``*_labelTrainIds.png`` files use, so our prepared label PNGs open correctly in other tools; the
metrics mask (``0 <= gt < n_class``) is the same either way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IGNORE_INDEX = 255


@dataclass(frozen=True)
class Label:
    name: str
    label_id: int  # Cityscapes labelId (the value in *_gtFine_labelIds.png and in GTA5 label PNGs)
    train_id: int  # index among the 19 evaluated classes, or IGNORE_INDEX
    color: tuple[int, int, int]


# The full Cityscapes label table (cityscapesScripts `labels.py`), labelIds 0..33. License plate (-1) is
# not stored in labelIds PNGs and is left out.
CITYSCAPES_LABELS: tuple[Label, ...] = (
    Label("unlabeled", 0, IGNORE_INDEX, (0, 0, 0)),
    Label("ego_vehicle", 1, IGNORE_INDEX, (0, 0, 0)),
    Label("rectification_border", 2, IGNORE_INDEX, (0, 0, 0)),
    Label("out_of_roi", 3, IGNORE_INDEX, (0, 0, 0)),
    Label("static", 4, IGNORE_INDEX, (0, 0, 0)),
    Label("dynamic", 5, IGNORE_INDEX, (111, 74, 0)),
    Label("ground", 6, IGNORE_INDEX, (81, 0, 81)),
    Label("road", 7, 0, (128, 64, 128)),
    Label("sidewalk", 8, 1, (244, 35, 232)),
    Label("parking", 9, IGNORE_INDEX, (250, 170, 160)),
    Label("rail_track", 10, IGNORE_INDEX, (230, 150, 140)),
    Label("building", 11, 2, (70, 70, 70)),
    Label("wall", 12, 3, (102, 102, 156)),
    Label("fence", 13, 4, (190, 153, 153)),
    Label("guard_rail", 14, IGNORE_INDEX, (180, 165, 180)),
    Label("bridge", 15, IGNORE_INDEX, (150, 100, 100)),
    Label("tunnel", 16, IGNORE_INDEX, (150, 120, 90)),
    Label("pole", 17, 5, (153, 153, 153)),
    Label("polegroup", 18, IGNORE_INDEX, (153, 153, 153)),
    Label("traffic_light", 19, 6, (250, 170, 30)),
    Label("traffic_sign", 20, 7, (220, 220, 0)),
    Label("vegetation", 21, 8, (107, 142, 35)),
    Label("terrain", 22, 9, (152, 251, 152)),
    Label("sky", 23, 10, (70, 130, 180)),
    Label("person", 24, 11, (220, 20, 60)),
    Label("rider", 25, 12, (255, 0, 0)),
    Label("car", 26, 13, (0, 0, 142)),
    Label("truck", 27, 14, (0, 0, 70)),
    Label("bus", 28, 15, (0, 60, 100)),
    Label("caravan", 29, IGNORE_INDEX, (0, 0, 90)),
    Label("trailer", 30, IGNORE_INDEX, (0, 0, 110)),
    Label("train", 31, 16, (0, 80, 100)),
    Label("motorcycle", 32, 17, (0, 0, 230)),
    Label("bicycle", 33, 18, (119, 11, 32)),
)

# The 19 evaluated classes in train-id order (the names used in metrics.json and the results table).
CLASSES_19: tuple[str, ...] = tuple(
    lab.name for lab in sorted((l for l in CITYSCAPES_LABELS if l.train_id != IGNORE_INDEX), key=lambda l: l.train_id)
)
# SYNTHIA protocols: 16 classes (no terrain, truck, train) and 13 classes (also no wall, fence, pole).
CLASSES_16: tuple[str, ...] = tuple(c for c in CLASSES_19 if c not in ("terrain", "truck", "train"))
CLASSES_13: tuple[str, ...] = tuple(c for c in CLASSES_16 if c not in ("wall", "fence", "pole"))
CLASS_SETS: dict[int, tuple[str, ...]] = {19: CLASSES_19, 16: CLASSES_16, 13: CLASSES_13}

NAME_TO_LABEL_ID: dict[str, int] = {lab.name: lab.label_id for lab in CITYSCAPES_LABELS}
NAME_TO_COLOR: dict[str, tuple[int, int, int]] = {lab.name: lab.color for lab in CITYSCAPES_LABELS}

# Raw ids in the label files of each format: anything outside these sets is an *unknown* id (a corrupt or
# foreign label file), which `prepare` reports by file name.
# GTA5 label PNGs use Cityscapes labelIds 0..33 plus 34 (license plate in the GTA5 release).
CITYSCAPES_KNOWN_IDS: frozenset[int] = frozenset(range(34))
GTA5_KNOWN_IDS: frozenset[int] = frozenset(range(35))

# SYNTHIA-RAND-CITYSCAPES class ids (channel 0 of GT/LABELS/*.png). 0 void, 13 parking-slot, 14 road-work and
# 22 lane-marking are not evaluated.
SYNTHIA_IDS: dict[str, int] = {
    "sky": 1, "building": 2, "road": 3, "sidewalk": 4, "fence": 5, "vegetation": 6, "pole": 7, "car": 8,
    "traffic_sign": 9, "person": 10, "bicycle": 11, "motorcycle": 12, "traffic_light": 15, "terrain": 16,
    "rider": 17, "truck": 18, "bus": 19, "train": 20, "wall": 21,
}
SYNTHIA_KNOWN_IDS: frozenset[int] = frozenset(range(23))


def class_names(n_class: int) -> tuple[str, ...]:
    """The class names of the 19-, 16- or 13-class protocol, in train-id order."""
    try:
        return CLASS_SETS[n_class]
    except KeyError:
        raise ValueError(f"n_class must be one of 19, 16, 13 (got {n_class})") from None


def build_lut(raw_ids: dict[str, int], names: tuple[str, ...] | list[str], size: int = 256) -> np.ndarray:
    """Lookup table mapping raw id -> index of its class name in ``names``; other ids -> IGNORE_INDEX.

    ``raw_ids`` maps class name -> raw id in the file format. Raw ids whose class is not in ``names``
    (void classes, or classes dropped by a 16/13-class protocol) map to IGNORE_INDEX.
    """
    lut = np.full(size, IGNORE_INDEX, dtype=np.uint8)
    for train_id, name in enumerate(names):
        if name not in raw_ids:
            raise KeyError(f"class {name!r} has no raw id in this label format")
        lut[raw_ids[name]] = train_id
    return lut


def cityscapes_lut(n_class: int = 19) -> np.ndarray:
    """labelIds (Cityscapes gtFine and GTA5 labels) -> train ids of the n_class protocol."""
    return build_lut(NAME_TO_LABEL_ID, class_names(n_class))


def synthia_lut(n_class: int = 16) -> np.ndarray:
    """SYNTHIA raw class ids -> train ids of the n_class protocol. 16-bit sized, as SYNTHIA PNGs are 16-bit."""
    return build_lut(SYNTHIA_IDS, class_names(n_class), size=1 << 16)


def identity_lut(n_class: int) -> np.ndarray:
    """Generic folder format: labels are already train ids 0..n_class-1 (255 = ignore)."""
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    lut[:n_class] = np.arange(n_class, dtype=np.uint8)
    return lut


def apply_lut(raw: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """Convert a raw label map to train ids (uint8) with one table lookup."""
    if raw.dtype not in (np.uint8, np.uint16):
        raw = raw.astype(np.int64)
        if raw.min(initial=0) < 0 or raw.max(initial=0) >= lut.size:
            raise ValueError(f"label ids outside 0..{lut.size - 1}")
    return lut[raw]


def unknown_ids(raw: np.ndarray, known: frozenset[int]) -> list[int]:
    """Raw ids present in ``raw`` that the format does not define (sorted)."""
    present = np.unique(raw)
    return [int(v) for v in present if int(v) not in known]


def palette(names: tuple[str, ...] | list[str]) -> np.ndarray:
    """(256, 3) uint8 colour table for train-id maps: class colours, ignore and unused ids black."""
    pal = np.zeros((256, 3), dtype=np.uint8)
    for i, name in enumerate(names):
        pal[i] = NAME_TO_COLOR.get(name, (0, 0, 0))
    return pal


def colorize(train_ids: np.ndarray, names: tuple[str, ...] | list[str] = CLASSES_19) -> np.ndarray:
    """RGB image (H, W, 3) of a train-id map in the Cityscapes palette."""
    return palette(names)[train_ids]
