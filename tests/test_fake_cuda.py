"""The GPU code path on fake CUDA tensors (tests/fake_cuda.py): one iteration of every training stage and one
run of every inference step with ``device: cuda`` and bf16 autocast, on a machine without a GPU.

Each asserts: no operation mixes CUDA and CPU tensors, no CUDA tensor is read with numpy, convolutions run in
bfloat16 and softmaxes in float32, and the number of host syncs (the host waiting for the device) per
iteration / per batch. The backward passes cannot run without a real CUDA context: ``skip_backward`` records
the losses they were called on (float32 scalars on the device) and hands the optimizers zero gradients.
"""

from __future__ import annotations

import math
import unittest.mock as um
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils._pytree import tree_map

from cpsl import inference
from cpsl.config import (ClassDistConfig, EvaluateConfig, PrototypesConfig, PseudoHardConfig, PseudoSoftConfig,
                         TrainConfig, load)
from cpsl.methods import Amp, TrainContext, build_method
from cpsl.methods.sinkhorn import safe_normalize
from cpsl.steps import class_dist, evaluate, prototypes, pseudo_hard, pseudo_soft
from cpsl.train import dist as D
from cpsl.train.data import build_datasets, build_loaders
from cpsl.train.dist import DistInfo
from cpsl.train.loop import to_device
from tests.fake_cuda import CUDA, FakeCuda, FakeCudaTensor, skip_backward
from tests.inference_fixtures import random_split, tiny_checkpoint
from tests.test_distill import _distill_dict, _tiny_checkpoint, stage1  # noqa: F401
from tests.test_selflabel import stage1_dict
from tests.train_helpers import one_thread, pair_dir, train_dict  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")

# Per iteration on fake CUDA: (host syncs, host-to-device copies from pageable memory). The losses stay on the
# device (the loop reads them at log and checkpoint iterations only: test_train_loop); the batch comes from pinned
# memory (the loop's loaders pin it on CUDA) and so do the keys, grids and masks the methods build on the host.
# The contrastive term is one batched computation with fixed shapes (no bool(), no boolean-mask indexing) and the
# queue a ring buffer written in place. Before #26: source_only/oracle (1, 0), warmup (3, 0), stage 2/3 (3, 4),
# stage 1 (6, 14), with the contrastive term (12, 12), (6, 0) before its batched rewrite; stages 1-3 crashed
# before getting there.
TRAIN_SYNCS = {
    "source_only": (0, 0),
    "oracle": (0, 0),
    "warmup": (0, 0),
    "stage2": (0, 0),
    "stage3": (0, 0),
    "stage1": (0, 0),
    "stage1_contrast": (0, 0),
}


def _ctx() -> TrainContext:
    return TrainContext(CUDA, DistInfo(0, 1, 0, CUDA), Amp("bf16", CUDA))


def _pinned(batch):
    return tree_map(lambda t: t.pin_memory() if isinstance(t, torch.Tensor) else t, batch)


def _one_iteration(cfg: TrainConfig, prepare=None):
    """Build the method on fake CUDA, move one (pinned) batch there as the loop does, run one step."""
    with FakeCuda() as fc:
        torch.backends.cudnn.benchmark = False
        method = build_method(cfg, _ctx())
        _check_placed(method.student)
        if prepare is not None:
            prepare(method)
        loaders = build_loaders(cfg, build_datasets(cfg, method.domains, cfg.model.n_class), rank=0,
                                world_size=1, start_iter=0)
        host_batch = {d: _pinned(next(iter(loader))) for d, loader in loaders.items()}
        params = [p for opt in method.optimizers.values() for g in opt.param_groups for p in g["params"]]
        method.train_mode()
        fc.reset()
        batch = {d: to_device(b, CUDA) for d, b in host_batch.items()}
        uploaded = fc.counts()
        with skip_backward(params) as backward_on:
            losses = method.step(batch)
        counts = fc.counts()
    # every tensor of the batch but the augmentation records went to the device, from pinned memory
    moved = [(d, k) for d, b in host_batch.items() for k, v in b.items() if isinstance(v, torch.Tensor)]
    assert moved
    assert uploaded == {"syncs": 0, "h2d_pageable": 0, "h2d_pinned": len(moved), "launches": len(moved)}, uploaded
    for d, b in batch.items():
        for k, v in b.items():
            if k in ("weak_params", "strong_params"):  # augmentation records, read on the host: numpy arrays
                assert v and all(isinstance(t, np.ndarray) for t in v.values()), (d, k)
    # the losses stay on the device (read by the loop only when it logs); host numbers for flags (cutmix)
    on_device = {k for k, v in losses.items() if isinstance(v, FakeCudaTensor)}
    assert on_device == set(losses) - {"cutmix"}
    assert all(losses[k].dim() == 0 and not losses[k].requires_grad for k in on_device)
    losses = {k: float(v.elem) if k in on_device else v for k, v in losses.items()}
    assert all(math.isfinite(v) for v in losses.values()), losses
    assert backward_on, "no backward pass"
    for loss in backward_on:
        assert isinstance(loss, FakeCudaTensor) and loss.dim() == 0 and loss.dtype == torch.float32
    assert set(fc.dtypes["conv"]) == {torch.bfloat16}, fc.dtypes["conv"]
    assert set(fc.dtypes["softmax"]) <= {torch.float32}, fc.dtypes["softmax"]
    return method, losses, counts, fc, batch


