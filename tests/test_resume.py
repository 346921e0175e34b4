"""Killing training (SIGKILL) and rerunning the same command gives the weights of an uninterrupted run."""

from __future__ import annotations

import json

import pytest

from cpsl.config import TrainConfig, load
from cpsl.models.checkpoint import load_checkpoint
from cpsl.train.loop import train
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
