"""Wall-clock time of the whole demo from fresh clones of given commits, one after another (#22 item 3).

    .venv/bin/python benchmarks/demo_wall.py --work /tmp/demo_wall HEAD 22f500b HEAD [--out demo_wall.json]

For each commit in the order given (a commit may be repeated: ``HEAD OLD HEAD`` brackets the old code between two
runs of the new), clones this repository into ``WORK/<n>-<short sha>``, checks the commit out and runs
``snakemake --cores 2`` there, as a user does after the install, with this interpreter's ``bin`` folder first on
``PATH`` (its snakemake and python; ``python -m cpsl`` in the clone imports the clone's package, which is first on
``sys.path``). It records the wall seconds of the ``snakemake`` command, the seconds of each training job (the
workflow's ``benchmarks/*.tsv``) and seed 0's target-val mIoU per stage (``results/summary.csv``), and checks that
each run's ``run_info.json`` files record the commit it was given and no other.

Why: the 2-core VM this was written on runs the same work 20-45% faster or slower from one hour to the next, so one
run's seconds say little about the code. Runs of two commits back to back on the same machine compare the code:
the ratio of their wall times carries over to another machine better than either time does. Run it on an idle
machine, nothing else beside it.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def rev_parse(repo: Path, commit: str) -> str:
    done = subprocess.run(["git", "-C", str(repo), "rev-parse", "--verify", "--quiet", commit + "^{commit}"],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"demo_wall: {commit!r} is not a commit of {repo}")
    return done.stdout.strip()


def job_seconds(results: Path) -> dict[str, float]:
    """Seconds per job from the workflow's benchmark files (``s`` column, the first)."""
    out = {}
    for tsv in sorted(results.glob("**/benchmarks/**/*.tsv")):
        rows = list(csv.reader(tsv.read_text().splitlines(), delimiter="\t"))
        if len(rows) >= 2 and rows[0] and rows[0][0] == "s":
            out[str(tsv.relative_to(results))] = float(rows[-1][0])
    return out


def seed0_miou(results: Path) -> dict[str, float]:
    out = {}
    summary = results / "summary.csv"
    if not summary.exists():
        return out
    with summary.open() as f:
        for row in csv.DictReader(f):
            if row["seed"] == "0" and row["split"] == "target_val" and row.get("selection", "last") == "last":
                out[row["stage"]] = round(float(row["miou"]), 2)
    return out


def recorded_commits(results: Path) -> set[str]:
    commits = set()
    for info in results.glob("**/run_info.json"):
        try:
            data = json.loads(info.read_text())
        except ValueError:
            continue
        if isinstance(data.get("git_commit"), str):
            commits.add(data["git_commit"])
    return commits


def run_one(work: Path, n: int, commit: str, cores: int = 2, snakemake: str = "snakemake", repo: Path = ROOT
            ) -> dict:
    sha = rev_parse(repo, commit)
    clone = work / f"{n}-{sha[:7]}"
    if clone.exists():
        raise SystemExit(f"demo_wall: {clone} exists; give an empty --work folder")
    subprocess.run(["git", "clone", "-q", str(repo), str(clone)], check=True)
    subprocess.run(["git", "-C", str(clone), "checkout", "-q", sha], check=True)
    env = dict(os.environ, PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
    log = clone / "demo_wall.log"
    start = time.time()
    with log.open("w") as f:
        rc = subprocess.run([snakemake, "--cores", str(cores)], cwd=clone, env=env, stdout=f,
                            stderr=subprocess.STDOUT).returncode
    wall = time.time() - start
    results = clone / "results"
    recorded = recorded_commits(results)
    row = {"commit": commit, "sha": sha, "rc": rc, "wall_s": round(wall, 1),
           "start": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(start)),
           "jobs_s": {k: v for k, v in job_seconds(results).items() if "/train_" in k},
           "seed0_target_val": seed0_miou(results),
           "commit_recorded": (recorded == {sha}) if recorded else None}
    print(f"{n}: {commit} ({sha[:7]}) rc {rc} wall {wall:.0f} s, seed 0 {row['seed0_target_val']}", flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("commits", nargs="+", help="commits to run, in this order (repeat one to bracket another)")
    ap.add_argument("--work", type=Path, required=True, help="an empty folder for the clones")
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--out", type=Path, help="write the rows as JSON here")
    ap.add_argument("--snakemake", default="snakemake", help="the snakemake command (default: the one on PATH)")
    ap.add_argument("--repo", type=Path, default=ROOT, help="the repository to clone (default: this one)")
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    rows = [run_one(args.work, n, commit, args.cores, args.snakemake, args.repo)
            for n, commit in enumerate(args.commits)]
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
    return 0 if all(r["rc"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
