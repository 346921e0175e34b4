"""Validation during training (``eval_interval``): the records, ``checkpoints/best.pt`` and its resumption."""

from __future__ import annotations

import json

import pytest
import torch

from cpsl.config import EvaluateConfig, TrainConfig, load
from cpsl.errors import ConfigError
from cpsl.models.checkpoint import load_checkpoint
from cpsl.steps import evaluate
from cpsl.train import loop
from cpsl.train.loop import train
from cpsl.train.validate import subset
from tests.train_helpers import (kill_at_first_checkpoint, max_weight_diff, one_thread,  # noqa: F401
                                 pair_dir, train_dict, write_config)


def _val_records(out):
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if "val/student" in r]


def _with_validation(pair_dir, **over):
    target = train_dict(pair_dir)["data"]["target"]   # the tiny target split (labelled, 6 images)
    return train_dict(pair_dir, "source_only", eval_data=target, **over)


def test_subset_spreads_the_images_evenly():
    assert subset(10, 3) == [0, 3, 6]
    assert subset(10, 4) == [0, 2, 5, 7]
    assert subset(5, 0) == subset(5, 5) == subset(5, 9) == [0, 1, 2, 3, 4]


def test_settings_are_checked(pair_dir):  # noqa: F811
    with pytest.raises(ConfigError, match=r"^eval_data: required when eval_interval is set \(2\)"):
        load(TrainConfig, train_dict(pair_dir, eval_interval=2))
    with pytest.raises(ConfigError, match=r"^eval_interval: must be >= 0 \(0: off; got -1\)"):
        load(TrainConfig, _with_validation(pair_dir, eval_interval=-1))
    with pytest.raises(ConfigError, match=r"^eval_images: must be >= 0 \(0: all images; got -3\)"):
        load(TrainConfig, _with_validation(pair_dir, eval_interval=2, eval_images=-3))


@pytest.mark.usefixtures("one_thread")
def test_validation_records_and_best_checkpoint(tmp_path, pair_dir, monkeypatch):  # noqa: F811
    # every iteration's resumable checkpoint is kept aside, to compare best.pt with the one of its iteration
    snapshots = {}
    save = loop.save_checkpoint

    def keep(path, state):
        if path.name == "last.pt":
            snapshots[state["iteration"]] = {k: v.clone() for k, v in state["model"].items()}
        return save(path, state)

    monkeypatch.setattr(loop, "save_checkpoint", keep)
    cfg = load(TrainConfig, _with_validation(pair_dir, max_iters=7, checkpoint_interval=1, log_interval=7,
                                             eval_interval=2, eval_images=5))
    out = tmp_path / "run"
    train(cfg, out)

    records = _val_records(out)
    assert [r["iteration"] for r in records] == [2, 4, 6, 7]          # every 2 iterations and at max_iters
    assert all(r["val_images"] == 5 for r in records)
    assert all(set(k for k in r if k.startswith("val_iou/")) == {f"val_iou/class{k}" for k in range(4)}
               for r in records)
    # the best so far after each validation, by hand (a later equal score wins, as in the reference)
    best, best_it = None, None
    for r in records:
        if best is None or r["val/student"] >= best:
            best, best_it = r["val/student"], r["iteration"]
        assert (r["val_best"], r["val_best_iteration"]) == (best, best_it)

    state = load_checkpoint(out / "checkpoints" / "best.pt")
    assert state["iteration"] == best_it and state["extra"]["validation"]["miou"] == best
    assert max_weight_diff(state["model"], snapshots[best_it]) == 0.0   # the weights of that iteration
    last = load_checkpoint(out / "checkpoints" / "last.pt")
    assert last["extra"]["validation"] == {"best_miou": best, "best_iteration": best_it}

    # cpsl evaluate on best.pt, over the same 5 images, gives the recorded score
    subset_dir = tmp_path / "eval"
    ecfg = EvaluateConfig(checkpoint=out / "checkpoints" / "best.pt", data=cfg.eval_data, device="cpu", workers=0,
                          samples=0, selection="best_on_val")
    monkeypatch.setattr("cpsl.inference.shard_indices", lambda n, rank, world: subset(n, 5)[rank::world])
    metrics = evaluate.run(ecfg, subset_dir)
    assert metrics["selection"] == "best_on_val" and metrics["iteration"] == best_it
    assert metrics["miou"] == pytest.approx(best, abs=1e-9)
    assert (subset_dir / "metrics_best.json").is_file() and not (subset_dir / "metrics.json").exists()

    # validation changes nothing in training: the final weights equal those of a run without it
    plain = tmp_path / "plain"
    train(load(TrainConfig, train_dict(pair_dir, "source_only", max_iters=7, checkpoint_interval=1,
                                       log_interval=7)), plain)
    assert max_weight_diff(load_checkpoint(out / "checkpoint.pt")["model"],
                           load_checkpoint(plain / "checkpoint.pt")["model"]) == 0.0
    assert not (plain / "checkpoints" / "best.pt").exists()


