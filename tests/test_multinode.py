"""Several nodes (issue 24): ``resources.<kind>.nodes``, the srun + torchrun command of a multi-node SLURM job and
what the SLURM executor plugin submits for it, training on 2 nodes x 2 processes equal to 1 node x 4 processes,
and the inference steps sharded over processes (and nodes) equal to one process.

The multi-node runs here are two torchrun agents on this one machine, node ranks 0 and 1, meeting at
127.0.0.1 (gloo, CPU): the launcher's code path of a SLURM job, without a second machine or GPUs.
"""

from __future__ import annotations

import copy
import json
import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

from cpsl import workflow as W
from cpsl.config import ClassDistConfig, EvaluateConfig, PseudoHardConfig, PseudoSoftConfig, load
from cpsl.errors import ConfigError
from cpsl.models.checkpoint import load_checkpoint
from cpsl.steps import class_dist, evaluate, pseudo_hard, pseudo_soft
from tests.inference_fixtures import random_split, tiny_checkpoint
from tests.train_helpers import (cli_env, finish, max_weight_diff, one_thread, pair_dir,  # noqa: F401
                                 train_dict, well_conditioned_init, write_config)

REPO = Path(__file__).resolve().parent.parent
SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"


@pytest.fixture()
def shipped(monkeypatch):
    monkeypatch.setenv("CPSL_GPU_AUTO", "0")  # gpu: auto as on a machine without a usable GPU
    return yaml.safe_load((REPO / "config.yaml").read_text())


# --- settings ----------------------------------------------------------------------------------------------------

def test_nodes_default_to_one_and_are_checked(shipped):
    assert all(W.rule_resources(shipped, kind, "demo")["nodes"] == 1 for kind in W.RULE_KINDS[:-1])
    shipped["resources"]["train"].update(gpu=4, nodes=2)
    shipped["experiment_settings"]["demo"]["train"]["data"]["batch_size"] = 8
    W.check_schema(shipped, SCHEMA)
    res = W.check_resources(shipped)["demo/train"]
    assert (res["nodes"], res["gpu"], W.world_size(res)) == (2, 4, 8)

    bad = copy.deepcopy(shipped)
    bad["resources"]["train"]["nodes"] = 0
    with pytest.raises(ConfigError, match=r"^config: resources\.train\.nodes: 0 is less than the minimum of 1"):
        W.check_schema(bad, SCHEMA)
    bad["resources"]["train"]["nodes"] = "two"
    with pytest.raises(ConfigError, match=r"^config: resources\.train\.nodes: 'two': expected a number of nodes"):
        W.rule_resources(bad, "train", "demo")
    bad["resources"]["train"].update(nodes=2, gpu=0)
    with pytest.raises(ConfigError, match=r"^config: resources\.train\.nodes: 2: a job on several nodes runs on "
                                          r"their GPUs; set resources\.train\.gpu to the GPUs per node"):
        W.rule_resources(bad, "train", "demo")
    bad["resources"]["train"]["gpu"] = "auto"  # resolved to 0 here
    with pytest.raises(ConfigError, match=r"^config: resources\.train\.nodes: 2: a job on several nodes"):
        W.rule_resources(bad, "train", "demo")
    bad["experiment_settings"]["demo"]["resources"] = {"prepare": {"nodes": 3}}
    with pytest.raises(ConfigError, match=r"^config: experiment_settings\.demo\.resources\.prepare\.nodes: 3: only "
                                          r"training and the inference steps"):
        W.rule_resources(bad, "prepare", "demo")


def test_a_batch_that_cannot_be_split_over_the_processes_is_refused_naming_both_settings(shipped):
    shipped["resources"]["train"].update(gpu=4, nodes=2)  # 8 processes; the demo's batch is 4
    with pytest.raises(ConfigError, match=r"^config: experiment_settings\.demo\.train\.data\.batch_size: 4 \(stage "
                                          r"source_only\) cannot be split over the 8 processes of resources\.train "
                                          r"\(nodes 2 x gpu 4\): it is the batch of all processes together"):
        W.check_resources(shipped)
    demo = shipped["experiment_settings"]["demo"]
    demo["train"]["data"]["batch_size"] = 16
    demo["stages"]["warmup"]["data"] = {"batch_size": 12}
    with pytest.raises(ConfigError, match=r"^config: experiment_settings\.demo\.stages\.warmup\.data\.batch_size: "
                                          r"12 \(stage warmup\) cannot be split over the 8 processes"):
        W.check_resources(shipped)
    demo["stages"]["warmup"]["data"] = {"batch_size": 8}
    W.check_resources(shipped)
    # one process per GPU on one node: the same rule (the loader's own check would only stop the job at run time)
    shipped["resources"]["train"].update(gpu=3, nodes=1)
    with pytest.raises(ConfigError, match=r"batch_size: 16 \(stage source_only\) cannot be split over the 3 "):
        W.check_resources(shipped)


