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


# ---------------------------------------------------------------------------------------------------------
# One gradient all-reduce per iteration (no_sync for the backward passes before the last)


def _step_worker(rank: int, cfg_dict: dict, out: str, port: int, no_sync: bool) -> None:
    """Rank ``rank`` of 2 (gloo): 2 stage-1 iterations; saves the weights and the number of DDP gradient
    all-reduces (one per bucket per synchronised backward, counted by a comm hook)."""
    import contextlib
    import os

    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    from cpsl.methods import Amp, TrainContext, build_method
    from cpsl.train import dist as D
    from cpsl.train.data import build_datasets, build_loaders
    from cpsl.train.dist import DistInfo
    from cpsl.train.loop import to_device

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        cfg = load(TrainConfig, cfg_dict)
        cpu = torch.device("cpu")
        D.seed_everything(cfg.seed)
        method = build_method(cfg, TrainContext(cpu, DistInfo(rank, 2, rank, cpu), Amp("off", cpu)))
        if not no_sync:  # the old behaviour: every backward pass all-reduces
            method.net.no_sync = contextlib.nullcontext
        calls = [0]

        def counting_hook(state, bucket):
            calls[0] += 1
            return default_hooks.allreduce_hook(state, bucket)

        method.net.register_comm_hook(None, counting_hook)
        others = {"n": 0}  # collectives called from Python (the methods' gathers and counts, DDP's own)
        for name in ("all_reduce", "all_gather", "all_gather_object", "broadcast_object_list"):
            def counted(*args, _f=getattr(dist, name), **kwargs):
                others["n"] += 1
                return _f(*args, **kwargs)
            setattr(dist, name, counted)
        loaders = build_loaders(cfg, build_datasets(cfg, method.domains, cfg.model.n_class), rank=rank,
                                world_size=2, start_iter=0)
        iters = {d: iter(loader) for d, loader in loaders.items()}
        first = {}
        for i in range(2):
            method.train_mode()
            method.step({d: to_device(next(it), cpu) for d, it in iters.items()})
            for sched in method.schedulers.values():
                sched.step()
            if i == 0:
                first = {"model": {k: v.clone() for k, v in method.student.state_dict().items()},
                         "prototypes": method.prototypes.detach().clone()}
        torch.save({"model": method.student.state_dict(), "prototypes": method.prototypes.detach().clone(),
                    "first": first, "allreduces": calls[0], "other_collectives": others["n"]},
                   f"{out}/rank{rank}_{'no_sync' if no_sync else 'sync'}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.usefixtures("one_thread")
def test_one_gradient_allreduce_per_iteration_same_weights(tmp_path, pair_dir):  # noqa: F811
    """Stage 1's three backward passes: the first two under DDP's no_sync, so the gradients are all-reduced once
    per iteration instead of three times, and the weights are those of all-reducing every backward (1e-6)."""
    import torch.multiprocessing as mp

    cfg = stage1_dict(pair_dir, freeze_bn=True, **{"model.dropout": 0.0, "data.batch_size": 4, "data.workers": 0})
    for no_sync in (True, False):
        mp.spawn(_step_worker, args=(cfg, str(tmp_path), _free_port(), no_sync), nprocs=2, join=True)
    runs = {name: [torch.load(tmp_path / f"rank{r}_{name}.pt") for r in (0, 1)] for name in ("no_sync", "sync")}
    new, old = runs["no_sync"], runs["sync"]
    assert max_weight_diff(new[0]["model"], new[1]["model"]) == 0.0          # the ranks stay identical
    # after one iteration (the second's pseudo labels are argmaxes of the first's weights: a rounding-level
    # difference can flip a pixel's label there, which is not what this compares)
    assert max_weight_diff(new[0]["first"]["model"], old[0]["first"]["model"]) < 1e-6
    assert (new[0]["first"]["prototypes"] - old[0]["first"]["prototypes"]).abs().max() < 1e-6
    buckets = new[0]["allreduces"] // 2
    assert buckets >= 1 and new[0]["allreduces"] == 2 * buckets              # once per iteration
    assert old[0]["allreduces"] == 3 * new[0]["allreduces"]                  # before: once per backward pass
    # the other collectives (the methods' gathers and counts, the prototypes' gradient, DDP's own per synchronised
    # forward): 9 per iteration instead of 11
    assert (new[0]["other_collectives"], old[0]["other_collectives"]) == (18, 22)
