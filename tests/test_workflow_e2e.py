"""End to end: the Snakemake workflow on a tiny synthetic pair, then a one-setting rerun.

Runs the real Snakefile (synth -> prepare -> source_only / warmup / oracle -> evaluate -> warm-up products ->
collect) with a tiny config layered over the shipped config.yaml, in a temporary working directory.
"""

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
SNAKEMAKE = Path(sys.executable).parent / "snakemake"

TINY = {
    "experiments": ["demo"],
    "experiment_settings": {"demo": {
        "synth": {"n_source": 12, "n_source_val": 4, "n_target_train": 8, "n_target_val": 4,
                  "height": 64, "width": 128},
        "model": {"backbone": "resnet18", "base_width": 8, "head_channels": 16},
        "train": {"data": {"crop": [64, 128], "resize": 128, "batch_size": 2, "workers": 0},
                  "checkpoint_interval": 2},
        "stages": {
            "source_only": {"max_iters": 3}, "warmup": {"max_iters": 3}, "oracle": {"max_iters": 3},
            "stage1": {"max_iters": 3, "selflabel": {"pixels_per_image": 16, "queue_length": 64}},
            # the paper's stage-2 student (a backbone with bn_pretrain and a new head), not the shipped demo's
            # "@stage1" whole network: the source-only backbone stands in for SimCLRv2
            "stage2": {"max_iters": 3, "init_checkpoint": None, "model": {"bn_pretrain": True, "init": "@source_only"},
                       "distill": {"threshold": 0.2}},
            "stage3": {"max_iters": 3, "model": {"bn_pretrain": True}, "distill": {"threshold": 0.2}},
        },
        "inference": {"batch_size": 2, "workers": 0},
    }},
}


