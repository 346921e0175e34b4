"""Shared pieces of the reliability and security suite (test_faults, test_bad_inputs, test_security).

* ``run_cli``: ``cpsl <step> --config FILE --out DIR`` in this process (``cpsl.cli.main``), with its stderr.
* ``error_line``: the one ``cpsl <step>: error: ...`` line a failed step prints (asserting it is one line).
* ``snapshot`` / ``leftovers``: every file under a folder with its bytes; temp files and staging folders
  (``.<name>.*.tmp``, ``.<name>.tmp-<pid>``, ``.<name>.old-<pid>``) left in or next to a folder.
* ``Victim``: a ``python -m cpsl ...`` subprocess whose stderr is read in the background, killed with a signal
  once a condition holds.
* ``snakemake`` and the session fixture ``metachar_workflow``: the real Snakefile run on a tiny folder-format
  experiment whose ``results_dir`` and dataset root hold spaces, quotes and shell metacharacters, including
  command substitutions that would create ``PWNED*`` marker files if any shell command were built unquoted.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import pytest
import yaml

from tests.train_helpers import cli_env, make_folder_split

REPO = Path(__file__).resolve().parent.parent
SNAKEMAKE = Path(sys.executable).parent / "snakemake"
# Path pieces that a shell would execute or split if a rule interpolated them unquoted.
EVIL = "a b $(touch PWNED1) `touch PWNED2`; touch PWNED3 & 'q' \"dq\" |x>y"
TEMP_NAME = re.compile(r"^\..+(\.tmp|\.tmp-\d+|\.old-\d+)$")


# ---------------------------------------------------------------------------------------------------------
# in-process CLI


def write_yaml(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def run_cli(step: str, config: Path, out: Path) -> tuple[int, str]:
    """``cpsl <step> --config CONFIG --out OUT`` in this process; (exit status, what it wrote to stderr)."""
    from cpsl import cli

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = cli.main([step, "--config", str(config), "--out", str(out)])
    return rc, err.getvalue()


def error_line(stderr: str, step: str) -> str:
    """The message of the ``cpsl <step>: error: <message>`` line, which must be the last thing written and one
    line (progress bars before it are fine)."""
    head = f"cpsl {step}: error: "
    assert head in stderr, f"no error line in:\n{stderr[-2000:]}"
    tail = stderr[stderr.index(head) + len(head):].rstrip("\n")
    assert "\n" not in tail and "\r" not in tail, f"error is not one line:\n{tail[:3000]}"
    return tail


# ---------------------------------------------------------------------------------------------------------
# files


def snapshot(root: Path) -> dict[str, bytes]:
    """``{relative path: bytes}`` of every file under ``root`` (empty if it does not exist)."""
    root = Path(root)
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def outputs(root: Path) -> dict[str, bytes]:
    """``snapshot`` without temp files (those of a write cut by a kill are not outputs; a rerun removes them)."""
    return {rel: data for rel, data in snapshot(root).items() if not TEMP_NAME.match(Path(rel).name)}


def leftovers(out: Path) -> list[str]:
    """Temp files or staging folders inside ``out`` or next to it (names of the atomic-write helpers)."""
    out = Path(out)
    found = [str(p) for p in out.rglob(".*") if TEMP_NAME.match(p.name)] if out.is_dir() else []
    if out.parent.is_dir():
        found += [str(p) for p in out.parent.glob(f".{out.name}.*") if TEMP_NAME.match(p.name)]
    return sorted(found)


# ---------------------------------------------------------------------------------------------------------
# subprocesses to kill


class Victim:
    """``python -m cpsl <step> --config CONFIG --out OUT`` in a subprocess, stderr collected by a thread."""

    def __init__(self, step: str, config: Path, out: Path) -> None:
        self.step = step
        cmd = [sys.executable, "-m", "cpsl", step, "--config", str(config), "--out", str(out)]
        self.started, self.started_wall = time.monotonic(), time.time()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=cli_env())
        self._chunks: list[bytes] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        fd = self.proc.stderr.fileno()
        while chunk := os.read(fd, 65536):
            self._chunks.append(chunk)

    @property
    def stderr(self) -> str:
        return b"".join(self._chunks).decode(errors="replace")

    def kill_when(self, ready: Callable[[], bool], sig: signal.Signals, timeout: float = 180.0) -> None:
        """Send ``sig`` as soon as ``ready()`` holds (polled every 2 ms), then wait for the process; fail the test
        if the process ended on its own first (the kill would not have tested anything)."""
        deadline, fired = time.monotonic() + timeout, False
        while self.proc.poll() is None:
            if ready():
                self.proc.send_signal(sig)
                fired = True
                break
            if time.monotonic() > deadline:
                self.proc.kill()
                break
            time.sleep(0.002)
        self.proc.wait()
        self._reader.join(timeout=10)
        assert fired and self.proc.returncode == -sig, (
            f"expected death by {sig.name} when the trigger fired (fired: {fired}), got exit status "
            f"{self.proc.returncode}:\n{self.stderr[-3000:]}")


# ---------------------------------------------------------------------------------------------------------
# Snakemake


def snakemake_env(tmp: Path) -> dict[str, str]:
    """The environment of a local Snakemake run. The SLURM executor plugin runs ``scontrol show config`` when
    Snakemake starts; on a machine with the SLURM client but no controller that waits 10 s for nothing, so a stub
    that fails at once comes first on PATH (local runs never use SLURM)."""
    stub = tmp / "no-slurm-bin"
    stub.mkdir(exist_ok=True)
    (stub / "scontrol").write_text("#!/bin/sh\nexit 1\n")
    (stub / "scontrol").chmod(0o755)
    return dict(os.environ, PATH=f"{stub}{os.pathsep}{os.environ.get('PATH', '')}", OMP_NUM_THREADS="1")


def snakemake(workdir: Path, configfile: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """The real Snakefile with the shipped config.yaml and ``configfile`` over it, in ``workdir``."""
    cmd = [str(SNAKEMAKE), "-s", str(REPO / "Snakefile"), "-d", str(workdir), "--configfile",
           str(REPO / "config.yaml"), str(configfile), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=snakemake_env(workdir.parent),
                          cwd=workdir.parent)


def folder_experiment(root: Path, results_dir: Path, name: str = "inj") -> dict:
    """A config (over config.yaml) with one experiment on a folder-format dataset: the tiny model, 2 iterations."""
    roles = ("source", "target_train", "target_val")
    return {
        "experiments": [name],
        "results_dir": str(results_dir),
        "resources": {kind: {"threads": 1} for kind in ("synth", "prepare", "train", "evaluate", "stage_product",
                                                         "collect")},
        "experiment_settings": {name: {
            "n_class": 4,
            "datasets": {role: {"format": "folder", "root": str(root), "split": "train", "workers": 0}
                         for role in roles},
            "model": {"backbone": "resnet18", "base_width": 8, "head_channels": 16},
            "train": {"data": {"crop": [32, 64], "resize": 80, "batch_size": 2, "workers": 0},
                      "checkpoint_interval": 1, "log_interval": 1},
            "stages": {"source_only": {"max_iters": 2}},
            "inference": {"batch_size": 2, "workers": 0, "progress": False},
        }},
    }


def markers(*roots: Path) -> list[str]:
    """Files whose name starts with PWNED under any of ``roots``, or in the current folder or the repository
    (what an injected command would create: the shell of a job runs in the Snakemake working directory)."""
    found = {p for root in roots if root.exists() for p in root.rglob("PWNED*")}
    found |= {*Path.cwd().glob("PWNED*"), *REPO.glob("PWNED*")}
    return sorted(map(str, found))


@pytest.fixture(scope="session")
def metachar_workflow(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One real workflow run (prepare x2, train, evaluate: each a shell command of the rules) with
    ``results_dir`` and the dataset root named ``EVIL``, in a working directory with a space in its name.

    Returns the paths and the Snakemake result; the tests check the outputs and that no marker appeared.
    """
    base = tmp_path_factory.mktemp("metachar")
    workdir = base / "work dir"
    workdir.mkdir()
    root = make_folder_split(base / f"data {EVIL}", n=4)
    results = base / f"results {EVIL}"
    config = write_yaml(base / "metachar.yaml", folder_experiment(root, results))
    target = results / "inj" / "seed0" / "source_only" / "metrics.json"
    res = snakemake(workdir, config, "--cores", "2", str(target))
    return {"base": base, "workdir": workdir, "root": root, "results": results, "target": target,
            "config": config, "result": res}
