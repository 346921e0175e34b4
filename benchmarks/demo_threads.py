"""Wall-clock seconds per training step of each demo stage at 1 and at 2 threads (#22: the thread layout).

    .venv/bin/python benchmarks/demo_threads.py --work /tmp/demo_profile [--iters 12] [--out demo_threads.json]

Builds the demo's inputs as ``demo_profile.py`` does (the same ``--work`` folder is reused), then for each
training stage builds the method and its data as ``cpsl train`` does and times ``Method.step`` on the same
``--iters`` batches (prepared beforehand: the data is not timed) with ``torch.set_num_threads(1)`` and ``(2)``,
twice each, alternating, after 3 warm-up steps; the faster of the two rounds is reported. Run it on an otherwise
idle machine: the second thread needs the second core.

What it decides: the demo's chain (source_only -> warm-up -> stages 1-3) is the workflow's critical path, and
from the warm-up on nothing trains beside it, so its jobs may take both cores of a 2-core machine
(``experiment_settings.demo.resources.train_<stage>: {threads: 2}``) if a second thread makes a step faster.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

STAGES = ("source_only", "warmup", "stage1", "stage2", "stage3")


def time_stage(work: Path, stage: str, iters: int) -> dict:
    import itertools

    import torch

    from demo_profile import batch_stream, build_stage, stage_config

    cfg = stage_config(work, stage)
    info, amp, method, datasets = build_stage(cfg)
    batches = list(itertools.islice(batch_stream(datasets, cfg.data.batch_size, info.device), iters + 3))

    def step(batch: dict) -> None:
        method.train_mode()
        method.step(batch)
        amp.update()

    seconds: dict[int, list[float]] = {1: [], 2: []}
    for threads in (1, 2, 1, 2):
        torch.set_num_threads(threads)
        for batch in batches[:3]:
            step(batch)
        t0 = time.perf_counter()
        for batch in batches[3:]:
            step(batch)
        seconds[threads].append((time.perf_counter() - t0) / iters)
    one, two = min(seconds[1]), min(seconds[2])
    return {"stage": stage, "s_per_step_1_thread": round(one, 4), "s_per_step_2_threads": round(two, 4),
            "speedup": round(one / two, 2)}


def main() -> None:
    import demo_profile

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/demo_profile"))
    ap.add_argument("--iters", type=int, default=12)
    ap.add_argument("--stages", nargs="*", default=list(STAGES))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    work = args.work.resolve()
    demo_profile.build_inputs(work)
    rows = [time_stage(work, stage, args.iters) for stage in args.stages]
    result = demo_profile.run_record(args.iters, args.out, stages=rows)
    print(f"\n{result['machine']}")
    print("| stage | s/step, 1 thread | s/step, 2 threads | speed-up |")
    print("|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['stage']} | {r['s_per_step_1_thread']:.3f} | {r['s_per_step_2_threads']:.3f} | "
              f"{r['speedup']:.2f}x |")


if __name__ == "__main__":
    main()
