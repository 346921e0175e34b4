"""``cpsl import-checkpoint``: convert a released CPSL/ProDA ``.pkl`` into our ``checkpoint.pt``.

Reference layout (spec 2.4)::

    {'ResNet101': {'model_state': state_dict, 'prototypes_ema': tensor [n_class, 256] (CUDA, requires_grad)},
     ['FCDiscriminator': {'model_state': ...},]      # warm-up checkpoints only
     'iter': int, 'best_iou': numpy.float64}

The file is read through torch's restricted (``weights_only``) unpickler, which admits tensors and storages,
plain containers and numbers, plus the numpy scalar constructor and numeric numpy dtypes (for ``best_iou``).
Anything else (a pickle that would call ``os.system``, build an arbitrary class, ...) is refused before it
runs, with a CheckpointError naming the file and the refused global. A legacy (non-zip) pickle is named as such,
with the refused objects (found by a static scan of its opcodes: torch itself often reports only "Unsupported
operand 149", the FRAME opcode of pickle protocol 4+) and how to re-save it. CUDA storages are mapped to CPU.

The network layout is inferred from the weights (backbone from the block count, ``n_class`` from the
classifier, ``bn_pretrain`` from its keys), checked against the optional settings, and verified by loading the
state dict strictly into a freshly built network before anything is written.
"""

from __future__ import annotations

import logging
import pickle
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cpsl.config import ImportCheckpointConfig, ModelConfig, to_dict
from cpsl.errors import CheckpointError
from cpsl.models.checkpoint import (load_model_state, make_checkpoint, refusal_message, refusal_reason,
                                    save_checkpoint, short_error)
from cpsl.models.deeplabv2 import ASPP_DILATIONS, DeepLabV2
from cpsl.models.discriminator import FCDiscriminator

log = logging.getLogger(__name__)

_NUMERIC_DTYPES = ("Bool", "Int8", "Int16", "Int32", "Int64", "UInt8", "UInt16", "UInt32", "UInt64", "Byte",
                   "UByte", "Short", "UShort", "Int", "UInt", "Long", "ULong", "LongLong", "ULongLong",
                   "Float16", "Float32", "Float64", "LongDouble", "Complex64", "Complex128", "CLongDouble")