def _check_placed(model: torch.nn.Module) -> None:
    """On CUDA: every 4-d weight in channels_last, cuDNN's autotuner on."""
    weights = [p for p in model.parameters() if p.dim() == 4]
    assert weights and all(p.device == CUDA for p in model.parameters())
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in weights)
    assert torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False


def _check_syncs(key: str, fc: FakeCuda, counts: dict) -> None:
    got = (counts["syncs"], counts["h2d_pageable"])
    assert got == TRAIN_SYNCS[key], f"{key}: {counts}, syncs by kind: {dict(fc.syncs)}"


@pytest.mark.parametrize("stage", ["source_only", "oracle", "warmup"])
def test_base_stages_one_iteration_on_fake_cuda(pair_dir, stage):  # noqa: F811
    over = {"data.source": None} if stage == "oracle" else {}
    cfg = load(TrainConfig, train_dict(pair_dir, stage, **over))
    method, losses, counts, fc, batch = _one_iteration(cfg)
    _check_syncs(stage, fc, counts)


@pytest.mark.parametrize("stage", ["stage2", "stage3"])
def test_distill_stages_one_iteration_on_fake_cuda(pair_dir, stage1, stage, tmp_path):  # noqa: F811
    over = {}
    if stage == "stage3":  # the stage-2 model (bn_pretrain, like the student)
        over["init_checkpoint"] = str(_tiny_checkpoint(tmp_path / "stage2.pt", bn_pretrain=True))
    cfg = load(TrainConfig, _distill_dict(pair_dir, stage1, stage, **over))
    method, losses, counts, fc, batch = _one_iteration(cfg)
    assert set(losses) == {"ce_source", "ce_pseudo", "kd"}
    _check_syncs(stage, fc, counts)


def _fill_queue(method) -> None:
    """A full feature queue (as after a few iterations), so that the contrastive term runs."""
    q = method.queue
    g = torch.Generator().manual_seed(0)
    q.feats.copy_(safe_normalize(torch.randn(q.feats.shape, generator=g), dim=1))
    q.logits.copy_(safe_normalize(torch.randn(q.logits.shape, generator=g), dim=1))
    q.labels.copy_(torch.randint(0, q.logits.shape[1], q.labels.shape, generator=g))
    q.filled = q.length


@pytest.mark.parametrize("case", ["stage1", "stage1_contrast"])
def test_stage1_one_iteration_on_fake_cuda(pair_dir, case):  # noqa: F811
    """Stage 1 reads its augmentation records (weak/strong params) on the host: they must stay on the CPU."""
    contrast = case == "stage1_contrast"
    cfg = load(TrainConfig, stage1_dict(pair_dir, **{"selflabel.cutmix_p": 0.0 if contrast else 1.0}))
    method, losses, counts, fc, batch = _one_iteration(cfg, _fill_queue if contrast else None)
    assert losses["cutmix"] == (0.0 if contrast else 1.0)
    assert batch["target"]["image_full"].dtype == torch.uint8   # a quarter of float32's bytes to copy
    assert (losses["contrast"] > 0) == contrast
    _check_syncs(case, fc, counts)


# ---------------------------------------------------------------------------------------------------------
# Inference steps


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tiny_fake_cuda")
    return random_split(tmp, n=2, size=(33, 65)), tiny_checkpoint(tmp / "ck.pt", iteration=42)


