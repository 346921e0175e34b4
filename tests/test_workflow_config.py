"""config.yaml validation and per-step resolution (cpsl/workflow.py), without running Snakemake."""

import copy
import os
from pathlib import Path

import pytest
import yaml

from cpsl import workflow as W
from cpsl.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"


@pytest.fixture()
def shipped():
    return yaml.safe_load((REPO / "config.yaml").read_text())


def test_shipped_config_is_valid_and_defaults_to_demo(shipped):
    W.check_schema(shipped, SCHEMA)
    assert W.selected_experiments(shipped) == ["demo"]
    assert set(shipped["experiment_settings"]) >= {"demo", "gta5_cityscapes", "synthia_cityscapes"}
    assert shipped["experiment_settings"]["synthia_cityscapes"]["n_class"] == 16


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c.update(experimentz=["demo"]), "config: experimentz: unknown setting"),
        (lambda c: c["experiment_settings"]["demo"]["synth"].update(heigth=64),
         "config: experiment_settings.demo.synth.heigth: unknown setting"),
        (lambda c: c["experiment_settings"]["demo"]["datasets"]["source"].update(format="kitti"),
         "config: experiment_settings.demo.datasets.source.format: 'kitti' is not one of"),
        (lambda c: c["experiment_settings"]["demo"]["synth"].update(width=8),
         "config: experiment_settings.demo.synth.width: 8 is less than the minimum of 32"),
        (lambda c: c["experiment_settings"]["demo"].update(seeds=[-1]),
         "config: experiment_settings.demo.seeds[0]: -1 is less than the minimum of 0"),
        (lambda c: c["experiment_settings"]["demo"]["datasets"].pop("target_val"),
         "config: experiment_settings.demo.datasets: 'target_val' is a required property"),
    ],
)
def test_schema_errors_name_the_key(shipped, edit, message):
    edit(shipped)
    with pytest.raises(ConfigError) as err:
        W.check_schema(shipped, SCHEMA)
    assert str(err.value).startswith(message)


def test_unknown_experiment_is_named(shipped):
    shipped["experiments"] = ["demo", "gta5_to_mars"]
    with pytest.raises(ConfigError, match=r"^config: experiments: unknown experiment 'gta5_to_mars'"):
        W.selected_experiments(shipped)


def test_missing_dataset_root_names_the_key(shipped, tmp_path):
    shipped["experiments"] = ["gta5_cityscapes"]
    shipped["results_dir"] = str(tmp_path / "results")
    with pytest.raises(ConfigError) as err:
        W.step_config_files(shipped)
    assert str(err.value).startswith(
        "config: experiment_settings.gta5_cityscapes.datasets.source.root: dataset root is not set")
    shipped["experiment_settings"]["gta5_cityscapes"]["datasets"]["source"]["root"] = str(tmp_path / "nope")
    with pytest.raises(ConfigError, match=r"datasets\.source\.root: dataset root '.*nope' does not exist"):
        W.step_config_files(shipped)


def test_range_errors_from_typed_settings_name_the_key(shipped, tmp_path):
    shipped["results_dir"] = str(tmp_path / "results")
    shipped["experiment_settings"]["demo"]["synth"]["n_source_val"] = 300
    with pytest.raises(ConfigError) as err:
        W.step_config_files(shipped)
    assert str(err.value) == "experiment_settings.demo.synth.n_source_val: must be in 0..n_source-1 (got 300)"


