"""MiT (SegFormer) backbones: parameter counts, the stride-4 head, NVlabs weight loading, and every stage of the
CPSL chain on a tiny MiT on the CPU."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cpsl.config import (ClassDistConfig, ModelConfig, PrototypesConfig, PseudoHardConfig, PseudoSoftConfig,
                         TrainConfig, load)
from cpsl.data.pseudo import load_soft, soft_path
from cpsl.errors import CheckpointError, ConfigError
from cpsl.methods import Amp, TrainContext, build_method
from cpsl.models import build_model, model_output_size, model_stride
from cpsl.models.checkpoint import make_checkpoint, save_checkpoint
from cpsl.models.mit import MIT_ARCHS, SegFormer, convert_nvlabs, encoder_parameter_count, nvlabs_key
from cpsl.steps import class_dist, prototypes, pseudo_hard, pseudo_soft
from cpsl.train.data import build_datasets, build_loaders
from cpsl.train.dist import DistInfo
from cpsl.train.loop import to_device
from tests.train_helpers import N_CLASS, one_thread, pair_dir, prepared_pair, train_dict  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")
TINY_MIT = {"backbone": "mit_b0", "mit_depths": [1, 1, 1, 1], "mit_widths": [8, 16, 40, 64],
            "decoder_channels": 16, "head_channels": 16, "n_class": N_CLASS}


def _ctx() -> TrainContext:
    return TrainContext(CPU, DistInfo(0, 1, 0, CPU), Amp("off", CPU))


def _model_cfg(**over) -> ModelConfig:
    return load(ModelConfig, {**TINY_MIT, **over})


# ---------------------------------------------------------------------------------------------------------
# The network


def test_encoder_parameter_counts_match_the_published_ones():
    # SegFormer (Xie et al. 2021), Table 1, encoder parameters in millions (rounded to 0.1 M); B0 about 3.3-3.4 M
    published = {"mit_b0": 3.3, "mit_b1": 13.1, "mit_b2": 24.2, "mit_b3": 44.0, "mit_b4": 60.8, "mit_b5": 81.4}
    counts = {b: encoder_parameter_count(b) for b in MIT_ARCHS}
    for b, m in published.items():
        assert abs(counts[b] / 1e6 - m) <= 0.1, (b, counts[b])
    # exact: the NVlabs mix_transformer.py layers, counted on the meta device
    assert counts["mit_b0"] == 3_319_392 and counts["mit_b5"] == 81_443_008


def test_forward_gives_logits_and_features_at_stride_4():
    torch.manual_seed(0)
    cfg = _model_cfg()
    model = build_model(cfg).eval()
    assert isinstance(model, SegFormer) and model.feat_channels == 16
    assert model_stride(cfg) == 4 and model_stride(load(ModelConfig, {})) == 8
    for h, w in ((37, 61), (32, 64), (7, 9)):   # 7x9: smaller than the spatial-reduction windows
        out = model(torch.randn(2, 3, h, w))
        grid = (model_output_size(cfg, h), model_output_size(cfg, w))
        assert grid == (-(-h // 4), -(-w // 4))
        assert out["out"].shape == (2, N_CLASS, *grid) and out["feat"].shape == (2, 16, *grid)
        assert torch.isfinite(out["out"]).all()
    assert (model_output_size(cfg, 512), model_output_size(cfg, 1024)) == (128, 256)
    # the groups the methods use: encoder 1x, head (layer5) 10x, each parameter once
    ids = {id(p) for p in model.backbone_parameters()} | {id(p) for p in model.head_parameters()}
    assert len(ids) == len(list(model.parameters()))


def test_mit_settings_are_checked():
    with pytest.raises(ConfigError, match=r"model.mit_widths: must be 4 integers divisible by the heads"):
        load(TrainConfig, {"stage": "source_only", "max_iters": 1, "data": {"source": "/x"},
                           "model": {**TINY_MIT, "mit_widths": [8, 16, 32, 64]}})
    with pytest.raises(ConfigError, match=r"^bn_pretrain: not supported with mit_b0"):
        _model_cfg(bn_pretrain=True)
    with pytest.raises(ConfigError, match=r"^init: .imagenet. means torchvision's ResNet weights"):
        _model_cfg(init="imagenet", init_format="nvlabs_mit")
    with pytest.raises(ConfigError, match=r"^init_format: .nvlabs_mit. needs an MiT backbone"):
        load(ModelConfig, {"backbone": "resnet18", "init_format": "nvlabs_mit"})


# ---------------------------------------------------------------------------------------------------------
# NVlabs weights


def _nvlabs_name(ours: str) -> str:
    """The NVlabs name of one of our encoder keys, written independently of cpsl.models.mit's rules."""
    parts = ours.split(".")
    assert parts[0] == "backbone" and parts[1] == "stages"
    s = int(parts[2]) + 1
    if parts[3] == "embed":
        return f"patch_embed{s}.{parts[4]}.{parts[5]}"
    if parts[3] == "norm":
        return f"norm{s}.{parts[4]}"
    rest = ".".join(parts[5:])
    rest = rest.replace("mlp.dwconv.", "mlp.dwconv.dwconv.")
    return f"block{s}.{parts[4]}.{rest}"


