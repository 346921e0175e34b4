"""The shared inference helpers and the evaluate / prototypes / class-dist steps (tiny or fake models, CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from cpsl import cli, inference
from cpsl.config import (ClassDistConfig, EvaluateConfig, ImportCheckpointConfig, ModelConfig, PrototypesConfig,
                         load)
from cpsl.data.prepared import PreparedSplit
from cpsl.errors import CheckpointError, ConfigError, DataError
from cpsl.labels import CLASSES_16, CLASSES_19
from cpsl.metrics import ConfusionMatrix
from cpsl.models import DeepLabV2
from cpsl.steps import class_dist, evaluate, import_checkpoint, prototypes
from tests.inference_fixtures import make_split, random_split, tiny_checkpoint, use_fake_model

I = 255  # noqa: E741

# Hand-made case for the fake model (red channel = predicted class, green/blue = 2-d features).
GT = [np.array([[0, 0, 1, 1], [0, 0, 1, 1]]), np.array([[2, 2, I, I], [2, 2, 2, 2]])]
PRED = [np.array([[0, 0, 0, 1], [0, 0, 0, 1]]), np.array([[2, 2, 2, 2], [2, 0, 2, 2]])]
# IoU: road 4 / (4 + 7 - 4); sidewalk 2 / (4 + 2 - 2); building 5 / (6 + 5 - 5); others absent.
HAND_IOU = {"road": 4 / 7, "sidewalk": 2 / 4, "building": 5 / 6}


def _fake_images(preds, rng):
    images = []
    for pred in preds:
        img = rng.integers(0, 256, (*pred.shape, 3), dtype=np.uint8)
        img[:, :, 0] = pred
        images.append(img)
    return images


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tiny")
    return random_split(tmp, n=3, size=(33, 65)), tiny_checkpoint(tmp / "ck.pt", iteration=42)


def _kw(**extra):
    return {"device": "cpu", "workers": 0, "progress": False, **extra}


# ---------------------------------------------------------------------------------------------------------
# helpers


def test_image_to_tensor_is_rgb_over_255():
    img = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 10
    t = inference.image_to_tensor(img)
    assert t.shape == (3, 2, 3) and t.dtype == torch.float32
    assert torch.allclose(t, torch.from_numpy(img).permute(2, 0, 1).float() / 255)


def test_shards_cover_every_image_once():
    shards = [inference.shard_indices(10, r, 3) for r in range(3)]
    assert shards[1] == [1, 4, 7] and sorted(sum(shards, [])) == list(range(10))


def test_flip_average_is_symmetric(tiny):
    _, ckpt = tiny
    model, mcfg, state = inference.load_model_from_checkpoint(ckpt, "cpu")
    assert not model.training and mcfg.n_class == 19 and state["iteration"] == 42
    x = torch.rand(2, 3, 33, 65, generator=torch.Generator().manual_seed(0))
    p = inference.predict_probs(model, x, flip=True)
    pf = inference.predict_probs(model, x.flip(-1), flip=True)
    assert torch.allclose(p, pf.flip(-1), atol=1e-6)
    plain = inference.predict_probs(model, x)
    assert torch.allclose(p, (plain + inference.predict_probs(model, x.flip(-1)).flip(-1)) / 2, atol=1e-6)
    assert torch.allclose(p.sum(1), torch.ones(1), atol=1e-5)
    up = inference.predict_probs(model, x, out_size=(33, 65))
    assert up.shape == (2, 19, 33, 65)
    assert torch.allclose(up, F.interpolate(plain, size=(33, 65), mode="bilinear", align_corners=True), atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# evaluate


def test_evaluate_hand_checked_miou(tmp_path, monkeypatch):
    use_fake_model(monkeypatch)
    data = make_split(tmp_path, _fake_images(PRED, np.random.default_rng(0)), [g.astype(np.uint8) for g in GT])
    out = tmp_path / "stage"
    cfg = EvaluateConfig(checkpoint=tmp_path / "ck.pt", data=data, experiment="exp", seed=3, stage="stage2",
                         **_kw(batch_size=2))
    metrics = evaluate.run(cfg, out)
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk == metrics
    for key, value in {"stage": "stage2", "experiment": "exp", "seed": 3, "iteration": 7, "n_class": 19,
                       "selection": "last", "flip": False}.items():
        assert metrics[key] == value, key
    assert set(metrics["per_class"]) == set(CLASSES_19)
    for name, v in metrics["per_class"].items():
        if name in HAND_IOU:
            assert v == pytest.approx(100 * HAND_IOU[name], abs=1e-3)
        else:
            assert v is None
    assert metrics["miou"] == pytest.approx(100 * np.mean(list(HAND_IOU.values())), abs=1e-3)
    assert metrics["pixel_acc"] == pytest.approx(100 * 11 / 14, abs=1e-3)
    assert "miou13" not in metrics
    cm = np.load(out / "confusion.npy")
    assert cm.dtype == np.int64 and cm.shape == (19, 19) and cm.sum() == 14 and cm[0, 0] == 4 and cm[2, 0] == 1
    # the predictions of the first images, as palette PNGs: values are the train ids, colours Cityscapes'
    index = json.loads((out / "samples" / "index.json").read_text())
    split = PreparedSplit(data)
    assert [e["name"] for e in index] == split.names[:2]
    for entry, pred in zip(index, PRED):
        assert entry["image"] == str(split.image_paths[split.names.index(entry["name"])])
        png = Image.open(out / "samples" / entry["prediction"])
        assert png.mode == "P" and np.array_equal(np.array(png), pred)
        assert png.getpalette()[:9] == [128, 64, 128, 244, 35, 232, 70, 70, 70]  # road, sidewalk, building
    # a rerun removes the temp file of a sample that a killed run (a process that no longer exists) was writing,
    # and leaves one of a live writer alone
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = out / "samples" / f".{index[0]['prediction']}.{dead.pid}-abc123.tmp"
    live = out / "samples" / f".{index[0]['prediction']}.{os.getpid()}-def456.tmp"
    stale.write_bytes(b"half a png")
    live.write_bytes(b"being written")
    evaluate.run(cfg, out)
    assert not stale.exists() and live.exists()
    live.unlink()
    none = evaluate.run(EvaluateConfig(checkpoint=tmp_path / "ck.pt", data=data, samples=0, **_kw()), tmp_path / "n")
    assert none["miou"] == metrics["miou"] and not (tmp_path / "n" / "samples").exists()
    # recorded names fall back to the checkpoint's own config
    metrics = evaluate.run(EvaluateConfig(checkpoint=tmp_path / "ck.pt", data=data, **_kw()), tmp_path / "e2")
    assert (metrics["stage"], metrics["experiment"], metrics["seed"]) == ("stage1", "demo", 5)


def test_evaluate_16_classes_reports_miou13(tmp_path, monkeypatch):
    use_fake_model(monkeypatch, n_class=16)
    data = make_split(tmp_path, _fake_images(PRED, np.random.default_rng(1)), [g.astype(np.uint8) for g in GT],
                      classes=CLASSES_16)
    metrics = evaluate.run(EvaluateConfig(checkpoint=tmp_path / "ck.pt", data=data, **_kw()), tmp_path / "o")
    assert metrics["n_class"] == 16 and set(metrics["per_class"]) == set(CLASSES_16)
    assert metrics["miou13"] == pytest.approx(metrics["miou"])  # road, sidewalk, building are in the 13


def test_evaluate_matches_direct_prediction(tiny, tmp_path):
    data, ckpt = tiny
    for flip in (False, True):
        metrics = evaluate.run(EvaluateConfig(checkpoint=ckpt, data=data, flip=flip,
                                              **_kw(batch_size=2, workers=1 if flip else 0)), tmp_path / str(flip))
        model, _, _ = inference.load_model_from_checkpoint(ckpt, "cpu")
        split = PreparedSplit(data)
        cm = ConfusionMatrix(19)
        for i in range(len(split)):
            image, label = split.load(i)
            p = inference.predict_probs(model, inference.image_to_tensor(image)[None], out_size=label.shape,
                                        flip=flip, upsample_logits=True)
            cm.update(label, p.argmax(1)[0])
        assert np.array_equal(np.load(tmp_path / str(flip) / "confusion.npy"), cm.hist)
        assert metrics["miou"] == cm.summary(CLASSES_19)["miou"] and metrics["iteration"] == 42
        assert metrics["flip"] is flip and metrics["checkpoint"] == str(ckpt)


def test_evaluate_input_size_resizes_and_maps_back(tiny, tmp_path):
    data, ckpt = tiny
    metrics = evaluate.run(EvaluateConfig(checkpoint=ckpt, data=data, input_size=[17, 33], **_kw()), tmp_path / "o")
    assert metrics["input_size"] == [17, 33] and metrics["pixels"] == 3 * (33 * 65 - 5)


def test_evaluate_imported_reference_checkpoint(tiny, tmp_path):
    data, _ = tiny
    torch.manual_seed(1)
    ref = DeepLabV2("resnet18", 19, 8, 16)
    pkl = tmp_path / "from_gta5_to_cityscapes_on_deeplabv2_best_model.pkl"
    torch.save({"ResNet101": {"model_state": ref.state_dict(), "prototypes_ema": torch.zeros(19, 16)},
                "iter": 1234, "best_iou": np.float64(41.4)}, pkl)
    ckpt = import_checkpoint.run(ImportCheckpointConfig(source=pkl), tmp_path / "imported")
    metrics = evaluate.run(EvaluateConfig(checkpoint=ckpt, data=data, stage="warmup", **_kw()), tmp_path / "e")
    assert metrics["iteration"] == 1234 and metrics["stage"] == "warmup" and metrics["n_class"] == 19
    assert 0 <= metrics["miou"] <= 100


# ---------------------------------------------------------------------------------------------------------
# prototypes and class distribution


def _proto_case(tmp_path):
    rng = np.random.default_rng(2)
    preds = [rng.choice([0, 1, 5], size=(6, 7), p=[0.5, 0.45, 0.05]) for _ in range(3)]
    preds[2][:] = 1
    preds[2][0, :3] = 0   # 3 road pixels: below min_pixels = 10 in image 2
    images = _fake_images(preds, rng)
    labels = [np.zeros((6, 7), np.uint8)] * 3
    return make_split(tmp_path, images, labels), preds, images


def test_prototypes_pixel_mean_hand_computed(tmp_path, monkeypatch, capsys):
    use_fake_model(monkeypatch)
    data, preds, images = _proto_case(tmp_path)
    out = tmp_path / "protos"
    summary = prototypes.run(PrototypesConfig(checkpoint=tmp_path / "ck.pt", data=data, **_kw(batch_size=2)), out)
    saved = torch.load(out / "prototypes.pt", weights_only=True)
    assert saved["mode"] == "pixel" and saved["classes"] == list(CLASSES_19)
    assert saved["prototypes"].shape == (19, 2) and saved["prototypes"].dtype == torch.float32
    feats = np.concatenate([im[:, :, 1:3].reshape(-1, 2) for im in images]).astype(np.float64)
    cls = np.concatenate([p.ravel() for p in preds])
    for k in range(19):
        n = int((cls == k).sum())
        assert int(saved["counts"][k]) == n
        want = feats[cls == k].mean(0) if n else np.zeros(2)
        assert np.allclose(saved["prototypes"][k].numpy(), want, atol=1e-4)
    never = [c for k, c in enumerate(CLASSES_19) if k not in (0, 1, 5)]
    assert summary["never_predicted"] == never
    assert json.loads((out / "prototypes.json").read_text())["never_predicted"] == never
    assert "16 class(es) never predicted" in capsys.readouterr().err


@pytest.mark.parametrize("cap,passes", [(3000, 1), (2, 2)])
def test_prototypes_image_mean_reference_variant(tmp_path, monkeypatch, cap, passes):
    use_fake_model(monkeypatch)
    data, preds, images = _proto_case(tmp_path)
    out = tmp_path / "protos"
    cfg = PrototypesConfig(checkpoint=tmp_path / "ck.pt", data=data, mode="image_mean", cap=cap, passes=passes,
                           **_kw(batch_size=2))
    prototypes.run(cfg, out)
    saved = torch.load(out / "prototypes.pt", weights_only=True)
    split = PreparedSplit(data)
    order = [int(n[3:]) for n in split.names]  # img0, img1, img2
    obj, cnt = np.zeros((19, 2)), np.zeros(19)
    for _ in range(passes):
        for j in order:
            for k in range(19):
                mask = preds[j] == k
                if mask.sum() >= 10:
                    v = images[j][:, :, 1:3][mask].astype(np.float64).mean(0)
                    obj[k] = (obj[k] * cnt[k] + v) / (cnt[k] + 1)
                    cnt[k] = min(cnt[k] + 1, cap)
    assert np.allclose(saved["prototypes"].numpy(), obj, atol=1e-4)
    assert saved["mode"] == "image_mean" and int(saved["counts"][0]) == 2  # road: images 0 and 1 only


def test_class_dist_hand_computed(tmp_path, monkeypatch):
    use_fake_model(monkeypatch)
    data, preds, _ = _proto_case(tmp_path)
    out = tmp_path / "cd"
    summary = class_dist.run(ClassDistConfig(checkpoint=tmp_path / "ck.pt", data=data, **_kw()), out)
    counts = np.bincount(np.concatenate([p.ravel() for p in preds]), minlength=19)
    dist = np.load(out / "class_distribution.npy")
    assert dist.dtype == np.float64 and dist.shape == (19,)
    assert np.array_equal(dist, counts / counts.sum())
    on_disk = json.loads((out / "class_distribution.json").read_text())
    assert on_disk["counts"] == counts.tolist() and on_disk == summary
    assert on_disk["distribution"]["road"] == counts[0] / counts.sum()


def test_class_dist_real_model_at_output_resolution(tiny, tmp_path):
    data, ckpt = tiny
    class_dist.run(ClassDistConfig(checkpoint=ckpt, data=data, **_kw(batch_size=3)), tmp_path / "cd")
    model, _, _ = inference.load_model_from_checkpoint(ckpt, "cpu")
    split = PreparedSplit(data)
    counts = np.zeros(19, np.int64)
    for i in range(len(split)):
        image, _ = split.load(i)
        pred = inference.predict_probs(model, inference.image_to_tensor(image)[None]).argmax(1)
        assert pred.shape == (1, 5, 9)
        counts += np.bincount(pred.numpy().ravel(), minlength=19)
    assert np.allclose(np.load(tmp_path / "cd" / "class_distribution.npy"), counts / counts.sum(), atol=1e-12)


# ---------------------------------------------------------------------------------------------------------
# errors and the command line


def test_errors_name_the_file(tiny, tmp_path):
    data, ckpt = tiny
    with pytest.raises(CheckpointError, match=r"nope\.pt: checkpoint file not found"):
        evaluate.run(EvaluateConfig(checkpoint=tmp_path / "nope.pt", data=data, **_kw()), tmp_path / "o")
    with pytest.raises(DataError, match=r"missing: prepared dataset folder not found \(data;"):
        class_dist.run(ClassDistConfig(checkpoint=ckpt, data=tmp_path / "missing", **_kw()), tmp_path / "o")
    ck16 = tiny_checkpoint(tmp_path / "ck16.pt", n_class=16)
    msg = rf"ck16\.pt has 16 classes but the prepared split {data / 'meta.json'} has 19$"
    with pytest.raises(CheckpointError, match=msg):
        prototypes.run(PrototypesConfig(checkpoint=ck16, data=data, **_kw()), tmp_path / "o")
    assert not (tmp_path / "o").exists()
    with pytest.raises(ConfigError, match=r"^input_size: must be \[height, width\]"):
        load(EvaluateConfig, {"checkpoint": "a", "data": "b", "input_size": [5]})
    with pytest.raises(ConfigError, match=r"^mode: 'mean' is not one of"):
        load(PrototypesConfig, {"checkpoint": "a", "data": "b", "mode": "mean"})


def test_cli_runs_steps_and_reports_one_line_errors(tiny, tmp_path, capsys):
    data, ckpt = tiny
    cfg = tmp_path / "cd.yaml"
    cfg.write_text(yaml.safe_dump({"checkpoint": str(ckpt), "data": str(data), "device": "cpu", "workers": 0,
                                   "progress": False}))
    assert cli.main(["class-dist", "--config", str(cfg), "--out", str(tmp_path / "cd")]) == 0
    assert sorted(os.listdir(tmp_path / "cd")) == [".cpsl-output.json", "class_distribution.json",
                                                   "class_distribution.npy", "config.yaml", "run_info.json"]
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"checkpoint": str(tmp_path / "gone.pt"), "data": str(data)}))
    capsys.readouterr()
    assert cli.main(["evaluate", "--config", str(bad), "--out", str(tmp_path / "ev")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"cpsl evaluate: error: {tmp_path / 'gone.pt'}: checkpoint file not found"]
    names = {s.name for s in cli.STEPS}
    assert {"evaluate", "pseudo-soft", "pseudo-hard", "prototypes", "class-dist"} <= names


def test_model_config_comes_from_the_checkpoint(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "ck.pt", n_class=16)
    model, mcfg, _ = inference.load_model_from_checkpoint(ckpt, "cpu")
    assert isinstance(mcfg, ModelConfig) and mcfg.n_class == 16 and mcfg.backbone == "resnet18"
    assert model.layer5.head[1].out_channels == 16


def test_two_processes_under_torchrun_match_one(tiny, tmp_path):
    """Sharded run (2 CPU processes, gloo): the order-dependent image_mean prototypes equal the 1-process ones."""
    import subprocess
    import sys

    data, ckpt = tiny
    settings = {"checkpoint": str(ckpt), "data": str(data), "device": "cpu", "workers": 0, "progress": False,
                "mode": "image_mean", "min_pixels": 1, "passes": 2}
    cfg = tmp_path / "pr.yaml"
    cfg.write_text(yaml.safe_dump(settings))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "cpsl", "prototypes", "--config", str(cfg), "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    prototypes.run(load(PrototypesConfig, settings), tmp_path / "one")
    one, two = (torch.load(tmp_path / d / "prototypes.pt", weights_only=True) for d in ("one", "two"))
    assert torch.equal(one["counts"], two["counts"])
    assert torch.allclose(one["prototypes"], two["prototypes"], atol=1e-5)
    assert sorted(os.listdir(tmp_path)) == ["one", "pr.yaml", "two"]  # no staging folders left