# --- the command of a multi-node job --------------------------------------------------------------------------------

FAKE_SRUN = """#!/bin/bash
# records its options, then starts the command once per task (as srun does on each node of the step)
echo "srun $*" >> "$LOG"
n=1
while [ $# -gt 0 ]; do
  case "$1" in
    --ntasks) n=$2; shift 2;;
    --nodes|--ntasks-per-node) shift 2;;
    --*) shift;;
    *) break;;
  esac
done
for i in $(seq 0 $((n - 1))); do SLURM_NODEID=$i SLURM_STEP_NODELIST='gpu-a[01-02]' "$@" & done
wait
"""
FAKE_SCONTROL = """#!/bin/bash
[ "$1 $2 $3" = "show hostnames gpu-a[01-02]" ] && printf 'gpu-a01\\ngpu-a02\\n'
"""
FAKE_PYTHON = """#!/bin/bash
echo "node=$SLURM_NODEID OMP_NUM_THREADS=${OMP_NUM_THREADS:-} CPSL_DEVICE=${CPSL_DEVICE:-} $*" >> "$LOG"
"""


# a path with a space, a quote and a dollar sign: quoted through the job's shell and the per-node bash -c
FAKE_PYTHON_NAME = "fake py'th$on"


def _fake_bin(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL), (FAKE_PYTHON_NAME, FAKE_PYTHON)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return bin_dir


