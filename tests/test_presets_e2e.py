"""The paper presets, by their names, end to end through the real Snakefile (#21 item 1).

One workflow run builds ``gta5_cityscapes`` and ``synthia_cityscapes`` as shipped in config.yaml, with one
overlay file (``ci.yaml``, passed after config.yaml with ``--configfile``, as a user passes ``paths.yaml``) that
sets what a user sets (the dataset roots, a mirror of torchvision's ImageNet file, the SimCLRv2 file of the
stage-2 student that the preset's comment asks for) and shrinks only what a CPU test must: image size, crop,
``resize``, iterations, batch, stage 1's queue, and the GPU resources. The test checks, key by key, that every
other setting of every stage is the preset's, then the outcomes: each stage's checkpoint and summary, bf16, the
ImageNet file fetched from the file:// mirror and hash-checked, the stage-2 student from the SimCLR file, the
skipped unlabelled GTA5 image, and the tables (19 classes; 16 classes with mIoU-13).

Inputs are generated in the real layouts (tests/preset_fixtures.py). Both presets run in one Snakemake call,
so that the two chains share the two cores (46 jobs, about 350-410 CPU-seconds; the wall time is in the README's
Tests section).
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from cpsl import labels
from cpsl import workflow as W
from tests import preset_fixtures as F

REPO = Path(__file__).resolve().parent.parent
SNAKEMAKE = Path(sys.executable).parent / "snakemake"
PRESETS = ("gta5_cityscapes", "synthia_cityscapes")
SEED = 6523  # the presets' seed
ITERS = 3    # every stage: the contrastive term of stage 1 starts at iteration 3 (the queue is full then)
# What the overlay shrinks, per stage (dotted keys of the resolved train config) and the values it gives them;
# every other key must be the preset's. resize: the preset's ratio of resize to image width (2200 for 1914-wide
# GTA5 images, 1280 for 1280-wide SYNTHIA ones) at the generated widths.
IMAGE_HW = {"gta5_cityscapes": (88, 160), "synthia_cityscapes": (76, 128), "cityscapes": (64, 128)}
RESIZE = {"gta5_cityscapes": 184, "synthia_cityscapes": 128}
SHRUNK_ALL = {"data.crop": [64, 128], "data.batch_size": 2, "max_iters": ITERS}
# stage 1 samples pixels_per_image from the student's 9x17 output grid at a 64x128 crop (the preset's 256 need
# a larger crop); a queue of 4 iterations' pixels (the preset's holds 64 of its 512x896 iterations)
SHRUNK_STAGE = {"stage1": {"selflabel.pixels_per_image": 16, "selflabel.queue_length": 64}}
# the GPU jobs of the presets run on the CPU, one thread each
NEEDS_BYTES = 6_000_000_000
RESOURCES = {kind: {"threads": 1, "gpu": 0} for kind in ("prepare", "train", "evaluate", "stage_product")}


def flatten(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def shrunk(exp: str, stage: str) -> dict:
    return {**SHRUNK_ALL, "data.resize": RESIZE[exp], **SHRUNK_STAGE.get(stage, {})}


def user_settings(data: Path, mirror_url: str, simclr: Path) -> dict:
    """What a user writes for the presets (roots, the mirror, the SimCLR file): not a shrink."""
    city = str(data / "cityscapes")
    sources = {"gta5_cityscapes": data / "GTA5", "synthia_cityscapes": data / "SYNTHIA"}
    return {"imagenet_urls": {"resnet101": mirror_url}, "experiment_settings": {exp: {
        "datasets": {"source": {"root": str(sources[exp])}, "target_train": {"root": city},
                     "target_val": {"root": city}},
        "stages": {"stage2": {"model": {"init": str(simclr), "init_format": "simclr"}}},
    } for exp in PRESETS}}


def unflatten(flat: dict) -> dict:
    out: dict = {}
    for key, value in flat.items():
        node = out
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return out


def ci_overlay(data: Path, mirror_url: str, simclr: Path) -> dict:
    """user_settings plus the shrinking, as one config file."""
    overlay = user_settings(data, mirror_url, simclr)
    for exp in PRESETS:
        sets = overlay["experiment_settings"][exp]
        sets["train"] = unflatten({k: v for k, v in shrunk(exp, "source_only").items() if k != "max_iters"})
        for stage in W.STAGES:
            extra = unflatten({"max_iters": ITERS, **SHRUNK_STAGE.get(stage, {})})
            sets["stages"][stage] = W.deep_merge(sets["stages"].get(stage, {}), extra)
        sets["resources"] = RESOURCES
    overlay["experiments"] = list(PRESETS)
    return overlay


@pytest.fixture(scope="module")
def preset_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("presets")
    # what the run leaves: 4.2 GB (ResNet-101 checkpoints of 261 MB, stage 1's 522 MB, each with its last.pt a
    # hard link to it; three 179 MB weight files); two jobs at a time each hold a resumable state beside it
    free = shutil.disk_usage(base).free
    assert free > NEEDS_BYTES, (f"{base}: {free / 1e9:.1f} GB free; the two presets' run needs about "
                                f"{NEEDS_BYTES / 1e9:.1f} GB")
    data = base / "data"
    F.make_gta5(data / "GTA5", n=6, hw=IMAGE_HW["gta5_cityscapes"], unlabelled=1)
    F.make_synthia(data / "SYNTHIA", n=6, hw=IMAGE_HW["synthia_cityscapes"])
    F.make_cityscapes(data / "cityscapes", {"train": 2, "val": 2}, IMAGE_HW["cityscapes"])
    mirror = F.torchvision_file(data / "mirror", seed=0)
    simclr = F.simclr_file(data / "pretrained" / "r101_1x_sk0.pth", seed=1)
    work = base / "work"
    work.mkdir()
    (work / "ci.yaml").write_text(yaml.safe_dump(ci_overlay(data, mirror.as_uri(), simclr)))
    cmd = [str(SNAKEMAKE), "-s", str(REPO / "Snakefile"), "-d", str(work), "--configfile",
           str(REPO / "config.yaml"), str(work / "ci.yaml"), "--cores", "2"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=1500)
    try:
        assert res.returncode == 0, res.stderr[-4000:]
        yield {"work": work, "data": data, "mirror": mirror, "simclr": simclr}
    finally:
        # the ResNet-101 checkpoints and weight files are 4.2 GB, and pytest keeps the last 3 runs' folders: they
        # go, the logs, configs, metrics and tables stay for a look after a failure
        for path in base.rglob("*"):
            if path.is_file() and path.stat().st_size > 10_000_000:
                path.unlink()


@pytest.mark.parametrize("exp", PRESETS)
def test_only_the_listed_keys_differ_from_the_preset(preset_run, exp):
    """Every resolved setting of every stage is what config.yaml's preset resolves to with the user's roots,
    mirror and SimCLR file, except the shrunk keys, which hold the overlay's values."""
    work = preset_run["work"]
    shipped = yaml.safe_load((REPO / "config.yaml").read_text())
    as_shipped = W.deep_merge(shipped, user_settings(preset_run["data"], preset_run["mirror"].as_uri(),
                                                     preset_run["simclr"]))
    preset = shipped["experiment_settings"][exp]
    for stage in W.STAGES:
        resolved = flatten(yaml.safe_load((work / f"results/{exp}/seed{SEED}/configs/train_{stage}.yaml")
                                          .read_text()))
        expected = flatten(W.train_config(as_shipped, exp, SEED, stage))
        differ = {k for k in set(resolved) | set(expected) if resolved.get(k) != expected.get(k)}
        assert differ == set(shrunk(exp, stage)), stage
        assert {k: resolved[k] for k in differ} == shrunk(exp, stage), stage
        # and directly against the preset's own lines (train, then stages.<stage> over it; model over the
        # experiment's model)
        lines = flatten(W.deep_merge(preset["train"], preset["stages"][stage]))
        lines.update({f"model.{k}": v for k, v in flatten(W.deep_merge(preset["model"], preset["stages"][stage]
                                                                       .get("model", {}))).items()})
        for key, value in lines.items():
            if key in shrunk(exp, stage) or (stage == "stage2" and key == "model.init"):
                continue
            if key == "model.init":
                value = f"results/weights/{preset_run['mirror'].name}"  # "imagenet", fetched
            assert resolved[key] == value, (stage, key)
    # the settings the issue names, as shipped
    s1 = yaml.safe_load((work / f"results/{exp}/seed{SEED}/configs/train_stage1.yaml").read_text())
    assert s1["model"]["backbone"] == "resnet101" and s1["amp"] == "bf16" and s1["reference_class_scaling"]
    assert s1["optim"]["backbone_lr_mult"] == 3.0 and s1["selflabel"]["ema_mode"] == "train"
    assert s1["selflabel"]["reference_queue_labels"] and s1["selflabel"]["reference_queue_scores"]
    assert s1["data"]["lab_transfer"] is (exp == "gta5_cityscapes")  # the reference's GTA5 loader only
    for stage in ("stage2", "stage3"):
        s = yaml.safe_load((work / f"results/{exp}/seed{SEED}/configs/train_{stage}.yaml").read_text())
        assert s["model"]["bn_pretrain"] is True and s["distill"]["kd_mode"] == "reference"
        assert s["distill"]["threshold"] == 0.95
    # the data and inference steps are not shrunk at all
    for role in ("source", "target_train", "target_val"):
        got = yaml.safe_load((work / f"results/{exp}/configs/prepare_{role}.yaml").read_text())
        assert got == W.prepare_config(as_shipped, exp, role), role
    prep = yaml.safe_load((work / f"results/{exp}/configs/prepare_source.yaml").read_text())
    assert prep["dataset"]["allow_skip"] is (exp == "gta5_cityscapes")
    for stage in W.STAGES:
        got = yaml.safe_load((work / f"results/{exp}/seed{SEED}/configs/evaluate_{stage}_target_val.yaml")
                             .read_text())
        assert got == W.inference_config(as_shipped, exp, SEED, "evaluate", stage, "target_val"), stage
        assert got["amp"] is True


