"""Gradient accumulation (``accumulate: k``): k micro-batches of b samples per optimizer step train as one batch
of b*k samples (BatchNorm frozen, no dropout), iteration counts are optimizer steps, and runs resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cpsl.config import TrainConfig, load
from cpsl.methods.selflabel import load_prototypes
from cpsl.models.checkpoint import load_checkpoint
from cpsl.train.loop import train
from tests.test_distill import stage1 as distill_teacher  # noqa: F401 - fixture
from tests.test_selflabel import stage1_dict
from tests.train_helpers import (N_CLASS, TINY_MODEL, max_weight_diff, one_thread, pair_dir,  # noqa: F401
                                 train_dict, well_conditioned_init)

pytestmark = pytest.mark.usefixtures("one_thread")

# BatchNorm frozen and no dropout: then nothing but float rounding depends on how the batch is split
EXACT = {"freeze_bn": True, "model.dropout": 0.0, "log_interval": 1, "checkpoint_interval": 100}


def _run(cfg: dict, out: Path) -> tuple[dict, list[dict], dict]:
    """Train ``cfg`` into ``out``; (final checkpoint, metrics.jsonl lines, train_summary.json)."""
    train(load(TrainConfig, cfg), out)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return load_checkpoint(out / "checkpoint.pt"), lines, json.loads((out / "train_summary.json").read_text())


def _same_run(one: dict, acc: dict, tmp_path: Path, nets: tuple[str, ...] = ("model",)) -> None:
    """``one`` (batch 2) and ``acc`` (batch 1, accumulate 2) give the same networks and losses within 1e-5."""
    s1, m1, sum1 = _run(one, tmp_path / "one")
    s2, m2, sum2 = _run(acc, tmp_path / "acc")
    for net in nets:
        assert max_weight_diff(s1[net], s2[net]) < 1e-5, net
    assert [m["iteration"] for m in m1] == [m["iteration"] for m in m2] == list(range(1, one["max_iters"] + 1))
    for a, b in zip(m1, m2):
        for key in (k for k in a if k.startswith("loss/")):
            assert b[key] == pytest.approx(a[key], abs=1e-5), (a["iteration"], key)
    assert (sum1["global_batch"], sum2["global_batch"], sum2["accumulate"]) == (2, 2, 2)


def _pair(cfg: dict) -> tuple[dict, dict]:
    """The un-accumulated config (batch 2) and the accumulated one (batch 1, accumulate 2)."""
    one = json.loads(json.dumps(cfg))
    acc = json.loads(json.dumps(cfg))
    acc["data"]["batch_size"], acc["accumulate"] = 1, 2
    return one, acc


@pytest.mark.parametrize("stage", ["source_only", "warmup"])
def test_accumulated_equals_one_batch(pair_dir, tmp_path, stage):  # noqa: F811
    init = well_conditioned_init(tmp_path / "init.pt")
    cfg = train_dict(pair_dir, stage, max_iters=3, init_checkpoint=str(init), **EXACT)
    one, acc = _pair(cfg)
    # the weights move: the comparison is not of two untrained networks
    assert max_weight_diff(load_checkpoint(init)["model"], _run(one, tmp_path / "ref")[0]["model"]) > 1e-3
    _same_run(one, acc, tmp_path, ("model", "discriminator") if stage == "warmup" else ("model",))


@pytest.mark.parametrize("kd_mode", ["kl", "reference"])
def test_accumulated_distillation_equals_one_batch(pair_dir, distill_teacher, tmp_path, monkeypatch,  # noqa: F811
                                                  kd_mode):
    """Stage 2: the pseudo-label CE and the KD term divide by the valid pixels of the whole step (the hard labels
    thresholded at 0.5 leave different numbers of valid pixels in the two micro-batches: the mean of the two
    micro-batch means is another loss, checked as a control)."""
    from cpsl.methods.base import Method

    ckpt, hard = distill_teacher
    # a well-conditioned student (from random weights the tiny network amplifies rounding ~1e4 times)
    init = well_conditioned_init(tmp_path / "init.pt", seed=1)
    cfg = train_dict(pair_dir, "stage2", max_iters=3, init_checkpoint=str(init),
                     **{"distill.teacher": str(ckpt), "distill.hard_labels": str(hard), "distill.kd_mode": kd_mode,
                        "distill.threshold": 0.5, **EXACT})
    one, acc = _pair(cfg)
    _same_run(one, acc, tmp_path)
    if kd_mode == "kl":
        monkeypatch.setattr(Method, "begin_step", lambda self, batches: {})   # each micro-batch its own mean
        s2, m2, _ = _run(acc, tmp_path / "means")
        s1 = load_checkpoint(tmp_path / "one" / "checkpoint.pt")
        assert max_weight_diff(s1["model"], s2["model"]) > 1e-4


def test_stage1_accumulation_per_step_and_per_micro_batch(pair_dir, tmp_path):  # noqa: F811
    """Stage 1, one step: the queue pushes, the Sinkhorn and L_SL (the prototypes' only gradient) equal one
    batch's, so the prototypes and the queues do; the EMA network is updated once per step."""
    cfg = stage1_dict(pair_dir, max_iters=1, **{**EXACT, "selflabel.ema_momentum": 0.5})
    one, acc = _pair(cfg)
    s1, _, _ = _run(one, tmp_path / "one")
    s2, m2, _ = _run(acc, tmp_path / "acc")
    assert (s2["prototypes"] - s1["prototypes"]).abs().max() < 1e-5
    start, _ = load_prototypes(cfg["selflabel"]["prototypes"], N_CLASS, TINY_MODEL["head_channels"])
    assert (s1["prototypes"] - start).abs().max() > 1e-4   # L_SL moved them
    q1, q2 = s1["queues"], s2["queues"]
    assert q1["filled"] == q2["filled"] == 2 * cfg["selflabel"]["pixels_per_image"]
    assert torch.equal(q1["labels"], q2["labels"])
    # the teacher's batch of 2 and its 2 batches of 1 round differently (1e-7 relative); the rows are then
    # L2-normalised, which for the tiny network's short logit vectors amplifies that to about 1e-5
    assert (q1["feats"] - q2["feats"]).abs().max() < 1e-5
    assert (q1["logits"] - q2["logits"]).abs().max() < 1e-4
    # one EMA update: ema = 0.5 init + 0.5 student (buffers copied from the student)
    init = load_checkpoint(cfg["init_checkpoint"])["model"]
    ema, student = s2["ema_model"], s2["model"]
    params = [k for k in student if student[k].is_floating_point() and "running" not in k]
    assert max((ema[k] - (0.5 * init[k] + 0.5 * student[k])).abs().max().item() for k in params) < 1e-6
    assert max((student[k] - init[k]).abs().max().item() for k in params) > 1e-3
    assert m2[0]["iteration"] == 1 and s2["iteration"] == 1


def test_accumulated_run_resumes(pair_dir, tmp_path, monkeypatch):  # noqa: F811
    """Killed after its checkpoint at step 2 (in step 3's second micro-batch) and rerun, an accumulated run
    ends with the weights of an uninterrupted one; the data continue at micro-batch 2 * 2."""
    from cpsl.methods import source_only

    cfg = train_dict(pair_dir, "source_only", max_iters=4, **{**EXACT, "checkpoint_interval": 2})
    cfg["data"]["batch_size"], cfg["accumulate"] = 1, 2
    whole, _, _ = _run(cfg, tmp_path / "whole")

    real, calls = source_only.SourceOnly.forward_backward, {"n": 0}

    def dies_in_step_3(self, batch, micro):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return real(self, batch, micro)

    monkeypatch.setattr(source_only.SourceOnly, "forward_backward", dies_in_step_3)
    with pytest.raises(KeyboardInterrupt):
        train(load(TrainConfig, cfg), tmp_path / "resumed")
    assert load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")["iteration"] == 2
    monkeypatch.setattr(source_only.SourceOnly, "forward_backward", real)
    resumed, lines, summary = _run(cfg, tmp_path / "resumed")
    assert summary["resumed_from"] == 2 and [m["iteration"] for m in lines] == [1, 2, 3, 4]
    assert max_weight_diff(whole["model"], resumed["model"]) == 0.0


def test_accumulate_and_channels_last_settings(pair_dir, tmp_path):  # noqa: F811
    cfg = train_dict(pair_dir, "source_only", accumulate=0)
    with pytest.raises(Exception, match=r"^accumulate: must be >= 1"):
        load(TrainConfig, cfg)
    cfg = train_dict(pair_dir, "source_only", channels_last="yes")
    with pytest.raises(Exception, match=r"^channels_last: invalid value 'yes' \('yes' is not one of 'auto'; "
                                        r"expected true or false"):
        load(TrainConfig, cfg)
    from cpsl.methods import TrainContext, build_method
    from cpsl.methods.base import Amp
    from cpsl.train.dist import DistInfo

    cpu = torch.device("cpu")
    ctx = TrainContext(cpu, DistInfo(0, 1, 0, cpu), Amp("off", cpu))
    for setting, expected in (("auto", False), (True, True), (False, False)):
        method = build_method(load(TrainConfig, train_dict(pair_dir, "warmup", channels_last=setting)), ctx)
        for net in (method.student, method.disc):
            weights = [p for p in net.parameters() if p.dim() == 4 and p.shape[1] > 1 and p.shape[-1] > 1]
            assert weights
            assert all(p.is_contiguous(memory_format=torch.channels_last) == expected for p in weights), setting


def test_two_processes_accumulating_match_one_batch(tmp_path, pair_dir):  # noqa: F811
    """2 processes x 2 micro-batches of 1 sample each (gloo, CPU) = 1 process with a batch of 4: the pixel means
    divide by the step's valid pixels of both ranks, the data split follows the sample positions. Warm-up: two
    DDP-wrapped networks. (Whether the first micro-batch syncs does not change the numbers, an average being
    linear; ``test_no_sync_on_all_but_the_last_micro_batch`` checks that it does not.)"""
    from tests.train_helpers import TORCHRUN_2, finish, start_train, write_config

    init = well_conditioned_init(tmp_path / "init.pt")
    cfg = train_dict(pair_dir, "warmup", max_iters=3, init_checkpoint=str(init),
                     **{**EXACT, "data.batch_size": 4, "data.workers": 0})
    acc = json.loads(json.dumps(cfg))
    acc["data"]["batch_size"], acc["accumulate"] = 2, 2
    ddp = start_train(write_config(tmp_path / "acc.yaml", acc), tmp_path / "ddp", *TORCHRUN_2)
    single, _, _ = _run(cfg, tmp_path / "single")
    finish(ddp)
    a = load_checkpoint(tmp_path / "ddp" / "checkpoint.pt")
    for net in ("model", "discriminator"):
        assert max_weight_diff(a[net], single[net]) < 1e-5, net
    summary = json.loads((tmp_path / "ddp" / "train_summary.json").read_text())
    assert (summary["world_size"], summary["global_batch"], summary["accumulate"]) == (2, 4, 2)


def test_no_sync_on_all_but_the_last_micro_batch(pair_dir, tmp_path, monkeypatch):  # noqa: F811
    """Under DDP every wrapped network of the method (warm-up: the student and the discriminator) skips the
    gradient all-reduce in the backward passes of all but the step's last micro-batch."""
    import torch.distributed as dist
    from torch import nn

    from cpsl.methods import TrainContext, build_method, warmup
    from cpsl.methods.base import Amp
    from cpsl.train.dist import DistInfo

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        cpu = torch.device("cpu")
        cfg = load(TrainConfig, train_dict(pair_dir, "warmup", accumulate=3, **{"data.batch_size": 1}))
        method = build_method(cfg, TrainContext(cpu, DistInfo(0, 1, 0, cpu), Amp("off", cpu)))
        method.net, method.disc_net = nn.parallel.DistributedDataParallel(method.student), \
            nn.parallel.DistributedDataParallel(method.disc)
        seen = []
        real = warmup.Warmup.forward_backward

        def record(self, batch, micro):
            seen.append((micro.index, self.net.require_backward_grad_sync, self.disc_net.require_backward_grad_sync))
            return real(self, batch, micro)

        monkeypatch.setattr(warmup.Warmup, "forward_backward", record)
        from cpsl.train.data import build_datasets, build_loaders

        loaders = build_loaders(cfg, build_datasets(cfg, method.domains, N_CLASS), rank=0, world_size=1,
                                start_iter=0)
        its = {d: iter(loader) for d, loader in loaders.items()}
        method.train_mode()
        method.step([{d: next(it) for d, it in its.items()} for _ in range(3)])
        assert seen == [(0, False, False), (1, False, False), (2, True, True)]
        assert method.net.require_backward_grad_sync and method.disc_net.require_backward_grad_sync
    finally:
        dist.destroy_process_group()