def _nvlabs_file(path, model, extra=None, drop=()):
    state = {_nvlabs_name(k): v.clone() for k, v in model.state_dict().items() if k.startswith("backbone.")}
    state["head.weight"] = torch.zeros(1000, 64)   # the ImageNet classifier of the original files
    state["head.bias"] = torch.zeros(1000)
    state.update(extra or {})
    for k in drop:
        del state[k]
    torch.save(state, path)
    return path


def test_nvlabs_key_mapping_by_hand():
    assert nvlabs_key("patch_embed1.proj.weight") == "backbone.stages.0.embed.proj.weight"
    assert nvlabs_key("patch_embed4.norm.bias") == "backbone.stages.3.embed.norm.bias"
    assert nvlabs_key("block3.12.attn.kv.weight") == "backbone.stages.2.blocks.12.attn.kv.weight"
    assert nvlabs_key("block1.0.attn.sr.bias") == "backbone.stages.0.blocks.0.attn.sr.bias"
    assert nvlabs_key("block2.1.mlp.dwconv.dwconv.weight") == "backbone.stages.1.blocks.1.mlp.dwconv.weight"
    assert nvlabs_key("norm4.weight") == "backbone.stages.3.norm.weight"
    assert nvlabs_key("head.weight") is None
    with pytest.raises(ValueError, match="pos_embed1"):
        convert_nvlabs({"norm1.weight": torch.ones(1), "pos_embed1": torch.ones(1)}, "f.pth")


def test_nvlabs_file_loads_into_the_encoder(tmp_path):
    torch.manual_seed(1)
    source = build_model(_model_cfg())
    path = _nvlabs_file(tmp_path / "mit_tiny.pth", source)
    torch.manual_seed(2)
    model = build_model(_model_cfg(init=str(path), init_format="nvlabs_mit"))
    report = model.init_report
    mine, theirs = model.state_dict(), source.state_dict()
    assert report["loaded"] == sum(k.startswith("backbone.") for k in mine)
    assert all(k.startswith("layer5.") for k in report["missing"]) and report["unexpected"] == []
    assert all(torch.equal(mine[k], theirs[k]) for k in mine if k.startswith("backbone."))
    assert not torch.equal(mine["layer5.head.1.weight"], theirs["layer5.head.1.weight"])  # the head stays new
    # an mmsegmentation checkpoint ({'state_dict': {'backbone.<nvlabs name>': ...}}) loads the same
    wrapped = tmp_path / "mmseg.pth"
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in torch.load(path).items()}}, wrapped)
    again = build_model(_model_cfg(init=str(wrapped), init_format="nvlabs_mit"))
    assert all(torch.equal(again.state_dict()[k], theirs[k]) for k in mine if k.startswith("backbone."))


