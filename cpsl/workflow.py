"""The glue between config.yaml and the per-step settings the Snakefile hands to ``python -m cpsl``.

Kept in the package (not in the Snakefile) so that it is plain, importable and tested: the Snakefile calls
``check_config`` once, then ``step_config_file`` for each job, and only wires files together.

Resolved per-step configs are written to ``results/{experiment}/configs/<step>.yaml`` when the workflow is
parsed, and rewritten only when their content changes. They are inputs of their rules, so changing one
setting reruns exactly the steps that read it, and what depends on them, nothing upstream.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from cpsl import config as C
from cpsl.errors import ConfigError, CpslError
from cpsl.provenance import dump_yaml, write_if_changed

SYNTH_PREFIX = "@synth"
DATASET_ROLES = ("source", "source_val", "target_train", "target_val")
# Training stages in the order of the chain; an experiment runs those listed under its `stages`.
STAGES = ("source_only", "warmup", "oracle", "stage1", "stage2", "stage3")
# Inference products made from a stage's final checkpoint over target train, and the file inside each product
# folder that a consumer's config points at (None: the folder itself).
PRODUCTS = {"pseudo_soft": None, "prototypes": "prototypes.pt", "class_dist": "class_distribution.npy",
            "pseudo_hard": None}
# What each stage consumes from earlier stages: TrainConfig key -> (stage, product); "checkpoint" is the
# stage's final checkpoint.pt. A stage runs only if the stages it consumes are in the experiment too.
STAGE_INPUTS: dict[str, dict[str, tuple[str, str]]] = {
    "stage1": {"init_checkpoint": ("warmup", "checkpoint"),
               "selflabel.soft_labels": ("warmup", "pseudo_soft"),
               "selflabel.prototypes": ("warmup", "prototypes"),
               "selflabel.class_dist": ("warmup", "class_dist")},
    "stage2": {"distill.teacher": ("stage1", "checkpoint"),
               "distill.hard_labels": ("stage1", "pseudo_hard")},
    "stage3": {"init_checkpoint": ("stage2", "checkpoint"),
               "distill.teacher": ("stage2", "checkpoint"),
               "distill.hard_labels": ("stage2", "pseudo_hard")},
}


# The published numbers that ``collect`` puts beside a paper preset's own rows: the repository's
# results/reference/<file> (the Snakefile passes its folder; REFERENCE_DIR is the one next to this package).
PAPER_REFERENCES = {"gta5_cityscapes": "gta5_cityscapes.csv", "synthia_cityscapes": "synthia_cityscapes.csv"}
REFERENCE_DIR = Path(__file__).resolve().parent.parent / "results" / "reference"


def reference_files(config: dict, reference_dir: str | Path | None = None) -> dict[str, str]:
    """Experiment -> its reference table, for the selected paper presets whose table exists."""
    folder = Path(reference_dir) if reference_dir is not None else REFERENCE_DIR
    return {exp: str(folder / PAPER_REFERENCES[exp]) for exp in selected_experiments(config)
            if exp in PAPER_REFERENCES and (folder / PAPER_REFERENCES[exp]).is_file()}


# ``model.init: "@<stage>"`` names the final checkpoint of an earlier stage of the same experiment and seed; the
# student takes its weights without the classifier (init_format "checkpoint"). The demo starts its stage-2 student
# from the source-only model this way, as its stand-in for the paper's SimCLRv2 weights. ``init_checkpoint:
# "@<stage>"`` takes the whole network, classifier included (e.g. a warm-up that continues the source-only model).
STAGE_REF = "@"


def _path_of(error: jsonschema.ValidationError) -> str:
    parts = [str(p) if not isinstance(p, int) else f"[{p}]" for p in error.absolute_path]
    return ".".join(parts).replace(".[", "[") or "<top level>"


def check_schema(config: dict, schema_path: str | Path) -> None:
    """Validate against the JSON schema; the error names the dotted key (and the unknown key, if any). A schema
    entry's ``x-message`` (ignored by JSON Schema itself) replaces the validator's words for a bad value."""
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
    if err.validator == "propertyNames" or "propertyNames" in err.schema_path:  # a bad experiment name
        raise ConfigError(f"config: {key}: bad name {err.instance!r} (letters, digits, _ . - only)")
    if isinstance(err.schema, dict) and "x-message" in err.schema:  # the schema's own words for a bad value
        raise ConfigError(f"config: {key}: {err.instance!r}: {err.schema['x-message']}")
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
    """``results_dir`` (``~`` expanded); any folder name works (the rules quote every path they hand to the
    shell) except one with braces, which Snakemake would read as wildcards in every output path."""
    value = os.path.expanduser(str(config.get("results_dir", "results")))
    if "{" in value or "}" in value:
        raise ConfigError(f"config: results_dir: {value!r} contains '{{' or '}}', which Snakemake reads as a "
                          "wildcard; choose another folder")
    return Path(value)


def claim_results_dir(config: dict) -> Path:
    """Create ``results_dir`` (or adopt it) as the workflow's own folder before anything is written into it.

    A new or empty folder gets the ownership marker (``cpsl.outputs``); so does the repository's own ``results/``
    as a fresh clone has it (README.md and reference/ only: ``outputs.is_repository_results``), and one that an
    earlier version of the workflow wrote (it holds ``<experiment>/configs/`` of a selected experiment or a collect record). Any other
    existing folder, a file, or a folder we cannot write to stops the workflow with one line naming it.
    """
    from cpsl import outputs

    rd = results_dir(config)
    key = f"config: results_dir: {rd}"
    if rd.exists() and not rd.is_dir():
        raise ConfigError(f"{key}: is a file, not a folder; choose another results_dir")
    if rd.is_dir() and not outputs.owner_steps(rd) and any(rd.iterdir()) and not outputs.is_repository_results(rd):
        legacy = any((rd / exp / "configs").is_dir() for exp in selected_experiments(config))
        if not legacy:
            raise ConfigError(f"{key}: folder exists, is not empty and was not made by cpsl-pipeline (no "
                              f"{outputs.MARKER} in it); choose a new or empty folder, so that no file of yours "
                              "is overwritten")
    try:
        rd.mkdir(parents=True, exist_ok=True)
        if outputs.WORKFLOW not in outputs.owner_steps(rd):
            outputs.write_marker(rd, outputs.WORKFLOW)
    except OSError as err:
        raise ConfigError(f"{key}: cannot write there ({err.strerror or err}); choose a folder you can "
                          "write to") from None
    return rd


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
    else:
        raw["root"] = root = os.path.expanduser(root)  # as the CLI does; the resolved config says where it read
        if not Path(root).is_dir():
            raise ConfigError(f"config: {key}.root: dataset root {root!r} does not exist or is not a directory")
    cfg = C.load(C.PrepareConfig, {"dataset": raw}, key[: -len(f".datasets.{role}")])
    return C.to_dict(cfg)


def check_keys(cls: type, data: Any, prefix: str) -> None:
    """Reject unknown keys in a *partial* settings mapping (defaults and required keys are not checked here:
    the merged, complete mapping is loaded later). Recurses into nested settings classes."""
    import dataclasses
    import difflib
    import typing

    if data is None:
        return
    if not isinstance(data, dict):
        raise ConfigError(f"config: {prefix}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"config: {prefix}.{key}: unknown setting{hint}")
        tp = hints[key]
        inner = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
        if dataclasses.is_dataclass(tp) or inner:
            check_keys(tp if dataclasses.is_dataclass(tp) else inner[0], value, f"{prefix}.{key}")


def deep_merge(base: dict, over: dict) -> dict:
    """``over`` on top of ``base``, recursively for nested mappings (lists and scalars are replaced)."""
    out = dict(base)
    for key, value in (over or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def labelled(config: dict, exp: str, role: str) -> bool:
    """Whether the dataset ``role`` of ``exp`` has labels (``labels: false`` marks an unlabelled split)."""
    return bool(experiment_settings(config, exp)["datasets"].get(role, {}).get("labels", True))


def listed_stages(config: dict, exp: str) -> dict[str, Any]:
    """The experiment's ``stages`` settings; an experiment that lists none runs the default chain: every stage,
    the oracle only where the target train split has labels (each stage then takes the shared ``train``
    settings, which must hold ``max_iters``)."""
    listed = experiment_settings(config, exp).get("stages")
    if listed:
        return listed
    return {s: {} for s in STAGES if s != "oracle" or labelled(config, exp, "target_train")}


def notes(config: dict) -> list[str]:
    """Lines for the results table: what the selected experiments leave out, and why."""
    return [f"{exp}: no oracle row, as datasets.target_train has no labels (labels: false)"
            for exp in selected_experiments(config)
            if not labelled(config, exp, "target_train") and "oracle" not in listed_stages(config, exp)]


def check_labels(config: dict, exp: str) -> None:
    """The source, source_val and target_val splits need labels; the oracle needs target_train's."""
    base = f"config: experiment_settings.{exp}"
    why = {"source": "the source domain is the labelled one", "source_val": "source_only is evaluated on it",
           "target_val": "every stage is evaluated on it"}
    for role, reason in why.items():
        if role in dataset_roles(config, exp) and not labelled(config, exp, role):
            raise ConfigError(f"{base}.datasets.{role}.labels: false, but {reason}, which needs labels")
    if "oracle" in listed_stages(config, exp) and not labelled(config, exp, "target_train"):
        raise ConfigError(f"{base}.stages.oracle: the oracle trains on target_train's labels, but "
                          "datasets.target_train has labels: false; remove the oracle stage")


