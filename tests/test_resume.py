"""Killing training (SIGKILL) and rerunning the same command gives the weights of an uninterrupted run."""

from __future__ import annotations

import json

import pytest

from cpsl.config import TrainConfig, load
from cpsl.models.checkpoint import load_checkpoint
from cpsl.train.loop import fingerprint, train
from tests.train_helpers import (finish, kill_at_first_checkpoint, max_weight_diff, one_thread,  # noqa: F401
                                 pair_dir, start_train, train_dict, write_config)


def _losses(path):
    return [{k: v for k, v in json.loads(line).items() if k.startswith(("iteration", "loss/", "lr/"))}
            for line in path.read_text().splitlines()]


@pytest.mark.usefixtures("one_thread")
def test_kill_and_resume_gives_the_uninterrupted_weights(tmp_path, pair_dir):  # noqa: F811
    # BatchNorm in train mode and dropout on: the resumed run must restore RNG states and the data position.
    cfg = train_dict(pair_dir, "source_only", max_iters=30, checkpoint_interval=5, log_interval=1,
                     **{"data.workers": 1, "data.lab_transfer": True})
    config = write_config(tmp_path / "train.yaml", cfg)
    killed, full = tmp_path / "killed", tmp_path / "full"
    last = kill_at_first_checkpoint(config, killed)
    assert last.exists(), "no checkpoint was written before the deadline"
    assert not (killed / "checkpoint.pt").exists(), "the run finished before it was killed"
    stopped_at = load_checkpoint(last)["iteration"]
    assert 5 <= stopped_at < 30

    # The same command again; only the worker count differs (the data do not depend on it).
    cfg["data"]["workers"] = 0
    resumed = start_train(write_config(tmp_path / "resume.yaml", cfg), killed)
    cfg["data"]["workers"] = 1
    train(load(TrainConfig, cfg), full)  # the uninterrupted run, in this process (one thread, like the CLI)
    assert "resuming from" in finish(resumed)

    a, b = load_checkpoint(killed / "checkpoint.pt"), load_checkpoint(full / "checkpoint.pt")
    assert a["iteration"] == b["iteration"] == 30
    assert max_weight_diff(a["model"], b["model"]) <= 1e-6  # in practice bit-identical
    assert load_checkpoint(last)["iteration"] == 30  # the resumable state is kept at the final iteration
    assert _losses(killed / "metrics.jsonl") == _losses(full / "metrics.jsonl")  # one line per iteration, 1..30
    summary = json.loads((killed / "train_summary.json").read_text())
    assert summary["resumed_from"] == stopped_at


@pytest.mark.usefixtures("one_thread")
def test_a_finished_run_starts_over_when_an_input_was_rebuilt(tmp_path, pair_dir, capsys):  # noqa: F811
    # Snakemake reruns a stage whose input was rebuilt (e.g. stage 1 after a new warm-up): the settings are the
    # same, so only the inputs' fingerprints tell that last.pt was trained on something else.
    import os
    import shutil

    src = shutil.copytree(train_dict(pair_dir)["data"]["source"], tmp_path / "source")
    cfg = load(TrainConfig, train_dict(pair_dir, max_iters=4, **{"data.source": str(src)}))
    out = tmp_path / "run"
    assert train(cfg, out)["resumed_from"] == 0
    assert train(cfg, out)["resumed_from"] == 4            # unchanged inputs: nothing is retrained
    assert "starting over" not in capsys.readouterr().err
    stored = load_checkpoint(out / "checkpoints" / "last.pt")["extra"]["inputs"]
    assert set(stored) == {"data.source", "data.target"} and stored["data.source"] == fingerprint(src)

    first = sorted(p for p in src.rglob("*") if p.is_file())[0]
    stat = first.stat()
    os.utime(first, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))   # rebuilt: same bytes, new file
    assert fingerprint(src) != stored["data.source"]
    assert train(cfg, out)["resumed_from"] == 0
    assert "is a finished run with other inputs (data.source was rebuilt since); starting over" in \
        capsys.readouterr().err
    assert load_checkpoint(out / "checkpoints" / "last.pt")["extra"]["inputs"]["data.source"] == fingerprint(src)


def test_fingerprints_of_files_and_folders(tmp_path):
    import os

    folder = tmp_path / "labels"
    (folder / "a").mkdir(parents=True)
    (folder / "a" / "x.png").write_bytes(b"12")
    (folder / "y.png").write_bytes(b"345")
    one = fingerprint(folder)
    assert fingerprint(folder) == one and len(one) == 16
    assert fingerprint(tmp_path / "nothing") == "missing"
    file_print = fingerprint(folder / "y.png")
    (folder / "y.png").write_bytes(b"346")             # same size; a new modification time
    stat = (folder / "y.png").stat()
    os.utime(folder / "y.png", ns=(stat.st_atime_ns, stat.st_mtime_ns + 5))
    assert fingerprint(folder) != one and fingerprint(folder / "y.png") != file_print
    again = fingerprint(folder)
    (folder / "a" / "z.png").write_bytes(b"")          # a file more in a subfolder
    assert fingerprint(folder) != again