def test_nvlabs_file_errors_name_the_first_offending_key(tmp_path):
    source = build_model(_model_cfg())
    stray = _nvlabs_file(tmp_path / "a.pth", source, extra={"pos_embed1": torch.zeros(1, 4, 8)})
    with pytest.raises(CheckpointError, match=r"key 'pos_embed1' is not a tensor of the NVlabs MiT layout"):
        build_model(_model_cfg(init=str(stray), init_format="nvlabs_mit"))
    deeper = _nvlabs_file(tmp_path / "b.pth", source, extra={"block2.1.norm1.weight": torch.ones(16)})
    with pytest.raises(CheckpointError, match=r"backbone.stages.1.blocks.1.norm1.weight has no place in the model"):
        build_model(_model_cfg(init=str(deeper), init_format="nvlabs_mit"))
    short = _nvlabs_file(tmp_path / "c.pth", source, drop=["block4.0.mlp.fc2.bias"])
    with pytest.raises(CheckpointError, match=r"backbone.stages.3.blocks.0.mlp.fc2.bias is not in the file"):
        build_model(_model_cfg(init=str(short), init_format="nvlabs_mit"))
    wide = _nvlabs_file(tmp_path / "d.pth", source, extra={"norm1.weight": torch.ones(32)})
    with pytest.raises(CheckpointError, match=r"shape mismatch for backbone.stages.0.norm.weight"):
        build_model(_model_cfg(init=str(wide), init_format="nvlabs_mit"))


# ---------------------------------------------------------------------------------------------------------
# The chain: source_only -> warm-up -> soft labels, prototypes, class distribution -> stage 1 -> stage 2, 3


def _tiny_mit_checkpoint(path, seed=0):
    torch.manual_seed(seed)
    mcfg = _model_cfg()
    save_checkpoint(path, make_checkpoint(build_model(mcfg), mcfg, iteration=0))
    return path


def _one_step(cfg):
    m = build_method(cfg, _ctx())
    loaders = build_loaders(cfg, build_datasets(cfg, m.domains, N_CLASS), rank=0, world_size=1, start_iter=0)
    batch = {d: to_device(next(iter(ld)), CPU) for d, ld in loaders.items()}
    before = [p.detach().clone() for p in m.student.parameters()]
    m.train_mode()
    losses = m.step(batch)
    assert all(np.isfinite(float(v)) for v in losses.values()), losses
    assert any(not torch.equal(a, p) for a, p in zip(before, m.student.parameters()))
    return m, losses, batch


def _mit_dict(base, stage, **over):
    return train_dict(base, stage, **{"model": dict(TINY_MIT), **over})


@pytest.mark.parametrize("stage", ["source_only", "warmup"])
def test_source_only_and_warmup_step_on_a_tiny_mit(pair_dir, stage):  # noqa: F811
    m, losses, _ = _one_step(load(TrainConfig, _mit_dict(pair_dir, stage)))
    assert isinstance(m.student, SegFormer)
    assert set(losses) == ({"ce_source"} if stage == "source_only" else {"ce_source", "adv", "disc"})


@pytest.fixture(scope="module")
def mit_products(pair_dir, tmp_path_factory):  # noqa: F811
    """The warm-up's products for the tiny MiT: soft labels, prototypes, class distribution, hard labels."""
    base = tmp_path_factory.mktemp("mit")
    _, tgt = prepared_pair(pair_dir)
    ckpt = _tiny_mit_checkpoint(base / "checkpoint.pt")
    common = {"checkpoint": ckpt, "data": tgt, "device": "cpu", "workers": 0, "progress": False}
    pseudo_soft.run(PseudoSoftConfig(**common, grid_stride=None), base / "soft")
    pseudo_soft.run(PseudoSoftConfig(**common), base / "soft8")
    prototypes.run(PrototypesConfig(**common), base / "protos")
    class_dist.run(ClassDistConfig(**common), base / "dist")
    pseudo_hard.run(PseudoHardConfig(**common, color=False), base / "hard")
    return base, tgt


