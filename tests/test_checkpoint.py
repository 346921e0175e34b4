"""Checkpoint format: atomic save, safe load, exact resume, reference import, malicious pickles."""

from __future__ import annotations

import os
import pickle
import random

import numpy as np
import pytest
import torch

from cpsl.config import ImportCheckpointConfig, ModelConfig, to_dict
from cpsl.errors import CheckpointError
from cpsl.models import DeepLabV2, build_discriminator, build_model
from cpsl.models.checkpoint import (FORMAT_VERSION, capture_rng_state, check_model_fits, checkpoint_model_config,
                                    load_checkpoint, load_model_state, make_checkpoint, restore_rng_state,
                                    save_checkpoint)
from cpsl.steps import import_checkpoint

CFG = ModelConfig(backbone="resnet18", base_width=8, head_channels=16)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny CPU workloads: one intra-op thread avoids OpenMP oversubscription on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _setup(seed: int):
    torch.manual_seed(seed)
    model = build_model(CFG).train()
    ema = build_model(CFG)
    protos = torch.nn.Parameter(torch.randn(19, 16))
    opt = torch.optim.SGD([{"params": model.backbone_parameters(), "lr": 1e-2},
                           {"params": model.head_parameters() + [protos], "lr": 5e-2}],
                          momentum=0.9, weight_decay=2e-4)
    sched = torch.optim.lr_scheduler.PolynomialLR(opt, total_iters=100, power=0.9)
    return model, ema, protos, opt, sched


def _step(model, protos, opt, sched) -> list[float]:
    """One training step whose data comes from all three RNGs (and dropout from torch's)."""
    scale = random.random() + float(np.random.standard_normal())
    x = torch.randn(2, 3, 24, 24) * scale
    out = model(x)
    loss = out["out"].square().mean() + (out["feat"].mean((2, 3)) @ protos.t()).square().mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()
    return [scale, random.gauss(0, 1), float(np.random.rand()), float(torch.rand(1))]


def test_resume_round_trip_restores_everything(tmp_path):
    model, ema, protos, opt, sched = _setup(0)
    random.seed(1)
    np.random.seed(2)
    for _ in range(3):
        _step(model, protos, opt, sched)
    ckpt = make_checkpoint(model, CFG, ema_model=ema.state_dict(), prototypes=protos.detach(),
                           prototypes_ema=protos.detach() * 0.5, optimizer=opt.state_dict(),
                           scheduler=sched.state_dict(), iteration=3, rng=capture_rng_state(),
                           config={"stage": "stage1", "lr": 1e-2, "paths": ["a", "b"]}, seed=7,
                           extra={"note": "x"})
    path = save_checkpoint(tmp_path / "ck" / "checkpoint.pt", ckpt)
    assert sorted(os.listdir(path.parent)) == ["checkpoint.pt"]  # no temp file left behind
    draws_a = [_step(model, protos, opt, sched) for _ in range(2)]

    model2, ema2, protos2, opt2, sched2 = _setup(123)  # different weights and RNG state
    random.seed(99)
    np.random.seed(99)
    state = load_checkpoint(path)
    check_model_fits(state, CFG, path)
    load_model_state(model2, state["model"], path)
    load_model_state(ema2, state["ema_model"], path, "ema_model")
    with torch.no_grad():
        protos2.copy_(state["prototypes"])
    opt2.load_state_dict(state["optimizer"])
    sched2.load_state_dict(state["scheduler"])
    restore_rng_state(state["rng"])
    assert state["iteration"] == 3 and state["seed"] == 7 and state["config"]["paths"] == ["a", "b"]
    assert state["format_version"] == FORMAT_VERSION and state["model_config"] == to_dict(CFG)
    assert torch.equal(state["prototypes_ema"], state["prototypes"] * 0.5)
    for k, v in ema.state_dict().items():
        assert torch.equal(v, ema2.state_dict()[k]), k
    bufs = [opt2.state[p]["momentum_buffer"] for p in model2.backbone_parameters()]
    ref = [opt.state[p]["momentum_buffer"] for p in model.backbone_parameters()]
    assert all(b is not None for b in bufs) and len(bufs) == len(ref)
    assert sched2.last_epoch == 3 and sched2.get_last_lr() == pytest.approx(
        [1e-2 * (1 - 3 / 100) ** 0.9, 5e-2 * (1 - 3 / 100) ** 0.9])

    draws_b = [_step(model2, protos2, opt2, sched2) for _ in range(2)]
    assert draws_a == draws_b
    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), k
    assert torch.equal(protos, protos2)


