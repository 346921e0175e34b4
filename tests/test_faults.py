"""Faults: steps killed (SIGKILL, SIGTERM) at random points and rerun; a full disk during a checkpoint write.

Each ``test_kill_*`` id is one trial: ``python -m cpsl <step>`` runs in a subprocess on a tiny model and tiny
data and is killed when its trigger fires; then the same command is rerun (in this process, one thread, like
the subprocess). The trial checks that

* right after the kill, no output is partial: every checkpoint present loads, a published folder is either
  the previous complete one or the new complete one, every JSON parses;
* the rerun completes, every output file decodes (checkpoint, PNG, npz, npy, JSON, YAML) and equals the
  output of an uninterrupted run (training: the final weights within 1e-6, in practice bit-identical; the
  metrics log line for line), and no temp file or staging folder is left in or next to the outputs.

Triggers: ``iteration k`` (metrics.jsonl has k lines), ``file F`` (F appeared in the output folder),
``writing F`` / ``rewriting F`` (the temp file of an atomic write of F exists, F does not / does already),
``start t`` (t s after launch: importing, building or training), ``progress u`` (u x 50 % of the step's
measured duration after its progress bar appeared), ``staged k`` (the hidden staging folder holds k files;
pseudo-hard writes 3 per image). The kill points are drawn once from a seeded generator, so the trial ids are
stable.

The SLURM case (a job killed at its time limit is resubmitted and resumes) is tests/test_slurm.py.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
import yaml

from cpsl import outputs as cpsl_outputs
from cpsl.data import pseudo
from cpsl.data.common import read_png_unchanged
from cpsl.models import checkpoint as ckpt_module
from cpsl.models.checkpoint import load_checkpoint, make_checkpoint, save_checkpoint
from tests.inference_fixtures import TINY, random_split, tiny_checkpoint
from tests.reliability_helpers import Victim, error_line, leftovers, outputs, run_cli, snapshot, write_yaml
from tests.train_helpers import max_weight_diff, pair_dir, train_dict  # noqa: F401

KILL, TERM = signal.SIGKILL, signal.SIGTERM
MAX_ITERS, INTERVAL = 12, 3
N_IMAGES = 16
RECORD = {"config.yaml", "run_info.json", "evaluate_config.yaml", "evaluate_run_info.json"}
_rng = random.Random(8)  # issue 8: the kill points below are fixed by this seed


@dataclass(frozen=True)
class Kill:
    sig: signal.Signals
    trigger: str          # iteration | file | start | progress | staged
    arg: Any

    def __str__(self) -> str:
        return f"{self.sig.name}-{self.trigger}-{self.arg}"


@dataclass(frozen=True)
class Trial:
    step: str             # a training stage (source_only, warmup) or an inference step
    kills: tuple[Kill, ...]
    previous: bool = False  # inference: the output folder already holds an older complete output

    @property
    def id(self) -> str:
        return "-".join([self.step, *map(str, self.kills)] + (["over-previous"] if self.previous else []))


def _it() -> int:
    return _rng.randint(1, MAX_ITERS - 1)


def _u() -> float:
    return round(_rng.uniform(0.05, 0.95), 2)


TRAIN_TRIALS = [
    Trial("source_only", (Kill(KILL, "iteration", _it()),)),
    Trial("source_only", (Kill(KILL, "writing", "checkpoints/last.pt"),)),  # the first checkpoint, half written
    Trial("source_only", (Kill(TERM, "rewriting", "checkpoints/last.pt"),)),  # a later one: the previous stays
    Trial("source_only", (Kill(TERM, "file", "checkpoints/last.pt"),)),  # just after the first checkpoint
    Trial("source_only", (Kill(KILL, "writing", "checkpoint.pt"),)),  # the final model, half written
    Trial("source_only", (Kill(TERM, "file", "checkpoint.pt"),)),  # after the final save
    Trial("source_only", (Kill(KILL, "file", "train_summary.json"),)),  # before config.yaml / run_info.json
    Trial("source_only", (Kill(TERM, "start", round(_rng.uniform(0.3, 2.5), 2)),)),
    Trial("warmup", (Kill(TERM, "iteration", _it()),)),
    Trial("warmup", tuple(Kill(sig, "iteration", k)  # killed twice: the resumed run is killed too
                          for sig, k in zip((KILL, TERM), sorted(_rng.sample(range(1, MAX_ITERS), 2))))),
]
INFER_TRIALS = [
    Trial("pseudo-soft", (Kill(KILL, "staged", _rng.randint(1, N_IMAGES - 4)),)),
    Trial("pseudo-soft", (Kill(TERM, "staged", _rng.randint(1, N_IMAGES - 4)),), previous=True),
    Trial("pseudo-soft", (Kill(KILL, "progress", _u()),), previous=True),
    Trial("pseudo-soft", (Kill(TERM, "progress", _u()),)),
    Trial("pseudo-hard", (Kill(TERM, "staged", _rng.randint(1, 2 * N_IMAGES)),)),
    Trial("pseudo-hard", (Kill(KILL, "staged", _rng.randint(1, 2 * N_IMAGES)),), previous=True),
    Trial("pseudo-hard", (Kill(TERM, "progress", _u()),), previous=True),
    Trial("pseudo-hard", (Kill(KILL, "progress", _u()),)),
    Trial("evaluate", (Kill(KILL, "progress", _u()),)),
    Trial("evaluate", (Kill(TERM, "progress", _u()),), previous=True),
    Trial("evaluate", (Kill(KILL, "file", "confusion.npy"),)),
    Trial("evaluate", (Kill(TERM, "file", "metrics.json"),)),
]


@pytest.fixture(scope="module")
def one_thread_module():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # the subprocesses run with OMP_NUM_THREADS=1: the same numerics
    yield
    torch.set_num_threads(n)


def _trigger(kill: Kill, victim: Victim, out: Path, duration: float) -> Callable[[], bool]:
    """When to send the signal."""
    if kill.trigger == "iteration":  # lines written by this process (not left by a killed one)
        log = out / "metrics.jsonl"
        return lambda: log.exists() and log.stat().st_mtime >= victim.started_wall and \
            log.read_bytes().count(b"\n") >= kill.arg
    if kill.trigger == "file":
        return lambda: (out / kill.arg).exists()
    if kill.trigger in ("writing", "rewriting"):  # the temp file of an atomic write exists: mid-write
        target = out / kill.arg
        return lambda: target.parent.is_dir() and any(target.parent.glob(f".{target.name}.*.tmp")) and \
            (kill.trigger == "writing" or target.exists())
    if kill.trigger == "start":
        return lambda: time.monotonic() - victim.started >= kill.arg
    if kill.trigger == "staged":
        return lambda: sum(1 for d in out.parent.glob(f".{out.name}.tmp-*") for p in d.rglob("*")
                           if p.is_file()) >= kill.arg
    if kill.trigger == "progress":
        marker, seen = f"{victim.step}:   0%", []

        def ready() -> bool:
            if not seen and marker in victim.stderr:
                seen.append(time.monotonic())
            return bool(seen) and time.monotonic() - seen[0] >= kill.arg * 0.5 * duration
        return ready
    raise ValueError(kill.trigger)


def _command(step: str) -> str:
    return "train" if step in ("source_only", "warmup") else step


def _kill_and_rerun(trial: Trial, config: Path, out: Path, duration: float, check_killed: Callable[[Path], None]
                    ) -> str:
    """Run the trial's kills one after the other (each a fresh subprocess), check the outputs after each, then
    rerun the step in this process; returns the rerun's stderr."""
    for kill in trial.kills:
        victim = Victim(_command(trial.step), config, out)
        victim.kill_when(_trigger(kill, victim, out, duration), kill.sig)
        check_killed(out)
    rc, err = run_cli(_command(trial.step), config, out)
    assert rc == 0, err[-3000:]
    assert leftovers(out) == []
    return err


