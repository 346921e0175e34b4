"""Stages 2 and 3 (cpsl.methods.distill): KD terms, thresholded hard labels through the data pipeline, labels
warped into the strong view, the teacher's architecture read from its checkpoint, and stage2 -> stage3 runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch.utils.data import default_collate

from cpsl.config import DatasetConfig, PrepareConfig, PseudoHardConfig, TrainConfig, load
from cpsl.data import pseudo
from cpsl.data.prepared import PreparedSplit
from cpsl.data.transforms import StrongConfig, WeakConfig, WeakParams, apply_weak
from cpsl.errors import CheckpointError, ConfigError
from cpsl.methods import Amp, TrainContext, build_method
from cpsl.methods.distill import (HardLabelExtras, Stage2, Stage3, downsample_labels, kd_kl, kd_loss,
                                  kd_reference, load_teacher, pseudo_targets, weak_label)
from cpsl.models import build_model
from cpsl.models.checkpoint import load_checkpoint, make_checkpoint, save_checkpoint
from cpsl.steps import prepare, pseudo_hard
from cpsl.train.data import TrainDataset, build_datasets, build_loaders
from cpsl.train.dist import DistInfo
from cpsl.train.loop import to_device
from tests.train_helpers import (N_CLASS, TINY_MODEL, finish, one_thread, pair_dir, prepared_pair,  # noqa: F401
                                 start_train, train_config, train_dict, well_conditioned_init, write_config)

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")


def _ctx() -> TrainContext:
    return TrainContext(CPU, DistInfo(0, 1, 0, CPU), Amp("off", CPU))


def _tiny_checkpoint(path: Path, bn_pretrain: bool, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    mcfg = load(TrainConfig, {"stage": "source_only", "max_iters": 1, "data": {"source": "/x"},
                              "model": {**TINY_MODEL, "bn_pretrain": bn_pretrain}}).model
    model = build_model(mcfg)
    save_checkpoint(path, make_checkpoint(model, mcfg, iteration=0))
    return path


@pytest.fixture(scope="module")
def stage1(pair_dir, tmp_path_factory):  # noqa: F811
    """A stand-in stage-1 model (no bn_pretrain) and its flip-averaged hard pseudo labels of the target."""
    base = tmp_path_factory.mktemp("stage1")
    ckpt = well_conditioned_init(base / "checkpoint.pt")
    _, tgt = prepared_pair(pair_dir)
    hard = base / "pseudo_hard"
    pseudo_hard.run(PseudoHardConfig(checkpoint=ckpt, data=tgt, device="cpu", batch_size=3, workers=0,
                                     progress=False, color=False), hard)
    return ckpt, hard


def _distill_dict(pair_dir, stage1, stage="stage2", **over):  # noqa: F811
    ckpt, hard = stage1
    return train_dict(pair_dir, stage, **{"model.bn_pretrain": True, "distill.teacher": str(ckpt),
                                          "distill.hard_labels": str(hard), **over})


# ---------------------------------------------------------------------------------------------------------
# KD terms


def test_kd_kl_is_zero_iff_student_equals_teacher():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(2, 5, 3, 4, generator=g)
    s = torch.randn(2, 5, 3, 4, generator=g)
    assert kd_kl(t.clone(), t).item() == pytest.approx(0.0, abs=1e-7)
    assert kd_loss(t.clone(), t, None, "kl").item() == pytest.approx(0.0, abs=1e-7)
    assert kd_kl(s, t).item() > 1e-3
    # the definition, averaged over the valid pixels only
    valid = torch.rand(2, 3, 4, generator=g) > 0.4
    lt, ls = t.log_softmax(1), s.log_softmax(1)
    per_pixel = (lt.exp() * (lt - ls)).sum(1)
    assert kd_kl(s, t, valid).item() == pytest.approx(per_pixel[valid].mean().item(), rel=1e-5)
    assert kd_kl(s, t, torch.zeros_like(valid)).item() == 0.0
    # gradient reaches the student only
    s.requires_grad_(True)
    t.requires_grad_(True)
    kd_kl(s, t).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0 and t.grad is None


def test_kd_reference_matches_its_formula_by_hand():
    # B=1, C=2, H=1, W=2: logits by pixel
    student = [[0.0, 1.0], [2.0, -1.0]]
    teacher = [[1.0, 0.0], [0.5, 0.5]]

    def softmax(v):
        e = [math.exp(x) for x in v]
        return [x / sum(e) for x in e]

    total = 0.0
    for s_px, t_px in zip(student, teacher):
        p, t = softmax(s_px), softmax(t_px)
        total += sum(tk * (math.log(tk) - pk) for tk, pk in zip(t, p))
    expected = total / (1 * 2 * 1 * 2)
    s = torch.tensor(student, dtype=torch.float64).T.reshape(1, 2, 1, 2)
    t = torch.tensor(teacher, dtype=torch.float64).T.reshape(1, 2, 1, 2)
    assert kd_reference(s, t, 2).item() == pytest.approx(expected, rel=1e-6)     # the reference: / C
    assert kd_loss(s, t, torch.zeros(1, 1, 2, dtype=torch.bool), "reference", 2).item() == pytest.approx(expected,
                                                                                                           rel=1e-6)
    # the default class scaling divides by 19 whatever C is (#27): 2/19 of the reference's value for C = 2
    assert kd_reference(s, t, 19).item() == pytest.approx(expected * 2 / 19, rel=1e-6)
    assert kd_reference(t, t, 2).item() != pytest.approx(0.0, abs=1e-3)  # not a divergence
    with pytest.raises(ValueError):
        kd_loss(s, t, None, "mse")
    with pytest.raises(ValueError, match="class divisor"):
        kd_loss(s, t, None, "reference")


# ---------------------------------------------------------------------------------------------------------
# Hard labels through the data pipeline


def test_weak_label_equals_apply_weak_and_downsampling_takes_cell_centres():
    rng = np.random.default_rng(0)
    label = rng.integers(0, 4, (40, 80)).astype(np.uint8)
    image = rng.integers(0, 255, (40, 80, 3)).astype(np.uint8)
    for p in (WeakParams((40, 80), (50, 100), (5, 7, 32, 64), True), WeakParams((40, 80), (20, 40), (0, 3, 32, 64),
                                                                                   False)):
        _, ref = apply_weak(image, label, p)
        assert np.array_equal(weak_label(label, p), ref)
    lab = torch.arange(64).reshape(1, 8, 8)
    assert downsample_labels(lab, (2, 2)).tolist() == [[[18, 22], [50, 54]]]


def test_thresholded_hard_labels_end_to_end_into_the_batch(pair_dir, stage1, tmp_path):  # noqa: F811
    _, tgt = prepared_pair(pair_dir)
    split = PreparedSplit(tgt)
    hard = tmp_path / "hard"
    full = {}
    for i, name in enumerate(split.names):
        image, _ = split.load(i)
        h, w = image.shape[:2]
        rng = np.random.default_rng(i)
        label = rng.integers(0, N_CLASS, (h, w)).astype(np.uint8)
        conf_q = rng.choice(np.array([round(0.5 * 65535), math.floor(0.95 * 65535), math.floor(0.95 * 65535) + 1,
                                      65535], np.uint16), size=(h, w))
        pseudo.save_hard(hard, name, label, conf_q)
        expected = label.copy()
        expected[conf_q / 65535 <= 0.95] = 255  # exactly the low-confidence pixels (0.95 itself included)
        full[name] = (image, expected)
    (hard / "meta.json").write_text(json.dumps({"kind": "hard", "n_class": N_CLASS}))
    cfg = load(TrainConfig, _distill_dict(pair_dir, stage1, **{"distill.hard_labels": str(hard),
                                                                "data.batch_size": 3}))
    method = build_method(cfg, _ctx())
    datasets = build_datasets(cfg, method.domains, cfg.model.n_class)
    loader = build_loaders(cfg, {"target": datasets["target"]}, rank=0, world_size=1, start_iter=0)["target"]
    batch = next(iter(loader))
    assert batch["pseudo_label"].dtype == torch.uint8 and batch["pseudo_label"].shape == (3, 32, 64)
    n_ignored = n_kept = 0
    for k, name in enumerate(batch["name"]):
        image, expected = full[name]
        params = WeakParams.from_dict({key: v[k] for key, v in batch["weak_params"].items()})
        _, want = apply_weak(image, expected, params)
        got = batch["pseudo_label"][k].numpy()
        assert np.array_equal(got, want)
        n_ignored += int((got == 255).sum())
        n_kept += int((got != 255).sum())
    assert n_ignored > 0 and n_kept > 0
    # a missing file is caught before training, naming the sample
    (hard / f"{split.names[0]}_conf.png").unlink()
    with pytest.raises(Exception, match="no hard pseudo label for target sample"):
        build_method(cfg, _ctx())


def _rectangle_split(tmp_path: Path) -> Path:
    """One 64x128 image: a red rectangle on blue, label 1 inside, 0 outside."""
    root = tmp_path / "rect"
    img = np.zeros((64, 128, 3), np.uint8)
    img[..., 2] = 220
    lab = np.zeros((64, 128), np.uint8)
    img[14:46, 30:90] = (230, 20, 20)
    lab[14:46, 30:90] = 1
    (root / "images" / "train").mkdir(parents=True)
    (root / "labels" / "train").mkdir(parents=True)
    Image.fromarray(img).save(root / "images" / "train" / "im000.png")
    Image.fromarray(lab).save(root / "labels" / "train" / "im000.png")
    (root / "classes.txt").write_text("".join(f"class{k}\n" for k in range(N_CLASS)))
    out = tmp_path / "rect_prep"
    prepare.run(PrepareConfig(DatasetConfig(format="folder", root=root, split="train", n_class=N_CLASS, workers=0),
                              lab_stats=False), out)
    hard = tmp_path / "rect_hard"
    pseudo.save_hard(hard, PreparedSplit(out).names[0], lab, np.full(lab.shape, 65535, np.uint16))
    return out, hard


def _iou(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a & b).sum()) / max(1, int((a | b).sum()))


def test_strong_view_labels_line_up_with_the_strong_image(tmp_path):
    data, hard = _rectangle_split(tmp_path)
    split = PreparedSplit(data)
    geometric = StrongConfig(pool=("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY"), n_ops=2, op_p=1.0,
                             blur_p=0.0, jitter_p=0.0, max_v=9)
    ds = TrainDataset(split, WeakConfig(crop_hw=(48, 96), resize_w=128, scale=(0.9, 1.3)), label=False,
                      views=("weak", "strong"), strong=geometric, extras=HardLabelExtras(hard, split.names, 0.95))
    batch = default_collate([ds[(0, seed)] for seed in range(8)])
    img = batch["image_strong"]
    red = (img[:, 0] > 0.5) & (img[:, 2] < 0.5)
    for stride, low, mean in ((1, 0.95, 0.97), (4, 0.85, 0.9)):
        labels, valid = pseudo_targets(batch, stride, strong_view=True)
        colour = downsample_labels(red, labels.shape[-2:])
        assert labels.shape == (8, 48 // stride, 96 // stride)
        assert bool(((labels == 255) == ~valid).all())
        ious = [_iou(labels[k] == 1, colour[k] & valid[k]) for k in range(8)]
        assert min(ious) > low and np.mean(ious) > mean, (stride, ious)
        # sensitivity: the same labels left in the weak view do not line up with the strong image
        unwarped, _ = pseudo_targets(batch, stride, strong_view=False)
        assert np.mean([_iou(unwarped[k] == 1, colour[k] & valid[k]) for k in range(8)]) < 0.7
    # the weak view: unwarped labels on the weak image
    labels, valid = pseudo_targets(batch, 1, strong_view=False)
    red_weak = (batch["image"][:, 0] > 0.5) & (batch["image"][:, 2] < 0.5)
    assert all(_iou(labels[k] == 1, red_weak[k]) > 0.95 for k in range(8))


# ---------------------------------------------------------------------------------------------------------
# Teacher, student init, one step


def test_teacher_bn_pretrain_comes_from_its_checkpoint(pair_dir, stage1, tmp_path):  # noqa: F811
    with_bn = _tiny_checkpoint(tmp_path / "with_bn.pt", True)
    without = _tiny_checkpoint(tmp_path / "without_bn.pt", False)
    t1, flag1 = load_teacher(with_bn, N_CLASS, CPU)
    t0, flag0 = load_teacher(without, N_CLASS, CPU)
    assert flag1 and t1.bn_pretrain is not None and not t1.training
    assert not flag0 and t0.bn_pretrain is None
    assert not any(p.requires_grad for p in t1.parameters())
    with pytest.raises(ConfigError, match="distill.teacher: .* has 4 classes, model.n_class is 5"):
        load_teacher(with_bn, 5, CPU)
    # either teacher works with a bn_pretrain student (stage 2 from stage 1, stage 3 from stage 2)
    for teacher, flag in ((without, False), (with_bn, True)):
        m = build_method(load(TrainConfig, _distill_dict(pair_dir, stage1, **{"distill.teacher": str(teacher)})),
                         _ctx())
        assert m.teacher_bn_pretrain is flag and m.describe()["teacher_bn_pretrain"] is flag
    # stage 3 from a bn_pretrain stage-2 model with model.bn_pretrain false: the clear error
    bad = _distill_dict(pair_dir, stage1, "stage3", init_checkpoint=str(with_bn), **{"model.bn_pretrain": False})
    with pytest.raises(CheckpointError, match=r"with_bn.pt has bn_pretrain=True, config model.bn_pretrain is False"):
        build_method(load(TrainConfig, bad), _ctx())
    with pytest.raises(ConfigError, match="init_checkpoint: required for stage 'stage3'"):
        load(TrainConfig, _distill_dict(pair_dir, stage1, "stage3"))


def test_student_init_is_recorded(pair_dir, stage1, tmp_path):  # noqa: F811
    simclr = tmp_path / "r_simclr.pth"
    backbone = {k: v for k, v in build_model(train_config(pair_dir).model).state_dict().items()
                if not k.startswith("layer5")}
    torch.save({"state_dict": backbone}, simclr)
    m = build_method(load(TrainConfig, _distill_dict(pair_dir, stage1, **{"model.init": str(simclr),
                                                                          "model.init_format": "simclr"})), _ctx())
    assert isinstance(m, Stage2) and m.describe()["student_init"] == f"simclr:{simclr}"
    assert build_method(load(TrainConfig, _distill_dict(pair_dir, stage1)), _ctx()).describe()["student_init"] == \
        "random"
    ckpt = _tiny_checkpoint(tmp_path / "s2.pt", True)
    m3 = build_method(load(TrainConfig, _distill_dict(pair_dir, stage1, "stage3", init_checkpoint=str(ckpt))), _ctx())
    assert isinstance(m3, Stage3) and m3.describe()["student_init"] == f"checkpoint:{ckpt}"
    # stage 2 from another run's checkpoint without its head (the demo's source-only model)
    other = _tiny_checkpoint(tmp_path / "source_only.pt", False, seed=3)
    m2 = build_method(load(TrainConfig, _distill_dict(pair_dir, stage1, **{"model.init": str(other),
                                                                           "model.init_format": "checkpoint"})),
                      _ctx())
    assert m2.describe()["student_init"] == f"backbone:{other}"
    assert torch.equal(m2.student.layer1[0].conv1.weight,
                       load_checkpoint(other)["model"]["layer1.0.conv1.weight"])


@pytest.mark.parametrize("over", [{}, {"distill.strong_view": False, "distill.kd_mode": "reference",
                                       "distill.label_stride": 1}])
def test_step_trains_the_student_only(pair_dir, stage1, over):  # noqa: F811
    cfg = load(TrainConfig, _distill_dict(pair_dir, stage1, **over))
    m = build_method(cfg, _ctx())
    assert "views" in m.domains["target"] and ("strong" in m.domains["target"]["views"]) == cfg.distill.strong_view
    opt_params = {id(p) for g in m.optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in opt_params for p in m.teacher.parameters())
    assert "teacher" not in m.state_dict() and set(m.nets) == {"model"}
    datasets = build_datasets(cfg, m.domains, cfg.model.n_class)
    loaders = build_loaders(cfg, datasets, rank=0, world_size=1, start_iter=0)
    batch = {d: to_device(next(iter(loader)), CPU) for d, loader in loaders.items()}
    t_before = {k: v.clone() for k, v in m.teacher.state_dict().items()}
    s_before = [p.detach().clone() for p in m.student.parameters()]
    m.train_mode()
    assert not m.teacher.training and m.student.training
    losses = m.step(batch)
    assert set(losses) == {"ce_source", "ce_pseudo", "kd"} and all(np.isfinite(v) for v in losses.values())
    if cfg.distill.kd_mode == "kl":
        assert losses["kd"] > 0
    assert all(torch.equal(v, m.teacher.state_dict()[k]) for k, v in t_before.items())
    assert any(not torch.equal(a, p) for a, p in zip(s_before, m.student.parameters()))


# ---------------------------------------------------------------------------------------------------------
# End to end


def test_cli_stage2_then_stage3(pair_dir, stage1, tmp_path):  # noqa: F811
    s1_ckpt, _ = stage1
    _, tgt = prepared_pair(pair_dir)
    out2, out3 = tmp_path / "stage2", tmp_path / "stage3"
    cfg2 = _distill_dict(pair_dir, stage1, max_iters=3)
    finish(start_train(write_config(tmp_path / "s2.yaml", cfg2), out2))
    summary2 = json.loads((out2 / "train_summary.json").read_text())
    assert summary2["stage"] == "stage2" and summary2["student_init"] == "random"
    assert summary2["teacher"] == str(s1_ckpt) and summary2["teacher_bn_pretrain"] is False
    assert set(summary2["final_losses"]) == {"ce_source", "ce_pseudo", "kd"}
    ckpt2 = out2 / "checkpoint.pt"
    state2 = load_checkpoint(ckpt2)
    assert state2["model_config"]["bn_pretrain"] is True and state2["extra"]["student_init"] == "random"

    hard2 = tmp_path / "stage2_hard"
    pseudo_hard.run(PseudoHardConfig(checkpoint=ckpt2, data=tgt, device="cpu", batch_size=3, workers=0,
                                     progress=False, color=False), hard2)
    cfg3 = _distill_dict(pair_dir, stage1, "stage3", max_iters=3, init_checkpoint=str(ckpt2),
                         **{"distill.teacher": str(ckpt2), "distill.hard_labels": str(hard2)})
    finish(start_train(write_config(tmp_path / "s3.yaml", cfg3), out3))
    summary3 = json.loads((out3 / "train_summary.json").read_text())
    assert summary3["stage"] == "stage3" and summary3["student_init"] == f"checkpoint:{ckpt2}"
    assert summary3["teacher"] == str(ckpt2) and summary3["teacher_bn_pretrain"] is True
    lines = [json.loads(x) for x in (out3 / "metrics.jsonl").read_text().splitlines()]
    assert [x["iteration"] for x in lines] == [1, 2, 3] and all("loss/kd" in x for x in lines)
    assert load_checkpoint(out3 / "checkpoint.pt")["extra"]["teacher"] == str(ckpt2)
    assert yaml.safe_load((tmp_path / "s3.yaml").read_text())["distill"]["hard_labels"] == str(hard2)


def test_class_shares_of_student_and_teacher_beside_the_warmup_marginal(pair_dir, stage1, tmp_path):  # noqa: F811
    # #27: the distillation stages count the argmax shares of the student and the teacher on the valid target
    # pixels; distill.class_dist (the warm-up's marginal, passed by the workflow) is logged beside them
    dist = tmp_path / "class_distribution.npy"
    np.save(dist, np.array([2.0, 1.0, 1.0, 0.0]))
    cfg = load(TrainConfig, _distill_dict(pair_dir, stage1, **{"distill.class_dist": str(dist)}))
    m = build_method(cfg, _ctx())
    loaders = build_loaders(cfg, build_datasets(cfg, m.domains, cfg.model.n_class), rank=0, world_size=1,
                            start_iter=0)
    batch = {d: to_device(next(iter(loader)), CPU) for d, loader in loaders.items()}
    m.train_mode()
    with torch.no_grad():
        m.losses(batch)
    counted = m.shares.counts.clone()
    labels, valid = pseudo_targets(batch["target"], cfg.distill.label_stride, cfg.distill.strong_view)
    assert counted[0].sum() == counted[1].sum() == valid.sum()            # every valid pixel, once each
    record, _ = m.log_shares(10)
    assert [record[f"share/marginal/{k}"] for k in range(4)] == [0.5, 0.25, 0.25, 0.0]
    assert [record[f"share/teacher/{k}"] for k in range(4)] == pytest.approx((counted[1] / valid.sum()).tolist())
