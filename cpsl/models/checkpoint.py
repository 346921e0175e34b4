"""Our resumable checkpoint format (``checkpoint.pt``): save atomically, load safely, restore RNG states.

A checkpoint is a dict that ``torch.load(weights_only=True)`` accepts (tensors, containers, str/int/float/
bool/None only)::

    format          "cpsl-checkpoint"
    format_version  1
    cpsl_version    package version that wrote it
    model_config    plain dict of ModelConfig (cpsl.config.to_dict)
    model           student state dict
    ema_model, prototypes, prototypes_ema, optimizer, scheduler, discriminator, disc_optimizer   (optional)
    queues          stage 1's pixel queues: {"feats", "logits", "labels", "filled"}
    shares          stages 1-3, resumable checkpoints: the class-share monitor's open window and warning counters
                    {"counts", "streak", "since", "next_warn"} (cpsl.methods.shares)
    iteration       number of finished iterations
    rng             capture_rng_state(): python / numpy / torch / cuda generator states
    config          the resolved step config (plain dict)
    seed            int
    extra           free dict (e.g. the imported reference file's best_iou)

``save_checkpoint`` writes a temp file in the same directory, fsyncs it, renames it over the target and fsyncs
the directory, so an interrupted save never leaves a partial file under the final name; a failed write (a full
disk) is a one-line CheckpointError and leaves the previous file as it was, and the temp file of a killed run
is deleted by the next save into the same folder.
"""

from __future__ import annotations

import errno
import os
import pickle
import random
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import cpsl
from cpsl.config import ModelConfig, load, to_dict
from cpsl.errors import CheckpointError, ConfigError
from cpsl.provenance import fix_temp_mode, remove_stale_temps, temp_prefix

FORMAT = "cpsl-checkpoint"
FORMAT_VERSION = 1
OPTIONAL_KEYS = ("ema_model", "prototypes", "prototypes_ema", "queues", "shares", "optimizer", "scheduler",
                 "discriminator", "disc_optimizer", "iteration", "rng", "config", "seed", "extra")
_SAFE_LEAVES = (torch.Tensor, str, int, float, bool, type(None), torch.dtype, torch.device)


def short_error(err: BaseException) -> str:
    """The first sentence of an exception's message (torch's are long), for one-line errors."""
    text = str(err).strip()
    line = text.splitlines()[0] if text else type(err).__name__
    return line.split(". ", 1)[0].rstrip(".")[:300]


def refusal_reason(text: str) -> str:
    """The useful part of torch's weights_only refusal message (the refused global or opcode)."""
    m = re.search(r"GLOBAL ([\w.]+)", text)
    if m:
        return f"global {m.group(1)} is not allowed"
    m = re.search(r"Unsupported (?:operand|class|global)[^\n.]*", text)
    if m:
        return m.group(0).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1][:200] if lines else "unsupported content"


_STRING_OPS = frozenset({"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING",
                         "BINSTRING", "STRING"})
_PICKLED_TENSOR = "torch.storage._load_from_bytes"   # how pickle.dump (not torch.save) writes a tensor
_NO_PUSH_OPS = frozenset({"PROTO", "FRAME", "MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT", "STOP"})
RESAVE_HINT = ("to re-save it, load it only if you trust it, with torch.load(path, map_location='cpu', "
               "weights_only=False) (pickle.load for a file written with pickle.dump), keep only tensors, containers "
               "and numbers (vars() of a Namespace, .item() of numpy scalars, state_dict() of modules) and write "
               "that with torch.save(obj, new_path)")