# ---------------------------------------------------------------------------------------------------------
# training


@pytest.fixture(scope="module")
def train_refs(pair_dir, tmp_path_factory, one_thread_module):  # noqa: F811
    """Config file and uninterrupted output of each stage (run once, in this process)."""
    base = tmp_path_factory.mktemp("train_ref")
    refs = {}
    for stage in ("source_only", "warmup"):
        cfg = train_dict(pair_dir, stage, max_iters=MAX_ITERS, checkpoint_interval=INTERVAL, log_interval=1,
                         **{"warmup.disc_width": 8})
        config = write_yaml(base / f"{stage}.yaml", cfg)
        rc, err = run_cli("train", config, base / stage)
        assert rc == 0, err[-3000:]
        refs[stage] = (config, base / stage)
    return refs


def _metrics_lines(out: Path) -> list[dict]:
    keep = ("iteration", "loss/", "lr/")
    return [{k: v for k, v in json.loads(line).items() if k.startswith(keep)}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


def _check_train_after_kill(out: Path) -> int:
    """Every output present is whole; returns the iteration the rerun should resume from (0: none)."""
    resume = 0
    for name in ("checkpoints/last.pt", "checkpoint.pt"):
        if (out / name).exists():
            state = load_checkpoint(out / name)  # never partial: written atomically
            assert 0 < state["iteration"] <= MAX_ITERS
            resume = state["iteration"] if name == "checkpoints/last.pt" else resume
    for name in ("train_summary.json", "run_info.json"):
        if (out / name).exists():
            json.loads((out / name).read_text())
    if (out / "config.yaml").exists():
        assert yaml.safe_load((out / "config.yaml").read_text())["max_iters"] == MAX_ITERS
    if (out / "metrics.jsonl").exists():
        lines = (out / "metrics.jsonl").read_text().split("\n")
        for line in lines[:-1]:  # every complete line parses (the last may be cut by the kill)
            json.loads(line)
    return resume


@pytest.mark.parametrize("trial", TRAIN_TRIALS, ids=lambda t: t.id)
def test_kill_train(trial, train_refs, tmp_path, one_thread_module):
    config, ref = train_refs[trial.step]
    out = tmp_path / "out"
    resume: list[int] = []
    err = _kill_and_rerun(trial, config, out, 0.0, lambda out: resume.append(_check_train_after_kill(out)))
    summary = json.loads((out / "train_summary.json").read_text())
    if resume[-1]:  # the rerun continued from the checkpoint instead of training again
        assert f"resuming from {out / 'checkpoints' / 'last.pt'} at iteration {resume[-1]}" in err
    assert summary["resumed_from"] == resume[-1]
    assert summary["iterations"] == MAX_ITERS and summary["stage"] == trial.step
    a, b = load_checkpoint(out / "checkpoint.pt"), load_checkpoint(ref / "checkpoint.pt")
    assert a["iteration"] == b["iteration"] == MAX_ITERS
    assert max_weight_diff(a["model"], b["model"]) <= 1e-6
    if "discriminator" in b:
        assert max_weight_diff(a["discriminator"], b["discriminator"]) <= 1e-6
    assert load_checkpoint(out / "checkpoints" / "last.pt")["iteration"] == MAX_ITERS
    assert _metrics_lines(out) == _metrics_lines(ref)  # one line per iteration 1..MAX_ITERS, same losses
    assert yaml.safe_load((out / "config.yaml").read_text()) == yaml.safe_load((ref / "config.yaml").read_text())
    assert json.loads((out / "run_info.json").read_text())["step"] == "train"


# ---------------------------------------------------------------------------------------------------------
# pseudo labels and evaluation


def _decode(path: Path) -> Any:
    """A file's content, decoded strictly by its kind (a partial file raises)."""
    if path.suffix == ".npz":
        return pseudo.load_soft_quantized(path)
    if path.suffix == ".npy":
        return np.load(path, allow_pickle=False)
    if path.suffix == ".png":
        return read_png_unchanged(path)
    if path.suffix == ".json":
        return json.loads(path.read_text())
    if path.suffix == ".yaml":
        return yaml.safe_load(path.read_text())
    if path.suffix == ".pt":
        return load_checkpoint(path)["iteration"]
    raise AssertionError(f"unexpected file {path}")


def _volatile(rel: str) -> bool:
    return Path(rel).name in ("run_info.json", "evaluate_run_info.json")  # time and command of the run


def _same(a: Any, b: Any) -> bool:
    return np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b


@pytest.fixture(scope="module")
def infer_refs(tmp_path_factory, one_thread_module):
    """A prepared split, a checkpoint, and per step: config, decoded uninterrupted output, duration."""
    base = tmp_path_factory.mktemp("infer_ref")
    data = random_split(base, n=N_IMAGES, size=(96, 192))
    ck = tiny_checkpoint(base / "ck.pt")
    refs = {"checkpoint": ck}
    for step in ("pseudo-soft", "pseudo-hard", "evaluate"):
        config = write_yaml(base / f"{step}.yaml", {"checkpoint": str(ck), "data": str(data), "device": "cpu",
                                                     "batch_size": 2, "workers": 0, "progress": True})
        out = base / step
        if step == "evaluate":
            shutil.copy(ck, _stage(out))
        t0 = time.monotonic()
        rc, err = run_cli(step, config, out)
        assert rc == 0, err[-3000:]
        decoded = {rel: _decode(out / rel) for rel in snapshot(out) if not _volatile(rel)}
        refs[step] = (config, out, decoded, time.monotonic() - t0)
    return refs


def _stage(out: Path) -> Path:
    """A stage folder holding its checkpoint.pt (evaluate writes next to it), made by training as in the
    workflow."""
    out.mkdir(parents=True, exist_ok=True)
    cpsl_outputs.write_marker(out, "train")
    return out / "checkpoint.pt"


def _older_output(step: str, ref_out: Path, out: Path) -> None:
    """``out`` holding an older complete output (the reference plus a file the new run does not write)."""
    shutil.copytree(ref_out, out, dirs_exist_ok=True)
    if step == "evaluate":
        metrics = json.loads((out / "metrics.json").read_text())
        (out / "metrics.json").write_text(json.dumps({**metrics, "miou": -1.0}))  # an older result
    else:
        (out / "stale.txt").write_text("from an older run")


def _check_complete(out: Path, decoded: dict[str, Any], killed: bool) -> None:
    """``out`` holds every file of the uninterrupted output, each decoding to the same content (right after a
    kill the run's record files may still be missing)."""
    files = {rel for rel in outputs(out) if not _volatile(rel)}
    expected = set(decoded) - (RECORD if killed else set())
    assert expected <= files <= set(decoded), sorted(files ^ set(decoded))
    for rel in files:
        assert _same(_decode(out / rel), decoded[rel]), rel
    for rel in outputs(out):
        if _volatile(rel):
            _decode(out / rel)


@pytest.mark.parametrize("trial", INFER_TRIALS, ids=lambda t: t.id)
def test_kill_inference(trial, infer_refs, tmp_path, one_thread_module):
    config, ref_out, decoded, duration = infer_refs[trial.step]
    out = tmp_path / ("stage" if trial.step == "evaluate" else "labels")
    if trial.previous:
        _older_output(trial.step, ref_out, out)
    elif trial.step == "evaluate":
        shutil.copy(infer_refs["checkpoint"], _stage(out))
    before = snapshot(out)

    def check_killed(out: Path) -> None:
        now = outputs(out)
        if trial.step == "evaluate":  # files written one by one, each atomically: old or new, never partial
            assert now["checkpoint.pt"] == before["checkpoint.pt"]
            for rel in now:
                value = _decode(out / rel)
                assert rel not in decoded or _volatile(rel) or _same(value, decoded[rel]) or \
                    now[rel] == before.get(rel), rel
        elif now and now != before:  # published as a whole: the previous folder or the complete new one (or
            # neither, for a kill between the two renames of publish_dir)
            _check_complete(out, decoded, killed=True)

    _kill_and_rerun(trial, config, out, duration, check_killed)
    _check_complete(out, decoded, killed=False)


# ---------------------------------------------------------------------------------------------------------
# a full disk during a checkpoint write


class _FullDisk:
    """A file that takes ``room`` bytes, then fails like a full disk (OSError ENOSPC)."""

    def __init__(self, fh, room: int) -> None:
        self.fh, self.room = fh, room

    def write(self, data) -> int:
        data = memoryview(data).cast("B")
        if len(data) > self.room:
            self.fh.write(data[: self.room])
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.fh.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.fh, name)

    def __enter__(self) -> "_FullDisk":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.fh.close()


