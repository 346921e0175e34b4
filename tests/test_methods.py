"""The methods and their losses: source_only / oracle domains, the warm-up GAN steps, the CE normalisation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cpsl.data.prepared import PreparedSplit
from cpsl.inference import image_to_tensor, normalize_image
from cpsl.methods import Amp, Oracle, SourceOnly, TrainContext, Warmup, build_method
from cpsl.methods.losses import gan_loss, seg_cross_entropy, upsample
from cpsl.train.data import build_datasets, build_loaders
from cpsl.train.dist import DistInfo
from cpsl.train.loop import to_device
from tests.train_helpers import one_thread, pair_dir, train_config  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")


def _ctx() -> TrainContext:
    return TrainContext(CPU, DistInfo(0, 1, 0, CPU), Amp("off", CPU))


def _batch(cfg, method):
    datasets = build_datasets(cfg, method.domains, cfg.model.n_class)
    loaders = build_loaders(cfg, datasets, rank=0, world_size=1, start_iter=0)
    return {d: to_device(next(iter(loader)), CPU) for d, loader in loaders.items()}


def test_seg_cross_entropy_ignores_255_and_never_nans():
    logits = torch.randn(2, 4, 5, 6)
    target = torch.randint(0, 4, (2, 5, 6))
    target[0, :2] = 255
    ref = F.cross_entropy(logits, target, ignore_index=255)
    assert torch.allclose(seg_cross_entropy(logits, target), ref)
    assert seg_cross_entropy(logits, torch.full_like(target, 255)).item() == 0.0
    up = upsample(torch.randn(1, 4, 5, 9), (32, 64))
    assert up.shape == (1, 4, 32, 64)


def test_gan_losses():
    d = torch.tensor([[0.0, 1.0]])
    assert gan_loss(d, 0.0, "LS").item() == pytest.approx(0.5)
    assert gan_loss(d, 1.0, "vanilla").item() == pytest.approx(
        F.binary_cross_entropy_with_logits(d, torch.ones_like(d)).item())
    with pytest.raises(ValueError):
        gan_loss(d, 0.0, "wgan")


def test_source_only_and_oracle_domains(pair_dir):  # noqa: F811
    m = build_method(train_config(pair_dir, "source_only"), _ctx())
    assert isinstance(m, SourceOnly) and m.domains == {"source": {"label": True}}
    o = build_method(train_config(pair_dir, "oracle", **{"data.source": None}), _ctx())
    assert isinstance(o, Oracle) and o.domains == {"target": {"label": True}}
    cfg = train_config(pair_dir, "oracle", **{"data.source": None})
    batch = _batch(cfg, o)
    before = [p.detach().clone() for p in o.student.parameters()]
    losses = o.step(batch)
    assert set(losses) == {"ce_target"} and np.isfinite(losses["ce_target"])
    assert any(not torch.equal(a, p) for a, p in zip(before, o.student.parameters()))


@pytest.mark.parametrize("gan", ["LS", "vanilla"])
def test_warmup_gradients_go_where_they_should(pair_dir, gan):  # noqa: F811
    cfg = train_config(pair_dir, "warmup", freeze_bn=True, **{"warmup.gan": gan})
    m = build_method(cfg, _ctx())
    assert isinstance(m, Warmup) and set(m.domains) == {"source", "target"}
    assert m.domains["target"] == {"label": False}
    batch = _batch(cfg, m)
    m.train_mode()
    # G step: the adversarial term alone has gradient into the generator and none into the discriminator.
    losses, ps, pt = m.generator_losses(batch)
    losses["adv"].backward()
    assert all(p.grad is None for p in m.disc.parameters())
    head_grads = [p.grad for p in m.student.layer5.parameters() if p.grad is not None]
    assert head_grads and any(g.abs().sum() > 0 for g in head_grads)
    # BatchNorm is frozen: no gradient, running statistics untouched.
    bn = m.student.bn1
    assert not bn.training and bn.weight.grad is None
    # D step: finite loss, gradient into D only (the outputs are detached).
    m.student.zero_grad(set_to_none=True)
    d_loss = m.discriminator_loss(ps, pt)
    assert torch.isfinite(d_loss)
    d_loss.backward()
    assert all(p.grad is not None for p in m.disc.parameters())
    assert all(p.grad is None for p in m.student.parameters())
    # A whole step moves both networks and reports the three losses.
    m.train_mode()
    d_before = [p.detach().clone() for p in m.disc.parameters()]
    out = m.step(batch)
    assert set(out) == {"ce_source", "adv", "disc"} and all(np.isfinite(v) for v in out.values())
    assert any(not torch.equal(a, p) for a, p in zip(d_before, m.disc.parameters()))
    assert all(p.requires_grad for p in m.disc.parameters())


def test_warmup_state_round_trip(pair_dir):  # noqa: F811
    cfg = train_config(pair_dir, "warmup")
    a = build_method(cfg, _ctx())
    a.train_mode()
    a.step(_batch(cfg, a))
    for s in a.schedulers.values():
        s.step()
    state = a.state_dict()
    assert {"model", "discriminator", "optimizer", "disc_optimizer", "scheduler"} <= set(state)
    b = build_method(cfg, _ctx())
    b.load_state_dict(state)
    assert b.lrs() == a.lrs()
    for x, y in zip(a.disc.parameters(), b.disc.parameters()):
        assert torch.equal(x, y)
    assert b.disc_optimizer.state_dict()["state"].keys() == a.disc_optimizer.state_dict()["state"].keys()


def test_lab_transfer_and_extra_views(pair_dir):  # noqa: F811
    cfg = train_config(pair_dir, "source_only", **{"data.lab_transfer": True})
    plain = train_config(pair_dir, "source_only")
    spec = {"source": {"label": True, "views": ("weak", "strong", "full")}}
    a = build_datasets(cfg, spec, 4)["source"][(0, 123)]
    b = build_datasets(plain, spec, 4)["source"][(0, 123)]
    assert torch.equal(a["label"], b["label"])  # same geometry (same sample seed) ...
    assert not torch.equal(a["image"], b["image"])  # ... other colours
    h, w = PreparedSplit(cfg.data.source).load(0)[0].shape[:2]
    assert a["image_full"].shape == (3, h, w) and a["image_strong"].shape == a["image"].shape
    # the full image travels as uint8 (a quarter of the bytes) and is normalised on the device, exactly as before
    assert b["image_full"].dtype == torch.uint8
    assert torch.equal(normalize_image(b["image_full"]), image_to_tensor(PreparedSplit(cfg.data.source).load(0)[0]))


def test_random_colors_only_on_labelled_domains(pair_dir):  # noqa: F811
    cfg = train_config(pair_dir, "warmup", **{"data.random_colors": True})
    plain = train_config(pair_dir, "warmup")
    spec = {"source": {"label": True}, "target": {"label": False}}
    a, b = build_datasets(cfg, spec, 4), build_datasets(plain, spec, 4)
    assert a["source"].random_colors and not a["target"].random_colors and not b["source"].random_colors
    sa, sb = a["source"][(1, 5)], b["source"][(1, 5)]
    assert torch.equal(sa["label"], sb["label"])  # same crop and flip ...
    assert not torch.equal(sa["image"], sb["image"])  # ... redrawn colours
    assert torch.equal(a["target"][(1, 5)]["image"], b["target"][(1, 5)]["image"])  # unlabelled: untouched
