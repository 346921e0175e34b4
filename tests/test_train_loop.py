"""The training loop: learning rates per group, outputs, NaN handling, determinism, the data stream, config."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cpsl import cli
from cpsl import config as C
from cpsl.data.transforms import weak_params_from_batch
from cpsl.errors import CheckpointError, ConfigError
from cpsl.methods import Amp, TrainContext, build_method, source_only
from cpsl.models.checkpoint import load_checkpoint, save_checkpoint
from cpsl.train import loop
from cpsl.train.data import InfiniteSampler, build_datasets, build_loaders, collate, make_loader, workers_per_rank
from cpsl.train.dist import DistInfo
from cpsl.train.loop import TrainingError, train
from tests.train_helpers import (max_weight_diff, one_thread, pair_dir, train_config, train_dict,  # noqa: F401
                                 write_config)

pytestmark = pytest.mark.usefixtures("one_thread")


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_lr_per_group_and_outputs(tmp_path, pair_dir):  # noqa: F811
    cfg = train_config(pair_dir, "warmup", max_iters=5, log_interval=1, checkpoint_interval=2,
                       **{"optim.lr": 0.01, "optim.backbone_lr_mult": 3.0, "optim.head_lr_mult": 10.0,
                          "warmup.disc_lr": 1e-3})
    summary = train(cfg, tmp_path)
    rows = _metrics(tmp_path)
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4, 5]
    for r in rows:  # iteration k runs with t = k - 1 scheduler steps: base * (1 - t/max_iters) ** 0.9
        f = (1 - (r["iteration"] - 1) / 5) ** 0.9
        assert r["lr/backbone"] == pytest.approx(0.03 * f, rel=1e-9)
        assert r["lr/head"] == pytest.approx(0.1 * f, rel=1e-9)
        assert r["lr/disc"] == pytest.approx(1e-3 * f, rel=1e-9)
        assert {"loss/ce_source", "loss/adv", "loss/disc", "time_iter", "time_data"} <= set(r)
        assert all(np.isfinite(v) for k, v in r.items() if k.startswith("loss/"))
    final = load_checkpoint(tmp_path / "checkpoint.pt")
    assert final["iteration"] == 5 and final["config"]["stage"] == "warmup" and final["seed"] == cfg.seed
    assert "discriminator" in final and "optimizer" not in final
    # last.pt is the final checkpoint itself, one file on disk (a rerun after losing checkpoint.pt publishes it
    # again, no retraining)
    last = tmp_path / "checkpoints" / "last.pt"
    assert last.samefile(tmp_path / "checkpoint.pt") and last.stat().st_nlink == 2
    assert final["extra"]["inputs"] == loop.input_fingerprints(cfg) and "grad_scaler" not in final["extra"]
    assert not list(last.parent.glob(".*.tmp"))
    assert json.loads((tmp_path / "train_summary.json").read_text())["iterations"] == summary["iterations"] == 5


def test_poly_schedule_is_clamped_past_max_iters(pair_dir):  # noqa: F811
    cfg = train_config(pair_dir, "source_only", max_iters=4)
    cpu = torch.device("cpu")
    method = build_method(cfg, TrainContext(cpu, DistInfo(0, 1, 0, cpu), Amp("fp16", cpu)))
    sched = method.schedulers["student"]
    for _ in range(7):  # past max_iters: the reference computes a complex number here and crashes
        method.optimizer.step()
        sched.step()
    assert method.lrs() == {"backbone": 0.0, "head": 0.0}


@pytest.mark.parametrize("log_interval, where", [(1, "iteration 5"), (4, "iterations 5-6")])
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, pair_dir, monkeypatch, log_interval,  # noqa: F811
                                                          where):
    """The losses are read at log and checkpoint iterations (here every 2): a NaN at iteration 5 stops the run
    at 6 at the latest, before checkpoint 6 is written, naming the iterations since the last log line."""
    real_step = source_only.SourceOnly.step
    calls = {"n": 0}

    def poisoned(self, batch):
        calls["n"] += 1
        if calls["n"] == 5:  # a genuine NaN: the loss and, after the SGD step, the weights
            batch["source"]["image"] = batch["source"]["image"] * float("nan")
        return real_step(self, batch)

    monkeypatch.setattr(source_only.SourceOnly, "step", poisoned)
    cfg = train_config(pair_dir, "source_only", max_iters=8, checkpoint_interval=2, log_interval=log_interval)
    with pytest.raises(TrainingError) as err:
        train(cfg, tmp_path)
    msg = str(err.value)
    assert msg.startswith(f"{where}: loss 'ce_source' is nan; training stopped")
    assert "last.pt (iteration 4)" in msg
    kept = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert kept["iteration"] == 4
    assert all(torch.isfinite(v).all() for v in kept["model"].values() if v.is_floating_point())
    assert not (tmp_path / "checkpoint.pt").exists()


def test_same_seed_same_weights_other_seed_differs(tmp_path, pair_dir):  # noqa: F811
    runs = {}
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        train(train_config(pair_dir, "source_only", max_iters=3, seed=seed, checkpoint_interval=100), tmp_path / name)
        runs[name] = load_checkpoint(tmp_path / name / "checkpoint.pt")["model"]
    assert max_weight_diff(runs["a"], runs["b"]) == 0.0
    assert max_weight_diff(runs["a"], runs["c"]) > 0.0


def test_sampler_is_a_pure_function_of_seed_iteration_and_slot():
    full = InfiniteSampler(7, 4, seed=1)
    stream = iter(full)
    items = [next(stream) for _ in range(4 * 5)]  # 5 iterations, crossing epoch boundaries
    assert sorted(i for i, _ in items[:7]) == list(range(7))  # each epoch is a permutation
    assert len({s for _, s in items}) == len(items)  # a seed per position
    resumed = iter(InfiniteSampler(7, 4, seed=1, start_iter=3))
    assert [next(resumed) for _ in range(8)] == items[12:20]
    ranks = [iter(InfiniteSampler(7, 4, seed=1, rank=r, world_size=2)) for r in range(2)]
    for it in range(5):  # rank r holds slots [2r, 2r+2) of every global batch
        assert [next(ranks[0]) for _ in range(2)] + [next(ranks[1]) for _ in range(2)] == items[4 * it:4 * it + 4]
    other = iter(InfiniteSampler(7, 4, seed=2))
    assert [next(other) for _ in range(7)] != items[:7]
    with pytest.raises(ConfigError, match="batch_size: 3 is not divisible by the 2 processes"):
        InfiniteSampler(7, 3, seed=0, world_size=2)


def test_batches_do_not_depend_on_the_worker_count(pair_dir):  # noqa: F811
    cfg = train_config(pair_dir, "source_only", **{"data.lab_transfer": True})
    datasets = build_datasets(cfg, {"source": {"label": True, "views": ("weak", "strong")}}, 4)
    batches = {}
    for workers in (0, 2):
        cfg.data.workers = workers
        it = iter(build_loaders(cfg, datasets, rank=0, world_size=1, start_iter=1)["source"])
        batches[workers] = [next(it) for _ in range(3)]
        del it
    for a, b in zip(batches[0], batches[2]):
        assert a["name"] == b["name"]
        for key in ("image", "label", "image_strong"):
            assert torch.equal(a[key], b[key])
    b = batches[0][0]
    assert b["image"].shape == (2, 3, 32, 64) and b["image"].dtype == torch.float32
    assert 0.0 <= b["image"].min() and b["image"].max() <= 1.0
    assert b["label"].shape == (2, 32, 64) and b["label"].dtype == torch.int64
    assert b["weak_params"]["crop"].shape == (2, 4) and b["strong_params"]["matrices"].shape[0] == 2
    # the augmentation records stay numpy arrays (collate): read on the host, passed inside the batch's pickle
    # instead of one shared-memory block each; the same values as torch's default collate, per field
    for a, c in zip(batches[0], batches[2]):
        for key in ("weak_params", "strong_params"):
            assert all(isinstance(v, np.ndarray) for v in (*a[key].values(), *c[key].values()))
            assert a[key].keys() == c[key].keys() and all(np.array_equal(a[key][k], c[key][k]) for k in a[key])
    items = [datasets["source"][(i, 7 + i)] for i in range(2)]
    default = torch.utils.data.default_collate(items)
    for key in ("weak_params", "strong_params"):
        assert all(np.array_equal(collate(items)[key][k], default[key][k].numpy()) for k in default[key])
    assert weak_params_from_batch(collate(items)["weak_params"]) == weak_params_from_batch(default["weak_params"])
    assert collate([3, 4]).tolist() == [3, 4]   # items other than sample dicts: torch's default collate


class _OpenCVThreads(torch.utils.data.Dataset):
    """Reports the OpenCV thread count of the process that loads the item."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, item):
        import cv2

        return cv2.getNumThreads()