def test_multi_node_command_runs_torchrun_on_every_node_with_its_node_rank(tmp_path):
    bin_dir = _fake_bin(tmp_path)
    python = str(bin_dir / FAKE_PYTHON_NAME)
    cmd = W.step_command(python, "train", 16, 4, "experiment_settings.x.resources.train.gpu", nodes=2)
    log = tmp_path / "calls.log"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "LOG": str(log), "SLURM_JOB_ID": "4242"}
    # as the rule's shell runs it: the command, then --config/--out
    shell = f"{{ {cmd} --config {shlex.quote(str(tmp_path / 'my cfg.yaml'))} --out out; }}"
    res = subprocess.run(["bash", "-c", shell], env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    lines = log.read_text().splitlines()
    # one task per node with the node's cores and GPUs; the step fails when one node's task fails
    assert lines[0].startswith("srun --nodes 2 --ntasks 2 --ntasks-per-node 1 --cpus-per-task=16 --gres=gpu:4 "
                               "--kill-on-bad-exit=1 bash -c "), lines[0]
    port = W.RDZV_PORT_BASE + 4242 % W.RDZV_PORT_SPAN
    expected = []
    for node in (0, 1):
        expected.append(f"node={node} OMP_NUM_THREADS= CPSL_DEVICE= -m cpsl.gpus 4 "
                        "experiment_settings.x.resources.train.gpu")  # the CUDA check on every node
        expected.append(f"node={node} OMP_NUM_THREADS=4 CPSL_DEVICE=cuda -m torch.distributed.run --nnodes 2 "
                        f"--nproc_per_node 4 --node_rank {node} --master_addr gpu-a01 --master_port {port} "
                        f"-m cpsl train --config {tmp_path / 'my cfg.yaml'} --out out")
    assert sorted(lines[1:]) == sorted(expected)

    # outside a SLURM job: one line naming the setting, nothing started
    log.unlink()
    env.pop("SLURM_JOB_ID")
    res = subprocess.run(["bash", "-c", shell], env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and not log.exists()
    assert res.stderr == ("cpsl-pipeline: error: experiment_settings.x.resources.train.nodes is 2: a job on several "
                          "nodes runs only under SLURM (snakemake --workflow-profile slurm); set it to 1 to run "
                          "here\n")


class _Resources(dict):
    __getattr__ = dict.__getitem__


def _submit_options(res: dict, threads: int) -> str:
    """What the installed SLURM executor plugin puts on the sbatch line of a job with these cpsl resources."""
    from snakemake_executor_plugin_slurm.submit_string import get_submit_command
    from snakemake_executor_plugin_slurm.utils import set_gres_string

    snake = {"mem_mb": res["mem_mb"], "runtime": res["runtime"],
             **{k: v for k, v in W.slurm_resources(res).items() if v is not None}}
    job = SimpleNamespace(resources=_Resources(snake), threads=threads)
    params = {"run_uuid": "cpsl-test", "slurm_logfile": "/tmp/cpsl-test-%j.log", "comment_str": "rule_train",
              "account": "", "partition": "-p debug", "workdir": "/tmp"}
    return get_submit_command(job, params) + set_gres_string(job)


def test_what_the_slurm_plugin_submits_for_one_and_two_nodes():
    one = _submit_options({"threads": 8, "mem_mb": 32000, "runtime": 600, "gpu": 4, "nodes": 1}, 8)
    assert " --gpus=4" in one and "--nodes" not in one and "--gres" not in one
    two = _submit_options({"threads": 16, "mem_mb": 64000, "runtime": 600, "gpu": 4, "nodes": 2}, 16)
    # two nodes, one task on each, 4 GPUs, 16 cores and 64 GB on each (--gres and --mem count per node)
    for option in (" --nodes=2", " --ntasks=2", " --gres=gpu:4", " --cpus-per-task=16", " --mem 64000", " -t 600"):
        assert option in two, (option, two)
    assert "--gpus=" not in two  # --gpus counts the job's GPUs, not a node's
    assert "--ntasks-per-gpu" not in two  # the plugin's reading of `tasks` for a GPU job (4 tasks per node)
    assert W.slurm_resources({"gpu": 4, "nodes": 2})["mpi"]  # the jobstep plugin then does not wrap it in srun -n1


def _slurm_ready() -> str | None:
    try:
        res = subprocess.run(["sinfo", "-h", "-p", "debug", "-o", "%t"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"sinfo: {err}"
    if res.returncode != 0 or not any(s.rstrip("*~#") in ("idle", "mix", "alloc") for s in res.stdout.split()):
        return f"no partition 'debug' with a node up ({(res.stdout + res.stderr).strip() or 'nothing'})"
    return None


def test_two_node_submission_against_a_real_sbatch_test_only():
    """The plugin's sbatch options for a 2-node job, given to the local SLURM's ``sbatch --test-only``. The local
    cluster is one node without GPUs, so the GPU request is left out and the 2-node request is refused for lack
    of nodes (not for a bad option); the same options at 1 node are accepted."""
    why = _slurm_ready()
    if why is not None:
        if os.environ.get("CPSL_REQUIRE_SLURM") == "1":
            pytest.fail(f"CPSL_REQUIRE_SLURM=1 but SLURM is not usable: {why}")
        pytest.skip(f"SLURM not usable here: {why}")
    line = _submit_options({"threads": 1, "mem_mb": 500, "runtime": 10, "gpu": 4, "nodes": 2}, 1)
    args = [a for a in shlex.split(line)[1:] if a != "--gres=gpu:4" and a != "--parsable"]
    assert "--nodes=2" in args and "--ntasks=2" in args

    def test_only(options):
        return subprocess.run(["sbatch", "--test-only", *options, "--wrap", "true"], capture_output=True,
                              text=True, timeout=60)

    two = test_only(args)
    assert two.returncode != 0 and "Requested node configuration is not available" in two.stderr, two.stderr
    one = test_only([{"--nodes=2": "--nodes=1", "--ntasks=2": "--ntasks=1"}.get(a, a) for a in args])
    assert one.returncode == 0 and "to start" in one.stderr, one.stderr


def test_multi_node_command_inside_a_real_slurm_job(tmp_path):
    """The generated command run by a real sbatch job and srun of the local SLURM, in the environment the executor
    plugin's jobstep gives a job's shell (SLURM_* variables removed but the job id): the real ``srun`` starts the
    per-node script, and ``scontrol show hostnames`` of the step's node list gives the rendezvous host. The local
    cluster is one node without GPUs, so the step asks for 1 node and no GPUs; torchrun is a stand-in that
    records its arguments."""
    why = _slurm_ready()
    if why is not None:
        if os.environ.get("CPSL_REQUIRE_SLURM") == "1":
            pytest.fail(f"CPSL_REQUIRE_SLURM=1 but SLURM is not usable: {why}")
        pytest.skip(f"SLURM not usable here: {why}")
    bin_dir = _fake_bin(tmp_path)
    (bin_dir / "srun").unlink(), (bin_dir / "scontrol").unlink()  # the real ones
    cmd = W.step_command(str(bin_dir / FAKE_PYTHON_NAME), "train", 1, 1, "resources.train.gpu", nodes=2)
    assert "--nodes 2 --ntasks 2 " in cmd and " --gres=gpu:1 " in cmd
    cmd = cmd.replace("--nodes 2 --ntasks 2 ", "--nodes 1 --ntasks 1 ").replace(" --gres=gpu:1 ", " ")
    log = tmp_path / "calls.log"
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/bash\n"
                      "for v in $(env | grep -o '^SLURM_[A-Z_]*'); do\n"
                      "  case $v in SLURM_JOB_ID|SLURM_JOBID) ;; *) unset $v;; esac\n"
                      "done\n"
                      f"export LOG={shlex.quote(str(log))}\n"
                      f"{{ {cmd} --config c.yaml --out out; }}\n"
                      "echo \"job=$SLURM_JOB_ID host=$(hostname -s)\" >> \"$LOG\"\n")
    res = subprocess.run(["sbatch", "--wait", "-p", "debug", "-N", "1", "-n", "1", "-c", "1", "--mem", "200",
                          "-t", "2", "-D", str(tmp_path), "-o", str(tmp_path / "job.out"), str(script)],
                         capture_output=True, text=True, timeout=120)
    job_out = (tmp_path / "job.out").read_text() if (tmp_path / "job.out").exists() else ""
    assert res.returncode == 0, res.stderr + job_out
    lines = log.read_text().splitlines()
    job, host = lines[-1].removeprefix("job=").split(" host=")
    port = W.RDZV_PORT_BASE + int(job) % W.RDZV_PORT_SPAN
    assert lines[:-1] == [
        "node=0 OMP_NUM_THREADS= CPSL_DEVICE= -m cpsl.gpus 1 resources.train.gpu",
        f"node=0 OMP_NUM_THREADS=1 CPSL_DEVICE=cuda -m torch.distributed.run --nnodes 2 --nproc_per_node 1 "
        f"--node_rank 0 --master_addr {host} --master_port {port} -m cpsl train --config c.yaml --out out"]


# --- the same results on several nodes --------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(nodes: int, nproc: int, step: str, config: Path, out: Path) -> list[subprocess.Popen]:
    """``cpsl <step>`` under torchrun: ``nodes`` agents of ``nproc`` processes each, node ranks 0..nodes-1 meeting
    at 127.0.0.1 as the agents of a multi-node SLURM job meet at its first node (``workflow.step_command``; one
    agent: ``--standalone``)."""
    port = str(_free_port())
    launchers = ([["--standalone"]] if nodes == 1 else
                 [["--nnodes", str(nodes), "--node_rank", str(rank), "--master_addr", "127.0.0.1", "--master_port",
                   port] for rank in range(nodes)])
    return [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *launcher, "--nproc_per_node",
                              str(nproc), "-m", "cpsl", step, "--config", str(config), "--out", str(out)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env())
            for launcher in launchers]


@pytest.mark.usefixtures("one_thread")
def test_two_nodes_of_two_processes_train_the_weights_of_one_node_of_four(tmp_path, pair_dir):  # noqa: F811
    # as tests/test_ddp.py: BatchNorm frozen, no dropout, a well-conditioned init; warm-up: two DDP networks
    init = well_conditioned_init(tmp_path / "init.pt")
    cfg = train_dict(pair_dir, "warmup", max_iters=3, freeze_bn=True, init_checkpoint=str(init),
                     checkpoint_interval=2, **{"model.dropout": 0.0, "data.batch_size": 4, "data.workers": 0})
    config = write_config(tmp_path / "train.yaml", cfg)
    runs = launch(2, 2, "train", config, tmp_path / "nodes2") + launch(1, 4, "train", config, tmp_path / "nodes1")
    for proc in runs:
        finish(proc, timeout=240)

    a, b = (load_checkpoint(tmp_path / d / "checkpoint.pt") for d in ("nodes2", "nodes1"))
    assert a["iteration"] == b["iteration"] == 3
    assert max_weight_diff(a["model"], b["model"]) < 1e-5
    assert max_weight_diff(a["discriminator"], b["discriminator"]) < 1e-5
    for run in ("nodes2", "nodes1"):
        summary = json.loads((tmp_path / run / "train_summary.json").read_text())
        assert summary["world_size"] == 4 and summary["global_batch"] == 4
        # written by global rank 0 alone: each node's local rank 0 appending would double the lines
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(line)["iteration"] for line in lines] == [1, 2, 3]
    last = load_checkpoint(tmp_path / "nodes2" / "checkpoints" / "last.pt")
    assert len(last["extra"]["rng_per_rank"]) == 4  # one RNG stream per global rank, for resuming


STEPS = {"evaluate": (evaluate, EvaluateConfig, {"samples": 2}),
         "pseudo-soft": (pseudo_soft, PseudoSoftConfig, {}),
         "pseudo-hard": (pseudo_hard, PseudoHardConfig, {}),
         "class-dist": (class_dist, ClassDistConfig, {})}


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.name.startswith(".cpsl")}


