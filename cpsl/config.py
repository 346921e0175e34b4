"""Typed settings for every step, loaded from one resolved YAML file.

Each step has a dataclass; ``load(cls, mapping)`` builds it recursively, rejects unknown keys and values of the
wrong type, and names the offending key by its dotted path. Range checks live in each class's ``validate``.
The Snakefile writes the resolved YAML; ``python -m cpsl <step> --config FILE`` reads it.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from cpsl.errors import ConfigError

FORMATS = ("cityscapes", "gta5", "synthia", "folder")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check/convert ``value`` against the annotation ``tp``; raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: invalid value {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        item_tp = args[0] if args else Any
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
            return tuple(_convert(v, t, f"{key}[{i}]") for i, (v, t) in enumerate(zip(value, args)))
        items = [_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        ktp, vtp = args if args else (Any, Any)
        return {_convert(k, ktp, key): _convert(v, vtp, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return load(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if tp is Path:
        if not isinstance(value, (str, Path)) or str(value) == "":
            raise ConfigError(f"{key}: expected a path, got {value!r}")
        return Path(value)
    raise TypeError(f"unsupported annotation {_type_name(tp)} for {key}")


def load(cls: type, data: Any, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping; unknown keys and bad types raise ConfigError."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or '<config>'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        k = unknown[0]
        close = difflib.get_close_matches(str(k), list(fields), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{_join(prefix, k)}: unknown setting{hint}")
    kwargs = {}
    for name, f in fields.items():
        key = _join(prefix, name)
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{key}: required setting is missing")
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        validate(prefix)
    return obj


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else str(name)


def to_dict(obj: Any) -> Any:
    """Plain YAML-safe representation of a config dataclass (paths as strings, tuples as lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def read_yaml(path: str | Path) -> Any:
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as fh:
            return yaml.safe_load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None


def load_file(cls: type, path: str | Path) -> Any:
    """Read a resolved per-step YAML file into ``cls``; errors name the file and the key."""
    try:
        return load(cls, read_yaml(path))
    except ConfigError as err:
        if str(err).startswith(str(path)):
            raise
        raise ConfigError(f"{path}: {err}") from None


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


# ---------------------------------------------------------------------------------------------------------
# Step settings


@dataclass
class DatasetConfig:
    """One dataset split on disk, in one of the supported formats (the input of ``prepare``)."""

    format: Literal["cityscapes", "gta5", "synthia", "folder"]
    root: Path
    # cityscapes: train | val | test; gta5: all | train | val | test (train/val/test need split.mat);
    # synthia: all; folder: a sub-folder name under images/ and labels/, or "all" for the top level.
    split: str = "train"
    n_class: int = 19
    # Report problems (missing label, unreadable file, size mismatch, unknown id) and skip the image instead
    # of failing. The skipped files are listed in meta.json and on stderr.
    allow_skip: bool = False
    # Optional [height, width] every image must have (after any fixed resize of the format).
    expected_size: list[int] | None = None
    workers: int = 2

    def validate(self, prefix: str = "") -> None:
        _check(self.n_class in (19, 16, 13) or self.format == "folder", _join(prefix, "n_class"),
               f"must be 19, 16 or 13 for format {self.format!r} (got {self.n_class})")
        _check(1 <= self.n_class <= 254, _join(prefix, "n_class"), f"must be in 1..254 (got {self.n_class})")
        if self.expected_size is not None:
            _check(len(self.expected_size) == 2 and all(v > 0 for v in self.expected_size),
                   _join(prefix, "expected_size"), f"must be [height, width] > 0 (got {self.expected_size})")
        _check(self.workers >= 0, _join(prefix, "workers"), f"must be >= 0 (got {self.workers})")


@dataclass
class PrepareConfig:
    """Settings of ``cpsl prepare``: the dataset, and whether to compute per-image LAB statistics."""

    dataset: DatasetConfig
    lab_stats: bool = True


@dataclass
class SynthConfig:
    """Settings of ``cpsl synth``: the embedded synthetic domain pair."""

    seed: int = 0
    height: int = 128
    width: int = 256
    n_source: int = 300          # GTA5-layout source images (split.mat: train + held-out val)
    n_source_val: int = 60       # of which held out as the GTA5 "val" split
    n_target_train: int = 300    # Cityscapes-layout leftImg8bit/train
    n_target_val: int = 100      # Cityscapes-layout leftImg8bit/val
    workers: int = 2

    def validate(self, prefix: str = "") -> None:
        for name in ("height", "width", "n_source", "n_target_train", "n_target_val"):
            _check(getattr(self, name) > 0, _join(prefix, name), f"must be > 0 (got {getattr(self, name)})")
        _check(self.height >= 32 and self.width >= 32, _join(prefix, "height"), "images must be at least 32x32")
        _check(0 <= self.n_source_val < self.n_source, _join(prefix, "n_source_val"),
               f"must be in 0..n_source-1 (got {self.n_source_val})")
        _check(self.workers >= 0, _join(prefix, "workers"), f"must be >= 0 (got {self.workers})")


@dataclass
class ModelConfig:
    """The segmentation network (DeepLab-v2 + CPSL ASPP head) and its initial weights.

    ``init`` is a local file (never downloaded): a torchvision ImageNet ResNet state dict
    (``init_format: torchvision``, e.g. resnet101-5d3b4d8f.pth) or the SimCLRv2 R101 file of the reference
    (``init_format: simclr``, ``{'state_dict': {...}}`` with torchvision names, pretrained_models/r101_1x_sk0.pth).
    """

    backbone: Literal["resnet101", "resnet50", "resnet18"] = "resnet101"
    base_width: int = 64          # stem / stage-1 width; 64 for the standard networks, e.g. 16 for the demo
    head_channels: int = 256      # ASPP branch and feature width (prototype dimension)
    n_class: int = 19
    bn_pretrain: bool = False     # extra BatchNorm after layer4 (reference --bn_clr / --ema_bn)
    init: Path | None = None
    init_format: Literal["torchvision", "simclr"] = "torchvision"
    aspp_dilations: list[int] = field(default_factory=lambda: [6, 12, 18, 24])
    dropout: float = 0.1          # Dropout2d before the classifier (the features are taken after it)
    sync_bn: bool = True          # under DDP, convert BatchNorm to SyncBatchNorm (no effect otherwise)

    def validate(self, prefix: str = "") -> None:
        _check(1 <= self.n_class <= 254, _join(prefix, "n_class"), f"must be in 1..254 (got {self.n_class})")
        _check(self.base_width >= 1, _join(prefix, "base_width"), f"must be >= 1 (got {self.base_width})")
        _check(self.head_channels >= 4, _join(prefix, "head_channels"), f"must be >= 4 (got {self.head_channels})")
        _check(len(self.aspp_dilations) >= 1 and all(d >= 1 for d in self.aspp_dilations),
               _join(prefix, "aspp_dilations"), f"must be a non-empty list of integers >= 1 (got {self.aspp_dilations})")
        _check(0.0 <= self.dropout < 1.0, _join(prefix, "dropout"), f"must be in [0, 1) (got {self.dropout})")


@dataclass
class ImportCheckpointConfig:
    """Settings of ``cpsl import-checkpoint``: convert a released reference ``.pkl`` into ``checkpoint.pt``.

    ``n_class`` and ``bn_pretrain`` are read from the file; when set here they must agree with it.
    """

    source: Path
    n_class: int | None = None
    bn_pretrain: bool | None = None
    discriminator: bool = True    # also import 'FCDiscriminator' when the file has it (warm-up checkpoints)

    def validate(self, prefix: str = "") -> None:
        if self.n_class is not None:
            _check(1 <= self.n_class <= 254, _join(prefix, "n_class"), f"must be in 1..254 (got {self.n_class})")
