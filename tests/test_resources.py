"""Threads and resources per rule from config.yaml, the command that launches a step (CPU, one GPU, torchrun on
several), the visible-GPU check in front of torchrun, and the two workflow profiles."""

import copy
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cpsl import workflow as W
from cpsl.errors import ConfigError, CpslError
from cpsl.gpus import CudaFacts, check_gpus
from tests.test_workflow_e2e import TINY

REPO = Path(__file__).resolve().parent.parent
SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"
PY = sys.executable
SNAKEMAKE = Path(sys.executable).parent / "snakemake"


@pytest.fixture()
def shipped():
    return yaml.safe_load((REPO / "config.yaml").read_text())


# --- resources from config.yaml ----------------------------------------------------------------------------------

def test_shipped_resources_demo_on_cpu_and_paper_presets_on_one_gpu(shipped, monkeypatch):
    monkeypatch.setenv("CPSL_GPU_AUTO", "0")  # gpu: auto as resolved on a machine without a usable GPU
    for kind in W.RULE_KINDS[:-1]:
        demo = W.rule_resources(shipped, kind, "demo")
        # two cores: one thread per job so that two demo jobs run side by side (synth uses both, and so do the
        # chain's pseudo-label, prototype and class-distribution steps, which nothing runs beside)
        assert demo["gpu"] == 0 and demo["threads"] == (2 if kind in ("synth", "stage_product") else 1)
    # the chain's training jobs from the warm-up on run alone: both cores; source_only and the oracle run side by
    # side on one each
    assert {stage: W.rule_resources(shipped, "train", "demo", stage)["threads"] for stage in W.STAGES} == {
        "source_only": 1, "oracle": 1, "warmup": 2, "stage1": 2, "stage2": 2, "stage3": 2}
    assert [shipped["resources"][k]["gpu"] for k in W.RULE_KINDS] == [0, 0, "auto", "auto", "auto", 0]
    monkeypatch.setenv("CPSL_GPU_AUTO", "1")  # ... and on one with a GPU: the network steps run on it
    assert {k: W.rule_resources(shipped, k, "demo")["gpu"] for k in W.RULE_KINDS[:-1]} == {
        "synth": 0, "prepare": 0, "train": 1, "evaluate": 1, "stage_product": 1}
    for exp in ("gta5_cityscapes", "synthia_cityscapes"):
        train = W.rule_resources(shipped, "train", exp)
        assert train["gpu"] == 1 and train["mem_mb"] >= 32000 and train["runtime"] >= 24 * 60
        assert W.rule_resources(shipped, "evaluate", exp)["gpu"] == 1
        assert W.rule_resources(shipped, "prepare", exp)["gpu"] == 0
    assert W.rule_resources(shipped, "collect")["gpu"] == 0
    resolved = W.check_resources(shipped)
    assert set(resolved) == {"collect"} | {f"demo/{k}" for k in W.RULE_KINDS[:-1]} | {
        f"demo/{k}_{stage}" for k in W.STAGE_KINDS for stage in W.STAGES}


def test_experiment_settings_override_the_top_level_per_key(shipped):
    shipped["resources"]["train"] = {"threads": 4, "mem_mb": 9000, "runtime": 100, "gpu": 0}
    shipped["experiment_settings"]["demo"]["resources"] = {"train": {"gpu": 2, "runtime": 300}}
    W.check_schema(shipped, SCHEMA)
    assert W.rule_resources(shipped, "train", "demo") == {"threads": 4, "mem_mb": 9000, "runtime": 300, "gpu": 2,
                                                          "nodes": 1}
    assert W.rule_resources(shipped, "train") == {"threads": 4, "mem_mb": 9000, "runtime": 100, "gpu": 0,
                                                  "nodes": 1}


