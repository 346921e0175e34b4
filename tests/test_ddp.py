"""DDP: 2 processes under torchrun (gloo, CPU) give the weights of 1 process on the same global batch."""

from __future__ import annotations

import json
import re

import pytest

from cpsl import outputs

from cpsl.config import TrainConfig, load
from cpsl.models.checkpoint import load_checkpoint
from cpsl.train.loop import train
from tests.train_helpers import (TORCHRUN_2, finish, max_weight_diff, one_thread, pair_dir,  # noqa: F401
                                 start_train, train_dict, well_conditioned_init, write_config)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("stage", ["warmup"])
def test_two_processes_match_one(tmp_path, pair_dir, stage):  # noqa: F811
    # BatchNorm frozen (SyncBatchNorm needs CUDA) and no dropout (its masks are drawn per process); the
    # cross-entropy is normalised by the valid pixels of the *global* batch, so the ranks' different ignore
    # counts do not matter. Warm-up exercises two DDP-wrapped networks and two forward passes per step.
    init = well_conditioned_init(tmp_path / "init.pt")
    cfg = train_dict(pair_dir, stage, max_iters=4, freeze_bn=True, init_checkpoint=str(init),
                     checkpoint_interval=2, **{"model.dropout": 0.0, "data.batch_size": 4, "data.workers": 1})
    config = write_config(tmp_path / "train.yaml", cfg)
    ddp = start_train(config, tmp_path / "ddp", *TORCHRUN_2)
    train(load(TrainConfig, cfg), tmp_path / "single")  # one process, meanwhile
    finish(ddp)

    a, b = load_checkpoint(tmp_path / "ddp" / "checkpoint.pt"), load_checkpoint(tmp_path / "single" / "checkpoint.pt")
    assert a["iteration"] == b["iteration"] == 4
    assert max_weight_diff(a["model"], b["model"]) < 1e-5
    assert max_weight_diff(a["discriminator"], b["discriminator"]) < 1e-5
    summary = json.loads((tmp_path / "ddp" / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_batch"] == 4
    lines = (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["iteration"] for line in lines] == [1, 2, 3, 4]  # rank 0 alone wrote it
    assert (tmp_path / "ddp" / "run_info.json").exists()


def test_a_failed_checkpoint_save_stops_every_rank_with_the_same_line(tmp_path, pair_dir):  # noqa: F811
    """Rank 0 cannot write checkpoints/last.pt (``checkpoints`` is a file): both ranks stop at once with the same
    one-line error, instead of rank 1 waiting in its next collective (on NCCL, until the timeout)."""
    import subprocess

    cfg = train_dict(pair_dir, "source_only", max_iters=4, checkpoint_interval=2,
                     **{"data.batch_size": 4, "data.workers": 0})
    config = write_config(tmp_path / "train.yaml", cfg)
    out = tmp_path / "ddp"
    out.mkdir()
    outputs.write_marker(out, "train")  # an earlier training run's folder
    (out / "checkpoints").write_text("not a folder")
    proc = start_train(config, out, *TORCHRUN_2)
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError("the ranks did not stop") from None
    assert proc.returncode != 0
    # each rank's line, wherever rank 0's progress bar (same stderr, no newline of its own) cut into it
    lines = re.findall(r"cpsl train: error: .*?File exists: '[^']*'", err)
    assert lines == [f"cpsl train: error: writing {out / 'checkpoints' / 'last.pt'}: FileExistsError: [Errno 17] "
                     f"File exists: '{out / 'checkpoints'}'"] * 2, err[-3000:]
    assert "cpsl/train/loop.py" not in err, err[-3000:]   # no rank's traceback (torchrun prints its own)
