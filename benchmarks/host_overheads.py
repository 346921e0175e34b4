"""What the demo's jobs pay outside the network's arithmetic, with glibc's malloc thresholds tuned and not (#22).

    .venv/bin/python benchmarks/host_overheads.py --work /tmp/demo_profile [--iters 100] [--stages stage1 stage2]
        [--rounds 2] [--out host_overheads.json]

Builds the demo's inputs as ``demo_profile.py`` does (the same ``--work`` folder is reused). Then, for each stage:

* **job**: ``python -m cpsl train`` on the stage's resolved config, shortened to ``--iters`` iterations (a fresh
  output folder each time, threads as the demo gives the stage), once with ``CPSL_MALLOC_TUNING=0`` (glibc's
  defaults) and once tuned (``cpsl.malloc``), alternating for ``--rounds`` rounds: wall seconds of the whole
  process, user and system CPU seconds and minor page faults of it and its loader workers (``getrusage`` of the
  children), and the final weights' checksum (the two settings must give the same weights).
* **contrastive**: stage 1's ``contrastive_loss`` forward and backward at the demo's shape (4 images x 256
  anchors x the queue's rows, 32 dims) in a fresh process, tuned and not (stage 1 only).
* **loader**: the training process's CPU seconds per fetched batch from the stage's loaders (one worker per
  domain, as in a demo job): what receiving a batch from the worker costs it.

Run it on an otherwise idle machine; the rounds alternate so that a drift of the machine's speed hits both.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

THREADS = {"source_only": 1, "oracle": 1}   # the demo's chain jobs from the warm-up on run on two threads

CONTRAST = """
import sys, time, torch, torch.nn.functional as F
from cpsl.malloc import tune_malloc
tune_malloc()
from cpsl.methods.selflabel import contrastive_loss
torch.set_num_threads({threads})
g = torch.Generator().manual_seed(0)
a = F.normalize(torch.randn(4, 256, 32, generator=g), dim=-1)
y = torch.randint(0, 19, (4, 256), generator=g)
ql = torch.randint(0, 19, ({rows},), generator=g)
q = F.normalize(torch.randn({rows}, 32, generator=g), dim=-1)
best = []
for r in range(4):
    t = time.perf_counter()
    for _ in range(10):
        x = a.clone().requires_grad_()
        contrastive_loss(x, y, q, ql, 0.08).backward()
    best.append((time.perf_counter() - t) / 10)
print(min(best[1:]))
"""


def short_config(work: Path, stage: str, iters: int, dest: Path) -> Path:
    """The stage's resolved config with ``max_iters`` set to ``iters`` (and checkpoints at the end only)."""
    import yaml

    cfg = yaml.safe_load((work / f"results/demo/seed0/configs/train_{stage}.yaml").read_text())
    cfg["max_iters"] = iters
    cfg["checkpoint_interval"] = iters
    dest.write_text(yaml.safe_dump(cfg))
    return dest


def malloc_env(tuned: bool) -> dict[str, str]:
    """This process's environment for a child process with glibc's malloc thresholds tuned (``cpsl.malloc``) or
    left at glibc's defaults (``CPSL_MALLOC_TUNING=0``)."""
    env = {k: v for k, v in os.environ.items() if k != "CPSL_MALLOC_TUNING"}
    return env if tuned else {**env, "CPSL_MALLOC_TUNING": "0"}