def test_one_stages_jobs_take_their_own_section_over_the_kinds(shipped):
    """<kind>_<stage> (top level, then the experiment's) over <kind>, key by key; other stages and kinds keep
    theirs; resource_key names the most specific section that sets anything."""
    shipped["resources"]["train"] = {"threads": 1, "mem_mb": 8000, "runtime": 240, "gpu": 0}
    shipped["resources"]["train_stage1"] = {"threads": 2, "runtime": 600}
    shipped["experiment_settings"]["demo"]["resources"] = {"train": {"mem_mb": 3000},
                                                           "train_stage1": {"mem_mb": 5000},
                                                           "evaluate_stage3": {"threads": 2}}
    W.check_schema(shipped, SCHEMA)
    assert W.rule_resources(shipped, "train", "demo", "stage1") == {"threads": 2, "mem_mb": 5000, "runtime": 600,
                                                                    "gpu": 0, "nodes": 1}
    assert W.rule_resources(shipped, "train", "demo", "stage2") == {"threads": 1, "mem_mb": 3000, "runtime": 240,
                                                                    "gpu": 0, "nodes": 1}
    assert W.rule_resources(shipped, "train", "demo")["threads"] == 1
    assert W.rule_resources(shipped, "evaluate", "demo", "stage3")["threads"] == 2
    assert W.rule_resources(shipped, "evaluate", "demo", "stage1")["threads"] == 1
    assert W.resource_key(shipped, "train", "demo", "stage1") == "experiment_settings.demo.resources.train_stage1"
    assert W.resource_key(shipped, "train", "demo", "stage2") == "experiment_settings.demo.resources.train"
    del shipped["experiment_settings"]["demo"]["resources"]["train_stage1"]
    assert W.resource_key(shipped, "train", "demo", "stage1") == "resources.train_stage1"
    # ... and the most specific section that sets the one setting asked for
    assert W.resource_key(shipped, "train", "demo", "stage1", "threads") == "resources.train_stage1"
    assert W.resource_key(shipped, "train", "demo", "stage1", "mem_mb") == "experiment_settings.demo.resources.train"
    assert W.resource_key(shipped, "train", "demo", "stage1", "gpu") == "resources.train"
    # kinds without stages (prepare, synth, collect) have no such sections
    assert W.rule_resources(shipped, "prepare", "demo", "stage1") == W.rule_resources(shipped, "prepare", "demo")
    # a stage's own GPUs must split its batch (4 over 3 processes), named by its section
    shipped["resources"]["train_stage2"] = {"gpu": 3}
    with pytest.raises(ConfigError, match=r"batch_size: 4 \(stage stage2\) cannot be split over the 3 processes of "
                                          r"resources\.train_stage2 \(nodes 1 x gpu 3\)"):
        W.check_resources(shipped)


@pytest.mark.parametrize("name", ["train_stage4", "collect_stage1", "prepare_warmup", "train_"])
def test_a_stage_section_of_an_unknown_stage_or_kind_is_refused(shipped, name):
    shipped["resources"][name] = {"threads": 2}
    with pytest.raises(ConfigError, match=re.escape(name)):
        W.check_schema(shipped, SCHEMA)


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
        (lambda c: c["resources"]["train"].update(gpu=-1),
         "config: resources.train.gpu: -1: expected a number of GPUs (0, 1, 2, ...) or auto"),
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


def test_gpu_setting_other_than_a_count_or_auto_names_the_key(shipped):
    shipped["resources"]["train"]["gpu"] = "gpux"
    message = r"^config: resources\.train\.gpu: 'gpux': expected a number of GPUs \(0, 1, 2, \.\.\.\) or auto$"
    with pytest.raises(ConfigError, match=message):
        W.check_schema(shipped, SCHEMA)
    with pytest.raises(ConfigError, match=r"^config: resources\.train\.gpu: 'gpux': expected a number of GPUs "
                                          r"\(0, 1, 2, \.\.\.\) or auto$"):
        W.rule_resources(shipped, "train", "demo")  # also without the schema (the Snakefile checks both)
    shipped["resources"]["train"]["gpu"] = True
    with pytest.raises(ConfigError, match=r"^config: resources\.train\.gpu: True: expected a number of GPUs"):
        W.check_schema(shipped, SCHEMA)


