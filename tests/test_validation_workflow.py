"""The workflow side of #25: validation during training wired to the target val split, best.pt evaluated as
metrics_best.json, the reference tables of the presets, and the repository's own results/ folder."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import yaml

from cpsl import outputs
from cpsl import workflow as W
from cpsl.errors import ConfigError
from tests.test_workflow_e2e import snakemake

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture()
def shipped():
    return yaml.safe_load((REPO / "config.yaml").read_text())


def test_eval_interval_wires_the_val_split_and_the_best_evaluation(shipped, tmp_path):
    shipped["results_dir"] = str(tmp_path / "results")
    shipped["experiment_settings"]["demo"]["stages"]["stage1"].update(eval_interval=200, eval_images=20)
    files = W.step_config_files(shipped)
    res = tmp_path / "results" / "demo"
    s1 = yaml.safe_load(files["demo/seed0/train_stage1"].read_text())
    assert (s1["eval_interval"], s1["eval_images"], s1["eval_data"]) == (200, 20, str(res / "data/target_val"))
    warm = yaml.safe_load(files["demo/seed0/train_warmup"].read_text())
    assert (warm["eval_interval"], warm["eval_data"]) == (0, None)
    best = yaml.safe_load(files["demo/seed0/evaluate_stage1_target_val_best"].read_text())
    assert best["checkpoint"] == str(res / "seed0/stage1/checkpoints/best.pt")
    assert (best["selection"], best["stage"], best["data"]) == ("best_on_val", "stage1", str(res / "data/target_val"))
    assert [t for t in files if t.endswith("_best")] == ["demo/seed0/evaluate_stage1_target_val_best"]
    assert str(res / "seed0/stage1/metrics_best.json") in W.metrics_files(shipped)
    assert str(res / "seed0/stage1/metrics_best.json") in W.final_targets(shipped)
    collect_cfg = yaml.safe_load(files["collect"].read_text())
    assert collect_cfg["references"] == {}                   # the demo has no published numbers
    assert str(res / "seed0/stage1/metrics_best.json") in collect_cfg["metrics"]


def test_the_paper_presets_get_their_reference_tables(shipped, tmp_path):
    for name in ("GTA5", "cityscapes", "SYNTHIA"):
        (tmp_path / name).mkdir()
    for exp, source in (("gta5_cityscapes", "GTA5"), ("synthia_cityscapes", "SYNTHIA")):
        for role, root in (("source", source), ("target_train", "cityscapes"), ("target_val", "cityscapes")):
            shipped["experiment_settings"][exp]["datasets"][role]["root"] = str(tmp_path / root)
    shipped["results_dir"] = str(tmp_path / "results")
    shipped["experiments"] = ["demo", "gta5_cityscapes", "synthia_cityscapes"]
    files = W.step_config_files(shipped, REPO / "results" / "reference")
    assert yaml.safe_load(files["collect"].read_text())["references"] == {
        "gta5_cityscapes": str(REPO / "results/reference/gta5_cityscapes.csv"),
        "synthia_cityscapes": str(REPO / "results/reference/synthia_cityscapes.csv")}
    assert W.reference_files(shipped, tmp_path) == {}       # a folder without the tables: no reference rows


def _repository_results(folder: Path) -> Path:
    """What a fresh clone has in results/: the tracked README.md and reference/."""
    folder.mkdir(parents=True)
    shutil.copy(REPO / "results" / "README.md", folder / "README.md")
    shutil.copytree(REPO / "results" / "reference", folder / "reference")
    return folder


def test_the_repository_results_folder_is_the_workflows_own(shipped, tmp_path):
    shipped["results_dir"] = str(_repository_results(tmp_path / "results"))
    assert W.claim_results_dir(shipped) == tmp_path / "results"
    assert outputs.WORKFLOW in outputs.owner_steps(tmp_path / "results")

    other = _repository_results(tmp_path / "other")
    (other / "notes.txt").write_text("mine")                 # a file of the user's: not the repository's folder
    shipped["results_dir"] = str(other)
    with pytest.raises(ConfigError, match="folder exists, is not empty and was not made by cpsl-pipeline"):
        W.claim_results_dir(shipped)
    (other / "notes.txt").unlink()
    (other / "README.md").write_text("# my results\n")      # another README
    with pytest.raises(ConfigError, match="was not made by cpsl-pipeline"):
        W.claim_results_dir(shipped)
    assert not (other / outputs.MARKER).exists()


MINI = {
    "experiments": ["mini"],
    "experiment_settings": {"mini": {
        "seeds": [0],
        "synth": {"n_source": 8, "n_source_val": 2, "n_target_train": 4, "n_target_val": 4, "height": 64,
                  "width": 128},
        "datasets": {"source": {"format": "gta5", "root": "@synth/gta5", "split": "train"},
                     "target_train": {"format": "cityscapes", "root": "@synth/cityscapes", "split": "train"},
                     "target_val": {"format": "cityscapes", "root": "@synth/cityscapes", "split": "val"}},
        "model": {"backbone": "resnet18", "base_width": 8, "head_channels": 16},
        "train": {"data": {"crop": [64, 128], "resize": 128, "batch_size": 2, "workers": 0},
                  "checkpoint_interval": 2, "log_interval": 1},
        "stages": {"source_only": {"max_iters": 4, "eval_interval": 2, "eval_images": 3}},
        "inference": {"batch_size": 2, "workers": 0},
    }},
}


def test_a_stage_that_validates_gets_both_selections_in_the_table(tmp_path):
    """A fresh clone's results/ (README.md, reference/) as results_dir; one stage with eval_interval (about a
    minute on 2 shared cores)."""
    results = _repository_results(tmp_path / "results")
    tracked = {p: p.read_bytes() for p in results.rglob("*") if p.is_file()}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(MINI))
    res = snakemake(tmp_path, "--cores", "2")
    assert res.returncode == 0, res.stderr[-3000:]
    stage = results / "mini" / "seed0" / "source_only"
    records = [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if "val/student" in r]
    assert [(r["iteration"], r["val_images"]) for r in val] == [(2, 3), (4, 3)]
    best = json.loads((stage / "metrics_best.json").read_text())
    assert best["selection"] == "best_on_val" and best["iteration"] == val[-1]["val_best_iteration"]
    assert best["checkpoint"] == str((stage / "checkpoints" / "best.pt").resolve())
    rows = list(csv.DictReader((results / "mini" / "summary.csv").open()))
    assert [(r["stage"], r["selection"], r["iteration"]) for r in rows] == [
        ("source_only", "last", "4"), ("source_only", "best_on_val", str(best["iteration"]))]
    assert (results / "plots" / "mini_seed0_validation.png").stat().st_size > 1000
    assert "validation mIoU" in (results / "mini" / "logs" / "seed0" / "train_source_only.log").read_text()
    assert {p: p.read_bytes() for p in tracked} == tracked      # the tracked files are untouched