def test_resolution_writes_step_configs_only_when_changed(shipped, tmp_path):
    shipped["results_dir"] = str(tmp_path / "results")
    files = W.step_config_files(shipped)
    assert sorted(files) == [
        "collect", "demo/prepare_source", "demo/prepare_source_val", "demo/prepare_target_train", "demo/prepare_target_val",
        "demo/seed0/class_dist_warmup", "demo/seed0/evaluate_oracle_target_val",
        "demo/seed0/evaluate_source_only_source_val", "demo/seed0/evaluate_source_only_target_val",
        "demo/seed0/evaluate_stage1_target_val", "demo/seed0/evaluate_stage2_target_val",
        "demo/seed0/evaluate_stage3_target_val", "demo/seed0/evaluate_warmup_target_val",
        "demo/seed0/prototypes_warmup", "demo/seed0/pseudo_hard_stage1", "demo/seed0/pseudo_hard_stage2",
        "demo/seed0/pseudo_soft_warmup", "demo/seed0/train_oracle", "demo/seed0/train_source_only",
        "demo/seed0/train_stage1", "demo/seed0/train_stage2", "demo/seed0/train_stage3", "demo/seed0/train_warmup",
        "demo/synth"]
    prep = yaml.safe_load(files["demo/prepare_target_val"].read_text())
    assert prep["dataset"] == {"format": "cityscapes", "root": str(tmp_path / "results/demo/synth/cityscapes"),
                               "split": "val", "n_class": 19, "allow_skip": False, "expected_size": None,
                               "workers": 2, "labels": True, "image_bits": 16, "min_side": 7}
    synth = files["demo/synth"]
    os.utime(synth, (1_000_000, 1_000_000))
    W.step_config_files(copy.deepcopy(shipped))           # unchanged: the file (and its mtime) stay
    assert synth.stat().st_mtime == 1_000_000
    shipped["experiment_settings"]["demo"]["synth"]["seed"] = 7
    W.step_config_files(shipped)                          # changed: rewritten, so Snakemake reruns synth
    assert synth.stat().st_mtime > 1_000_000
    assert yaml.safe_load(synth.read_text())["seed"] == 7
    # the prepare configs did not change, so they keep their content
    assert yaml.safe_load(files["demo/prepare_target_val"].read_text()) == prep


def test_train_configs_merge_shared_and_stage_settings(shipped, tmp_path):
    shipped["results_dir"] = str(tmp_path / "results")
    demo = shipped["experiment_settings"]["demo"]
    demo["train"]["optim"] = {"lr": 0.02, "head_lr_mult": 1.0}
    demo["stages"]["warmup"] = {"max_iters": 7, "optim": {"lr": 0.005}}
    files = W.step_config_files(shipped)
    warm = yaml.safe_load(files["demo/seed0/train_warmup"].read_text())
    assert warm["stage"] == "warmup" and warm["max_iters"] == 7 and warm["seed"] == 0
    assert warm["optim"]["lr"] == 0.005 and warm["optim"]["head_lr_mult"] == 1.0   # stage over shared
    assert warm["data"]["source"] == str(tmp_path / "results/demo/data/source")
    assert warm["data"]["target"] == str(tmp_path / "results/demo/data/target_train")
    assert warm["model"]["backbone"] == demo["model"]["backbone"] and warm["model"]["n_class"] == 19
    oracle = yaml.safe_load(files["demo/seed0/train_oracle"].read_text())
    assert oracle["data"]["source"] is None and oracle["optim"]["lr"] == 0.02
    ev = yaml.safe_load(files["demo/seed0/evaluate_source_only_source_val"].read_text())
    assert ev["data"] == str(tmp_path / "results/demo/data/source_val")
    assert ev["checkpoint"] == str(tmp_path / "results/demo/seed0/source_only/checkpoint.pt")
    assert (ev["stage"], ev["experiment"], ev["seed"]) == ("source_only", "demo", 0)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d["train"].update(max_iter=5),
         "config: experiment_settings.demo.train.max_iter: unknown setting (did you mean 'max_iters'?)"),
        (lambda d: d["stages"]["warmup"].update(optim={"lrr": 1}),
         "config: experiment_settings.demo.stages.warmup.optim.lrr: unknown setting (did you mean 'lr'?)"),
        (lambda d: d["model"].update(backbone="vgg16"),
         "experiment_settings.demo.stages.source_only.model.backbone: 'vgg16' is not one of"),
        (lambda d: d["stages"]["oracle"].update(max_iters=0),
         "experiment_settings.demo.stages.oracle.max_iters: must be >= 1 (got 0)"),
        (lambda d: d["inference"].update(batch_size=0),
         "experiment_settings.demo.inference.batch_size: must be >= 1 (got 0)"),
    ],
)
def test_stage_setting_errors_name_the_key(shipped, tmp_path, edit, message):
    shipped["results_dir"] = str(tmp_path / "results")
    edit(shipped["experiment_settings"]["demo"])
    with pytest.raises(ConfigError) as err:
        W.step_config_files(shipped)
    assert str(err.value).startswith(message)