def check_classes(config: dict, exp: str) -> None:
    """For folder-format datasets, when the workflow is parsed (before a rerun could remove a trained model):
    ``n_class`` equals the number of classes in each ``classes.txt``, and every role names the same classes in
    the same order. ConfigError naming the key and the files."""
    from cpsl.data import folder

    settings = experiment_settings(config, exp)
    n_class = settings.get("n_class", 19)
    seen: dict[Path, tuple[str, ...]] = {}
    for role in dataset_roles(config, exp):
        ds = settings["datasets"][role]
        root = ds.get("root")
        if ds.get("format") != "folder" or not root or str(root).startswith(SYNTH_PREFIX):
            continue
        path = Path(os.path.expanduser(str(root))) / folder.CLASSES_FILE
        try:
            names = folder.class_names(path.parent)
        except CpslError as err:
            raise ConfigError(f"config: experiment_settings.{exp}.datasets.{role}: {err}") from None
        if len(names) != n_class:
            raise ConfigError(f"config: experiment_settings.{exp}.n_class: {n_class} does not match the "
                              f"{len(names)} classes in {path}")
        for other, other_names in seen.items():
            if other_names != names:
                raise ConfigError(f"config: experiment_settings.{exp}.datasets: {other} and {path} name different "
                                  "classes (or another order); both domains need the same classes.txt")
        seen[path] = names


def stages(config: dict, exp: str) -> list[str]:
    """The training stages of an experiment, in chain order (``listed_stages``)."""
    listed = listed_stages(config, exp)
    unknown = [s for s in listed if s not in STAGES]
    if unknown:
        raise ConfigError(f"config: experiment_settings.{exp}.stages.{unknown[0]}: unknown stage "
                          f"(known: {', '.join(STAGES)})")
    chosen = [s for s in STAGES if s in listed]
    for stage in chosen:
        for key, (needed, _) in stage_inputs(config, exp, stage).items():
            if needed not in chosen:
                raise ConfigError(f"config: experiment_settings.{exp}.stages.{stage}: needs stage {needed!r} "
                                  f"(for {key}), which is not in the experiment's stages")
    return chosen


