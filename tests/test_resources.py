"""Threads and resources per rule from config.yaml, the command that launches a step (CPU, one GPU, torchrun on
several), the visible-GPU check in front of torchrun, and the two workflow profiles."""

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cpsl import workflow as W
from cpsl.errors import ConfigError, CpslError
from cpsl.gpus import check_gpus
from tests.test_workflow_e2e import TINY

REPO = Path(__file__).resolve().parent.parent
SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"
PY = sys.executable
SNAKEMAKE = Path(sys.executable).parent / "snakemake"


@pytest.fixture()
def shipped():
    return yaml.safe_load((REPO / "config.yaml").read_text())


# --- resources from config.yaml ----------------------------------------------------------------------------------

def test_shipped_resources_demo_on_cpu_and_paper_presets_on_one_gpu(shipped):
    for kind in W.RULE_KINDS[:-1]:
        demo = W.rule_resources(shipped, kind, "demo")
        # two cores: one thread per job so that two demo jobs run side by side (synth uses both)
        assert demo["gpu"] == 0 and demo["threads"] == (2 if kind == "synth" else 1)
    for exp in ("gta5_cityscapes", "synthia_cityscapes"):
        train = W.rule_resources(shipped, "train", exp)
        assert train["gpu"] == 1 and train["mem_mb"] >= 32000 and train["runtime"] >= 24 * 60
        assert W.rule_resources(shipped, "evaluate", exp)["gpu"] == 1
        assert W.rule_resources(shipped, "prepare", exp)["gpu"] == 0
    assert W.rule_resources(shipped, "collect")["gpu"] == 0
    resolved = W.check_resources(shipped)
    assert set(resolved) == {"collect"} | {f"demo/{k}" for k in W.RULE_KINDS[:-1]}


def test_experiment_settings_override_the_top_level_per_key(shipped):
    shipped["resources"]["train"] = {"threads": 4, "mem_mb": 9000, "runtime": 100, "gpu": 0}
    shipped["experiment_settings"]["demo"]["resources"] = {"train": {"gpu": 2, "runtime": 300}}
    W.check_schema(shipped, SCHEMA)
    assert W.rule_resources(shipped, "train", "demo") == {"threads": 4, "mem_mb": 9000, "runtime": 300, "gpu": 2}
    assert W.rule_resources(shipped, "train") == {"threads": 4, "mem_mb": 9000, "runtime": 100, "gpu": 0}


def test_built_in_defaults_without_a_resources_section(shipped):
    del shipped["resources"]
    W.check_schema(shipped, SCHEMA)
    assert W.rule_resources(shipped, "prepare", "demo") == W.DEFAULT_RESOURCES
    with pytest.raises(ValueError, match="unknown rule kind 'evaluate_split'"):
        W.rule_resources(shipped, "evaluate_split", "demo")


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c["resources"]["train"].update(gpus=1), "config: resources.train.gpus: unknown setting"),
        (lambda c: c["resources"].update(training={}), "config: resources.training: unknown setting"),
        (lambda c: c["resources"]["train"].update(gpu=-1), "config: resources.train.gpu: -1 is less than the minimum"),
        (lambda c: c["resources"]["synth"].update(runtime=0),
         "config: resources.synth.runtime: 0 is less than the minimum of 1"),
        (lambda c: c["resources"]["prepare"].update(threads="many"),
         "config: resources.prepare.threads: 'many' is not of type 'integer'"),
        (lambda c: c["experiment_settings"]["demo"].update(resources={"collect": {"threads": 1}}),
         "config: experiment_settings.demo.resources.collect: unknown setting"),
        (lambda c: c["experiment_settings"]["demo"].update(resources={"train": {"mem": 10}}),
         "config: experiment_settings.demo.resources.train.mem: unknown setting"),
    ],
)
def test_resource_schema_errors_name_the_key(shipped, edit, message):
    edit(shipped)
    with pytest.raises(ConfigError) as err:
        W.check_schema(shipped, SCHEMA)
    assert str(err.value).startswith(message)


