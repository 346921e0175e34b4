"""Pseudo-label storage (cpsl.data.pseudo) and the pseudo-soft / pseudo-hard steps."""

from __future__ import annotations

import json
import os

import cv2
import numpy as np
import pytest
import torch

from cpsl import inference
from cpsl.config import PseudoHardConfig, PseudoSoftConfig
from cpsl.data import pseudo
from cpsl.data.prepared import PreparedSplit
from cpsl.labels import CLASSES_19, colorize
from cpsl.steps import pseudo_hard, pseudo_soft
from tests.inference_fixtures import random_split, tiny_checkpoint

REFERENCE_SOFT_BYTES = 2_519_756  # float32 (19, 129, 257) .npy, spec section 6
HALF_STEP = 1 / 510
BAND = 1 / 131070  # half a confidence quantisation step


def _probs(shape, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).softmax(-3)


# ---------------------------------------------------------------------------------------------------------
# soft labels


def test_quantize_soft_sums_to_255_and_error_bounds():
    p = _probs((2, 19, 31, 37))
    q = pseudo.quantize_soft(p)
    assert q.dtype == torch.uint8 and q.shape == p.shape
    assert torch.all(q.long().sum(1) == 255)
    err = (q.double() / 255 - p.double()).abs()
    assert float(err.max()) < 1 / 255 + 1e-6
    # Where plain rounding already sums to 255, q is exactly round(255 p), within half a step.
    r = (p.double() * 255).round()
    ok = r.sum(1) == 255
    assert 0.05 < float(ok.double().mean()) < 1.0  # both kinds of pixels occur
    assert torch.equal(q.long().permute(0, 2, 3, 1)[ok], r.long().permute(0, 2, 3, 1)[ok])
    assert float(err.permute(0, 2, 3, 1)[ok].max()) <= HALF_STEP + 1e-6


def test_quantize_soft_edge_cases():
    onehot = torch.zeros(19, 2, 3)
    onehot[4] = 1
    assert torch.all(pseudo.quantize_soft(onehot)[4] == 255)
    uniform = torch.full((19, 2, 3), 1 / 19)
    q = pseudo.quantize_soft(uniform).long()
    assert torch.all(q.sum(0) == 255) and set(q.unique().tolist()) <= {13, 14}  # 255/19 = 13.42
    half = torch.tensor([0.5, 0.5, 0.0]).reshape(3, 1, 1).half()  # fp16 input accepted
    assert pseudo.quantize_soft(half).long().sum() == 255


def test_soft_round_trip_within_bound(tmp_path):
    p = _probs((19, 13, 21), scale=2.0, seed=3)
    path = pseudo.soft_path(tmp_path, "city/img_0")
    pseudo.save_soft(path, pseudo.quantize_soft(p))
    back = pseudo.load_soft(path)
    assert back.dtype == np.float32 and back.shape == (19, 13, 21)
    assert np.abs(back.sum(0) - 1).max() < 1e-6
    assert np.abs(back - p.numpy()).max() < 1 / 255 + 1e-6


def test_plain_rounding_renormalisation_bound():
    """Decoding a plain round(255 p) file (renormalised) stays within (1 + C) / (510 - C) of p."""
    c = 19
    p = _probs((c, 40, 40), scale=1.0, seed=5)
    q = (p * 255).round().to(torch.uint8)
    back = pseudo.dequantize_soft(q)
    assert np.abs(back.sum(0) - 1).max() < 1e-5
    err = np.abs(back - p.numpy()).max()
    assert err <= (1 + c) / (510 - c)
    raw = np.abs(q.numpy() / 255 - p.numpy()).max()
    assert raw <= HALF_STEP + 1e-6


def test_soft_bytes_per_image_paper_shape():
    sizes = pseudo_soft.benchmark_bytes((19, 129, 257))
    assert sizes["reference_float32_npy"] == REFERENCE_SOFT_BYTES
    assert sizes["npz_smooth"] <= REFERENCE_SOFT_BYTES / 4
    assert sizes["npz_noisy"] <= REFERENCE_SOFT_BYTES / 4


def test_load_soft_errors(tmp_path):
    with pytest.raises(Exception, match=r"nope\.npz: soft pseudo label not found"):
        pseudo.load_soft(tmp_path / "nope.npz")
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(Exception, match=r"bad\.npz: corrupt soft pseudo-label file"):
        pseudo.load_soft(bad)
    wrong = tmp_path / "wrong.npz"
    np.savez_compressed(wrong, q=np.zeros((2, 3), np.float32))
    with pytest.raises(Exception, match=r"wrong\.npz: soft pseudo label must be uint8"):
        pseudo.load_soft(wrong)


# ---------------------------------------------------------------------------------------------------------
# hard labels


