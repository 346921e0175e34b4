"""Security: no code runs from a crafted checkpoint, pseudo-label or config file; no shell injection through
config values.

Crafted files: a pickle whose ``__reduce__`` would create a marker file (three payloads: ``os.system``,
``builtins.exec``, ``builtins.open``), packed as a raw pickle, a torch zip or legacy file, or an object array in
``.npy`` / ``.npz``, is fed to every loader that reads such a file (``test_crafted_file``, one id per loader,
packing and payload). Each loader must refuse it with a one-line error naming the file, and the marker must
not exist. YAML configs with Python tags are refused the same way.

Shell injection: the workflow runs with ``results_dir`` and a dataset root holding ``$(...)``, backticks,
``;``, ``&``, ``|``, ``>``, quotes and spaces; every shell command quotes them (the marker files never appear
and each command's ``--config`` / ``--out`` / log arguments parse back to the intended paths), and an
experiment name with metacharacters is rejected with a clear message.
"""

from __future__ import annotations

import builtins
import os
import pickle
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch

from cpsl import workflow as W
from cpsl.config import ImportCheckpointConfig
from cpsl.data import pseudo
from cpsl.data.prepared import PreparedSplit
from cpsl.errors import CpslError
from cpsl.methods.selflabel import load_class_marginal, load_prototypes
from cpsl.models.checkpoint import load_checkpoint
from cpsl.models.weights import read_state_dict
from cpsl.steps import import_checkpoint
from tests.inference_fixtures import random_split
from tests.reliability_helpers import EVIL, error_line, folder_experiment, markers, run_cli, snakemake, write_yaml
from tests.train_helpers import make_folder_split

# ---------------------------------------------------------------------------------------------------------
# crafted pickles


class Payload:
    """Unpickling this calls ``how`` with an argument that creates ``marker``."""

    def __init__(self, how: str, marker: Path) -> None:
        self.how, self.marker = how, str(marker)

    def __reduce__(self):
        if self.how == "os.system":
            return os.system, (f"touch {shlex.quote(self.marker)}",)
        if self.how == "exec":
            return builtins.exec, (f"open({self.marker!r}, 'w').close()",)
        return builtins.open, (self.marker, "w")  # opening for writing creates the file


PAYLOADS = ("os.system", "exec", "open")


def _checkpoint_like(payload: Payload) -> dict:
    """A dict shaped like our checkpoint and like a reference .pkl, with the payload inside."""
    return {"format": "cpsl-checkpoint", "format_version": 1, "model_config": {"n_class": 19},
            "model": {"w": torch.zeros(1)}, "extra": {"note": payload},
            "ResNet101": {"model_state": {"w": torch.zeros(1)}, "prototypes_ema": payload}, "iter": 1}


def pack(kind: str, payload: Payload, path: Path) -> Path:
    """Write the payload in one of the packings a loader may be handed."""
    if kind == "pickle":
        with open(path, "wb") as fh:
            pickle.dump(_checkpoint_like(payload), fh, protocol=2)
    elif kind in ("torch-zip", "torch-legacy"):
        torch.save(_checkpoint_like(payload), path, _use_new_zipfile_serialization=kind == "torch-zip")
    else:
        arr = np.empty(2, dtype=object)
        arr[:] = [payload, payload]
        if kind == "npy-object":
            with open(path, "wb") as fh:
                np.save(fh, arr, allow_pickle=True)
        else:
            with open(path, "wb") as fh:
                np.savez(fh, q=arr)
    return path


@dataclass(frozen=True)
class Loader:
    name: str
    suffix: str
    packings: tuple[str, ...]
    load: Callable[[Path, Path], Any]   # (crafted file, temp folder) -> raises a CpslError
    reads: str = "crafted"              # the name the loader reads the file under


def _cli(step: str, settings: Callable[[Path, Path], dict]) -> Callable[[Path, Path], Any]:
    """Run ``cpsl <step>`` on a config naming the crafted file; raise its one-line error as a CpslError."""
    def run(path: Path, tmp: Path) -> None:
        config = write_yaml(tmp / f"{step}.yaml", settings(path, tmp))
        rc, err = run_cli(step, config, tmp / "out")
        assert rc == 2, err[-2000:]
        raise CpslError(error_line(err, step))
    return run