def test_only_training_may_use_several_gpus(shipped):
    shipped["experiment_settings"]["demo"]["resources"] = {"evaluate": {"gpu": 2}}
    with pytest.raises(ConfigError, match=r"^config: experiment_settings\.demo\.resources\.evaluate\.gpu: 2: only "
                                          r"training runs on several GPUs"):
        W.check_resources(shipped)
    shipped["experiment_settings"]["demo"]["resources"] = {}
    shipped["resources"]["stage_product"]["gpu"] = 4
    with pytest.raises(ConfigError, match=r"^config: resources\.stage_product\.gpu: 4"):
        W.check_resources(shipped)


# --- the launch command ------------------------------------------------------------------------------------------

def test_step_command_cpu_one_gpu_and_torchrun():
    assert W.step_command("/v/bin/python", "train", 2, 0) == \
        "OMP_NUM_THREADS=2 CUDA_VISIBLE_DEVICES= /v/bin/python -m cpsl train"
    assert W.step_command("/v/bin/python", "evaluate", 8, 1) == "OMP_NUM_THREADS=8 /v/bin/python -m cpsl evaluate"
    assert W.step_command("/v/bin/python", "train", 16, 4) == (
        "/v/bin/python -m cpsl.gpus 4 && OMP_NUM_THREADS=4 /v/bin/python -m torch.distributed.run --standalone "
        "--nproc_per_node 4 -m cpsl train")
    # at least one thread per process; a Python path with a space stays one word
    assert "OMP_NUM_THREADS=1 '/my venv/python' -m torch.distributed.run" in W.step_command("/my venv/python",
                                                                                               "train", 1, 2)
    with pytest.raises(ValueError, match="one GPU at most"):
        W.step_command("/v/bin/python", "pseudo-hard", 2, 2)


# --- the visible-GPU check ---------------------------------------------------------------------------------------

def test_gpu_check_names_resources_gpu_and_cuda_visible_devices():
    check_gpus(2, visible=2, env={})
    check_gpus(1, visible=4, env={"CUDA_VISIBLE_DEVICES": "0,1,2,3"})
    with pytest.raises(CpslError) as err:
        check_gpus(2, visible=1, env={"CUDA_VISIBLE_DEVICES": "3"})
    msg = str(err.value)
    assert msg.startswith("resources.gpu is 2 but 1 CUDA device(s) are visible (CUDA_VISIBLE_DEVICES='3')")
    assert "\n" not in msg
    with pytest.raises(CpslError, match=r"CUDA_VISIBLE_DEVICES=unset"):
        check_gpus(8, visible=0, env={})


