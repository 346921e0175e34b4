"""Stage 1 under DDP: 2 processes (torchrun, gloo, CPU) assign the same clusters and reach the same weights as
1 process on the same global batch."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from cpsl.config import TrainConfig, load
from cpsl.methods.sinkhorn import sinkhorn
from cpsl.models.checkpoint import load_checkpoint
from cpsl.train.loop import train
from tests.test_selflabel import stage1_dict
from tests.train_helpers import (TORCHRUN_2, finish, max_weight_diff, one_thread, pair_dir,  # noqa: F401
                                 start_train, write_config)


@pytest.mark.usefixtures("one_thread")
def test_two_processes_match_one(tmp_path, pair_dir):  # noqa: F811
    # BatchNorm frozen and no dropout (as in test_ddp); a well-conditioned init (stage1_inputs). The queue holds
    # one global batch (4 images x 8 pixels), so from the first iteration on the Sinkhorn of each image runs over
    # pixels of *both* ranks' images: only the gathered, rank-ordered queue makes the runs agree.
    cfg = stage1_dict(pair_dir, max_iters=3, freeze_bn=True, checkpoint_interval=2,
                      **{"model.dropout": 0.0, "data.batch_size": 4, "data.workers": 1})
    config = write_config(tmp_path / "train.yaml", cfg)
    ddp = start_train(config, tmp_path / "ddp", *TORCHRUN_2)
    train(load(TrainConfig, cfg), tmp_path / "single")  # one process, meanwhile
    finish(ddp)

    a, b = load_checkpoint(tmp_path / "ddp" / "checkpoint.pt"), load_checkpoint(tmp_path / "single" / "checkpoint.pt")
    assert a["iteration"] == b["iteration"] == 3
    assert max_weight_diff(a["model"], b["model"]) < 1e-5
    assert max_weight_diff(a["ema_model"], b["ema_model"]) < 1e-5
    for key in ("prototypes", "prototypes_ema"):
        assert (a[key] - b[key]).abs().max() < 1e-5, key
    qa, qb = a["queues"], b["queues"]
    assert qa["filled"] == qb["filled"] == 32
    assert torch.equal(qa["labels"], qb["labels"])              # same pixels, same rectified labels, same order
    assert (qa["feats"] - qb["feats"]).abs().max() < 1e-5
    assert (qa["logits"] - qb["logits"]).abs().max() < 1e-5
    # the same Sinkhorn assignments of the queued pixels to the learnt prototypes
    marginal = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
    assign = [sinkhorn(q["feats"] @ F.normalize(c["prototypes"], dim=1).t(), marginal).argmax(1)
              for q, c in ((qa, a), (qb, b))]
    assert torch.equal(assign[0], assign[1])

    rows = [[json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
            for run in ("ddp", "single")]
    assert [r["iteration"] for r in rows[0]] == [1, 2, 3]
    for ra, rb in zip(*rows):
        for k in ("loss/sl", "loss/cts", "loss/consist", "loss/contrast", "loss/ce_source", "loss/cutmix"):
            assert ra[k] == pytest.approx(rb[k], rel=1e-4, abs=1e-6), (ra["iteration"], k)
    assert any(r["loss/contrast"] > 0 for r in rows[1])          # the contrastive term ran
    summary = json.loads((tmp_path / "ddp" / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_batch"] == 4
