"""Initial weights from local files: torchvision ImageNet ResNets, the SimCLRv2 R101 of the reference, or the
backbone of one of our own checkpoints (``checkpoint``: e.g. the demo's source-only model as its stand-in for
pretrained weights; the classifier ``layer5`` is not taken, so the network gets a new head), or the original
NVlabs ImageNet MiT file ``mit_bX.pth`` (``nvlabs_mit``: converted by ``cpsl.models.mit.convert_nvlabs``; every
key must map onto the encoder and the whole encoder must be in the file, else the first offending key is named),
or a Hugging Face SegFormer folder (``hf_segformer``: ``model.safetensors`` or ``pytorch_model.bin``, in the
names of transformers 4.x or 5.x; ``cpsl.models.mit.convert_hf``; the same checks).

Nothing is ever downloaded. Files are read with ``torch.load(weights_only=True, map_location='cpu')``.
Tensors are copied by name into the model's state dict (the reference's rule); every shape is checked before
anything is copied, so a mismatch fails with nothing loaded. The result is reported (log and return value):
tensors loaded, model keys not in the file (``missing``, e.g. ``layer5.*``) and file keys not in the model
(``unexpected``, e.g. ``fc.*``). ``num_batches_tracked`` counters are not weights and are never reported missing.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cpsl.errors import CheckpointError, ConfigError
from cpsl.models.checkpoint import load_checkpoint, short_error

log = logging.getLogger(__name__)

INIT_FORMATS = ("torchvision", "simclr", "checkpoint", "nvlabs_mit", "hf_segformer")
MIT_FORMATS = ("nvlabs_mit", "hf_segformer")
# What init_format "checkpoint" leaves out: the classifier (ASPP head), as for the SimCLR file.
HEAD_PREFIX = "layer5."


def read_state_dict(path: str | Path, fmt: str = "torchvision", key: str = "model.init") -> dict[str, torch.Tensor]:
    """Read an init file into a flat ``{name: tensor}`` mapping.

    ``torchvision``: the file is the state dict (a ``{'state_dict': ...}`` wrapper is accepted too).
    ``simclr``: the file is ``{'state_dict': {...}}`` with torchvision names (reference r101_1x_sk0.pth).
    ``nvlabs_mit``: the NVlabs MiT state dict (``state_dict`` wrapper and ``backbone.`` prefix accepted), under
    our names. ``checkpoint``: one of our ``checkpoint.pt`` files (read and checked by ``load_checkpoint``); its student
    weights without the classifier (``layer5.*``).
    A missing file raises ConfigError naming ``key``; an unreadable or wrongly shaped file raises CheckpointError.
    """
    if fmt not in INIT_FORMATS:
        raise ConfigError(f"{key}_format: {fmt!r} is not one of {', '.join(map(repr, INIT_FORMATS))}")
    path = Path(path)
    if str(path) == "imagenet":
        raise ConfigError(f"{key}: 'imagenet' is resolved by the workflow, which fetches the file (cpsl "
                          "fetch-weights); by hand, give the file's path")
    if fmt == "hf_segformer":
        return _read_hf_folder(path, key)
    if not path.is_file():
        raise ConfigError(f"{key}: file not found: {path}")
    if fmt == "checkpoint":
        return {k: v for k, v in load_checkpoint(path)["model"].items() if not k.startswith(HEAD_PREFIX)}
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure means the file is unusable
        raise CheckpointError(f"{path}: cannot read init weights ({short_error(err)})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a state dict, got {type(data).__name__}")
    if "state_dict" in data and isinstance(data["state_dict"], dict):
        data = data["state_dict"]
    elif fmt == "simclr":
        raise CheckpointError(f"{path}: {key}_format is 'simclr' but the file has no 'state_dict' entry")
    state: dict[str, torch.Tensor] = {}
    for name, value in data.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: entry {name!r} is not a tensor ({type(value).__name__}); "
                                  f"not a {fmt} state dict")
        state[name.removeprefix("module.")] = value
    if fmt == "nvlabs_mit":
        from cpsl.models.mit import convert_nvlabs
        try:
            state = convert_nvlabs(state, str(path))
        except ValueError as err:
            raise CheckpointError(str(err)) from None
    return state


def _read_hf_folder(path: Path, key: str) -> dict[str, torch.Tensor]:
    """The encoder tensors of a Hugging Face SegFormer folder (or one of its weight files), under our names."""
    from cpsl.models.mit import convert_hf, read_safetensors

    files = [path] if path.is_file() else [path / "model.safetensors", path / "pytorch_model.bin"]
    found = next((f for f in files if f.is_file()), None)
    if found is None:
        raise ConfigError(f"{key}: no model.safetensors or pytorch_model.bin in {path}")
    try:
        if found.suffix == ".safetensors":
            data = read_safetensors(found)
        else:
            data = torch.load(found, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure means the file is unusable
        raise CheckpointError(f"{found}: cannot read init weights ({short_error(err)})") from None
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise CheckpointError(f"{found}: expected a state dict of tensors")
    try:
        return convert_hf(data, str(found))
    except ValueError as err:
        raise CheckpointError(str(err)) from None


def _summary(keys: list[str]) -> str:
    groups = Counter(k.split(".", 1)[0] for k in keys)
    return ", ".join(f"{g}.*: {n}" for g, n in groups.items())


def load_state_into(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> dict[str, Any]:
    """Copy every tensor of ``state`` whose name is in the model; check all shapes first; return a report."""
    target = model.state_dict()
    for name, value in state.items():
        if name in target and tuple(value.shape) != tuple(target[name].shape):
            raise CheckpointError(f"{source}: shape mismatch for {name}: file has {tuple(value.shape)}, "
                                  f"model has {tuple(target[name].shape)}")
    common = [k for k in state if k in target]
    missing = [k for k in target if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in target]
    if not common:
        raise CheckpointError(f"{source}: no tensor in the file matches a model parameter "
                              f"(file keys start {', '.join(list(state)[:3])})")
    with torch.no_grad():
        for k in common:
            target[k].copy_(state[k])
    report = {"file": source, "loaded": len(common), "missing": missing, "unexpected": unexpected}
    log.info("%s: loaded %d tensors; %d model keys not in file (%s); %d file keys unused (%s)", source,
             len(common), len(missing), _summary(missing) or "none", len(unexpected), _summary(unexpected) or "none")
    return report


def load_init_weights(model: nn.Module, path: str | Path, fmt: str = "torchvision",
                      key: str = "model.init") -> dict[str, Any]:
    """Initialise ``model`` from a local torchvision/SimCLR file; return ``{file, loaded, missing, unexpected}``.

    ``key`` is the config key named in errors (e.g. ``model.init: file not found: /path``).
    """
    state = read_state_dict(path, fmt, key)
    if fmt in MIT_FORMATS:
        _check_whole_encoder(model, state, str(path))
    return load_state_into(model, state, str(path))


def _check_whole_encoder(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """An MiT file must fill exactly the model's encoder: no key without a place (a deeper variant's blocks)
    and no encoder tensor left out (a shallower variant's file)."""
    target = model.state_dict()
    for name in state:
        if name not in target:
            raise CheckpointError(f"{source}: {name} has no place in the model (a file of another MiT variant?)")
    for name in target:
        if name.startswith("backbone.") and name not in state:
            raise CheckpointError(f"{source}: the model's {name} is not in the file (a file of another MiT "
                                  "variant?)")