def test_workers_are_per_job_and_run_one_opencv_thread(pair_dir):  # noqa: F811
    assert [workers_per_rank(w, n) for w, n in ((0, 4), (6, 1), (6, 4), (2, 4), (8, 4))] == [0, 6, 1, 1, 2]
    cfg = train_config(pair_dir, "warmup", **{"data.workers": 4, "data.batch_size": 2})
    datasets = build_datasets(cfg, {"source": {"label": True}, "target": {"label": False}}, 4)
    loaders = build_loaders(cfg, datasets, rank=1, world_size=2, start_iter=0)
    assert {d: ld.num_workers for d, ld in loaders.items()} == {"source": 2, "target": 2}   # 4 per loader per job
    import cv2

    threads = cv2.getNumThreads()
    cv2.setNumThreads(2)
    cv2.resize(np.zeros((512, 512, 3), np.uint8), (1024, 1024))   # this process's OpenCV pool has threads
    try:
        loader = make_loader(_OpenCVThreads(), InfiniteSampler(4, 2, seed=0), workers=1, seed=0)
        assert next(iter(loader)).tolist() == [1, 1]          # and the (forked) worker runs one, without a hang
    finally:
        cv2.setNumThreads(threads)


def test_train_config_validation(pair_dir):  # noqa: F811
    base = train_dict(pair_dir, "oracle")
    for over, message in (
        ({"data": {"source": "/s"}}, "data.target: required for stage 'oracle' (a prepared target train split)"),
        ({"max_iters": 0}, "max_iters: must be >= 1 (got 0)"),
        ({"amp": "fp8"}, "amp: 'fp8' is not one of 'off', 'bf16', 'fp16'"),
        ({"data": {**base["data"], "crop": [32]}}, "data.crop: must be [height, width], each >= 8 (got [32])"),
        ({"optim": {"lr": 0}}, "optim.lr: must be > 0 (got 0.0)"),
        ({"warmup": {"gan": "wgan"}}, "warmup.gan: 'wgan' is not one of 'LS', 'vanilla'"),
        ({"data": {**base["data"], "batch_size": 0}}, "data.batch_size: must be >= 1 (got 0)"),
    ):
        with pytest.raises(ConfigError) as err:
            C.load(C.TrainConfig, {**base, **over})
        assert str(err.value) == message