def chain_priority(config: dict, exp: str, stage: str) -> int:
    """Snakemake priority of a stage's training and of the products made from it: the number of the
    experiment's later stages that wait for it, directly or through others (with the shipped demo: warmup 3,
    stage1 2, stage2 1, stage3, source_only and oracle 0; source_only 2 when the stage-2 student starts from its
    backbone, ``model.init: "@source_only"``), scaled by 10 so that a stage's products (``product_priority``,
    + 5) come between it and the next stage, and its training (``train_priority``, + 1) before the evaluations
    (Snakemake's default 0). With few cores, the scheduler then runs the chain to stage 3 first and fits
    the rest beside it. Derived from ``stage_inputs``, so a ``model.init`` or ``init_checkpoint`` naming a stage
    counts as an edge."""
    consumes = {later: {src for src, _ in stage_inputs(config, exp, later).values()}
                for later in stages(config, exp)}
    waiting, frontier = set(), {stage}
    while frontier:
        frontier = {later for later, needs in consumes.items() if needs & frontier} - waiting
        waiting |= frontier
    return 10 * len(waiting)


def train_priority(config: dict, exp: str, stage: str) -> int:
    """Snakemake priority of a stage's training job: ``chain_priority`` + 1, so that a training job ready at the
    same time as evaluations (priority 0) starts first. With the shipped demo on 2 cores, stage 3 (which nothing
    waits on) otherwise tied with the evaluations of the warm-up and stages 1-2 that became ready with stage 2's
    labels and started after them, 8-11 s later; the evaluations now run two at a time after it."""
    return chain_priority(config, exp, stage) + 1


def product_priority(config: dict, exp: str, stage: str) -> int:
    """Snakemake priority of the pseudo-label, prototype and class-distribution steps of ``stage``:
    ``chain_priority`` + 5, after the stage's own training and before the next stage's."""
    return chain_priority(config, exp, stage) + 5


def product_path(config: dict, exp: str, seed: int, stage: str, product: str) -> Path:
    """The folder of an inference product of ``stage`` (or its final checkpoint for ``"checkpoint"``)."""
    sdir = stage_dir(config, exp, seed, stage)
    return sdir / "checkpoint.pt" if product == "checkpoint" else sdir / product


def _stage_ref(config: dict, exp: str, stage: str, key: str, value: Any) -> str | None:
    """The stage that ``value`` (the setting ``key`` of ``stage``) names as ``"@<stage>"``, or None when it is not a
    stage reference. Only an earlier stage of the chain order may be named."""
    if not (isinstance(value, str) and value.startswith(STAGE_REF)):
        return None
    earlier = STAGES[:STAGES.index(stage)]
    if value[len(STAGE_REF):] not in earlier:
        raise ConfigError(f"config: experiment_settings.{exp}.stages.{stage}.{key}: {value!r} must name an "
                          f"earlier stage ({', '.join(STAGE_REF + s for s in earlier) or 'none before ' + stage})")
    return value[len(STAGE_REF):]


def init_stage(config: dict, exp: str, stage: str, settings: dict | None = None) -> str | None:
    """The earlier stage whose final checkpoint ``stage``'s resolved ``model.init`` names (``"@source_only"``), or
    None when ``model.init`` is a file path or unset. Only an earlier stage of the chain order may be named.
    ``settings``: the stage's ``_stage_settings``, when the caller has them already."""
    model = (settings or _stage_settings(config, exp, stage))["model"]
    ref = _stage_ref(config, exp, stage, "model.init", model.get("init"))
    if ref is not None and model.get("init_format", "checkpoint") != "checkpoint":
        raise ConfigError(f"config: experiment_settings.{exp}.stages.{stage}.model.init_format: must be "
                          f"'checkpoint' (or unset) when model.init names a stage ({model['init']!r}), "
                          f"got {model['init_format']!r}")
    return ref


def stage_inputs(config: dict, exp: str, stage: str) -> dict[str, tuple[str, str]]:
    """What ``stage`` consumes, TrainConfig key -> (stage, product): its STAGE_INPUTS, plus ``model.init`` (the
    network without its classifier) or ``init_checkpoint`` (the whole network) when they name an earlier stage's
    checkpoint."""
    inputs = dict(STAGE_INPUTS.get(stage, {}))
    if stage in ("stage2", "stage3") and "warmup" in listed_stages(config, exp):
        # the warm-up's class marginal, beside the class shares in the log (cpsl.methods.shares)
        inputs["distill.class_dist"] = ("warmup", "class_dist")
    settings = _stage_settings(config, exp, stage)
    ref = init_stage(config, exp, stage, settings)
    if ref is not None:
        inputs["model.init"] = (ref, "checkpoint")
    value = settings.get("init_checkpoint")
    ref = _stage_ref(config, exp, stage, "init_checkpoint", value)
    if ref is not None:
        if "init_checkpoint" in inputs:
            src = inputs["init_checkpoint"][0]
            raise ConfigError(f"config: experiment_settings.{exp}.stages.{stage}.init_checkpoint: {value!r}: "
                              f"{stage} always starts from the {src} checkpoint; leave init_checkpoint unset")
        inputs["init_checkpoint"] = (ref, "checkpoint")
    return inputs


