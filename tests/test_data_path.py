"""The faster training data path (#21 item 5) gives the samples of the straightforward computation.

Each test compares a routine against the reference computation written out here (what the code did before:
PIL's resize of the whole image or label, then the crop; the LAB transfer of the whole image with float64
numpy statistics; the thresholded whole hard label). Exact where the routine is exact (labels, pseudo labels,
the LAB transfer on a block), within the stated tolerance where a value can move by rounding (the resized
image: PIL gets the crop's box in float32; the LAB statistics: cv2 sums and float32 storage).
"""

from __future__ import annotations

import random
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from cpsl.config import DatasetConfig, PrepareConfig
from cpsl.data import pseudo
from cpsl.data.common import read_index_png, read_train_id_png
from cpsl.data.prepared import PreparedSplit
from cpsl.data.lab import LabTransfer, lab_mean_std, lab_transfer
from cpsl.data.transforms import WeakConfig, WeakParams, sample_weak_params, weak_image, weak_label, weak_window
from cpsl.labels import IGNORE_INDEX
from cpsl.methods.distill import HardLabelExtras
from cpsl.steps import prepare
from cpsl.train.data import TrainDataset

# The resized crop against the whole-image resize (transforms.weak_image): each of PIL's two passes can round
# the other way (float32 box), so a value moves by at most 2 levels; the share of values that move, over many
# crops (measured on the benchmark's real-size images: 0.07-0.24 % on average, 5 % in the worst single crop).
MAX_LEVELS, MAX_SHARE = 2, 0.01


def ref_weak(image: np.ndarray, label: np.ndarray | None, p: WeakParams) -> tuple[np.ndarray, np.ndarray | None]:
    """The weak crop as computed before: PIL resize of the whole image (bilinear) and label (nearest), crop with
    0 / 255 padding, flip."""
    hs, ws = p.scaled_hw
    y1, x1, ch, cw = p.crop
    arr = np.asarray(Image.fromarray(image).resize((ws, hs), Image.Resampling.BILINEAR))
    out = np.zeros((ch, cw, 3), np.uint8)
    sub = arr[y1:y1 + ch, x1:x1 + cw]
    out[:sub.shape[0], :sub.shape[1]] = sub
    lab_out = None
    if label is not None:
        lab_s = np.asarray(Image.fromarray(label).resize((ws, hs), Image.Resampling.NEAREST))
        lab_out = np.full((ch, cw), IGNORE_INDEX, label.dtype)
        lsub = lab_s[y1:y1 + ch, x1:x1 + cw]
        lab_out[:lsub.shape[0], :lsub.shape[1]] = lsub
    if p.flip:
        out = out[:, ::-1]
        lab_out = None if lab_out is None else lab_out[:, ::-1]
    return out, lab_out


def ref_lab_transfer(image: np.ndarray, tm: np.ndarray, ts: np.ndarray) -> np.ndarray:
    """The LAB transfer as computed before: float64 numpy mean/std of the whole image."""
    lab = cv2.cvtColor(image.astype(np.float32) * np.float32(1 / 255), cv2.COLOR_RGB2Lab)
    flat = lab.reshape(-1, 3).astype(np.float64)
    mean, std = flat.mean(0), flat.std(0)
    gain = (np.asarray(ts, np.float64) / np.maximum(std, 1e-6)).astype(np.float32)
    offset = (np.asarray(tm, np.float64) - mean * ts / np.maximum(std, 1e-6)).astype(np.float32)
    rgb = cv2.cvtColor(lab * gain + offset, cv2.COLOR_Lab2RGB)
    return np.clip(rgb * 255.0, 0, 255).astype(np.uint8)


