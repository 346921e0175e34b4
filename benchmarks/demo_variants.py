"""Wall-clock seconds per training step of the demo's stages under the settings that set its cost (#22: the cut).

    .venv/bin/python benchmarks/demo_variants.py --work /tmp/demo_profile [--iters 8] [--out demo_variants.json]

Builds the demo's inputs as ``demo_profile.py`` does (the same ``--work`` folder is reused), then for each row of
``VARIANTS`` builds the stage's method and data as ``cpsl train`` does, with the row's settings written over the
stage's resolved config, and times ``Method.step`` on ``--iters`` prepared batches (the data is not timed) after 5
warm-up steps (stage 1's contrastive term starts once its queue is full: 4 steps at 4,096 rows). Every row of a
stage runs twice, the rows alternating, and the faster round is reported. Threads as in a demo job: one for
source_only (the oracle trains beside it), two for the rest. Run it on an otherwise idle machine.

What it decides: which settings make a step cheaper, so the demo's schedule fits 10 minutes on a 2-core machine.
Every row sets each of the settings it is compared on, so the table does not depend on what config.yaml ships.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

BEFORE = [96, 192]
CUT = [80, 160]
# (stage, row name, settings as dotted keys of the stage's TrainConfig)
VARIANTS: list[tuple[str, str, dict]] = [
    ("source_only", "crop 96x192", {"data.crop": BEFORE}),
    ("source_only", "crop 80x160", {"data.crop": CUT}),
    ("warmup", "crop 96x192", {"data.crop": BEFORE}),
    ("warmup", "crop 80x160", {"data.crop": CUT}),
    ("stage1", "crop 96x192, queue 4,096", {"data.crop": BEFORE, "selflabel.queue_length": 4096}),
    ("stage1", "crop 96x192, queue 2,048", {"data.crop": BEFORE, "selflabel.queue_length": 2048}),
    ("stage1", "crop 96x192, queue 1,024", {"data.crop": BEFORE, "selflabel.queue_length": 1024}),
    ("stage1", "crop 80x160, queue 4,096", {"data.crop": CUT, "selflabel.queue_length": 4096}),
    ("stage1", "crop 80x160, queue 2,048", {"data.crop": CUT, "selflabel.queue_length": 2048}),
    ("stage2", "crop 96x192, label_stride 1", {"data.crop": BEFORE, "distill.label_stride": 1}),
    ("stage2", "crop 96x192, label_stride 4", {"data.crop": BEFORE, "distill.label_stride": 4}),
    ("stage2", "crop 80x160, label_stride 1", {"data.crop": CUT, "distill.label_stride": 1}),
    ("stage2", "crop 80x160, label_stride 4", {"data.crop": CUT, "distill.label_stride": 4}),
    ("stage2", "crop 96x192, label_stride 1, channels_last",
     {"data.crop": BEFORE, "distill.label_stride": 1, "channels_last": True}),
    ("stage2", "crop 96x192, label_stride 1, batch 8 (2x the pixels)",
     {"data.crop": BEFORE, "distill.label_stride": 1, "data.batch_size": 8}),
]
THREADS = {"source_only": 1}


def with_setting(cfg, key: str, value):
    """A copy of ``cfg`` (a tree of config dataclasses) with the dotted ``key`` set to ``value``."""
    head, _, rest = key.partition(".")
    value = with_setting(getattr(cfg, head), rest, value) if rest else value
    return dataclasses.replace(cfg, **{head: value})


def time_rows(work: Path, stage: str, rows: list[tuple[str, dict]], iters: int, warmup: int = 5) -> list[dict]:
    import torch

    from demo_profile import batch_stream, build_stage, stage_config

    torch.set_num_threads(THREADS.get(stage, 2))
    base = stage_config(work, stage)
    built = []
    for name, settings in rows:
        cfg = base
        for key, value in settings.items():
            cfg = with_setting(cfg, key, value)
        info, amp, method, datasets = build_stage(cfg)
        batches = list(itertools.islice(batch_stream(datasets, cfg.data.batch_size, info.device), iters + warmup))
        built.append((name, amp, method, batches))

    seconds: dict[str, list[float]] = {name: [] for name, _ in rows}
    for _round in range(2):
        for name, amp, method, batches in built:
            for i, batch in enumerate(batches):
                if i == warmup:
                    t0 = time.perf_counter()
                method.train_mode()
                method.step(batch)
                amp.update()
            seconds[name].append((time.perf_counter() - t0) / iters)
    first = min(seconds[rows[0][0]])
    return [{"stage": stage, "row": name, "threads": THREADS.get(stage, 2), "s_per_step": round(min(s), 4),
             "vs_first_row": round(min(s) / first, 2)} for name, s in seconds.items()]


def main() -> None:
    import demo_profile

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/demo_profile"))
    ap.add_argument("--iters", type=int, default=8)
    ap.add_argument("--stages", nargs="*", default=list(dict.fromkeys(stage for stage, _, _ in VARIANTS)))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    work = args.work.resolve()
    demo_profile.build_inputs(work)
    results = []
    for stage in args.stages:
        results += time_rows(work, stage, [(n, s) for st, n, s in VARIANTS if st == stage], args.iters)
    result = demo_profile.run_record(args.iters, args.out, rows=results)
    print(f"\n{result['machine']}")
    print("| stage | settings | threads | s/step | vs the stage's first row |")
    print("|---|---|---:|---:|---:|")
    for r in results:
        print(f"| {r['stage']} | {r['row']} | {r['threads']} | {r['s_per_step']:.3f} | {r['vs_first_row']:.2f}x |")


if __name__ == "__main__":
    main()