def test_load_hard_threshold_ignores_exactly_low_confidence(tmp_path):
    rng = np.random.default_rng(0)
    offsets = np.array([-0.2, -0.01, -1e-3, -1e-4, -2e-5, 0.0, 2e-5, 1e-4, 1e-3, 0.01, 0.04, 0.05])
    conf = 0.95 + rng.choice(offsets, size=(6, 10))
    conf[0, 0], conf[0, 1] = 0.95, 1.0
    label = rng.integers(0, 19, conf.shape).astype(np.uint8)
    pseudo.save_hard(tmp_path, "a/b", label, pseudo.quantize_conf(conf), colorize(label))
    assert np.array_equal(pseudo.load_hard(tmp_path, "a/b"), label)
    got = pseudo.load_hard(tmp_path, "a/b", threshold=0.95)
    expected = np.where(conf <= 0.95, 255, label)
    assert np.array_equal(got, expected)
    stored = pseudo.load_hard_conf(tmp_path, "a/b").astype(np.float64) / 65535
    assert np.abs(stored - conf).max() <= BAND + 1e-12
    color = cv2.imread(str(pseudo.hard_paths(tmp_path, "a/b")["color"]))[:, :, ::-1]
    assert np.array_equal(color, colorize(label))


def test_load_hard_threshold_random_conf_only_band_differs(tmp_path):
    rng = np.random.default_rng(1)
    conf = np.clip(0.95 + rng.normal(0, 1e-4, (64, 64)), 0, 1)
    label = np.full(conf.shape, 3, np.uint8)
    pseudo.save_hard(tmp_path, "x", label, pseudo.quantize_conf(conf))
    got = pseudo.load_hard(tmp_path, "x", 0.95) == 255
    differs = got != (conf <= 0.95)
    assert np.all(np.abs(conf[differs] - 0.95) <= BAND)
    assert not pseudo.hard_paths(tmp_path, "x")["color"].exists()


# ---------------------------------------------------------------------------------------------------------
# the steps


@pytest.fixture(scope="module")
def city(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pseudo")
    return random_split(tmp, n=3, size=(33, 65), layout="cityscapes"), tiny_checkpoint(tmp / "ck.pt")


def test_pseudo_soft_step(city, tmp_path):
    data, ckpt = city
    out = tmp_path / "soft"
    meta = pseudo_soft.run(PseudoSoftConfig(checkpoint=ckpt, data=data, device="cpu", batch_size=2, workers=0,
                                            progress=False), out)
    split = PreparedSplit(data)
    model, _, _ = inference.load_model_from_checkpoint(ckpt, "cpu")
    on_disk = json.loads((out / "meta.json").read_text())
    assert on_disk == meta and meta["n_images"] == 3 and meta["n_class"] == 19 and meta["shapes"] == {"5x9": 3}
    assert meta["classes"] == list(CLASSES_19) and meta["names"] == split.names
    for i, name in enumerate(split.names):
        assert "/" in name
        image, _ = split.load(i)
        p = inference.predict_probs(model, inference.image_to_tensor(image)[None])[0].numpy()
        back = pseudo.load_soft(pseudo.soft_path(out, name))
        assert back.shape == p.shape == (19, 5, 9)
        assert np.abs(back - p).max() < 1 / 255 + 1e-6
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no staging folder left


def test_pseudo_soft_failure_leaves_nothing(city, tmp_path, monkeypatch):
    data, ckpt = city
    calls = []

    def broken(path, q):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(path, q)

    real = pseudo.save_soft
    monkeypatch.setattr(pseudo, "save_soft", broken)
    out = tmp_path / "soft"
    with pytest.raises(OSError, match="disk full"):
        pseudo_soft.run(PseudoSoftConfig(checkpoint=ckpt, data=data, device="cpu", workers=0, progress=False), out)
    assert os.listdir(tmp_path) == []


def test_pseudo_hard_step(city, tmp_path):
    data, ckpt = city
    out = tmp_path / "hard"
    meta = pseudo_hard.run(PseudoHardConfig(checkpoint=ckpt, data=data, device="cpu", batch_size=2, workers=1,
                                            progress=False), out)
    assert meta["n_images"] == 3 and meta["flip"] is True and meta["threshold_applied"] is False
    split = PreparedSplit(data)
    model, _, _ = inference.load_model_from_checkpoint(ckpt, "cpu")
    for i, name in enumerate(split.names):
        image, _ = split.load(i)
        p = inference.predict_probs(model, inference.image_to_tensor(image)[None], out_size=image.shape[:2],
                                    flip=True)[0]
        conf, label = p.max(0)
        got = pseudo.load_hard(out, name)
        assert got.shape == image.shape[:2]
        assert np.array_equal(got, label.numpy().astype(np.uint8))
        stored = pseudo.load_hard_conf(out, name) / 65535
        # (+ 5e-6: the step ran batches of 2, this check runs single images; float32 sums differ slightly)
        assert np.abs(stored - conf.double().numpy()).max() <= BAND + 5e-6
        thr = float(np.median(conf.numpy()))
        assert np.array_equal(pseudo.load_hard(out, name, thr) == 255,
                              pseudo.load_hard_conf(out, name) <= thr * 65535)
        assert pseudo.hard_paths(out, name)["color"].exists()
