"""The one training loop of every stage: iteration-based, resumable, CPU / one GPU / DDP with the same code.

``train(cfg, out)`` runs ``cfg.max_iters`` iterations of the stage's method (``cpsl.methods``)::

    for iteration in range(start, max_iters):
        batches = the next `accumulate` batches of every domain   (cpsl.train.data: deterministic, endless)
        losses = method.step(batches)                             (forward and backward per batch, optimizer
                                                                    steps; the losses stay on the device)
        amp.update(); every scheduler steps once
        at log and checkpoint iterations only (one host sync): the losses averaged over the iterations since
        the last log line and over the processes; NaN/Inf -> TrainingError (the last checkpoint is kept)
        metrics.jsonl line every log_interval; out/checkpoints/last.pt every checkpoint_interval, unless the
        networks hold NaN/Inf (TrainingError: a checkpoint is only ever written with finite weights)

Outputs in ``out`` (written by rank 0 only)::

    checkpoints/last.pt   resumable state (networks, optimizers, schedulers, grad scaler, iteration, RNG states
                          of every rank, config, seed, input fingerprints); at the end a hard link to
                          checkpoint.pt (one copy on disk), so a job killed after the final save (and whose
                          checkpoint.pt Snakemake then deletes) finishes on rerun without retraining; a finished
                          run with other settings or other inputs is discarded on rerun
    checkpoint.pt         the final model: networks (and stage 1's prototypes and queues), ``iteration`` =
                          max_iters, config, seed, RNG states and input fingerprints; no optimizer state
    checkpoints/best.pt   with eval_interval: the student with the best validation mIoU so far (cpsl.train.validate)
    metrics.jsonl         one JSON object per log line: iteration, loss/<name> (mean over the last
                          log_interval iterations), lr/<group> (the rate used by that iteration), time_iter,
                          time_data (seconds per iteration), samples_per_s; stages 1-3 also share/student/<k>,
                          share/teacher/<k>, share/marginal/<k> (predicted class shares on the target,
                          ``cpsl.methods.shares``); with eval_interval also a line per validation (val/student,
                          val/teacher, val_iou/<class>, val_best, val_best_iteration; cpsl.train.validate)
    train_summary.json    stage, iterations, final losses, mean time per iteration, device, world size, and
                          ``method.describe()`` (e.g. ``student_init``; also in the checkpoints' ``extra``)

Resume: if ``checkpoints/last.pt`` exists, training continues from it. The data order and augmentation are a
pure function of (seed, iteration, slot) and every RNG state is restored, so on the CPU the final weights equal
those of an uninterrupted run. The checkpoint's config must match (except workers, intervals, device), and so
must its inputs: ``last.pt`` records a fingerprint of every file or folder the stage reads (``INPUT_KEYS``:
size and modification time of each file). An input rebuilt since (Snakemake reran the warm-up, so stage 1's
warm-up checkpoint, soft labels and prototypes are new files at the same paths) makes a finished run start over
and an unfinished one stop with a message naming the input, instead of resuming from weights trained on the old
inputs.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from cpsl import progress
from cpsl.config import TrainConfig, load, to_dict
from cpsl.errors import CheckpointError, ConfigError, CpslError
from cpsl.methods import Amp, Method, TrainContext, build_method
from cpsl.models.checkpoint import (capture_rng_state, link_checkpoint, load_checkpoint, make_checkpoint,
                                    restore_rng_state, save_checkpoint)
from cpsl.provenance import atomic_write_text
from cpsl.train import dist as D
from cpsl.train.data import HOST_KEYS, _seed_int, build_datasets, build_loaders
from cpsl.train.validate import Validator

LAST = Path("checkpoints") / "last.pt"
FINAL = "checkpoint.pt"
METRICS = "metrics.jsonl"
SUMMARY = "train_summary.json"
# Settings that may change between a killed run and its resumption without changing the result.
RESUME_FREE_KEYS = ("data.workers", "log_interval", "checkpoint_interval", "device", "share_drift",
                    "share_drift_ratio", "share_drift_logs", "eval_batch_size", "eval_workers", "channels_last")
# The files and folders a stage reads (TrainConfig keys); their fingerprints go into checkpoints/last.pt.
INPUT_KEYS = ("data.source", "data.target", "init_checkpoint", "model.init", "selflabel.soft_labels",
              "selflabel.prototypes", "selflabel.class_dist", "distill.teacher", "distill.hard_labels",
              "distill.class_dist")


class TrainingError(CpslError):
    """Training cannot continue (e.g. a NaN/Inf loss); the message names the iteration and the loss term."""


def _say(info: D.DistInfo, msg: str) -> None:
    if info.is_main:
        print(f"cpsl train: {msg}", file=sys.stderr, flush=True)


def to_device(obj: Any, device: torch.device) -> Any:
    """Move every tensor in a (nested) batch to ``device``, except the entries named in ``HOST_KEYS`` (the
    augmentation records, read on the host), which stay where they are."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: v if k in HOST_KEYS else to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out