def pickle_globals(path: str | Path) -> tuple[bool, int | None, list[str]]:
    """What a pickle file imports, read statically (``pickletools``: nothing is unpickled or run).

    Returns ``(is_zip, protocol, globals)``: ``globals`` are the ``module.name`` strings of its GLOBAL /
    STACK_GLOBAL / INST opcodes, in order of first use. A torch zip file is read from its ``data.pkl``; any other
    file as consecutive pickles from its start (a legacy torch file holds five, then raw storage bytes). A file
    that is not a pickle gives what was read before the first bad opcode.
    """
    import io
    import pickletools
    import zipfile

    path = Path(path)
    is_zip = zipfile.is_zipfile(path)
    if is_zip:
        with zipfile.ZipFile(path) as zf:
            names = [n for n in zf.namelist() if n.endswith("data.pkl")]
            data = zf.read(names[0]) if names else b""
    else:
        with open(path, "rb") as fh:
            data = fh.read()
    stream, protocol, found = io.BytesIO(data), None, []
    for _ in range(5 if not is_zip else 1):
        memo: dict[Any, Any] = {}
        recent: list[Any] = []
        try:
            for op, arg, _pos in pickletools.genops(stream):
                name = op.name
                if name == "PROTO" and protocol is None:
                    protocol = int(arg)
                if name in _STRING_OPS:
                    recent.append(arg)
                elif name in ("GET", "BINGET", "LONG_BINGET"):
                    recent.append(memo.get(arg))
                elif name == "MEMOIZE":
                    memo[len(memo)] = recent[-1] if recent else None
                elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                    memo[arg] = recent[-1] if recent else None
                elif name in ("GLOBAL", "INST"):
                    found.append(".".join(str(arg).split(" ", 1)))
                    recent.append(None)
                elif name == "STACK_GLOBAL":
                    mod, qual = (recent[-2], recent[-1]) if len(recent) >= 2 else (None, None)
                    found.append(f"{mod}.{qual}" if isinstance(mod, str) and isinstance(qual, str) else "?")
                    recent.append(None)
                elif name not in _NO_PUSH_OPS:
                    recent.append(None)
        except Exception:  # noqa: BLE001 - the end of the pickles (raw storage bytes) or a damaged file
            break
        if stream.tell() >= len(data):
            break
    return is_zip, protocol, list(dict.fromkeys(found))


def _allowed_global(name: str) -> bool:
    """Whether torch's restricted unpickler admits the global ``name`` (its defaults plus the safe globals
    registered at the call, e.g. import-checkpoint's numpy scalars)."""
    try:
        from torch import _weights_only_unpickler as wou
        allowed = set(wou._get_allowed_globals()) | set(wou._get_user_allowed_globals())
    except Exception:  # noqa: BLE001 - private torch API; fall back to the tensor machinery
        allowed = {"collections.OrderedDict"}
    return name in allowed or name.startswith("torch._utils._rebuild") or (
        name.startswith("torch.") and name.endswith("Storage"))


def refusal_message(path: str | Path, reason: str, allowed: str) -> str:
    """The one-line reason a restricted load of ``path`` was refused (``reason``: torch's, via ``refusal_reason``).

    ``allowed`` says what the loader accepts ("tensors, containers and numpy scalars"). Zip files keep torch's
    reason, which names the refused global. A legacy (non-zip) pickle is named as such, with the objects in it
    that the loader refuses (found by a static scan of its opcodes: torch's own reason is often just the
    unsupported opcode 149, the FRAME of pickle protocol 4+, which hides the content) and how to re-save it.
    """
    try:
        is_zip, protocol, found = pickle_globals(path)
    except Exception:  # noqa: BLE001
        is_zip, protocol, found = True, None, []
    bad = sorted((g for g in found if not _allowed_global(g)), key=lambda g: g == _PICKLED_TENSOR)
    if is_zip and "Unsupported operand" not in reason:
        return f"refused: the pickle references something other than {allowed} ({reason})"
    kind = "torch zip file" if is_zip else "legacy (non-zip) pickle"
    if bad:
        what = ", ".join(f"global {g} is not allowed" + (": tensors written with pickle.dump, not torch.save"
                                                          if g == _PICKLED_TENSOR else "") for g in bad[:3])
        what += f", and {len(bad) - 3} more" if len(bad) > 3 else ""
        return f"refused: a {kind} with something other than {allowed} in it ({what}); {RESAVE_HINT}"
    if protocol is not None and protocol >= 4:
        return (f"refused: a {kind} written with pickle protocol {protocol}, which torch's restricted loader "
                f"cannot read ({reason}); {RESAVE_HINT} (torch.save's default protocol is 2)")
    return f"refused: a {kind} with something other than {allowed} in it ({reason}); {RESAVE_HINT}"


def _check_safe(obj: Any, where: str) -> None:
    """Raise TypeError naming ``where`` if ``obj`` holds something ``weights_only`` loading would refuse."""
    if isinstance(obj, np.generic):  # np.float64 subclasses float but is refused by weights_only loading
        raise TypeError(f"checkpoint entry {where}: numpy scalar {obj!r} (use .item())")
    if isinstance(obj, _SAFE_LEAVES):
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"checkpoint entry {where}: key {k!r} is not a str or int")
            _check_safe(v, f"{where}.{k}")
        return
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_safe(v, f"{where}[{i}]")
        return
    raise TypeError(f"checkpoint entry {where}: {type(obj).__name__} cannot be stored (convert it to plain "
                    "Python values or tensors)")


