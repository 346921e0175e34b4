"""DeepLab-v2 layout, shapes, init, BN helpers, discriminator and init-weight loading."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torch import nn

from cpsl.config import ModelConfig, load
from cpsl.errors import CheckpointError, ConfigError
from cpsl.models import DeepLabV2, build_discriminator, build_model, convert_sync_bn, freeze_bn
from cpsl.models.deeplabv2 import gn_groups, output_size
from cpsl.models.checkpoint import make_checkpoint, save_checkpoint
from cpsl.models.weights import load_init_weights

TINY = dict(backbone="resnet18", base_width=8, head_channels=16)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny CPU workloads: one intra-op thread avoids OpenMP oversubscription on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(**kw) -> DeepLabV2:
    return build_model(ModelConfig(**{**TINY, **kw}))


@pytest.fixture(scope="module")
def r101() -> DeepLabV2:
    torch.manual_seed(0)
    return build_model(ModelConfig()).eval()


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_resnet101_parameter_count_and_keys(r101):
    assert n_params(r101) == 65_063_568
    keys = list(r101.state_dict())
    assert len(keys) == 653
    assert sum(p.numel() for p in r101.backbone_parameters()) == 42_500_160
    assert sum(p.numel() for p in r101.layer5.parameters()) == 22_563_408
    for k in ("conv1.weight", "bn1.running_var", "bn1.num_batches_tracked", "layer1.0.conv1.weight",
              "layer3.22.bn3.bias", "layer4.0.downsample.0.weight", "layer4.0.downsample.1.running_mean",
              "layer1.0.downsample.1.weight", "layer5.conv2d_list.0.0.bias", "layer5.conv2d_list.4.1.weight",
              "layer5.bottleneck.0.se.0.weight", "layer5.bottleneck.0.se.2.bias", "layer5.bottleneck.1.weight",
              "layer5.bottleneck.1.bias", "layer5.bottleneck.2.weight", "layer5.head.1.weight"):
        assert k in keys, k
    assert "layer5.head.1.bias" not in keys
    # Caffe style: the stride is on the 1x1 conv1, dilations 2 / 4 in layers 3 / 4, ceil-mode pool
    assert r101.layer2[0].conv1.stride == (2, 2) and r101.layer2[0].conv2.stride == (1, 1)
    assert r101.layer3[5].conv2.dilation == (2, 2) and r101.layer4[0].conv2.padding == (4, 4)
    assert r101.maxpool.ceil_mode
    assert [m.dilation for m in r101.layer5.conv2d_list[1:].modules() if isinstance(m, nn.Conv2d)] == \
        [(6, 6), (12, 12), (18, 18), (24, 24)]
    se = r101.layer5.bottleneck[0].se
    assert [type(m) for m in se] == [nn.Linear, nn.ReLU, nn.Linear, nn.Sigmoid] and se[0].out_features == 80


def test_resnet101_bn_pretrain_counts():
    model = DeepLabV2("resnet101", bn_pretrain=True)
    assert n_params(model) == 65_067_664
    assert len(model.state_dict()) == 658
    assert "bn_pretrain.running_mean" in model.state_dict()
    assert any(p is model.bn_pretrain.weight for p in model.head_parameters())


def test_resnet101_forward_small(r101):
    with torch.no_grad():
        out = r101(torch.randn(1, 3, 65, 113))
    assert out["out"].shape == (1, 19, 9, 15)
    assert out["feat"].shape == (1, 256, 9, 15)


def test_stride8_with_ceil_mode_cell():
    model = tiny().eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 512, 896))
    assert out["out"].shape == (1, 19, 65, 113)
    assert out["feat"].shape == (1, 16, 65, 113)
    assert (output_size(512), output_size(896), output_size(1024), output_size(2048)) == (65, 113, 129, 257)


@pytest.mark.parametrize("size", [33, 65, 97])
def test_output_size_helper_matches_network(size):
    model = tiny(backbone="resnet50").eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, size, size + 8))
    assert tuple(out["out"].shape[-2:]) == (output_size(size), output_size(size + 8))


def test_small_backbones_layout():
    r18 = build_model(ModelConfig(backbone="resnet18", head_channels=32))
    assert r18.layer5.conv2d_list[0][0].in_channels == 512
    assert "layer1.0.downsample.0.weight" not in r18.state_dict()  # torchvision resnet18 naming kept
    r50 = DeepLabV2("resnet50", base_width=8, head_channels=24)
    assert r50.layer5.conv2d_list[0][0].in_channels == 256 and len(r50.layer3) == 6
    assert r50.layer5.conv2d_list[0][1].num_groups == gn_groups(24) == 24
    assert gn_groups(256) == 32 and gn_groups(48) == 24 and gn_groups(40) == 20


def test_reference_effective_init(r101):
    for name, m in r101.named_modules():
        if isinstance(m, nn.Conv2d) and m.weight.numel() > 10_000:
            assert abs(m.weight.std().item() - 0.01) < 1e-3, name
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0), name
    assert torch.all(r101.layer5.bottleneck[1].bias == 0)
    assert abs(r101.layer5.head[1].weight.std().item() - 0.01) < 2e-3


def test_feat_is_after_dropout_and_train_mode_stochastic():
    model = tiny().train()
    torch.manual_seed(1)
    x = torch.randn(2, 3, 64, 64)
    out = model(x)
    feat = out["feat"]
    zero_channels = (feat.abs().sum(dim=(2, 3)) == 0).sum()
    assert zero_channels > 0  # Dropout2d(0.1) zeroes whole channels of the features
    logits = torch.einsum("bchw,kc->bkhw", feat, model.layer5.head[1].weight[:, :, 0, 0])
    assert torch.allclose(logits, out["out"], atol=1e-5)


def test_param_groups_partition_parameters():
    model = tiny(bn_pretrain=True)
    bb, head = model.backbone_parameters(), model.head_parameters()
    ids = [id(p) for p in bb + head]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))


def test_freeze_bn_and_sync_bn():
    model = freeze_bn(tiny().train())
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(not m.training and not m.weight.requires_grad and not m.bias.requires_grad for m in bns)
    before = model.bn1.running_mean.clone()
    model(torch.randn(2, 3, 32, 32))
    assert torch.equal(before, model.bn1.running_mean)
    assert model.conv1.weight.requires_grad
    synced = convert_sync_bn(tiny())
    assert not any(type(m) is nn.BatchNorm2d for m in synced.modules())
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in synced.modules()) == len(bns)


def test_discriminator_shape_and_names():
    d = build_discriminator(19, width=8)
    assert d(torch.randn(1, 19, 512, 896)).shape == (1, 1, 32, 56)
    assert list(d.state_dict()) == [f"{n}.{p}" for n in ("conv1", "conv2", "conv3", "conv4", "classifier")
                                    for p in ("weight", "bias")]
    full = build_discriminator(19)
    assert [full.conv1.out_channels, full.conv2.out_channels, full.conv3.out_channels,
            full.conv4.out_channels] == [64, 128, 256, 512]
    assert full.leaky_relu.negative_slope == 0.2


def test_model_config_loading():
    cfg = load(ModelConfig, {"backbone": "resnet18", "base_width": 16, "head_channels": 32, "init": None}, "model")
    assert cfg.n_class == 19 and cfg.init is None
    with pytest.raises(ConfigError, match=r"model\.backbone"):
        load(ModelConfig, {"backbone": "resnet34"}, "model")
    with pytest.raises(ConfigError, match=r"model\.head_chanels: unknown setting \(did you mean 'head_channels'"):
        load(ModelConfig, {"head_chanels": 3}, "model")
    with pytest.raises(ConfigError, match=r"model\.n_class"):
        load(ModelConfig, {"n_class": 0}, "model")


# ---------------------------------------------------------------------------------------------------------
# initial weights


def _fake_torchvision_file(model: DeepLabV2, path: Path, wrap: bool = False) -> dict[str, torch.Tensor]:
    """A torchvision-style file: backbone tensors (no num_batches_tracked, like the 2017 files) + fc.*."""
    state = {k: torch.randn_like(v.float()).to(v.dtype) for k, v in model.state_dict().items()
             if not k.startswith("layer5") and not k.endswith("num_batches_tracked")}
    state["fc.weight"] = torch.randn(1000, model.out_channels)
    state["fc.bias"] = torch.randn(1000)
    torch.save({"state_dict": state} if wrap else state, path)
    return state


def test_init_from_torchvision_reports_counts(tmp_path, caplog):
    model = tiny()
    path = tmp_path / "resnet-fake.pth"
    state = _fake_torchvision_file(model, path)
    n_layer5 = sum(k.startswith("layer5") for k in model.state_dict())
    with caplog.at_level(logging.INFO, logger="cpsl.models.weights"):
        report = load_init_weights(model, path, "torchvision")
    assert report["loaded"] == len(state) - 2
    assert sorted(report["unexpected"]) == ["fc.bias", "fc.weight"]
    assert len(report["missing"]) == n_layer5 and all(k.startswith("layer5.") for k in report["missing"])
    assert torch.equal(model.layer4[1].conv2.weight, state["layer4.1.conv2.weight"])
    assert f"loaded {len(state) - 2} tensors" in caplog.text and "fc.*: 2" in caplog.text


def test_init_from_real_torchvision_layout(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    path = tmp_path / "resnet18.pth"
    tv_state = torchvision.models.resnet18().state_dict()  # random weights, no download
    torch.save(tv_state, path)
    model = build_model(ModelConfig(backbone="resnet18", head_channels=32, init=path))
    rep = model.init_report
    assert rep["unexpected"] == ["fc.weight", "fc.bias"]
    assert rep["missing"] and all(k.startswith("layer5.") for k in rep["missing"])
    assert rep["loaded"] == len(tv_state) - 2
    assert torch.equal(model.layer3[0].downsample[0].weight, tv_state["layer3.0.downsample.0.weight"])


def test_init_simclr_format(tmp_path):
    model = tiny()
    path = tmp_path / "r101_1x_sk0.pth"
    state = _fake_torchvision_file(model, path, wrap=True)
    report = build_model(ModelConfig(**TINY, init=path, init_format="simclr")).init_report
    assert report["loaded"] == len(state) - 2
    plain = tmp_path / "plain.pth"
    _fake_torchvision_file(model, plain)
    with pytest.raises(CheckpointError, match="no 'state_dict'"):
        load_init_weights(tiny(), plain, "simclr")


def test_a_stage_from_init_checkpoint_does_not_read_model_init(tmp_path):
    """#21: stages 1 and 3 of the presets (init_checkpoint: the warm-up, stage 2) also inherit the experiment's
    model.init (the ImageNet file); it was read, logged as loaded and then overwritten by the checkpoint. Now it
    is not read at all (here: an unreadable file that would stop the stage)."""
    import json

    from tests.reliability_helpers import run_cli
    from tests.train_helpers import TINY_MODEL, train_dict, write_config

    first = tmp_path / "first"
    rc, err = run_cli("train", write_config(tmp_path / "a.yaml", train_dict(tmp_path, max_iters=1)), first)
    assert rc == 0, err[-2000:]
    bad = tmp_path / "resnet18-00000000.pth"
    bad.write_bytes(b"not a torch file")
    model = {**TINY_MODEL, "init": str(bad)}
    cfg = train_dict(tmp_path, "source_only", max_iters=1, model=model, init_checkpoint=str(first / "checkpoint.pt"))
    rc, err = run_cli("train", write_config(tmp_path / "b.yaml", cfg), tmp_path / "second")
    assert rc == 0, err[-2000:]
    assert str(bad) not in err
    summary = json.loads((tmp_path / "second" / "train_summary.json").read_text())
    assert summary["student_init"] == f"checkpoint:{first / 'checkpoint.pt'}" and "student_init_report" not in summary


@pytest.mark.parametrize("amp, ran", [("bf16", "bf16"), ("fp16", "off")])
def test_training_logs_and_records_what_the_init_file_gave(tmp_path, amp, ran):
    """#21: the load report ("loaded N tensors ...") reached no log, as the CLI set up no log handler (Python
    drops INFO records then), so a preset run did not show whether its ImageNet / SimCLR file was used; and the
    summary did not say in which precision the stage ran. Both are in the train log and train_summary.json."""
    import json

    from tests.reliability_helpers import run_cli
    from tests.train_helpers import TINY_MODEL, train_dict, write_config

    path = tmp_path / "r101_1x_sk0.pth"
    state = _fake_torchvision_file(build_model(ModelConfig(**TINY_MODEL)), path, wrap=True)
    model = {**TINY_MODEL, "init": str(path), "init_format": "simclr", "bn_pretrain": True}
    cfg = train_dict(tmp_path, "source_only", max_iters=1, amp=amp, model=model)
    out = tmp_path / "run"
    rc, err = run_cli("train", write_config(tmp_path / "train.yaml", cfg), out)
    assert rc == 0, err[-2000:]
    n_head = sum(k.startswith("layer5.") for k in build_model(ModelConfig(**TINY_MODEL)).state_dict())
    assert (f"cpsl train: {path}: loaded {len(state) - 2} tensors; {n_head + 4} model keys not in file "
            f"(bn_pretrain.*: 4, layer5.*: {n_head}); 2 file keys unused (fc.*: 2)\n") in err
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["student_init"] == f"simclr:{path}" and summary["amp"] == ran
    assert summary["student_init_report"] == {"loaded": len(state) - 2,
                                              "missing": {"layer5": n_head, "bn_pretrain": 4}, "unexpected": {"fc": 2}}


def test_init_from_our_checkpoint_takes_everything_but_the_head(tmp_path):
    torch.manual_seed(0)
    src = tiny()
    path = save_checkpoint(tmp_path / "source_only.pt", make_checkpoint(src, ModelConfig(**TINY), iteration=5))
    model = build_model(ModelConfig(**TINY, init=path, init_format="checkpoint"))
    report, head = model.init_report, [k for k in src.state_dict() if k.startswith("layer5.")]
    assert report["unexpected"] == [] and sorted(report["missing"]) == sorted(head)
    for name, value in model.state_dict().items():
        assert name.startswith("layer5.") or torch.equal(value, src.state_dict()[name]), name
    assert not torch.equal(model.layer5.head[1].weight, src.layer5.head[1].weight)   # a new head
    plain = tmp_path / "plain.pth"
    torch.save(src.state_dict(), plain)
    with pytest.raises(CheckpointError, match=r"plain\.pth: not a cpsl checkpoint"):
        build_model(ModelConfig(**TINY, init=plain, init_format="checkpoint"))


def test_init_shape_mismatch_names_key_and_loads_nothing(tmp_path):
    model = tiny()
    path = tmp_path / "bad.pth"
    state = _fake_torchvision_file(model, path)
    state["layer2.0.conv1.weight"] = torch.randn(3, 3, 1, 1)
    torch.save(state, path)
    before = model.conv1.weight.clone()
    with pytest.raises(CheckpointError, match=r"bad\.pth: shape mismatch for layer2\.0\.conv1\.weight: "
                                              r"file has \(3, 3, 1, 1\), model has \(16, 8, 3, 3\)"):
        load_init_weights(model, path)
    assert torch.equal(before, model.conv1.weight)


def test_init_missing_file_names_config_key(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(ConfigError, match=rf"^model\.init: file not found: {missing}$"):
        build_model(ModelConfig(**TINY, init=missing))


def test_init_unusable_files(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="junk.pth: cannot read init weights"):
        load_init_weights(tiny(), junk)
    other = tmp_path / "other.pth"
    torch.save({"encoder.w": torch.zeros(2)}, other)
    with pytest.raises(CheckpointError, match="no tensor in the file matches"):
        load_init_weights(tiny(), other)
