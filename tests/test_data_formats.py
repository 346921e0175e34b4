"""Each dataset format, built on disk in its real layout, prepared and checked pixel for pixel."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import scipy.io
from PIL import Image

from cpsl.config import DatasetConfig, PrepareConfig
from cpsl.data import FORMATS, cityscapes, gta5, synthia
from cpsl.data import folder as folder_fmt
from cpsl.data.prepared import PreparedDataset, PreparedSplit
from cpsl.steps import prepare

I = 255  # noqa: E741
H, W = 8, 12
# Hand-written: Cityscapes labelId 0..33 -> 19-class train id.
CITY_19 = [I, I, I, I, I, I, I, 0, 1, I, I, 2, 3, 4, I, I, I, 5, I, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, I, I, 16, 17, 18]
# SYNTHIA ids of the 16 classes, in train-id order.
SYN_16 = [3, 4, 2, 21, 5, 7, 15, 9, 6, 1, 10, 17, 8, 19, 12, 11]


def write_rgb(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.ascontiguousarray(rgb[:, :, ::-1]))


def random_rgb(rng: np.random.Generator, h: int = H, w: int = W) -> np.ndarray:
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def write_gray(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8), mode="L").save(path)


def write_palette(path: Path, arr: np.ndarray) -> None:
    """A P-mode PNG whose indices are ``arr`` (colours are arbitrary, like the GTA5 release's palette)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(arr.astype(np.uint8), mode="P")
    pal = np.random.default_rng(7).integers(0, 256, 768).astype(np.uint8)
    img.putpalette(pal.tobytes())
    img.save(path)


def all_ids_label(rng: np.random.Generator, n_ids: int, h: int = H, w: int = W) -> np.ndarray:
    """A label map holding every id 0..n_ids-1 at least once, shuffled."""
    vals = np.arange(h * w) % n_ids
    return rng.permutation(vals).reshape(h, w)


def make_cityscapes(root: Path, split: str = "train", seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """2 cities x 2 images; returns name -> (rgb, labelIds)."""
    rng = np.random.default_rng(seed)
    out = {}
    for city in ("aachen", "bochum"):
        for k in range(2):
            stem = f"{city}_{k:06d}_000019"
            rgb, raw = random_rgb(rng), all_ids_label(rng, 34).astype(np.uint8)
            write_rgb(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", rgb)
            write_gray(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", raw)
            # Other gtFine files of the release must be ignored.
            write_gray(root / "gtFine" / split / city / f"{stem}_gtFine_instanceIds.png", raw)
            out[f"{city}/{stem}"] = (rgb, raw)
    return out


def make_gta5(root: Path, n: int = 4, seed: int = 1, split_mat: bool = True) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(1, n + 1):
        name = f"{i:05d}"
        rgb, raw = random_rgb(rng), all_ids_label(rng, 35).astype(np.uint8)  # 34 = license plate
        write_rgb(root / "images" / f"{name}.png", rgb)
        write_palette(root / "labels" / f"{name}.png", raw)
        out[name] = (rgb, raw)
    if split_mat:
        scipy.io.savemat(str(root / "split.mat"), {
            "trainIds": np.array([[3], [1]]), "valIds": np.array([[2]]), "testIds": np.array([[4]]),
        })
    return out


def make_synthia(root: Path, n: int = 3, seed: int = 2) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(n):
        name = f"{i:07d}"
        rgb = random_rgb(rng)
        ids = all_ids_label(rng, 23).astype(np.uint16)
        lab = np.zeros((H, W, 3), dtype=np.uint16)
        lab[:, :, 0] = ids                                             # R: class id
        lab[:, :, 1] = rng.integers(0, 60000, (H, W), dtype=np.uint16)  # G: instance id, must be ignored
        write_rgb(root / "RGB" / f"{name}.png", rgb)
        (root / "GT" / "LABELS").mkdir(parents=True, exist_ok=True)
        assert cv2.imwrite(str(root / "GT" / "LABELS" / f"{name}.png"), np.ascontiguousarray(lab[:, :, ::-1]))
        out[name] = (rgb, ids)
    return out


def cfg(fmt: str, root: Path, split: str, n_class: int = 19, **kw) -> PrepareConfig:
    lab_stats = kw.pop("lab_stats", True)
    ds = DatasetConfig(format=fmt, root=root, split=split, n_class=n_class, workers=kw.pop("workers", 0), **kw)
    return PrepareConfig(dataset=ds, lab_stats=lab_stats)


def read_out_label(out: Path, name: str) -> np.ndarray:
    img = Image.open(out / "labels" / f"{name}.png")
    assert img.mode == "L"
    return np.array(img)


def test_registry_lists_all_formats() -> None:
    assert set(FORMATS) == {"cityscapes", "gta5", "synthia", "folder"}


def test_cityscapes(tmp_path: Path) -> None:
    data = make_cityscapes(tmp_path / "cs", "val")
    samples, problems = cityscapes.scan(tmp_path / "cs", "val")
    assert problems == []
    assert [s.name for s in samples] == sorted(data)
    assert samples[0].name == "aachen/aachen_000000_000019"

    out = tmp_path / "prep"
    meta = prepare.run(cfg("cityscapes", tmp_path / "cs", "val"), out)
    assert meta["n_images"] == 4 and meta["skipped"] == []
    for name, (rgb, raw) in data.items():
        expected = np.array(CITY_19, dtype=np.uint8)[raw]
        assert np.array_equal(read_out_label(out, name), expected), name
    lines = (out / "list.txt").read_text().splitlines()
    assert [ln.split("\t")[0] for ln in lines] == sorted(data)
    first = lines[0].split("\t")
    assert Path(first[1]).is_absolute() and first[1].endswith("aachen_000000_000019_leftImg8bit.png")
    assert first[2] == "labels/aachen/aachen_000000_000019.png"

    split = PreparedSplit(out)
    assert len(split) == 4 and split.n_class == 19 and split.classes[0] == "road"
    image, label = split.load(0)
    rgb0, raw0 = data[split.names[0]]
    assert image.dtype == np.uint8 and np.array_equal(image, rgb0)
    assert np.array_equal(label, np.array(CITY_19, dtype=np.uint8)[raw0])
    item = PreparedDataset(split)[1]
    assert item["name"] == split.names[1] and item["index"] == 1 and item["label"].shape == (H, W)
    assert PreparedDataset(out, transform=lambda d: d["name"])[2] == split.names[2]


def test_cityscapes_16_classes(tmp_path: Path) -> None:
    data = make_cityscapes(tmp_path / "cs")
    out = tmp_path / "prep"
    prepare.run(cfg("cityscapes", tmp_path / "cs", "train", n_class=16), out)
    # 22 terrain, 27 truck, 31 train -> ignore; 23 sky -> 9; 33 bicycle -> 15
    name, (_, raw) = next(iter(data.items()))
    got = read_out_label(out, name)
    for raw_id, want in ((22, I), (27, I), (31, I), (23, 9), (33, 15), (7, 0), (0, I)):
        assert (got[raw == raw_id] == want).all(), raw_id


def test_gta5_palette_labels_and_split_mat(tmp_path: Path) -> None:
    root = tmp_path / "gta"
    data = make_gta5(root)
    assert Image.open(root / "labels" / "00001.png").mode == "P"
    assert np.array_equal(gta5.read_raw_label(root / "labels" / "00001.png"), data["00001"][1])

    out = tmp_path / "all"
    meta = prepare.run(cfg("gta5", root, "all"), out)
    assert meta["n_images"] == 4
    lut = np.array(CITY_19 + [I], dtype=np.uint8)  # 34 (license plate) -> ignore
    for name, (_, raw) in data.items():
        assert np.array_equal(read_out_label(out, name), lut[raw]), name

    train = tmp_path / "train"
    prepare.run(cfg("gta5", root, "train"), train)
    assert PreparedSplit(train).names == ["00001", "00003"]
    assert gta5.scan(root, "val")[0][0].name == "00002"
    assert [s.name for s in gta5.scan(root, "test")[0]] == ["00004"]


def test_gta5_grayscale_labels_accepted(tmp_path: Path) -> None:
    root = tmp_path / "gta"
    data = make_gta5(root, n=1, split_mat=False)
    write_gray(root / "labels" / "00001.png", data["00001"][1])
    out = tmp_path / "prep"
    prepare.run(cfg("gta5", root, "all"), out)
    lut = np.array(CITY_19 + [I], dtype=np.uint8)
    assert np.array_equal(read_out_label(out, "00001"), lut[data["00001"][1]])


def test_synthia_16bit_channel0(tmp_path: Path) -> None:
    root = tmp_path / "syn"
    data = make_synthia(root)
    name0 = sorted(data)[0]
    assert np.array_equal(synthia.read_raw_label(root / "GT" / "LABELS" / f"{name0}.png"), data[name0][1])
    out = tmp_path / "prep"
    meta = prepare.run(cfg("synthia", root, "all", n_class=16), out)
    assert meta["n_images"] == 3 and meta["classes"][9] == "sky"
    lut = np.full(23, I, dtype=np.uint8)
    for train_id, raw_id in enumerate(SYN_16):
        lut[raw_id] = train_id
    for name, (_, ids) in data.items():
        assert np.array_equal(read_out_label(out, name), lut[ids]), name


def test_synthia_single_channel_16bit(tmp_path: Path) -> None:
    root = tmp_path / "syn"
    data = make_synthia(root, n=1)
    name, (_, ids) = next(iter(data.items()))
    assert cv2.imwrite(str(root / "GT" / "LABELS" / f"{name}.png"), ids)
    assert np.array_equal(synthia.read_raw_label(root / "GT" / "LABELS" / f"{name}.png"), ids)


def test_folder_format(tmp_path: Path) -> None:
    root = tmp_path / "mine"
    root.mkdir()
    (root / "classes.txt").write_text("Road surface\nsky / clouds\nthing #3\n\n", encoding="utf-8")
    rng = np.random.default_rng(3)
    expected = {}
    for split in ("train", "val"):
        for k, suffix in enumerate((".png", ".jpg")):
            name = f"{split}_{k}"
            rgb = random_rgb(rng)
            lab = rng.choice(np.array([0, 1, 2, 255], dtype=np.uint8), size=(H, W))
            write_rgb(root / "images" / split / f"{name}{suffix}", rgb)
            write_gray(root / "labels" / split / f"{name}.png", lab)
            expected[(split, name)] = lab
    assert folder_fmt.class_names(root) == ("Road surface", "sky / clouds", "thing #3")
    out = tmp_path / "prep"
    meta = prepare.run(cfg("folder", root, "val", n_class=3), out)
    assert meta["classes"] == ["Road surface", "sky / clouds", "thing #3"]
    assert PreparedSplit(out).names == ["val_0", "val_1"]
    for (split, name), lab in expected.items():
        if split == "val":
            assert np.array_equal(read_out_label(out, name), lab)
    counts = PreparedSplit(out).class_counts
    assert counts["classes"] == meta["classes"] and len(counts["pixels"]) == 3
