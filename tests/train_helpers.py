"""Tiny prepared domain pairs and configs for the training tests (shared by test_train_loop, test_ddp,
test_resume, test_methods)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image

from cpsl.config import DatasetConfig, PrepareConfig, TrainConfig, load
from cpsl.steps import prepare

N_CLASS = 4
TINY_MODEL = {"backbone": "resnet18", "base_width": 8, "head_channels": 16, "n_class": N_CLASS}
COLOURS = np.array([[200, 30, 30], [30, 200, 30], [30, 30, 200], [200, 200, 30]], np.uint8)


def make_folder_split(root: Path, n: int = 6, hw: tuple[int, int] = (40, 80), seed: int = 0,
                      tint: int = 0) -> Path:
    """A folder-format dataset: images of coloured class regions (+ noise), train-id labels with some 255."""
    rng = np.random.default_rng(seed)
    h, w = hw
    for i in range(n):
        ys, xs = np.mgrid[0:h, 0:w]
        cy, cx = rng.integers(0, h), rng.integers(0, w)
        label = ((ys > cy).astype(np.int64) * 2 + (xs > cx)).astype(np.uint8)
        img = COLOURS[label].astype(np.int16) + rng.integers(-40, 40, (h, w, 3)) + tint
        label[rng.random((h, w)) < 0.05] = 255
        (root / "images" / "train").mkdir(parents=True, exist_ok=True)
        (root / "labels" / "train").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / "images" / "train" / f"im{i:03d}.png")
        Image.fromarray(label).save(root / "labels" / "train" / f"im{i:03d}.png")
    (root / "classes.txt").write_text("".join(f"class{k}\n" for k in range(N_CLASS)))
    return root


def prepared_pair(base: Path) -> tuple[Path, Path]:
    """Prepared source and target splits under ``base`` (built once per directory)."""
    src, tgt = base / "prep_source", base / "prep_target"
    if not (src / "meta.json").exists():
        for name, out, seed, tint in (("raw_source", src, 0, 0), ("raw_target", tgt, 1, 40)):
            root = make_folder_split(base / name, seed=seed, tint=tint)
            prepare.run(PrepareConfig(DatasetConfig(format="folder", root=root, split="train", n_class=N_CLASS,
                                                    workers=0), lab_stats=True), out)
    return src, tgt


def train_dict(base: Path, stage: str = "source_only", **over: Any) -> dict[str, Any]:
    """A resolved train config (plain dict) for the tiny model on the prepared pair in ``base``."""
    src, tgt = prepared_pair(base)
    cfg: dict[str, Any] = {
        "stage": stage, "max_iters": 6, "seed": 3, "device": "cpu",
        "model": dict(TINY_MODEL),
        "data": {"source": str(src), "target": str(tgt), "crop": [32, 64], "resize": 80, "batch_size": 2,
                 "workers": 0},
        "optim": {"lr": 0.01},
        "checkpoint_interval": 2, "log_interval": 1,
    }
    for key, value in over.items():
        node = cfg
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return cfg


def train_config(base: Path, stage: str = "source_only", **over: Any) -> TrainConfig:
    return load(TrainConfig, train_dict(base, stage, **over))


def write_config(path: Path, cfg: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def cli_env() -> dict[str, str]:
    """Environment for training subprocesses: one thread each (reproducible and fair on 2 shared cores)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent) + os.pathsep + env.get("PYTHONPATH", "")
    return env


TORCHRUN_2 = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")


def train_command(config: Path, out: Path, *launcher: str) -> list[str]:
    """``python [launcher...] -m cpsl train --config CONFIG --out OUT``."""
    return [sys.executable, *launcher, "-m", "cpsl", "train", "--config", str(config), "--out", str(out)]


def start_train(config: Path, out: Path, *launcher: str) -> subprocess.Popen:
    """Start a training subprocess (output captured; see ``finish``)."""
    return subprocess.Popen(train_command(config, out, *launcher), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=cli_env())


def kill_at_first_checkpoint(config: Path, out: Path, timeout: float = 120) -> Path:
    """Start ``cpsl train`` into ``out``, SIGKILL it as soon as ``checkpoints/last.pt`` exists (or at the
    deadline, or when it has exited) and return that path."""
    import signal
    import time

    victim = start_train(config, out)
    last = out / "checkpoints" / "last.pt"
    deadline = time.monotonic() + timeout
    while not last.exists() and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    victim.communicate()
    return last


def finish(proc: subprocess.Popen, timeout: float = 150) -> str:
    """Wait for a training subprocess; fail the test with its stderr unless it exits 0."""
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        raise AssertionError(f"training timed out after {timeout} s:\n{err[-3000:]}") from None
    assert proc.returncode == 0, f"training failed ({proc.returncode}):\n{err[-3000:]}"
    return err


def max_weight_diff(a: dict, b: dict) -> float:
    """Largest absolute difference between two state dicts with the same keys."""
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() if a[k].numel() else 0.0 for k in a)


def well_conditioned_init(path: Path, seed: int = 0) -> Path:
    """A checkpoint of the tiny model with Kaiming-initialised convs, for ``init_checkpoint``.

    The reference init (every conv N(0, 0.01)) makes the tiny network's features vanish, and GroupNorm then
    normalises near-zero variance: float32 rounding in the gradients is amplified ~1e4 times, so runs that
    differ only in summation order (1 vs 2 processes, thread counts) drift apart. From this init they agree
    to float precision.
    """
    import torch
    from torch import nn

    from cpsl.models import build_model
    from cpsl.models.checkpoint import make_checkpoint, save_checkpoint

    torch.manual_seed(seed)
    model_cfg = load(TrainConfig, {"stage": "source_only", "max_iters": 1, "data": {"source": "/x"},
                                   "model": TINY_MODEL}).model
    model = build_model(model_cfg)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    save_checkpoint(path, make_checkpoint(model, model_cfg, iteration=0))
    return path


@pytest.fixture(scope="session")
def pair_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding the prepared tiny source/target pair (``train_dict(pair_dir, ...)``)."""
    base = tmp_path_factory.mktemp("pair")
    prepared_pair(base)
    return base


@pytest.fixture()
def one_thread():
    """In-process training on one thread: fast on 2 shared cores, and the same numerics as cli_env()."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
