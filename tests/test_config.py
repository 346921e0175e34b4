"""Typed step settings: unknown keys, wrong types and out-of-range values are rejected naming the key."""

from pathlib import Path

import pytest

from cpsl import config as C
from cpsl.errors import ConfigError


def test_load_fills_defaults_and_converts_types():
    cfg = C.load(C.PrepareConfig, {"dataset": {"format": "gta5", "root": "/data/gta5", "split": "all"}})
    assert cfg.dataset.root == Path("/data/gta5")
    assert cfg.dataset.n_class == 19 and cfg.dataset.allow_skip is False and cfg.lab_stats is True
    assert C.to_dict(cfg)["dataset"]["root"] == "/data/gta5"


def test_unknown_key_is_named_with_a_suggestion():
    with pytest.raises(ConfigError) as err:
        C.load(C.PrepareConfig, {"dataset": {"format": "gta5", "root": "/x", "alow_skip": True}})
    assert str(err.value) == "dataset.alow_skip: unknown setting (did you mean 'allow_skip'?)"


@pytest.mark.parametrize(
    "data, message",
    [
        ({"dataset": {"format": "kitti", "root": "/x"}},
         "dataset.format: 'kitti' is not one of 'cityscapes', 'gta5', 'synthia', 'folder'"),
        ({"dataset": {"format": "gta5", "root": "/x", "n_class": "19"}},
         "dataset.n_class: expected an integer, got '19'"),
        ({"dataset": {"format": "gta5", "root": "/x", "allow_skip": "yes"}},
         "dataset.allow_skip: expected true or false, got 'yes'"),
        ({"dataset": {"format": "gta5", "root": "/x", "n_class": 17}},
         "dataset.n_class: must be 19, 16 or 13 for format 'gta5' (got 17)"),
        ({"dataset": {"format": "gta5", "root": "/x", "expected_size": [128]}},
         "dataset.expected_size: must be [height, width] > 0 (got [128])"),
        ({"dataset": {"format": "gta5"}}, "dataset.root: required setting is missing"),
        ({}, "dataset: required setting is missing"),
    ],
)
def test_bad_values_name_the_key(data, message):
    with pytest.raises(ConfigError) as err:
        C.load(C.PrepareConfig, data)
    assert str(err.value) == message


def test_folder_format_allows_any_class_count():
    cfg = C.load(C.PrepareConfig, {"dataset": {"format": "folder", "root": "/x", "n_class": 7}})
    assert cfg.dataset.n_class == 7


def test_synth_ranges():
    with pytest.raises(ConfigError, match=r"^n_source_val: must be in 0..n_source-1 \(got 10\)$"):
        C.load(C.SynthConfig, {"n_source": 10, "n_source_val": 10})
    with pytest.raises(ConfigError, match=r"^width: must be > 0 \(got 0\)$"):
        C.load(C.SynthConfig, {"width": 0})


def test_load_file_names_the_file(tmp_path):
    path = tmp_path / "prepare.yaml"
    path.write_text("dataset:\n  format: gta5\n  root: /x\n  workerz: 3\n")
    with pytest.raises(ConfigError) as err:
        C.load_file(C.PrepareConfig, path)
    assert str(err.value) == f"{path}: dataset.workerz: unknown setting (did you mean 'workers'?)"
    with pytest.raises(ConfigError, match="config file not found"):
        C.load_file(C.PrepareConfig, tmp_path / "missing.yaml")
    path.write_text("dataset: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        C.load_file(C.PrepareConfig, path)
