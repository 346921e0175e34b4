# Config checks and resolution, shared by every rule file. The logic lives in cpsl/workflow.py (tested there).

import shlex
import sys
from pathlib import Path

from cpsl import workflow as W
from cpsl.errors import ConfigError

try:
    W.check_schema(config, workflow.source_path("../schemas/config.schema.yaml"))
    STEP_CONFIGS = W.step_config_files(config)
except ConfigError as err:
    # One line naming the key, instead of a traceback through the Snakefile.
    print(f"cpsl-pipeline: error: {err}", file=sys.stderr)
    sys.exit(1)

RESULTS = W.results_dir(config)
# The same Python that runs Snakemake (a venv need not be activated for the jobs to find the package).
CPSL = f"{shlex.quote(sys.executable)} -m cpsl"
EXPERIMENTS = W.selected_experiments(config)


def step_config(exp, step, seed=None):
    """The resolved config file of one step (an input of its rule, so a changed setting reruns it)."""
    tag = f"{exp}/{step}" if seed is None else f"{exp}/seed{seed}/{step}"
    return STEP_CONFIGS[tag]
