"""Every training stage at a paper preset's settings on random data, without any file: shared by
``benchmarks/memory.py`` and ``benchmarks/gpu_step.py``.

``preset_config(stage, ...)`` is the resolved ``cpsl train`` config of one stage of ``gta5_cityscapes`` (the
workflow's own ``train_config`` on ``config.yaml``), with overrides, random initial weights instead of the
ImageNet / checkpoint files, and the inputs named there replaced by random ones when the method is built
(``offline_method``: the warm-up products of stage 1, the teacher and hard labels of stages 2 and 3). The networks,
losses and steps are the package's own; only the files are simulated.

``random_batches(cfg, method, n, image_hw)`` makes ``n`` batches through the real ``TrainDataset`` (weak crop,
strong view, full image, LAB transfer as configured) on random ``image_hw`` images and labels, with the extras
stage 1 and stages 2/3 read from disk (soft labels on the quarter grid, hard pseudo labels) drawn at random in
their formats.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import unittest.mock as um
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cpsl import workflow  # noqa: E402
from cpsl.config import TrainConfig, load  # noqa: E402
from cpsl.data.prepared import PreparedSplit  # noqa: E402
from cpsl.data.transforms import full_to_weak  # noqa: E402
from cpsl.methods import Amp, Method, TrainContext, build_method  # noqa: E402
from cpsl.methods.distill import weak_label  # noqa: E402
from cpsl.methods.selflabel import SoftLabelExtras  # noqa: E402
from cpsl.models import build_model, place  # noqa: E402
from cpsl.models.deeplabv2 import output_size  # noqa: E402
from cpsl.train.data import TrainDataset, weak_config  # noqa: E402
from cpsl.train.dist import DistInfo  # noqa: E402

STAGES = ("source_only", "warmup", "stage1", "stage2", "stage3")
PRESET = "gta5_cityscapes"
FULL_HW = (1024, 2048)          # Cityscapes (the stage-1 EMA teacher's input); GTA5 images are resized alike


def _set(tree: dict, dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value


def preset_config(stage: str, experiment: str = PRESET, **over: Any) -> TrainConfig:
    """The preset's resolved settings of ``stage`` with the dotted-key overrides ``over`` (``"data.batch_size":
    2``, ``amp="off"``...), and random initial weights (no ``model.init`` file, no ``init_checkpoint``)."""
    config = yaml.safe_load((REPO / "config.yaml").read_text(encoding="utf-8"))
    resolved = workflow.train_config(config, experiment, 0, stage)
    resolved["device"] = "cpu"
    for key, value in over.items():
        _set(resolved, key, value)
    cfg = load(TrainConfig, resolved)
    return dataclasses.replace(cfg, init_checkpoint=None, model=dataclasses.replace(cfg.model, init=None))


class RandomSplit(PreparedSplit):
    """A stand-in prepared split of ``n`` random images (uint8 RGB) and labels of ``hw`` pixels."""

    def __init__(self, n: int, hw: tuple[int, int], n_class: int, seed: int = 0) -> None:  # noqa: D107
        rng = np.random.default_rng(seed)
        self.names = [f"random{i:03d}" for i in range(n)]
        self.n_class, self.classes = n_class, tuple(f"class{k}" for k in range(n_class))
        self.labelled, self.lab_stats = True, None
        self._images = [rng.integers(0, 256, (*hw, 3), dtype=np.uint8) for _ in range(n)]
        self._labels = [np.where(rng.random(hw) < 0.1, 255, rng.integers(0, n_class, hw)).astype(np.uint8)
                        for _ in range(n)]

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return self._images[i], self._labels[i]

    def load_image(self, i: int) -> np.ndarray:   # the training data path reads image and label apart (#21)
        return self._images[i]

    def load_label(self, i: int, image_hw: tuple[int, int]) -> np.ndarray:
        return self._labels[i]


class _RandomSoft(SoftLabelExtras):
    """Stage 1's soft pseudo label (uint8-like probabilities on the network's output grid of the full image),
    random, carried into the weak crop as ``SoftLabelExtras`` carries the stored one."""

    def __init__(self, out_hw: tuple[int, int], n_class: int, full_hw: tuple[int, int]) -> None:  # noqa: D107
        self.out_hw, self.n_class = out_hw, n_class
        self.grid = (output_size(full_hw[0]), output_size(full_hw[1]))

    def __call__(self, index: int, weak_params: Any, rng: Any = None) -> dict[str, torch.Tensor]:
        soft = np.random.default_rng(index).dirichlet(np.ones(self.n_class), self.grid).astype(np.float32)
        soft = np.ascontiguousarray(soft.transpose(2, 0, 1))
        return {"soft": torch.from_numpy(full_to_weak(soft, weak_params, self.out_hw, src_align_corners=True))}


class _RandomHard:
    """Stages 2/3's hard pseudo label of the full image (10 % ignored), carried into the weak crop."""

    def __init__(self, n_class: int, full_hw: tuple[int, int]) -> None:  # noqa: D107
        self.n_class, self.full_hw = n_class, full_hw

    def __call__(self, index: int, params: Any, rng: Any = None) -> dict[str, torch.Tensor]:
        r = np.random.default_rng(index)
        label = np.where(r.random(self.full_hw) < 0.1, 255, r.integers(0, self.n_class, self.full_hw))
        return {"pseudo_label": torch.from_numpy(weak_label(label.astype(np.uint8), params))}