def _numpy_safe_globals() -> list[Any]:
    """numpy scalar reconstruction (under its numpy 1.x and 2.x names), ``numpy.dtype`` and numeric dtype classes."""
    core = getattr(np, "_core", None) or np.core
    scalar = core.multiarray.scalar
    items: list[Any] = [(scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar"),
                        np.dtype]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        items += [getattr(dtypes, f"{n}DType") for n in _NUMERIC_DTYPES if hasattr(dtypes, f"{n}DType")]
    return items


@contextmanager
def _allow_numpy_scalars() -> Iterator[None]:
    with torch.serialization.safe_globals(_numpy_safe_globals()):
        yield


def safe_load_reference(path: str | Path) -> Any:
    """Load a (trusted or not) reference ``.pkl`` with the restricted unpickler, on CPU."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        with _allow_numpy_scalars(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*pickle protocol.*")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        with _allow_numpy_scalars():
            message = refusal_message(path, refusal_reason(str(err)), "tensors, containers and numpy scalars")
        raise CheckpointError(f"{path}: {message}") from None
    except Exception as err:  # noqa: BLE001
        raise CheckpointError(f"{path}: not a readable checkpoint "
                              f"(truncated or corrupt: {short_error(err)})") from None


def infer_model_config(state: dict[str, torch.Tensor], source: str = "checkpoint") -> ModelConfig:
    """ModelConfig of a reference-layout state dict (backbone, widths, n_class, bn_pretrain)."""
    try:
        head = state["layer5.head.1.weight"]
        conv1 = state["conv1.weight"]
    except KeyError as err:
        raise CheckpointError(f"{source}: not a DeepLab-v2 state dict (no {err.args[0]})") from None
    blocks = 1 + max((int(k.split(".")[1]) for k in state if k.startswith("layer3.")), default=-1)
    bottleneck = "layer1.0.conv3.weight" in state
    archs = {(True, 23): "resnet101", (True, 6): "resnet50", (False, 2): "resnet18"}
    backbone = archs.get((bottleneck, blocks))
    if backbone is None:
        raise CheckpointError(f"{source}: unsupported backbone ({blocks} blocks in layer3, "
                              f"{'bottleneck' if bottleneck else 'basic'} blocks)")
    branches = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("layer5.conv2d_list."))
    if branches != len(ASPP_DILATIONS) + 1:
        raise CheckpointError(f"{source}: ASPP head has {branches} branches, expected {len(ASPP_DILATIONS) + 1}")
    return ModelConfig(backbone=backbone, base_width=int(conv1.shape[0]), head_channels=int(head.shape[1]),
                       n_class=int(head.shape[0]), bn_pretrain="bn_pretrain.weight" in state, init=None)


def _state_dict(obj: Any, where: str, source: str) -> dict[str, torch.Tensor]:
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{source}: {where} is not a state dict")
    out = {}
    for k, v in obj.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{source}: {where} entry {k!r} is not a tensor")
        out[k.removeprefix("module.")] = v.detach().cpu()
    return out


def convert_reference(data: Any, source: str, cfg: ImportCheckpointConfig | None = None) -> dict[str, Any]:
    """Turn a loaded reference dict into our checkpoint dict (verified by a strict load)."""
    if not isinstance(data, dict) or not isinstance(data.get("ResNet101"), dict):
        raise CheckpointError(f"{source}: not a CPSL/ProDA checkpoint (no 'ResNet101' entry)")
    net = data["ResNet101"]
    if "model_state" not in net:
        raise CheckpointError(f"{source}: 'ResNet101' has no 'model_state'")
    state = _state_dict(net["model_state"], "ResNet101.model_state", source)
    mcfg = infer_model_config(state, source)
    if cfg is not None and cfg.n_class is not None and cfg.n_class != mcfg.n_class:
        raise CheckpointError(f"{Path(source).name} has {mcfg.n_class} classes, config n_class is {cfg.n_class}")
    if cfg is not None and cfg.bn_pretrain is not None and cfg.bn_pretrain != mcfg.bn_pretrain:
        raise CheckpointError(f"{Path(source).name} has bn_pretrain={mcfg.bn_pretrain}, "
                              f"config bn_pretrain is {cfg.bn_pretrain}")
    model = DeepLabV2(mcfg.backbone, mcfg.n_class, mcfg.base_width, mcfg.head_channels, mcfg.bn_pretrain)
    load_model_state(model, state, source, "ResNet101.model_state")

    parts: dict[str, Any] = {}
    protos = net.get("prototypes_ema")
    if protos is not None:
        if not isinstance(protos, torch.Tensor) or protos.dim() != 2 or protos.shape[0] != mcfg.n_class:
            raise CheckpointError(f"{source}: ResNet101.prototypes_ema is not a [{mcfg.n_class}, C] tensor")
        parts["prototypes_ema"] = protos.detach().cpu().float().clone()
    extra: dict[str, Any] = {"imported_from": str(source), "reference_format": "CPSL/ProDA .pkl"}
    if "best_iou" in data:
        extra["best_iou"] = float(data["best_iou"])
    disc = data.get("FCDiscriminator")
    if isinstance(disc, dict) and "model_state" in disc and (cfg is None or cfg.discriminator):
        dstate = _state_dict(disc["model_state"], "FCDiscriminator.model_state", source)
        try:
            width, in_ch = int(dstate["conv1.weight"].shape[0]), int(dstate["conv1.weight"].shape[1])
        except KeyError:
            raise CheckpointError(f"{source}: FCDiscriminator.model_state has no conv1.weight") from None
        load_model_state(FCDiscriminator(in_ch, width), dstate, source, "FCDiscriminator.model_state")
        parts["discriminator"] = dstate
        extra["discriminator"] = {"in_channels": in_ch, "width": width}
    iteration = data.get("iter", 0)
    if not isinstance(iteration, (int, np.integer)):
        raise CheckpointError(f"{source}: 'iter' is not an integer ({iteration!r})")
    return make_checkpoint(model, to_dict(mcfg), iteration=int(iteration), extra=extra, **parts)


def run(cfg: ImportCheckpointConfig, out: Path) -> Path:
    """Convert ``cfg.source`` into ``out/checkpoint.pt`` (written atomically); return that path."""
    out = Path(out)
    data = safe_load_reference(cfg.source)
    ckpt = convert_reference(data, str(cfg.source), cfg)
    target = save_checkpoint(out / "checkpoint.pt", ckpt)
    mc = ckpt["model_config"]
    log.info("%s -> %s: %s, %d classes, bn_pretrain=%s, iteration %d%s", cfg.source, target, mc["backbone"],
             mc["n_class"], mc["bn_pretrain"], ckpt["iteration"],
             f", best_iou {ckpt['extra']['best_iou']:.2f}" if "best_iou" in ckpt["extra"] else "")
    return target
