"""``prepare``: bad inputs give one-line DataErrors naming the file; outputs are atomic and reproducible."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from cpsl.config import DatasetConfig, PrepareConfig
from cpsl.data.common import read_image, read_index_png, write_label_png
from cpsl.data.prepared import PreparedSplit
from cpsl.errors import ConfigError, DataError
from cpsl.steps import prepare

H, W = 6, 10


def write_rgb(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.ascontiguousarray(rgb[:, :, ::-1]))


def write_gray(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(arr, dtype=np.uint8), mode="L").save(path)


def city_paths(root: Path, city: str, k: int, split: str = "train") -> tuple[Path, Path]:
    stem = f"{city}_{k:06d}_000019"
    return (root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png",
            root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png")


def make_cityscapes(root: Path, n: int = 3, seed: int = 0) -> list[tuple[Path, Path]]:
    rng = np.random.default_rng(seed)
    pairs = []
    for k in range(n):
        img, lab = city_paths(root, "zurich", k)
        write_rgb(img, rng.integers(0, 256, (H, W, 3), dtype=np.uint8))
        write_gray(lab, rng.integers(0, 34, (H, W)))
        pairs.append((img, lab))
    return pairs


def make_gta5(root: Path, n: int = 3, seed: int = 1) -> list[tuple[Path, Path]]:
    rng = np.random.default_rng(seed)
    pairs = []
    for i in range(1, n + 1):
        img, lab = root / "images" / f"{i:05d}.png", root / "labels" / f"{i:05d}.png"
        write_rgb(img, rng.integers(0, 256, (H, W, 3), dtype=np.uint8))
        write_gray(lab, rng.integers(0, 35, (H, W)))
        pairs.append((img, lab))
    return pairs


def cfg(fmt: str, root: Path, split: str = "train", n_class: int = 19, **kw) -> PrepareConfig:
    lab_stats = kw.pop("lab_stats", True)
    ds = DatasetConfig(format=fmt, root=root, split=split, n_class=n_class, workers=kw.pop("workers", 0), **kw)
    return PrepareConfig(dataset=ds, lab_stats=lab_stats)


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def expect_error(config: PrepareConfig, out: Path, *fragments: str, cls: type = DataError) -> str:
    with pytest.raises(cls) as info:
        prepare.run(config, out)
    msg = str(info.value)
    assert "\n" not in msg, msg
    for frag in fragments:
        assert frag in msg, (frag, msg)
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.tmp-*")), "temp dir left behind"
    return msg


# ---------------------------------------------------------------------------------------------------- bad input


def test_image_without_label_fails_then_skips(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "gta"
    pairs = make_gta5(root, n=3)
    pairs[1][1].unlink()  # 00002 has no label, like 25 images of the GTA5 release
    msg = expect_error(cfg("gta5", root, "all"), tmp_path / "out", "00002.png", "allow_skip: true", "1 problem")
    assert "image without label" in msg

    out = tmp_path / "out"
    meta = prepare.run(cfg("gta5", root, "all", allow_skip=True), out)
    assert meta["n_images"] == 2
    skipped = json.loads((out / "meta.json").read_text())["skipped"]
    assert skipped == [{"file": str(pairs[1][0]), "reason": skipped[0]["reason"]}]
    assert PreparedSplit(out).names == ["00001", "00003"]
    assert "00002.png" in capsys.readouterr().err


def test_label_without_image(tmp_path: Path) -> None:
    root = tmp_path / "cs"
    pairs = make_cityscapes(root)
    pairs[2][0].unlink()
    expect_error(cfg("cityscapes", root), tmp_path / "out", "zurich_000002_000019_gtFine_labelIds.png",
                 "label without image")


def test_truncated_png_raises_everywhere(tmp_path: Path) -> None:
    root = tmp_path / "cs"
    pairs = make_cityscapes(root)
    big = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    write_rgb(pairs[0][0], big)
    write_gray(pairs[0][1], np.full((64, 64), 7))
    truncate(pairs[0][0])
    with pytest.raises(DataError, match="zurich_000000_000019_leftImg8bit.png"):
        read_image(pairs[0][0])
    expect_error(cfg("cityscapes", root), tmp_path / "out", str(pairs[0][0]), "truncated", "allow_skip")
    # A truncated label is caught too.
    make_cityscapes(root)
    truncate(pairs[1][1])
    with pytest.raises(DataError, match="zurich_000001_000019_gtFine_labelIds.png"):
        read_index_png(pairs[1][1])
    expect_error(cfg("cityscapes", root), tmp_path / "out", "zurich_000001_000019_gtFine_labelIds.png")


def test_truncated_jpeg_raises(tmp_path: Path) -> None:
    path = tmp_path / "a.jpg"
    rgb = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assert cv2.imwrite(str(path), rgb)
    truncate(path)
    with pytest.raises(DataError, match="a.jpg"):
        read_image(path)


@pytest.mark.parametrize("content, reason", [(b"this is not an image at all", "not a readable"), (b"", "empty")])
def test_non_image_and_empty_files(tmp_path: Path, content: bytes, reason: str) -> None:
    root = tmp_path / "cs"
    pairs = make_cityscapes(root)
    pairs[1][0].write_bytes(content)
    expect_error(cfg("cityscapes", root), tmp_path / "out", "zurich_000001_000019_leftImg8bit.png", reason)
    make_cityscapes(root)
    pairs[2][1].write_bytes(content)
    expect_error(cfg("cityscapes", root), tmp_path / "out", "zurich_000002_000019_gtFine_labelIds.png", reason)


def test_size_mismatch(tmp_path: Path) -> None:
    root = tmp_path / "cs"
    pairs = make_cityscapes(root)
    write_gray(pairs[1][1], np.full((H + 1, W), 7))
    expect_error(cfg("cityscapes", root), tmp_path / "out", "zurich_000001_000019_gtFine_labelIds.png",
                 f"{H + 1}x{W}", f"{H}x{W}")


def test_expected_size(tmp_path: Path) -> None:
    root = tmp_path / "cs"
    make_cityscapes(root)
    expect_error(cfg("cityscapes", root, expected_size=[H, W + 2]), tmp_path / "out",
                 "zurich_000000_000019_leftImg8bit.png", "dataset.expected_size", "3 problems")
    prepare.run(cfg("cityscapes", root, expected_size=[H, W]), tmp_path / "out")


def test_unknown_label_id(tmp_path: Path) -> None:
    root = tmp_path / "cs"
    pairs = make_cityscapes(root)
    lab = np.full((H, W), 7)
    lab[2, 3] = 200
    write_gray(pairs[2][1], lab)
    expect_error(cfg("cityscapes", root), tmp_path / "out", "zurich_000002_000019_gtFine_labelIds.png",
                 "unknown label ids [200]")
    meta = prepare.run(cfg("cityscapes", root, allow_skip=True), tmp_path / "out")
    assert meta["n_images"] == 2 and "200" in meta["skipped"][0]["reason"]


def test_rgb_label_refused(tmp_path: Path) -> None:
    root = tmp_path / "cs"
    pairs = make_cityscapes(root)
    write_rgb(pairs[0][1], np.zeros((H, W, 3), dtype=np.uint8))
    expect_error(cfg("cityscapes", root), tmp_path / "out", "zurich_000000_000019_gtFine_labelIds.png", "mode RGB")


def test_missing_and_empty_root(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    expect_error(cfg("cityscapes", missing), tmp_path / "out", str(missing), "dataset.root")
    empty = tmp_path / "empty"
    empty.mkdir()
    expect_error(cfg("gta5", empty, "all"), tmp_path / "out", str(empty), "dataset.root")
    # A root with the right folders but no images for the split.
    (empty / "images").mkdir()
    expect_error(cfg("gta5", empty, "all"), tmp_path / "out", str(empty), "dataset.root")
    # Every image skipped: no usable images.
    root = tmp_path / "gta"
    for img, _ in make_gta5(root, n=2):
        img.write_bytes(b"junk")
    expect_error(cfg("gta5", root, "all", allow_skip=True), tmp_path / "out", str(root), "no usable images",
                 "dataset.root")


def test_wrong_split_layouts(tmp_path: Path) -> None:
    root = tmp_path / "gta"
    make_gta5(root)
    expect_error(cfg("gta5", root, "train"), tmp_path / "out", str(root / "split.mat"))
    (root / "split.mat").write_bytes(b"garbage")
    expect_error(cfg("gta5", root, "val"), tmp_path / "out", str(root / "split.mat"))
    cs = tmp_path / "cs"
    make_cityscapes(cs)
    expect_error(cfg("cityscapes", cs, "val"), tmp_path / "out", str(cs / "leftImg8bit" / "val"))
    expect_error(cfg("cityscapes", cs, "all"), tmp_path / "out", "dataset.split")


def test_folder_class_count_mismatch(tmp_path: Path) -> None:
    root = tmp_path / "mine"
    write_rgb(root / "images" / "a.png", np.zeros((H, W, 3), dtype=np.uint8))
    write_gray(root / "labels" / "a.png", np.zeros((H, W)))
    (root / "classes.txt").write_text("one\ntwo\n")
    expect_error(cfg("folder", root, "all", n_class=3), tmp_path / "out", "classes.txt", "dataset.n_class", "3",
                 "2 classes", cls=ConfigError)
    (root / "classes.txt").unlink()
    expect_error(cfg("folder", root, "all", n_class=2), tmp_path / "out", "classes.txt")
    (root / "classes.txt").write_text("one\ntwo\n")
    write_gray(root / "labels" / "a.png", np.full((H, W), 2))  # id 2 is not a class of 2 and not 255
    expect_error(cfg("folder", root, "all", n_class=2), tmp_path / "out", "a.png", "unknown label ids [2]")


# ------------------------------------------------------------------------------------------ atomicity, outputs


def test_failed_prepare_keeps_previous_output(tmp_path: Path) -> None:
    root = tmp_path / "cs"
    pairs = make_cityscapes(root)
    out = tmp_path / "out"
    prepare.run(cfg("cityscapes", root), out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    truncate(pairs[1][0])
    with pytest.raises(DataError, match="zurich_000001"):
        prepare.run(cfg("cityscapes", root), out)
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cs", "out"]


def test_rerun_replaces_output_and_is_byte_identical(tmp_path: Path) -> None:
    root = tmp_path / "cs"
    make_cityscapes(root, n=5)
    a, b = tmp_path / "a", tmp_path / "b"
    prepare.run(cfg("cityscapes", root), a)
    prepare.run(cfg("cityscapes", root, workers=2), b)  # the process pool gives the same bytes
    (a / "stale.txt").write_text("from an older run")
    prepare.run(cfg("cityscapes", root), a)             # replaces the old folder as a whole
    files_a = {p.relative_to(a): p.read_bytes() for p in a.rglob("*") if p.is_file()}
    files_b = {p.relative_to(b): p.read_bytes() for p in b.rglob("*") if p.is_file()}
    assert files_a == files_b
    assert {str(p) for p in files_a} >= {"list.txt", "meta.json", "class_counts.json", "lab_stats.npy"}
    assert not list(tmp_path.glob(".*"))


def test_class_counts_sum_to_labelled_pixels(tmp_path: Path) -> None:
    root = tmp_path / "cs"
    make_cityscapes(root, n=4)
    out = tmp_path / "out"
    prepare.run(cfg("cityscapes", root, n_class=16), out)
    split = PreparedSplit(out)
    counts = json.loads((out / "class_counts.json").read_text())
    assert counts["images"] == 4 and len(counts["pixels"]) == 16
    assert sum(counts["pixels"]) + counts["ignore"] == 4 * H * W
    hist = np.zeros(256, dtype=np.int64)
    for i in range(len(split)):
        hist += np.bincount(split.load(i)[1].ravel(), minlength=256)
    assert hist[:16].tolist() == counts["pixels"] and hist[255] == counts["ignore"]
    assert hist[16:255].sum() == 0
    assert split.class_pixels().tolist() == counts["pixels"]


def test_lab_stats(tmp_path: Path) -> None:
    root = tmp_path / "gta"
    pairs = make_gta5(root, n=3)
    write_rgb(pairs[0][0], np.full((H, W, 3), 255, dtype=np.uint8))   # white
    write_rgb(pairs[1][0], np.zeros((H, W, 3), dtype=np.uint8))       # black
    half = np.zeros((H, W, 3), dtype=np.uint8)
    half[: H // 2] = 255                                                 # half white, half black
    write_rgb(pairs[2][0], half)
    out = tmp_path / "out"
    prepare.run(cfg("gta5", root, "all"), out)
    stats = np.load(out / "lab_stats.npy")
    assert stats.shape == (3, 2, 3) and stats.dtype == np.float32
    assert stats[0, 0, 0] == pytest.approx(100.0, abs=0.01)              # white: L mean 100
    assert np.abs(stats[0, 0, 1:]).max() < 0.01 and np.abs(stats[0, 1]).max() < 0.01
    assert np.abs(stats[1]).max() < 0.01                                 # black: all zero
    assert stats[2, 0, 0] == pytest.approx(50.0, abs=0.01)               # L in {0, 100}: mean 50, std 50
    assert stats[2, 1, 0] == pytest.approx(50.0, abs=0.01)
    assert np.array_equal(PreparedSplit(out).lab_stats, stats)
    prepare.run(cfg("gta5", root, "all", lab_stats=False), out)
    assert not (out / "lab_stats.npy").exists() and PreparedSplit(out).lab_stats is None


def test_prepared_split_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        PreparedSplit(tmp_path / "missing")
    root = tmp_path / "cs"
    make_cityscapes(root)
    out = tmp_path / "out"
    prepare.run(cfg("cityscapes", root), out)
    (out / "list.txt").write_text("only-a-name\n")
    with pytest.raises(DataError, match="list.txt"):
        PreparedSplit(out)
    (out / "meta.json").write_text("{not json")
    with pytest.raises(DataError, match="meta.json"):
        PreparedSplit(out)
    (out / "meta.json").unlink()
    with pytest.raises(DataError, match="meta.json"):
        PreparedSplit(out)


def test_write_label_png_is_atomic_and_exact(tmp_path: Path) -> None:
    arr = np.arange(60, dtype=np.uint8).reshape(6, 10)
    path = tmp_path / "sub" / "x.png"
    write_label_png(path, arr)
    assert np.array_equal(np.array(Image.open(path)), arr)
    assert [p.name for p in path.parent.iterdir()] == ["x.png"]
    with pytest.raises(ValueError):
        write_label_png(path, arr.astype(np.int32))
