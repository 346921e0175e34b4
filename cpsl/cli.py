"""Command line: one subcommand per step, each reading one resolved YAML config and writing one directory.

    python -m cpsl <step> --config FILE --out DIR

On success the step's directory also receives ``config.yaml`` (the resolved settings it ran with) and
``run_info.json`` (package version, git commit, seed, command). On bad input the program prints one line,
``cpsl <step>: error: <message naming the file, key or value>``, and exits with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cpsl
from cpsl import config as C
from cpsl.errors import CpslError


@dataclass(frozen=True)
class Step:
    name: str
    help: str
    config_cls: str      # attribute of cpsl.config
    function: str        # "module:function", called as function(cfg, out)
    # prefix of the recorded config/run_info files: a step that writes into another step's directory
    # (evaluate into a stage's folder) must not overwrite that step's record
    record_as: str = ""
    # the step builds its whole --out in a staging folder and replaces the previous one (cpsl.outputs); else it
    # writes its files into --out
    replaces_out: bool = True


STEPS: tuple[Step, ...] = (
    Step("synth", "generate the embedded synthetic domain pair (GTA5 + Cityscapes layouts)",
         "SynthConfig", "cpsl.data.synth:generate"),
    Step("prepare", "scan a dataset, check it, convert labels to train ids, write lists and class counts",
         "PrepareConfig", "cpsl.steps.prepare:run"),
    Step("fetch-weights", "download torchvision's ImageNet weights of a backbone once, hash-checked (model.init: "
         "imagenet)", "FetchWeightsConfig", "cpsl.steps.fetch_weights:run", replaces_out=False),
    Step("import-checkpoint", "convert a released reference CPSL .pkl checkpoint into our format",
         "ImportCheckpointConfig", "cpsl.steps.import_checkpoint:run", replaces_out=False),
    Step("pseudo-soft", "soft pseudo labels (quantised class probabilities at output resolution) of a split",
         "PseudoSoftConfig", "cpsl.steps.pseudo_soft:run"),
    Step("prototypes", "initial class prototypes: class-mean features of the model's own predictions",
         "PrototypesConfig", "cpsl.steps.prototypes:run"),
    Step("class-dist", "predicted class distribution of a split at the model's output resolution",
         "ClassDistConfig", "cpsl.steps.class_dist:run"),
    Step("pseudo-hard", "hard pseudo labels (flip-averaged argmax and confidence) of a split",
         "PseudoHardConfig", "cpsl.steps.pseudo_hard:run"),
    Step("evaluate", "mIoU of a checkpoint on a prepared split; writes metrics.json",
         "EvaluateConfig", "cpsl.steps.evaluate:run", record_as="evaluate_", replaces_out=False),
    Step("collect", "results table (summary.csv, summary.md) and plots from every stage's metrics.json",
         "CollectConfig", "cpsl.steps.collect:run", record_as="collect_", replaces_out=False),
    Step("train", "train one stage (source_only, warmup, oracle, stage1-3: the stage is in the config); resumes "
         "after a kill",
         "TrainConfig", "cpsl.steps.train:run", replaces_out=False),
)


def _available_steps() -> list[Step]:
    return [s for s in STEPS if hasattr(C, s.config_cls)]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cpsl", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"cpsl {cpsl.__version__}")
    sub = parser.add_subparsers(dest="step", metavar="<step>", required=True)
    for step in _available_steps():
        p = sub.add_parser(step.name, help=step.help, description=step.help)
        p.add_argument("--config", required=True, type=Path, help="resolved YAML settings for this step")
        p.add_argument("--out", required=True, type=Path, help="output directory of this step")
        if step.name == "train":
            p.add_argument("--stage", help="check that the config's stage is this one")
    return parser


def run_step(step: Step, config_path: Path, out: Path, stage: str | None = None) -> None:
    from cpsl import outputs, provenance

    cfg = C.load_file(getattr(C, step.config_cls), config_path)
    if stage is not None and getattr(cfg, "stage", stage) != stage:
        raise C.ConfigError(f"{config_path}: stage: the config says {cfg.stage!r} but --stage is {stage!r}")
    module, func = step.function.split(":")
    main_rank = os.environ.get("RANK", "0") == "0"  # under torchrun only rank 0 writes files
    # --out must be the step's own folder (never a user's folder, a file or an input): checked before anything runs,
    # by the rank that writes (under torchrun another rank checking at the same time could see rank 0's first
    # temporary file in the new folder before its marker, and refuse a folder that is ours; if rank 0 refuses,
    # torchrun stops the others)
    if main_rank:
        outputs.check_out(out, step.name, replaces=step.replaces_out, inputs=outputs.input_paths(cfg))
        if not step.replaces_out:
            outputs.claim_dir(out, step.name)
        provenance.remove_stale_temps(out)  # temp files of atomic writes by a killed run of this step
    getattr(importlib.import_module(module), func)(cfg, out)
    if main_rank:
        provenance.record_run(out, step.name, C.to_dict(cfg), seed=getattr(cfg, "seed", None),
                              prefix=step.record_as, device=_device_used(cfg))


def _device_used(cfg: Any) -> str | None:
    """The device a step with a ``device`` setting ran on (rank 0's), as run_info.json records it: ``cpu`` or
    ``cuda:0 (<device name>)``; None for steps without a network."""
    if not hasattr(cfg, "device"):
        return None
    from cpsl.train.dist import pick_device

    try:
        device = pick_device(cfg.device)
    except RuntimeError:
        return None
    if device.type != "cuda":
        return str(device)
    import torch

    return f"{device} ({torch.cuda.get_device_name(device)})"


def one_line(err: BaseException) -> str:
    """The message of ``err`` on one line. An error raised in a DataLoader worker process (decoding a bad image)
    reaches this process as ``Caught DataError in DataLoader worker process 0.`` followed by the worker's
    traceback, whose last line is ``cpsl.errors.DataError: <message>``: that message is the one shown."""
    text = str(err).strip()
    lines = text.splitlines()
    if len(lines) > 1 and lines[0].startswith("Caught ") and "Original Traceback" in text:
        name = f"{type(err).__module__}.{type(err).__qualname__}: "
        text = lines[-1].removeprefix(name)
    return " ".join(text.splitlines())


def _log_handler(step: str) -> logging.Handler:
    """Send the package's log records (``logging.getLogger(__name__)`` in its modules: e.g. how many tensors an
    init file gave the model) to stderr as ``cpsl <step>: <message>`` lines, which the workflow keeps in the
    rule's log. Without a handler Python drops records below WARNING. Under torchrun only rank 0 logs INFO."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"cpsl {step}: %(message)s"))
    handler.setLevel(logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING)
    logger = logging.getLogger("cpsl")
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    return handler


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    step = next(s for s in STEPS if s.name == args.step)
    handler = _log_handler(step.name)
    try:
        run_step(step, args.config, args.out, getattr(args, "stage", None))
    except CpslError as err:
        print(f"cpsl {step.name}: error: {one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cpsl {step.name}: interrupted", file=sys.stderr)
        return 130
    finally:
        logging.getLogger("cpsl").removeHandler(handler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
