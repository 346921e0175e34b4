"""Label tables against hand-written expectations (not computed from cpsl.labels)."""

from __future__ import annotations

import numpy as np
import pytest

from cpsl import labels

I = 255  # noqa: E741  (ignore)

# Cityscapes labelId 0..33 -> train id, written out by hand from the Cityscapes label table.
CITY_19 = [I, I, I, I, I, I, I, 0, 1, I, I, 2, 3, 4, I, I, I, 5, I, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, I, I, 16, 17, 18]
CITY_16 = [I, I, I, I, I, I, I, 0, 1, I, I, 2, 3, 4, I, I, I, 5, I, 6, 7, 8, I, 9, 10, 11, 12, I, 13, I, I, I, 14, 15]
CITY_13 = [I, I, I, I, I, I, I, 0, 1, I, I, 2, I, I, I, I, I, I, I, 3, 4, 5, I, 6, 7, 8, 9, I, 10, I, I, I, 11, 12]

# SYNTHIA raw ids in train-id order (reference synthia_dataset.py).
SYN_19 = [3, 4, 2, 21, 5, 7, 15, 9, 6, 16, 1, 10, 17, 8, 18, 19, 20, 12, 11]
SYN_16 = [3, 4, 2, 21, 5, 7, 15, 9, 6, 1, 10, 17, 8, 19, 12, 11]
SYN_13 = [3, 4, 2, 15, 9, 6, 1, 10, 17, 8, 19, 12, 11]


@pytest.mark.parametrize("n_class, expected", [(19, CITY_19), (16, CITY_16), (13, CITY_13)])
def test_cityscapes_label_ids(n_class: int, expected: list[int]) -> None:
    assert len(expected) == 34
    lut = labels.cityscapes_lut(n_class)
    assert lut.dtype == np.uint8
    assert lut[:34].tolist() == expected
    assert (lut[34:] == I).all()
    raw = np.arange(34, dtype=np.uint8).reshape(2, 17)
    assert labels.apply_lut(raw, lut).ravel().tolist() == expected


def test_class_name_lists() -> None:
    assert labels.class_names(19)[:3] == ("road", "sidewalk", "building")
    assert labels.class_names(19)[-1] == "bicycle"
    assert len(labels.class_names(16)) == 16 and "terrain" not in labels.class_names(16)
    assert labels.class_names(13) == (
        "road", "sidewalk", "building", "traffic_light", "traffic_sign", "vegetation", "sky", "person", "rider",
        "car", "bus", "motorcycle", "bicycle",
    )
    with pytest.raises(ValueError):
        labels.class_names(18)


def test_gta5_ids_use_cityscapes_table_and_34_is_ignored() -> None:
    from cpsl.data import gta5

    lut = gta5.lut(19)
    assert lut[:34].tolist() == CITY_19
    assert lut[34] == I
    assert 34 in gta5.KNOWN_IDS and 35 not in gta5.KNOWN_IDS


@pytest.mark.parametrize("n_class, ids", [(19, SYN_19), (16, SYN_16), (13, SYN_13)])
def test_synthia_ids(n_class: int, ids: list[int]) -> None:
    lut = labels.synthia_lut(n_class)
    assert lut.size == 65536
    for train_id, raw in enumerate(ids):
        assert lut[raw] == train_id, (raw, train_id)
    others = [v for v in range(23) if v not in ids] + [23, 255, 1000, 65535]
    assert all(lut[v] == I for v in others)
    raw = np.array([[ids[0], 0], [ids[-1], 22]], dtype=np.uint16)
    assert labels.apply_lut(raw, lut).tolist() == [[0, I], [n_class - 1, I]]


def test_identity_lut_and_unknown_ids() -> None:
    lut = labels.identity_lut(3)
    assert lut[:4].tolist() == [0, 1, 2, I] and lut[255] == I
    raw = np.array([[0, 7, 200], [33, 7, 0]], dtype=np.uint8)
    assert labels.unknown_ids(raw, labels.CITYSCAPES_KNOWN_IDS) == [200]


def test_colorize_palette() -> None:
    ids = np.array([[0, 13], [10, I]], dtype=np.uint8)
    rgb = labels.colorize(ids)
    assert rgb.shape == (2, 2, 3) and rgb.dtype == np.uint8
    assert rgb[0, 0].tolist() == [128, 64, 128]   # road
    assert rgb[0, 1].tolist() == [0, 0, 142]      # car
    assert rgb[1, 0].tolist() == [70, 130, 180]   # sky
    assert rgb[1, 1].tolist() == [0, 0, 0]        # ignore
    # In the 16-class set car is train id 12 and sky 9.
    rgb16 = labels.colorize(np.array([[12, 9]], dtype=np.uint8), labels.class_names(16))
    assert rgb16[0].tolist() == [[0, 0, 142], [70, 130, 180]]