def stage_input_files(config: dict, exp: str, seed: int, stage: str) -> dict[str, Path]:
    """TrainConfig key -> the upstream file or folder it names (also the Snakemake inputs of the stage)."""
    return {key: product_path(config, exp, seed, src, product)
            for key, (src, product) in stage_inputs(config, exp, stage).items()}


def products(config: dict, exp: str) -> list[tuple[str, str]]:
    """(stage, product) pairs the experiment needs: what its stages consume, and the warm-up products (so
    that a chain ending at the warm-up still yields the stage-1 inputs)."""
    chosen = stages(config, exp)
    needed = [(src, prod) for st in chosen for src, prod in stage_inputs(config, exp, st).values()
              if prod != "checkpoint"]
    if "warmup" in chosen:
        needed += [("warmup", p) for p in ("pseudo_soft", "prototypes", "class_dist")]
    return list(dict.fromkeys(needed))


def seed_dir(config: dict, exp: str, seed: int) -> Path:
    return results_dir(config) / exp / f"seed{seed}"


def stage_dir(config: dict, exp: str, seed: int, stage: str) -> Path:
    return seed_dir(config, exp, seed) / stage


def _stage_settings(config: dict, exp: str, stage: str) -> dict:
    """``train`` (shared) merged with ``stages.<stage>``, its ``model`` over the experiment's ``model``."""
    settings = experiment_settings(config, exp)
    merged = deep_merge(settings.get("train") or {}, listed_stages(config, exp).get(stage) or {})
    merged["model"] = deep_merge(_model_settings(config, exp), merged.get("model") or {})
    return merged


def _model_settings(config: dict, exp: str) -> dict:
    settings = experiment_settings(config, exp)
    model = dict(settings.get("model") or {})
    model.setdefault("n_class", settings.get("n_class", 19))
    return model


def weights_dir(config: dict) -> Path:
    """Where ``cpsl fetch-weights`` caches downloaded initial weights (shared by every experiment)."""
    return results_dir(config) / "weights"


def imagenet_url(config: dict, backbone: str) -> str:
    """torchvision's ImageNet file of ``backbone``, or the mirror that ``imagenet_urls.<backbone>`` names."""
    from cpsl.steps.fetch_weights import url_for

    return url_for(backbone, (config.get("imagenet_urls") or {}).get(backbone))


def imagenet_backbone(config: dict, exp: str, stage: str) -> str | None:
    """The backbone whose ImageNet weights ``stage``'s ``model.init: imagenet`` asks for (None otherwise; also
    for an MiT, which has no torchvision file: its ModelConfig then says to give the NVlabs file)."""
    model = _stage_settings(config, exp, stage)["model"]
    backbone = model.get("backbone", "resnet101")
    return backbone if model.get("init") == C.IMAGENET_INIT and not str(backbone).startswith("mit_") else None


def imagenet_file(config: dict, exp: str, stage: str) -> Path | None:
    """The cached ImageNet file that ``stage``'s ``model.init: imagenet`` resolves to (None otherwise)."""
    from cpsl.steps.fetch_weights import file_name

    backbone = imagenet_backbone(config, exp, stage)
    return None if backbone is None else weights_dir(config) / file_name(imagenet_url(config, backbone))


def fetch_configs(config: dict) -> dict[str, dict]:
    """The ``cpsl fetch-weights`` settings per cached file name, for every stage that uses ``init: imagenet``."""
    from cpsl.steps.fetch_weights import file_name

    out = {}
    for exp in selected_experiments(config):
        for stage in stages(config, exp):
            backbone = imagenet_backbone(config, exp, stage)
            if backbone is not None:
                url = imagenet_url(config, backbone)
                out[file_name(url)] = C.to_dict(C.load(C.FetchWeightsConfig, {"backbone": backbone, "url": url,
                                                                              "progress": False}))
    return out


def eval_interval(config: dict, exp: str, stage: str) -> int:
    """The stage's ``eval_interval`` (0: no validation during training, no ``checkpoints/best.pt``)."""
    value = _stage_settings(config, exp, stage).get("eval_interval", 0)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def best_stages(config: dict, exp: str) -> list[str]:
    """The stages that validate during training and so keep ``checkpoints/best.pt``, evaluated as
    ``metrics_best.json`` (``selection: best_on_val``) beside the final checkpoint's ``metrics.json``."""
    return [stage for stage in stages(config, exp) if eval_interval(config, exp, stage) > 0]


def best_checkpoint(config: dict, exp: str, seed: int, stage: str) -> Path:
    return stage_dir(config, exp, seed, stage) / "checkpoints" / "best.pt"


def train_config(config: dict, exp: str, seed: int, stage: str) -> dict:
    """The resolved ``cpsl train`` settings of one stage: ``train`` (shared) merged with ``stages.<stage>``,
    the experiment's ``model``, the prepared data folders, and the stage/experiment/seed names."""
    settings = experiment_settings(config, exp)
    base = f"experiment_settings.{exp}"
    check_keys(C.ModelConfig, settings.get("model"), f"{base}.model")
    check_keys(C.TrainConfig, settings.get("train"), f"{base}.train")
    check_keys(C.TrainConfig, listed_stages(config, exp).get(stage), f"{base}.stages.{stage}")
    merged = _stage_settings(config, exp, stage)
    data = dict(merged.get("data") or {})
    if stage != "oracle":
        data["source"] = str(prepared_dir(config, exp, "source"))
    if stage != "source_only" or data.get("lab_transfer"):
        data["target"] = str(prepared_dir(config, exp, "target_train"))
    merged.update(stage=stage, experiment=exp, seed=seed, data=data)
    if eval_interval(config, exp, stage) > 0:   # validation during training, on the target val split
        merged["eval_data"] = str(prepared_dir(config, exp, "target_val"))
    inputs = stage_inputs(config, exp, stage)
    for key, (src, product) in inputs.items():
        path = product_path(config, exp, seed, src, product)
        inner = PRODUCTS.get(product)
        value = str(path / inner) if inner else str(path)
        section, _, name = key.rpartition(".")
        target = merged.setdefault(section, {}) if section else merged
        if section:
            merged[section] = target = dict(target)
        target[name] = value
    if "model.init" in inputs:
        merged["model"]["init_format"] = "checkpoint"
    imagenet = imagenet_file(config, exp, stage)
    if imagenet is not None:
        merged["model"].update(init=str(imagenet), init_format="torchvision")
    return C.to_dict(C.load(C.TrainConfig, merged, f"{base}.stages.{stage}"))


