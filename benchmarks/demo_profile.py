"""Where the demo's time goes (#22 item 1): one profile of each training stage's iteration, and the per-job costs.

    .venv/bin/python benchmarks/demo_profile.py --work /tmp/demo_profile [--iters 20] [--out demo_profile.json]

1. Builds the demo's inputs once under ``--work`` with the workflow (``snakemake``): the shipped ``demo``
   experiment with fewer images (the same 128 x 256 size) and 2 iterations per stage, so that every stage's
   resolved config (``results/demo/seed0/configs/train_<stage>.yaml``: the shipped model, crop, batch and stage
   settings) and the warm-up's pseudo labels, prototypes and class distribution exist.
2. For each training stage, in this process on one thread (``torch.set_num_threads(1)``, as a demo job runs):
   builds the method and its data exactly as ``cpsl train`` does (``build_method``, ``build_datasets``), runs 3
   iterations to warm up, then ``--iters`` iterations under cProfile. Reports CPU seconds per iteration
   (``time.process_time``; the machine may be shared) and their split by where the time is spent: data (one
   batch from the datasets, in this process: the demo's loader worker does the same work in another process),
   forward (the DeepLab model, student and teachers), discriminator, backward, optimizer step, EMA, Sinkhorn,
   the losses, the rectification and consistency teacher, the rest of ``Method.step`` (sampling, queues, augmentation on tensors, bookkeeping). The numbers
   come from cProfile's cumulative times of the named functions (the categories do not nest).
3. The per-job costs: ``python -c "import cpsl.train.loop"`` (interpreter start-up and imports: every one of the
   demo's 25 jobs pays it), ``snakemake -n`` on the demo (parsing the Snakefile and resolving the configs,
   paid once per run, and again in every SLURM job), and the model and dataset set-up of each stage.

The cProfile overhead inflates the Python-heavy parts; the total per iteration is also measured without it.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import platform
import pstats
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

STAGES = ("source_only", "warmup", "stage1", "stage2", "stage3")
SNAKEMAKE = Path(sys.executable).parent / "snakemake"

# Category -> the (file suffix, function name) pairs whose cumulative time it is.
CATEGORIES = {
    "forward": [("cpsl/models/deeplabv2.py", "forward")],
    "discriminator": [("cpsl/models/discriminator.py", "forward")],
    "backward": [("torch/_tensor.py", "backward"), ("torch/autograd/__init__.py", "grad")],
    "optimizer": [("torch/optim/optimizer.py", "wrapper")],
    "ema": [("cpsl/methods/selflabel.py", "ema_update")],
    "sinkhorn": [("cpsl/methods/sinkhorn.py", "sinkhorn")],
    "losses": [("cpsl/methods/losses.py", "seg_cross_entropy"), ("cpsl/methods/losses.py", "gan_loss"),
               ("cpsl/methods/selflabel.py", "sce_loss"), ("cpsl/methods/selflabel.py", "consistency_loss"),
               ("cpsl/methods/selflabel.py", "contrastive_loss"), ("cpsl/methods/distill.py", "kd_loss")],
    "rectify": [("cpsl/methods/selflabel.py", "rectify"), ("cpsl/methods/selflabel.py", "consistency_teacher")],
}


def overlay() -> dict:
    stages = {s: {"max_iters": 2} for s in ("source_only", "warmup", "oracle", "stage1", "stage2", "stage3")}
    return {"experiments": ["demo"], "experiment_settings": {"demo": {
        "synth": {"n_source": 24, "n_source_val": 4, "n_target_train": 24, "n_target_val": 8},
        "train": {"checkpoint_interval": 2}, "stages": stages}}}


def build_inputs(work: Path) -> None:
    if (work / "results/demo/seed0/stage3/checkpoint.pt").is_file():
        return
    work.mkdir(parents=True, exist_ok=True)
    (work / "overlay.yaml").write_text(yaml.safe_dump(overlay()))
    cmd = [str(SNAKEMAKE), "-s", str(ROOT / "Snakefile"), "-d", str(work), "--configfile", str(ROOT / "config.yaml"),
           str(work / "overlay.yaml"), "--cores", "2", "--quiet"]
    subprocess.run(cmd, check=True)


def categorise(stats: pstats.Stats) -> dict[str, float]:
    """Cumulative seconds per category (the outermost call of a named function; recursion counted once)."""
    out = dict.fromkeys(CATEGORIES, 0.0)
    for (file, _line, func), (_cc, _nc, _tt, ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        for cat, names in CATEGORIES.items():
            if any(file.endswith(suffix) and func == name for suffix, name in names):
                out[cat] += ct
    return out


def stage_config(work: Path, stage: str):
    """The demo stage's resolved config, as the workflow wrote it under ``work``; the process then runs inside
    ``work``, since the configs name their inputs relative to the workflow's directory."""
    from cpsl.config import TrainConfig, load_file

    os.chdir(work)
    return load_file(TrainConfig, work / f"results/demo/seed0/configs/train_{stage}.yaml")