def test_rng_state_is_weights_only_loadable(tmp_path):
    np.random.standard_normal()  # leaves a cached gaussian in numpy's legacy state
    random.gauss(0, 1)
    state = capture_rng_state()
    torch.save(state, tmp_path / "rng.pt")
    loaded = torch.load(tmp_path / "rng.pt", weights_only=True)
    expect = (random.random(), np.random.standard_normal(), random.gauss(0, 1), torch.randn(3))
    restore_rng_state(loaded)
    got = (random.random(), np.random.standard_normal(), random.gauss(0, 1), torch.randn(3))
    assert expect[:3] == got[:3] and torch.equal(expect[3], got[3])


def test_save_is_atomic_and_rejects_unsafe_values(tmp_path, monkeypatch):
    model = build_model(CFG)
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, make_checkpoint(model, CFG, iteration=1))
    original = path.read_bytes()

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, make_checkpoint(model, CFG, iteration=2))
    monkeypatch.undo()
    assert path.read_bytes() == original and os.listdir(tmp_path) == ["checkpoint.pt"]
    with pytest.raises(TypeError, match=r"checkpoint entry checkpoint\.extra\.when: datetime"):
        import datetime
        save_checkpoint(path, make_checkpoint(model, CFG, extra={"when": datetime.datetime.now()}))
    assert load_checkpoint(path)["iteration"] == 1
    save_checkpoint(path, make_checkpoint(model, CFG, iteration=np.int64(4), extra={"miou": np.float64(41.4)}))
    state = load_checkpoint(path)
    assert state["iteration"] == 4 and type(state["extra"]["miou"]) is float


def test_newer_format_version_rejected(tmp_path):
    path = tmp_path / "future.pt"
    state = make_checkpoint(build_model(CFG), CFG)
    state["format_version"] = FORMAT_VERSION + 1
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=rf"{path}: checkpoint format_version {FORMAT_VERSION + 1} is newer "
                                              rf"than the supported version {FORMAT_VERSION}"):
        load_checkpoint(path)


