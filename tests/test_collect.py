"""The results table: rows per experiment/seed/stage/split, mean and std over seeds, Markdown, plots."""

import csv
import json

import pytest

from cpsl.config import CollectConfig
from cpsl.errors import DataError
from cpsl.labels import CLASSES_19
from cpsl.steps import collect


def write_metrics(root, exp, seed, stage, miou, road, split="target_val", init=None, jsonl=False, backbone=None):
    folder = root / exp / f"seed{seed}" / stage
    if split != "target_val":
        folder = folder / f"eval_{split}"
    folder.mkdir(parents=True, exist_ok=True)
    per_class = {c: None for c in CLASSES_19}
    per_class["road"] = road
    m = {"stage": stage, "experiment": exp, "seed": seed, "iteration": 100, "miou": miou, "per_class": per_class,
         "n_class": 19, "selection": "last", "data": str(root / exp / "data" / split)}
    (folder / "metrics.json").write_text(json.dumps(m))
    if init:
        (folder / "train_summary.json").write_text(json.dumps({"student_init": init}))
    if backbone:  # what cpsl train records in the stage's folder
        stage_dir = root / exp / f"seed{seed}" / stage
        (stage_dir / "config.yaml").write_text(f"stage: {stage}\nmodel:\n  backbone: {backbone}\n  n_class: 19\n")
    if jsonl:
        lines = [{"iteration": i, "loss/ce_source": 1.0 / i} for i in (10, 20, 30)]
        (folder / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return folder / "metrics.json"


def test_table_with_mean_and_std_over_seeds(tmp_path):
    res = tmp_path / "results"
    files = [
        write_metrics(res, "demo", 0, "warmup", 40.0, 90.0, init="random", jsonl=True, backbone="mit_b5"),
        write_metrics(res, "demo", 1, "warmup", 44.0, 94.0, init="random", backbone="mit_b5"),
        write_metrics(res, "demo", 0, "source_only", 35.0, 80.0),
        write_metrics(res, "demo", 1, "source_only", 37.0, 82.0),
        write_metrics(res, "demo", 0, "source_only", 60.0, 97.0, split="source_val", backbone="resnet101"),
        write_metrics(res, "demo", 0, "stage1", 45.0, 93.0, init=f"checkpoint:{res}/demo/seed0/warmup/checkpoint.pt"),
        write_metrics(res, "demo", 1, "stage1", 47.0, 95.0, init=f"checkpoint:{res}/demo/seed1/warmup/checkpoint.pt"),
    ]
    summary = collect.run(CollectConfig(metrics=files), res)
    rows = list(csv.DictReader((res / "summary.csv").open()))
    header = list(rows[0].keys())
    assert header[:6] == ["experiment", "seed", "stage", "selection", "miou", "miou13"]
    assert header[6:25] == list(CLASSES_19) and header[25:] == ["split", "backbone", "init", "iteration"]
    order = [(r["stage"], r["seed"], r["split"]) for r in rows]
    assert order == [("source_only", "0", "target_val"), ("source_only", "1", "target_val"),
                     ("source_only", "mean", "target_val"), ("source_only", "std", "target_val"),
                     ("warmup", "0", "target_val"), ("warmup", "1", "target_val"),
                     ("warmup", "mean", "target_val"), ("warmup", "std", "target_val"),
                     ("stage1", "0", "target_val"), ("stage1", "1", "target_val"),
                     ("stage1", "mean", "target_val"), ("stage1", "std", "target_val"),
                     ("source_only", "0", "source_val")]
    warm_mean, warm_std = rows[6], rows[7]
    assert float(warm_mean["miou"]) == 42.0 and float(warm_mean["road"]) == 92.0
    # sample std of (40, 44) = sqrt(((-2)^2 + 2^2) / 1) = 2.8284
    assert float(warm_std["miou"]) == pytest.approx(2.8284, abs=1e-4)
    assert warm_mean["wall"] == "" and warm_mean["init"] == "random" and rows[0]["init"] == ""
    # the backbone from the stage's recorded training config (seed 0's source-only folder has one: both of its
    # evaluations show it; seed 1's has none)
    assert [rows[i]["backbone"] for i in (4, 6, 0, 1, 12)] == ["mit_b5", "mit_b5", "resnet101", "", "resnet101"]
    md = (res / "summary.md").read_text()
    assert "| demo | mean | warmup | target_val | last | 42.0 |" in md
    assert (f"Student initialisation per stage: stage1: checkpoint:{res}/demo/seed<S>/warmup/checkpoint.pt; "
            "warmup: random.") in md
    assert (res / "plots" / "demo_per_class.png").stat().st_size > 1000
    assert (res / "plots" / "demo_seed0_curves.png").stat().st_size > 1000
    assert summary["rows"] == 13


def test_bad_metrics_file_is_named(tmp_path):
    bad = tmp_path / "metrics.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match=f"^{bad}: not a valid metrics.json"):
        collect.run(CollectConfig(metrics=[bad], plots=False), tmp_path / "out")
    bad.write_text(json.dumps({"stage": "warmup"}))
    with pytest.raises(DataError, match="lacks experiment, seed, miou, per_class"):
        collect.run(CollectConfig(metrics=[bad], plots=False), tmp_path / "out")


def _palette_png(path, ids):
    from PIL import Image

    from cpsl.labels import palette

    img = Image.frombytes("P", (ids.shape[1], ids.shape[0]), ids.tobytes())
    img.putpalette(palette(CLASSES_19).flatten().tolist())
    img.save(path)


def test_sample_predictions_figure(tmp_path):
    import numpy as np
    from PIL import Image

    res = tmp_path / "results"
    image, label = tmp_path / "img.png", tmp_path / "label.png"
    Image.fromarray(np.full((40, 80, 3), 200, np.uint8)).save(image)
    Image.fromarray(np.full((40, 80), 2, np.uint8)).save(label)  # building everywhere
    files = []
    for stage, cls in (("warmup", 0), ("stage1", 13)):  # road, car
        files.append(write_metrics(res, "demo", 0, stage, 10.0, 5.0))
        samples = files[-1].parent / "samples"
        samples.mkdir()
        _palette_png(samples / "a.png", np.full((40, 80), cls, np.uint8))
        (samples / "index.json").write_text(json.dumps(
            [{"name": "a", "image": str(image), "label": str(label), "prediction": "a.png"}]))
    made = collect.run(CollectConfig(metrics=files), res)["plots"]
    path = res / "plots" / "demo_seed0_samples.png"
    assert str(path) in made
    colours = {tuple(c) for c in np.array(Image.open(path).convert("RGB")).reshape(-1, 3)}
    for rgb in ((128, 64, 128), (0, 0, 142), (70, 70, 70), (200, 200, 200)):  # road, car, building label, image
        assert rgb in colours


def _own_metrics(root, exp, seed, stage, miou, per_class):
    folder = root / exp / f"seed{seed}" / stage
    folder.mkdir(parents=True, exist_ok=True)
    m = {"stage": stage, "experiment": exp, "seed": seed, "iteration": 5, "miou": miou, "per_class": per_class,
         "n_class": len(per_class), "selection": "last", "data": str(root / exp / "data" / "target_val")}
    (folder / "metrics.json").write_text(json.dumps(m))
    return folder / "metrics.json"


def test_each_experiment_gets_its_own_class_columns(tmp_path):
    res = tmp_path / "results"
    # a class named like a column, one with a '|' and one with a comma: values stay under their own names
    own = {"ground": 70.0, "miou": 10.0, "cell|nucleus": None, "a, b": 30.0}
    files = [
        write_metrics(res, "demo", 0, "warmup", 40.0, 90.0),
        _own_metrics(res, "mine", 0, "warmup", 36.7, own),
        _own_metrics(res, "mine", 1, "warmup", 38.7, dict(own, ground=80.0)),
    ]
    collect.run(CollectConfig(metrics=files, plots=True, notes=["mine: no oracle row, as it has no labels"]), res)
    mine = list(csv.reader((res / "mine" / "summary.csv").open()))
    assert mine[0] == ["experiment", "seed", "stage", "selection", "miou", "miou13", "ground", "miou",
                       "cell|nucleus", "a, b", "split", "backbone", "init", "iteration"]
    assert [r[1] for r in mine[1:]] == ["0", "1", "mean", "std"]
    assert mine[1][4] == "36.7" and mine[1][6:10] == ["70.0", "10.0", "", "30.0"]
    assert mine[3][4] == "37.7" and mine[3][6] == "75.0"
    demo = list(csv.reader((res / "demo" / "summary.csv").open()))
    assert demo[0][6:25] == list(CLASSES_19) and demo[1][6] == "90.0"
    # the overall table: every experiment's mIoU rows, no class columns (the two experiments' classes differ)
    both = list(csv.DictReader((res / "summary.csv").open()))
    assert list(both[0]) == ["experiment", "seed", "stage", "selection", "miou", "miou13", "split", "backbone",
                             "init", "iteration"]
    assert [(r["experiment"], r["seed"]) for r in both] == [("demo", "0"), ("mine", "0"), ("mine", "1"),
                                                           ("mine", "mean"), ("mine", "std")]
    md = (res / "summary.md").read_text()
    assert "Note: mine: no oracle row, as it has no labels." in md and "| ground |" not in md
    assert "| experiment | seed | stage | split | selection | mIoU | ground | miou | cell\\|nucleus | a, b |" in \
        (res / "mine" / "summary.md").read_text()
    assert (res / "plots" / "mine_per_class.png").stat().st_size > 1000


def test_one_experiment_with_two_class_lists_is_refused(tmp_path):
    a = _own_metrics(tmp_path, "mine", 0, "warmup", 1.0, {"ground": 1.0, "object": 2.0})
    b = _own_metrics(tmp_path, "mine", 1, "warmup", 1.0, {"object": 1.0, "ground": 2.0})
    with pytest.raises(DataError, match=f"^{b}: its classes differ from those of {a} "):
        collect.run(CollectConfig(metrics=[a, b], plots=False), tmp_path / "out")


def test_curves_get_a_class_share_row_from_metrics_jsonl(tmp_path, monkeypatch):
    res = tmp_path / "results"
    files = [write_metrics(res, "demo", 0, "warmup", 40.0, 90.0, jsonl=True),
             write_metrics(res, "demo", 0, "stage1", 45.0, 93.0)]
    lines = [{"iteration": i, "loss/cts": 0.5, "share/student/0": s0, "share/student/1": 1 - s0,
              "share/teacher/0": 0.7, "share/teacher/1": 0.3, "share/marginal/0": 0.8, "share/marginal/1": 0.2}
             for i, s0 in ((20, 0.75), (40, 0.64))]
    (res / "demo" / "seed0" / "stage1" / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    series = collect._series(res / "demo" / "seed0" / "stage1" / "metrics.jsonl")
    assert series["loss"] == {"cts": [(20, 0.5), (40, 0.5)]}
    assert series["share"]["student/1"] == [(20, 0.25), (40, pytest.approx(0.36))]
    assert series["share"]["marginal/1"] == [(20, 0.2), (40, 0.2)] and len(series["share"]) == 6
    drawn = []
    monkeypatch.setattr(collect, "_share_panel", lambda ax, stage, shares, names: drawn.append(
        (stage, sorted(shares), names)) or ax.set_axis_off())
    collect.run(CollectConfig(metrics=files), res)
    # one share panel per stage: the warm-up logs no shares (an empty panel), stage 1 its six series
    assert [(s, len(k)) for s, k, _ in drawn] == [("warmup", 0), ("stage1", 6)]
    assert drawn[1][2][:2] == ["road", "sidewalk"]
    assert (res / "plots" / "demo_seed0_curves.png").stat().st_size > 1000
