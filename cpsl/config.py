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
        if len(errors) == 1:
            raise ConfigError(errors[0])
        # each alternative's complaint without the key: "'yes' is not one of 'auto'; expected true or false, ..."
        why = "; ".join(err.split(": ", 1)[-1] for err in errors)
        raise ConfigError(f"{key}: invalid value {value!r} ({why})")
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
    # false: an unlabelled split (real target images usually have no annotations): images only, no labels are
    # read. It serves the warm-up, the pseudo labels and stages 1-3; it cannot be evaluated on, nor train the
    # oracle.
    labels: bool = True
    # 16-bit images (microscopy, remote sensing) become 8-bit as value * 255 / (2**image_bits - 1), clipped; the
    # rule and the bits the data actually use are recorded in meta.json (a warning when they use fewer).
    image_bits: int = 16
    # Images with both sides below min_side are refused (allow_skip: skipped): with fewer than 7 pixels on both
    # sides the network's output (stride 8) is a single pixel, on which it fails. 1 turns the check off.
    min_side: int = 7

    def validate(self, prefix: str = "") -> None:
        _check(self.n_class in (19, 16, 13) or self.format == "folder", _join(prefix, "n_class"),
               f"must be 19, 16 or 13 for format {self.format!r} (got {self.n_class})")
        _check(1 <= self.n_class <= 255, _join(prefix, "n_class"), f"must be in 1..255 (got {self.n_class})")
        if self.expected_size is not None:
            _check(len(self.expected_size) == 2 and all(v > 0 for v in self.expected_size),
                   _join(prefix, "expected_size"), f"must be [height, width] > 0 (got {self.expected_size})")
        _check(self.workers >= 0, _join(prefix, "workers"), f"must be >= 0 (got {self.workers})")
        _check(8 <= self.image_bits <= 16, _join(prefix, "image_bits"), f"must be in 8..16 (got {self.image_bits})")
        _check(self.min_side >= 1, _join(prefix, "min_side"), f"must be >= 1 (got {self.min_side})")


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


RANDOM_INIT = "random"             # ``model.init: random``: random initial weights, said explicitly
IMAGENET_INIT = "imagenet"         # ``model.init: imagenet``: torchvision's file, fetched by the workflow
LARGE_BACKBONES = ("resnet101", "resnet50", "mit_b1", "mit_b2", "mit_b3", "mit_b4", "mit_b5")
MIT_HEADS = (1, 2, 5, 8)   # attention heads of the four MiT stages (all variants; cpsl.models.mit)


