"""The workflow through the `slurm` profile on a real SLURM: every rule is an sbatch job, and a training job killed
at its time limit is resubmitted and resumes from its last checkpoint.

Needs a running SLURM with a partition `debug` (`bash tests/slurm/start.sh` as root sets up a single-node one
here; `.ci/run` does that before the test suite). Without one the tests are skipped, unless
CPSL_REQUIRE_SLURM=1 (set by `.ci/run`): then they fail, so CI cannot pass with them skipped.

One tiny workflow run (experiment `slurm_ci`: synth, three prepared splits, source_only training, evaluate, collect)
serves both tests. To kill a training job at its time limit whatever the speed of this machine, the test waits
until the first training job has written its first resumable checkpoint, freezes the training process (SIGSTOP,
as if it were too slow for its limit) and lowers that job's time limit to one minute (`scontrol update
TimeLimit=1`, as a short partition would have it). SLURM then kills the job at its limit (state TIMEOUT), the
profile's `retries` make Snakemake submit it again (with the rule's own runtime), and the new job resumes from
`<stage>/checkpoints/last.pt` and finishes. SLURM checks time limits every 30 s and the executor plugin's status
checks back off by 10 s per round, so the run takes about 3 to 4 minutes.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
PROFILE = REPO / "workflow" / "profiles" / "slurm"
MAX_ITERS = 60

SLURM_CI = {
    "experiments": ["slurm_ci"],
    "resources": {
        "synth": {"threads": 1, "mem_mb": 1000, "runtime": 10},
        "prepare": {"threads": 1, "mem_mb": 1000, "runtime": 10},
        "train": {"threads": 2, "mem_mb": 3000, "runtime": 15},
        "evaluate": {"threads": 1, "mem_mb": 2000, "runtime": 10},
        "stage_product": {"threads": 1, "mem_mb": 2000, "runtime": 10},
        "collect": {"threads": 1, "mem_mb": 1000, "runtime": 10},
    },
    "experiment_settings": {"slurm_ci": {
        "seeds": [0],
        "synth": {"n_source": 8, "n_source_val": 0, "n_target_train": 4, "n_target_val": 4,
                  "height": 64, "width": 128},
        "datasets": {
            "source": {"format": "gta5", "root": "@synth/gta5", "split": "train"},
            "target_train": {"format": "cityscapes", "root": "@synth/cityscapes", "split": "train"},
            "target_val": {"format": "cityscapes", "root": "@synth/cityscapes", "split": "val"},
        },
        "model": {"backbone": "resnet18", "base_width": 8, "head_channels": 16},
        "train": {"data": {"crop": [64, 128], "resize": 128, "batch_size": 2, "workers": 0},
                  "checkpoint_interval": 4, "log_interval": 4},
        "stages": {"source_only": {"max_iters": MAX_ITERS}},
        "inference": {"batch_size": 2, "workers": 0},
    }},
}


def slurm_ready() -> str | None:
    """None if SLURM takes jobs on partition `debug`, else why not."""
    try:
        res = subprocess.run(["sinfo", "-h", "-p", "debug", "-o", "%t"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"sinfo: {err}"
    states = res.stdout.split()
    if res.returncode != 0 or not any(s.rstrip("*~#") in ("idle", "mix", "alloc") for s in states):
        return f"no partition 'debug' with a node up (sinfo: {(res.stdout + res.stderr).strip() or 'nothing'})"
    return None


def our_jobs(workdir: Path, rule: str = "", state: str = "all") -> list[str]:
    """Ids of the queued or running jobs of this test (working directory ``workdir``), of one rule if given."""
    res = subprocess.run(["squeue", "-h", "-t", state, "-o", "%i|%Z|%k"], capture_output=True, text=True)
    jobs = []
    for line in res.stdout.splitlines():
        jobid, wd, comment = (line.split("|") + ["", ""])[:3]
        if wd.rstrip("/") == str(workdir) and comment.startswith(f"rule_{rule}"):
            jobs.append(jobid)
    return jobs


def training_pids(workdir: Path) -> list[int]:
    """The `python -m cpsl train` processes (not their shells) running in ``workdir``."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes()
            cwd = os.readlink(proc / "cwd")
        except OSError:
            continue
        if b"\0-m\0cpsl\0train\0" in cmd and cwd == str(workdir):
            pids.append(int(proc.name))
    return pids


def train_jobs(snakemake_output: str) -> list[str]:
    """SLURM job ids of the training jobs, in submission order."""
    return re.findall(r"submitted with SLURM jobid (\d+) \(log: \S*/rule_train/", snakemake_output)


