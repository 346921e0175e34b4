"""Dataset readers, one module per on-disk format, all with the same small interface.

Each module in ``FORMATS`` provides::

    scan(root: Path, split: str) -> tuple[list[Sample], list[Problem]]   # sorted by sample name
    read_raw_label(path: Path) -> np.ndarray                             # raw ids as stored
    lut(n_class: int) -> np.ndarray                                      # raw id -> train id (255 = ignore)
    known_ids(n_class: int) -> frozenset[int]                            # raw ids the format defines
    classes(root: Path, n_class: int) -> tuple[str, ...]                 # class names in train-id order

``prepare`` turns any of them into a prepared split (``cpsl.data.prepared.PreparedSplit``), which is what every
later step reads.
"""

from __future__ import annotations

from types import ModuleType

from cpsl.data import cityscapes, folder, gta5, synthia

FORMATS: dict[str, ModuleType] = {
    "cityscapes": cityscapes,
    "gta5": gta5,
    "synthia": synthia,
    "folder": folder,
}


def get_format(name: str) -> ModuleType:
    """The reader module of format ``name``; ConfigError naming ``dataset.format`` if unknown."""
    try:
        return FORMATS[name]
    except KeyError:
        from cpsl.errors import ConfigError

        raise ConfigError(f"dataset.format: {name!r} is not one of {', '.join(FORMATS)}") from None
