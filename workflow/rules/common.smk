# Config checks and resolution, shared by every rule file. The logic lives in cpsl/workflow.py (tested there).

import shlex
import sys
from pathlib import Path

from cpsl import workflow as W
from cpsl.errors import ConfigError

# The repository's reference tables (the paper's numbers beside the presets' own, in `collect`).
REFERENCE_DIR = Path(workflow.basedir) / "results" / "reference"

try:
    W.check_schema(config, workflow.source_path("../schemas/config.schema.yaml"))
    STEP_CONFIGS = W.step_config_files(config, REFERENCE_DIR)
    W.check_resources(config)
except ConfigError as err:
    # One line naming the key, instead of a traceback through the Snakefile.
    print(f"cpsl-pipeline: error: {err}", file=sys.stderr)
    sys.exit(1)

RESULTS = W.results_dir(config)

# `snakemake --report` before the run has made the tables: one line instead of Snakemake's WorkflowError.
if any(arg == "--report" or arg.startswith("--report=") for arg in sys.argv[1:]):
    missing = W.missing_report_files(config)
    if missing:
        print(
            f"cpsl-pipeline: error: snakemake --report needs a finished run: {missing[0]} does not exist yet; "
            "run `snakemake --cores N` first (with the same --config/--configfile)",
            file=sys.stderr,
        )
        sys.exit(1)
# The same Python that runs Snakemake (a venv need not be activated for the jobs to find the package).
#
# Why the rules have no `conda` or `container` directive (`snakemake --lint`, "Specify a conda environment or
# container for each rule"): every job runs this package in the interpreter that runs Snakemake, so the jobs'
# software is the one environment the user installed (pyproject.toml, or environment.yml for conda), pinned there
# (torch, torchvision) and recorded by each step in its run_info.json. A per-rule environment would be a second
# copy of the 5.5 GB torch install per rule kind, built on every cluster node's first job, and could drift from
# the package that Snakemake itself imports to resolve the configs (cpsl.workflow). The lint stays, answered here
# (tests/test_workflow_style.py checks that it is the only one).
CPSL = f"{shlex.quote(sys.executable)} -m cpsl"
EXPERIMENTS = W.selected_experiments(config)


def step_config(exp, step, seed=None):
    """The resolved config file of one step, an input of its rule: the workflow rewrites it only when the
    settings change, so a changed setting reruns the step and what depends on it. A setting changed and
    changed back reruns nothing (Snakemake compares the file's checksum with the one recorded for the output).
    """
    tag = f"{exp}/{step}" if seed is None else f"{exp}/seed{seed}/{step}"
    return STEP_CONFIGS[tag]


def job_resources(kind, wc):
    """The resources of a job of rule kind `kind` (per experiment and per stage where the rule has them)."""
    return W.rule_resources(config, kind, getattr(wc, "exp", None), getattr(wc, "stage", None))


def threads_of(kind):
    """`threads:` of a rule kind, from config.yaml's `resources` (job_resources)."""
    return lambda wc: job_resources(kind, wc)["threads"]


def resources_of(kind):
    """The `resources` of one kind of rule, from config.yaml's `resources` (mem_mb, runtime in minutes) and what
    the SLURM executor plugin reads for GPUs and nodes (W.slurm_resources: gpu on one node; nodes, tasks, gres and
    mpi on several; a key that does not apply is None, which Snakemake leaves out)."""

    def get(wc, key):
        res = job_resources(kind, wc)
        return res[key] if key in ("mem_mb", "runtime") else W.slurm_resources(res)[key]

    return {
        key: (lambda wc, key=key: get(wc, key))
        for key in ("mem_mb", "runtime", "gpu", "nodes", "tasks", "tasks_per_gpu", "gres", "mpi")
    }


def command_of(step, kind=None):
    """The shell command that runs `cpsl <step>` with the job's threads and GPUs (a CUDA check first for gpu >= 1,
    torchrun for gpu > 1, srun + torchrun on every node for nodes > 1); `kind`: the rule kind of its resources
    (default: the step)."""
    kind = kind or step

    def command(wc, threads, resources):
        exp, stage = getattr(wc, "exp", None), getattr(wc, "stage", None)
        res = job_resources(kind, wc)
        # one node: the job's gpu resource, which a global limit (the default profile's gpu=1) may have lowered;
        # several: the GPUs per node from config.yaml (the job's gpu resource is unset, see W.slurm_resources)
        gpu = resources.gpu if res["nodes"] == 1 else res["gpu"]
        key = W.resource_key(config, kind, exp, stage, "gpu")
        return W.step_command(sys.executable, step, threads, gpu, key + ".gpu", res["nodes"])

    return command


# Input functions of the rules (`snakemake --lint` wants functions here, not beside the rules).


def prepare_inputs(wc):
    """The split's resolved config, and the generated pair for an experiment that has one (the demo)."""
    inputs = {"config": step_config(wc.exp, f"prepare_{wc.role}")}
    if W.has_synth(config, wc.exp):
        inputs["synth"] = W.synth_dir(config, wc.exp)
    return inputs


def train_inputs(wc):
    """The stage's resolved config, the prepared splits it reads and what it consumes from earlier stages."""
    inputs = {"config": step_config(wc.exp, f"train_{wc.stage}", wc.seed)}
    if wc.stage != "oracle":
        inputs["source"] = W.prepared_dir(config, wc.exp, "source")
    if wc.stage != "source_only":
        inputs["target"] = W.prepared_dir(config, wc.exp, "target_train")
    for key, path in W.stage_input_files(config, wc.exp, int(wc.seed), wc.stage).items():
        inputs[key.replace(".", "_")] = path
    if W.eval_interval(config, wc.exp, wc.stage) > 0:  # validation during training (eval_interval)
        inputs["val"] = W.prepared_dir(config, wc.exp, "target_val")
    imagenet = W.imagenet_file(config, wc.exp, wc.stage)
    if imagenet is not None:  # model.init: imagenet
        inputs["imagenet"] = imagenet
    return inputs