@dataclass
class ModelConfig:
    """The segmentation network (DeepLab-v2 + CPSL ASPP head, or ``mit_b0`` ... ``mit_b5``: SegFormer's Mix
    Transformer + MLP head, cpsl.models.mit) and its initial weights.

    ``init`` is a local file (never downloaded): a torchvision ImageNet ResNet state dict
    (``init_format: torchvision``, e.g. resnet101-5d3b4d8f.pth) or the SimCLRv2 R101 file of the reference
    (``init_format: simclr``, ``{'state_dict': {...}}`` with torchvision names, pretrained_models/r101_1x_sk0.pth)
    or one of our own ``checkpoint.pt`` files, whose weights are taken without the classifier
    (``init_format: checkpoint``; in the workflow, ``init: "@<stage>"`` names that stage's final checkpoint).
    ``init: random`` starts from random weights on purpose: a training stage with an ImageNet-scale backbone
    (``resnet101``, ``resnet50``) and neither ``init`` nor ``init_checkpoint`` is refused, since 90,000
    iterations from random weights is almost never what was meant. MiT backbones take the NVlabs ImageNet file
    (``init_format: nvlabs_mit``), a Hugging Face SegFormer folder (``hf_segformer``, e.g. a copy of
    nvidia/mit-b5) or a checkpoint; B1-B5 are refused without ``init`` like ResNet-101.
    """

    backbone: Literal["resnet101", "resnet50", "resnet18", "mit_b0", "mit_b1", "mit_b2", "mit_b3", "mit_b4",
                      "mit_b5"] = "resnet101"
    base_width: int = 64          # stem / stage-1 width; 64 for the standard networks, e.g. 16 for the demo
    head_channels: int = 256      # ASPP branch and feature width (prototype dimension)
    n_class: int = 19
    bn_pretrain: bool = False     # extra BatchNorm after layer4 (reference --bn_clr / --ema_bn)
    init: Path | None = None
    init_format: Literal["torchvision", "simclr", "checkpoint", "nvlabs_mit", "hf_segformer"] = "torchvision"
    aspp_dilations: list[int] = field(default_factory=lambda: [6, 12, 18, 24])
    dropout: float = 0.1          # Dropout2d before the classifier (the features are taken after it)
    sync_bn: bool = True          # under DDP, convert BatchNorm to SyncBatchNorm (no effect otherwise)
    # MiT (SegFormer) backbones (cpsl.models.mit): None = the published depths / widths of model.backbone (tiny
    # networks for tests and demos set both); decoder_channels: the MLP head's width (None: 256 for mit_b0,
    # 768 for the others); drop_path: the encoder's stochastic depth (0 at the first block to this at the last).
    mit_depths: list[int] | None = None
    mit_widths: list[int] | None = None
    decoder_channels: int | None = None
    drop_path: float = 0.1

    @property
    def is_mit(self) -> bool:
        return self.backbone.startswith("mit_")

    @property
    def init_file(self) -> Path | None:
        """The file of initial weights (None for random weights: ``init`` unset or ``random``)."""
        return None if self.init is None or str(self.init) == RANDOM_INIT else self.init

    def validate(self, prefix: str = "") -> None:
        _check(1 <= self.n_class <= 255, _join(prefix, "n_class"), f"must be in 1..255 (got {self.n_class})")
        _check(self.base_width >= 1, _join(prefix, "base_width"), f"must be >= 1 (got {self.base_width})")
        _check(self.head_channels >= 4, _join(prefix, "head_channels"), f"must be >= 4 (got {self.head_channels})")
        _check(len(self.aspp_dilations) >= 1 and all(d >= 1 for d in self.aspp_dilations),
               _join(prefix, "aspp_dilations"),
               f"must be a non-empty list of integers >= 1 (got {self.aspp_dilations})")
        _check(0.0 <= self.dropout < 1.0, _join(prefix, "dropout"), f"must be in [0, 1) (got {self.dropout})")
        _check(self.is_mit or self.init_format not in ("nvlabs_mit", "hf_segformer"), _join(prefix, "init_format"),
               f"{self.init_format!r} needs an MiT backbone (model.backbone is {self.backbone!r})")
        if self.is_mit:
            self._validate_mit(prefix)

    def _validate_mit(self, prefix: str) -> None:
        _check(str(self.init) != IMAGENET_INIT, _join(prefix, "init"), f"{IMAGENET_INIT!r} means torchvision's "
               f"ResNet weights; for {self.backbone} give the NVlabs ImageNet file (e.g. {self.backbone}.pth) with "
               "init_format: nvlabs_mit")
        _check(not self.bn_pretrain, _join(prefix, "bn_pretrain"), f"not supported with {self.backbone} (the MiT "
               "head reads all four stages; there is no single backbone output to normalise)")
        _check(self.init_format in ("nvlabs_mit", "hf_segformer", "checkpoint") or self.init_file is None,
               _join(prefix, "init_format"), f"must be 'nvlabs_mit', 'hf_segformer' or 'checkpoint' for "
               f"{self.backbone} (got {self.init_format!r})")
        if self.mit_depths is not None:
            _check(len(self.mit_depths) == 4 and all(d >= 1 for d in self.mit_depths), _join(prefix, "mit_depths"),
                   f"must be 4 integers >= 1 (got {self.mit_depths})")
        if self.mit_widths is not None:
            _check(len(self.mit_widths) == 4 and all(w >= 1 and w % h == 0
                                                     for w, h in zip(self.mit_widths, MIT_HEADS)),
                   _join(prefix, "mit_widths"), f"must be 4 integers divisible by the heads {list(MIT_HEADS)} "
                   f"(got {self.mit_widths})")
        if self.decoder_channels is not None:
            _check(self.decoder_channels >= 1, _join(prefix, "decoder_channels"),
                   f"must be >= 1 (got {self.decoder_channels})")
        _check(0.0 <= self.drop_path < 1.0, _join(prefix, "drop_path"), f"must be in [0, 1) (got {self.drop_path})")


@dataclass
class FetchWeightsConfig:
    """Settings of ``cpsl fetch-weights``: torchvision's ImageNet weights of ``backbone`` (``model.init:
    imagenet``), from ``url`` when set (a mirror; its file name carries the hash that is checked)."""

    backbone: Literal["resnet101", "resnet50", "resnet18"] = "resnet101"
    url: str | None = None
    progress: bool = True


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
            _check(1 <= self.n_class <= 255, _join(prefix, "n_class"), f"must be in 1..255 (got {self.n_class})")


# ---------------------------------------------------------------------------------------------------------
# Inference steps (evaluate, pseudo-soft, pseudo-hard, prototypes, class-dist): see cpsl/inference.py