def weights_digest(path: Path) -> str:
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)["model"]
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def run_job(work: Path, config: Path, stage: str, tuned: bool) -> dict:
    """One ``cpsl train`` process: wall, CPU and faults of it and its loader workers, and its weights."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        env = {**malloc_env(tuned), "OMP_NUM_THREADS": str(THREADS.get(stage, 2)), "CUDA_VISIBLE_DEVICES": ""}
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "cpsl", "train", "--config", str(config), "--out", str(out)],
                       cwd=work, env=env, check=True, capture_output=True)
        wall = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        return {"tuned": tuned, "wall_s": round(wall, 2), "user_s": round(after.ru_utime - before.ru_utime, 2),
                "sys_s": round(after.ru_stime - before.ru_stime, 2),
                "minor_faults": after.ru_minflt - before.ru_minflt,
                "weights": weights_digest(out / "checkpoint.pt")}


def contrastive_seconds(rows: int, threads: int, tuned: bool) -> float:
    out = subprocess.run([sys.executable, "-c", CONTRAST.format(threads=threads, rows=rows)], env=malloc_env(tuned),
                         check=True, capture_output=True, text=True, cwd=ROOT).stdout
    return float(out.strip().splitlines()[-1])


def loader_cpu_per_batch(work: Path, stage: str, n: int = 100) -> float:
    """The training process's CPU seconds per batch fetched from the stage's loaders (one worker each)."""
    import torch

    from cpsl.train.data import build_loaders
    from demo_profile import build_stage, stage_config

    torch.set_num_threads(1)
    cfg = stage_config(work, stage)
    _, _, _, datasets = build_stage(cfg)
    its = {d: iter(ld) for d, ld in build_loaders(cfg, datasets, rank=0, world_size=1, start_iter=0).items()}
    for _ in range(5):
        [next(i) for i in its.values()]
    t0 = time.process_time()
    for _ in range(n):
        [next(i) for i in its.values()]
    return (time.process_time() - t0) / n


def main() -> None:
    from demo_profile import build_inputs, run_record

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/demo_profile"))
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--stages", nargs="*", default=["stage1", "stage2"])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    work = args.work.resolve()
    build_inputs(work)
    jobs, contrast, loaders = [], [], {}
    for stage in args.stages:
        config = short_config(work, stage, args.iters, work / f"host_overheads_{stage}.yaml")
        for r in range(args.rounds):
            for tuned in ((False, True) if r % 2 == 0 else (True, False)):
                jobs.append({"stage": stage, **run_job(work, config, stage, tuned)})
                print(jobs[-1], flush=True)
        if stage == "stage1":
            for rows in (4096, 2048):
                for tuned in (False, True):
                    contrast.append({"rows": rows, "threads": 2, "tuned": tuned,
                                     "s": round(contrastive_seconds(rows, 2, tuned), 4)})
                    print(contrast[-1], flush=True)
        loaders[stage] = round(loader_cpu_per_batch(work, stage), 5)
        print(stage, "loader CPU-s/batch", loaders[stage], flush=True)
    os.chdir(ROOT)
    result = run_record(args.iters, args.out, jobs=jobs, contrastive=contrast, loader_cpu_s_per_batch=loaders)
    print(f"\n{result['machine']}; {args.iters} iterations per job, {args.rounds} rounds")
    print("| stage | malloc | wall s | user s | sys s | minor faults | same weights |")
    print("|---|---|---:|---:|---:|---:|---|")
    for stage in args.stages:
        rows = [j for j in jobs if j["stage"] == stage]
        same = len({j["weights"] for j in rows}) == 1
        for tuned in (False, True):
            sel = [j for j in rows if j["tuned"] == tuned]
            med = {k: statistics.median(j[k] for j in sel) for k in ("wall_s", "user_s", "sys_s", "minor_faults")}
            print(f"| {stage} | {'tuned' if tuned else 'glibc default'} | {med['wall_s']:.1f} | {med['user_s']:.1f} "
                  f"| {med['sys_s']:.2f} | {med['minor_faults']:,.0f} | {'yes' if same else 'NO'} |")
    if contrast:
        print("\n| contrastive fwd+bwd, queue rows | glibc default | tuned |\n|---|---:|---:|")
        for rows in (4096, 2048):
            t = {c["tuned"]: c["s"] for c in contrast if c["rows"] == rows}
            print(f"| {rows:,} | {1000 * t[False]:.1f} ms | {1000 * t[True]:.1f} ms |")
    print("\nloader: training-process CPU per batch: "
          + ", ".join(f"{s} {1000 * v:.2f} ms" for s, v in loaders.items()))


if __name__ == "__main__":
    main()
