"""The paper beside us: the reference tables in results/reference/ and the rows collect adds from them."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from cpsl.config import CollectConfig
from cpsl.errors import DataError
from cpsl.labels import CLASSES_16, CLASSES_19
from cpsl.steps import collect

REFERENCE = Path(__file__).resolve().parent.parent / "results" / "reference"
GTA5 = REFERENCE / "gta5_cityscapes.csv"
SYNTHIA = REFERENCE / "synthia_cityscapes.csv"


def test_the_reference_tables_parse_and_their_miou_is_the_class_mean():
    gta = collect.read_reference(GTA5)
    syn = collect.read_reference(SYNTHIA)
    with GTA5.open() as fh:
        assert next(csv.reader(fh))[len(collect.REFERENCE_META):] == list(CLASSES_19)
    with SYNTHIA.open() as fh:
        assert next(csv.reader(fh))[len(collect.REFERENCE_META):] == list(CLASSES_16)
    full = [r for r in gta + syn if all(v is not None for v in r["iou"].values())]
    assert len(full) == 9   # CPSL's logs: stages 1-3, best, first and last validation
    for r in full:
        # the class IoUs are printed to 0.1 (each off by <= 0.05), the mIoU to 0.01 (<= 0.005)
        assert sum(r["iou"].values()) / len(r["iou"]) == pytest.approx(r["miou"], abs=0.055), r
    by_key = {(r["method"], r["stage"], r["selection"], r["iteration"]): r for r in gta}
    # spot checks against shared/spec/cpsl_reference.md sections 5 and 10 (and the 55.66 at 70,000)
    assert by_key[("CPSL", "stage1", "best_on_val", 70000)]["miou"] == 55.66
    assert by_key[("CPSL", "stage3", "best_on_val", 48000)]["iou"]["rider"] == 36.8
    assert by_key[("CPSL", "stage2", "last", 80000)]["iou"]["bicycle"] == 55.8
    assert by_key[("CPSL", "warmup", "reported", None)]["miou"] == 41.4
    assert [by_key[("ProDA", s, "reported", None)]["miou"] for s in ("warmup", "stage1", "stage2", "stage3")] == \
        [43.3, 53.7, 56.9, 57.5]
    assert {r["method"]: r["miou"] for r in gta if r["stage"] == "final"} == {
        "SePiCo (DistCL)": 61.0, "DAFormer": 68.3, "HRDA": 73.8, "MIC (HRDA)": 75.9}
    assert {r["method"]: (r["miou"], r["miou13"]) for r in syn} == {
        "ProDA": (55.5, 62.0), "SePiCo (DistCL)": (58.1, None), "DAFormer": (60.9, None), "HRDA": (65.8, None)}


def test_a_bad_reference_table_is_named(tmp_path):
    bad = tmp_path / "ref.csv"
    bad.write_text("method,stage\nCPSL,stage1\n")
    with pytest.raises(DataError, match=r"ref.csv: not a reference table \(no column backbone, source"):
        collect.read_reference(bad)
    bad.write_text(GTA5.read_text().replace("55.66", "55.6x"))
    with pytest.raises(DataError, match=r"ref.csv: line 2, column miou: not a number \('55.6x'\)"):
        collect.read_reference(bad)


def _metrics(root, seed, stage, miou, iou, selection="last", iteration=90000):
    folder = root / "gta5_cityscapes" / f"seed{seed}" / stage
    folder.mkdir(parents=True, exist_ok=True)
    per_class = {c: iou.get(c) for c in CLASSES_19}
    m = {"stage": stage, "experiment": "gta5_cityscapes", "seed": seed, "iteration": iteration, "miou": miou,
         "per_class": per_class, "n_class": 19, "selection": selection,
         "data": str(root / "gta5_cityscapes" / "data" / "target_val")}
    path = folder / ("metrics.json" if selection == "last" else "metrics_best.json")
    path.write_text(json.dumps(m))
    return path


def test_a_preset_table_has_the_reference_and_delta_rows_in_its_class_order(tmp_path):
    res = tmp_path / "results"
    files = [_metrics(res, 0, "warmup", 40.0, {"road": 80.0}), _metrics(res, 1, "warmup", 42.0, {"road": 82.0}),
             _metrics(res, 0, "stage1", 50.0, {"road": 90.0, "bicycle": 40.0}),
             _metrics(res, 1, "stage1", 52.0, {"road": 92.0, "bicycle": 44.0}),
             _metrics(res, 0, "stage1", 53.0, {"road": 93.0}, "best_on_val", 60000),
             _metrics(res, 1, "stage1", 55.0, {"road": 91.0}, "best_on_val", 70000)]
    collect.run(CollectConfig(metrics=files, plots=False, references={"gta5_cityscapes": GTA5}), res)
    with (res / "gta5_cityscapes" / "summary.csv").open() as fh:
        reader = csv.reader(fh)
        header = next(reader)
        table = [dict(zip(header, row)) for row in reader]
    assert header == [*collect.BASE_COLUMNS, *CLASSES_19, "split", "backbone", "init", "iteration", "reference"]
    assert [(r["stage"], r["seed"], r["selection"]) for r in table] == [
        ("warmup", "0", "last"), ("warmup", "1", "last"), ("warmup", "mean", "last"), ("warmup", "std", "last"),
        ("warmup", "delta", "last"), ("warmup", "paper", "reported"), ("warmup", "peer", "reported"),
        ("stage1", "0", "last"), ("stage1", "1", "last"), ("stage1", "mean", "last"), ("stage1", "std", "last"),
        ("stage1", "paper", "last"), ("stage1", "delta", "last"),
        ("stage1", "0", "best_on_val"), ("stage1", "1", "best_on_val"), ("stage1", "mean", "best_on_val"),
        ("stage1", "std", "best_on_val"), ("stage1", "paper", "best_on_val"), ("stage1", "delta", "best_on_val"),
        ("stage1", "peer", "reported"),
        ("final", "peer", "reported"), ("final", "peer", "reported"), ("final", "peer", "reported"),
        ("final", "peer", "reported")]
    rows = {(r["stage"], r["seed"], r["selection"]): r for r in table}
    paper_last = rows[("stage1", "paper", "last")]
    assert (paper_last["miou"], paper_last["iteration"], paper_last["road"], paper_last["train"],
            paper_last["bicycle"]) == ("54.69", "81000", "90.6", "18.5", "48.4")
    assert paper_last["reference"] == "CPSL (DeepLab-v2 R101; CPSL training logs (cpsl_reference.md §5))"
    # ours (the mean over the seeds) minus the paper's row of the same stage and selection, class by class
    delta = rows[("stage1", "delta", "last")]
    assert float(delta["miou"]) == pytest.approx(51.0 - 54.69)
    assert float(delta["road"]) == pytest.approx(91.0 - 90.6) and float(delta["bicycle"]) == pytest.approx(42.0 - 48.4)
    assert delta["wall"] == "" and delta["iteration"] == "90000"
    assert delta["reference"].startswith("ours (mean) minus CPSL last at iteration 81000")
    best = rows[("stage1", "delta", "best_on_val")]
    assert float(best["miou"]) == pytest.approx(54.0 - 55.66) and float(best["road"]) == pytest.approx(92.0 - 91.7)
    assert best["iteration"] == "" and rows[("stage1", "0", "best_on_val")]["iteration"] == "60000"
    assert rows[("stage1", "paper", "best_on_val")]["iteration"] == "70000"
    # the warm-up has only the README's mIoU: a delta of the mIoU alone
    warm = rows[("warmup", "delta", "last")]
    assert float(warm["miou"]) == pytest.approx(41.0 - 41.4) and warm["road"] == ""
    # no stage-2/3 rows (not in this experiment), no "first" validations, no README row repeating a log row
    assert not any(r["stage"] in ("stage2", "stage3") or r["selection"] == "first" for r in table)
    assert sum(r["seed"] == "paper" and r["stage"] == "stage1" for r in table) == 2

    md = (res / "gta5_cityscapes" / "summary.md").read_text()
    assert "| gta5_cityscapes | delta | stage1 | target_val | last | -3.7 | +0.4 |" in md
    assert "| gta5_cityscapes | paper | stage1 | target_val | best_on_val | 55.7 | 91.7 | 52.9 |" in md
    assert "selected on the evaluation set itself" in md and "`delta`: ours minus the paper's" in md
    # the table of all experiments keeps only the experiments' own rows
    overall = list(csv.DictReader((res / "summary.csv").open()))
    assert {r["seed"] for r in overall} == {"0", "1", "mean", "std"} and "reference" not in overall[0]


def test_reference_values_go_by_class_name(tmp_path):
    # a 16-class experiment (the SYNTHIA protocol) against the 19-class table: its own columns, by name
    res = tmp_path / "results"
    folder = res / "syn" / "seed0" / "stage1"
    folder.mkdir(parents=True)
    per_class = {c: 10.0 for c in CLASSES_16}
    (folder / "metrics.json").write_text(json.dumps({
        "stage": "stage1", "experiment": "syn", "seed": 0, "iteration": 5, "miou": 10.0, "miou13": 10.0,
        "per_class": per_class, "n_class": 16, "selection": "last"}))
    collect.run(CollectConfig(metrics=[folder / "metrics.json"], plots=False, references={"syn": GTA5}), res)
    table = list(csv.DictReader((res / "syn" / "summary.csv").open()))
    assert list(table[0])[6:22] == list(CLASSES_16)
    paper = next(r for r in table if r["seed"] == "paper" and r["selection"] == "last")
    assert (paper["sky"], paper["person"], paper["bicycle"]) == ("78.9", "69.5", "48.4")   # not by position
    delta = next(r for r in table if r["seed"] == "delta")
    assert float(delta["sky"]) == pytest.approx(10.0 - 78.9) and delta["miou13"] == ""