def test_gpu_check_command_line():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    ok = subprocess.run([PY, "-m", "cpsl.gpus", "0"], capture_output=True, text=True, env=env)
    assert ok.returncode == 0 and ok.stderr == ""
    bad = subprocess.run([PY, "-m", "cpsl.gpus", "1"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2
    assert bad.stderr.splitlines() == [
        "cpsl: error: resources.gpu is 1 but 0 CUDA device(s) are visible (CUDA_VISIBLE_DEVICES=''): run on a "
        "machine or SLURM allocation with 1 GPUs, or lower resources.gpu of this rule in config.yaml"]


def test_multi_gpu_training_without_the_gpus_stops_before_torchrun(tmp_path):
    """The rule's shell command for gpu=2 where no GPU is visible: one line in the log, torchrun never starts."""
    cmd = W.step_command(PY, "train", 2, 2)
    log = tmp_path / "train.log"
    shell = f"{{ {cmd} --config {tmp_path}/none.yaml --out {tmp_path}/out; }} > {log} 2>&1"
    res = subprocess.run(["bash", "-c", shell], env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert res.returncode == 2
    assert log.read_text().splitlines() == [
        "cpsl: error: resources.gpu is 2 but 0 CUDA device(s) are visible (CUDA_VISIBLE_DEVICES=''): run on a "
        "machine or SLURM allocation with 2 GPUs, or lower resources.gpu of this rule in config.yaml"]
    assert not (tmp_path / "out").exists()


# --- the rules, through Snakemake (dry runs) ---------------------------------------------------------------------

def dry_run(workdir: Path, settings: dict, *args: str) -> subprocess.CompletedProcess:
    (workdir / "tiny.yaml").write_text(yaml.safe_dump(settings))
    cmd = [str(SNAKEMAKE), "-s", str(REPO / "Snakefile"), "-d", str(workdir), "--configfile",
           str(REPO / "config.yaml"), str(workdir / "tiny.yaml"), "-n", "-p", *args]
    # from the working directory, so that Snakemake finds profiles/ next to the Snakefile, not in the cwd
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=workdir)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def job_block(output: str, rule: str, wildcard: str) -> str:
    blocks = output.split("\n\n")
    return next(b for b in blocks if f"rule {rule}:" in b and wildcard in b)


def test_rules_take_threads_resources_and_launcher_from_config(tmp_path):
    tiny = copy.deepcopy(TINY)
    tiny["resources"] = {"train": {"threads": 2, "mem_mb": 1234, "runtime": 77, "gpu": 0},
                         "collect": {"threads": 1, "mem_mb": 555, "runtime": 5}}
    tiny["experiment_settings"]["demo"]["resources"] = {"train": {"gpu": 2}, "prepare": {"mem_mb": 999}}
    res = dry_run(tmp_path, tiny, "--cores", "4", "--workflow-profile", "none")
    out = res.stdout
    train = job_block(out, "train", "stage=warmup")
    assert "threads: 2" in train and "runtime=77" in train and "gpu=2" in train and "mem_mb=1234" in train
    assert ("-m cpsl.gpus 2 && OMP_NUM_THREADS=1 " in train
            and "-m torch.distributed.run --standalone --nproc_per_node 2 -m cpsl train --config" in train)
    assert "> results/demo/logs/seed0/train_warmup.log 2>&1" in train
    prepare = job_block(out, "prepare", "role=source_val")
    assert "mem_mb=999" in prepare and "gpu=0" in prepare and "OMP_NUM_THREADS=1 CUDA_VISIBLE_DEVICES= " in prepare
    collect = job_block(out, "collect", "")
    assert "runtime=5" in collect and "mem_mb=555" in collect and "benchmark: results/benchmarks/collect.tsv" in collect
    # the default profile's global GPU limit (resources: gpu=1) lowers the job to one GPU: plain, no torchrun
    capped = job_block(dry_run(tmp_path, tiny, "--cores", "4").stdout, "train", "stage=warmup")
    assert "gpu=1" in capped and "torch.distributed.run" not in capped
    assert "OMP_NUM_THREADS=2 " in capped and "CUDA_VISIBLE_DEVICES=" not in capped


def test_a_bad_resource_setting_stops_the_workflow_with_one_line(tmp_path):
    tiny = copy.deepcopy(TINY)
    tiny["resources"] = {"train": {"gpu": "two"}}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(tiny))
    res = subprocess.run([str(SNAKEMAKE), "-s", str(REPO / "Snakefile"), "-d", str(tmp_path), "--configfile",
                          str(REPO / "config.yaml"), str(tmp_path / "tiny.yaml"), "-n"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode != 0
    assert "cpsl-pipeline: error: config: resources.train.gpu: 'two' is not of type 'integer'" in res.stderr


# --- profiles ----------------------------------------------------------------------------------------------------

def load_profile(name: str) -> dict:
    return yaml.safe_load((REPO / "workflow" / "profiles" / name / "config.yaml").read_text())


def test_default_profile_is_found_next_to_the_snakefile(tmp_path):
    link = REPO / "profiles"
    assert link.is_symlink() and os.readlink(link) == "workflow/profiles"
    default = load_profile("default")
    assert default["resources"]["gpu"] >= 1
    assert default["printshellcmds"] and default["show-failed-logs"] and default["rerun-incomplete"]
    assert default["cores"] == "all"
    res = dry_run(tmp_path, TINY)  # no --cores: the default profile gives it
    assert f"Using workflow specific profile {REPO / 'profiles' / 'default'}" in res.stdout + res.stderr


def test_slurm_profile(tmp_path):
    slurm = load_profile("slurm")
    assert slurm["executor"] == "slurm"
    assert slurm["retries"] >= 1 and slurm["slurm-requeue"] is True and slurm["rerun-incomplete"] is True
    # rules bring their own mem_mb/runtime/gpu; partition and account are left to the user (documented)
    assert "slurm_partition" not in slurm["default-resources"]
    text = (REPO / "workflow" / "profiles" / "slurm" / "config.yaml").read_text()
    assert "# slurm_partition:" in text and "# slurm_account:" in text
    res = dry_run(tmp_path, TINY, "--workflow-profile", "slurm", "--slurm-no-account")
    assert f"Using workflow specific profile {REPO / 'profiles' / 'slurm'}" in res.stdout + res.stderr