@dataclass(kw_only=True)
class InferenceSettings:
    """Settings shared by every inference step: the model file, the prepared split, and how to run.

    The network (backbone, ``n_class``, ``bn_pretrain`` ...) is read from the checkpoint's ``model_config``;
    nothing about it is a setting here. Under ``torchrun`` each rank handles images ``rank, rank+W, ...``.
    """

    checkpoint: Path              # our checkpoint.pt (reference .pkl files: convert with `cpsl import-checkpoint`)
    data: Path                    # a prepared split (output folder of `cpsl prepare`)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    batch_size: int = 1           # images per forward pass (per process)
    workers: int = 2              # DataLoader worker processes that decode images (0 = in this process)
    amp: bool = False             # bfloat16 autocast (on CUDA float16 where the GPU has no bf16)
    progress: bool = True         # tqdm progress bar on stderr (rank 0)

    def validate(self, prefix: str = "") -> None:
        _check(self.batch_size >= 1, _join(prefix, "batch_size"), f"must be >= 1 (got {self.batch_size})")
        _check(self.workers >= 0, _join(prefix, "workers"), f"must be >= 0 (got {self.workers})")


@dataclass(kw_only=True)
class EvaluateConfig(InferenceSettings):
    """Settings of ``cpsl evaluate``: mIoU of a checkpoint on a prepared (validation) split.

    ``stage``, ``experiment`` and ``seed`` are only recorded in metrics.json; when unset they are taken from the
    checkpoint (its ``config`` / ``seed`` entries), else "unknown" / 0. Reference protocol: single scale, no
    flip, logits upsampled bilinearly (align_corners=True) to the label size, then argmax.
    """

    stage: str | None = None
    experiment: str | None = None
    seed: int | None = None
    selection: Literal["last", "best_on_val"] = "last"   # "best_on_val" writes metrics_best.json instead
    flip: bool = False            # also average the horizontally flipped pass (probabilities)
    input_size: list[int] | None = None   # [height, width] to resize images to before the model
    align_corners: bool = True
    samples: int = 4              # predictions of the first N images saved in the Cityscapes palette (samples/)

    def validate(self, prefix: str = "") -> None:
        super().validate(prefix)
        if self.input_size is not None:
            _check(len(self.input_size) == 2 and all(v >= 8 for v in self.input_size),
                   _join(prefix, "input_size"), f"must be [height, width], each >= 8 (got {self.input_size})")
        _check(self.samples >= 0, _join(prefix, "samples"), f"must be >= 0 (got {self.samples})")
        for name in ("stage", "experiment"):
            value = getattr(self, name)
            _check(value is None or (value.strip() != "" and "/" not in value), _join(prefix, name),
                   f"must be a non-empty name without '/' (got {value!r})")


@dataclass(kw_only=True)
class PseudoSoftConfig(InferenceSettings):
    """Settings of ``cpsl pseudo-soft``: quantised class probabilities at the model's output resolution
    (reference ``generate_pseudo_label.py --soft``: no flip, full-size input). Format: cpsl.data.pseudo.

    ``grid_stride: 8`` (default) stores them on DeepLab-v2's stride-8 grid (129 x 257 for 1024 x 2048) when the
    model's grid is finer: a stride-4 MiT's probabilities are resized to it bilinearly (corner samples on the
    corner pixels, ``align_corners=True``, the convention stage 1 reads them with), so files and the stage-1
    sample build cost what they cost for DeepLab-v2 instead of 3.2x / 2.3x (benchmarks/mit_stride.py). A
    stride-8 model's output is stored as it is. ``null``: the model's own grid.
    """

    grid_stride: int | None = 8

    def validate(self, prefix: str = "") -> None:
        super().validate(prefix)
        _check(self.grid_stride in (None, 8), _join(prefix, "grid_stride"),
               f"must be unset (the model's grid) or 8 (got {self.grid_stride})")


@dataclass(kw_only=True)
class PseudoHardConfig(InferenceSettings):
    """Settings of ``cpsl pseudo-hard``: flip-averaged argmax labels and confidences at label resolution
    (reference ``generate_pseudo_label.py --flip``). The confidence threshold is applied when loading."""

    flip: bool = True
    color: bool = True            # also write <name>_color.png (Cityscapes palette)
    align_corners: bool = True


