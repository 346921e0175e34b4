"""The synthetic domain pair: determinism, on-disk layout, label content and the appearance shift."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cpsl.config import DatasetConfig, PrepareConfig, SynthConfig
from cpsl import outputs
from cpsl.data import synth
from cpsl.errors import DataError
from cpsl.labels import CITYSCAPES_KNOWN_IDS, CLASSES_19, NAME_TO_LABEL_ID

SMALL = dict(height=64, width=128, n_source=12, n_source_val=3, n_target_train=8, n_target_val=6)


def _tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synth") / "pair"
    summary = synth.generate(SynthConfig(seed=3, workers=2, **SMALL), out)
    return out, summary


def test_same_seed_same_bytes_regardless_of_workers(small_pair, tmp_path):
    out, _ = small_pair
    again = tmp_path / "again"
    synth.generate(SynthConfig(seed=3, workers=0, **SMALL), again)
    assert _tree_hashes(out) == _tree_hashes(again)


def test_other_seed_differs(small_pair, tmp_path):
    out, _ = small_pair
    other = tmp_path / "other"
    synth.generate(SynthConfig(seed=4, workers=1, **SMALL), other)
    a, b = _tree_hashes(out), _tree_hashes(other)
    assert set(a) == set(b)  # same file names ...
    differing = [k for k in a if a[k] != b[k] and k.endswith(".png")]
    assert len(differing) == sum(k.endswith(".png") for k in a)  # ... every image and label differs


def test_generate_replaces_its_own_output_and_leaves_no_temp(small_pair, tmp_path):
    out = tmp_path / "pair"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    outputs.write_marker(out, "synth")  # an earlier synth output
    synth.generate(SynthConfig(seed=3, workers=1, **SMALL), out)
    assert not (out / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pair"]
    assert _tree_hashes(out) == _tree_hashes(small_pair[0])


def test_generate_refuses_a_folder_it_did_not_make(tmp_path):
    out = tmp_path / "pair"
    out.mkdir()
    (out / "mine.txt").write_text("a user's file")
    with pytest.raises(DataError, match=r"pair: folder exists and was not written by cpsl synth \(no "
                                        r"\.cpsl-output\.json in it\)"):
        synth.generate(SynthConfig(seed=3, workers=1, **SMALL), out)
    assert [p.name for p in out.iterdir()] == ["mine.txt"] and (out / "mine.txt").read_text() == "a user's file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pair"]  # no staging folder left


def test_gta5_layout(small_pair):
    out, _ = small_pair
    root = out / "gta5"
    names = [f"{i:05d}.png" for i in range(1, SMALL["n_source"] + 1)]
    assert sorted(p.name for p in (root / "images").iterdir()) == names
    assert sorted(p.name for p in (root / "labels").iterdir()) == names
    for name in names:
        img = Image.open(root / "images" / name)
        lbl = Image.open(root / "labels" / name)
        assert img.mode == "RGB" and img.size == (SMALL["width"], SMALL["height"])
        assert lbl.mode == "P" and lbl.size == img.size
        # the palette maps indices to the Cityscapes colours, like the real GTA5 labels
        assert tuple(lbl.getpalette()[3 * 7:3 * 7 + 3]) == (128, 64, 128)

    from scipy.io import loadmat

    mat = loadmat(str(root / "split.mat"))
    train, val = mat["trainIds"].ravel(), mat["valIds"].ravel()
    test = mat["testIds"].ravel()
    assert mat["trainIds"].ndim == 2 and mat["trainIds"].shape[1] == 1  # column vectors like the release
    n_train = SMALL["n_source"] - SMALL["n_source_val"]
    assert [int(v) for v in train] == list(range(1, n_train + 1))
    assert [int(v) for v in val] == list(range(n_train + 1, SMALL["n_source"] + 1))
    for i in np.concatenate([train, val, test]):
        assert (root / "images" / f"{int(i):05d}.png").is_file()


def test_cityscapes_layout(small_pair):
    out, _ = small_pair
    root = out / "cityscapes"
    for split, n in (("train", SMALL["n_target_train"]), ("val", SMALL["n_target_val"])):
        images = sorted((root / "leftImg8bit" / split).glob("*/*.png"))
        assert len(images) == n
        cities = {p.parent.name for p in images}
        assert len(cities) >= 2
        assert not cities & set(synth.TARGET_VAL_CITIES if split == "train" else synth.TARGET_TRAIN_CITIES)
        for p in images:
            city = p.parent.name
            parts = p.name.split("_")
            assert parts[0] == city and len(parts[1]) == 6 and len(parts[2]) == 6 and parts[3] == "leftImg8bit.png"
            stem = p.name[: -len("_leftImg8bit.png")]
            gt = root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png"
            assert gt.is_file()
            img, lbl = Image.open(p), Image.open(gt)
            assert img.mode == "RGB" and img.size == (SMALL["width"], SMALL["height"])
            assert lbl.mode == "L" and lbl.size == img.size
        gts = sorted((root / "gtFine" / split).glob("*/*"))
        assert len(gts) == n  # nothing but the labelIds files


def test_label_ids_valid_and_void_present(small_pair):
    out, summary = small_pair
    seen_target: set[int] = set()
    for p in (out / "gta5" / "labels").glob("*.png"):
        ids = set(np.unique(np.asarray(Image.open(p))).tolist())
        assert ids <= CITYSCAPES_KNOWN_IDS
    for p in (out / "cityscapes" / "gtFine").rglob("*_gtFine_labelIds.png"):
        ids = set(np.unique(np.asarray(Image.open(p))).tolist())
        assert ids <= CITYSCAPES_KNOWN_IDS
        seen_target |= ids
    # every target image has the ego-vehicle bonnet (void), as in Cityscapes
    assert NAME_TO_LABEL_ID["ego_vehicle"] in seen_target
    assert set(summary["target"]["label_ids_present"]) == seen_target


def _sample_stats(n: int = 40) -> dict[str, dict]:
    """Per-domain class pixel counts and per-class mean colours over n default-size images."""
    stats = {}
    for stream in ("source", "target_train"):
        counts = np.zeros(256, np.int64)
        color_sum = np.zeros((256, 3))
        for i in range(n):
            image, label = synth.make_sample(0, stream, i, 128, 256)
            counts += np.bincount(label.ravel(), minlength=256)
            for c in range(3):
                color_sum[:, c] += np.bincount(label.ravel(), weights=image[..., c].ravel(), minlength=256)
        stats[stream] = {"counts": counts, "mean_color": color_sum / np.maximum(counts, 1)[:, None]}
    return stats


@pytest.fixture(scope="module")
def sample_stats() -> dict[str, dict]:
    return _sample_stats()


@pytest.mark.parametrize("stream", ["source", "target_train"])
def test_class_coverage_and_long_tail(sample_stats, stream):
    counts = sample_stats[stream]["counts"]
    per_class = np.array([counts[NAME_TO_LABEL_ID[c]] for c in CLASSES_19], np.float64)
    assert (per_class > 0).sum() >= 12
    share = per_class / per_class.sum()
    assert np.sort(share)[::-1][:4].sum() > 0.70
    assert ((share > 0) & (share < 0.01)).sum() >= 3


def test_target_has_cityscapes_void_ids(sample_stats):
    counts = sample_stats["target_train"]["counts"]
    for name in ("unlabeled", "ego_vehicle", "ground", "parking"):
        assert counts[NAME_TO_LABEL_ID[name]] > 0, name


def test_domains_differ_in_class_frequencies(sample_stats):
    def share(stream: str, name: str) -> float:
        counts = sample_stats[stream]["counts"]
        total = sum(counts[NAME_TO_LABEL_ID[c]] for c in CLASSES_19)
        return counts[NAME_TO_LABEL_ID[name]] / total

    assert share("source", "car") > share("target_train", "car")
    assert share("target_train", "vegetation") > share("source", "vegetation")
    assert share("target_train", "person") > share("source", "person")


def test_appearance_shift_per_class(sample_stats):
    src, tgt = sample_stats["source"]["mean_color"], sample_stats["target_train"]["mean_color"]
    lid = NAME_TO_LABEL_ID
    for name in ("sidewalk", "building", "sky", "vegetation", "terrain"):
        assert np.linalg.norm(src[lid[name]] - tgt[lid[name]]) > 25, name
    # confusable pairs: the target sidewalk looks more like the source road than like the source sidewalk
    assert np.linalg.norm(tgt[lid["sidewalk"]] - src[lid["road"]]) < np.linalg.norm(
        tgt[lid["sidewalk"]] - src[lid["sidewalk"]])
    # the shift is not one global tint: the per-class offsets differ
    offsets = np.stack([tgt[lid[n]] - src[lid[n]] for n in ("road", "sidewalk", "vegetation", "sky")])
    assert np.ptp(offsets, axis=0).max() > 40


def test_target_is_noisier_than_source():
    """The target carries texture and sensor noise; the source is flat: compare the road's local variation."""
    def hf(stream: str) -> float:
        vals = []
        for i in range(6):
            image, label = synth.make_sample(0, stream, i, 128, 256)
            road = label == NAME_TO_LABEL_ID["road"]
            g = image.astype(np.float64).mean(axis=2)
            for row, mask in zip(g, road):  # deviation from the row median: texture and noise, not the gradient
                if mask.sum() >= 8:
                    vals.extend(np.abs(row[mask] - np.median(row[mask])))
        return float(np.median(vals))

    assert hf("target_train") > 2.0 * hf("source")