def test_truncated_and_foreign_files_rejected(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, make_checkpoint(build_model(CFG), CFG))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"^{path}: not a readable checkpoint \(truncated or corrupt"):
        load_checkpoint(path)
    other = tmp_path / "state_dict.pt"
    torch.save({"w": torch.zeros(2)}, other)
    with pytest.raises(CheckpointError, match=rf"^{other}: not a cpsl checkpoint"):
        load_checkpoint(other)
    with pytest.raises(CheckpointError, match="checkpoint file not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_check_model_fits_messages(tmp_path):
    path = tmp_path / "checkpoint.pt"
    cfg16 = ModelConfig(backbone="resnet18", base_width=8, head_channels=16, n_class=16)
    save_checkpoint(path, make_checkpoint(build_model(cfg16), cfg16))
    state = load_checkpoint(path)
    check_model_fits(state, cfg16, path)
    with pytest.raises(CheckpointError, match=r"^checkpoint\.pt has 16 classes, config model\.n_class is 19"):
        check_model_fits(state, CFG, path)
    with pytest.raises(CheckpointError, match=r"checkpoint\.pt has bn_pretrain=False, config model\.bn_pretrain"):
        check_model_fits(state, ModelConfig(**{**to_dict(cfg16), "bn_pretrain": True}), path)
    with pytest.raises(CheckpointError, match=r"model state dict does not fit the network: 5 missing"):
        load_model_state(build_model(ModelConfig(**{**to_dict(cfg16), "bn_pretrain": True})), state["model"], path)
    with pytest.raises(CheckpointError, match=r"shape mismatch for layer5\.head\.1\.weight"):
        load_model_state(build_model(CFG), state["model"], path)
    assert checkpoint_model_config(state).n_class == 16


# ---------------------------------------------------------------------------------------------------------
# import of the released reference .pkl files


def _save_as_if_on_cuda(monkeypatch, obj, path, **kwargs) -> None:
    """torch.save with every storage tagged 'cuda:0', as in the released files (loading needs map_location)."""
    with monkeypatch.context() as mp:
        mp.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save(obj, path, **kwargs)


def test_import_reference_resnet101_gives_identical_outputs(tmp_path, monkeypatch):
    torch.manual_seed(0)
    ref = DeepLabV2("resnet101").eval()
    with torch.no_grad():  # make BN statistics non-trivial so a lost buffer would show
        for m in ref.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    protos = torch.randn(19, 256, requires_grad=True)
    src = tmp_path / "from_gta5_to_cityscapes_on_deeplabv2_best_model.pkl"
    _save_as_if_on_cuda(monkeypatch, {"ResNet101": {"model_state": ref.state_dict(), "prototypes_ema": protos},
                                      "iter": 5, "best_iou": np.float64(41.4)}, src)
    with pytest.raises(CheckpointError, match="use `cpsl import-checkpoint`"):
        load_checkpoint(src)  # plain weights_only refuses the numpy scalar

    out = import_checkpoint.run(ImportCheckpointConfig(source=src, n_class=19, bn_pretrain=False), tmp_path / "imp")
    state = load_checkpoint(out)
    assert out == tmp_path / "imp" / "checkpoint.pt"
    assert state["iteration"] == 5 and state["extra"]["best_iou"] == pytest.approx(41.4)
    assert state["model_config"]["backbone"] == "resnet101" and state["model_config"]["n_class"] == 19
    assert not state["model_config"]["bn_pretrain"] and state["model_config"]["head_channels"] == 256
    assert torch.equal(state["prototypes_ema"], protos.detach()) and not state["prototypes_ema"].requires_grad
    model = build_model(checkpoint_model_config(state, out))
    load_model_state(model, state["model"], out)
    x = torch.randn(1, 3, 33, 33)
    with torch.no_grad():
        a, b = ref(x), model.eval()(x)
    assert torch.equal(a["out"], b["out"]) and torch.equal(a["feat"], b["feat"])


def test_import_legacy_format_with_discriminator_and_bn_pretrain(tmp_path, monkeypatch):
    cfg = ModelConfig(backbone="resnet18", base_width=8, head_channels=16, n_class=16, bn_pretrain=True)
    ref = build_model(cfg)
    disc = build_discriminator(16, width=8)
    src = tmp_path / "warmup.pkl"
    _save_as_if_on_cuda(
        monkeypatch, {"ResNet101": {"model_state": ref.state_dict(), "prototypes_ema": torch.zeros(16, 16)},
                      "FCDiscriminator": {"model_state": disc.state_dict(), "prototypes_ema": torch.zeros(16, 16)},
                      "iter": np.int64(1000), "best_iou": np.float32(40.5)}, src, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match=r"^warmup\.pkl has 16 classes, config n_class is 19"):
        import_checkpoint.run(ImportCheckpointConfig(source=src, n_class=19), tmp_path / "x")
    assert not (tmp_path / "x" / "checkpoint.pt").exists()
    state = load_checkpoint(import_checkpoint.run(ImportCheckpointConfig(source=src), tmp_path / "ok"))
    assert checkpoint_model_config(state) == ModelConfig(**{**to_dict(cfg), "init": None})
    assert state["iteration"] == 1000 and state["extra"]["discriminator"] == {"in_channels": 16, "width": 8}
    disc2 = build_discriminator(16, width=8)
    load_model_state(disc2, state["discriminator"], "x", "discriminator")
    assert all(torch.equal(a, b) for a, b in zip(disc.state_dict().values(), disc2.state_dict().values()))


def test_import_legacy_pickle_names_what_is_refused_and_how_to_resave(tmp_path):
    """A non-zip pickle is named as such, with the objects the restricted loader refuses (torch itself only says
    "Unsupported operand 149": the FRAME opcode of pickle protocol 4+) and how to re-save it."""
    import argparse

    cfg = ModelConfig(backbone="resnet18", base_width=8, head_channels=16, n_class=16)
    ref = {"ResNet101": {"model_state": build_model(cfg).state_dict(), "prototypes_ema": torch.zeros(16, 16)},
           "iter": 7, "opt": argparse.Namespace(lr=1e-4)}
    resave = r"; to re-save it, load it only if you trust it, with torch\.load\(path, map_location='cpu', " \
             r"weights_only=False\) \(pickle\.load for a file written with pickle\.dump\), keep only tensors"

    raw = tmp_path / "raw.pkl"    # pickle.dump, protocol 4: torch's own reason is "Unsupported operand 149"
    with open(raw, "wb") as fh:
        pickle.dump(ref, fh, protocol=4)
    with pytest.raises(CheckpointError, match=r"^" + str(raw).replace(".", r"\.") + r": refused: a legacy \(non-zip\) "
                       r"pickle with something other than tensors, containers and numpy scalars in it \(global "
                       r"argparse\.Namespace is not allowed, global torch\.storage\._load_from_bytes is not allowed: "
                       r"tensors written with pickle\.dump, not torch\.save\)" + resave) as err:
        import_checkpoint.run(ImportCheckpointConfig(source=raw), tmp_path / "out")
    assert "\n" not in str(err.value) and "torch.save(obj, new_path)" in str(err.value)

    legacy = tmp_path / "legacy.pkl"  # torch's legacy format, protocol 2: torch names the Namespace already
    torch.save(ref, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match=r"legacy\.pkl: refused: a legacy \(non-zip\) pickle with something "
                       r"other than tensors, containers and numpy scalars in it \(global argparse\.Namespace is not "
                       r"allowed\)" + resave):
        import_checkpoint.run(ImportCheckpointConfig(source=legacy), tmp_path / "out")

    clean = {k: v for k, v in ref.items() if k != "opt"}   # tensors only, but protocol 4: the protocol is the problem
    p4 = tmp_path / "p4.pkl"
    torch.save(clean, p4, _use_new_zipfile_serialization=False, pickle_protocol=4)
    with pytest.raises(CheckpointError, match=r"p4\.pkl: refused: a legacy \(non-zip\) pickle written with pickle "
                       r"protocol 4, which torch's restricted loader cannot read \(Unsupported operand 149\)" + resave):
        import_checkpoint.run(ImportCheckpointConfig(source=p4), tmp_path / "out")
    assert not (tmp_path / "out" / "checkpoint.pt").exists()

    fixed = tmp_path / "fixed.pkl"  # what the message says to do
    obj = torch.load(legacy, map_location="cpu", weights_only=False)
    obj["opt"] = vars(obj["opt"])
    torch.save(obj, fixed)
    state = load_checkpoint(import_checkpoint.run(ImportCheckpointConfig(source=fixed), tmp_path / "ok"))
    assert state["iteration"] == 7


class _Payload:
    def __init__(self, sentinel: str) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


@pytest.mark.parametrize("fmt", ["raw-pickle", "torch-legacy", "torch-zip"])
def test_malicious_pickle_rejected_and_not_run(tmp_path, fmt):
    sentinel = tmp_path / "pwned"
    evil = {"ResNet101": {"prototypes_ema": _Payload(str(sentinel)), "model_state": {"w": torch.zeros(1)}},
            "iter": 1, "best_iou": np.float64(1.0)}
    src = tmp_path / "evil.pkl"
    if fmt == "raw-pickle":
        with open(src, "wb") as fh:
            pickle.dump(evil, fh, protocol=2)
    else:
        torch.save(evil, src, _use_new_zipfile_serialization=(fmt == "torch-zip"))
    with pytest.raises(CheckpointError, match=r"evil\.pkl: refused: .*posix\.system is not allowed"):
        import_checkpoint.run(ImportCheckpointConfig(source=src), tmp_path / "out")
    with pytest.raises(CheckpointError, match=r"evil\.pkl: refused"):
        load_checkpoint(src)
    assert not sentinel.exists()
    assert not (tmp_path / "out" / "checkpoint.pt").exists()


def test_import_rejects_non_reference_files(tmp_path):
    src = tmp_path / "plain.pt"
    torch.save({"conv1.weight": torch.zeros(1)}, src)
    with pytest.raises(CheckpointError, match="no 'ResNet101' entry"):
        import_checkpoint.run(ImportCheckpointConfig(source=src), tmp_path / "out")
    with pytest.raises(CheckpointError, match="file not found"):
        import_checkpoint.run(ImportCheckpointConfig(source=tmp_path / "nope.pkl"), tmp_path / "out")
