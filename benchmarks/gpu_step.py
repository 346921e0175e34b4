"""Training-step speed and peak memory of every stage at the paper preset's settings, on one GPU.

Goal (issue #21): at most 0.5 s per stage-1 iteration at batch 4 in bf16 on one H100-class GPU (the reference:
about 5.3 s on 4 GPUs).

Each configuration (stage x amp x channels_last x torch.compile) builds the stage's method at
``gta5_cityscapes``'s settings (``benchmarks/synthetic_stage.py``: DeepLab-v2 ResNet-101, batch 4, 512x896
crops, stage 1's EMA teacher on the 1024x2048 image with full queues; random initial weights and random
stand-ins for the input files), runs ``--warmup`` iterations (cuDNN autotuning, compilation), then times
``--iters`` iterations of ``method.step`` including the batch's copy to the device (from pinned memory, as the
training loop does), on random full-size batches made beforehand by the real ``TrainDataset`` (the data loaders'
CPU work, which DataLoader workers do in parallel, is not timed). Reports s/iter, samples/s and the peak CUDA
memory (``torch.cuda.max_memory_allocated`` above what was allocated before the configuration; n/a on the CPU)
as a Markdown table on stdout.

The whole run stops starting configurations when ``--time-limit`` seconds (default 480) would be exceeded; they
are listed as not run. The order puts the production setting first (bf16, channels_last, eager: every stage),
then stage 1's other combinations, then the others'. One command on a GPU node:

    .venv/bin/python benchmarks/gpu_step.py                    # about 8 minutes at most
    .venv/bin/python benchmarks/gpu_step.py --stages stage1 --iters 20

``--small`` runs a reduced size on the CPU (ResNet-18 at width 8, 64x112 crops from 128x256 images, batch 2):
what ``tests/test_benchmarks.py`` runs, to keep this script working without a GPU.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from synthetic_stage import FULL_HW, STAGES, offline_method, preset_config, random_batches  # noqa: E402

from cpsl.train.data import HOST_KEYS  # noqa: E402
from cpsl.train.loop import to_device  # noqa: E402

GOAL_S = 0.5
SMALL = {"model.backbone": "resnet18", "model.base_width": 8, "model.head_channels": 16,
         "data.crop": [64, 112], "data.resize": 256, "data.batch_size": 2, "selflabel.queue_length": 512,
         "selflabel.pixels_per_image": 8}
SMALL_HW = (128, 256)
COMPILE_BUDGET_S = 150       # what a configuration with torch.compile may take (compiling the ResNet-101 passes)
EAGER_BUDGET_S = 40


def configurations(stages: list[str], amps: list[str], layouts: list[bool], compiles: list[bool]
                   ) -> list[tuple[str, str, bool, bool]]:
    """Every (stage, amp, channels_last, compile), the production setting (bf16, channels_last, eager) of every
    stage first, then stage 1's other combinations, then the other stages'."""
    every = list(itertools.product(stages, amps, layouts, compiles))

    def rank(c: tuple[str, str, bool, bool]) -> tuple[int, int]:
        stage, amp, cl, comp = c
        production = amp == "bf16" and cl and not comp
        return (0 if production else 1 if stage == "stage1" else 2, every.index(c))

    return sorted(every, key=rank)


def _pin(batch: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {d: {k: v.pin_memory() if isinstance(v, torch.Tensor) and k not in HOST_KEYS else v
                for k, v in b.items()} for d, b in batch.items()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_one(stage: str, amp: str, channels_last: bool, compiled: bool, iters: int, warmup: int,
            device: torch.device, batches: list, over: dict[str, Any]) -> dict[str, Any]:
    """Time ``iters`` iterations of one configuration (after ``warmup`` untimed ones). The peak memory is counted
    above what was allocated before the method was built (anything an earlier configuration left behind)."""
    baseline = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    cfg = preset_config(stage, amp=amp, channels_last=channels_last, device=device.type, **over)
    method = offline_method(cfg, device)
    if stage == "stage1":   # full queues from the start (the contrastive term runs when there is no CutMix)
        method.queue.filled = method.queue.length
    if compiled:
        method.net = torch.compile(method.net)
        for name in ("ema", "teacher", "disc_net"):
            if hasattr(method, name):
                setattr(method, name, torch.compile(getattr(method, name)))
    if device.type == "cuda":
        batches = [_pin(b) for b in batches]
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(warmup + iters):
        _sync(device)
        t0 = time.perf_counter()
        batch = {d: to_device(b, device) for d, b in batches[i % len(batches)].items()}
        method.train_mode()
        losses = method.step(batch)
        for sched in method.schedulers.values():
            sched.step()
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    finite = all(math.isfinite(float(v)) for v in losses.values())
    peak = torch.cuda.max_memory_allocated(device) - baseline if device.type == "cuda" else None
    s_iter = sum(times) / len(times)
    return {"stage": stage, "amp": amp, "channels_last": channels_last, "compile": compiled, "s_iter": s_iter,
            "samples_s": cfg.data.batch_size / s_iter, "peak": peak, "finite": finite}


def table(rows: list[dict[str, Any]]) -> str:
    head = ["stage", "amp", "channels_last", "compile", "s/iter", "samples/s", "peak CUDA memory GiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["stage"], r["amp"], "on" if r["channels_last"] else "off", "on" if r["compile"] else "off"]
        if "error" in r:
            cells += [r["error"], "", ""]
        else:
            peak = "n/a" if r["peak"] is None else f"{r['peak'] / 2**30:.2f}"
            cells += [f"{r['s_iter']:.3f}" + ("" if r["finite"] else " (non-finite loss)"), f"{r['samples_s']:.2f}",
                      peak]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    parser.add_argument("--amp", nargs="+", default=["bf16", "off"], choices=["bf16", "off"])
    parser.add_argument("--channels-last", nargs="+", default=["on", "off"], choices=["on", "off"])
    parser.add_argument("--compile", nargs="+", default=["off", "on"], choices=["off", "on"])
    parser.add_argument("--iters", type=int, default=10, help="timed iterations per configuration")
    parser.add_argument("--warmup", type=int, default=3, help="untimed iterations first (autotuning, compiling)")
    parser.add_argument("--time-limit", type=float, default=480.0, help="seconds for the whole run")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="reduced size (a CPU check of this script)")
    args = parser.parse_args(argv)
    start = time.monotonic()
    device = torch.device(args.device)
    over = dict(SMALL) if args.small else {}
    image_hw = SMALL_HW if args.small else FULL_HW
    if device.type == "cuda":
        print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}", file=sys.stderr)
    batches: dict[str, list] = {}
    rows = []
    configs = configurations(args.stages, args.amp, [c == "on" for c in args.channels_last],
                             [c == "on" for c in args.compile])
    for stage, amp, cl, comp in configs:
        left = args.time_limit - (time.monotonic() - start)
        if left < (COMPILE_BUDGET_S if comp and not args.small else EAGER_BUDGET_S if not args.small else 0):
            rows.append({"stage": stage, "amp": amp, "channels_last": cl, "compile": comp,
                         "error": "not run (time limit)"})
            continue
        if stage not in batches:   # random full-size batches, made once per stage on the CPU
            cfg = preset_config(stage, **over)
            batches[stage] = random_batches(cfg, offline_method(preset_config(stage, **{**over, **SMALL_MODEL})),
                                            2, image_hw)
        t0 = time.monotonic()
        try:
            row = run_one(stage, amp, cl, comp, args.iters, args.warmup, device, batches[stage], over)
        except torch.cuda.OutOfMemoryError:
            row = {"stage": stage, "amp": amp, "channels_last": cl, "compile": comp, "error": "out of memory"}
        rows.append(row)
        print(f"{stage} amp={amp} channels_last={cl} compile={comp}: "
              f"{row.get('s_iter', row.get('error'))} ({time.monotonic() - t0:.0f} s)", file=sys.stderr, flush=True)
        if comp:
            torch._dynamo.reset()   # the compiled graphs hold on to the configuration's networks
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(table(rows))
    done = [r for r in rows if r["stage"] == "stage1" and r["amp"] == "bf16" and "s_iter" in r]
    if done and not args.small:
        best = min(done, key=lambda r: r["s_iter"])
        verdict = "met" if best["s_iter"] <= GOAL_S else "not met"
        print(f"\nstage 1, bf16, batch 4: best {best['s_iter']:.3f} s/iter (channels_last "
              f"{'on' if best['channels_last'] else 'off'}, compile {'on' if best['compile'] else 'off'}); "
              f"goal <= {GOAL_S} s: {verdict}")
    print(f"\ntotal {time.monotonic() - start:.0f} s", file=sys.stderr)
    return rows


# the methods only give the batches their keys (domains, views, extras): a tiny network builds them quickly
SMALL_MODEL = {"model.backbone": "resnet18", "model.base_width": 8, "model.head_channels": 16}


if __name__ == "__main__":
    main()