@pytest.mark.parametrize("exp", PRESETS)
def test_every_stage_ran_from_the_intended_weights(preset_run, exp):
    res = preset_run["work"] / "results"
    mirror = preset_run["mirror"]
    # the ImageNet file: fetched once from the file:// mirror, byte for byte, with its name (hash) kept
    cached = res / "weights" / mirror.name
    assert cached.read_bytes() == mirror.read_bytes()
    assert yaml.safe_load((res / "weights/config.yaml").read_text())["url"] == mirror.as_uri()
    n_tv = len(F.resnet101_state(0))
    head = torch.load(res / exp / f"seed{SEED}/source_only/checkpoint.pt", weights_only=True)["model"]
    n_head = sum(k.startswith("layer5.") and not k.endswith("num_batches_tracked") for k in head)
    for stage in W.STAGES:
        sdir = res / exp / f"seed{SEED}" / stage
        assert (sdir / "checkpoint.pt").is_file() and (sdir / "metrics.json").is_file(), stage
        summary = json.loads((sdir / "train_summary.json").read_text())
        assert summary["iterations"] == ITERS and summary["amp"] == "bf16", stage
        assert all(math.isfinite(v) for v in summary["final_losses"].values()), stage
        init = summary["student_init"]
        if stage in ("source_only", "warmup", "oracle"):
            assert init == f"imagenet:results/weights/{mirror.name}", stage
            # every backbone tensor of the torchvision file (all but fc.*), a new head
            assert summary["student_init_report"] == {"loaded": n_tv - 2, "missing": {"layer5": n_head},
                                                      "unexpected": {"fc": 2}}, stage
    s = {stage: json.loads((res / exp / f"seed{SEED}" / stage / "train_summary.json").read_text())
         for stage in W.STAGES}
    assert s["stage1"]["student_init"] == f"checkpoint:results/{exp}/seed{SEED}/warmup/checkpoint.pt"
    assert s["stage2"]["student_init"] == f"simclr:{preset_run['simclr']}"
    assert s["stage2"]["student_init_report"] == {"loaded": n_tv - 2, "unexpected": {"fc": 2},
                                                  "missing": {"bn_pretrain": 4, "layer5": n_head}}
    assert s["stage3"]["student_init"] == f"checkpoint:results/{exp}/seed{SEED}/stage2/checkpoint.pt"
    assert s["stage3"]["teacher"] == f"results/{exp}/seed{SEED}/stage2/checkpoint.pt"
    assert s["stage3"]["teacher_bn_pretrain"] is True and s["stage3"]["kd_mode"] == "reference"
    # the weights themselves: after 3 small steps the stage-2 student's backbone is still next to the SimCLR
    # file, the source-only one's next to the ImageNet file (distance over every convolution; the random
    # networks' first layers move most: conv1 by 0.4 and 1.0 of its norm 2.5)
    simclr, imagenet = F.resnet101_state(1), F.resnet101_state(0)
    convs = [k for k in imagenet if k.endswith("weight") and imagenet[k].dim() == 4]
    for stage, near, far in (("stage2", simclr, imagenet), ("source_only", imagenet, simclr)):
        w = torch.load(res / exp / f"seed{SEED}" / stage / "checkpoint.pt", weights_only=True)["model"]
        d_near = sum(float((w[k].float() - near[k]).square().sum()) for k in convs)
        d_far = sum(float((w[k].float() - far[k]).square().sum()) for k in convs)
        assert d_near < 1e-3 * d_far, (stage, d_near, d_far)
    # stage 1 ran its contrastive term (the queue filled) and its rectified self-labeling
    s1 = s["stage1"]["final_losses"]
    assert s1["contrast"] > 0 and s1["sl"] > 0
    # the GTA5 image without a label was skipped (allow_skip), the SYNTHIA set has none
    meta = json.loads((res / exp / "data/source/meta.json").read_text())
    assert meta["n_images"] == 6
    if exp == "gta5_cityscapes":
        assert [Path(p["file"]).name for p in meta["skipped"]] == ["00007.png"]
    else:
        assert meta["skipped"] == []


