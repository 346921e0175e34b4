"""What produced a result: the resolved config, the package version, the git commit, the seed, the command."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

import cpsl


def git_commit() -> str:
    """The commit of the checkout the package runs from (with '+dirty' if modified), or 'unknown'."""
    repo = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def temp_prefix(path: Path) -> str:
    """``mkstemp`` prefix of the temp file of an atomic write to ``path`` (suffix ``.tmp``): it holds the writer's
    process id, so that a later run can tell the temp file of a writer that was killed (``remove_stale_temps``)."""
    return f".{path.name}.{os.getpid()}-"


_UMASK: int | None = None


def new_file_mode() -> int:
    """The mode a newly created file gets under this process's umask (0o666 & ~umask)."""
    global _UMASK
    if _UMASK is None:
        current = os.umask(0o022)  # reading the umask means setting it: put it back at once
        os.umask(current)
        _UMASK = current
    return 0o666 & ~_UMASK


def fix_temp_mode(fd: int) -> None:
    """Give a ``tempfile.mkstemp`` file (created 0600) the mode a plain ``open`` would have given it."""
    try:
        os.fchmod(fd, new_file_mode())
    except OSError:
        pass


_TEMP_FILE = re.compile(r"\..+\.(\d+)-\w+\.tmp")


def pid_running(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (a temp file of a running writer must be left alone)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temps(folder: str | Path) -> None:
    """Delete the temp files (``temp_prefix``) that killed writers left in ``folder`` (SIGKILL, a time limit: no
    cleanup code runs), such as a half-written checkpoint; those of running processes stay."""
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        m = _TEMP_FILE.fullmatch(entry.name)
        if m and entry.is_file(follow_symlinks=False) and not pid_running(int(m.group(1))):
            try:
                os.unlink(entry.path)
            except FileNotFoundError:
                pass


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same directory and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix(path), suffix=".tmp")
    fix_temp_mode(fd)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_if_changed(path: str | Path, text: str) -> bool:
    """Atomically write ``text`` unless the file already holds exactly it (keeps mtimes stable)."""
    path = Path(path)
    try:
        if path.read_text(encoding="utf-8") == text:
            return False
    except (FileNotFoundError, UnicodeDecodeError):
        pass
    atomic_write_text(path, text)
    return True


def dump_yaml(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True)


def _installed_version(dist: str) -> str | None:
    """The package's ``__version__`` when the step imported it (torch's names its build, e.g. ``+cu130``),
    otherwise the installed distribution's version (without importing it)."""
    module = sys.modules.get(dist)
    if module is not None and isinstance(getattr(module, "__version__", None), str):
        return module.__version__
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def run_info(step: str, seed: int | None = None, device: str | None = None) -> dict:
    """What ran: the step, the package version and git commit, the seed, the command, where, and (for steps that
    run a network) the device it ran on; under the workflow's ``gpu: auto`` also what that resolved to and why
    (``cpsl.gpus.resolve_auto``, once per run)."""
    from cpsl.gpus import AUTO_ENV, AUTO_REASON_ENV

    info = {
        "step": step,
        "cpsl_version": cpsl.__version__,
        "git_commit": git_commit(),
        "seed": seed,
        "command": sys.argv,
        "python": platform.python_version(),
        "torch": _installed_version("torch"),
        "torchvision": _installed_version("torchvision"),
        "host": platform.node(),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if device is not None:
        info["device"] = device
    if os.environ.get(AUTO_ENV) in ("0", "1"):
        info["gpu_auto"] = {"resolved": int(os.environ[AUTO_ENV]), "reason": os.environ.get(AUTO_REASON_ENV, "")}
    return info


def record_run(out: str | Path, step: str, config: dict, seed: int | None = None, prefix: str = "",
               device: str | None = None) -> None:
    """Write ``<prefix>config.yaml`` (the resolved settings) and ``<prefix>run_info.json`` into ``out``."""
    out = Path(out)
    atomic_write_text(out / f"{prefix}config.yaml", dump_yaml(config))
    atomic_write_text(out / f"{prefix}run_info.json",
                      json.dumps(run_info(step, seed, device), indent=2) + "\n")