def test_soft_labels_are_stored_at_stride_4(mit_products):
    base, tgt = mit_products
    from cpsl.data.prepared import PreparedSplit
    split = PreparedSplit(tgt)
    h, w = split.load(0)[0].shape[:2]
    q = load_soft(soft_path(base / "soft", split.names[0]))
    assert q.shape == (N_CLASS, -(-h // 4), -(-w // 4))       # grid_stride null, 40x80 images: 10x20
    # grid_stride 8 (default): DeepLab-v2's grid, the stride-4 probabilities resized with corners on corners
    p8 = load_soft(soft_path(base / "soft8", split.names[0]))
    assert p8.shape == (N_CLASS, 6, 11)
    expect = F.interpolate(torch.from_numpy(q)[None], size=(6, 11), mode="bilinear", align_corners=True)[0]
    assert np.abs(p8 - expect.numpy()).max() <= 2 / 255            # two quantisations apart at most
    assert np.abs(p8[:, [0, -1]][:, :, [0, -1]] - q[:, [0, -1]][:, :, [0, -1]]).max() <= 2 / 255
    meta = json.loads((base / "soft8" / "meta.json").read_text())
    assert meta["shapes"] == {"6x11": len(split)} and "stride-8" in meta["layout"]
    assert torch.load(base / "protos" / "prototypes.pt")["prototypes"].shape == (N_CLASS, 16)


def test_stage1_step_on_a_tiny_mit(pair_dir, mit_products):  # noqa: F811
    base, _ = mit_products
    opts = {"init_checkpoint": str(base / "checkpoint.pt"), "selflabel.soft_labels": str(base / "soft"),
            "selflabel.prototypes": str(base / "protos" / "prototypes.pt"),
            "selflabel.class_dist": str(base / "dist" / "class_distribution.npy"),
            "selflabel.queue_length": 32, "selflabel.pixels_per_image": 8}
    m, losses, batch = _one_step(load(TrainConfig, _mit_dict(pair_dir, "stage1", **opts)))
    assert set(losses) == {"ce_source", "cts", "consist", "sl", "contrast", "loss", "cutmix"}
    assert batch["target"]["soft"].shape == (2, N_CLASS, 8, 16)   # the crop's quarter grid, as for DeepLab-v2
    assert m.queue.filled == 16
    # the reference queue labels sample the student's stride-4 grid: 8x16 for the 32x64 crop
    ref = load(TrainConfig, _mit_dict(pair_dir, "stage1", **{**opts, "selflabel.reference_queue_labels": True,
                                                             "selflabel.pixels_per_image": 128,
                                                             "selflabel.queue_length": 256}))
    assert ref.selflabel.pixels_per_image == 128
    with pytest.raises(ConfigError, match=r"the student's output grid \(crop / 4\), 8x16"):
        load(TrainConfig, _mit_dict(pair_dir, "stage1", **{**opts, "selflabel.reference_queue_labels": True,
                                                          "selflabel.pixels_per_image": 129,
                                                          "selflabel.queue_length": 258}))


@pytest.mark.parametrize("stage", ["stage2", "stage3"])
def test_distill_steps_on_a_tiny_mit(pair_dir, mit_products, stage):  # noqa: F811
    base, _ = mit_products
    over = {"distill.teacher": str(base / "checkpoint.pt"), "distill.hard_labels": str(base / "hard")}
    if stage == "stage3":   # the KD round 2 student starts from round 1's network
        over["init_checkpoint"] = str(_tiny_mit_checkpoint(base / "stage2.pt", seed=5))
    cfg = load(TrainConfig, _mit_dict(pair_dir, stage, **over))
    m, losses, _ = _one_step(cfg)
    assert isinstance(m.teacher, SegFormer) and set(losses) == {"ce_source", "ce_pseudo", "kd"}


def test_a_large_mit_without_weights_must_say_random():
    cfg = {"stage": "source_only", "max_iters": 40000, "data": {"source": "s"}, "model": {"backbone": "mit_b5"}}
    with pytest.raises(ConfigError, match=r"^model.init: not set for a mit_b5 \(an ImageNet-scale network\): .* "
                                          r"init: pretrained/mit_b5.pth, init_format: nvlabs_mit\) or write "
                                          r"`init: random` to mean it$"):
        load(TrainConfig, cfg)
    assert load(TrainConfig, {**cfg, "model": {"backbone": "mit_b5", "init": "random"}}).model.init_file is None


def test_training_loop_runs_adamw_with_warmup_on_a_tiny_mit(pair_dir, tmp_path):  # noqa: F811
    from cpsl.models.checkpoint import load_checkpoint
    from cpsl.train.loop import train

    optim = {"name": "adamw", "lr": 1e-3, "weight_decay": 0.01, "norm_decay_mult": 0.0, "warmup_iters": 2,
             "warmup_ratio": 0.1, "poly_power": 1.0}
    train(load(TrainConfig, _mit_dict(pair_dir, "source_only", max_iters=4, optim=optim)), tmp_path / "run")
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # lr * (1 - t/4) * (1 - (1 - t/2) * 0.9) for t < 2, then lr * (1 - t/4): 0.1, 0.75 * 0.55, 0.5, 0.25 (x 1e-3)
    assert [x["lr/backbone"] for x in lines] == pytest.approx([1e-4, 4.125e-4, 5e-4, 2.5e-4])
    assert [x["lr/head_norm"] for x in lines] == pytest.approx([1e-3, 4.125e-3, 5e-3, 2.5e-3])
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert ckpt["model_config"]["backbone"] == "mit_b0" and ckpt["model_config"]["mit_depths"] == [1, 1, 1, 1]


@pytest.mark.parametrize("stage", ["source_only", "warmup"])
def test_gpu_path_on_fake_cuda_adds_no_host_syncs(pair_dir, stage):  # noqa: F811
    """The MiT on the (fake) CUDA path: channels_last convolutions, bf16 autocast, and the same host
    synchronisations per iteration as DeepLab-v2 (the network itself adds none)."""
    from tests.test_fake_cuda import TRAIN_SYNCS, _check_syncs, _one_iteration

    cfg = load(TrainConfig, _mit_dict(pair_dir, stage))
    method, _, counts, fc, _ = _one_iteration(cfg)
    assert isinstance(method.student, SegFormer) and stage in TRAIN_SYNCS
    _check_syncs(stage, fc, counts)


def test_mitb5_presets_resolve_and_name_a_missing_weights_file():
    import yaml

    from cpsl import workflow

    config = yaml.safe_load((Path(__file__).resolve().parent.parent / "config.yaml").read_text())
    for exp in ("gta5_cityscapes_mitb5", "synthia_cityscapes_mitb5"):
        model = config["experiment_settings"][exp]["model"]
        model["init"] = "imagenet"   # torchvision has no MiT file: refused with what to give instead
        with pytest.raises(ConfigError, match=rf"^experiment_settings.{exp}.stages.source_only.model.init: "
                                              r"'imagenet' means torchvision's ResNet weights; for mit_b5 give"):
            workflow.train_config(config, exp, 0, "source_only")
        model["init"] = None
        with pytest.raises(ConfigError, match=r"model.init: not set for a mit_b5"):
            workflow.train_config(config, exp, 0, "source_only")
        model["init"] = "/weights/mit_b5.pth"
        for stage in ("source_only", "warmup", "stage1", "stage2", "stage3"):
            cfg = load(TrainConfig, workflow.train_config(config, exp, 0, stage))
            assert cfg.model.backbone == "mit_b5" and cfg.model.init_format == "nvlabs_mit"
            assert (cfg.optim.name, cfg.optim.lr, cfg.optim.head_lr_mult, cfg.optim.warmup_iters) == \
                ("adamw", 6e-5, 10.0, 1500)
            assert cfg.max_iters == 40000 and cfg.data.batch_size == 2 and not cfg.model.bn_pretrain


# ---------------------------------------------------------------------------------------------------------
# Hugging Face folders


def _hf_state(model, v5: bool) -> dict[str, torch.Tensor]:
    """The model's encoder under Hugging Face SegFormer names (transformers 4.x or 5.x), written by hand, with
    ``attn.kv`` split into key and value and the ImageNet classifier of nvidia/mit-bX."""
    blocks4 = {"norm1": "layer_norm_1", "norm2": "layer_norm_2", "attn.q": "attention.self.query",
               "attn.proj": "attention.output.dense", "attn.sr": "attention.self.sr",
               "attn.norm": "attention.self.layer_norm", "mlp.fc1": "mlp.dense1", "mlp.fc2": "mlp.dense2",
               "mlp.dwconv": "mlp.dwconv.dwconv"}
    blocks5 = {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.q": "attention.q_proj",
               "attn.proj": "attention.o_proj", "attn.sr": "attention.sequence_reduction.sequence_reduction",
               "attn.norm": "attention.sequence_reduction.layer_norm", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
               "mlp.dwconv": "mlp.dwconv.dwconv"}
    out = {}
    for k, v in model.state_dict().items():
        if not k.startswith("backbone."):
            continue
        parts = k.split(".")
        s, rest = parts[2], parts[3:]
        if rest[0] == "embed":
            part = "proj" if rest[1] == "proj" else "layer_norm"
            stem = f"stages.{s}.patch_embeddings" if v5 else f"encoder.patch_embeddings.{s}"
            out[f"segformer.{stem}.{part}.{rest[2]}"] = v.clone()
        elif rest[0] == "norm":
            stem = f"stages.{s}.layer_norm" if v5 else f"encoder.layer_norm.{s}"
            out[f"segformer.{stem}.{rest[1]}"] = v.clone()
        else:
            j, what, wb = rest[1], ".".join(rest[2:-1]), rest[-1]
            stem = f"segformer.stages.{s}.blocks.{j}" if v5 else f"segformer.encoder.block.{s}.{j}"
            if what == "attn.kv":
                key, value = v.chunk(2, dim=0)
                names = ("attention.k_proj", "attention.v_proj") if v5 else \
                    ("attention.self.key", "attention.self.value")
                out[f"{stem}.{names[0]}.{wb}"], out[f"{stem}.{names[1]}.{wb}"] = key.clone(), value.clone()
            else:
                out[f"{stem}.{(blocks5 if v5 else blocks4)[what]}.{wb}"] = v.clone()
    out["classifier.weight"], out["classifier.bias"] = torch.zeros(1000, 64), torch.zeros(1000)
    return out


def _write_safetensors(path, state):
    """The safetensors format by hand: 8-byte little-endian header size, JSON header, little-endian data."""
    header, blobs, offset = {}, [], 0
    for name, t in state.items():
        b = t.contiguous().numpy().tobytes()
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + len(b)]}
        blobs.append(b)
        offset += len(b)
    head = json.dumps(header).encode()
    path.write_bytes(len(head).to_bytes(8, "little") + head + b"".join(blobs))


