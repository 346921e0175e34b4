"""Your own domain pair, end to end, as the README says: the `my_pair` template of config.yaml, uncommented, with
the roots and n_class set, through every stage, the tables and `snakemake --report`.

Two generated non-street pairs run as two experiments of one workflow: `shore` (3 classes, labelled target) and
`cells` (2 classes, a target train split without labels: no oracle). The domains differ in appearance (palette,
texture, noise, blur), not in layout. Only what a CPU test must shrink is shrunk (image and crop size,
iterations, batch, queue).
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from cpsl.workflow import deep_merge

REPO = Path(__file__).resolve().parent.parent
SNAKEMAKE = Path(sys.executable).parent / "snakemake"
HW = (48, 96)


def template() -> dict:
    """The commented `my_pair` block at the end of config.yaml, uncommented as a user would."""
    text = (REPO / "config.yaml").read_text()
    block = text[text.index("  # my_pair:"):].splitlines()
    lines = [line[:2] + line[4:] if line.startswith("  # ") else line for line in block]
    return yaml.safe_load("\n".join(lines))["my_pair"]


def make_domain(root: Path, classes: list[str], target: bool, splits: dict[str, int], seed: int,
                labelled: tuple[str, ...] = ("train", "val")) -> Path:
    """Blobs of each class on a background class; the target recolours, textures, blurs and adds noise."""
    rng = np.random.default_rng(seed)
    k = len(classes)
    src_cols = rng.integers(30, 225, (k, 3))
    tgt_cols = 255 - src_cols[:, [2, 0, 1]]  # other hues, other brightness
    cols = tgt_cols if target else src_cols
    for split, n in splits.items():
        (root / "images" / split).mkdir(parents=True)
        if split in labelled:
            (root / "labels" / split).mkdir(parents=True)
        for i in range(n):
            h, w = HW
            ys, xs = np.mgrid[0:h, 0:w]
            label = np.zeros(HW, np.uint8)
            for c in range(1, k):
                for _ in range(2):
                    cy, cx, ry, rx = rng.integers(0, h), rng.integers(0, w), rng.integers(4, 12), rng.integers(6, 20)
                    label[((ys - cy) / ry) ** 2 + ((xs - cx) / rx) ** 2 < 1] = c
            img = cols[label].astype(np.float32)
            if target:
                img += 25 * np.sin(xs / 3.0)[..., None] + rng.normal(0, 12, img.shape)
                img = (img + np.roll(img, 1, 0) + np.roll(img, 1, 1)) / 3
            else:
                img += rng.normal(0, 4, img.shape)
            label[rng.random(HW) < 0.02] = 255
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / "images" / split / f"im{i:02d}.png")
            if split in labelled:
                Image.fromarray(label).save(root / "labels" / split / f"im{i:02d}.png")
    (root / "classes.txt").write_text("\ufeff" + "".join(f"{c}\n" for c in classes))  # with a UTF-8 BOM
    return root


TINY = {
    "seeds": [0],
    "train": {"data": {"crop": [32, 64], "resize": 96, "batch_size": 2, "workers": 0},
              "checkpoint_interval": 1, "log_interval": 1},
    "stages": {stage: {"max_iters": 2} for stage in ("source_only", "warmup", "oracle", "stage1", "stage2",
                                                      "stage3")},
    "inference": {"batch_size": 2, "workers": 0},
}
TINY["stages"]["stage1"]["selflabel"] = {"pixels_per_image": 16, "queue_length": 64}


def own_experiment(source: Path, target: Path, n_class: int, target_labels: bool) -> dict:
    exp = template()
    exp["n_class"] = n_class
    for role, root in (("source", source), ("target_train", target), ("target_val", target)):
        exp["datasets"][role]["root"] = str(root)
    if not target_labels:  # as the template's comments say
        exp["datasets"]["target_train"]["labels"] = False
        del exp["stages"]["oracle"]
        del TINY["stages"]["oracle"]
    exp = deep_merge(exp, TINY)
    TINY["stages"]["oracle"] = {"max_iters": 2}
    for d in exp["datasets"].values():
        d["workers"] = 0
    return exp


def snakemake(workdir: Path, config: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [str(SNAKEMAKE), "-s", str(REPO / "Snakefile"), "-d", str(workdir), "--configfile",
           str(REPO / "config.yaml"), str(config), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def own_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("own pair")
    shore = ["sand", "rock", "seaweed"]
    cells = ["background", "nucleus"]
    config = {
        "experiments": ["shore", "cells"],
        "results_dir": str(base / "results"),
        "resources": {kind: {"threads": 1} for kind in ("prepare", "train", "evaluate", "stage_product",
                                                         "collect")},
        "experiment_settings": {
            "shore": own_experiment(make_domain(base / "shore_src", shore, False, {"train": 10}, 0),
                                    make_domain(base / "shore_tgt", shore, True, {"train": 8, "val": 4}, 1),
                                    3, True),
            "cells": own_experiment(make_domain(base / "cells_src", cells, False, {"train": 10}, 2),
                                    make_domain(base / "cells_tgt", cells, True, {"train": 8, "val": 4}, 3,
                                                labelled=("val",)), 2, False),
        },
    }
    path = base / "mine.yaml"
    path.write_text(yaml.safe_dump(config))
    (base / "wd").mkdir()
    res = snakemake(base / "wd", path, "--cores", "2")
    assert res.returncode == 0, res.stderr[-4000:]
    return base, path


def _table(path: Path) -> list[list[str]]:
    return list(csv.reader(path.open()))


def test_own_pairs_run_every_stage_into_their_own_tables(own_run):
    base, _ = own_run
    res = base / "results"
    shore = _table(res / "shore" / "summary.csv")
    assert shore[0][6:9] == ["sand", "rock", "seaweed"] and shore[0][9:] == ["split", "backbone", "init", "iteration"]
    assert [r[2] for r in shore[1:]] == ["source_only", "warmup", "stage1", "stage2", "stage3", "oracle"]
    cells = _table(res / "cells" / "summary.csv")
    assert cells[0][6:8] == ["background", "nucleus"]
    assert [r[2] for r in cells[1:]] == ["source_only", "warmup", "stage1", "stage2", "stage3"]  # no oracle
    for row in shore[1:] + cells[1:]:
        assert 0.0 <= float(row[4]) <= 100.0
    both = list(csv.DictReader((res / "summary.csv").open()))
    assert sorted({r["experiment"] for r in both}) == ["cells", "shore"] and "sand" not in both[0]
    assert "Note: cells: no oracle row, as datasets.target_train has no labels (labels: false)." in \
        (res / "summary.md").read_text()
    meta = json.loads((res / "cells" / "data" / "target_train" / "meta.json").read_text())
    assert meta["labels"] is False and meta["classes"] == ["background", "nucleus"]  # the BOM stripped
    assert (res / "plots" / "cells_per_class.png").is_file() and (res / "plots" / "shore_seed0_samples.png").is_file()


def test_the_report_bundles_each_experiments_table(own_run):
    base, path = own_run
    report = base / "report.html"
    res = snakemake(base / "wd", path, "--report", str(report))
    assert res.returncode == 0, res.stderr[-3000:]
    html = report.read_text(errors="replace")
    assert report.stat().st_size > 10_000 and "shore" in html and "cells" in html


def test_a_class_count_that_does_not_match_classes_txt_stops_the_workflow_before_any_job(own_run, tmp_path):
    base, path = own_run
    config = yaml.safe_load(path.read_text())
    config["experiment_settings"]["shore"]["n_class"] = 4
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(config))
    checkpoint = base / "results" / "shore" / "seed0" / "warmup" / "checkpoint.pt"
    before = checkpoint.read_bytes()
    res = snakemake(base / "wd", bad, "--cores", "1")
    assert res.returncode == 1
    lines = [line for line in res.stderr.splitlines() if line.startswith("cpsl-pipeline: error: ")]
    assert lines == [f"cpsl-pipeline: error: config: experiment_settings.shore.n_class: 4 does not match the 3 "
                     f"classes in {base / 'shore_src' / 'classes.txt'}"]
    assert checkpoint.read_bytes() == before  # no rerun removed the trained model