def _arrays(data: bytes) -> dict[str, np.ndarray]:
    import io

    with np.load(io.BytesIO(data)) as npz:
        return {k: npz[k] for k in npz.files}


def test_inference_steps_sharded_over_processes_and_nodes_write_what_one_process_writes(tmp_path):
    """5 images over 2 processes (standalone) and over 2 nodes x 1 process: every file as one process writes it."""
    data = random_split(tmp_path, n=5, size=(33, 65))
    ckpt = tiny_checkpoint(tmp_path / "ck.pt", iteration=7)
    runs = {}
    for step, (module, cls, extra) in STEPS.items():
        settings = {"checkpoint": str(ckpt), "data": str(data), "device": "cpu", "workers": 0, "progress": False,
                    **extra}
        config = write_config(tmp_path / f"{step}.yaml", settings)
        nodes = 2 if step in ("evaluate", "pseudo-hard") else 1
        nproc = 1 if nodes == 2 else 2
        runs[step] = launch(nodes, nproc, step, config, tmp_path / "many" / step)
        module.run(load(cls, settings), tmp_path / "one" / step)
    for procs in runs.values():
        for proc in procs:
            finish(proc, timeout=240)
    for step in STEPS:
        one, many = _files(tmp_path / "one" / step), _files(tmp_path / "many" / step)
        cli_only = set(many) - set(one)  # the CLI's record of the run (provenance.record_run)
        assert one and all(n.endswith(("config.yaml", "run_info.json")) for n in cli_only), (step, cli_only)
        for name in one:
            if name.endswith(".npz"):
                a, b = _arrays(one[name]), _arrays(many[name])
                assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a), (step, name)
            elif name.endswith(".json"):
                assert json.loads(one[name]) == json.loads(many[name]), (step, name)
            else:
                assert one[name] == many[name], (step, name)
    assert sorted(_files(tmp_path / "one" / "evaluate")) == [
        "confusion.npy", "metrics.json", "samples/img0.png", "samples/img1.png", "samples/index.json"]