@pytest.mark.parametrize("exp", PRESETS)
def test_the_tables_hold_every_stage_with_the_presets_classes(preset_run, exp):
    res = preset_run["work"] / "results"
    n_class = 19 if exp == "gta5_cityscapes" else 16
    rows = list(csv.DictReader((res / exp / "summary.csv").open()))
    assert [(r["stage"], r["split"], r["seed"]) for r in rows if r["seed"] == str(SEED)] == [
        (stage, "target_val", str(SEED)) for stage in ("source_only", "warmup", "stage1", "stage2", "stage3",
                                                       "oracle")]
    names = list(labels.class_names(n_class))
    header = list(rows[0])
    assert header[header.index("miou13") + 1: header.index("miou13") + 1 + n_class] == names
    thirteen = [c for c in names if c not in ("wall", "fence", "pole")]
    for r in (r for r in rows if r["seed"] == str(SEED)):
        assert r["backbone"] == "resnet101", r
        m = json.loads((res / exp / f"seed{SEED}" / r["stage"] / "metrics.json").read_text())
        assert m["n_class"] == n_class and m["iteration"] == ITERS and m["n_images"] == 4
        present = [v for v in m["per_class"].values() if v is not None]
        assert float(r["miou"]) == pytest.approx(sum(present) / len(present), abs=1e-3)
        if n_class == 16:  # mIoU-13: the same model over the 13 classes without wall, fence and pole
            p13 = [m["per_class"][c] for c in thirteen if m["per_class"][c] is not None]
            assert float(r["miou13"]) == pytest.approx(sum(p13) / len(p13), abs=1e-3)
            assert m["miou13"] == pytest.approx(float(r["miou13"]), abs=1e-3)
        else:
            assert r["miou13"] == "" and m.get("miou13") is None
    md = (res / exp / "summary.md").read_text()
    assert ("| mIoU | mIoU-13 |" in md) is (n_class == 16)
    # all experiments: their classes differ (19 and 16), so only the mIoU columns
    both = list(csv.DictReader((res / "summary.csv").open()))
    assert {r["experiment"] for r in both} == set(PRESETS)
    assert "road" not in both[0] and "miou13" in both[0]
