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


def threads_of(kind):
    """`threads:` of a rule kind, from config.yaml's `resources` (per experiment where the rule has one)."""
    return lambda wc: W.rule_resources(config, kind, getattr(wc, "exp", None))["threads"]


def resources_of(kind):
    """`resources:` (mem_mb, runtime in minutes, gpu) of a rule kind, from config.yaml's `resources`."""
    return {key: (lambda wc, key=key: W.rule_resources(config, kind, getattr(wc, "exp", None))[key])
            for key in ("mem_mb", "runtime", "gpu")}


def command_of(step, kind=None):
    """The shell command that runs `cpsl <step>` with the job's threads and GPUs (a CUDA check first for gpu >= 1,
    torchrun for gpu > 1); `kind`: the rule kind of its resources (default: the step)."""
    kind = kind or step
    return lambda wc, threads, resources: W.step_command(
        sys.executable, step, threads, resources.gpu,
        W.resource_key(config, kind, getattr(wc, "exp", None)) + ".gpu")