def scene(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A photo-like test image: smooth colour regions, edges and noise."""
    low = rng.integers(0, 256, (max(2, h // 16), max(2, w // 16), 3), dtype=np.uint8)
    img = cv2.resize(low, (w, h), interpolation=cv2.INTER_NEAREST).astype(np.int16)
    img = cv2.GaussianBlur(img.astype(np.float32), (0, 0), 1.5) + rng.normal(0, 12, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def weak_cases(h: int, w: int, crop: tuple[int, int], n: int) -> list[WeakParams]:
    """Random weak parameters at the presets' relative settings (scale 0.5-1.5 around 2200/2048 of the width),
    plus the edge cases: no scaling, a scaled image smaller than the crop, a crop at the bottom right."""
    cfg = WeakConfig(crop_hw=crop, resize_w=None, scale=(0.5, 1.5))
    cases = [sample_weak_params((h, w), cfg, random.Random(k)) for k in range(n)]
    ch, cw = crop
    cases += [WeakParams((h, w), (h, w), (3, 5, ch, cw), False),
              WeakParams((h, w), (ch // 2, cw // 2 + 3), (0, 0, ch, cw), True),
              WeakParams((h, w), (h + 37, w + 61), (h + 37 - ch, w + 61 - cw, ch, cw), True)]
    return cases


def test_weak_label_is_pils_nearest_resize_then_crop_exactly():
    rng = np.random.default_rng(0)
    for h, w in ((1052, 1914), (77, 130)):
        label = rng.integers(0, 20, (h, w)).astype(np.uint8)
        conf = rng.integers(0, 65536, (h, w)).astype(np.uint16)
        for p in weak_cases(h, w, (64, 112) if h < 100 else (512, 896), 12):
            _, ref = ref_weak(np.zeros((h, w, 3), np.uint8), label, p)
            got = weak_label(label, p)
            assert got.dtype == np.uint8 and np.array_equal(got, ref), p
            ref_conf = ref_weak(np.zeros((h, w, 3), np.uint8), conf.astype(np.int32), p)[1]
            assert np.array_equal(weak_label(conf, p), ref_conf), p  # PIL cannot resize uint16: int32 there


def test_weak_image_is_whole_image_resize_then_crop_within_rounding():
    rng = np.random.default_rng(1)
    image = scene(rng, 526, 957)  # GTA5's aspect ratio at half size
    diffs, n = 0, 0
    for p in weak_cases(526, 957, (256, 448), 16):
        ref, _ = ref_weak(image, None, p)
        got = weak_image(image, p)
        d = np.abs(got.astype(int) - ref.astype(int))
        assert got.shape == ref.shape and d.max() <= MAX_LEVELS, p
        diffs, n = diffs + int((d > 0).sum()), n + d.size
        # the padding is exactly 0 and the pixels read are inside the window
        y1, x1, ch, cw = p.crop
        oh, ow = max(0, min(ch, p.scaled_hw[0] - y1)), max(0, min(cw, p.scaled_hw[1] - x1))
        unflipped = got[:, ::-1] if p.flip else got
        assert not unflipped[oh:].any() and not unflipped[:, ow:].any()
    assert diffs / n <= MAX_SHARE, diffs / n


def test_pointwise_colour_on_the_window_equals_colour_on_the_whole_image():
    rng = np.random.default_rng(2)
    image = scene(rng, 300, 540)
    transfer = LabTransfer.fit(lab_mean_std(image), [60.0, 5.0, -3.0], [15.0, 8.0, 9.0])
    whole = transfer(image)
    for p in weak_cases(300, 540, (128, 224), 8):
        assert np.array_equal(weak_image(image, p, transfer), weak_image(whole, p)), p
        y0, y1, x0, x1 = weak_window(p)
        assert 0 <= y0 < y1 <= 300 and 0 <= x0 < x1 <= 540


def test_lab_statistics_match_float64_numpy():
    rng = np.random.default_rng(3)
    for img in (scene(rng, 200, 300), np.full((20, 30, 3), 77, np.uint8), rng.integers(0, 256, (50, 40, 3),
                                                                                           dtype=np.uint8)):
        lab = cv2.cvtColor(img.astype(np.float32) / np.float32(255), cv2.COLOR_RGB2Lab).reshape(-1, 3)
        ref = np.stack([lab.astype(np.float64).mean(0), lab.astype(np.float64).std(0)])
        np.testing.assert_allclose(lab_mean_std(img), ref, rtol=1e-9, atol=1e-9)


def test_lab_transfer_within_one_level_of_the_float64_reference():
    """The gain and offset are float32 either way; cv2's statistics (and their float32 storage in
    lab_stats.npy) move them by at most an ulp, so a truncated value flips by 1 level, rarely."""
    rng = np.random.default_rng(4)
    flips, n = 0, 0
    for k in range(6):
        src, tgt = scene(rng, 240, 320), scene(rng, 60, 80)
        tm, ts = lab_mean_std(tgt).astype(np.float32)
        ref = ref_lab_transfer(src, tm, ts)
        for stats in (None, lab_mean_std(src).astype(np.float32)):
            d = np.abs(lab_transfer(src, tm, ts, stats=stats).astype(int) - ref.astype(int))
            assert d.max() <= 1
            flips, n = flips + int(d.sum()), n + d.size
    assert flips / n <= 1e-4, flips / n


def test_train_id_pngs_decode_as_with_pil(tmp_path: Path):
    rng = np.random.default_rng(5)
    ids = rng.integers(0, 256, (33, 47)).astype(np.uint8)
    gray = tmp_path / "gray.png"
    assert cv2.imwrite(str(gray), ids)
    assert np.array_equal(read_train_id_png(gray), np.asarray(Image.open(gray)))
    pal = tmp_path / "pal.png"
    img = Image.fromarray(ids, "P")
    img.putpalette(rng.integers(0, 256, 768).astype(np.uint8).tobytes())
    img.save(pal)
    assert np.array_equal(read_index_png(pal), ids)  # the palette indices, not colours


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> tuple[PreparedSplit, PreparedSplit]:
    """Generated source and target folder splits (photo-like images of 3 sizes), prepared with lab_stats."""
    base = tmp_path_factory.mktemp("data_path")
    rng = np.random.default_rng(6)
    out = []
    for name, sizes in (("source", [(263, 478), (300, 500), (190, 380)]), ("target", [(256, 512)] * 3)):
        root = base / name
        for k, (h, w) in enumerate(sizes):
            for sub in ("images", "labels"):
                (root / sub / "train").mkdir(parents=True, exist_ok=True)
            Image.fromarray(scene(rng, h, w)).save(root / "images" / "train" / f"im{k}.png")
            Image.fromarray(rng.integers(0, 3, (h, w)).astype(np.uint8)).save(root / "labels" / "train" / f"im{k}.png")
        (root / "classes.txt").write_text("a\nb\nc\n")
        prepare.run(PrepareConfig(DatasetConfig(format="folder", root=root, split="train", n_class=3, workers=0),
                                  lab_stats=True), base / f"prep_{name}")
        out.append(PreparedSplit(base / f"prep_{name}"))
    return out[0], out[1]


def test_source_samples_with_lab_transfer_match_the_reference(prepared):
    source, target = prepared
    weak = WeakConfig(crop_hw=(128, 224), resize_w=None, scale=(0.5, 1.5))
    ds = TrainDataset(source, weak, lab_stats=target.lab_stats)
    diffs, n = 0, 0
    for k in range(12):
        index, seed = k % len(source), 1000 + k
        s = ds[(index, seed)]
        # the reference: the old __getitem__
        rng, py = np.random.default_rng(seed), random.Random(seed)
        image, label = source.load(index)
        j = int(rng.integers(len(target.lab_stats)))
        image = ref_lab_transfer(image, target.lab_stats[j, 0], target.lab_stats[j, 1])
        p = sample_weak_params(image.shape[:2], weak, py)
        ref_img, ref_label = ref_weak(image, label, p)
        assert np.array_equal(s["label"].numpy(), ref_label.astype(np.int64))
        got = np.rint(s["image"].numpy().transpose(1, 2, 0) * 255).astype(int)
        d = np.abs(got - ref_img)
        assert d.max() <= MAX_LEVELS + 1  # the resize's rounding on top of a LAB flip
        diffs, n = diffs + int((d > 0).sum()), n + d.size
    assert diffs / n <= MAX_SHARE, diffs / n


def test_unlabelled_target_never_decodes_its_label(prepared, tmp_path: Path):
    _, target = prepared
    weak = WeakConfig(crop_hw=(128, 224), resize_w=None, scale=(0.5, 1.5))
    before = TrainDataset(target, weak, label=False, views=("weak", "strong", "full"))[(1, 7)]
    broken = PreparedSplit(target.root)
    broken.label_paths = [tmp_path / "missing.png"] * len(broken)  # decoding one would raise DataError
    after = TrainDataset(broken, weak, label=False, views=("weak", "strong", "full"))[(1, 7)]
    for key in ("image", "image_strong", "image_full"):
        assert np.array_equal(before[key].numpy(), after[key].numpy())
    image = target.load_image(1)
    assert np.array_equal(after["image_full"].numpy().transpose(1, 2, 0), image)


def test_hard_label_extras_equal_thresholding_the_whole_label(prepared, tmp_path: Path):
    _, target = prepared
    rng = np.random.default_rng(8)
    for name in target.names:
        label = rng.integers(0, 3, (256, 512)).astype(np.uint8)
        conf = rng.choice(np.array([30000, 62258, 62259, 65535], np.uint16), size=(256, 512))  # 0.95: 62258.25
        pseudo.save_hard(tmp_path, name, label, conf)
    extras = HardLabelExtras(tmp_path, target.names, 0.95)
    for k, p in enumerate(weak_cases(256, 512, (128, 224), 6)):
        index = k % len(target)
        full = pseudo.load_hard(tmp_path, target.names[index], 0.95)
        _, ref = ref_weak(np.zeros((256, 512, 3), np.uint8), full, p)
        got = extras(index, p, None)["pseudo_label"].numpy()
        assert np.array_equal(got, ref), p