@dataclass(kw_only=True)
class PrototypesConfig(InferenceSettings):
    """Settings of ``cpsl prototypes``: class-mean features of the model's own predictions (spec 3.3).

    ``pixel`` (default): sum of features / number of pixels per predicted class. ``image_mean`` (the
    reference): per image and class with >= ``min_pixels`` predicted pixels, that image's class-mean vector,
    folded into a running mean in image order whose count is capped at ``cap`` (an EMA beyond it); the
    sequence of vectors is replayed ``passes`` times (the reference makes 4 identical passes).
    """

    mode: Literal["pixel", "image_mean"] = "pixel"
    min_pixels: int = 10
    cap: int = 3000
    passes: int = 1

    def validate(self, prefix: str = "") -> None:
        super().validate(prefix)
        _check(self.min_pixels >= 1, _join(prefix, "min_pixels"), f"must be >= 1 (got {self.min_pixels})")
        _check(self.cap >= 1, _join(prefix, "cap"), f"must be >= 1 (got {self.cap})")
        _check(self.passes >= 1, _join(prefix, "passes"), f"must be >= 1 (got {self.passes})")


@dataclass(kw_only=True)
class ClassDistConfig(InferenceSettings):
    """Settings of ``cpsl class-dist``: the predicted class marginal at the model's output resolution
    (reference ``generate_class_distribution.py``)."""


# ---------------------------------------------------------------------------------------------------------
# Training (cpsl train): source_only, warmup, oracle; later stages add their own sections

TRAIN_STAGES = ("source_only", "warmup", "oracle", "stage1", "stage2", "stage3")


@dataclass
class TrainDataConfig:
    """Training data: prepared splits (output folders of ``cpsl prepare``) and the weak augmentation.

    ``source`` is needed by source_only and warmup, ``target`` (the target *train* split) by warmup and by
    oracle, which trains on its labels. Weak augmentation (spec 1.5): RandomSized scales the image to a width
    of ``U(scale) * resize`` keeping its aspect ratio (``resize: null`` = image width * 2200/2048, the
    reference's setting relative to 2048-wide images), then RandomCrop ``crop`` = [height, width], then a
    horizontal flip with probability ``flip``. ``batch_size`` is the global batch (split over DDP ranks), and so
    is ``workers``: the DataLoader worker processes of each loader for the whole job, ``workers // ranks`` (at
    least 1) per rank. ``lab_transfer``: CPSL's LAB colour transfer of every source image to the statistics of
    a random target image (spec 1.4; needs the target split prepared with lab_stats); on in the paper presets.
    ``random_colors``: redraw the colours of every labelled training image (channel order, inversion, gain,
    gamma, greyscale, blur, noise: ``transforms.random_colors``), so that the network learns shape and layout
    rather than the source palette; not in the reference. The demo's source-only model trains with it and
    initialises the warm-up, standing in for the ImageNet weights that the paper presets start from.
    """

    source: Path | None = None
    target: Path | None = None
    crop: list[int] = field(default_factory=lambda: [512, 896])
    resize: int | None = None
    scale: list[float] = field(default_factory=lambda: [0.5, 1.5])
    flip: float = 0.5
    batch_size: int = 4
    workers: int = 4
    lab_transfer: bool = False
    random_colors: bool = False

    def validate(self, prefix: str = "") -> None:
        _check(len(self.crop) == 2 and all(v >= 8 for v in self.crop), _join(prefix, "crop"),
               f"must be [height, width], each >= 8 (got {self.crop})")
        if self.resize is not None:
            _check(self.resize >= 8, _join(prefix, "resize"), f"must be >= 8 or null (got {self.resize})")
        _check(len(self.scale) == 2 and 0 < self.scale[0] <= self.scale[1], _join(prefix, "scale"),
               f"must be [low, high] with 0 < low <= high (got {self.scale})")
        _check(0.0 <= self.flip <= 1.0, _join(prefix, "flip"), f"must be in [0, 1] (got {self.flip})")
        _check(self.batch_size >= 1, _join(prefix, "batch_size"), f"must be >= 1 (got {self.batch_size})")
        _check(self.workers >= 0, _join(prefix, "workers"), f"must be >= 0 (got {self.workers})")