def test_cli_stage_check_and_resume_config_check(tmp_path, pair_dir, capsys):  # noqa: F811
    cfg = train_dict(pair_dir, "source_only", max_iters=2, checkpoint_interval=1)
    config = write_config(tmp_path / "train.yaml", cfg)
    assert cli.main(["train", "--config", str(config), "--out", str(tmp_path / "o"), "--stage", "warmup"]) == 2
    assert "the config says 'source_only' but --stage is 'warmup'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    # A resumable checkpoint written with other settings is refused, naming the key.
    out = tmp_path / "o2"
    cfg1 = train_config(pair_dir, "source_only", max_iters=3, checkpoint_interval=1)
    cpu = torch.device("cpu")
    amp = Amp("off", cpu)
    method = build_method(cfg1, TrainContext(cpu, DistInfo(0, 1, 0, cpu), amp))
    save_checkpoint(out / loop.LAST, loop._resumable_state(method, cfg1, 1, amp, [loop.capture_rng_state()],
                                                         loop.input_fingerprints(cfg1)))
    cfg2 = train_config(pair_dir, "source_only", max_iters=3, checkpoint_interval=1, **{"optim.lr": 0.5})
    with pytest.raises(CheckpointError, match=r"optim.lr: 0.01 there, 0.5 now"):
        train(cfg2, out)