def _fill_disk_on(monkeypatch, write_number: int, room: int) -> None:
    """The ``write_number``-th checkpoint file opened by save_checkpoint (1-based) runs out of space after
    ``room`` bytes."""
    calls = {"n": 0}
    real_os = ckpt_module.os

    class OsWithFullDisk:
        def __getattr__(self, name: str) -> Any:
            return getattr(real_os, name)

        @staticmethod
        def fdopen(fd, *args, **kwargs):
            fh = real_os.fdopen(fd, *args, **kwargs)
            calls["n"] += 1
            return _FullDisk(fh, room) if calls["n"] == write_number else fh

    monkeypatch.setattr(ckpt_module, "os", OsWithFullDisk())


@pytest.mark.parametrize("room", [0, 1000, 200_000])
def test_full_disk_during_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch, room):
    from cpsl.errors import CheckpointError
    from cpsl.models import build_model

    path = tmp_path / "checkpoint.pt"
    model = build_model(TINY)
    save_checkpoint(path, make_checkpoint(model, TINY, iteration=1))
    previous = path.read_bytes()
    _fill_disk_on(monkeypatch, 1, room)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    with pytest.raises(CheckpointError) as err:
        save_checkpoint(path, make_checkpoint(model, TINY, iteration=2))
    assert str(err.value) == (f"{path}: cannot write the checkpoint (No space left on device); the previous "
                              "checkpoint.pt is unchanged")
    assert path.read_bytes() == previous and load_checkpoint(path)["iteration"] == 1
    assert os.listdir(tmp_path) == ["checkpoint.pt"]  # the partial temp file is gone


def test_full_disk_during_training_stops_cleanly_and_the_rerun_resumes(train_refs, tmp_path, monkeypatch,
                                                                      one_thread_module):
    config, ref = train_refs["source_only"]
    out = tmp_path / "out"
    _fill_disk_on(monkeypatch, 2, 4096)  # the checkpoint of iteration 2 * INTERVAL fails part-way
    rc, err = run_cli("train", config, out)
    assert rc == 2
    last = out / "checkpoints" / "last.pt"
    assert error_line(err, "train") == (f"{last}: cannot write the checkpoint (No space left on device); the "
                                        "previous last.pt is unchanged")
    assert load_checkpoint(last)["iteration"] == INTERVAL and not (out / "checkpoint.pt").exists()
    assert os.listdir(last.parent) == ["last.pt"]
    monkeypatch.undo()  # space freed: the same command resumes and ends with the uninterrupted weights
    rc, err = run_cli("train", config, out)
    assert rc == 0 and f"resuming from {last} at iteration {INTERVAL}" in err
    diff = max_weight_diff(load_checkpoint(out / "checkpoint.pt")["model"],
                           load_checkpoint(ref / "checkpoint.pt")["model"])
    assert diff <= 1e-6