@dataclass
class OptimConfig:
    """SGD (or AdamW) on the student with backbone/head groups and the poly schedule (spec 2.3).

    Group learning rates: backbone ``lr * backbone_lr_mult``, head (layer5, bn_pretrain) ``lr * head_lr_mult``.
    ``backbone_lr_mult`` is 1.0 by default (each parameter listed once, the corrected behaviour); the paper
    presets use 3.0, which reproduces the reference's *effective* backbone learning rate and weight decay: the
    reference lists every backbone parameter about three times in its optimizer (spec 7 item 1).
    The schedule is ``lr_g * max(1 - t / max_iters, 0) ** poly_power`` with t the steps taken so far.
    """

    lr: float = 2.5e-4
    momentum: float = 0.9
    weight_decay: float = 2e-4
    head_lr_mult: float = 10.0
    backbone_lr_mult: float = 1.0
    poly_power: float = 0.9
    # The transformer recipe (DAFormer: adamw, lr 6e-5, weight_decay 0.01, head_lr_mult 10, norm_decay_mult 0,
    # warmup_iters 1500, warmup_ratio 1e-6). ``name``: sgd (momentum) or adamw (betas). ``norm_decay_mult``
    # scales the weight decay of normalisation layers' parameters (LayerNorm, GroupNorm, BatchNorm), which then
    # get groups of their own (``backbone_norm``, ``head_norm``); 1.0 keeps the two groups. The learning rate
    # rises linearly from ``warmup_ratio`` x to 1 x over ``warmup_iters`` steps (times the poly factor).
    name: Literal["sgd", "adamw"] = "sgd"
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    norm_decay_mult: float = 1.0
    warmup_iters: int = 0
    warmup_ratio: float = 1e-6

    def validate(self, prefix: str = "") -> None:
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), _join(prefix, "betas"),
               f"must be two numbers in [0, 1) (got {self.betas})")
        _check(self.norm_decay_mult >= 0, _join(prefix, "norm_decay_mult"),
               f"must be >= 0 (got {self.norm_decay_mult})")
        _check(self.warmup_iters >= 0, _join(prefix, "warmup_iters"), f"must be >= 0 (got {self.warmup_iters})")
        _check(0 <= self.warmup_ratio <= 1, _join(prefix, "warmup_ratio"),
               f"must be in [0, 1] (got {self.warmup_ratio})")
        _check(self.lr > 0, _join(prefix, "lr"), f"must be > 0 (got {self.lr})")
        _check(0.0 <= self.momentum < 1.0, _join(prefix, "momentum"), f"must be in [0, 1) (got {self.momentum})")
        _check(self.weight_decay >= 0, _join(prefix, "weight_decay"), f"must be >= 0 (got {self.weight_decay})")
        for name in ("head_lr_mult", "backbone_lr_mult"):
            _check(getattr(self, name) >= 0, _join(prefix, name), f"must be >= 0 (got {getattr(self, name)})")
        _check(self.poly_power >= 0, _join(prefix, "poly_power"), f"must be >= 0 (got {self.poly_power})")


@dataclass
class WarmupConfig:
    """Warm-up (spec 3.0): source CE + output-space adversarial loss with the FCDiscriminator.

    ``adv_weight`` multiplies the generator's adversarial term; ``gan``: ``LS`` (MSE, the reference default) or
    ``vanilla`` (BCE with logits). The discriminator uses Adam(``disc_lr``, ``disc_betas``) with the same poly
    schedule; ``disc_width`` is its first conv width (64 in the reference).
    """

    adv_weight: float = 0.01
    gan: Literal["LS", "vanilla"] = "LS"
    disc_lr: float = 1e-4
    disc_betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    disc_width: int = 64

    def validate(self, prefix: str = "") -> None:
        _check(self.adv_weight >= 0, _join(prefix, "adv_weight"), f"must be >= 0 (got {self.adv_weight})")
        _check(self.disc_lr > 0, _join(prefix, "disc_lr"), f"must be > 0 (got {self.disc_lr})")
        _check(len(self.disc_betas) == 2 and all(0 <= b < 1 for b in self.disc_betas),
               _join(prefix, "disc_betas"), f"must be two numbers in [0, 1) (got {self.disc_betas})")
        _check(self.disc_width >= 1, _join(prefix, "disc_width"), f"must be >= 1 (got {self.disc_width})")


