"""Host syncs, host-to-device copies and kernel launches of one training iteration of every stage, and of every
inference step over two images, counted on fake CUDA tensors (tests/fake_cuda.py) with the tests' tiny model:
what the GPU path does per iteration, without a GPU. The counts do not depend on the model's size, except
``launches`` (per layer) and the EMA update.

    .venv/bin/python benchmarks/fake_cuda_counts.py [--out counts.json]

Backward passes cannot run on fake CUDA: ``launches`` counts the forward passes, losses, optimizer steps (on
zero gradients) and EMA updates, not the backward kernels.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from cpsl.config import PseudoHardConfig, TrainConfig, load  # noqa: E402
from cpsl.steps import pseudo_hard  # noqa: E402
from tests.test_distill import _tiny_checkpoint  # noqa: E402
from tests.inference_fixtures import random_split, tiny_checkpoint  # noqa: E402
from tests.test_fake_cuda import STEPS, _fill_queue, _one_iteration, run_inference_step  # noqa: E402
from tests.test_selflabel import stage1_dict  # noqa: E402
from tests.train_helpers import prepared_pair, train_dict, well_conditioned_init  # noqa: E402


def configs(base: Path) -> dict[str, tuple[TrainConfig, object]]:
    _, tgt = prepared_pair(base)
    teacher = well_conditioned_init(base / "teacher.pt")
    hard = base / "hard"
    pseudo_hard.run(PseudoHardConfig(checkpoint=teacher, data=tgt, device="cpu", workers=0, progress=False,
                                     color=False), hard)
    distill = {"model.bn_pretrain": True, "distill.teacher": str(teacher), "distill.hard_labels": str(hard)}
    stage2_ckpt = _tiny_checkpoint(base / "stage2.pt", bn_pretrain=True)
    return {
        "source_only": (load(TrainConfig, train_dict(base, "source_only")), None),
        "oracle": (load(TrainConfig, train_dict(base, "oracle", **{"data.source": None})), None),
        "warmup": (load(TrainConfig, train_dict(base, "warmup")), None),
        "stage1 (CutMix)": (load(TrainConfig, stage1_dict(base, **{"selflabel.cutmix_p": 1.0})), None),
        "stage1 (contrastive)": (load(TrainConfig, stage1_dict(base, **{"selflabel.cutmix_p": 0.0})), _fill_queue),
        "stage2": (load(TrainConfig, train_dict(base, "stage2", **distill)), None),
        "stage3": (load(TrainConfig, train_dict(base, "stage3", init_checkpoint=str(stage2_ckpt), **distill)), None),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (cfg, prepare) in configs(Path(tmp)).items():
            _, _, counts, fc, _ = _one_iteration(cfg, prepare)
            rows[name] = {**counts, "syncs_by_kind": dict(fc.syncs)}
    print("| stage | host syncs | pageable H2D copies | pinned H2D copies | kernel launches (no backward) |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        kinds = ", ".join(f"{k} {v}" for k, v in r["syncs_by_kind"].items())
        print(f"| {name} | {r['syncs']} ({kinds}) | {r['h2d_pageable']} | {r['h2d_pinned']} | {r['launches']} |")
    steps = {}
    with tempfile.TemporaryDirectory() as tmp:
        data, ckpt = random_split(Path(tmp), n=2, size=(33, 65)), tiny_checkpoint(Path(tmp) / "ck.pt", iteration=42)
        for step in sorted(STEPS):
            fc = run_inference_step(step, data, ckpt, Path(tmp) / step)
            steps[step] = {**fc.counts(), "syncs_by_kind": dict(fc.syncs)}
    print("\n| inference step (two images, one per batch) | host syncs | kernel launches |")
    print("|---|---|---|")
    for name, r in steps.items():
        kinds = ", ".join(f"{k} {v}" for k, v in r["syncs_by_kind"].items())
        print(f"| {name} | {r['syncs']} ({kinds}) | {r['launches']} |")
    ema = ema_launches()
    print(f"\nEMA update of DeepLab-v2 ResNet-101 (ModelConfig()): {ema['tensors']} tensors, "
          f"{ema['per_tensor']} launches one tensor at a time, {ema['foreach']} with torch._foreach")
    if args.out:
        args.out.write_text(json.dumps({"iteration": rows, "inference": steps, "ema_resnet101": ema}, indent=2) + "\n")


def ema_launches() -> dict[str, int]:
    """Kernel launches of stage 1's EMA update on the paper's network: the per-tensor loop (before #26) and
    ``ema_update`` (torch._foreach)."""
    from cpsl.config import ModelConfig
    from cpsl.methods.selflabel import ema_update
    from cpsl.models import build_model
    from tests.fake_cuda import FakeCuda

    student, ema = build_model(ModelConfig()), build_model(ModelConfig())
    out = {"tensors": len(list(student.parameters())) + len(list(student.buffers()))}
    with FakeCuda() as fc, torch.no_grad():
        student.to("cuda")
        ema.to("cuda")
        fc.reset()
        for pe, p in zip(ema.parameters(), student.parameters()):
            pe.mul_(0.999).add_(p, alpha=0.001)
        for be, b in zip(ema.buffers(), student.buffers()):
            be.copy_(b)
        out["per_tensor"] = fc.launches
        fc.reset()
        ema_update(ema, student, 0.999)
        out["foreach"] = fc.launches
    return out


if __name__ == "__main__":
    main()