def _split(tmp: Path) -> Path:
    return random_split(tmp, n=1, size=(16, 24))


def _lab_stats(path: Path, tmp: Path) -> None:
    split = _split(tmp)
    os.replace(path, split / "lab_stats.npy")
    PreparedSplit(split)


def _hard(path: Path, tmp: Path) -> None:
    pseudo.load_hard(path.parent, path.stem)


ALL = ("pickle", "torch-zip", "torch-legacy")
LOADERS = [
    Loader("load_checkpoint", ".pt", ALL, lambda p, t: load_checkpoint(p)),
    Loader("import-checkpoint", ".pkl", ALL, lambda p, t: import_checkpoint.run(ImportCheckpointConfig(source=p),
                                                                              t / "imported")),
    Loader("cli-import-checkpoint", ".pkl", ("torch-zip",), _cli("import-checkpoint", lambda p, t: {"source": str(p)})),
    Loader("cli-evaluate-checkpoint", ".pt", ("torch-zip",), _cli("evaluate", lambda p, t: {
        "checkpoint": str(p), "data": str(_split(t)), "device": "cpu", "workers": 0, "progress": False})),
    Loader("model-init-weights", ".pth", ALL, lambda p, t: read_state_dict(p)),
    Loader("stage1-prototypes", ".pt", ALL, lambda p, t: load_prototypes(p, 19, 16)),
    Loader("stage1-class-distribution", ".npy", ("npy-object", "pickle"), lambda p, t: load_class_marginal(p, 19)),
    Loader("soft-pseudo-label", ".npz", ("npz-object", "npy-object", "pickle"),
           lambda p, t: pseudo.load_soft_quantized(p)),
    Loader("hard-pseudo-label", ".png", ("pickle",), _hard),
    Loader("prepared-lab-stats", ".npy", ("npy-object",), _lab_stats, reads="lab_stats"),
]
CRAFTED = [pytest.param(loader, packing, how, id=f"{loader.name}-{packing}-{how}")
           for loader in LOADERS for packing in loader.packings for how in PAYLOADS]


@pytest.mark.parametrize("loader, packing, how", CRAFTED)
def test_crafted_file(loader, packing, how, tmp_path):
    marker = tmp_path / "PWNED"
    crafted = pack(packing, Payload(how, marker), tmp_path / f"crafted{loader.suffix}")
    with pytest.raises(CpslError) as err:
        loader.load(crafted, tmp_path)
    message = str(err.value)
    assert "\n" not in message
    assert f"{loader.reads}{loader.suffix}: " in message, message  # names the file
    assert not marker.exists(), "the payload ran"
    assert markers(tmp_path) == []


def test_crafted_file_refusals_name_what_was_refused(tmp_path):
    """The checkpoint loaders say why: the global the pickle wanted (not a generic failure)."""
    marker = tmp_path / "PWNED"
    crafted = pack("torch-zip", Payload("os.system", marker), tmp_path / "crafted.pt")
    with pytest.raises(CpslError, match=r"crafted\.pt: refused: .*posix\.system is not allowed"):
        load_checkpoint(crafted)
    with pytest.raises(CpslError, match=r"crafted\.pt: refused: .*posix\.system is not allowed"):
        import_checkpoint.safe_load_reference(crafted)
    assert not marker.exists()


@pytest.mark.parametrize("reader", ["cpsl-step-config", "workflow-config"])
def test_yaml_with_python_tags_is_refused(tmp_path, reader):
    marker = tmp_path / "PWNED"
    path = tmp_path / "config.yaml"
    path.write_text(f"seed: !!python/object/apply:os.system ['touch {marker}']\n"
                    f"height: !!python/object/new:builtins.open ['{marker}', 'w']\n")
    if reader == "cpsl-step-config":
        rc, err = run_cli("synth", path, tmp_path / "out")
        assert rc == 2
        message = error_line(err, "synth")
    else:
        with pytest.raises(CpslError) as info:
            W.load_config_file(path)
        message = str(info.value)
    assert message.startswith(f"{path}: not valid YAML (could not determine a constructor for the tag")
    assert not marker.exists() and not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------