def inference_config(config: dict, exp: str, seed: int, step: str, stage: str, role: str, **extra: Any) -> dict:
    """Resolved settings of an inference step (evaluate, pseudo-soft, ...) on a stage's final checkpoint."""
    classes = {"evaluate": C.EvaluateConfig, "pseudo_soft": C.PseudoSoftConfig, "prototypes": C.PrototypesConfig,
               "class_dist": C.ClassDistConfig, "pseudo_hard": C.PseudoHardConfig}
    settings = experiment_settings(config, exp)
    key = f"experiment_settings.{exp}.inference"
    check_keys(C.InferenceSettings, settings.get("inference"), key)
    raw = dict(settings.get("inference") or {})
    raw.update(checkpoint=str(stage_dir(config, exp, seed, stage) / "checkpoint.pt"),
               data=str(prepared_dir(config, exp, role)))
    raw.update(extra)
    if step == "evaluate":
        raw.update(stage=stage, experiment=exp, seed=seed)
    return C.to_dict(C.load(classes[step], raw, key))


def evaluations(config: dict, exp: str) -> list[tuple[str, str]]:
    """(stage, dataset role) pairs to evaluate: every stage on target val, and source_only also on the source
    held-out split when there is one (the domain gap)."""
    pairs = [(stage, "target_val") for stage in stages(config, exp)]
    if "source_only" in stages(config, exp) and "source_val" in dataset_roles(config, exp):
        pairs.append(("source_only", "source_val"))
    return pairs


def eval_dir(config: dict, exp: str, seed: int, stage: str, role: str) -> Path:
    """metrics.json of a stage on target val sits in the stage's folder (interfaces.md); other splits in
    ``<stage>/eval_<role>/``."""
    sdir = stage_dir(config, exp, seed, stage)
    return sdir if role == "target_val" else sdir / f"eval_{role}"


# The config class of each step's resolved file, by the file name's first word (see step_config_files).
STEP_CONFIG_CLASSES = {"synth": "SynthConfig", "prepare": "PrepareConfig", "train": "TrainConfig",
                       "evaluate": "EvaluateConfig", "pseudo_soft": "PseudoSoftConfig",
                       "prototypes": "PrototypesConfig", "class_dist": "ClassDistConfig",
                       "pseudo_hard": "PseudoHardConfig", "fetch": "FetchWeightsConfig", "collect": "CollectConfig"}


def _same_effective_settings(path: Path, resolved: dict) -> bool:
    """Whether the config file at ``path`` already means ``resolved``: read through its typed class, a file
    written by an older version of the package, which lacks a setting added since, gets that setting's default.
    When every added setting is at its default the file is kept, so that updating the package does not rerun
    (and retrain) every finished step; the step itself reads the same defaults."""
    name = path.name.removesuffix(".yaml")
    cls = next((getattr(C, cls) for prefix, cls in STEP_CONFIG_CLASSES.items()
                if name == prefix or name.startswith(prefix + "_")), None)
    if cls is None or not path.is_file():
        return False
    try:
        return C.to_dict(C.load(cls, C.read_yaml(path))) == resolved
    except (ConfigError, OSError, ValueError, TypeError):
        return False  # a removed or renamed setting, an unreadable file: rewrite it


def write_step_config(path: str | Path, resolved: dict) -> Path:
    """Write a resolved step config only when its settings changed, so unchanged steps are not rerun (a file
    that lacks only settings added since it was written, at their defaults, counts as unchanged)."""
    path = Path(path)
    if not _same_effective_settings(path, resolved):
        write_if_changed(path, dump_yaml(resolved))
    return path


def step_config_files(config: dict, reference_dir: str | Path | None = None) -> dict[str, Path]:
    """Resolve and write the per-step config of every selected experiment; return {tag: path}.
    ``reference_dir``: the folder of the reference tables (``reference_files``).

    Raises ConfigError naming the key for anything wrong, so the workflow stops before running a job.
    """
    claim_results_dir(config)
    files: dict[str, Path] = {}
    for exp in selected_experiments(config):
        check_labels(config, exp)
        check_classes(config, exp)
        cdir = results_dir(config) / exp / "configs"
        if has_synth(config, exp):
            files[f"{exp}/synth"] = write_step_config(cdir / "synth.yaml", synth_config(config, exp))
        for role in dataset_roles(config, exp):
            files[f"{exp}/prepare_{role}"] = write_step_config(cdir / f"prepare_{role}.yaml",
                                                               prepare_config(config, exp, role))
        for seed in seeds(config, exp):
            sdir = seed_dir(config, exp, seed) / "configs"
            tag = f"{exp}/seed{seed}"
            for stage in stages(config, exp):
                files[f"{tag}/train_{stage}"] = write_step_config(
                    sdir / f"train_{stage}.yaml", train_config(config, exp, seed, stage))
            for stage, role in evaluations(config, exp):
                files[f"{tag}/evaluate_{stage}_{role}"] = write_step_config(
                    sdir / f"evaluate_{stage}_{role}.yaml",
                    inference_config(config, exp, seed, "evaluate", stage, role))
            for stage in best_stages(config, exp):
                files[f"{tag}/evaluate_{stage}_target_val_best"] = write_step_config(
                    sdir / f"evaluate_{stage}_target_val_best.yaml",
                    inference_config(config, exp, seed, "evaluate", stage, "target_val", selection="best_on_val",
                                     checkpoint=str(best_checkpoint(config, exp, seed, stage))))
            for stage, product in products(config, exp):
                files[f"{tag}/{product}_{stage}"] = write_step_config(
                    sdir / f"{product}_{stage}.yaml",
                    inference_config(config, exp, seed, product, stage, "target_train"))
    for name, fetch in fetch_configs(config).items():
        files[f"fetch/{name}"] = write_step_config(results_dir(config) / "configs" / f"fetch_{name}.yaml", fetch)
    metrics = metrics_files(config)
    if metrics:
        files["collect"] = write_step_config(results_dir(config) / "configs" / "collect.yaml",
                                             C.to_dict(C.load(C.CollectConfig, {
                                                 "metrics": metrics, "notes": notes(config),
                                                 "references": reference_files(config, reference_dir)})))
    return files