STEPS = {"evaluate": (EvaluateConfig, evaluate), "pseudo_soft": (PseudoSoftConfig, pseudo_soft),
         "pseudo_hard": (PseudoHardConfig, pseudo_hard), "prototypes": (PrototypesConfig, prototypes),
         "class_dist": (ClassDistConfig, class_dist)}
# host syncs of a run over two images, one per batch: only the outputs' copies to the host. Counts by
# inference.count_ids (index_add_) instead of bincount and boolean masks. Before #26: evaluate 9 (per image
# two boolean masks and a bincount for the confusion matrix, and the sample; the total), pseudo_soft 2,
# pseudo_hard 4 (the label and the confidence), prototypes 8 (a bincount per image; 6 copies of the results),
# class_dist 3 (a bincount per image; the counts)
INFERENCE_SYNCS = {
    "evaluate": 3,      # per image the sample; the confusion matrix at the end
    "pseudo_soft": 2,   # per image: the quantised map
    "pseudo_hard": 2,   # per image: the label and the confidence in one int32 map
    "prototypes": 3,    # the sums and the two counts at the end
    "class_dist": 1,    # the counts at the end
}


def run_inference_step(step: str, data: Path, ckpt: Path, out: Path) -> FakeCuda:
    """``step`` over ``data`` with ``ckpt`` on fake CUDA (one image per batch, bf16 autocast) into ``out``."""
    cls, module = STEPS[step]
    cfg = cls(checkpoint=ckpt, data=data, device="cuda", amp=True, workers=0, progress=False, batch_size=1)
    models = []
    load = inference.load_model_from_checkpoint
    torch.backends.cudnn.benchmark = False
    with um.patch.object(D, "setup", lambda preference="auto": DistInfo(0, 1, 0, CUDA)), \
            um.patch.object(inference, "load_model_from_checkpoint", lambda *a: models.append(load(*a)) or models[-1]):
        with FakeCuda() as fc:
            module.run(cfg, out)
            _check_placed(models[0][0])
    return fc


@pytest.mark.parametrize("step", sorted(STEPS))
def test_inference_steps_on_fake_cuda(tiny, tmp_path, step):
    fc = run_inference_step(step, *tiny, tmp_path / "out")
    assert set(fc.dtypes["conv"]) == {torch.bfloat16}, fc.dtypes["conv"]
    assert set(fc.dtypes["softmax"]) <= {torch.float32}, fc.dtypes["softmax"]
    assert fc.counts()["syncs"] == INFERENCE_SYNCS[step], f"{step}: {fc.counts()}, syncs by kind: {dict(fc.syncs)}"
    assert any(Path(tmp_path / "out").iterdir())


# ---------------------------------------------------------------------------------------------------------
# Multi-GPU settings (DDP itself replaced by a recorder: no process group on fake CUDA)


def test_sync_bn_student_and_plain_bn_teacher_under_multi_gpu_ddp(pair_dir, monkeypatch):  # noqa: F811
    """Stage 1 on 2 (fake) GPUs: the student has SyncBatchNorm and DDP does not broadcast its buffers; the EMA
    teacher has plain BatchNorm (no collectives in its forward passes) with the student's weights."""
    wrapped = []

    class DDP(torch.nn.Module):
        def __init__(self, module, **kwargs):
            super().__init__()
            self.module, self.kwargs = module, kwargs
            wrapped.append(self)

    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", DDP)
    cfg = load(TrainConfig, stage1_dict(pair_dir))
    with FakeCuda():
        method = build_method(cfg, TrainContext(CUDA, DistInfo(0, 2, 0, CUDA), Amp("bf16", CUDA)))
        torch.backends.cudnn.benchmark = False
        sync = [m for m in method.student.modules() if isinstance(m, torch.nn.SyncBatchNorm)]
        assert len(sync) > 10
        assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in method.ema.modules())
        assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in method.ema.modules()) == len(sync)
        assert method.ema.state_dict().keys() == method.student.state_dict().keys()
        for (k, a), b in zip(method.ema.state_dict().items(), method.student.state_dict().values()):
            assert torch.equal(a.elem, b.elem), k
    assert [w.module for w in wrapped] == [method.student]
    assert wrapped[0].kwargs == {"device_ids": [0], "forward_sync_buffers": False}