@dataclass
class SelfLabelConfig:
    """Stage 1, CPSL self-labeling (spec 3.5). Defaults are the reference's values.

    Inputs from the warm-up model (explicit paths, filled in by the workflow): ``soft_labels`` (a
    ``cpsl pseudo-soft`` folder), ``prototypes`` (``prototypes.pt`` of ``cpsl prototypes``), ``class_dist``
    (``class_distribution.npy`` of ``cpsl class-dist``). The student starts from ``init_checkpoint`` (the
    warm-up model). Reference-behaviour switches (spec 7), all off by default (the corrected behaviour):
    ``ema_mode: train`` (item 6: the EMA network labels in train mode), ``reference_queue_labels`` (item 3:
    queue and contrastive labels misaligned with their pixels), ``reference_queue_scores`` (item 4:
    unnormalised prototypes in the queue scores).
    """

    soft_labels: Path | None = None
    prototypes: Path | None = None
    class_dist: Path | None = None
    tau: float = 0.08                 # temperature of prototype similarities
    epsilon: float = 0.05             # Sinkhorn entropic regularisation
    sinkhorn_iters: int = 3           # at 19 classes; ceil(x 19 / K) at K (train.reference_class_scaling)
    pixels_per_image: int = 256       # pixels sampled per image for the queues (reference fbs)
    queue_length: int = 65536
    sl_weight: float = 0.1            # class-balanced self-labeling loss (reference SL_lambda)
    contrast_weight: float = 0.001    # pixel contrastive loss
    consist_weight: float = 5.0       # prototype consistency on the strong view (reference proto_consistW)
    sce: bool = True                  # symmetric cross entropy on the rectified labels (reference --rce)
    sce_alpha: float = 0.1
    sce_beta: float = 1.0
    cutmix_p: float = 0.5             # source-to-target CutMix probability
    ema_momentum: float = 0.999       # EMA of the student's weights and of the prototypes
    ema_mode: Literal["eval", "train"] = "eval"
    proto_lr_mult: float = 5.0        # learnable prototypes' learning rate = optim.lr * proto_lr_mult
    train_threshold: float = 0.0      # rectified labels below this normalised confidence -> ignore
    reference_queue_labels: bool = False
    reference_queue_scores: bool = False

    def validate(self, prefix: str = "") -> None:
        for name in ("tau", "epsilon"):
            _check(getattr(self, name) > 0, _join(prefix, name), f"must be > 0 (got {getattr(self, name)})")
        for name in ("sinkhorn_iters", "pixels_per_image"):
            _check(getattr(self, name) >= 1, _join(prefix, name), f"must be >= 1 (got {getattr(self, name)})")
        _check(self.queue_length >= self.pixels_per_image and self.queue_length % self.pixels_per_image == 0,
               _join(prefix, "queue_length"),
               f"must be a multiple of pixels_per_image ({self.pixels_per_image}) (got {self.queue_length})")
        for name in ("sl_weight", "contrast_weight", "consist_weight", "sce_alpha", "sce_beta", "proto_lr_mult"):
            _check(getattr(self, name) >= 0, _join(prefix, name), f"must be >= 0 (got {getattr(self, name)})")
        for name in ("cutmix_p", "ema_momentum", "train_threshold"):
            _check(0.0 <= getattr(self, name) <= 1.0, _join(prefix, name),
                   f"must be in [0, 1] (got {getattr(self, name)})")


@dataclass
class DistillConfig:
    """Stages 2 and 3, knowledge distillation (spec 3.6). Defaults are the reference's values except the KD term.

    ``hard_labels``: a ``cpsl pseudo-hard`` folder made by the previous stage's model; pixels with confidence
    <= ``threshold`` are ignored (applied when loading). ``teacher``: the previous stage's ``checkpoint.pt``,
    run in eval mode; whether it has ``bn_pretrain`` is read from the checkpoint. The student starts from
    ``model.init`` (stage 2: SimCLRv2 weights with ``model.bn_pretrain``, new head) or from
    ``init_checkpoint`` (stage 3: the stage-2 model). ``kd_mode``: ``kl`` = KL(teacher || student) on
    log-probabilities (correct); ``reference`` = the reference's ``kl_div(softmax, softmax)`` averaged over
    classes and pixels (spec 7 item 2), used by the paper presets. ``strong_view``: the student sees the strong
    view and the labels are warped into it (reference ``--S_pseudo 1``). ``label_stride``: the pseudo-label CE
    and the KD term are computed at 1/``label_stride`` of the crop (4 = the reference's 128x224 for a 512x896
    crop; 1 = the full crop). See ``cpsl.methods.distill``.
    """

    hard_labels: Path | None = None
    teacher: Path | None = None
    class_dist: Path | None = None    # optional: the warm-up's class marginal, logged beside the class shares
    threshold: float = 0.95
    kd_weight: float = 1.0
    kd_mode: Literal["kl", "reference"] = "kl"
    strong_view: bool = True
    label_stride: int = 4

    def validate(self, prefix: str = "") -> None:
        _check(0.0 <= self.threshold < 1.0, _join(prefix, "threshold"), f"must be in [0, 1) (got {self.threshold})")
        _check(self.kd_weight >= 0, _join(prefix, "kd_weight"), f"must be >= 0 (got {self.kd_weight})")
        _check(self.label_stride >= 1, _join(prefix, "label_stride"), f"must be >= 1 (got {self.label_stride})")


