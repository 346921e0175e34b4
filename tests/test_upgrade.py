"""Updating the package in the middle of a project: settings added since a step ran, at their defaults, neither
rerun the step (its resolved config file is kept) nor stop a killed training run from resuming."""

import copy
import os
from pathlib import Path

import pytest
import yaml

from cpsl import workflow as W
from cpsl.config import TrainConfig, to_dict
from cpsl.errors import CheckpointError
from cpsl.train.loop import _settings_differ, check_resume_config
from tests.train_helpers import train_config

REPO = Path(__file__).resolve().parent.parent
# settings that later versions added (#21, #25): a config written before them lacks these keys
ADDED = ("accumulate", "channels_last", "eval_interval", "eval_images")


def _written_before(resolved: dict) -> dict:
    older = copy.deepcopy(resolved)
    for key in ADDED:
        del older[key]
    return older


def test_a_step_config_without_settings_added_since_is_kept(tmp_path):
    shipped = yaml.safe_load((REPO / "config.yaml").read_text())
    shipped["results_dir"] = str(tmp_path / "results")
    resolved = W.train_config(shipped, "demo", 0, "stage1")
    assert all(key in resolved for key in ADDED)
    path = tmp_path / "train_stage1.yaml"
    old_text = yaml.safe_dump(_written_before(resolved), sort_keys=False)
    path.write_text(old_text)
    os.utime(path, (1_000_000, 1_000_000))
    W.write_step_config(path, resolved)
    # kept byte for byte and with its time: Snakemake sees no change, the finished stage is not rerun
    assert path.read_text() == old_text and path.stat().st_mtime == 1_000_000
    # a real change of an old setting, or an added setting away from its default, rewrites the file
    for key, value in (("max_iters", resolved["max_iters"] + 1), ("accumulate", 2)):
        path.write_text(old_text)
        W.write_step_config(path, {**resolved, key: value})
        assert yaml.safe_load(path.read_text())[key] == value, key
    # a file with a setting that no longer exists is rewritten (nothing to compare it with)
    path.write_text(yaml.safe_dump({**_written_before(resolved), "removed_setting": 1}))
    W.write_step_config(path, resolved)
    assert yaml.safe_load(path.read_text()) == resolved
    # the same for an inference step's file (another config class, chosen by the file name)
    evaluate = W.inference_config(shipped, "demo", 0, "evaluate", "stage1", "target_val")
    path = tmp_path / "evaluate_stage1_target_val.yaml"
    older = {k: v for k, v in evaluate.items() if k != "samples"}
    path.write_text(yaml.safe_dump(older, sort_keys=False))
    before = path.read_text()
    W.write_step_config(path, evaluate)
    assert path.read_text() == before


def test_a_checkpoint_without_settings_added_since_resumes(tmp_path):
    cfg = train_config(tmp_path, "source_only")
    state = {"config": _written_before(to_dict(cfg)), "iteration": 2}
    check_resume_config(state, cfg, tmp_path / "last.pt")           # no error: the added settings are defaults
    assert not _settings_differ(state, cfg)
    changed = TrainConfig(**{**cfg.__dict__, "accumulate": 2})
    with pytest.raises(CheckpointError, match=r"different settings \(accumulate: 1 there, 2 now\)"):
        check_resume_config(state, changed, tmp_path / "last.pt")
    assert _settings_differ(state, changed)