def metrics_files(config: dict) -> list[str]:
    """Every metrics.json of the selected experiments, and the metrics_best.json of the stages that validate
    during training (the inputs of ``collect``)."""
    return [str(eval_dir(config, exp, seed, stage, role) / "metrics.json")
            for exp in selected_experiments(config) for seed in seeds(config, exp)
            for stage, role in evaluations(config, exp)] + best_metrics_files(config)


def best_metrics_files(config: dict) -> list[str]:
    """``<stage>/metrics_best.json`` of every stage that keeps ``checkpoints/best.pt`` (``best_stages``)."""
    return [str(stage_dir(config, exp, seed, stage) / "metrics_best.json")
            for exp in selected_experiments(config) for seed in seeds(config, exp)
            for stage in best_stages(config, exp)]


def missing_report_files(config: dict) -> list[str]:
    """The results tables that ``snakemake --report`` bundles and that do not exist yet."""
    rd = results_dir(config)
    files = [rd / "summary.csv", *(rd / exp / "summary.csv" for exp in selected_experiments(config))]
    return [str(f) for f in files if not f.is_file()]


def final_targets(config: dict) -> list[str]:
    """What `snakemake` builds by default: every prepared dataset, every stage's metrics, and the inference
    products the stages consume, for every selected experiment and seed, and the results table."""
    targets = [str(results_dir(config) / "summary.csv")] if metrics_files(config) else []
    targets += best_metrics_files(config)
    for exp in selected_experiments(config):
        for role in dataset_roles(config, exp):
            targets.append(str(prepared_dir(config, exp, role)))
        for seed in seeds(config, exp):
            for stage, role in evaluations(config, exp):
                targets.append(str(eval_dir(config, exp, seed, stage, role) / "metrics.json"))
            for stage, product in products(config, exp):
                targets.append(str(product_path(config, exp, seed, stage, product)))
    return targets


# Threads and resources of the rules, from config.yaml's `resources` section (per rule kind, overridable per
# experiment under experiment_settings.<exp>.resources). evaluate_split counts as `evaluate`; the four inference
# products (pseudo_soft, prototypes, class_dist, pseudo_hard) as `stage_product`.
RULE_KINDS = ("synth", "prepare", "train", "evaluate", "stage_product", "collect")
# threads: CPU cores (OMP_NUM_THREADS, SLURM --cpus-per-task; per node); mem_mb: memory in MB (per node); runtime:
# wall-clock limit in minutes (SLURM -t); gpu: GPUs per node (0: the step runs on the CPU; >1: one process per GPU,
# launched with torchrun; auto: 1 if a CUDA device is usable on the machine that runs Snakemake, else 0, resolved once
# per run by cpsl.gpus.resolve_auto); nodes: machines (>1: SLURM only, one torchrun per node started by srun, the
# processes meeting at the job's first node, torchrun's static rendezvous with --node_rank $SLURM_NODEID).
RESOURCE_KEYS = ("threads", "mem_mb", "runtime", "gpu", "nodes")
# What a kind gets for a key that config.yaml does not set.
DEFAULT_RESOURCES = {"threads": 2, "mem_mb": 4000, "runtime": 60, "gpu": 0, "nodes": 1}
# The rule kinds whose step runs a network and shards its work over processes (torchrun): several GPUs, several nodes.
DISTRIBUTED_KINDS = ("train", "evaluate", "stage_product")
# The rule kinds whose jobs belong to one stage: ``<kind>_<stage>`` sections set one stage's resources.
STAGE_KINDS = ("train", "evaluate", "stage_product")
# The rendezvous port of a multi-node job: derived from its SLURM job id, so that two jobs that share a first node
# do not pick the same port (RDZV_PORT_BASE + job id % RDZV_PORT_SPAN, below the usual ephemeral range).
RDZV_PORT_BASE, RDZV_PORT_SPAN = 20000, 12000


def resource_sections(config: dict, kind: str, exp: str | None = None,
                      stage: str | None = None) -> list[tuple[str, dict]]:
    """(config key, settings) of every section that sets the resources of ``kind``'s jobs, the most general first:
    ``resources.<kind>``, ``experiment_settings.<exp>.resources.<kind>``, and for one stage's jobs of a kind that
    has them (``STAGE_KINDS``) ``resources.<kind>_<stage>`` and ``experiment_settings.<exp>.resources.<kind>_<stage>``
    (e.g. ``train_stage1``: the stage-1 training job only)."""
    names = [kind] + ([f"{kind}_{stage}"] if stage is not None and kind in STAGE_KINDS else [])
    out = []
    for name in names:
        out.append((f"resources.{name}", (config.get("resources") or {}).get(name) or {}))
        if exp is not None:
            out.append((f"experiment_settings.{exp}.resources.{name}",
                        (experiment_settings(config, exp).get("resources") or {}).get(name) or {}))
    return out


