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
        print(f"cpsl-pipeline: error: snakemake --report needs a finished run: {missing[0]} does not exist yet; "
              "run `snakemake --cores N` first (with the same --config/--configfile)", file=sys.stderr)
        sys.exit(1)
# The same Python that runs Snakemake (a venv need not be activated for the jobs to find the package).
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
    """`resources:` of a rule kind from config.yaml's `resources`: mem_mb, runtime in minutes, and what the SLURM
    executor plugin reads for GPUs and nodes (W.slurm_resources: gpu on one node; nodes, tasks, gres and mpi on
    several; a key that does not apply is None, which Snakemake leaves out)."""
    def get(wc, key):
        res = job_resources(kind, wc)
        return res[key] if key in ("mem_mb", "runtime") else W.slurm_resources(res)[key]

    return {key: (lambda wc, key=key: get(wc, key))
            for key in ("mem_mb", "runtime", "gpu", "nodes", "tasks", "tasks_per_gpu", "gres", "mpi")}


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
