"""The glue between config.yaml and the per-step settings the Snakefile hands to ``python -m cpsl``.

Kept in the package (not in the Snakefile) so that it is plain, importable and tested: the Snakefile calls
``check_config`` once, then ``step_config_file`` for each job, and only wires files together.

Resolved per-step configs are written to ``results/{experiment}/configs/<step>.yaml`` when the workflow is
parsed, and rewritten only when their content changes. They are inputs of their rules, so changing one
setting reruns exactly the steps that read it, and what depends on them, nothing upstream.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import yaml

from cpsl import config as C
from cpsl.errors import ConfigError
from cpsl.provenance import dump_yaml, write_if_changed

SYNTH_PREFIX = "@synth"
DATASET_ROLES = ("source", "source_val", "target_train", "target_val")


def _path_of(error: jsonschema.ValidationError) -> str:
    parts = [str(p) if not isinstance(p, int) else f"[{p}]" for p in error.absolute_path]
    return ".".join(parts).replace(".[", "[") or "<top level>"


def check_schema(config: dict, schema_path: str | Path) -> None:
    """Validate against the JSON schema; the error names the dotted key (and the unknown key, if any)."""
    with open(schema_path, encoding="utf-8") as fh:
        schema = yaml.safe_load(fh)
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: (len(list(e.absolute_path)), str(e.path)))
    if not errors:
        return
    err = errors[0]
    key = _path_of(err)
    if err.validator == "additionalProperties":
        extra = sorted(set(err.instance) - set(err.schema.get("properties", {})))
        raise ConfigError(f"config: {key + '.' if err.absolute_path else ''}{extra[0]}: unknown setting "
                          f"(allowed: {', '.join(err.schema.get('properties', {}))})")
    if err.validator == "propertyNames":
        raise ConfigError(f"config: {key}: bad name {err.instance!r} (letters, digits, _ . - only)")
    raise ConfigError(f"config: {key}: {err.message}")


def experiment_settings(config: dict, name: str) -> dict:
    settings = config.get("experiment_settings", {})
    if name not in settings:
        raise ConfigError(f"config: experiments: unknown experiment {name!r} "
                          f"(defined: {', '.join(settings) or 'none'})")
    return settings[name]


def selected_experiments(config: dict) -> list[str]:
    names = config.get("experiments") or []
    if isinstance(names, str):  # `--config experiments=demo`
        names = [names]
    for name in names:
        experiment_settings(config, name)
    return list(names)


def results_dir(config: dict) -> Path:
    return Path(config.get("results_dir", "results"))


def seeds(config: dict, exp: str) -> list[int]:
    return list(experiment_settings(config, exp).get("seeds", [0]))


def has_synth(config: dict, exp: str) -> bool:
    return "synth" in experiment_settings(config, exp)


def synth_dir(config: dict, exp: str) -> Path:
    return results_dir(config) / exp / "synth"


def dataset_roles(config: dict, exp: str) -> list[str]:
    datasets = experiment_settings(config, exp)["datasets"]
    return [r for r in DATASET_ROLES if r in datasets]


def prepared_dir(config: dict, exp: str, role: str) -> Path:
    return results_dir(config) / exp / "data" / role


def synth_config(config: dict, exp: str) -> dict:
    """The resolved settings of ``cpsl synth`` for an experiment (defaults filled in and range-checked)."""
    key = f"experiment_settings.{exp}.synth"
    cfg = C.load(C.SynthConfig, experiment_settings(config, exp).get("synth") or {}, key)
    return C.to_dict(cfg)


def prepare_config(config: dict, exp: str, role: str) -> dict:
    """The resolved settings of ``cpsl prepare`` for one dataset role of an experiment.

    A dataset root that is unset or does not exist is an error naming its key, raised when the workflow is
    parsed, before any job runs.
    """
    settings = experiment_settings(config, exp)
    key = f"experiment_settings.{exp}.datasets.{role}"
    raw = dict(settings["datasets"][role])
    raw.setdefault("n_class", settings.get("n_class", 19))
    root = raw.get("root")
    if root is None or str(root).strip() == "":
        raise ConfigError(f"config: {key}.root: dataset root is not set (the path to your copy of the "
                          f"{raw.get('format')} dataset, in config.yaml or a file given with --configfile)")
    root = str(root)
    if root == SYNTH_PREFIX or root.startswith(SYNTH_PREFIX + "/"):
        if not has_synth(config, exp):
            raise ConfigError(f"config: {key}.root: {root!r} needs a `synth` section in experiment {exp!r}")
        raw["root"] = str(synth_dir(config, exp) / root[len(SYNTH_PREFIX):].lstrip("/"))
    elif not Path(root).is_dir():
        raise ConfigError(f"config: {key}.root: dataset root {root!r} does not exist or is not a directory")
    cfg = C.load(C.PrepareConfig, {"dataset": raw}, key[: -len(f".datasets.{role}")])
    return C.to_dict(cfg)


def write_step_config(path: str | Path, resolved: dict) -> Path:
    """Write a resolved step config (only when it changed, so unchanged steps are not rerun)."""
    write_if_changed(path, dump_yaml(resolved))
    return Path(path)


def step_config_files(config: dict) -> dict[str, Path]:
    """Resolve and write the per-step config of every selected experiment; return {tag: path}.

    Raises ConfigError naming the key for anything wrong, so the workflow stops before running a job.
    """
    files: dict[str, Path] = {}
    for exp in selected_experiments(config):
        cdir = results_dir(config) / exp / "configs"
        if has_synth(config, exp):
            files[f"{exp}/synth"] = write_step_config(cdir / "synth.yaml", synth_config(config, exp))
        for role in dataset_roles(config, exp):
            files[f"{exp}/prepare_{role}"] = write_step_config(cdir / f"prepare_{role}.yaml",
                                                               prepare_config(config, exp, role))
    return files


def final_targets(config: dict) -> list[str]:
    """What `snakemake` builds by default: every prepared dataset of the selected experiments."""
    targets = []
    for exp in selected_experiments(config):
        for role in dataset_roles(config, exp):
            targets.append(str(prepared_dir(config, exp, role)))
    return targets


def load_config_file(path: str | Path) -> dict[str, Any]:
    data = C.read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data
