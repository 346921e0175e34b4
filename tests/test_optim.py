"""Parameter groups and the poly schedule against hand-computed values."""

import pytest
import torch
from torch import nn

from cpsl.train.optim import PolyFactor, build_sgd, poly_scheduler


class TinyDeepLab(nn.Module):
    """Stand-in with the reference's top-level names: backbone conv1/bn1/layer1, head layer5, bn_pretrain."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3)
        self.bn1 = nn.BatchNorm2d(4)
        self.layer1 = nn.Sequential(nn.Conv2d(4, 4, 1))
        self.bn_pretrain = nn.BatchNorm2d(4)
        self.layer5 = nn.Sequential(nn.Conv2d(4, 2, 1))


def test_groups_and_multipliers():
    model = TinyDeepLab()
    protos = nn.Parameter(torch.zeros(2, 4))
    opt = build_sgd(model, 1e-4, head_lr_mult=5.0, backbone_lr_mult=3.0, extra_groups=[("prototypes", [protos], 5.0)])
    groups = {g["name"]: g for g in opt.param_groups}
    assert [g["name"] for g in opt.param_groups] == ["backbone", "head", "prototypes"]
    assert groups["backbone"]["lr"] == pytest.approx(3e-4)
    assert groups["head"]["lr"] == pytest.approx(5e-4)
    assert groups["prototypes"]["lr"] == pytest.approx(5e-4)
    n = lambda m: sum(p.numel() for p in m.parameters())
    assert sum(p.numel() for p in groups["backbone"]["params"]) == n(model.conv1) + n(model.bn1) + n(model.layer1)
    assert sum(p.numel() for p in groups["head"]["params"]) == n(model.layer5) + n(model.bn_pretrain)
    # every parameter exactly once (the reference lists backbone parameters ~3 times)
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters())) + 1
    for g in opt.param_groups:
        assert g["momentum"] == 0.9 and g["weight_decay"] == 2e-4


def test_frozen_parameters_are_left_out():
    model = TinyDeepLab()
    model.bn1.weight.requires_grad_(False)
    opt = build_sgd(model, 1e-3)
    assert all(p is not model.bn1.weight for g in opt.param_groups for p in g["params"])


def test_poly_values_at_given_iterations():
    f = PolyFactor(100, 0.9)
    assert f(0) == 1.0
    assert f(50) == pytest.approx(0.5**0.9)
    assert f(99) == pytest.approx(0.01**0.9)
    assert f(100) == 0.0 and f(250) == 0.0          # clamped: no crash, no complex number past max_iters
    with pytest.raises(ValueError):
        PolyFactor(0)


def test_scheduler_drives_group_learning_rates():
    model = TinyDeepLab()
    opt = build_sgd(model, 2.5e-4, head_lr_mult=10.0)
    sched = poly_scheduler(opt, max_iters=1000)
    lrs = []
    for _ in range(1001):
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    # iteration k (0-based) uses factor (1 - k/1000)^0.9, as the reference's t = k
    assert lrs[0] == pytest.approx([2.5e-4, 2.5e-3])
    assert lrs[500] == pytest.approx([2.5e-4 * 0.5**0.9, 2.5e-3 * 0.5**0.9])
    assert lrs[1000] == [0.0, 0.0]
    # the state round-trips (resume): a fresh scheduler continues at the same factor
    opt2 = build_sgd(TinyDeepLab(), 2.5e-4, head_lr_mult=10.0)
    sched2 = poly_scheduler(opt2, max_iters=1000)
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(sched.state_dict())
    assert sched2.last_epoch == 1001 and opt2.param_groups[0]["lr"] == 0.0