def snakemake(workdir: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [str(SNAKEMAKE), "-s", str(REPO / "Snakefile"), "-d", str(workdir), "--configfile",
           str(REPO / "config.yaml"), str(workdir / "tiny.yaml"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def job_counts(dry_run_output: str) -> dict[str, int]:
    block = dry_run_output.split("Job stats:")[1].split("\n\n")[0]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", block, re.M)}


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("wf")
    (workdir / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    res = snakemake(workdir, "--cores", "2")
    assert res.returncode == 0, res.stderr[-3000:]
    return workdir


def test_demo_workflow_builds_the_results_table(demo_run):
    res = demo_run / "results"
    rows = list(csv.DictReader((res / "summary.csv").open()))
    assert [(r["stage"], r["split"]) for r in rows] == [
        ("source_only", "target_val"), ("warmup", "target_val"), ("stage1", "target_val"),
        ("stage2", "target_val"), ("stage3", "target_val"), ("oracle", "target_val"),
        ("source_only", "source_val")]
    for r in rows:
        assert 0.0 <= float(r["miou"]) <= 100.0 and r["experiment"] == "demo" and r["seed"] == "0"
    m = json.loads((res / "demo/seed0/warmup/metrics.json").read_text())
    assert m["iteration"] == 3 and m["n_class"] == 19 and m["selection"] == "last"
    # each step recorded what it ran with
    recorded = yaml.safe_load((res / "demo/seed0/warmup/config.yaml").read_text())
    assert recorded["stage"] == "warmup" and recorded["max_iters"] == 3
    info = json.loads((res / "demo/seed0/warmup/run_info.json").read_text())
    assert info["step"] == "train"
    # gpu: auto, resolved once for the run: the device each network step ran on follows that answer
    auto = info["gpu_auto"]
    assert auto["resolved"] in (0, 1) and auto["reason"]
    for path in ("warmup/run_info.json", "stage1/run_info.json", "warmup/pseudo_soft/run_info.json"):
        other = json.loads((res / "demo/seed0" / path).read_text())
        assert other["gpu_auto"] == auto and other["device"].startswith("cuda:0" if auto["resolved"] else "cpu")
    # the stage-1 inputs from the warm-up model exist in their formats
    assert (res / "demo/seed0/warmup/prototypes/prototypes.pt").is_file()
    assert (res / "demo/seed0/warmup/class_dist/class_distribution.npy").is_file()
    assert len(list((res / "demo/seed0/warmup/pseudo_soft").rglob("*.npz"))) == 8
    # the chain: stage 1 from the warm-up model, stage 2 taught by stage 1, stage 3 from and taught by stage 2
    s1 = yaml.safe_load((res / "demo/seed0/stage1/config.yaml").read_text())
    # paths in the resolved configs are as config.yaml gives them (results_dir is relative to the workdir)
    assert s1["init_checkpoint"] == "results/demo/seed0/warmup/checkpoint.pt"
    assert len(list((res / "demo/seed0/stage1/pseudo_hard").rglob("*_conf.png"))) == 8
    s3 = json.loads((res / "demo/seed0/stage3/train_summary.json").read_text())
    assert s3["student_init"] == "checkpoint:results/demo/seed0/stage2/checkpoint.pt"
    s2 = json.loads((res / "demo/seed0/stage2/train_summary.json").read_text())   # TINY's "@source_only"
    assert s2["student_init"] == "backbone:results/demo/seed0/source_only/checkpoint.pt"
    assert s3["teacher_bn_pretrain"] is True
    # logs and benchmarks for every rule
    assert (res / "demo/logs/seed0/train_warmup.log").is_file()
    # the progress bars in the rule logs are plain lines (no in-place redraws behind carriage returns)
    for name, final in (("train_warmup", "warmup: 100%"), ("pseudo_soft_warmup", "pseudo-soft: 100%")):
        log = (res / f"demo/logs/seed0/{name}.log").read_text()
        assert "\r" not in log, name
        assert any(line.startswith(final) for line in log.splitlines()), log[-2000:]
    assert (res / "demo/benchmarks/seed0/train_warmup.tsv").is_file()
    assert (res / "plots/demo_per_class.png").is_file()
    # target-val predictions of every stage in the Cityscapes palette, side by side
    assert json.loads((res / "demo/seed0/stage3/samples/index.json").read_text())[0]["prediction"].endswith(".png")
    assert (res / "plots/demo_seed0_samples.png").is_file()


def test_report_shows_the_table_and_plots(demo_run):
    res = snakemake(demo_run, "--report", "report.html")
    assert res.returncode == 0, res.stderr[-2000:]
    html = (demo_run / "report.html").read_text(errors="replace")
    for name in ("summary.csv", "demo_per_class.png", "demo_seed0_curves.png", "demo_seed0_samples.png"):
        assert name in html, name


def test_nothing_left_to_do_after_a_complete_run(demo_run):
    res = snakemake(demo_run, "-n")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "Nothing to be done" in res.stdout + res.stderr


@pytest.mark.parametrize(
    "stage, key, value, expected",
    [
        ("oracle", "max_iters", 4, {"train": 1, "evaluate": 1, "collect": 1, "all": 1, "total": 4}),
        # source_only and the whole adapted chain: the shipped warm-up starts from it ("@source_only"), so the
        # warm-up's products, stages 1-3 and stage 1-2's hard labels follow (TINY's stage-2 backbone is from it too)
        ("source_only", "max_iters", 4, {"train": 5, "stage_product": 5, "evaluate": 5, "evaluate_split": 1,
                                         "collect": 1, "all": 1, "total": 18}),
        # stage 1 and everything downstream of it (its hard labels, stages 2-3, their evaluations), nothing
        # upstream (no synth, prepare, warm-up or warm-up products)
        ("stage1", "selflabel", {"pixels_per_image": 16, "queue_length": 64, "sl_weight": 0.2},
         {"train": 3, "stage_product": 2, "evaluate": 3, "collect": 1, "all": 1, "total": 10}),
    ],
)
def test_changing_one_stage_setting_reruns_that_stage_and_its_dependents_only(demo_run, stage, key, value,
                                                                              expected):
    changed = json.loads(json.dumps(TINY))
    changed["experiment_settings"]["demo"]["stages"][stage][key] = value
    (demo_run / "tiny.yaml").write_text(yaml.safe_dump(changed))
    try:
        res = snakemake(demo_run, "-n")
        assert res.returncode == 0, res.stderr[-2000:]
        assert job_counts(res.stdout) == expected
        assert f"wildcards: exp=demo, seed=0, stage={stage}" in res.stdout
    finally:
        (demo_run / "tiny.yaml").write_text(yaml.safe_dump(TINY))


def _paper_overlay(workdir: Path, roots: dict[str, str | None], **model) -> None:
    sets = {"gta5_cityscapes": {"datasets": {role: {"root": root} for role, root in roots.items()}}}
    if model:
        sets["gta5_cityscapes"]["model"] = model
    (workdir / "tiny.yaml").write_text(yaml.safe_dump({"experiment_settings": sets}))


def test_paper_preset_dry_run_lists_the_full_chain(tmp_path):
    roots = {role: str(tmp_path / name) for role, name in
             (("source", "GTA5"), ("target_train", "cityscapes"), ("target_val", "cityscapes"))}
    for root in roots.values():
        Path(root).mkdir(exist_ok=True)
    # without ImageNet weights: one line, before any job (not 90,000 iterations from random weights)
    _paper_overlay(tmp_path, roots, init=None)
    res = snakemake(tmp_path, "-n", "--config", "experiments=[gta5_cityscapes]")
    assert res.returncode == 1
    assert ("cpsl-pipeline: error: experiment_settings.gta5_cityscapes.stages.source_only.model.init: not set for "
            "a resnet101 (the paper's network)") in res.stderr
    _paper_overlay(tmp_path, roots)  # as shipped: init: imagenet
    res = snakemake(tmp_path, "-n", "--config", "experiments=[gta5_cityscapes]")
    assert res.returncode == 0, res.stderr[-2000:]
    # the ImageNet file (once); prepare x3; source_only, warmup, oracle, stage1-3; pseudo-soft, prototypes,
    # class-dist, pseudo-hard x2; one target-val evaluation per stage; the table
    assert job_counts(res.stdout) == {"fetch_weights": 1, "prepare": 3, "train": 6, "stage_product": 5,
                                      "evaluate": 6, "collect": 1, "all": 1, "total": 23}
    weights = Path("results") / "weights" / "resnet101-5d3b4d8f.pth"  # relative to the working directory
    s0 = yaml.safe_load((tmp_path / "results/gta5_cityscapes/seed6523/configs/train_source_only.yaml").read_text())
    assert s0["model"]["init"] == str(weights) and s0["model"]["init_format"] == "torchvision"
    for stage in ("source_only", "warmup", "oracle", "stage1", "stage2", "stage3"):
        assert f"wildcards: exp=gta5_cityscapes, seed=6523, stage={stage}" in res.stdout, stage
    s2 = yaml.safe_load((tmp_path / "results/gta5_cityscapes/seed6523/configs/train_stage2.yaml").read_text())
    assert s2["distill"]["kd_mode"] == "reference" and s2["distill"]["threshold"] == 0.95
    assert s2["model"]["bn_pretrain"] is True and s2["optim"]["backbone_lr_mult"] == 3.0


def test_paper_preset_without_a_dataset_root_names_the_key(tmp_path):
    _paper_overlay(tmp_path, {"source": None})
    res = snakemake(tmp_path, "-n", "--config", "experiments=[gta5_cityscapes]")
    assert res.returncode != 0
    assert "config: experiment_settings.gta5_cityscapes.datasets.source.root: dataset root is not set" in res.stderr


@pytest.mark.parametrize("sig", ["SIGINT", "SIGKILL"])
def test_killed_training_resumes_when_the_workflow_is_started_again(tmp_path, sig):
    """Ctrl-C (SIGINT) or a crash (SIGKILL of Snakemake and its jobs, then `snakemake --unlock`) during a
    training job: starting the workflow again resumes that stage from its last checkpoint."""
    import os
    import signal
    import time

    slow = json.loads(json.dumps(TINY))
    slow["experiment_settings"]["demo"]["stages"]["source_only"] = {"max_iters": 60}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(slow))
    target = "results/demo/seed0/source_only/checkpoint.pt"
    last = tmp_path / "results/demo/seed0/source_only/checkpoints/last.pt"
    cmd = [str(SNAKEMAKE), "-s", str(REPO / "Snakefile"), "-d", str(tmp_path), "--configfile",
           str(REPO / "config.yaml"), str(tmp_path / "tiny.yaml"), "--cores", "1", target]
    # Ctrl-C as in a terminal: SIGINT at its default disposition in Snakemake and its jobs, even when this test
    # runs in the background of a non-interactive shell (`bash .ci/run &`), which starts it with SIGINT ignored
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 300
        while not last.exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert last.exists(), "training never wrote a checkpoint"
        if sig == "SIGINT":
            os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in the terminal reaches the whole process group
        else:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert not (tmp_path / target).exists()
    if sig == "SIGKILL":  # Snakemake had no chance to remove its lock
        assert snakemake(tmp_path, "--unlock").returncode == 0
    res = snakemake(tmp_path, "--cores", "1", target)
    assert res.returncode == 0, res.stderr[-3000:]
    log = (tmp_path / "results/demo/logs/seed0/train_source_only.log").read_text()
    resumed = re.search(r"resuming from \S+last\.pt at iteration (\d+)", log)
    assert resumed and 0 < int(resumed.group(1)) < 60, log[-2000:]
    summary = json.loads((tmp_path / "results/demo/seed0/source_only/train_summary.json").read_text())
    assert summary["iterations"] == 60 and summary["resumed_from"] == int(resumed.group(1))
