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


def test_adamw_groups_keep_norms_out_of_weight_decay():
    from cpsl.config import OptimConfig, load
    from cpsl.train.optim import build_optimizer

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
            self.layer5 = nn.Sequential(nn.Conv2d(4, 4, 1), nn.GroupNorm(2, 4), nn.Conv2d(4, 2, 1, bias=False))

    model = Net()
    o = load(OptimConfig, {"name": "adamw", "lr": 6e-5, "weight_decay": 0.01, "norm_decay_mult": 0.0,
                           "betas": [0.9, 0.99]})
    opt = build_optimizer(model, o, extra_groups=[("prototypes", [nn.Parameter(torch.zeros(2))], 5.0)])
    assert isinstance(opt, torch.optim.AdamW)
    groups = {g["name"]: g for g in opt.param_groups}
    assert list(groups) == ["backbone", "backbone_norm", "head", "head_norm", "prototypes"]
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert ids(groups["backbone"]["params"]) == ids(model.backbone[0].parameters())
    assert ids(groups["backbone_norm"]["params"]) == ids(model.backbone[1].parameters())
    assert ids(groups["head_norm"]["params"]) == ids(model.layer5[1].parameters())
    assert ids(groups["head"]["params"]) == ids(model.layer5[0].parameters()) | ids(model.layer5[2].parameters())
    assert [groups[k]["lr"] for k in groups] == pytest.approx([6e-5, 6e-5, 6e-4, 6e-4, 3e-4])
    assert [groups[k]["weight_decay"] for k in groups] == [0.01, 0.0, 0.01, 0.0, 0.01]
    assert groups["head"]["betas"] == (0.9, 0.99)
    # norm_decay_mult 1 (the default) keeps the two groups of the SGD recipe
    plain = build_optimizer(model, load(OptimConfig, {"lr": 1e-3}))
    assert isinstance(plain, torch.optim.SGD) and [g["name"] for g in plain.param_groups] == ["backbone", "head"]


def test_linear_warmup_then_poly_by_hand():
    from cpsl.config import OptimConfig, load
    from cpsl.train.optim import build_scheduler

    f = PolyFactor(10, power=1.0, warmup_iters=4, warmup_ratio=0.1)
    # t < 4: (1 - t/10) * (1 - (1 - t/4) * 0.9); from t = 4 on: 1 - t/10
    assert [f(t) for t in (0, 2, 4, 5, 10, 12)] == pytest.approx([0.1, 0.8 * 0.55, 0.6, 0.5, 0.0, 0.0])
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([{"name": "g", "params": [p]}], lr=1.0)
    sched = build_scheduler(opt, 10, load(OptimConfig, {"poly_power": 1.0, "warmup_iters": 4, "warmup_ratio": 0.1}))
    lrs = []
    for _ in range(5):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.1, 0.9 * 0.325, 0.8 * 0.55, 0.7 * 0.775, 0.6])
