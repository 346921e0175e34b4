"""Where a step's output goes: whose folder ``--out`` is, staging, publishing, file modes.

Every step writes into one ``--out`` folder. Two kinds of step:

* **Replacing steps** (``synth``, ``prepare``, ``pseudo-soft``, ``prototypes``, ``class-dist``, ``pseudo-hard``)
  build their whole folder under a hidden staging name next to ``out`` and rename it to ``out`` at the end
  (``publish_dir``), replacing the previous ``out`` in one step.
* **In-place steps** (``train``, ``evaluate``, ``collect``, ``import-checkpoint``, ``fetch-weights``) write named
  files into ``out`` (atomically, file by file) and delete nothing but their own temp files.

A folder that a step made carries the marker file ``.cpsl-output.json`` (``{"steps": [...]}``), written into the
staging folder before it is published, or into ``out`` before an in-place step writes anything. The rules
(``check_out``, called by ``cpsl.cli`` before a step starts, and again by ``publish_dir``):

* ``out`` must not be a file;
* a replacing step replaces only a folder whose marker names the same step (or an empty folder); a folder
  without it (a user's folder, a dataset root) is refused, naming it, and nothing is touched;
* an in-place step writes only into a new or empty folder or one that a cpsl step made;
* ``out`` must not be an input of the step, lie inside an input folder, or (for a replacing step) contain one.

Outputs made before the marker existed are recognised by the ``run_info.json`` that every step records next to
its output (``cpsl.provenance.record_run``). Files are created with the permissions the umask allows
(``cpsl.provenance.new_file_mode``), not the 0600 of ``tempfile.mkstemp``, so that colleagues in a project
group can read results.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterable

import cpsl
from cpsl.errors import DataError
from cpsl.provenance import pid_running

MARKER = ".cpsl-output.json"
# A results folder of the workflow (results_dir) carries the marker with this name as its step.
WORKFLOW = "workflow"
# What the repository ships in its own results/ folder: README.md (whose first line holds REPOSITORY_SIGNATURE)
# and reference/ (the paper's and the peers' numbers as CSV files). A folder holding only these is the
# repository's results folder, which the workflow claims as its own (a fresh clone has no marker in it yet).
REPOSITORY_SIGNATURE = "<!-- cpsl-pipeline: the repository's results folder -->"
REPOSITORY_ENTRIES = ("README.md", "reference")


def _abs(path: str | Path) -> Path:
    return Path(os.path.abspath(Path(path).expanduser()))


def owner_steps(folder: str | Path) -> set[str]:
    """The cpsl steps that wrote ``folder``: from its marker, or from the ``run_info.json`` files (any prefix)
    that steps recorded there before the marker existed. Empty if none (not ours)."""
    folder = Path(folder)
    steps: set[str] = set()
    marker = folder / MARKER
    if marker.is_file():
        try:
            data = json.loads(marker.read_text(encoding="utf-8"))
            steps |= {str(s) for s in data.get("steps", [])}
        except (OSError, ValueError, AttributeError):
            pass
    try:
        records = [p for p in folder.iterdir() if p.name.endswith("run_info.json") and p.is_file()]
    except OSError:
        records = []
    for rec in records:
        try:
            info = json.loads(rec.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(info, dict) and "cpsl_version" in info and isinstance(info.get("step"), str):
            steps.add(info["step"])
    return steps


def is_repository_results(folder: str | Path) -> bool:
    """Whether ``folder`` holds nothing but what the repository ships in ``results/``: its README.md (first line
    ``REPOSITORY_SIGNATURE``) and optionally ``reference/`` with CSV files only."""
    folder = Path(folder)
    try:
        names = {p.name for p in folder.iterdir()}
        if "README.md" not in names or not names <= set(REPOSITORY_ENTRIES):
            return False
        with open(folder / "README.md", encoding="utf-8") as fh:
            if fh.readline().strip() != REPOSITORY_SIGNATURE:
                return False
        reference = folder / "reference"
        return "reference" not in names or (reference.is_dir() and not reference.is_symlink() and all(
            p.is_file() and p.suffix == ".csv" for p in reference.iterdir()))
    except (OSError, UnicodeDecodeError):
        return False


def write_marker(folder: str | Path, step: str) -> None:
    """Add ``step`` to ``folder``'s marker (created if missing)."""
    from cpsl.provenance import atomic_write_text

    folder = Path(folder)
    steps = owner_steps(folder) | {step}
    atomic_write_text(folder / MARKER, json.dumps({"steps": sorted(steps), "cpsl_version": cpsl.__version__})
                      + "\n")