def test_finished_run_rebuilds_a_lost_final_checkpoint_and_restarts_on_new_settings(tmp_path, pair_dir):  # noqa: F811
    out = tmp_path / "o"
    cfg = train_config(pair_dir, "source_only", max_iters=3, checkpoint_interval=2)
    train(cfg, out)
    first = load_checkpoint(out / "checkpoint.pt")["model"]
    # a job killed right after the final save loses checkpoint.pt (Snakemake deletes a failed job's outputs):
    # the rerun rebuilds it from last.pt at max_iters without training again
    (out / "checkpoint.pt").unlink()
    summary = train(cfg, out)
    assert summary["resumed_from"] == 3 and summary["time_per_iter"] is None
    rebuilt = load_checkpoint(out / "checkpoint.pt")["model"]
    assert all(torch.equal(first[k], rebuilt[k]) for k in first)
    assert (out / "checkpoints" / "last.pt").samefile(out / "checkpoint.pt")
    # the workflow reruns a finished stage whose settings changed: it starts over instead of refusing
    cfg2 = train_config(pair_dir, "source_only", max_iters=3, checkpoint_interval=2, **{"optim.lr": 0.05})
    summary = train(cfg2, out)
    assert summary["resumed_from"] == 0
    assert load_checkpoint(out / "checkpoint.pt")["config"]["optim"]["lr"] == 0.05


def test_without_hard_links_last_pt_stays_the_resumable_state(tmp_path, pair_dir, monkeypatch):  # noqa: F811
    """A file system without hard links (EPERM from link()): checkpoint.pt is written, last.pt stays the full
    resumable state at max_iters, and a lost checkpoint.pt is rebuilt from it as before."""
    import errno
    import os

    def no_links(src, dst, *args, **kwargs):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    out = tmp_path / "o"
    cfg = train_config(pair_dir, "source_only", max_iters=3, checkpoint_interval=2)
    train(cfg, out)
    last = load_checkpoint(out / "checkpoints" / "last.pt")
    assert last["iteration"] == 3 and "optimizer" in last and "optimizer" not in load_checkpoint(out / "checkpoint.pt")
    assert not (out / "checkpoints" / "last.pt").samefile(out / "checkpoint.pt")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["last.pt"]
    first = load_checkpoint(out / "checkpoint.pt")["model"]
    (out / "checkpoint.pt").unlink()
    assert train(cfg, out)["resumed_from"] == 3
    rebuilt = load_checkpoint(out / "checkpoint.pt")["model"]
    assert all(torch.equal(first[k], rebuilt[k]) for k in first)


def test_the_loop_reads_the_losses_once_per_log_line():
    """On (fake) CUDA the loss bookkeeping of an iteration makes no host sync; reading the window makes one."""
    from cpsl.train.loop import _Window
    from tests.fake_cuda import FakeCuda

    with FakeCuda() as fc:
        losses = [torch.tensor([1.0, 0.5, 4.0], device="cuda")[i] for i in range(3)]
        window = _Window()
        fc.reset()
        for done, loss in enumerate(losses, start=11):
            window.add(done, {"cutmix": float(done % 2), "ce": loss.float()}, 0.25, 0.0)
        assert fc.counts()["syncs"] == 0
        means, last = window.values()
        assert dict(fc.syncs) == {"tolist": 1}
    assert means == {"cutmix": 2 / 3, "ce": 5.5 / 3} and last == {"cutmix": 1.0, "ce": 4.0}
    assert list(means) == ["cutmix", "ce"] and window.span(13) == "iterations 11-13"