def rule_resources(config: dict, kind: str, exp: str | None = None, stage: str | None = None) -> dict[str, int]:
    """threads, mem_mb, runtime (minutes), gpu (per node) and nodes of one rule kind: the built-in defaults, then
    ``resources.<kind>``, then ``experiment_settings.<exp>.resources.<kind>``, then for one ``stage``'s jobs the
    ``<kind>_<stage>`` sections (``resource_sections``). Only the steps that run a network (``DISTRIBUTED_KINDS``)
    may use more than one GPU or node; several nodes need ``gpu`` >= 1."""
    if kind not in RULE_KINDS:
        raise ValueError(f"unknown rule kind {kind!r} (known: {', '.join(RULE_KINDS)})")
    res = dict(DEFAULT_RESOURCES)
    for _, section in resource_sections(config, kind, exp, stage):
        res.update(section)
    gpu_key, nodes_key = (resource_key(config, kind, exp, stage, setting) for setting in ("gpu", "nodes"))
    if res["gpu"] == "auto":
        from cpsl.gpus import resolve_auto

        res["gpu"] = resolve_auto()[0]
    elif isinstance(res["gpu"], bool) or not isinstance(res["gpu"], int) or res["gpu"] < 0:
        raise ConfigError(f"config: {gpu_key}.gpu: {res['gpu']!r}: expected a number of GPUs (0, 1, 2, ...) or auto")
    if isinstance(res["nodes"], bool) or not isinstance(res["nodes"], int) or res["nodes"] < 1:
        raise ConfigError(f"config: {nodes_key}.nodes: {res['nodes']!r}: expected a number of nodes (1, 2, ...)")
    if kind not in DISTRIBUTED_KINDS and res["gpu"] > 1:
        raise ConfigError(f"config: {gpu_key}.gpu: {res['gpu']}: only training and the inference steps (evaluate, "
                          "stage_product) run on several GPUs (use 0 or 1)")
    if res["nodes"] > 1:
        if kind not in DISTRIBUTED_KINDS:
            raise ConfigError(f"config: {nodes_key}.nodes: {res['nodes']}: only training and the inference steps "
                              "(evaluate, stage_product) run on several nodes (use 1)")
        if res["gpu"] < 1:
            raise ConfigError(f"config: {nodes_key}.nodes: {res['nodes']}: a job on several nodes runs on their GPUs; "
                              f"set {nodes_key}.gpu to the GPUs per node (1, 2, ...; not 0 or auto resolved to 0)")
    return res


def world_size(res: dict[str, int]) -> int:
    """The processes of a job with resources ``res``: one per GPU on every node, one on the CPU."""
    return res["nodes"] * max(1, res["gpu"])


def check_resources(config: dict) -> dict[str, dict[str, int]]:
    """Resolve the resources of every rule kind of every selected experiment (``"<exp>/<kind>"``, and
    ``"collect"``), so that a bad setting stops the workflow when it is parsed, naming the key. A training batch
    that cannot be split over the job's processes (``data.batch_size`` is the batch of all of them together) is
    refused here too, naming both settings."""
    out = {"collect": rule_resources(config, "collect")}
    for exp in selected_experiments(config):
        for kind in RULE_KINDS[:-1]:
            out[f"{exp}/{kind}"] = rule_resources(config, kind, exp)
        for kind in STAGE_KINDS:
            for stage in stages(config, exp):
                out[f"{exp}/{kind}_{stage}"] = rule_resources(config, kind, exp, stage)
        check_batch_split(config, exp, {stage: out[f"{exp}/train_{stage}"] for stage in stages(config, exp)})
    return out


def check_batch_split(config: dict, exp: str, res: dict[str, dict[str, int]]) -> None:
    """Every stage's ``data.batch_size`` divisible by the processes of its training job (nodes x gpu); ``res``:
    each stage's training resources."""
    for stage in stages(config, exp):
        world = world_size(res[stage])
        if world == 1:
            continue
        key = resource_key(config, "train", exp, stage, "gpu" if res[stage]["nodes"] == 1 else "nodes")
        batch = train_config(config, exp, seeds(config, exp)[0], stage)["data"]["batch_size"]
        if batch % world:
            nodes, gpus = res[stage]["nodes"], max(1, res[stage]["gpu"])
            where = ("stages." + stage) if ((listed_stages(config, exp).get(stage) or {}).get("data") or {}).get(
                "batch_size") is not None else "train"
            raise ConfigError(
                f"config: experiment_settings.{exp}.{where}.data.batch_size: {batch} (stage {stage}) cannot be split "
                f"over the {world} processes of {key} (nodes {nodes} x gpu {gpus}): "
                f"it is the batch of all processes together and must be a multiple of {world} (keep the global batch "
                "with accumulate: k, README \"Several nodes\")")


def resource_key(config: dict, kind: str, exp: str | None = None, stage: str | None = None,
                 setting: str | None = None) -> str:
    """The config key that sets the resources of a rule kind (of one stage's jobs): the most specific section
    (``resource_sections``) that sets ``setting`` (``gpu``, ...), or any when ``setting`` is None; else
    ``resources.<kind>``."""
    keys = [key for key, section in resource_sections(config, kind, exp, stage)
            if (setting in section if setting is not None else section)]
    return keys[-1] if keys else f"resources.{kind}"