def _is_empty_dir(path: Path) -> bool:
    try:
        return not any(path.iterdir())
    except OSError:
        return False


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def input_paths(cfg: Any) -> list[Path]:
    """Every path setting of a step's config (dataclass, recursively): the step's inputs."""
    found: list[Path] = []

    def walk(value: Any) -> None:
        if dataclasses.is_dataclass(value):
            for f in dataclasses.fields(value):
                walk(getattr(value, f.name))
        elif isinstance(value, Path):
            found.append(value)
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v)

    walk(cfg)
    return found


def check_out(out: str | Path, step: str, *, replaces: bool, inputs: Iterable[str | Path] = ()) -> None:
    """Refuse an ``out`` that is not the step's own (rules in the module docstring); DataError naming it."""
    out = _abs(out)
    tail = "choose another --out (nothing was changed)"
    if out.is_symlink() and not out.is_dir():
        raise DataError(f"{out}: --out is a link, not a folder; {tail}")
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: --out is a file, not a folder of cpsl {step}; {tail}")
    for raw in inputs:
        path = _abs(raw)
        if not path.exists():  # nothing there to protect (a missing input is the step's own error)
            continue
        if _within(out, path) and (path.is_dir() or out == path):
            where = "is" if out == path else "is inside"
            raise DataError(f"{out}: --out {where} an input of cpsl {step} ({path}); {tail}")
        if replaces and _within(path, out):
            raise DataError(f"{out}: --out holds an input of cpsl {step} ({path}), which replacing the folder "
                            f"would delete; {tail}")
    if not out.is_dir() or _is_empty_dir(out):
        return
    owners = owner_steps(out)
    if replaces and step not in owners:
        made = f" (it was made by cpsl {', '.join(sorted(owners))})" if owners else f" (no {MARKER} in it)"
        raise DataError(f"{out}: folder exists and was not written by cpsl {step}{made}; cpsl {step} replaces "
                        f"its --out and deletes nothing it did not make: {tail}, or remove the folder yourself")
    if not replaces and not owners and not is_repository_results(out):
        raise DataError(f"{out}: folder exists, is not empty and was not made by cpsl (no {MARKER} in it); "
                        f"cpsl {step} would write its files into it: {tail}")


def claim_dir(out: str | Path, step: str) -> Path:
    """Make ``out`` (checked with ``check_out``) the folder of an in-place step: create it, and mark it unless a
    cpsl step made it already (then nothing in it changes before the step writes its own files)."""
    out = _abs(out)
    out.mkdir(parents=True, exist_ok=True)
    if not owner_steps(out):
        write_marker(out, step)
    return out


def remove_path(path: Path) -> None:
    """Delete a file, link or folder tree if it exists (a leftover temp output of ours)."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def staging_dir(out: Path) -> Path:
    """The hidden staging folder of ``out`` for this process."""
    return out.parent / f".{out.name}.tmp-{os.getpid()}"


def remove_stale_staging(out: Path) -> None:
    """Delete the staging folders ``.<name>.tmp-<pid>`` (and ``.<name>.old-<pid>`` of ``publish_dir``) that runs
    killed before their cleanup (SIGKILL, a time limit) left next to ``out``; those of running processes stay."""
    out = Path(out)
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(?:tmp|old)-(\d+)")
    try:
        entries = list(out.parent.iterdir())
    except OSError:
        return
    for path in entries:
        m = pattern.fullmatch(path.name)
        if m and not pid_running(int(m.group(1))):
            remove_path(path)


def publish_dir(tmp: Path, out: Path, step: str) -> None:
    """Move a finished staging folder ``tmp`` to ``out`` (same parent folder), replacing an old ``out`` only now,
    and only if ``step`` made it (``check_out``); the marker is written into ``tmp`` first.

    Steps that write a folder build it under a hidden temp name and publish it at the end, so an interrupted
    step leaves neither a partial ``out`` nor a damaged previous one.
    """
    tmp, out = Path(tmp), Path(out)
    check_out(out, step, replaces=True)
    write_marker(tmp, step)
    if out.exists() or out.is_symlink():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        remove_path(old)
        os.replace(out, old)
        os.replace(tmp, out)
        remove_path(old)
    else:
        os.replace(tmp, out)