def test_workflow_gives_a_two_node_job_its_slurm_resources_and_command(tmp_path):
    """The Snakefile end to end (dry run with the slurm profile): the training job of an experiment on 2 nodes x 2
    GPUs carries what the SLURM plugin needs and the srun + torchrun command; the other jobs stay on one node."""
    from tests.test_resources import dry_run, job_block
    from tests.test_workflow_e2e import TINY

    tiny = copy.deepcopy(TINY)
    tiny["experiment_settings"]["demo"]["train"]["data"]["batch_size"] = 4
    tiny["experiment_settings"]["demo"]["resources"] = {"train": {"threads": 8, "gpu": 2, "nodes": 2}}
    out = dry_run(tmp_path, tiny, "--workflow-profile", "slurm", "--slurm-no-account").stdout
    train = job_block(out, "train", "stage=warmup")
    for part in ("nodes=2", "tasks=2", "tasks_per_gpu=0", "gres=gpu:2", "mpi=srun"):
        assert part in train, (part, train)
    assert "gpu=" not in train.replace("tasks_per_gpu=", "").replace("gres=gpu:", "")
    assert "srun --nodes 2 --ntasks 2 --ntasks-per-node 1 --cpus-per-task=" in train
    assert " --gres=gpu:2 --kill-on-bad-exit=1 bash -c " in train
    assert ("--nnodes 2 --nproc_per_node 2 --node_rank" in train
            and "experiment_settings.demo.resources.train.nodes is 2" in train)
    assert "--config results/demo/seed0/configs/train_warmup.yaml --out results/demo/seed0/warmup" in train
    evaluate = job_block(out, "evaluate", "stage=warmup")
    assert "nodes=" not in evaluate and "mpi=" not in evaluate and "srun" not in evaluate