@pytest.fixture(scope="module")
def slurm_run(tmp_path_factory):
    why = slurm_ready()
    if why:
        if os.environ.get("CPSL_REQUIRE_SLURM") == "1":
            pytest.fail(f"CPSL_REQUIRE_SLURM=1 but SLURM is not usable: {why}")
        pytest.skip(f"no SLURM here ({why}); start one with `bash tests/slurm/start.sh` (root)")

    workdir = tmp_path_factory.mktemp("slurm").resolve()
    (workdir / "slurm_ci.yaml").write_text(yaml.safe_dump(SLURM_CI))
    cmd = [str(BIN / "snakemake"), "-s", str(REPO / "Snakefile"), "-d", str(workdir),
           "--configfile", str(REPO / "config.yaml"), str(workdir / "slurm_ci.yaml"),
           "--workflow-profile", str(PROFILE),
           # this cluster: partition `debug`, no accounts, no accounting database (so squeue, not sacct)
           "--default-resources", "slurm_partition=debug", "--slurm-no-account",
           "--slurm-status-command", "squeue", "--slurm-init-seconds-before-status-checks", "3",
           "--slurm-keep-successful-logs", "--jobs", "2"]
    # the plugin runs Snakemake again inside each job: the job inherits PATH, which must find this venv first
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", VIRTUAL_ENV=str(BIN.parent))
    env.pop("SNAKEMAKE_PROFILE", None)
    stage = workdir / "results/slurm_ci/seed0/source_only"
    start = time.monotonic()
    out_path = workdir / "snakemake.out"
    with out_path.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
        frozen = None
        try:
            while proc.poll() is None:
                if time.monotonic() - start > 540:
                    raise TimeoutError("the SLURM workflow did not finish in 9 minutes")
                if frozen is None and (stage / "checkpoints" / "last.pt").is_file():
                    pids = training_pids(workdir)
                    jobs = our_jobs(workdir, "train", "running")
                    if pids and jobs:
                        # the first training job, after its first checkpoint: stop it, and give it a one-minute
                        # time limit for SLURM to enforce
                        for pid in pids:
                            os.kill(pid, signal.SIGSTOP)
                        subprocess.run(["scontrol", "update", f"JobId={jobs[0]}", "TimeLimit=1"], check=True)
                        frozen = {"pids": pids, "job": jobs[0]}
                time.sleep(0.2)
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
            leftover = our_jobs(workdir, state="pending,running")
            if leftover:
                subprocess.run(["scancel", *leftover], check=False)
    return {"workdir": workdir, "rc": proc.returncode, "output": out_path.read_text(), "frozen": frozen,
            "seconds": time.monotonic() - start}


def test_workflow_runs_as_slurm_jobs(slurm_run):
    output = slurm_run["output"]
    assert slurm_run["rc"] == 0, output[-5000:]
    workdir = slurm_run["workdir"]
    res = workdir / "results"
    assert (res / "summary.csv").is_file() and (res / "summary.md").is_file()
    metrics = json.loads((res / "slurm_ci/seed0/source_only/metrics.json").read_text())
    assert metrics["iteration"] == MAX_ITERS and 0.0 <= metrics["miou"] <= 100.0
    # every rule ran as an sbatch job (the plugin's per-job logs), with the resources config.yaml gives it
    logs = workdir / ".snakemake" / "slurm_logs"
    for rule in ("synth", "prepare", "train", "evaluate", "collect"):
        assert list((logs / f"rule_{rule}").rglob("*.log")), f"no SLURM job of rule {rule}"
    assert len(list((logs / "rule_prepare").rglob("*.log"))) == 3
    # what SLURM granted the training job that completed: config.yaml's resources.train of this experiment
    done = subprocess.run(["scontrol", "show", "job", train_jobs(output)[-1]], capture_output=True, text=True).stdout
    assert "TimeLimit=00:15:00" in done and "Partition=debug" in done, done
    assert re.search(r"NumCPUs=2\b", done) and re.search(r"mem=3000M", done), done
    print(f"SLURM workflow: {slurm_run['seconds']:.0f} s")


def test_training_killed_at_its_time_limit_is_resubmitted_and_resumes(slurm_run):
    output = slurm_run["output"]
    assert slurm_run["rc"] == 0, output[-5000:]
    assert slurm_run["frozen"], "the first training job was not caught running"
    workdir = slurm_run["workdir"]
    # SLURM ended the first job at its time limit; Snakemake (the profile's retries) submitted it again
    killed = slurm_run["frozen"]["job"]
    assert f"SLURM-job '{killed}' failed, SLURM status is: 'TIMEOUT'" in output, output[-5000:]
    assert "Trying to restart job" in output
    assert len(train_jobs(output)) == 2 and train_jobs(output)[0] == killed
    # ... and the second job resumed from the first one's checkpoint instead of starting again
    log = (workdir / "results/slurm_ci/logs/seed0/train_source_only.log").read_text()
    found = re.search(r"resuming from (\S+) at iteration (\d+)", log)
    assert found, log[-3000:]
    assert found.group(1).endswith("source_only/checkpoints/last.pt") and int(found.group(2)) > 0
    summary = json.loads((workdir / "results/slurm_ci/seed0/source_only/train_summary.json").read_text())
    assert summary["resumed_from"] == int(found.group(2))
    # the resumable state is kept at the final iteration
    assert (workdir / "results/slurm_ci/seed0/source_only/checkpoints/last.pt").is_file()