def test_gpu_auto_resolves_once_from_what_cuda_says(monkeypatch):
    from cpsl import gpus

    env: dict[str, str] = {}
    assert gpus.resolve_auto(env, _facts()) == (1, "one CUDA device (NVIDIA A100-SXM4-40GB; 2 visible)")
    # stored for the jobs, and the stored answer wins afterwards (one answer per run)
    assert env == {"CPSL_GPU_AUTO": "1", "CPSL_GPU_AUTO_REASON": "one CUDA device (NVIDIA A100-SXM4-40GB; 2 visible)"}
    assert gpus.resolve_auto(env, _facts(available=False, count=0, devices=())) == (1, env["CPSL_GPU_AUTO_REASON"])
    # a CUDA build the driver is too old for, or a GPU the build has no kernels for: the CPU, and why
    env = {}
    answer, why = gpus.resolve_auto(env, _facts(available=False, count=0, driver="535.104.05", devices=()))
    assert answer == 0 and why.startswith("CUDA is not usable (gpu: auto is 1 but CUDA is not usable: torch "
                                          "2.14.1+cu130 is built for CUDA 13.0") and why.endswith("): the CPU")
    v100 = _facts(count=1, devices=(("Tesla V100-SXM2-16GB", (7, 0)),))
    assert gpus.resolve_auto({}, v100)[0] == 0
    assert gpus.resolve_auto({}, _facts(cuda=None, available=False, count=0, devices=()))[0] == 0
    # no NVIDIA driver at all: 0 without asking torch
    monkeypatch.setattr(gpus, "_driver_version", lambda: None)
    monkeypatch.setattr(gpus, "cuda_facts", lambda: pytest.fail("torch consulted without a driver"))
    env = {}
    assert gpus.resolve_auto(env) == (0, "no NVIDIA driver is loaded here (no /proc/driver/nvidia/version): the CPU")
    assert env["CPSL_GPU_AUTO"] == "0"