# shell injection through config values


def _shell_commands(text: str) -> list[list[str]]:
    """The shell commands Snakemake printed (printshellcmds), split into words and operators like the shell."""
    commands = []
    for line in text.splitlines():
        if "-m cpsl " in line and "--config" in line:
            lexer = shlex.shlex(line[line.index("OMP_NUM_THREADS"):], posix=True, punctuation_chars=True)
            lexer.whitespace_split = True
            commands.append(list(lexer))
    return commands


def _arguments(command: list[str]) -> list[str]:
    """The words after --config, --out and the > redirection."""
    return [command[i + 1] for i, word in enumerate(command[:-1]) if word in ("--config", "--out", ">")]


def test_no_shell_injection_through_results_dir_or_dataset_root(metachar_workflow):
    run = metachar_workflow
    assert run["result"].returncode == 0, run["result"].stderr[-3000:]
    assert markers(run["base"]) == []
    commands = _shell_commands(run["result"].stdout + run["result"].stderr)
    assert len(commands) == 4  # prepare x2, train, evaluate
    for command in commands:
        args = _arguments(command)
        assert len(args) == 3, command
        for arg in args:  # each path came through the shell as one word, exactly as configured
            assert arg.startswith(str(run["results"]) + os.sep) and Path(arg).exists(), arg


def test_every_rule_quotes_its_paths(tmp_path):
    """A dry run of the whole chain (synth, prepare, the six stages, their products, evaluate, collect) with
    ``results_dir`` holding metacharacters: every command's path arguments parse back to paths under it."""
    results = tmp_path / f"results {EVIL}"
    stages = {"source_only": {"max_iters": 2}, "warmup": {"max_iters": 2}, "oracle": {"max_iters": 2},
              "stage1": {"max_iters": 2}, "stage2": {"max_iters": 2}, "stage3": {"max_iters": 2}}
    config = write_yaml(tmp_path / "chain.yaml", {"results_dir": str(results),
                                                  "experiment_settings": {"demo": {"stages": stages}}})
    (tmp_path / "wd").mkdir()
    res = snakemake(tmp_path / "wd", config, "-n", "-p")
    assert res.returncode == 0, res.stderr[-3000:]
    commands = _shell_commands(res.stdout + res.stderr)
    steps = {command[command.index("cpsl") + 1] for command in commands}
    assert steps == {"synth", "prepare", "train", "evaluate", "pseudo-soft", "prototypes", "class-dist",
                     "pseudo-hard", "collect"}
    for command in commands:
        args = _arguments(command)
        assert len(args) == 3 and all(a == str(results) or a.startswith(str(results) + os.sep) for a in args), \
            command
    assert markers(tmp_path) == []


def test_experiment_name_with_shell_metacharacters_is_rejected(tmp_path):
    name = "x$(touch PWNED)`touch PWNED2`;y"
    root = make_folder_split(tmp_path / "data", n=2, hw=(8, 16))
    cfg = folder_experiment(root, tmp_path / "results", name=name)
    (tmp_path / "wd").mkdir()
    res = snakemake(tmp_path / "wd", write_yaml(tmp_path / "c.yaml", cfg), "-n")
    assert res.returncode == 1
    lines = [line for line in res.stderr.splitlines() if line.startswith("cpsl-pipeline: error: ")]
    assert len(lines) == 1 and repr(name) in lines[0] and "letters, digits" in lines[0], res.stderr[-2000:]
    assert markers(tmp_path) == [] and not (tmp_path / "results").exists()


def test_step_command_quotes_the_interpreter_path():
    python = f"/opt/my env/{EVIL}/bin/python"
    for gpu in (0, 1, 2):
        command = W.step_command(python, "train", 4, gpu)
        words = shlex.split(command.replace("&&", " && "))
        assert words.count(python) == (2 if gpu >= 1 else 1), command