def slurm_resources(res: dict[str, int]) -> dict[str, Any]:
    """The Snakemake resources of a job for the SLURM executor plugin, besides threads (``--cpus-per-task``),
    mem_mb and runtime. One node: ``gpu`` (``--gpus=N``). Several nodes: ``nodes`` (``--nodes``), ``tasks`` =
    nodes (``--ntasks``: one task per node), ``gres`` = ``gpu:G`` (GPUs per node: ``--gpus=N`` would count the
    whole job's), ``tasks_per_gpu`` 0 (for a GPU job the plugin would otherwise read ``tasks`` as
    ``--ntasks-per-gpu``) and ``mpi`` (the plugin then runs the rule's shell in the batch script, on the first node,
    without wrapping it in a one-task ``srun``: the command starts its own ``srun`` over every node). A key that
    does not apply is None, which Snakemake leaves out."""
    if res["nodes"] <= 1:
        return {"gpu": res["gpu"], "nodes": None, "tasks": None, "tasks_per_gpu": None, "gres": None, "mpi": None}
    return {"gpu": None, "nodes": res["nodes"], "tasks": res["nodes"], "tasks_per_gpu": 0,
            "gres": f"gpu:{res['gpu']}", "mpi": "srun"}


def step_command(python: str, step: str, threads: int, gpu: int, setting: str = "resources.gpu",
                 nodes: int = 1) -> str:
    """The shell command, without ``--config``/``--out``, that runs ``cpsl <step>`` with ``threads`` CPU threads
    on ``gpu`` GPUs (per node) of ``nodes`` nodes; ``setting`` is the config key of ``gpu``
    (``resources.train.gpu``), for the error messages.

    gpu 0 hides every GPU (``CUDA_VISIBLE_DEVICES=``), so the step runs on the CPU. gpu >= 1 means CUDA: it
    first checks that CUDA works with that many GPUs (``python -m cpsl.gpus N SETTING``: one line naming the
    setting, ``torch.version.cuda``, the driver it needs and how to install a matching torch otherwise) and runs
    the step with ``CPSL_DEVICE=cuda`` (``device: auto`` becomes ``cuda``, see ``cpsl.train.dist.pick_device``);
    gpu 1 runs one process (on the first visible GPU); gpu > 1 starts one process per GPU with torchrun
    (``python -m torch.distributed.run --standalone``), each with threads / gpu OpenMP threads. With gpu >= 1 the
    command is ``<check> && <step>``: a rule's shell must group it to send both to its log.

    nodes > 1 (inside a SLURM job of ``nodes`` nodes, one task each: ``slurm_resources``): ``srun`` starts, on
    every node (a step with the job's ``threads`` cores and ``gpu`` GPUs per node, named explicitly: the executor
    plugin hands the job's shell an environment without SLURM's per-job defaults), the CUDA check and
    ``torchrun --nnodes N --nproc_per_node G --node_rank $SLURM_NODEID`` with its static rendezvous at the job's
    first node (``scontrol show hostnames``) on a port derived from the job id; the rule's ``--config``/``--out``
    reach the step through ``"$@"``. Static, not c10d: under c10d the agent of the node that hosts the store can
    exit at the end while another node's agent still polls it, which fails that node's agent (exit 1) after a
    successful run (seen in CI with two agents on one machine); static agents meet at an exit barrier and do not
    poll. Outside SLURM (no ``SLURM_JOB_ID``) it stops with one line naming the
    ``nodes`` setting.
    """
    import shlex

    py = shlex.quote(python)
    if gpu <= 0:
        if nodes > 1:
            raise ValueError(f"cpsl {step} on {nodes} nodes needs gpu >= 1 (got gpu={gpu})")
        return f"OMP_NUM_THREADS={threads} CUDA_VISIBLE_DEVICES= {py} -m cpsl {step}"
    check = f"{py} -m cpsl.gpus {gpu} {shlex.quote(setting)} && "
    if gpu == 1 and nodes == 1:
        return f"{check}OMP_NUM_THREADS={threads} CPSL_DEVICE=cuda {py} -m cpsl {step}"
    env = f"OMP_NUM_THREADS={max(1, threads // gpu)} CPSL_DEVICE=cuda"
    if nodes == 1:
        return f"{check}{env} {py} -m torch.distributed.run --standalone --nproc_per_node {gpu} -m cpsl {step}"
    nodes_key = setting.rpartition(".")[0] + ".nodes" if "." in setting else "resources.nodes"
    first = '$(scontrol show hostnames "${SLURM_STEP_NODELIST:-$SLURM_JOB_NODELIST}" | head -n 1)'
    port = f"$(( {RDZV_PORT_BASE} + SLURM_JOB_ID % {RDZV_PORT_SPAN} ))"
    per_node = (f"{check}{env} {py} -m torch.distributed.run --nnodes {nodes} --nproc_per_node {gpu} "
                f'--node_rank "$SLURM_NODEID" --master_addr "{first}" --master_port "{port}" '
                f'-m cpsl {step} "$@"')
    why = (f"cpsl-pipeline: error: {nodes_key} is {nodes}: a job on several nodes runs only under SLURM "
           "(snakemake --workflow-profile slurm); set it to 1 to run here")
    return (f'if [ -z "${{SLURM_JOB_ID:-}}" ]; then echo {shlex.quote(why)} >&2; exit 2; fi; '
            f"srun --nodes {nodes} --ntasks {nodes} --ntasks-per-node 1 --cpus-per-task={threads} --gres=gpu:{gpu} "
            "--kill-on-bad-exit=1 "
            f"bash -c {shlex.quote(per_node)} cpsl-{step}")


def load_config_file(path: str | Path) -> dict[str, Any]:
    data = C.read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data