def test_summary_histograms(small_pair):
    _, summary = small_pair
    for domain in ("source", "target"):
        pct = summary[domain]["percent"]
        assert list(pct) == list(CLASSES_19)
        assert abs(sum(pct.values()) - 100.0) < 1e-6
    assert summary["images"] == {"gta5_train": 9, "gta5_val": 3, "cityscapes_train": 8, "cityscapes_val": 6}


@pytest.mark.parametrize("fmt,split,n", [
    ("gta5", "train", SMALL["n_source"] - SMALL["n_source_val"]),
    ("gta5", "val", SMALL["n_source_val"]),
    ("cityscapes", "train", SMALL["n_target_train"]),
    ("cityscapes", "val", SMALL["n_target_val"]),
])
def test_generated_data_opens_with_readers_and_prepare(small_pair, tmp_path, fmt, split, n):
    from cpsl.data import cityscapes, gta5
    from cpsl.steps import prepare

    out, _ = small_pair
    root = out / fmt
    reader = gta5 if fmt == "gta5" else cityscapes
    samples, problems = reader.scan(root, split)
    assert problems == [] and len(samples) == n
    cfg = PrepareConfig(dataset=DatasetConfig(format=fmt, root=root, split=split, workers=0,
                                              expected_size=[SMALL["height"], SMALL["width"]]), lab_stats=True)
    meta = prepare.run(cfg, tmp_path / "prepared")
    assert meta["n_images"] == n and meta["skipped"] == []