@dataclass
class TrainConfig:
    """Settings of ``cpsl train``: one training stage (``stage``), iteration-based, resumable.

    ``init_checkpoint``: start the student from another stage's ``checkpoint.pt`` (its network must match
    ``model``); otherwise ``model.init`` (ImageNet weights) or random init. ``freeze_bn``: BatchNorm in eval
    mode with frozen affine parameters (the reference warm-up's ``--freeze_bn``). ``amp: bf16`` autocasts on
    CUDA and on the CPU, ``fp16`` on CUDA only (float32 on the CPU). ``checkpoint_interval``: iterations
    between resumable checkpoints (``out/checkpoints/last.pt``); ``log_interval``: iterations per line of ``out/metrics.jsonl``. The losses
    are read from the device (and checked for NaN/Inf) at log and checkpoint iterations only.
    ``reference_class_scaling``: scale the class-count-dependent terms (stage 1's consistency KL and logit-branch
    Sinkhorn epsilon, the ``kd_mode: reference`` KD term) with the actual number of classes and run
    ``selflabel.sinkhorn_iters`` Sinkhorn iterations at any number, as the reference does (the paper presets);
    off (the default), they are scaled as for 19 classes whatever the number is, so that a weight means the same
    for 2 and for 19 classes, and the iterations are ``ceil(sinkhorn_iters x 19 / K)``, so that the class
    balancing does as much per run (#27; ``cpsl.methods.losses``).
    ``share_drift``, ``share_drift_ratio``, ``share_drift_logs``: stages 1-3 warn when the student's predicted
    share of a class on the target stays more than ``share_drift`` (absolute) from the class marginal (or the
    teacher's share), or below it divided by ``share_drift_ratio`` for a class holding at least ``share_drift / 2``
    of it (0: no ratio test), for ``share_drift_logs`` logged iterations in a row (``cpsl.methods.shares``).
    ``eval_interval`` (0: off), ``eval_images``, ``eval_data``, ``eval_batch_size``, ``eval_workers``: validation
    during training and ``checkpoints/best.pt`` (``cpsl.train.validate``).
    ``accumulate``: gradient accumulation, k forward/backward passes of ``data.batch_size`` samples (the batch
    summed over the processes) per optimizer step: an optimizer step sees ``data.batch_size x accumulate``
    samples, and ``max_iters``, the intervals, the schedules and the checkpoints count optimizer steps. Under
    DDP the gradients are all-reduced once per step. BatchNorm in train mode sees micro-batch statistics, so
    the result equals a ``batch_size x k`` run only with ``freeze_bn`` (what each stage does per micro-batch
    and per step: ``cpsl.methods.base.Method.step``). ``channels_last``: the networks' memory format;
    ``auto`` = channels_last on CUDA (cuDNN's fast layout for bf16 convolutions), NCHW on the CPU.
    """

    stage: Literal["source_only", "warmup", "oracle", "stage1", "stage2", "stage3"]
    max_iters: int
    data: TrainDataConfig
    experiment: str = "default"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    init_checkpoint: Path | None = None
    optim: OptimConfig = field(default_factory=OptimConfig)
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    selflabel: SelfLabelConfig = field(default_factory=SelfLabelConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    freeze_bn: bool = False
    checkpoint_interval: int = 1000
    log_interval: int = 10
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: Literal["off", "bf16", "fp16"] = "off"
    reference_class_scaling: bool = False
    share_drift: float = 0.10
    share_drift_ratio: float = 3.0
    share_drift_logs: int = 3
    # Validation during training (cpsl.train.validate): every eval_interval iterations (and at max_iters) the
    # student, and stage 1's EMA teacher, are evaluated on eval_data (a prepared labelled split: the target val
    # split, filled in by the workflow), or on eval_images of its images spread evenly over it (0: all);
    # the best student so far is kept as checkpoints/best.pt. 0: off.
    eval_interval: int = 0
    eval_images: int = 0
    eval_data: Path | None = None
    eval_batch_size: int = 1
    eval_workers: int = 0
    # Gradient accumulation (micro-batches per optimizer step) and the networks' memory format (docstring above)
    accumulate: int = 1
    channels_last: Literal["auto"] | bool = "auto"

    def validate(self, prefix: str = "") -> None:
        _check(self.max_iters >= 1, _join(prefix, "max_iters"), f"must be >= 1 (got {self.max_iters})")
        for name, zero in (("eval_interval", "off"), ("eval_images", "all images"), ("eval_workers", "none")):
            _check(getattr(self, name) >= 0, _join(prefix, name),
                   f"must be >= 0 (0: {zero}; got {getattr(self, name)})")
        _check(self.eval_batch_size >= 1, _join(prefix, "eval_batch_size"),
               f"must be >= 1 (got {self.eval_batch_size})")
        _check(self.eval_interval == 0 or self.eval_data is not None, _join(prefix, "eval_data"),
               f"required when eval_interval is set ({self.eval_interval}): a prepared labelled split to validate on "
               "(the workflow fills in the target val split)")
        _check(self.accumulate >= 1, _join(prefix, "accumulate"),
               f"must be >= 1 (micro-batches per optimizer step; got {self.accumulate})")
        _check(0.0 < self.share_drift <= 1.0, _join(prefix, "share_drift"),
               f"must be in (0, 1] (a difference of class shares; got {self.share_drift})")
        _check(self.share_drift_ratio == 0 or self.share_drift_ratio > 1, _join(prefix, "share_drift_ratio"),
               f"must be > 1, or 0 for no ratio test (a ratio of class shares; got {self.share_drift_ratio})")
        _check(self.share_drift_logs >= 1, _join(prefix, "share_drift_logs"),
               f"must be >= 1 (logged iterations; got {self.share_drift_logs})")
        _check(self.checkpoint_interval >= 1, _join(prefix, "checkpoint_interval"),
               f"must be >= 1 (got {self.checkpoint_interval})")
        _check(self.log_interval >= 1, _join(prefix, "log_interval"), f"must be >= 1 (got {self.log_interval})")
        _check(self.seed >= 0, _join(prefix, "seed"), f"must be >= 0 (got {self.seed})")
        needs_source = self.stage in ("source_only", "warmup", "stage1", "stage2", "stage3")
        needs_target = self.stage in ("warmup", "oracle", "stage1", "stage2", "stage3")
        required = {"stage1": [("selflabel.soft_labels", self.selflabel.soft_labels),
                               ("selflabel.prototypes", self.selflabel.prototypes),
                               ("selflabel.class_dist", self.selflabel.class_dist),
                               ("init_checkpoint", self.init_checkpoint)],
                    "stage2": [("distill.hard_labels", self.distill.hard_labels),
                               ("distill.teacher", self.distill.teacher)],
                    "stage3": [("distill.hard_labels", self.distill.hard_labels),
                               ("distill.teacher", self.distill.teacher),
                               ("init_checkpoint", self.init_checkpoint)]}
        for key, value in required.get(self.stage, []):
            _check(value is not None, _join(prefix, key), f"required for stage {self.stage!r}")
        if needs_source:
            _check(self.data.source is not None, _join(prefix, "data.source"),
                   f"required for stage {self.stage!r} (a prepared source split)")
        if needs_target:
            _check(self.data.target is not None, _join(prefix, "data.target"),
                   f"required for stage {self.stage!r} (a prepared target train split)")
        if self.data.lab_transfer:
            _check(needs_source and self.data.target is not None, _join(prefix, "data.lab_transfer"),
                   "needs data.source and data.target (the target's lab_stats are the colour references)")
        what = "an ImageNet-scale network" if self.model.is_mit else "the paper's network"
        where = (f"Give the NVlabs ImageNet file (e.g. init: pretrained/{self.model.backbone}.pth, init_format: "
                 "nvlabs_mit)" if self.model.is_mit else f"Write `init: {IMAGENET_INIT}` (the workflow fetches "
                 "torchvision's file once), give that file's path,")
        _check(self.model.backbone not in LARGE_BACKBONES or self.model.init is not None
               or self.init_checkpoint is not None, _join(prefix, "model.init"),
               f"not set for a {self.model.backbone} ({what}): the stage would train "
               f"{self.max_iters} iterations from random weights. {where} or write `init: {RANDOM_INIT}` to mean it")
        if self.stage == "stage1":
            self._check_sample_grid(prefix)

    def _check_sample_grid(self, prefix: str) -> None:
        """Stage 1 samples ``pixels_per_image`` pixels per image from the crop's quarter grid (default) or, with
        ``reference_queue_labels``, from the student's output grid (stride 8, or 4 for MiT): there must be that
        many."""
        from cpsl.models import model_output_size, model_stride

        h, w = self.data.crop
        if self.selflabel.reference_queue_labels:
            grid = (model_output_size(self.model, h), model_output_size(self.model, w))
            what = f"the student's output grid (crop / {model_stride(self.model)})"
        else:
            grid, what = (h // 4, w // 4), "the label grid (crop / 4)"
        n = self.selflabel.pixels_per_image
        _check(n <= grid[0] * grid[1], _join(prefix, "selflabel.pixels_per_image"),
               f"{n} is more than the {grid[0] * grid[1]} pixels of {what}, {grid[0]}x{grid[1]} for data.crop "
               f"{list(self.data.crop)}; lower selflabel.pixels_per_image or enlarge data.crop")


@dataclass
class CollectConfig:
    """Settings of ``cpsl collect``: the metrics.json files to tabulate (summary.csv, summary.md) and plot."""

    metrics: list[Path] = field(default_factory=list)
    plots: bool = True
    notes: list[str] = field(default_factory=list)   # lines added under the tables (e.g. a stage left out)
    # experiment -> a reference table (results/reference/*.csv): its rows and a "delta" row per stage are added to
    # that experiment's table (the workflow sets it for the paper presets)
    references: dict[str, Path] = field(default_factory=dict)
