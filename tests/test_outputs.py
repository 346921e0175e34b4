"""A step's --out is its own (cpsl/outputs.py): nothing the program did not create is deleted or overwritten.

Each case runs the real CLI in a subprocess, asserts the one-line message and that the folder or file at --out
(and the dataset) is byte-for-byte as it was.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from cpsl import outputs, provenance
from cpsl.config import DatasetConfig, PrepareConfig
from cpsl.steps import prepare
from tests.inference_fixtures import tiny_checkpoint
from tests.reliability_helpers import error_line, run_cli, snapshot, write_yaml
from tests.train_helpers import make_folder_split, pair_dir, train_dict  # noqa: F401

N_CLASS = 4


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_folder_split(tmp_path_factory.mktemp("own") / "my data", n=3, hw=(16, 32))


def _prepare_config(tmp: Path, root: Path) -> Path:
    return write_yaml(tmp / "prepare.yaml", {"dataset": {"format": "folder", "root": str(root), "split": "train",
                                                          "n_class": N_CLASS, "workers": 0}})


def _refused(step: str, config: Path, out: Path, message: str, *watched: Path) -> None:
    before = {p: snapshot(p) if p.is_dir() else p.read_bytes() for p in (out, *watched) if p.exists()}
    rc, err = run_cli(step, config, out)
    assert rc == 2, err[-2000:]
    assert error_line(err, step) == message
    after = {p: snapshot(p) if p.is_dir() else p.read_bytes() for p in (out, *watched) if p.exists()}
    assert after == before, "a refused step changed files"


def test_prepare_refuses_the_dataset_root_as_out(dataset, tmp_path):
    out = dataset
    _refused("prepare", _prepare_config(tmp_path, dataset), out,
             f"{out}: --out is an input of cpsl prepare ({dataset}); choose another --out (nothing was changed)")
    assert (dataset / "classes.txt").is_file() and len(list((dataset / "images" / "train").iterdir())) == 3


def test_prepare_refuses_a_path_inside_the_dataset_root(dataset, tmp_path):
    out = dataset / "prepared"
    _refused("prepare", _prepare_config(tmp_path, dataset), out,
             f"{out}: --out is inside an input of cpsl prepare ({dataset}); choose another --out (nothing was "
             "changed)", dataset)
    assert not out.exists()


def test_prepare_refuses_a_folder_that_holds_the_dataset(dataset, tmp_path):
    out = dataset.parent
    _refused("prepare", _prepare_config(tmp_path, dataset), out,
             f"{out}: --out holds an input of cpsl prepare ({dataset}), which replacing the folder would delete; "
             "choose another --out (nothing was changed)")


def test_prepare_refuses_a_users_folder_and_a_file(dataset, tmp_path):
    config = _prepare_config(tmp_path, dataset)
    mine = tmp_path / "my folder"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    _refused("prepare", config, mine,
             f"{mine}: folder exists and was not written by cpsl prepare (no .cpsl-output.json in it); cpsl "
             "prepare replaces its --out and deletes nothing it did not make: choose another --out (nothing was "
             "changed), or remove the folder yourself")
    afile = tmp_path / "results.txt"
    afile.write_text("a file")
    _refused("prepare", config, afile,
             f"{afile}: --out is a file, not a folder of cpsl prepare; choose another --out (nothing was changed)")
    assert afile.read_text() == "a file"


def test_prepare_replaces_only_its_own_output(dataset, tmp_path):
    config = _prepare_config(tmp_path, dataset)
    out = tmp_path / "empty"
    out.mkdir()  # an empty folder holds nothing to lose
    assert run_cli("prepare", config, out)[0] == 0
    assert outputs.owner_steps(out) == {"prepare"}
    (out / "stale.txt").write_text("from the first run")
    assert run_cli("prepare", config, out)[0] == 0  # a rerun replaces the step's own earlier output
    assert not (out / "stale.txt").exists() and (out / "list.txt").is_file()
    # another step may not replace it
    ck = tiny_checkpoint(tmp_path / "ck.pt", n_class=N_CLASS)
    cfg = write_yaml(tmp_path / "hard.yaml", {"checkpoint": str(ck), "data": str(tmp_path / "other"),
                                              "device": "cpu", "workers": 0, "progress": False})
    _refused("pseudo-hard", cfg, out,
             f"{out}: folder exists and was not written by cpsl pseudo-hard (it was made by cpsl prepare); cpsl "
             "pseudo-hard replaces its --out and deletes nothing it did not make: choose another --out (nothing "
             "was changed), or remove the folder yourself")


def test_an_output_made_before_the_marker_is_recognised_by_its_run_record(dataset, tmp_path):
    config = _prepare_config(tmp_path, dataset)
    out = tmp_path / "old"
    assert run_cli("prepare", config, out)[0] == 0
    (out / outputs.MARKER).unlink()  # as an older cpsl left it: run_info.json says which step wrote it
    assert outputs.owner_steps(out) == {"prepare"}
    assert run_cli("prepare", config, out)[0] == 0


def test_train_refuses_to_write_into_a_users_folder(pair_dir, tmp_path):  # noqa: F811
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.yaml").write_text("my own settings\n")
    config = write_yaml(tmp_path / "train.yaml", train_dict(pair_dir, "source_only", max_iters=1))
    _refused("train", config, home,
             f"{home}: folder exists, is not empty and was not made by cpsl (no .cpsl-output.json in it); cpsl "
             "train would write its files into it: choose another --out (nothing was changed)")
    assert (home / "config.yaml").read_text() == "my own settings\n"


def test_train_refuses_an_out_inside_its_data(pair_dir, tmp_path):  # noqa: F811
    cfg = train_dict(pair_dir, "source_only", max_iters=1)
    source = Path(cfg["data"]["source"])
    out = source / "run"
    _refused("train", write_yaml(tmp_path / "train.yaml", cfg), out,
             f"{out}: --out is inside an input of cpsl train ({source}); choose another --out (nothing was "
             "changed)", source)


def test_outputs_respect_the_umask(dataset, tmp_path, monkeypatch):
    monkeypatch.setattr(provenance, "_UMASK", None)
    old = os.umask(0o027)
    try:
        out = tmp_path / "prepared"
        prepare.run(PrepareConfig(DatasetConfig(format="folder", root=dataset, split="train", n_class=N_CLASS,
                                                workers=0)), out)
        ck = tiny_checkpoint(tmp_path / "ck.pt", n_class=N_CLASS)
    finally:
        os.umask(old)
        provenance._UMASK = None
    for path in (out / "meta.json", out / "list.txt", next((out / "labels").iterdir()), out / outputs.MARKER, ck):
        assert stat.S_IMODE(path.stat().st_mode) == 0o640, path  # 0o666 & ~0o027; mkstemp alone gives 0o600