def build_stage(cfg) -> tuple:
    """(process info, AMP, method, datasets) of one stage on the CPU, built as ``cpsl train`` builds them."""
    from cpsl.methods import Amp, TrainContext, build_method
    from cpsl.train import dist as D
    from cpsl.train.data import build_datasets

    info = D.setup("cpu")
    D.seed_everything(cfg.seed)
    amp = Amp(cfg.amp, info.device)
    method = build_method(cfg, TrainContext(info.device, info, amp))
    return info, amp, method, build_datasets(cfg, method.domains, cfg.model.n_class)


def batch_stream(datasets: dict, batch_size: int, device):
    """The training batches in order, without end: batch j holds items j x batch_size ... of every domain (the
    dataset's index wraps; the second number seeds the item's augmentation)."""
    import torch

    from cpsl.train.loop import to_device

    start = 0
    while True:
        batch = {domain: torch.utils.data.default_collate([ds[((start + i) % len(ds), start + i)]
                                                           for i in range(batch_size)])
                 for domain, ds in datasets.items()}
        start += batch_size
        yield to_device(batch, device)


def profile_stage(work: Path, stage: str, iters: int) -> dict:
    import torch

    cfg = stage_config(work, stage)
    torch.set_num_threads(1)
    t0 = time.process_time()
    info, amp, method, datasets = build_stage(cfg)
    setup_s = time.process_time() - t0
    batch_size = cfg.data.batch_size
    stream = batch_stream(datasets, batch_size, info.device)

    def one(batch: dict) -> None:
        method.train_mode()
        method.step(batch)
        amp.update()
        for sched in method.schedulers.values():
            sched.step()

    for _ in range(3):
        one(next(stream))
    # data and step, without the profiler
    t_data = t_step = 0.0
    for _ in range(iters):
        t0 = time.process_time()
        batch = next(stream)
        t1 = time.process_time()
        one(batch)
        t2 = time.process_time()
        t_data += t1 - t0
        t_step += t2 - t1
    # the same under cProfile, for the split
    batches = [next(stream) for _ in range(iters)]
    prof = cProfile.Profile(time.process_time)
    prof.enable()
    for batch in batches:
        one(batch)
    prof.disable()
    stats = pstats.Stats(prof)
    total = stats.total_tt  # type: ignore[attr-defined]
    cats = categorise(stats)
    cats["rest"] = max(0.0, total - sum(cats.values()))
    return {"stage": stage, "setup_cpu_s": round(setup_s, 3),
            "data_cpu_s_per_iter": round(t_data / iters, 4), "step_cpu_s_per_iter": round(t_step / iters, 4),
            "split_of_step": {k: round(v / total, 3) for k, v in cats.items()},
            "profiled_step_cpu_s_per_iter": round(total / iters, 4), "batch_size": batch_size,
            "crop": list(cfg.data.crop)}


def job_costs(work: Path) -> dict:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import cpsl.train.loop, cpsl.inference"], check=True, cwd=ROOT)
    imports = time.perf_counter() - t0
    t0 = time.perf_counter()
    subprocess.run([str(SNAKEMAKE), "-s", str(ROOT / "Snakefile"), "-d", str(work / "dry"), "--configfile",
                    str(ROOT / "config.yaml"), "-n", "--quiet"], check=True, capture_output=True)
    dry = time.perf_counter() - t0
    return {"python_start_and_imports_s": round(imports, 2), "snakemake_parse_dry_run_s": round(dry, 2)}


def run_record(iters: int, out: Path | None, **parts) -> dict:
    """A benchmark run's record: the machine (architecture, cores, load average now), ``iters`` and ``parts``,
    written to ``out`` as JSON when it is given (shared by the demo benchmarks)."""
    load = os.getloadavg()
    result = {"machine": f"{platform.machine()} {os.cpu_count()} cores, load {load[0]:.1f}", "iters": iters, **parts}
    if out:
        out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/demo_profile"))
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--stages", nargs="*", default=list(STAGES))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    work = args.work.resolve()
    build_inputs(work)
    costs = job_costs(work)
    rows = []
    for stage in args.stages:
        rows.append(profile_stage(work, stage, args.iters))
        print(json.dumps(rows[-1]), flush=True)
    result = run_record(args.iters, args.out, job_costs=costs, stages=rows)
    cats = list(CATEGORIES) + ["rest"]
    print(f"\n{result['machine']}; per-job: {costs}")
    print("| stage | data CPU-s/iter | step CPU-s/iter | " + " | ".join(cats) + " |")
    print("|---|---:|---:|" + "---:|" * len(cats))
    for r in rows:
        print(f"| {r['stage']} | {r['data_cpu_s_per_iter']:.3f} | {r['step_cpu_s_per_iter']:.3f} | "
              + " | ".join(f"{100 * r['split_of_step'][c]:.0f}%" for c in cats) + " |")


if __name__ == "__main__":
    main()