def test_later_stages_consume_earlier_products(shipped, tmp_path):
    res = tmp_path / "results"
    shipped["results_dir"] = str(res)
    shipped["experiment_settings"]["demo"]["stages"].update(stage1={"max_iters": 5}, stage2={"max_iters": 5},
                                                             stage3={"max_iters": 5})
    files = W.step_config_files(shipped)
    s1 = yaml.safe_load(files["demo/seed0/train_stage1"].read_text())
    assert s1["init_checkpoint"] == str(res / "demo/seed0/warmup/checkpoint.pt")
    assert s1["selflabel"]["soft_labels"] == str(res / "demo/seed0/warmup/pseudo_soft")
    assert s1["selflabel"]["prototypes"] == str(res / "demo/seed0/warmup/prototypes/prototypes.pt")
    assert s1["selflabel"]["class_dist"] == str(res / "demo/seed0/warmup/class_dist/class_distribution.npy")
    s3 = yaml.safe_load(files["demo/seed0/train_stage3"].read_text())
    assert s3["init_checkpoint"] == s3["distill"]["teacher"] == str(res / "demo/seed0/stage2/checkpoint.pt")
    assert s3["distill"]["hard_labels"] == str(res / "demo/seed0/stage2/pseudo_hard")
    # the warm-up's class marginal, logged beside the class shares of stages 2 and 3 (#27)
    assert s3["distill"]["class_dist"] == s1["selflabel"]["class_dist"]
    assert W.stage_input_files(shipped, "demo", 0, "stage2")["distill.class_dist"] == \
        res / "demo/seed0/warmup/class_dist"                # the product folder: a Snakemake input
    assert W.products(shipped, "demo") == [("warmup", "pseudo_soft"), ("warmup", "prototypes"),
                                           ("warmup", "class_dist"), ("stage1", "pseudo_hard"),
                                           ("stage2", "pseudo_hard")]
    del shipped["experiment_settings"]["demo"]["stages"]["stage1"]
    with pytest.raises(ConfigError, match=r"^config: experiment_settings\.demo\.stages\.stage2: needs stage 'stage1'"):
        W.step_config_files(shipped)


def test_model_init_can_name_an_earlier_stage(shipped, tmp_path):
    res = tmp_path / "results"
    shipped["results_dir"] = str(res)
    stages = shipped["experiment_settings"]["demo"]["stages"]
    stages["stage2"] = {"max_iters": 5, "model": {"init": "@source_only"}}
    files = W.step_config_files(shipped)
    s2 = yaml.safe_load(files["demo/seed0/train_stage2"].read_text())
    ckpt = res / "demo/seed0/source_only/checkpoint.pt"
    assert s2["model"]["init"] == str(ckpt) and s2["model"]["init_format"] == "checkpoint"
    assert W.stage_input_files(shipped, "demo", 0, "stage2")["model.init"] == ckpt   # a Snakemake input
    s3 = yaml.safe_load(files["demo/seed0/train_stage3"].read_text())
    assert s3["model"]["init"] is None
    # the shipped demo's stage 3: its own hard labels at 0.8, pseudo-label CE and KD on the full crop, lr 0.01
    assert (s3["distill"]["threshold"], s3["distill"]["label_stride"], s3["optim"]["lr"]) == (0.8, 1, 0.01)
    # the shipped demo: the source-only model trains on redrawn colours and the warm-up starts from it
    assert yaml.safe_load(files["demo/seed0/train_source_only"].read_text())["data"]["random_colors"] is True
    assert yaml.safe_load(files["demo/seed0/train_warmup"].read_text())["init_checkpoint"] == str(ckpt)
    stages["stage2"]["model"] = {"init": "@stage3"}
    with pytest.raises(ConfigError, match=r"^config: experiment_settings\.demo\.stages\.stage2\.model\.init: "
                                          r"'@stage3' must name an earlier stage \(@source_only, @warmup, "
                                          r"@oracle, @stage1\)"):
        W.step_config_files(shipped)
    stages["stage2"]["model"] = {"init": "@source_only", "init_format": "simclr"}
    with pytest.raises(ConfigError, match=r"stages\.stage2\.model\.init_format: must be 'checkpoint'"):
        W.step_config_files(shipped)
    stages["stage2"]["model"] = {"init": "@source_only"}
    del stages["warmup"]["init_checkpoint"]  # the shipped warm-up needs source_only too
    del stages["source_only"]
    with pytest.raises(ConfigError, match=r"stages\.stage2: needs stage 'source_only' \(for model\.init\)"):
        W.step_config_files(shipped)