@pytest.mark.usefixtures("one_thread")
def test_a_kill_between_two_validations_resumes_with_the_same_best(tmp_path, pair_dir):  # noqa: F811
    # validations at 2, 4, 6; the first resumable checkpoint at 3, between the first two
    cfg = _with_validation(pair_dir, max_iters=6, checkpoint_interval=3, log_interval=1, eval_interval=2)
    config = write_config(tmp_path / "train.yaml", cfg)
    killed, full = tmp_path / "killed", tmp_path / "full"
    last = kill_at_first_checkpoint(config, killed)
    assert last.exists() and not (killed / "checkpoint.pt").exists()
    stopped = load_checkpoint(last)
    assert stopped["iteration"] == 3
    assert stopped["extra"]["validation"]["best_iteration"] == 2      # the best so far travels with last.pt

    summary = train(load(TrainConfig, cfg), killed)                  # the rerun resumes
    assert summary["resumed_from"] == 3
    train(load(TrainConfig, cfg), full)                              # the uninterrupted run

    def strip(records):
        return [{k: v for k, v in r.items() if k != "val_time_s"} for r in records]

    assert strip(_val_records(killed)) == strip(_val_records(full))
    assert [r["iteration"] for r in _val_records(killed)] == [2, 4, 6]
    a, b = load_checkpoint(killed / "checkpoints" / "best.pt"), load_checkpoint(full / "checkpoints" / "best.pt")
    assert a["iteration"] == b["iteration"] and a["extra"]["validation"] == b["extra"]["validation"]
    assert max_weight_diff(a["model"], b["model"]) <= 1e-6
    assert (load_checkpoint(killed / "checkpoints" / "last.pt")["extra"]["validation"]
            == load_checkpoint(full / "checkpoints" / "last.pt")["extra"]["validation"])


@pytest.mark.usefixtures("one_thread")
def test_a_fresh_run_removes_an_earlier_best(tmp_path, pair_dir):  # noqa: F811
    out = tmp_path / "run"
    train(load(TrainConfig, _with_validation(pair_dir, max_iters=2, eval_interval=1)), out)
    assert (out / "checkpoints" / "best.pt").is_file()
    train(load(TrainConfig, train_dict(pair_dir, "source_only", max_iters=3)), out)   # other settings: over
    assert not (out / "checkpoints" / "best.pt").exists()
    assert torch.is_tensor(load_checkpoint(out / "checkpoint.pt")["model"]["conv1.weight"])


@pytest.mark.usefixtures("one_thread")
def test_stage1_validates_its_ema_teacher_too(tmp_path, pair_dir):  # noqa: F811
    from tests.test_selflabel import stage1_dict

    # EMA momentum 1 and frozen BatchNorm: the teacher stays the initial (warm-up) network, so its score is that
    # of `cpsl evaluate` on the initial checkpoint
    target = train_dict(pair_dir)["data"]["target"]
    cfg = load(TrainConfig, stage1_dict(pair_dir, max_iters=2, eval_interval=1, eval_data=target, freeze_bn=True,
                                        **{"selflabel.ema_momentum": 1.0}))
    out = tmp_path / "run"
    train(cfg, out)
    records = _val_records(out)
    init = evaluate.run(EvaluateConfig(checkpoint=cfg.init_checkpoint, data=cfg.eval_data, device="cpu", workers=0,
                                       samples=0), tmp_path / "eval")
    assert [r["iteration"] for r in records] == [1, 2]
    assert all(r["val/teacher"] == pytest.approx(init["miou"], abs=1e-9) for r in records)
    assert all(0.0 <= r["val/student"] <= 100.0 for r in records)


@pytest.mark.usefixtures("one_thread")
def test_two_processes_shard_the_validation(tmp_path, pair_dir):  # noqa: F811
    """Under torchrun each rank evaluates every second image of the subset and the counts are summed: the same
    images and pixels as one process, and the same scores up to the DDP weights' rounding (about 40 s)."""
    from tests.train_helpers import TORCHRUN_2, finish, start_train, well_conditioned_init

    init = well_conditioned_init(tmp_path / "init.pt")
    cfg = _with_validation(pair_dir, max_iters=4, freeze_bn=True, init_checkpoint=str(init), checkpoint_interval=2,
                           eval_interval=2, eval_images=5, **{"model.dropout": 0.0, "data.batch_size": 4})
    ddp = start_train(write_config(tmp_path / "train.yaml", cfg), tmp_path / "ddp", *TORCHRUN_2)
    train(load(TrainConfig, cfg), tmp_path / "single")
    finish(ddp)
    a, b = _val_records(tmp_path / "ddp"), _val_records(tmp_path / "single")
    assert [(r["iteration"], r["val_images"]) for r in a] == [(2, 5), (4, 5)]    # rank 0 alone wrote them
    assert [r["val_pixels"] for r in a] == [r["val_pixels"] for r in b] and a[0]["val_pixels"] > 0
    for x, y in zip(a, b):
        assert x["val/student"] == pytest.approx(y["val/student"], abs=0.5)
    assert load_checkpoint(tmp_path / "ddp" / "checkpoints" / "best.pt")["iteration"] == a[-1]["val_best_iteration"]