def _first_difference(old: dict[str, Any], new: dict[str, Any], skip: tuple[str, ...] = ()) -> str | None:
    """The first key (in sorted order, ``skip`` left out) whose value differs between two flat dicts."""
    return next((k for k in sorted(set(old) | set(new)) if k not in skip and old.get(k) != new.get(k)), None)


def _saved_settings(state: dict[str, Any]) -> dict[str, Any]:
    """The flat settings a checkpoint was written with. Read through ``TrainConfig``, so that a checkpoint from
    an older version of the package, which lacks a setting added since, has that setting's default: a run killed
    before an update resumes after it when the new settings are at their defaults. A config that no longer
    loads (a setting removed or renamed since) is compared as written."""
    saved = state.get("config") or {}
    try:
        saved = to_dict(load(TrainConfig, saved))
    except (CpslError, ValueError, TypeError):
        pass
    return _flatten(saved)


def _settings_differ(state: dict[str, Any], cfg: TrainConfig) -> bool:
    return _first_difference(_saved_settings(state), _flatten(to_dict(cfg)), RESUME_FREE_KEYS) is not None


def fingerprint(path: str | Path) -> str:
    """A short digest of the size and modification time of ``path``, or of every file under it (relative name,
    size, mtime, in name order) for a folder; ``"missing"`` when it does not exist. A rebuilt input gets new
    modification times, so its fingerprint changes even when its size does not."""
    path = Path(path)
    digest = hashlib.sha256()
    if path.is_dir():
        for root, dirs, files in os.walk(path):
            dirs.sort()
            for name in sorted(files):
                file = Path(root) / name
                st = file.stat()
                digest.update(f"{file.relative_to(path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    elif path.exists():
        st = path.stat()
        digest.update(f"{st.st_size}\0{st.st_mtime_ns}".encode())
    else:
        return "missing"
    return digest.hexdigest()[:16]


def input_fingerprints(cfg: TrainConfig) -> dict[str, str]:
    """``fingerprint`` of every input the stage reads (``INPUT_KEYS`` that are set), by config key."""
    flat = _flatten(to_dict(cfg))
    return {key: fingerprint(flat[key]) for key in INPUT_KEYS
            if flat.get(key) and not (key == "model.init" and cfg.model.init_file is None)}


def _changed_input(state: dict[str, Any], inputs: dict[str, str]) -> str | None:
    """The first input whose fingerprint differs from the one ``state`` recorded (None for checkpoints written
    before fingerprints were recorded)."""
    old = (state.get("extra") or {}).get("inputs")
    return None if old is None else _first_difference(old, inputs)


def check_resume_config(state: dict[str, Any], cfg: TrainConfig, path: Path) -> None:
    """Raise CheckpointError if ``path`` was written by a run with different settings."""
    old, new = _saved_settings(state), _flatten(to_dict(cfg))
    key = _first_difference(old, new, RESUME_FREE_KEYS)
    if key is not None:
        raise CheckpointError(f"{path}: written by a run with different settings ({key}: {old.get(key)!r} there, "
                              f"{new.get(key)!r} now); delete {path.parent} to start over")


def reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of ``t`` over the processes (a new tensor; ``t`` itself on one process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    t = t.clone()
    dist.all_reduce(t)
    return t / dist.get_world_size()


def gather_rng_states() -> list[dict[str, Any]]:
    """Every rank's RNG states (rank order); a one-element list on one process."""
    own = capture_rng_state()
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [own]
    states: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(states, own)
    return states


class MetricsLog:
    """``metrics.jsonl``, appended and flushed line by line (rank 0); lines past ``start`` are dropped on
    resume, so a resumed run's file reads as if it had never been interrupted."""

    def __init__(self, path: Path, start: int) -> None:
        self.path = path
        kept = []
        if start > 0 and path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    if json.loads(line).get("iteration", math.inf) <= start:
                        kept.append(line)
                except json.JSONDecodeError:
                    break  # a line cut by the kill
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, "".join(line + "\n" for line in kept))
        self.fh = open(path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self.fh.write(json.dumps(record) + "\n")
        self.fh.flush()

    def close(self) -> None:
        self.fh.close()


class _Window:
    """The losses since the last log line, kept on the device: ``method.step`` returns its losses as detached
    0-d tensors (host numbers for flags such as ``cutmix``), which are summed here without the host waiting for
    the device. ``values()`` reads them (one copy to the host, after the mean over the processes) at the
    iterations that log or checkpoint."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.n = 0
        self.first = 0
        self.order: list[str] = []                # the losses' names in the method's order
        self.keys: list[str] = []
        self.sum: torch.Tensor | None = None      # float64 (len(keys),) on the device
        self.last: torch.Tensor | None = None     # the latest iteration's losses
        self.host: dict[str, float] = defaultdict(float)
        self.last_host: dict[str, float] = {}
        self.times: dict[str, float] = defaultdict(float)

    def add(self, done: int, losses: dict[str, Any], t_iter: float, t_data: float) -> None:
        tensors = {k: v for k, v in losses.items() if isinstance(v, torch.Tensor)}
        keys = sorted(tensors)
        if self.n == 0:
            self.first, self.keys, self.order = done, keys, list(losses)
        elif keys != self.keys:
            raise RuntimeError(f"the losses changed from {self.keys} to {keys}")
        if keys:
            vec = torch.stack([tensors[k].detach().reshape(()).to(torch.float64) for k in keys])
            self.sum = vec if self.sum is None else self.sum + vec
            self.last = vec
        self.last_host = {k: float(v) for k, v in losses.items() if k not in tensors}
        for k, v in self.last_host.items():
            self.host[k] += v
        self.n += 1
        self.times["time_iter"] += t_iter
        self.times["time_data"] += t_data

    def values(self) -> tuple[dict[str, float], dict[str, float]]:
        """(the mean of each loss over the window and the processes, the latest iteration's losses), read on the
        host: the only host syncs of the loss bookkeeping."""
        sums, last = dict(self.host), dict(self.last_host)
        if self.keys:
            both = reduce_mean(torch.cat([self.sum, self.last])).tolist()
            sums.update(zip(self.keys, both[:len(self.keys)]))
            last.update(zip(self.keys, both[len(self.keys):]))
        return {k: sums[k] / self.n for k in self.order}, {k: last[k] for k in self.order}

    def timing(self) -> dict[str, float]:
        return {k: v / max(self.n, 1) for k, v in self.times.items()}

    def span(self, done: int) -> str:
        return f"iteration {done}" if self.first == done else f"iterations {self.first}-{done}"


def _last_good(last_path: Path, last_saved: int | None) -> str:
    return (f"the last good checkpoint is {last_path} (iteration {last_saved})" if last_saved is not None
            else "no checkpoint had been written yet")


def _first_non_finite(obj: Any, where: str = "") -> str | None:
    """Dotted name of the first floating-point tensor in ``obj`` (nested dicts) holding NaN or Inf, else None."""
    if isinstance(obj, torch.Tensor):
        return where if obj.is_floating_point() and not bool(torch.isfinite(obj).all()) else None
    if isinstance(obj, dict):
        for key, value in obj.items():
            found = _first_non_finite(value, f"{where}.{key}" if where else str(key))
            if found:
                return found
    return None


def _check_finite(method: Method, done: int, last_path: Path, last_saved: int | None) -> None:
    """Raise TrainingError instead of saving networks that hold NaN or Inf (an update can overflow a weight or
    a BatchNorm statistic while every loss was still finite), so the last checkpoint stays a good one."""
    bad = _first_non_finite(method.state_dict(full=False))
    if bad:
        raise TrainingError(f"iteration {done}: {bad} holds NaN or Inf values; training stopped, "
                            f"{_last_good(last_path, last_saved)}")


def _on_main_rank(info: D.DistInfo, what: str, write: Any) -> None:
    """Run ``write()`` (files: checkpoints, summary) on rank 0 only, and tell every rank how it went: if it failed,
    every rank stops with the same one-line CheckpointError (under DDP the others would otherwise wait in their
    next collective until the NCCL timeout). A failure that is not a CpslError or OSError (a bug) keeps its
    traceback on rank 0."""
    error, exc = None, None
    if info.is_main:
        try:
            write()
        except Exception as err:  # noqa: BLE001 - the other ranks must hear of any failure
            exc = err
            error = str(err) if isinstance(err, CpslError) else f"{what}: {type(err).__name__}: {err}"
    error = D.broadcast_object(error)
    if exc is not None and not isinstance(exc, (CpslError, OSError)):
        raise exc
    if error is not None:
        raise CheckpointError(" ".join(error.split())) from exc


def _resumable_state(method: Method, cfg: TrainConfig, iteration: int, amp: Amp,
                     rng_states: list[dict[str, Any]], inputs: dict[str, str],
                     validator: Validator | None = None, final: bool = False) -> dict[str, Any]:
    """The resumable checkpoint (``checkpoints/last.pt``) after ``iteration`` finished iterations; ``final``: the
    final checkpoint (``checkpoint.pt``), the same without what only further training needs (the optimizers,
    schedulers and grad scaler)."""
    parts = {k: v for k, v in method.state_dict(full=True).items() if k != "model"}
    scaler = {"grad_scaler": amp.state_dict()}
    if final:
        parts = {k: v for k, v in parts.items() if k not in method.optimizers and k != "scheduler"}
        scaler = {}
    return make_checkpoint(method.student, cfg.model, iteration=iteration, rng=rng_states[0],
                           config=to_dict(cfg), seed=cfg.seed,
                           extra={"stage": cfg.stage, **method.describe(), **scaler,
                                  "rng_per_rank": rng_states, "batch_size": cfg.data.batch_size,
                                  "inputs": inputs, **(validator.state() if validator else {})},
                           **parts)


def train(cfg: TrainConfig, out: str | Path) -> dict[str, Any]:
    """Run (or resume) the training stage ``cfg.stage`` into ``out``; returns the summary dict.

    Under torchrun every rank calls this; they join the process group here and leave it at the end.
    """
    out = Path(out)
    info = D.setup(cfg.device)
    try:
        return _train(cfg, out, info)
    finally:
        D.cleanup()


def _train(cfg: TrainConfig, out: Path, info: D.DistInfo) -> dict[str, Any]:
    if cfg.data.batch_size % info.world_size:
        raise ConfigError(f"data.batch_size: {cfg.data.batch_size} is not divisible by the {info.world_size} "
                          "processes")
    if cfg.amp == "fp16" and info.device.type != "cuda":
        _say(info, f"amp: 'fp16' applies on CUDA only (bf16 works on both); running in float32 on {info.device}")
    D.seed_everything(cfg.seed)
    amp = Amp(cfg.amp, info.device)
    ctx = TrainContext(info.device, info, amp)
    method = build_method(cfg, ctx)

    last_path, start, state = out / LAST, 0, None
    inputs = input_fingerprints(cfg)
    if last_path.is_file():
        state = load_checkpoint(last_path)
        finished = int(state.get("iteration", 0)) >= int((state.get("config") or {}).get("max_iters", -1))
        changed = _changed_input(state, inputs)
        if finished and (_settings_differ(state, cfg) or changed):
            # a completed run with other settings or inputs (the workflow reruns a stage whose settings changed
            # or whose inputs were rebuilt): its final model was already published, so start over instead of
            # refusing. The file stays until the new run's first checkpoint replaces it (a bad input found below
            # must not destroy it)
            why = f"other inputs ({changed} was rebuilt since)" if changed else "other settings"
            _say(info, f"{last_path} is a finished run with {why}; starting over")
            state = None
    if state is not None:
        check_resume_config(state, cfg, last_path)
        if changed:
            # the settings match, so the changed key is set in both runs: only its file or folder differs
            now = _flatten(to_dict(cfg)).get(changed)
            raise CheckpointError(f"{last_path}: written by a run with other inputs ({changed}: {now} was "
                                  f"rebuilt or replaced since); resuming would mix the two, delete "
                                  f"{last_path.parent} to start over")
        # a finished run's last.pt is its final checkpoint (no optimizers): restored to publish it again
        method.load_state_dict(state, last_path, resumable=not finished)
        amp.load_state_dict(state.get("extra", {}).get("grad_scaler", {}))
        start = int(state["iteration"])
        _say(info, f"resuming from {last_path} at iteration {start}")
    last_saved = start if state is not None else None

    datasets = build_datasets(cfg, method.domains, cfg.model.n_class)
    micro_batches = cfg.accumulate   # per iteration (optimizer step); the loaders count micro-batches
    loaders = build_loaders(cfg, datasets, rank=info.rank, world_size=info.world_size,
                            start_iter=start * micro_batches,
                            pin_memory=info.device.type == "cuda")
    if state is not None:
        per_rank = state.get("extra", {}).get("rng_per_rank") or []
        restore_rng_state(per_rank[info.rank] if len(per_rank) == info.world_size else state["rng"])
    else:  # dropout etc.: a stream per rank, independent of the one that initialised the networks
        D.seed_everything(_seed_int(cfg.seed, info.rank, 3))
    iters = {domain: iter(loader) for domain, loader in loaders.items()}
    validator = Validator(cfg, info, out, state)   # eval_interval: validation and checkpoints/best.pt

    log = MetricsLog(out / METRICS, start) if info.is_main else None
    window = _Window()
    last_losses: dict[str, float] = {}
    per_iter: list[float] = []
    t_start = time.perf_counter()
    bar = progress.bar(total=cfg.max_iters, initial=start, desc=cfg.stage, disable=not info.is_main)
    try:
        for it in range(start, cfg.max_iters):
            done = it + 1
            t0 = time.perf_counter()
            batches = [{domain: to_device(next(loader_it), info.device) for domain, loader_it in iters.items()}
                       for _ in range(micro_batches)]
            t_data = time.perf_counter() - t0
            lrs = method.lrs()
            method.train_mode()
            losses = method.step(batches if micro_batches > 1 else batches[0])
            amp.update()
            for sched in method.schedulers.values():
                sched.step()
            t_iter = time.perf_counter() - t0
            per_iter.append(t_iter)
            window.add(done, losses, t_iter, t_data)
            bar.update(1)
            logs = done % cfg.log_interval == 0 or done == cfg.max_iters
            if logs or done % cfg.checkpoint_interval == 0:
                # the losses are read (and checked for NaN/Inf) here only, not every iteration: one host sync
                means, last_losses = window.values()
                bad = [k for k, v in means.items() if not math.isfinite(v)]
                if bad:
                    raise TrainingError(f"{window.span(done)}: loss {bad[0]!r} is {means[bad[0]]}; training "
                                        f"stopped, {_last_good(last_path, last_saved)}")
            if logs:
                timing = window.timing()
                shares, share_text = method.log_shares(done)   # every rank: the counts are summed over them
                if log is not None:
                    record = {"iteration": done, **{f"loss/{k}": v for k, v in means.items()},
                              **{f"lr/{k}": v for k, v in lrs.items()}, **timing,
                              "samples_per_s": cfg.data.batch_size * micro_batches / max(timing["time_iter"], 1e-9),
                              **shares}
                    log.write(record)
                postfix = {k: f"{v:.4g}" for k, v in means.items()}
                if share_text:
                    postfix["share"] = share_text
                bar.set_postfix(postfix, refresh=False)
                window.reset()
            if validator.due(done):   # before the checkpoint: last.pt holds the best score up to ``done``
                record = validator.run(method, done, lambda what, write: _on_main_rank(info, what, write))
                if log is not None:
                    log.write(record)
                _say(info, validator.describe(record))
            if done % cfg.checkpoint_interval == 0 and done < cfg.max_iters:
                _check_finite(method, done, last_path, last_saved)
                rng_states = gather_rng_states()
                _on_main_rank(info, f"writing {last_path}", lambda: save_checkpoint(
                    last_path, _resumable_state(method, cfg, done, amp, rng_states, inputs, validator)))
                last_saved = done
    finally:
        bar.close()
        if log is not None:
            log.close()
        del iters  # stops the DataLoader workers

    summary = {"stage": cfg.stage, "iterations": cfg.max_iters, "resumed_from": start,
               "final_losses": last_losses, "time_per_iter": float(np.mean(per_iter)) if per_iter else None,
               "wall_time_s": time.perf_counter() - t_start, "device": str(info.device),
               "world_size": info.world_size, "global_batch": cfg.data.batch_size * micro_batches,
               "accumulate": micro_batches,
               **method.describe()}
    _check_finite(method, cfg.max_iters, last_path, last_saved)
    if last_saved != cfg.max_iters:  # all ranks: gathering the RNG states is a collective
        rng_states = gather_rng_states()
        _on_main_rank(info, f"writing {last_path}", lambda: save_checkpoint(
            last_path, _resumable_state(method, cfg, cfg.max_iters, amp, rng_states, inputs, validator)))
    else:  # a finished run published again: its RNG states as saved
        rng_states = (state or {}).get("extra", {}).get("rng_per_rank") or [capture_rng_state()]

    def write_final() -> None:
        save_checkpoint(out / FINAL, _resumable_state(method, cfg, cfg.max_iters, amp, rng_states, inputs,
                                                      validator, final=True))
        # last.pt becomes the final checkpoint itself (a hard link: one copy on disk; a ResNet-101 stage 1
        # keeps 522 MB instead of 1.3 GB). If the job is killed before it exits (a time limit), Snakemake deletes
        # checkpoint.pt as a failed output; last.pt keeps the file, and the rerun publishes it again without
        # retraining. Where the file system has no hard links, last.pt stays the resumable state at max_iters.
        link_checkpoint(out / FINAL, last_path)
        atomic_write_text(out / SUMMARY, json.dumps(summary, indent=2) + "\n")

    _on_main_rank(info, f"writing {out / FINAL}", write_final)
    D.barrier()
    return summary
