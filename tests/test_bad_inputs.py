"""Bad inputs through the command line: one clear line naming the file, key or value, and nothing overwritten.

Each ``test_bad_input`` id is one case: it writes the bad input and an older output where the step would write
(a prepared split, a finished training run, a stage folder with its metrics, pseudo labels), runs ``cpsl
<step>`` (``cpsl.cli.main``, in this process), and checks the exit status 2, the whole ``cpsl <step>: error:
...`` line (exactly, or a pattern where a library's wording is part of it), that the older output is byte for
byte unchanged and that no temp file is left. The NaN/Inf cases check instead that training stops and keeps
its last good checkpoint. The workflow cases run the real Snakefile: paths with spaces and shell
metacharacters work, bad config values stop it with one line naming the key.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from PIL import Image

from cpsl import outputs
from cpsl.config import ModelConfig
from cpsl.data.prepared import PreparedSplit
from cpsl.methods import source_only
from cpsl.models import build_model
from cpsl.models.checkpoint import FORMAT_VERSION, load_checkpoint, make_checkpoint, save_checkpoint
from tests.inference_fixtures import random_split, tiny_checkpoint
from tests.reliability_helpers import (error_line, folder_experiment, leftovers, markers, run_cli, snakemake,
                                       snapshot, write_yaml)
from tests.test_prepare import city_paths, make_cityscapes, truncate, write_gray, write_rgb
from tests.train_helpers import N_CLASS, make_folder_split, one_thread, pair_dir, train_dict  # noqa: F401


@dataclass
class Ctx:
    """One case's world: its temp folder, the step's output folder, the shared inputs (``env``)."""

    tmp: Path
    out: Path
    env: dict[str, Any]
    monkeypatch: pytest.MonkeyPatch
    config_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.config_path = self.tmp / "step.yaml"

    def config(self, data: dict) -> Path:
        return write_yaml(self.config_path, data)

    def previous(self, kind: str) -> None:
        """An older complete output of the step in ``out`` (the failed run must leave it as it is)."""
        shutil.copytree(self.env[f"previous_{kind}"], self.out)


@dataclass(frozen=True)
class Case:
    id: str
    step: str
    make: Callable[[Ctx], str | re.Pattern]   # writes the inputs; returns the expected message
    keeps_output: bool = True
    after: Callable[[Ctx, re.Match | None], None] | None = None


CASES: list[Case] = []


def case(id: str, step: str, **kw: Any) -> Callable:
    def register(make: Callable[[Ctx], str | re.Pattern]) -> Callable:
        CASES.append(Case(id, step, make, **kw))
        return make
    return register


# ---------------------------------------------------------------------------------------------------------
# prepare: dataset roots and files


def _folder(ctx: Ctx, n: int = 3, **dataset: Any) -> Path:
    """A raw folder-format dataset (4 classes, split ``train``), its prepare config, an older output."""
    root = make_folder_split(ctx.tmp / "raw", n=n, hw=(8, 16))
    ctx.config({"dataset": {"format": "folder", "root": str(root), "split": "train", "n_class": N_CLASS,
                            "workers": 0, **dataset}, "lab_stats": False})
    ctx.previous("prepare")
    return root


def _skip_hint(n: int, scan_only: bool = False) -> str:
    where = "found by the file scan" if scan_only else "in total"
    return f"({n} problem{'s' if n != 1 else ''} {where}; set dataset.allow_skip: true to skip such images)"


@case("prepare-missing-root", "prepare")
def _(ctx: Ctx) -> str:
    _folder(ctx, root=str(ctx.tmp / "no such dir"))
    return f"{ctx.tmp / 'no such dir'}: dataset root not found (dataset.root)"


@case("prepare-empty-root", "prepare")
def _(ctx: Ctx) -> str:
    (ctx.tmp / "empty").mkdir()
    _folder(ctx, root=str(ctx.tmp / "empty"))
    return f"{ctx.tmp / 'empty'}: dataset root is empty (dataset.root)"


@case("prepare-root-without-images", "prepare")
def _(ctx: Ctx) -> str:
    root = _folder(ctx)
    for p in [*(root / "images" / "train").iterdir(), *(root / "labels" / "train").iterdir()]:
        p.unlink()
    return f"{root}: no images found for folder split 'train' (dataset.root, dataset.split)"


@case("prepare-root-without-the-split-folder", "prepare")
def _(ctx: Ctx) -> str:
    root = _folder(ctx, split="val")
    return (f"{root / 'images' / 'val'}: folder not found (folder-format images; check dataset.root and "
            "dataset.split)")


@case("prepare-image-without-label", "prepare")
def _(ctx: Ctx) -> str:
    root = _folder(ctx)
    label = root / "labels" / "train" / "im001.png"
    label.unlink()
    return f"{root / 'images' / 'train' / 'im001.png'}: image without label (no {label}) {_skip_hint(1, True)}"


@case("prepare-label-without-image", "prepare")
def _(ctx: Ctx) -> str:
    root = _folder(ctx)
    (root / "images" / "train" / "im002.png").unlink()
    return f"{root / 'labels' / 'train' / 'im002.png'}: label without image {_skip_hint(1, True)}"


@case("prepare-truncated-image", "prepare")
def _(ctx: Ctx) -> str:
    root = _folder(ctx)
    image = root / "images" / "train" / "im000.png"
    write_rgb(image, np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    truncate(image)
    return f"{image}: truncated PNG (no IEND chunk; the file was cut short) {_skip_hint(1)}"


@case("prepare-truncated-label", "prepare")
def _(ctx: Ctx) -> str:
    root = _folder(ctx)
    label = root / "labels" / "train" / "im001.png"
    write_gray(label, np.random.default_rng(0).integers(0, 4, (8, 16)))
    truncate(label)
    return f"{label}: truncated PNG (no IEND chunk; the file was cut short) {_skip_hint(1)}"


@case("prepare-non-image-file", "prepare")
def _(ctx: Ctx) -> re.Pattern:
    root = _folder(ctx)
    image = root / "images" / "train" / "im002.png"
    image.write_text("this is not an image at all\n")
    return re.compile(rf"{re.escape(str(image))}: not a readable image \(.+\) {re.escape(_skip_hint(1))}")


@case("prepare-empty-image-file", "prepare")
def _(ctx: Ctx) -> str:
    root = _folder(ctx)
    image = root / "images" / "train" / "im000.png"
    image.write_bytes(b"")
    return f"{image}: empty file {_skip_hint(1)}"


@case("prepare-label-id-outside-the-class-table", "prepare")
def _(ctx: Ctx) -> str:
    root = _folder(ctx)
    label = root / "labels" / "train" / "im002.png"
    write_gray(label, np.full((8, 16), 9))
    return f"{label}: unknown label ids [9] (the folder format defines 0..3, 255) {_skip_hint(1)}"


@case("prepare-cityscapes-label-id-outside-the-table", "prepare")
def _(ctx: Ctx) -> str:
    root = ctx.tmp / "cs"
    make_cityscapes(root)
    label = city_paths(root, "zurich", 1)[1]
    ids = np.full((6, 10), 7)
    ids[2, 3] = 200
    write_gray(label, ids)
    ctx.config({"dataset": {"format": "cityscapes", "root": str(root), "workers": 0}, "lab_stats": False})
    ctx.previous("prepare")
    return f"{label}: unknown label ids [200] (the cityscapes format defines 0..33) {_skip_hint(1)}"


@case("prepare-rgb-label", "prepare")
def _(ctx: Ctx) -> str:
    root = _folder(ctx)
    label = root / "labels" / "train" / "im000.png"
    write_rgb(label, np.zeros((8, 16, 3), np.uint8))
    return f"{label}: label image has mode RGB; expected single-channel or palettised ids {_skip_hint(1)}"


@case("prepare-label-size-differs-from-image", "prepare")
def _(ctx: Ctx) -> str:
    root = _folder(ctx)
    label = root / "labels" / "train" / "im001.png"
    write_gray(label, np.zeros((9, 16)))
    return f"{label}: label is 9x16 but image im001.png is 8x16 {_skip_hint(1)}"


@case("prepare-class-count-differs-from-classes-txt", "prepare")
def _(ctx: Ctx) -> str:
    root = _folder(ctx, n_class=5)
    return f"dataset.n_class: 5 does not match the 4 classes in {root / 'classes.txt'}"


@case("config-typo", "prepare")
def _(ctx: Ctx) -> str:
    root = _folder(ctx)
    ctx.config({"dataset": {"format": "folder", "rot": str(root)}})
    return f"{ctx.config_path}: dataset.rot: unknown setting (did you mean 'root'?)"


@case("config-value-out-of-range", "prepare")
def _(ctx: Ctx) -> str:
    _folder(ctx, n_class=300)
    return f"{ctx.config_path}: dataset.n_class: must be in 1..255 (got 300)"


@case("config-value-not-in-the-list", "prepare")
def _(ctx: Ctx) -> str:
    _folder(ctx, format="kitti")
    return (f"{ctx.config_path}: dataset.format: 'kitti' is not one of 'cityscapes', 'gta5', 'synthia', "
            "'folder'")


@case("config-not-yaml", "prepare")
def _(ctx: Ctx) -> re.Pattern:
    _folder(ctx)
    ctx.config_path.write_text("dataset: {format: folder, root: [unclosed\n")
    return re.compile(rf"{re.escape(str(ctx.config_path))}: not valid YAML \(.+\)")


@case("config-file-missing", "prepare")
def _(ctx: Ctx) -> str:
    _folder(ctx)
    ctx.config_path.unlink()
    return f"{ctx.config_path}: config file not found"


# ---------------------------------------------------------------------------------------------------------
# train: checkpoints, settings, data, NaN / Inf


def _train(ctx: Ctx, previous: bool = True, **over: Any) -> dict:
    cfg = train_dict(ctx.env["pair"], "source_only", **{"max_iters": 4, "checkpoint_interval": 2, **over})
    ctx.config(cfg)
    if previous:
        ctx.previous("train")
    return cfg


def _init_checkpoint(ctx: Ctx, backbone: str = "resnet18", n_class: int = N_CLASS) -> Path:
    """A checkpoint of the tiny network, of the given backbone and class count."""
    cfg = ModelConfig(backbone=backbone, base_width=8, head_channels=16, n_class=n_class)
    return save_checkpoint(ctx.tmp / "init.pt", make_checkpoint(build_model(cfg), cfg))


def _newer(path: Path) -> Path:
    state = torch.load(path, weights_only=True)
    state.update(format_version=FORMAT_VERSION + 1, cpsl_version="9.0.0")
    torch.save(state, path)
    return path


@case("train-init-checkpoint-with-other-class-count", "train")
def _(ctx: Ctx) -> str:
    path = _init_checkpoint(ctx, n_class=19)
    _train(ctx, init_checkpoint=str(path))
    return f"init.pt has 19 classes, config model.n_class is 4 ({path})"


@case("train-init-checkpoint-with-other-backbone", "train")
def _(ctx: Ctx) -> str:
    path = _init_checkpoint(ctx, backbone="resnet50")
    _train(ctx, init_checkpoint=str(path))
    return f"init.pt has backbone='resnet50', config model.backbone is 'resnet18' ({path})"


@case("train-init-checkpoint-of-a-newer-format", "train")
def _(ctx: Ctx) -> str:
    path = _newer(_init_checkpoint(ctx))
    _train(ctx, init_checkpoint=str(path))
    return (f"{path}: checkpoint format_version {FORMAT_VERSION + 1} is newer than the supported version "
            f"{FORMAT_VERSION} (written by cpsl 9.0.0); upgrade cpsl")


@case("train-resume-from-a-newer-format", "train")
def _(ctx: Ctx) -> str:
    _train(ctx)
    last = _newer(ctx.out / "checkpoints" / "last.pt")
    return (f"{last}: checkpoint format_version {FORMAT_VERSION + 1} is newer than the supported version "
            f"{FORMAT_VERSION} (written by cpsl 9.0.0); upgrade cpsl")


@case("train-resume-from-a-truncated-checkpoint", "train")
def _(ctx: Ctx) -> re.Pattern:
    _train(ctx)
    last = ctx.out / "checkpoints" / "last.pt"
    truncate(last)
    return re.compile(rf"{re.escape(str(last))}: not a readable checkpoint \(truncated or corrupt: .+\)")


@case("train-resume-with-other-settings", "train")
def _(ctx: Ctx) -> str:
    _train(ctx, **{"optim.lr": 0.02})
    last = ctx.out / "checkpoints" / "last.pt"
    state = load_checkpoint(last)
    state["iteration"] = 2  # an unfinished run (a finished one with other settings starts over)
    save_checkpoint(last, state)
    return (f"{last}: written by a run with different settings (optim.lr: 0.01 there, 0.02 now); delete "
            f"{last.parent} to start over")


@case("train-resume-after-an-input-was-rebuilt", "train")
def _(ctx: Ctx) -> str:
    cfg = _train(ctx)
    last = ctx.out / "checkpoints" / "last.pt"
    state = load_checkpoint(last)
    state["iteration"] = 2                                   # an unfinished run (a finished one starts over)
    state["extra"]["inputs"]["data.source"] = "0123456789abcdef"   # the fingerprint of an earlier build
    save_checkpoint(last, state)
    return (f"{last}: written by a run with other inputs (data.source: {cfg['data']['source']} was rebuilt or "
            f"replaced since); resuming would mix the two, delete {last.parent} to start over")


@case("train-missing-prepared-split", "train")
def _(ctx: Ctx) -> str:
    _train(ctx, **{"data.source": str(ctx.tmp / "not prepared")})
    return f"{ctx.tmp / 'not prepared'}: prepared dataset folder not found"


@case("train-value-of-the-wrong-type", "train")
def _(ctx: Ctx) -> str:
    _train(ctx, **{"data.batch_size": "two"})
    return f"{ctx.config_path}: data.batch_size: expected an integer, got 'two'"


@case("train-value-out-of-range", "train")
def _(ctx: Ctx) -> str:
    _train(ctx, **{"optim.lr": -1})
    return f"{ctx.config_path}: optim.lr: must be > 0 (got -1.0)"


@case("train-typo", "train")
def _(ctx: Ctx) -> str:
    cfg = _train(ctx)
    cfg["max_iter"] = cfg.pop("max_iters")
    ctx.config(cfg)
    return f"{ctx.config_path}: max_iter: unknown setting (did you mean 'max_iters'?)"


@case("train-truncated-image-read-by-a-loader-worker", "train", keeps_output=False)
def _(ctx: Ctx) -> str:
    src = ctx.tmp / "source"
    shutil.copytree(ctx.env["pair"] / "prep_source", src)
    split = PreparedSplit(src)
    image = ctx.tmp / "raw.png"
    shutil.copy(split.image_paths[0], image)
    (src / "list.txt").write_text((src / "list.txt").read_text().replace(str(split.image_paths[0]), str(image)))
    truncate(image)
    _train(ctx, previous=False, **{"data.source": str(src), "data.workers": 1})  # found once training runs
    return f"{image}: truncated PNG (no IEND chunk; the file was cut short)"


def _last_good(ctx: Ctx, m: re.Match | None) -> None:
    """Training stopped at the iteration named, kept the checkpoint named, whose networks are finite."""
    assert m is not None
    state = load_checkpoint(ctx.out / "checkpoints" / "last.pt")
    assert state["iteration"] == int(m.group("good")) < int(m.group("it"))
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert not (ctx.out / "checkpoint.pt").exists()


def _poison(ctx: Ctx, at: int, value: float, how: str) -> None:
    real = source_only.SourceOnly.step
    calls = {"n": 0}

    def step(self, batch):
        calls["n"] += 1
        if calls["n"] == at and how == "image":  # a genuine NaN: the loss and, after the step, the weights
            batch["source"]["image"] = batch["source"]["image"] * value
        losses = real(self, batch)
        return {**losses, "ce_source": value} if calls["n"] == at and how == "loss" else losses

    ctx.monkeypatch.setattr(source_only.SourceOnly, "step", step)


def _stopped(ctx: Ctx, it: str, loss: str, good: str) -> re.Pattern:
    last = re.escape(str(ctx.out / "checkpoints" / "last.pt"))
    return re.compile(rf"iteration (?P<it>{it}): {loss}; training stopped, the last good checkpoint is {last} "
                      rf"\(iteration (?P<good>{good})\)")


@case("train-nan-loss", "train", keeps_output=False, after=_last_good)
def _(ctx: Ctx) -> re.Pattern:
    _train(ctx, previous=False, max_iters=8)
    _poison(ctx, 5, math.nan, "image")
    return _stopped(ctx, "5", "loss 'ce_source' is nan", "4")


@case("train-inf-loss", "train", keeps_output=False, after=_last_good)
def _(ctx: Ctx) -> re.Pattern:
    _train(ctx, previous=False, max_iters=8)
    _poison(ctx, 3, math.inf, "loss")
    return _stopped(ctx, "3", "loss 'ce_source' is inf", "2")


@case("train-diverging-learning-rate", "train", keeps_output=False, after=_last_good)
def _(ctx: Ctx) -> re.Pattern:
    # a far too high rate: the loss or, first, a weight or BatchNorm statistic overflows; either way no
    # checkpoint with NaN/Inf is written
    _train(ctx, previous=False, max_iters=8, **{"optim.lr": 1000.0})
    return _stopped(ctx, r"\d+", r"(loss 'ce_source' is (nan|inf)|[\w.]+ holds NaN or Inf values)", r"\d+")


# ---------------------------------------------------------------------------------------------------------
# evaluate, pseudo labels: checkpoints and prepared splits


def _infer(ctx: Ctx, step: str, checkpoint: Path | None = None, data: Path | None = None, **over: Any) -> None:
    ctx.config({"checkpoint": str(checkpoint or ctx.env["ck19"]), "data": str(data or ctx.env["split19"]),
                "device": "cpu", "workers": 0, "progress": False, **over})
    ctx.previous("evaluate" if step == "evaluate" else "labels")
    # made by the step (evaluate writes into a training stage's folder): a step may write there
    outputs.write_marker(ctx.out, "train" if step == "evaluate" else step)


@case("evaluate-checkpoint-with-other-class-count", "evaluate")
def _(ctx: Ctx) -> str:
    path = tiny_checkpoint(ctx.tmp / "ck16.pt", n_class=16)
    _infer(ctx, "evaluate", path)
    return f"{path} has 16 classes but the prepared split {ctx.env['split19'] / 'meta.json'} has 19"


@case("evaluate-checkpoint-of-a-newer-format", "evaluate")
def _(ctx: Ctx) -> str:
    path = _newer(tiny_checkpoint(ctx.tmp / "ck.pt"))
    _infer(ctx, "evaluate", path)
    return (f"{path}: checkpoint format_version {FORMAT_VERSION + 1} is newer than the supported version "
            f"{FORMAT_VERSION} (written by cpsl 9.0.0); upgrade cpsl")


@case("evaluate-truncated-label-read-by-a-loader-worker", "evaluate")
def _(ctx: Ctx) -> str:
    data = ctx.tmp / "split"
    shutil.copytree(ctx.env["split19"], data)
    label = PreparedSplit(data).label_paths[1]
    truncate(label)
    _infer(ctx, "evaluate", data=data, workers=1)
    return f"{label}: truncated PNG (no IEND chunk; the file was cut short)"


@case("pseudo-soft-truncated-checkpoint", "pseudo-soft")
def _(ctx: Ctx) -> re.Pattern:
    path = tiny_checkpoint(ctx.tmp / "ck.pt")
    truncate(path)
    _infer(ctx, "pseudo-soft", path)
    return re.compile(rf"{re.escape(str(path))}: not a readable checkpoint \(truncated or corrupt: .+\)")


@case("pseudo-soft-plain-state-dict-instead-of-a-checkpoint", "pseudo-soft")
def _(ctx: Ctx) -> str:
    path = ctx.tmp / "weights.pt"
    torch.save({"conv1.weight": torch.zeros(2)}, path)
    _infer(ctx, "pseudo-soft", path)
    return f"{path}: not a cpsl checkpoint (no format='cpsl-checkpoint' entry)"


@case("pseudo-hard-missing-prepared-split", "pseudo-hard")
def _(ctx: Ctx) -> str:
    _infer(ctx, "pseudo-hard", data=ctx.tmp / "not prepared")
    return f"{ctx.tmp / 'not prepared'}: prepared dataset folder not found (data; run `cpsl prepare` first)"


@case("pseudo-hard-prepared-split-with-corrupt-meta", "pseudo-hard")
def _(ctx: Ctx) -> re.Pattern:
    data = ctx.tmp / "split"
    shutil.copytree(ctx.env["split19"], data)
    (data / "meta.json").write_text('{"n_class": 19, "classes": [')
    _infer(ctx, "pseudo-hard", data=data)
    return re.compile(rf"{re.escape(str(data / 'meta.json'))}: corrupt JSON \(.+\)")


# ---------------------------------------------------------------------------------------------------------
# the cases


@pytest.fixture(scope="module")
def env(tmp_path_factory, pair_dir):  # noqa: F811
    """Inputs shared by the cases, and an older output of each kind of step."""
    base = tmp_path_factory.mktemp("bad_inputs")
    split19 = random_split(base, n=3, size=(33, 65))
    ck19 = tiny_checkpoint(base / "ck19.pt")
    train_out = base / "previous_train"
    assert run_cli("train", write_yaml(base / "train.yaml", train_dict(pair_dir, "source_only", max_iters=4,
                                                                       checkpoint_interval=2)), train_out)[0] == 0
    stage = base / "previous_evaluate"
    stage.mkdir()
    shutil.copy(ck19, stage / "checkpoint.pt")
    (stage / "metrics.json").write_text(json.dumps({"miou": 12.5, "iteration": 42}))
    labels = base / "previous_labels"
    labels.mkdir()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(labels / "old.png")
    (labels / "meta.json").write_text("{}")
    return {"pair": pair_dir, "split19": split19, "ck19": ck19, "previous_prepare": pair_dir / "prep_target",
            "previous_train": train_out, "previous_evaluate": stage, "previous_labels": labels}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input(case, env, tmp_path, monkeypatch, one_thread):  # noqa: F811
    ctx = Ctx(tmp_path, tmp_path / "out", env, monkeypatch)
    expected = case.make(ctx)
    before = snapshot(ctx.out)
    rc, err = run_cli(case.step, ctx.config_path, ctx.out)
    assert rc == 2, err[-3000:]
    message = error_line(err, case.step)
    match = None
    if isinstance(expected, re.Pattern):
        match = expected.fullmatch(message)
        assert match, f"{message!r} does not match {expected.pattern!r}"
    else:
        assert message == expected
    if case.keeps_output:
        assert snapshot(ctx.out) == before, "the older output was changed"
    assert leftovers(ctx.out) == []
    if case.after is not None:
        case.after(ctx, match)


# ---------------------------------------------------------------------------------------------------------
# the workflow: quoted paths, bad config values


def test_paths_with_spaces_and_shell_metacharacters_work_in_the_workflow(metachar_workflow):
    run = metachar_workflow
    assert run["result"].returncode == 0, run["result"].stderr[-3000:]
    metrics = json.loads(run["target"].read_text())
    assert metrics["iteration"] == 2 and metrics["n_class"] == N_CLASS
    assert metrics["data"] == str(run["results"] / "inj" / "data" / "target_val")
    stage = run["target"].parent
    assert load_checkpoint(stage / "checkpoint.pt")["config"]["data"]["source"] == \
        str(run["results"] / "inj" / "data" / "source")
    assert (run["results"] / "inj" / "logs" / "seed0" / "train_source_only.log").is_file()
    assert PreparedSplit(run["results"] / "inj" / "data" / "source").meta["root"] == str(run["root"])
    assert markers(run["base"]) == []


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.update(results_dir=c["results_dir"] + "/{exp}"),
     "config: results_dir: {!r} contains '{{' or '}}', which Snakemake reads as a wildcard; choose another folder"),
    (lambda c: c["experiment_settings"]["inj"]["train"].update(max_iter=3),
     "config: experiment_settings.inj.train.max_iter: unknown setting (did you mean 'max_iters'?)"),
    (lambda c: c["experiment_settings"]["inj"]["stages"]["source_only"].update(max_iters=0),
     "experiment_settings.inj.stages.source_only.max_iters: must be >= 1 (got 0)"),
], ids=["results-dir-with-braces", "workflow-config-typo", "workflow-value-out-of-range"])
def test_workflow_stops_on_a_bad_config_value_naming_the_key(tmp_path, edit, message):
    root = make_folder_split(tmp_path / "data", n=2, hw=(8, 16))
    cfg = folder_experiment(root, tmp_path / "results")
    edit(cfg)
    (tmp_path / "wd").mkdir()
    res = snakemake(tmp_path / "wd", write_yaml(tmp_path / "c.yaml", cfg), "-n")
    assert res.returncode == 1
    lines = [line for line in res.stderr.splitlines() if line.startswith("cpsl-pipeline: error: ")]
    assert lines == [f"cpsl-pipeline: error: {message.format(cfg['results_dir'])}"], res.stderr[-2000:]
    assert not (tmp_path / "results" / "inj" / "seed0").exists()