@pytest.mark.parametrize("v5, kind", [(False, "safetensors"), (True, "safetensors"), (False, "bin")])
def test_hf_folder_loads_into_the_encoder(tmp_path, v5, kind):
    torch.manual_seed(3)
    source = build_model(_model_cfg())
    folder = tmp_path / "mit-tiny"
    folder.mkdir()
    state = _hf_state(source, v5)
    if kind == "bin":
        torch.save(state, folder / "pytorch_model.bin")
    else:
        _write_safetensors(folder / "model.safetensors", state)
    model = build_model(_model_cfg(init=str(folder), init_format="hf_segformer"))
    mine, theirs = model.state_dict(), source.state_dict()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine if k.startswith("backbone."))
    assert model.init_report["loaded"] == sum(k.startswith("backbone.") for k in mine)
    # errors: an unknown key, a key without its value, an empty folder
    _write_safetensors(folder / "model.safetensors", {**state, "segformer.encoder.pos_embed": torch.zeros(2)})
    (folder / "pytorch_model.bin").unlink(missing_ok=True)
    with pytest.raises(CheckpointError, match=r"key 'segformer.encoder.pos_embed' is not a tensor of the Hugging "
                                              r"Face SegFormer layout"):
        build_model(_model_cfg(init=str(folder), init_format="hf_segformer"))
    half = {k: v for k, v in state.items() if not k.endswith(("self.value.bias", "v_proj.bias"))}
    _write_safetensors(folder / "model.safetensors", half)
    with pytest.raises(CheckpointError, match=r"backbone.stages.0.blocks.0.attn.k.bias has no matching value"):
        build_model(_model_cfg(init=str(folder), init_format="hf_segformer"))
    (folder / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match=r"model.init: no model.safetensors or pytorch_model.bin in "):
        build_model(_model_cfg(init=str(folder), init_format="hf_segformer"))
