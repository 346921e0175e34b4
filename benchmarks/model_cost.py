"""FLOPs and wall time of one forward and backward pass of the demo's model and of narrower variants (#22 item 2).

    .venv/bin/python benchmarks/model_cost.py [--threads 2] [--iters 10] [--out model_cost.json]

Builds the demo's DeepLab-v2 (its settings resolved from config.yaml as the workflow passes them to ``cpsl train``:
ResNet-18 layout at base width 8, ASPP at 32 channels, dilations 1-4) and each variant in ``VARIANTS``, counts the
FLOPs of a forward and backward pass on a batch of 4 x 3 x 96 x 192 (the demo's batch and crop) with torch's
``FlopCounterMode``, split by the top-level modules (conv1, layer1-4, layer5 = the ASPP head), and times the pass: 3
warm-up passes, then the fastest of 3 rounds of ``--iters`` passes, the rounds alternating between the models.
Random weights and inputs; malloc tuned as in a ``python -m cpsl`` process. It says whether a cheaper demo model
would buy time: the FLOPs a variant removes against the time it saves.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import yaml  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from cpsl import workflow  # noqa: E402
from cpsl.config import TrainConfig, load  # noqa: E402
from cpsl.malloc import tune_malloc  # noqa: E402
from cpsl.models import build_model  # noqa: E402

# the demo's source-only settings, resolved and validated as the workflow resolves them; its training batch
DEMO = load(TrainConfig, workflow.train_config(yaml.safe_load((ROOT / "config.yaml").read_text()), "demo", 0,
                                               "source_only"))
SHAPE = (DEMO.data.batch_size, 3, *DEMO.data.crop)
VARIANTS = {"demo": {}, "ASPP 24 channels": {"head_channels": 24}, "ASPP 16 channels": {"head_channels": 16},
            "base width 6": {"base_width": 6}}


def build(**settings) -> torch.nn.Module:
    """The demo's network with the ``ModelConfig`` fields ``settings`` changed, random weights, in train mode."""
    return build_model(dataclasses.replace(DEMO.model, init=None, **settings)).train()


def pass_once(model: torch.nn.Module, x: torch.Tensor) -> None:
    out = model(x)
    sum(v.float().mean() for v in out.values() if torch.is_tensor(v)).backward()


def flops(model: torch.nn.Module, x: torch.Tensor) -> dict:
    """GFLOP of one forward and backward pass, in total and by top-level module."""
    with FlopCounterMode(display=False) as counter:
        pass_once(model, x)
    parts = {name.split(".", 1)[1]: sum(ops.values()) / 1e9
             for name, ops in counter.get_flop_counts().items() if name.count(".") == 1}
    return {"gflop": counter.get_total_flops() / 1e9, "gflop_by_module": parts}


def measure(iters: int, rounds: int = 3) -> dict:
    """Every variant's FLOPs and its fastest round's ms per pass; the rounds alternate between the variants, so
    that a change in the machine's speed reaches all of them alike."""
    x = torch.randn(SHAPE)
    models = {name: build(**settings) for name, settings in VARIANTS.items()}
    rows = {name: flops(model, x) for name, model in models.items()}
    for model in models.values():
        for _ in range(3):
            pass_once(model, x)
    seconds: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            t0 = time.perf_counter()
            for _ in range(iters):
                pass_once(model, x)
            seconds[name].append((time.perf_counter() - t0) / iters)
    for name, row in rows.items():
        row["ms_per_pass"] = round(min(seconds[name]) * 1e3, 1)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    tune_malloc()                   # before the models allocate, as python -m cpsl does
    torch.set_num_threads(args.threads)
    rows = measure(args.iters)
    base = rows["demo"]
    print(f"| model | GFLOP fwd+bwd | ms per pass ({args.threads} threads) | FLOPs vs demo | time vs demo |")
    print("|---|---:|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['gflop']:.2f} | {r['ms_per_pass']:.1f} | {r['gflop'] / base['gflop']:.2f}x "
              f"| {r['ms_per_pass'] / base['ms_per_pass']:.2f}x |")
    print("demo by module (GFLOP):", {k: round(v, 3) for k, v in base["gflop_by_module"].items()})
    if args.out:
        summary = {"threads": args.threads, "model": dataclasses.asdict(DEMO.model), "shape": SHAPE, "rows": rows}
        args.out.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