class _Names:
    """Stands in for the prepared target split the methods open for its names."""

    def __init__(self, *_: Any) -> None:
        self.names = [f"random{i:03d}" for i in range(8)]


def _random_teacher(cfg: TrainConfig, device: torch.device, bn_pretrain: bool) -> torch.nn.Module:
    model = place(build_model(dataclasses.replace(cfg.model, init=None, bn_pretrain=bn_pretrain)), device,
                  cfg.channels_last)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


@contextlib.contextmanager
def offline_inputs(cfg: TrainConfig, device: torch.device):
    """While building a method: its input files replaced by random stand-ins in their formats."""
    n_class, dim = cfg.model.n_class, cfg.model.head_channels
    g = torch.Generator().manual_seed(0)
    protos = torch.nn.functional.normalize(torch.randn(n_class, dim, generator=g), dim=1)
    marginal = torch.full((n_class,), 1.0 / n_class, dtype=torch.float64)
    teacher_bn = cfg.stage == "stage3"   # stage 2's teacher is the stage-1 model, stage 3's the stage-2 model
    with contextlib.ExitStack() as stack:
        for target in ("cpsl.methods.selflabel.PreparedSplit", "cpsl.methods.distill.PreparedSplit"):
            stack.enter_context(um.patch(target, _Names))
        stack.enter_context(um.patch("cpsl.methods.selflabel.load_prototypes", lambda *a, **k: (protos, [])))
        for target in ("cpsl.methods.selflabel.load_class_marginal", "cpsl.methods.distill.load_class_marginal"):
            stack.enter_context(um.patch(target, lambda *a, **k: marginal))
        stack.enter_context(um.patch("cpsl.methods.distill.check_hard_labels", lambda *a, **k: None))
        stack.enter_context(um.patch("cpsl.methods.distill.load_teacher",
                                     lambda *a, **k: (_random_teacher(cfg, device, teacher_bn), teacher_bn)))
        yield


def offline_method(cfg: TrainConfig, device: torch.device | str = "cpu") -> Method:
    """The stage's method (one process) with random initial weights and random stand-ins for its inputs."""
    device = torch.device(device)
    ctx = TrainContext(device, DistInfo(0, 1, 0, device), Amp(cfg.amp, device))
    with offline_inputs(cfg, device):
        return build_method(cfg, ctx)


def random_batches(cfg: TrainConfig, method: Method, n: int, image_hw: tuple[int, int] = FULL_HW,
                   seed: int = 0) -> list[dict[str, dict[str, Any]]]:
    """``n`` collated batches of ``cfg.data.batch_size`` samples for ``method`` (its ``domains``), made by the
    real ``TrainDataset`` from random ``image_hw`` images; each batch holds distinct samples."""
    b = cfg.data.batch_size
    weak = weak_config(cfg.data)
    datasets = {}
    for i, (domain, kwargs) in enumerate(sorted(method.domains.items())):
        kwargs = dict(kwargs)
        if "extras" in kwargs:
            quarter = (cfg.data.crop[0] // 4, cfg.data.crop[1] // 4)
            kwargs["extras"] = (_RandomSoft(quarter, cfg.model.n_class, image_hw) if cfg.stage == "stage1"
                                else _RandomHard(cfg.model.n_class, image_hw))
        if domain == "source" and cfg.data.lab_transfer:
            stats = np.random.default_rng(seed).random((4, 2, 3)).astype(np.float32)
            kwargs["lab_stats"] = stats * np.array([100, 40, 40], np.float32) + np.array([0, 0, 1], np.float32)
        datasets[domain] = TrainDataset(RandomSplit(b, image_hw, cfg.model.n_class, seed + i), weak, **kwargs)
    batches = []
    for j in range(n):
        batches.append({domain: torch.utils.data.default_collate([ds[(k, seed * 1000 + j * b + k)]
                                                                  for k in range(b)])
                        for domain, ds in datasets.items()})
    return batches