@pytest.mark.parametrize("answer", ["0", "1"])
def test_gpu_auto_decides_the_job_commands(tmp_path, answer):
    """The demo's shell commands under both answers of gpu: auto (a dry run; the answer mocked through the
    variable that the run's first resolution sets)."""
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    env = {**os.environ, "CPSL_GPU_AUTO": answer, "CPSL_GPU_AUTO_REASON": "mocked"}
    res = subprocess.run([str(SNAKEMAKE), "-s", str(REPO / "Snakefile"), "-d", str(tmp_path), "--configfile",
                          str(REPO / "config.yaml"), str(tmp_path / "tiny.yaml"), "-n", "-p", "--cores", "2"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    lines = [line for line in res.stdout.splitlines() if " -m cpsl " in line]
    train = [line for line in lines if " -m cpsl train " in line]
    products = [line for line in lines if re.search(r" -m cpsl (evaluate|pseudo-soft|prototypes|class-dist) ", line)]
    data = [line for line in lines if re.search(r" -m cpsl (synth|prepare|collect) ", line)]
    assert len(train) == 6 and products and len(data) >= 3
    for line in data:
        assert "CUDA_VISIBLE_DEVICES= " in line and "cpsl.gpus" not in line
    for line in train + products:
        if answer == "1":
            assert "-m cpsl.gpus 1 resources." in line and "CPSL_DEVICE=cuda" in line, line
        else:
            assert "CUDA_VISIBLE_DEVICES= " in line and "cpsl.gpus" not in line, line


def test_only_the_network_steps_may_use_several_gpus(shipped):
    shipped["experiment_settings"]["demo"]["resources"] = {"prepare": {"gpu": 2}}
    with pytest.raises(ConfigError, match=r"^config: experiment_settings\.demo\.resources\.prepare\.gpu: 2: only "
                                          r"training and the inference steps \(evaluate, stage_product\) run on "
                                          r"several GPUs"):
        W.check_resources(shipped)
    shipped["experiment_settings"]["demo"]["resources"] = {}
    shipped["resources"]["collect"]["gpu"] = 4
    with pytest.raises(ConfigError, match=r"^config: resources\.collect\.gpu: 4"):
        W.check_resources(shipped)
    shipped["resources"]["collect"]["gpu"] = 0
    shipped["resources"]["evaluate"]["gpu"] = shipped["resources"]["stage_product"]["gpu"] = 4  # sharded: allowed
    assert W.check_resources(shipped)["demo/stage_product"]["gpu"] == 4


# --- the launch command ------------------------------------------------------------------------------------------

def test_step_command_cpu_one_gpu_and_torchrun():
    assert W.step_command("/v/bin/python", "train", 2, 0) == \
        "OMP_NUM_THREADS=2 CUDA_VISIBLE_DEVICES= /v/bin/python -m cpsl train"
    # gpu >= 1 means CUDA: the check first, then the step with device auto -> cuda
    assert W.step_command("/v/bin/python", "evaluate", 8, 1, "resources.evaluate.gpu") == (
        "/v/bin/python -m cpsl.gpus 1 resources.evaluate.gpu && OMP_NUM_THREADS=8 CPSL_DEVICE=cuda "
        "/v/bin/python -m cpsl evaluate")
    assert W.step_command("/v/bin/python", "train", 16, 4, "experiment_settings.x.resources.train.gpu") == (
        "/v/bin/python -m cpsl.gpus 4 experiment_settings.x.resources.train.gpu && OMP_NUM_THREADS=4 "
        "CPSL_DEVICE=cuda /v/bin/python -m torch.distributed.run --standalone --nproc_per_node 4 -m cpsl train")
    # at least one thread per process; a Python path with a space stays one word
    assert "OMP_NUM_THREADS=1 CPSL_DEVICE=cuda '/my venv/python' -m torch.distributed.run" in W.step_command(
        "/my venv/python", "train", 1, 2)
    # the inference steps shard their images over the processes in the same way
    assert W.step_command("/v/bin/python", "pseudo-hard", 2, 2).endswith(
        "-m torch.distributed.run --standalone --nproc_per_node 2 -m cpsl pseudo-hard")


def test_resource_key_names_the_setting_in_effect(shipped):
    assert W.resource_key(shipped, "train") == "resources.train"
    assert W.resource_key(shipped, "train", "demo") == "resources.train"
    presets = [e for e, s in shipped["experiment_settings"].items() if (s.get("resources") or {}).get("train")]
    assert presets and W.resource_key(shipped, "train", presets[0]) == \
        f"experiment_settings.{presets[0]}.resources.train"


def test_cuda_device_auto_follows_the_workflow(monkeypatch):
    from cpsl.train.dist import pick_device
    import torch

    monkeypatch.delenv("CPSL_DEVICE", raising=False)
    assert pick_device("auto") == torch.device("cpu")          # no GPU on the test machine
    monkeypatch.setenv("CPSL_DEVICE", "cuda")
    with pytest.raises(RuntimeError, match="device: 'cuda' was requested but CUDA is not usable here"):
        pick_device("auto")
    assert pick_device("cpu") == torch.device("cpu")            # an explicit setting wins


# --- the CUDA check ----------------------------------------------------------------------------------------------

CU130 = ("sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120", "compute_120")


def _facts(**over):
    base = {"torch_version": "2.14.1+cu130", "cuda": "13.0", "available": True, "count": 2, "driver": "580.65.06",
            "arch_list": CU130, "devices": (("NVIDIA A100-SXM4-40GB", (8, 0)),) * 2}
    return CudaFacts(**{**base, **over})


def test_gpu_check_names_the_setting_and_cuda_visible_devices():
    check_gpus(2, _facts(), env={})
    check_gpus(0, _facts(available=False, count=0), env={})
    with pytest.raises(CpslError) as err:
        check_gpus(4, _facts(), env={"CUDA_VISIBLE_DEVICES": "3"}, setting="resources.train.gpu")
    msg = str(err.value)
    assert msg == ("resources.train.gpu is 4 but 2 CUDA device(s) are visible (CUDA_VISIBLE_DEVICES='3'): run on a "
                   "machine or SLURM allocation with 4 GPUs, or lower resources.train.gpu of this rule in config.yaml")
    with pytest.raises(CpslError, match=r"CUDA_VISIBLE_DEVICES=unset"):
        check_gpus(8, _facts(), env={})


def test_gpu_check_explains_an_unusable_cuda_build():
    old_driver = _facts(available=False, count=0, driver="535.104.05", devices=())
    with pytest.raises(CpslError) as err:
        check_gpus(1, old_driver, env={}, setting="resources.train.gpu")
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("resources.train.gpu is 1 but CUDA is not usable: torch 2.14.1+cu130 is built for CUDA 13.0 "
                          "(torch.version.cuda), which needs an NVIDIA driver >= 580 and does not support V100 (sm_70) "
                          "GPUs, and the NVIDIA driver here is 535.104.05: ")
    assert ("pip uninstall -y torch torchvision, then pip install torch==2.14.1 torchvision --index-url "
            "https://download.pytorch.org/whl/cu126" in msg)
    assert msg.endswith('(README, "Choosing the CUDA build of torch"), or set resources.train.gpu: 0 to run on the CPU')
    cu121 = _facts(torch_version="2.14.1+cu121", cuda="12.1", available=False, count=0, driver=None, devices=())
    with pytest.raises(CpslError, match=r"CUDA 12\.1 \(torch\.version\.cuda\), which needs an NVIDIA driver >= 525, "
                                        r"and no NVIDIA driver is loaded here"):
        check_gpus(1, cu121, env={})
    with pytest.raises(CpslError, match=r"^resources\.gpu is 1 but torch 2\.14\.1\+cpu is a CPU-only build "
                                        r"\(torch\.version\.cuda is None\): install a CUDA build"):
        check_gpus(1, _facts(torch_version="2.14.1+cpu", cuda=None, available=False, count=0), env={})


def test_gpu_check_refuses_a_gpu_the_build_has_no_kernels_for():
    v100 = _facts(count=1, devices=(("Tesla V100-SXM2-32GB", (7, 0)),))
    with pytest.raises(CpslError, match=r"has no kernels for Tesla V100-SXM2-32GB \(sm_70; the build has sm_75 "):
        check_gpus(1, v100, env={})
    check_gpus(1, _facts(count=1, devices=(("RTX 4090", (8, 9)),)), env={})        # sm_86 kernels run on sm_89
    check_gpus(1, _facts(count=1, devices=(("future", (13, 0)),)), env={})         # PTX compute_120


def test_gpu_check_command_line():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    ok = subprocess.run([PY, "-m", "cpsl.gpus", "0"], capture_output=True, text=True, env=env)
    assert ok.returncode == 0 and ok.stderr == ""
    bad = subprocess.run([PY, "-m", "cpsl.gpus", "1", "resources.evaluate.gpu"], capture_output=True, text=True,
                         env=env)
    assert bad.returncode == 2
    lines = bad.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("cpsl: error: resources.evaluate.gpu is 1 but "), bad.stderr
    assert "resources.evaluate.gpu: 0 to run on the CPU" in lines[0]


def _no_cuda_line(gpu: int, setting: str) -> str:
    """What ``check_gpus`` says on this machine (no usable CUDA) for ``gpu`` GPUs."""
    with pytest.raises(CpslError) as err:
        check_gpus(gpu, env={}, setting=setting)
    return f"cpsl: error: {err.value}"


@pytest.mark.parametrize("gpu", [1, 2])
def test_a_gpu_job_without_usable_cuda_stops_with_one_line(tmp_path, gpu):
    """The rule's shell command for gpu 1 or 2 on this CPU machine: one line in the log naming the setting and
    torch.version.cuda; the step (or torchrun) never starts, so it cannot fall back to the CPU."""
    import torch

    cmd = W.step_command(PY, "train", 2, gpu, "resources.train.gpu")
    log = tmp_path / "train.log"
    shell = f"{{ {cmd} --config {tmp_path}/none.yaml --out {tmp_path}/out; }} > {log} 2>&1"
    res = subprocess.run(["bash", "-c", shell], env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert res.returncode == 2
    lines = log.read_text().splitlines()
    assert lines == [_no_cuda_line(gpu, "resources.train.gpu")]
    assert lines[0].startswith(f"cpsl: error: resources.train.gpu is {gpu} but ")
    if torch.version.cuda is not None:
        assert f"built for CUDA {torch.version.cuda} (torch.version.cuda)" in lines[0]
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
    assert ("-m cpsl.gpus 2 experiment_settings.demo.resources.train.gpu && OMP_NUM_THREADS=1 CPSL_DEVICE=cuda "
            in train and "-m torch.distributed.run --standalone --nproc_per_node 2 -m cpsl train --config" in train)
    assert "> results/demo/logs/seed0/train_warmup.log 2>&1" in train
    prepare = job_block(out, "prepare", "role=source_val")
    assert "mem_mb=999" in prepare and "gpu=0" in prepare and "OMP_NUM_THREADS=1 CUDA_VISIBLE_DEVICES= " in prepare
    # one stage's section: the stage-1 training job alone takes 3 threads (the demo's own train_stage2 gives
    # stage 2 two, the top-level train section the warm-up two as well)
    staged_tiny = copy.deepcopy(tiny)
    staged_tiny["experiment_settings"]["demo"]["resources"] = {"train": {"gpu": 0}, "train_stage1": {"threads": 3}}
    staged = dry_run(tmp_path, staged_tiny, "--cores", "4", "--workflow-profile", "none").stdout
    assert "threads: 3" in job_block(staged, "train", "stage=stage1")
    assert "OMP_NUM_THREADS=3 " in job_block(staged, "train", "stage=stage1")
    assert "threads: 2" in job_block(staged, "train", "stage=stage2")
    collect = job_block(out, "collect", "")
    assert "runtime=5" in collect and "mem_mb=555" in collect and "benchmark: results/benchmarks/collect.tsv" in collect
    # the default profile's global GPU limit (resources: gpu=1) lowers the job to one GPU: plain, no torchrun
    capped = job_block(dry_run(tmp_path, tiny, "--cores", "4").stdout, "train", "stage=warmup")
    assert "gpu=1" in capped and "torch.distributed.run" not in capped
    assert ("-m cpsl.gpus 1 experiment_settings.demo.resources.train.gpu && OMP_NUM_THREADS=2 CPSL_DEVICE=cuda "
            in capped)
    assert "CUDA_VISIBLE_DEVICES=" not in capped


def test_training_jobs_start_before_the_evaluations_that_are_ready_with_them(tmp_path):
    # the shipped demo: 10 x the stages waiting on a stage (+1 for its training, +5 for its products); every
    # evaluation has Snakemake's default 0, so stage 3, the oracle and any other training job win a tie with them
    out = dry_run(tmp_path, {}, "--cores", "2").stdout

    def priority(rule: str, wildcard: str) -> int:
        found = re.search(r"^\s*priority: (\d+)$", job_block(out, rule, wildcard), re.M)
        return int(found.group(1)) if found else 0

    trains = {s: priority("train", f"stage={s}\n") for s in ("source_only", "oracle", "warmup", "stage1", "stage2",
                                                              "stage3")}
    assert trains == {"source_only": 41, "oracle": 1, "warmup": 31, "stage1": 21, "stage2": 11, "stage3": 1}
    assert [priority("stage_product", f"stage={s}, product={p}") for s, p in
            (("warmup", "pseudo_soft"), ("warmup", "prototypes"), ("warmup", "class_dist"), ("stage1", "pseudo_hard"),
             ("stage2", "pseudo_hard"))] == [35, 35, 35, 25, 15]
    assert [priority("evaluate", f"stage={s}\n") for s in trains] == [0] * 6
    assert priority("evaluate_split", "stage=source_only, role=source_val") == 0


def test_a_bad_resource_setting_stops_the_workflow_with_one_line(tmp_path):
    tiny = copy.deepcopy(TINY)
    tiny["resources"] = {"train": {"gpu": "two"}}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(tiny))
    res = subprocess.run([str(SNAKEMAKE), "-s", str(REPO / "Snakefile"), "-d", str(tmp_path), "--configfile",
                          str(REPO / "config.yaml"), str(tmp_path / "tiny.yaml"), "-n"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode != 0
    assert ("cpsl-pipeline: error: config: resources.train.gpu: 'two': expected a number of GPUs (0, 1, 2, ...) "
            "or auto") in res.stderr


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
