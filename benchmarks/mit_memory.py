"""Peak memory of one training iteration of each stage of ``gta5_cityscapes_mitb5`` (MiT-B5), without a GPU.

``benchmarks/memory.py``'s measurement (FakeTensorMode + LiveMemory: real shapes and dtypes, no data, every live
storage counted) on the MiT preset: batch 2 (the preset's), 512x896 crops, stage 1's EMA teacher on the
1024x2048 image, AdamW state; random weights stand in for the NVlabs file (``model.init: random``).

    PYTHONPATH=. python benchmarks/mit_memory.py [--stages ...] [--amp bf16 off] [--batches 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

import memory  # noqa: E402
import synthetic_stage  # noqa: E402

from cpsl import workflow  # noqa: E402
from cpsl.config import TrainConfig, load  # noqa: E402

EXPERIMENT = "gta5_cityscapes_mitb5"
STAGES = ("source_only", "warmup", "stage1", "stage2", "stage3")


def mit_preset_config(stage: str, experiment: str = EXPERIMENT, **over: Any) -> TrainConfig:
    """The MiT preset's resolved settings of ``stage`` (random weights) with dotted-key overrides."""
    config = yaml.safe_load((synthetic_stage.REPO / "config.yaml").read_text(encoding="utf-8"))
    config["experiment_settings"][experiment]["model"]["init"] = "random"
    resolved = workflow.train_config(config, experiment, 0, stage)
    resolved["device"] = "cpu"
    for key, value in over.items():
        synthetic_stage._set(resolved, key, value)
    cfg = load(TrainConfig, resolved)
    return dataclasses.replace(cfg, init_checkpoint=None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    parser.add_argument("--amp", nargs="+", default=["bf16", "off"], choices=["off", "bf16"])
    parser.add_argument("--batches", nargs="+", type=int, default=[2])
    args = parser.parse_args()
    torch.set_num_threads(1)
    memory.preset_config = mit_preset_config      # measure() resolves its config through this name
    # the truncated normal init reads a value (data-dependent under FakeTensorMode); values do not matter here
    torch.nn.init.trunc_normal_ = lambda t, mean=0.0, std=1.0, a=-2.0, b=2.0, generator=None: \
        torch.nn.init.normal_(t, mean, std)
    rows = []
    for stage in args.stages:
        for amp in args.amp:
            for b in args.batches:
                r = memory.measure(stage, amp, b)
                rows.append(r)
                print(f"{stage} {amp} batch {b}: peak {r['peak'] / memory.GIB:.2f} GiB, state "
                      f"{r['state'] / memory.GIB:.2f} GiB ({r['seconds']:.0f} s)", file=sys.stderr, flush=True)
    print(memory.table(rows, full_batch=2))


if __name__ == "__main__":
    main()
