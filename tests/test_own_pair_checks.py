"""What a user's own pair can get wrong, each stopped or warned about with one line naming the file or key.

Class names (classes.txt), labels that are all ignore, unlabelled splits, images too small for the network,
16-bit images, the stage-1 sample grid, a ResNet-101 without weights, results_dir, `~` in roots, the default
chain of an experiment without `stages`, and `snakemake --report` before a run.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from cpsl import workflow as W
from cpsl.config import DatasetConfig, PrepareConfig, TrainConfig, load
from cpsl.data import folder
from cpsl.data.common import read_image
from cpsl.errors import ConfigError, DataError
from cpsl.steps import prepare
from cpsl.train import data as train_data
from tests.reliability_helpers import error_line, run_cli, write_yaml
from tests.train_helpers import N_CLASS, make_folder_split, pair_dir, train_dict  # noqa: F401

REPO = Path(__file__).resolve().parent.parent


def _prep(root: Path, out: Path, **ds) -> dict:
    cfg = PrepareConfig(DatasetConfig(**{"format": "folder", "root": root, "split": "train", "n_class": N_CLASS,
                                         "workers": 0, **ds}))
    return prepare.run(cfg, out)


# ---------------------------------------------------------------------------------------------------------
# classes.txt


def test_class_names_bom_blank_and_duplicates(tmp_path):
    (tmp_path / "classes.txt").write_text("\ufeffground\nobject\n\n")
    assert folder.class_names(tmp_path) == ("ground", "object")
    (tmp_path / "classes.txt").write_text("ground\nobject\nground\n")
    with pytest.raises(DataError, match=rf"^{tmp_path / 'classes.txt'}: line 3: class name 'ground' repeats line "
                                        r"1; every class needs its own name$"):
        folder.class_names(tmp_path)
    (tmp_path / "classes.txt").write_text("ground\n\nobject\n")
    with pytest.raises(DataError, match="line 2 is blank"):
        folder.class_names(tmp_path)


def test_training_refuses_domains_with_other_class_names(pair_dir, tmp_path):  # noqa: F811
    cfg = train_dict(pair_dir, "warmup")
    target = tmp_path / "target"
    import shutil

    shutil.copytree(cfg["data"]["target"], target)
    meta = json.loads((target / "meta.json").read_text())
    meta["classes"] = ["class0", "class2", "class1", "class3"]
    (target / "meta.json").write_text(json.dumps(meta))
    cfg["data"]["target"] = str(target)
    rc, err = run_cli("train", write_yaml(tmp_path / "t.yaml", cfg), tmp_path / "out")
    assert rc == 2
    src = Path(cfg["data"]["source"])
    assert error_line(err, "train") == (
        f"{src / 'meta.json'} (data.source) and {target / 'meta.json'} (data.target) name different classes: "
        "train id 1 is 'class1' in one and 'class2' in the other; both domains need the same classes.txt (names "
        "and order)")


# ---------------------------------------------------------------------------------------------------------
# labels


def test_all_ignore_labels_are_warned_about_and_refused_by_training(tmp_path, capsys):
    root = make_folder_split(tmp_path / "raw", n=2, hw=(16, 32))
    for p in (root / "labels" / "train").iterdir():
        Image.fromarray(np.full((16, 32), 255, np.uint8)).save(p)
    meta = _prep(root, tmp_path / "prep")
    assert meta["warnings"] == ["every label pixel of the 2 images is 255 (ignore): this split has no labels to "
                                "learn from, and training refuses it (an unlabelled split is `dataset.labels: "
                                "false`)"]
    assert "cpsl prepare: warning: every label pixel" in capsys.readouterr().err
    cfg = load(TrainConfig, {"stage": "source_only", "max_iters": 1, "data": {"source": str(tmp_path / "prep")},
                             "model": {"backbone": "resnet18", "base_width": 8, "head_channels": 16,
                                       "n_class": N_CLASS}})
    with pytest.raises(DataError, match=r"data.source: every label pixel is 255 \(ignore\), so there is nothing to "
                                        r"learn from; stage 'source_only' trains on its labels and needs labels"):
        train_data.build_datasets(cfg, {"source": {"label": True}}, N_CLASS)


def test_an_unlabelled_split_has_images_only(tmp_path):
    root = make_folder_split(tmp_path / "raw", n=3, hw=(16, 32))
    (root / "labels" / "train" / "im001.png").unlink()  # a partly labelled folder is fine too
    meta = _prep(root, tmp_path / "prep", labels=False)
    assert meta["labels"] is False and meta["n_images"] == 3 and meta["skipped"] == []
    from cpsl.data.prepared import PreparedSplit

    split = PreparedSplit(tmp_path / "prep")
    image, label = split.load(1)
    assert image.shape == (16, 32, 3) and (label == 255).all() and split.label_paths == [None] * 3
    assert (tmp_path / "prep" / "list.txt").read_text().splitlines()[0].endswith("\t-")
    with pytest.raises(DataError, match=r"data.target: this split is unlabelled \(prepared with dataset.labels: "
                                        r"false\); the oracle needs labels"):
        split.require_labels("data.target", "the oracle")


# ---------------------------------------------------------------------------------------------------------
# images


def test_images_too_small_for_the_network_are_named(tmp_path):
    root = make_folder_split(tmp_path / "raw", n=2, hw=(16, 32))
    Image.fromarray(np.zeros((6, 6, 3), np.uint8)).save(root / "images" / "train" / "im001.png")
    Image.fromarray(np.zeros((6, 6), np.uint8)).save(root / "labels" / "train" / "im001.png")
    with pytest.raises(DataError, match=rf"^{root / 'images' / 'train' / 'im001.png'}: image is 6x6 \(HxW\), "
                                        r"smaller than the network takes \(its output, 1/8 of the image, would be a "
                                        r"single pixel: at least 7 pixels on one side, dataset.min_side\)"):
        _prep(root, tmp_path / "prep")


def test_16bit_images_follow_one_scaling_rule(tmp_path, capsys):
    root = make_folder_split(tmp_path / "raw", n=1, hw=(16, 32))
    raw = np.full((16, 32), 4095, np.uint16)  # a 12-bit camera at full scale
    raw[0, 0] = 2048
    path = root / "images" / "train" / "im000.png"
    Image.fromarray(raw).save(path)
    assert read_image(path)[0, 1, 0] == 16  # 4095 * 255 / 65535 = 15.9: near-black
    meta = _prep(root, tmp_path / "p16")
    assert meta["image_bits"] == 16 and meta["image_max"] == 4095
    assert meta["warnings"] == ["the 16-bit images use only 12 bits (largest value 4095); with dataset.image_bits: "
                                "16 they are scaled by 255/65535 and come out near-black: set dataset.image_bits: "
                                "12 (value * 255 / (2**bits - 1))"]
    meta = _prep(root, tmp_path / "p12", image_bits=12)
    assert meta["warnings"] == []
    from cpsl.data.prepared import PreparedSplit

    image, _ = PreparedSplit(tmp_path / "p12").load(0)
    assert image[0, 1, 0] == 255 and image[0, 0, 0] == 128  # 2048 * 255 / 4095 = 127.5 -> 128


# ---------------------------------------------------------------------------------------------------------
# settings checked before any job runs


def test_stage1_sample_count_is_checked_against_the_crop():
    base = {"stage": "stage1", "max_iters": 1, "data": {"source": "s", "target": "t", "crop": [32, 64]},
            "init_checkpoint": "w.pt", "model": {"backbone": "resnet18"},
            "selflabel": {"soft_labels": "a", "prototypes": "b", "class_dist": "c", "pixels_per_image": 256,
                          "queue_length": 1024}}
    with pytest.raises(ConfigError, match=r"^x.selflabel.pixels_per_image: 256 is more than the 128 pixels of the "
                                          r"label grid \(crop / 4\), 8x16 for data.crop \[32, 64\]; lower "
                                          r"selflabel.pixels_per_image or enlarge data.crop$"):
        load(TrainConfig, base, "x")
    ref = copy.deepcopy(base)
    ref["selflabel"].update(pixels_per_image=64, queue_length=128, reference_queue_labels=True)
    with pytest.raises(ConfigError, match=r"64 is more than the 45 pixels of the student's output grid \(crop / "
                                          r"8\), 5x9"):
        load(TrainConfig, ref, "x")
    base["selflabel"].update(pixels_per_image=128, queue_length=1024)
    assert load(TrainConfig, base, "x").selflabel.pixels_per_image == 128


def test_a_resnet101_without_weights_must_say_random():
    cfg = {"stage": "source_only", "max_iters": 90000, "data": {"source": "s"}}
    with pytest.raises(ConfigError, match=r"^model.init: not set for a resnet101 \(the paper's network\): the stage "
                                          r"would train 90000 iterations from random weights\. .* write `init: "
                                          r"random` to mean it$"):
        load(TrainConfig, cfg)
    ok = load(TrainConfig, {**cfg, "model": {"init": "random"}})
    assert ok.model.init_file is None
    assert load(TrainConfig, {**cfg, "init_checkpoint": "a.pt"}).model.init_file is None
    assert load(TrainConfig, {**cfg, "model": {"backbone": "resnet18"}}).model.init is None


@pytest.fixture()
def own(tmp_path):
    root = make_folder_split(tmp_path / "data", n=2, hw=(16, 32))
    cfg = yaml.safe_load((REPO / "config.yaml").read_text())
    cfg["experiments"] = ["mine"]
    cfg["results_dir"] = str(tmp_path / "results")
    cfg["experiment_settings"]["mine"] = {
        "n_class": N_CLASS, "model": {"backbone": "resnet18"}, "train": {"max_iters": 5},
        "datasets": {role: {"format": "folder", "root": str(root), "split": "train"}
                     for role in ("source", "target_train", "target_val")}}
    return cfg, root


def test_an_experiment_without_stages_runs_the_whole_chain(own):
    cfg, _ = own
    assert W.stages(cfg, "mine") == ["source_only", "warmup", "oracle", "stage1", "stage2", "stage3"]
    W.step_config_files(cfg)
    resolved = yaml.safe_load((Path(cfg["results_dir"]) / "mine/seed0/configs/train_stage3.yaml").read_text())
    assert resolved["max_iters"] == 5 and resolved["stage"] == "stage3"
    cfg["experiment_settings"]["mine"]["datasets"]["target_train"]["labels"] = False
    assert W.stages(cfg, "mine") == ["source_only", "warmup", "stage1", "stage2", "stage3"]
    assert W.notes(cfg) == ["mine: no oracle row, as datasets.target_train has no labels (labels: false)"]


@pytest.mark.parametrize("edit, message", [
    (lambda e: e["datasets"]["target_train"].update(labels=False) or e.update(stages={"oracle": {}}),
     "experiment_settings.mine.stages.oracle: the oracle trains on target_train's labels, but "
     "datasets.target_train has labels: false; remove the oracle stage"),
    (lambda e: e["datasets"]["target_val"].update(labels=False),
     "experiment_settings.mine.datasets.target_val.labels: false, but every stage is evaluated on it, which needs "
     "labels"),
    (lambda e: e.update(n_class=5),
     "experiment_settings.mine.n_class: 5 does not match the 4 classes in {root}/classes.txt"),
], ids=["oracle-without-target-labels", "unlabelled-target-val", "n-class-against-classes-txt"])
def test_own_pair_settings_are_checked_when_the_workflow_is_parsed(own, edit, message):
    cfg, root = own
    edit(cfg["experiment_settings"]["mine"])
    with pytest.raises(ConfigError) as err:
        W.step_config_files(cfg)
    assert str(err.value) == "config: " + message.format(root=root)


def test_domains_with_other_classes_are_refused_when_the_workflow_is_parsed(own, tmp_path):
    cfg, root = own
    other = make_folder_split(tmp_path / "other", n=2, hw=(16, 32))
    (other / "classes.txt").write_text("a\nb\nc\nd\n")
    cfg["experiment_settings"]["mine"]["datasets"]["target_val"]["root"] = str(other)
    with pytest.raises(ConfigError, match=rf"^config: experiment_settings.mine.datasets: {root}/classes.txt and "
                                          rf"{other}/classes.txt name different classes"):
        W.step_config_files(cfg)


def test_a_tilde_in_a_dataset_root_is_expanded(own, monkeypatch, tmp_path):
    cfg, root = own
    monkeypatch.setenv("HOME", str(root.parent))
    cfg["experiment_settings"]["mine"]["datasets"]["source"]["root"] = "~/data"
    assert W.prepare_config(cfg, "mine", "source")["dataset"]["root"] == str(root)


def test_results_dir_must_be_ours(own, tmp_path):
    cfg, _ = own
    afile = tmp_path / "afile"
    afile.write_text("x")
    for path, message in (
        (afile, f"config: results_dir: {afile}: is a file, not a folder; choose another results_dir"),
        (tmp_path / "data", f"config: results_dir: {tmp_path / 'data'}: folder exists, is not empty and was not "
                            "made by cpsl-pipeline (no .cpsl-output.json in it); choose a new or empty folder, so "
                            "that no file of yours is overwritten"),
        (Path("/sys/cpsl-results"), "config: results_dir: /sys/cpsl-results: cannot write there (Operation not "
                                    "permitted); choose a folder you can write to"),
    ):
        cfg["results_dir"] = str(path)
        with pytest.raises(ConfigError) as err:
            W.step_config_files(cfg)
        assert str(err.value) == message
    assert afile.read_text() == "x" and sorted(p.name for p in (tmp_path / "data").iterdir()) == [
        "classes.txt", "images", "labels"]


def test_report_before_a_run_is_one_line(tmp_path):
    snakemake = Path(sys.executable).parent / "snakemake"
    res = subprocess.run([str(snakemake), "-s", str(REPO / "Snakefile"), "-d", str(tmp_path), "--configfile",
                          str(REPO / "config.yaml"), "--report", str(tmp_path / "r.html")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 1
    assert res.stderr.strip().splitlines()[-1] == (
        "cpsl-pipeline: error: snakemake --report needs a finished run: results/summary.csv does not exist yet; "
        "run `snakemake --cores N` first (with the same --config/--configfile)")