def make_checkpoint(model: nn.Module, model_config: ModelConfig | dict, **parts: Any) -> dict[str, Any]:
    """Assemble a checkpoint dict from a model, its config and any of the optional parts (see module doc)."""
    unknown = sorted(set(parts) - set(OPTIONAL_KEYS))
    if unknown:
        raise TypeError(f"unknown checkpoint parts: {', '.join(unknown)}")
    cfg = to_dict(model_config) if not isinstance(model_config, dict) else dict(model_config)
    state: dict[str, Any] = {"format": FORMAT, "format_version": FORMAT_VERSION, "cpsl_version": cpsl.__version__,
                             "model_config": cfg, "model": model.state_dict()}
    state.update({k: v for k, v in parts.items() if v is not None})
    return state


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` atomically (temp file in the same dir, fsync, rename, fsync dir).

    ``format``, ``format_version`` and ``cpsl_version`` are filled in when absent. Tensors are moved to CPU and
    detached. Raises TypeError if ``state`` holds something that ``load_checkpoint`` could not read back.
    """
    path = Path(path)
    if "model" not in state or "model_config" not in state:
        raise TypeError("a checkpoint needs at least 'model' and 'model_config'")
    full = {"format": FORMAT, "format_version": FORMAT_VERSION, "cpsl_version": cpsl.__version__}
    full.update(_to_cpu(state))
    _check_safe(full, "checkpoint")
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path.parent)  # a half-written checkpoint of a killed run
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), suffix=".tmp", dir=path.parent)
    fix_temp_mode(fd)
    try:
        with os.fdopen(fd, "wb") as fh:
            sink = _Sink(fh)
            try:
                torch.save(full, sink)
            except RuntimeError:
                if sink.error is not None:  # torch reports a failed write as an opaque RuntimeError
                    raise sink.error from None
                raise
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError):  # a full disk, a quota, a read-only folder
            kept = f"the previous {path.name} is unchanged" if path.exists() else "nothing was written"
            raise CheckpointError(f"{path}: cannot write the checkpoint ({err.strerror or err}); {kept}") from None
        raise
    _fsync_dir(path.parent)
    return path


def link_checkpoint(source: str | Path, target: str | Path) -> bool:
    """Make ``target`` a hard link to ``source`` (same file, no second copy on disk), replacing ``target``
    atomically: a temp link in ``target``'s folder renamed over it. False, with ``target`` unchanged, where the
    file system has no hard links (or ``source`` is on another one); other errors raise CheckpointError."""
    source, target = Path(source), Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target.parent)
    tmp = target.parent / f"{temp_prefix(target)}link.tmp"
    try:
        tmp.unlink(missing_ok=True)
        os.link(source, tmp)
    except OSError as err:
        if err.errno in (errno.EXDEV, errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
            return False
        raise CheckpointError(f"{target}: cannot link it to {source} ({err.strerror or err})") from None
    try:
        os.replace(tmp, target)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"{target}: cannot link it to {source} ({err.strerror or err})") from None
    _fsync_dir(target.parent)
    return True


class _Sink:
    """The temp file as ``torch.save`` sees it: remembers the OSError of a failed write (disk full)."""

    def __init__(self, fh: Any) -> None:
        self.fh, self.error = fh, None

    def write(self, data: Any) -> int:
        try:
            return self.fh.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        self.fh.flush()


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _to_cpu(obj: Any) -> Any:
    """Tensors detached and on CPU, numpy scalars as Python numbers, containers copied."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        out = {k: _to_cpu(v) for k, v in obj.items()}
        if type(obj) is not dict:  # an OrderedDict state dict: keep its type and its _metadata (BN versions)
            out = type(obj)(out)
            if hasattr(obj, "_metadata"):
                out._metadata = obj._metadata
        return out
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(_to_cpu(v) for v in obj)
    return obj


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a ``checkpoint.pt`` safely (weights_only, CPU); one-line CheckpointError naming the file on failure."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*pickle protocol.*")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001
        msg = short_error(err)
        if isinstance(err, pickle.UnpicklingError) or "Weights only load failed" in msg:
            raise CheckpointError(f"{path}: refused: the file contains objects other than tensors and plain "
                                  f"values ({refusal_reason(str(err))}; a reference .pkl? use "
                                  "`cpsl import-checkpoint`)") from None
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or corrupt: {msg})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        hint = " (a reference .pkl? use `cpsl import-checkpoint`)" if isinstance(state, dict) and \
            "ResNet101" in state else ""
        raise CheckpointError(f"{path}: not a cpsl checkpoint (no format={FORMAT!r} entry){hint}")
    version = state.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise CheckpointError(f"{path}: bad format_version {version!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format_version {version} is newer than the supported version "
                              f"{FORMAT_VERSION} (written by cpsl {state.get('cpsl_version', '?')}); upgrade cpsl")
    for key in ("model", "model_config"):
        if not isinstance(state.get(key), dict):
            raise CheckpointError(f"{path}: checkpoint has no {key!r} entry")
    return state


def checkpoint_model_config(state: dict[str, Any], path: str | Path = "checkpoint") -> ModelConfig:
    """The ModelConfig stored in a loaded checkpoint (``init`` cleared: the weights come from the checkpoint)."""
    try:
        cfg = load(ModelConfig, dict(state["model_config"]), "model_config")
    except ConfigError as err:
        raise CheckpointError(f"{path}: bad model_config: {err}") from None
    cfg.init = None
    return cfg


def check_model_fits(state: dict[str, Any], cfg: ModelConfig, path: str | Path = "checkpoint",
                     key: str = "model") -> None:
    """Raise CheckpointError if the checkpoint's network differs from ``cfg`` (classes, backbone, widths ...).

    Example: ``checkpoint.pt has 16 classes, config model.n_class is 19``.
    """
    name = Path(path).name if str(path) else "checkpoint"
    have = checkpoint_model_config(state, path)
    if have.n_class != cfg.n_class:
        raise CheckpointError(f"{name} has {have.n_class} classes, config {key}.n_class is {cfg.n_class} ({path})")
    for field in ("backbone", "base_width", "head_channels", "bn_pretrain", "aspp_dilations", "mit_depths",
                  "mit_widths", "decoder_channels"):
        a, b = getattr(have, field), getattr(cfg, field)
        if _plain(a) != _plain(b):
            raise CheckpointError(f"{name} has {field}={a!r}, config {key}.{field} is {b!r} ({path})")


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value


def load_model_state(model: nn.Module, state_dict: dict[str, torch.Tensor], path: str | Path = "checkpoint",
                     what: str = "model") -> None:
    """``model.load_state_dict(state_dict, strict=True)`` with a one-line CheckpointError naming the file."""
    target = model.state_dict()
    missing = [k for k in target if k not in state_dict]
    unexpected = [k for k in state_dict if k not in target]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (first: {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (first: {unexpected[0]})")
        raise CheckpointError(f"{path}: {what} state dict does not fit the network: {'; '.join(parts)}")
    for k, v in state_dict.items():
        if tuple(v.shape) != tuple(target[k].shape):
            raise CheckpointError(f"{path}: {what} shape mismatch for {k}: file has {tuple(v.shape)}, "
                                  f"model has {tuple(target[k].shape)}")
    model.load_state_dict(state_dict, strict=True)


# ---------------------------------------------------------------------------------------------------------
# RNG states, in a weights_only-loadable form


def capture_rng_state() -> dict[str, Any]:
    """Python, numpy (legacy global), torch CPU and (when available) CUDA generator states as plain values."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": {"version": int(version), "state": [int(v) for v in internal],
                   "gauss": None if gauss is None else float(gauss)},
        "numpy": {"bit_generator": str(np_state["bit_generator"]),
                  "key": torch.from_numpy(np.asarray(np_state["state"]["key"], dtype=np.int64)),
                  "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                  "gauss": float(np_state["gauss"])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of ``capture_rng_state``; CUDA states are restored only when as many devices are visible."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    npst = state["numpy"]
    np.random.set_state({"bit_generator": npst["bit_generator"],
                         "state": {"key": np.asarray(npst["key"].numpy(), dtype=np.uint32), "pos": npst["pos"]},
                         "has_gauss": npst["has_gauss"], "gauss": npst["gauss"]})
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
        torch.cuda.set_rng_state_all(cuda)