def test_init_checkpoint_can_name_an_earlier_stage(shipped, tmp_path):
    res = tmp_path / "results"
    shipped["results_dir"] = str(res)
    stages = shipped["experiment_settings"]["demo"]["stages"]
    stages["warmup"] = {"max_iters": 5, "init_checkpoint": "@source_only"}
    files = W.step_config_files(shipped)
    warmup = yaml.safe_load(files["demo/seed0/train_warmup"].read_text())
    ckpt = res / "demo/seed0/source_only/checkpoint.pt"
    assert warmup["init_checkpoint"] == str(ckpt)                  # the whole network, classifier included
    assert W.stage_input_files(shipped, "demo", 0, "warmup")["init_checkpoint"] == ckpt   # a Snakemake input
    assert yaml.safe_load(files["demo/seed0/train_oracle"].read_text())["init_checkpoint"] is None
    # the shipped demo's stage-2 student: the whole stage-1 network, which is also its teacher
    stage2 = yaml.safe_load(files["demo/seed0/train_stage2"].read_text())
    assert stage2["init_checkpoint"] == stage2["distill"]["teacher"] == str(res / "demo/seed0/stage1/checkpoint.pt")
    assert stage2["model"]["init"] is None
    stages["warmup"]["init_checkpoint"] = "@oracle"
    with pytest.raises(ConfigError, match=r"^config: experiment_settings\.demo\.stages\.warmup\.init_checkpoint: "
                                          r"'@oracle' must name an earlier stage \(@source_only\)"):
        W.step_config_files(shipped)
    # stage 1 (and stage 3) always continue the previous stage: a stage reference there is refused, not ignored
    stages["warmup"]["init_checkpoint"] = "@source_only"
    stages["stage1"]["init_checkpoint"] = "@source_only"
    with pytest.raises(ConfigError, match=r"stages\.stage1\.init_checkpoint: '@source_only': stage1 always starts "
                                          r"from the warmup checkpoint"):
        W.step_config_files(shipped)
    del stages["stage1"]["init_checkpoint"]
    del stages["source_only"]
    stages["stage2"].setdefault("model", {})["init"] = None
    with pytest.raises(ConfigError, match=r"stages\.warmup: needs stage 'source_only' \(for init_checkpoint\)"):
        W.step_config_files(shipped)


def test_chain_priorities_count_the_stages_waiting_on_each_one(shipped):
    # x10 the number of later stages waiting on each one, directly or through others
    def priorities():
        return {s: W.chain_priority(shipped, "demo", s) for s in W.STAGES}
    stages = shipped["experiment_settings"]["demo"]["stages"]
    # the shipped demo: the static chain below, plus the warm-up starting from the source-only model (so all four
    # later stages wait on source_only) and the stage-2 student starting from the stage-1 model (an edge that the
    # teacher already makes)
    assert stages["warmup"]["init_checkpoint"] == "@source_only" and stages["stage2"]["init_checkpoint"] == "@stage1"
    assert priorities() == {"source_only": 40, "warmup": 30, "oracle": 0, "stage1": 20, "stage2": 10, "stage3": 0}
    # a stage-2 student from the source-only backbone: stages 2 and 3 wait on source_only, as they already did
    stages["stage2"]["model"] = {"init": "@source_only"}
    assert priorities() == {"source_only": 40, "warmup": 30, "oracle": 0, "stage1": 20, "stage2": 10, "stage3": 0}
    stages["warmup"].pop("init_checkpoint")
    assert priorities() == {"source_only": 20, "warmup": 30, "oracle": 0, "stage1": 20, "stage2": 10, "stage3": 0}
    for stage in stages.values():
        stage.get("model", {}).pop("init", None)
        stage.pop("init_checkpoint", None)
    # the static chain: warmup feeds stage1, which feeds stage2, which feeds stage3
    assert priorities() == {"source_only": 0, "warmup": 30, "oracle": 0, "stage1": 20, "stage2": 10, "stage3": 0}
    # a model.init naming a stage is an edge too: stage 2 (and through it stage 3) waits on the oracle
    stages["stage2"].setdefault("model", {})["init"] = "@oracle"
    assert priorities() == {"source_only": 0, "warmup": 30, "oracle": 20, "stage1": 20, "stage2": 10, "stage3": 0}
    # without stage 3 in the experiment, nothing waits on stage 2
    del stages["stage3"]
    assert W.chain_priority(shipped, "demo", "stage2") == 0
    assert W.chain_priority(shipped, "demo", "oracle") == 10
