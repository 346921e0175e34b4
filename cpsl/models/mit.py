"""SegFormer's Mix Transformer (MiT-B0 ... B5) encoder with an all-MLP head that also returns CPSL's features.

Our own module, not ``transformers``' SegformerModel: it adds no dependency (``transformers`` 5.x is a 13.5 MB
wheel that pulls huggingface_hub, tokenizers and safetensors into every environment, CI included, for about
150 lines of network), its state-dict names are ours to keep stable across library versions (``transformers``
5 renamed SegFormer's modules: 4.x ``attention.self.query`` / ``block.i.j`` became ``q_proj`` / ``stages``),
and the same ``build_model`` / ``feat`` / ``layer5`` conventions as DeepLab-v2 hold, so every stage runs on it
unchanged.

Encoder (``backbone``), per stage s = 0..3 with width C_s, depth D_s, heads (1, 2, 5, 8), spatial reduction
(8, 4, 2, 1) and MLP ratio 4, as the published MiT::

    backbone.stages.s.embed      overlapping patch embedding: Conv(k=7, stride 4, pad 3) for s=0, else
                                 Conv(k=3, stride 2, pad 1); then LayerNorm (eps 1e-5)
    backbone.stages.s.blocks.j   x + attn(norm1(x)), then x + mlp(norm2(x)) (stochastic depth on both)
        attn: efficient self-attention: q = Linear(x); keys/values from the tokens reduced by a
              Conv(k=stride=sr) + LayerNorm when sr > 1 (``attn.sr``, ``attn.norm``), ``attn.kv`` one Linear
        mlp:  Mix-FFN: fc1 (C -> 4C), depth-wise Conv3x3 (``mlp.dwconv``, the only position information), GELU, fc2
    backbone.stages.s.norm       LayerNorm (eps 1e-6, as the blocks' norms); the stage's output (B, C_s, h_s, w_s)

Head (``layer5``, the project's name for the head: the optimizer's 10x group and what ``init_format:
checkpoint`` leaves out): the SegFormer all-MLP decoder, each stage projected to E channels (1x1 conv),
upsampled to stage 0's grid (bilinear), concatenated and fused (1x1 conv 4E -> E, GroupNorm, ReLU), then a
feature projection (1x1 conv E -> ``head_channels``, GroupNorm: CPSL's ``feat``, the prototypes' space) and
the classifier (Dropout2d, 1x1 conv without bias), as in the DeepLab-v2 ASPP head. Why this head rather than
DAFormer's context-aware fusion: it is the smallest head that gives 1/4-stride features, the classifier sits
directly on ``feat`` as in the CPSL head (the prototypes and the logits share one space), and its cost does
not grow with dilated 3x3 convolutions at 1/4 stride. GroupNorm replaces SegFormer's BatchNorm: at 2 images
per GPU batch statistics are poor, and the EMA teacher never needs SyncBatchNorm.

``forward(x)`` returns ``{"out": (B, n_class, h, w), "feat": (B, head_channels, h, w)}`` at stride 4
(``output_size``: ceil(size / 4); sample i centred on input pixel 4i).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cpsl.config import MIT_HEADS
from cpsl.models.deeplabv2 import gn_groups

# (depths, widths) of the published variants; heads, reductions and MLP ratio are shared by all six.
MIT_ARCHS: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "mit_b0": ((2, 2, 2, 2), (32, 64, 160, 256)),
    "mit_b1": ((2, 2, 2, 2), (64, 128, 320, 512)),
    "mit_b2": ((3, 4, 6, 3), (64, 128, 320, 512)),
    "mit_b3": ((3, 4, 18, 3), (64, 128, 320, 512)),
    "mit_b4": ((3, 8, 27, 3), (64, 128, 320, 512)),
    "mit_b5": ((3, 6, 40, 3), (64, 128, 320, 512)),
}
MIT_SR = (8, 4, 2, 1)
MIT_MLP_RATIO = 4
MIT_PATCH = ((7, 4), (3, 2), (3, 2), (3, 2))   # (kernel, stride) of each stage's patch embedding
STRIDE = 4


def is_mit(backbone: str) -> bool:
    return backbone in MIT_ARCHS


def default_decoder_channels(backbone: str) -> int:
    """SegFormer's decoder width E: 256 for MiT-B0, 768 for B1-B5."""
    return 256 if backbone == "mit_b0" else 768


def output_size(size: int) -> int:
    """Output side for an input side of ``size`` pixels: the first patch embedding's, ceil(size / 4)."""
    k, s = MIT_PATCH[0]
    return (size + 2 * (k // 2) - k) // s + 1


class DropPath(nn.Module):
    """Stochastic depth: drop a residual branch for a whole sample with probability ``p`` (train mode only)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1.0 - self.p)
        return x * keep / (1.0 - self.p)


class PatchEmbed(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int, stride: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(cin, cout, kernel, stride, kernel // 2)
        self.norm = nn.LayerNorm(cout)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        x = self.proj(x)
        h, w = x.shape[-2:]
        return self.norm(x.flatten(2).transpose(1, 2)), h, w


class Attention(nn.Module):
    """Multi-head self-attention whose keys and values come from the tokens reduced ``sr`` x ``sr``."""

    def __init__(self, dim: int, heads: int, sr: int) -> None:
        super().__init__()
        self.heads, self.sr_ratio = heads, sr
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.sr = nn.Conv2d(dim, dim, sr, sr) if sr > 1 else None
        self.norm = nn.LayerNorm(dim) if sr > 1 else None

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, n, c = x.shape
        q = self.q(x).reshape(b, n, self.heads, c // self.heads).transpose(1, 2)
        y = x
        if self.sr is not None:
            grid = x.transpose(1, 2).reshape(b, c, h, w)
            r = self.sr_ratio
            if h < r or w < r:   # a map smaller than one reduction window (tiny images): zero-pad to one window
                grid = F.pad(grid, (0, max(0, r - w), 0, max(0, r - h)))
            y = self.norm(self.sr(grid).flatten(2).transpose(1, 2))
        k, v = self.kv(y).reshape(b, -1, 2, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class MixFFN(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        x = self.fc1(x)
        b, n, c = x.shape
        x = self.dwconv(x.transpose(1, 2).reshape(b, c, h, w)).flatten(2).transpose(1, 2)
        return self.fc2(F.gelu(x))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, sr: int, drop_path: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads, sr)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MixFFN(dim, dim * MIT_MLP_RATIO)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), h, w))
        return x + self.drop_path(self.mlp(self.norm2(x), h, w))


class Stage(nn.Module):
    def __init__(self, cin: int, dim: int, depth: int, index: int, drop_paths: list[float]) -> None:
        super().__init__()
        kernel, stride = MIT_PATCH[index]
        self.embed = PatchEmbed(cin, dim, kernel, stride)
        self.blocks = nn.ModuleList(Block(dim, MIT_HEADS[index], MIT_SR[index], p) for p in drop_paths)
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, h, w = self.embed(x)
        for block in self.blocks:
            x = block(x, h, w)
        return self.norm(x).transpose(1, 2).reshape(x.shape[0], -1, h, w)


class MixTransformer(nn.Module):
    """The MiT encoder: four stages, outputs at strides 4, 8, 16, 32. Stochastic depth rises linearly from 0 to
    ``drop_path`` over all blocks (as published)."""

    def __init__(self, depths: tuple[int, ...], widths: tuple[int, ...], drop_path: float = 0.1) -> None:
        super().__init__()
        total = sum(depths)
        rates = [drop_path * i / max(1, total - 1) for i in range(total)]
        stages, cin, start = [], 3, 0
        for s, (depth, dim) in enumerate(zip(depths, widths)):
            stages.append(Stage(cin, dim, depth, s, rates[start:start + depth]))
            cin, start = dim, start + depth
        self.stages = nn.ModuleList(stages)
        self.widths = tuple(widths)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for stage in self.stages:
            x = stage(x)
            outs.append(x)
        return outs


class MLPHead(nn.Module):
    """SegFormer's all-MLP decoder plus CPSL's feature projection and classifier (module docstring)."""

    def __init__(self, in_channels: tuple[int, ...], n_class: int, embed: int, channels: int,
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.linear = nn.ModuleList(nn.Conv2d(c, embed, 1) for c in in_channels)
        cat = embed * len(in_channels)
        self.fuse = nn.Sequential(nn.Conv2d(cat, embed, 1, bias=False), nn.GroupNorm(gn_groups(embed), embed),
                                  nn.ReLU(inplace=True))
        self.proj = nn.Sequential(nn.Conv2d(embed, channels, 1), nn.GroupNorm(gn_groups(channels), channels))
        self.head = nn.Sequential(nn.Dropout2d(dropout), nn.Conv2d(channels, n_class, 1, bias=False))

    def forward(self, xs: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        size = xs[0].shape[-2:]
        ups = [lin(x) if i == 0 else F.interpolate(lin(x), size=size, mode="bilinear", align_corners=False)
               for i, (lin, x) in enumerate(zip(self.linear, xs))]
        feat = self.head[0](self.proj(self.fuse(torch.cat(ups, dim=1))))
        return {"feat": feat, "out": self.head[1](feat)}


class SegFormer(nn.Module):
    """MiT encoder (``backbone``) + ``layer5`` head; the interface of ``DeepLabV2`` (``feat_channels``,
    ``backbone_parameters``, ``head_parameters``, ``stride``, ``output_size``)."""

    stride = STRIDE

    def __init__(self, backbone: str = "mit_b5", n_class: int = 19, head_channels: int = 256,
                 depths: list[int] | None = None, widths: list[int] | None = None,
                 decoder_channels: int | None = None, dropout: float = 0.1, drop_path: float = 0.1) -> None:
        super().__init__()
        d0, w0 = MIT_ARCHS[backbone]
        depths, widths = tuple(depths or d0), tuple(widths or w0)
        self.n_class = n_class
        self.backbone = MixTransformer(depths, widths, drop_path)
        embed = decoder_channels or default_decoder_channels(backbone)
        self.layer5 = MLPHead(widths, n_class, embed, head_channels, dropout)
        reset_parameters(self)

    @property
    def feat_channels(self) -> int:
        return self.layer5.head[1].in_channels

    @staticmethod
    def output_size(size: int) -> int:
        return output_size(size)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.layer5(self.backbone(x))

    def backbone_parameters(self) -> list[nn.Parameter]:
        return list(self.backbone.parameters())

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.layer5.parameters())


def reset_parameters(model: nn.Module) -> None:
    """The published MiT init: Linear ~ truncated N(0, 0.02) with zero bias, LayerNorm 1/0, Conv2d ~
    N(0, sqrt(2 / fan_out)) with fan_out = k*k*out/groups and zero bias; GroupNorm 1/0."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.LayerNorm, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def encoder_parameter_count(backbone: str, depths: list[int] | None = None,
                            widths: list[int] | None = None) -> int:
    """Parameters of the MiT encoder alone, counted on the meta device (no memory, even for B5)."""
    d0, w0 = MIT_ARCHS[backbone]
    with torch.device("meta"):
        enc = MixTransformer(tuple(depths or d0), tuple(widths or w0))
    return sum(p.numel() for p in enc.parameters())


# ---------------------------------------------------------------------------------------------------------
# The original NVlabs layout (SegFormer's mix_transformer.py, the ImageNet mit_bX.pth files)

_NVLABS_RULES = (
    (re.compile(r"patch_embed([1-4])\.(proj|norm)\.(weight|bias)$"), "backbone.stages.{s}.embed.{1}.{2}"),
    (re.compile(r"block([1-4])\.(\d+)\.mlp\.dwconv\.dwconv\.(weight|bias)$"),
     "backbone.stages.{s}.blocks.{1}.mlp.dwconv.{2}"),
    (re.compile(r"block([1-4])\.(\d+)\.((?:norm1|norm2|attn\.(?:q|kv|proj|sr|norm)|mlp\.fc1|mlp\.fc2)"
                r"\.(?:weight|bias))$"), "backbone.stages.{s}.blocks.{1}.{2}"),
    (re.compile(r"norm([1-4])\.(weight|bias)$"), "backbone.stages.{s}.norm.{1}"),
)
# The ImageNet classifier of the NVlabs files: not part of a segmentation network.
NVLABS_DROPPED = re.compile(r"head\.(weight|bias)$")


def nvlabs_key(name: str) -> str | None:
    """Our name for an NVlabs MiT key (``block3.12.attn.kv.weight`` -> ``backbone.stages.2.blocks.12.attn.kv.
    weight``); None for the ImageNet classifier (``head.*``); ValueError for any other key."""
    if NVLABS_DROPPED.fullmatch(name):
        return None
    for pattern, template in _NVLABS_RULES:
        m = pattern.fullmatch(name)
        if m:
            groups = m.groups()
            return template.format(*groups, s=int(groups[0]) - 1)
    raise ValueError(name)


def convert_nvlabs(state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """An NVlabs-layout MiT state dict under our names. A ``backbone.`` prefix (mmsegmentation checkpoints) is
    accepted. Raises ValueError naming the first key that is not an MiT encoder tensor."""
    out = {}
    for name, value in state.items():
        try:
            ours = nvlabs_key(name.removeprefix("backbone."))
        except ValueError:
            raise ValueError(f"{source}: key {name!r} is not a tensor of the NVlabs MiT layout (patch_embedN.*, "
                             "blockN.i.*, normN.*, head.*)") from None
        if ours is not None:
            out[ours] = value
    return out


# ---------------------------------------------------------------------------------------------------------
# A Hugging Face SegFormer folder (``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``), in the
# names of transformers 4.x (the hub's files: ``encoder.block.i.j.attention.self.query``) or 5.x (``stages.i.
# blocks.j.attention.q_proj``); keys and values are separate Linear layers there, one (``kv``) here.

_HF_BLOCK_PARTS = {
    "layer_norm_1": "norm1", "layernorm_before": "norm1", "layer_norm_2": "norm2", "layernorm_after": "norm2",
    "attention.self.query": "attn.q", "attention.q_proj": "attn.q",
    "attention.self.key": "attn.k", "attention.k_proj": "attn.k",
    "attention.self.value": "attn.v", "attention.v_proj": "attn.v",
    "attention.output.dense": "attn.proj", "attention.o_proj": "attn.proj",
    "attention.self.sr": "attn.sr", "attention.sequence_reduction.sequence_reduction": "attn.sr",
    "attention.self.layer_norm": "attn.norm", "attention.sequence_reduction.layer_norm": "attn.norm",
    "mlp.dense1": "mlp.fc1", "mlp.fc1": "mlp.fc1", "mlp.dense2": "mlp.fc2", "mlp.fc2": "mlp.fc2",
    "mlp.dwconv.dwconv": "mlp.dwconv",
}
_HF_RULES = (
    (re.compile(r"(?:encoder\.patch_embeddings\.(\d)|stages\.(\d)\.patch_embeddings)"
                r"\.(proj|layer_norm)\.(weight|bias)"),
     lambda s, part, wb: f"backbone.stages.{s}.embed.{'proj' if part == 'proj' else 'norm'}.{wb}"),
    (re.compile(r"(?:encoder\.layer_norm\.(\d)|stages\.(\d)\.layer_norm)\.()(weight|bias)"),
     lambda s, _, wb: f"backbone.stages.{s}.norm.{wb}"),
)
_HF_BLOCK = re.compile(r"(?:encoder\.block\.(\d)|stages\.(\d)\.blocks)\.(\d+)\.(.+)\.(weight|bias)")
HF_DROPPED = re.compile(r"(classifier|decode_head)\..*")


def hf_key(name: str) -> str | None:
    """Our name for a Hugging Face SegFormer key (``k`` / ``v`` parts of ``attn.kv`` still apart); None for
    the classifier or decode head; ValueError for any other key."""
    name = name.removeprefix("segformer.")
    if HF_DROPPED.fullmatch(name):
        return None
    for pattern, build in _HF_RULES:
        m = pattern.fullmatch(name)
        if m:
            return build(m.group(1) or m.group(2), m.group(3), m.group(4))
    m = _HF_BLOCK.fullmatch(name)
    if m and m.group(4) in _HF_BLOCK_PARTS:
        return f"backbone.stages.{m.group(1) or m.group(2)}.blocks.{m.group(3)}.{_HF_BLOCK_PARTS[m.group(4)]}." \
               f"{m.group(5)}"
    raise ValueError(name)


def convert_hf(state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """A Hugging Face SegFormer state dict under our names (``attn.k`` and ``attn.v`` joined into ``attn.kv``).
    Raises ValueError naming the first key that is not a SegFormer encoder tensor."""
    out: dict[str, torch.Tensor] = {}
    for name, value in state.items():
        try:
            ours = hf_key(name)
        except ValueError:
            raise ValueError(f"{source}: key {name!r} is not a tensor of the Hugging Face SegFormer layout") from None
        if ours is not None:
            out[ours] = value
    for k_name in [k for k in out if ".attn.k." in k]:
        v_name = k_name.replace(".attn.k.", ".attn.v.")
        if v_name not in out:
            raise ValueError(f"{source}: {k_name} has no matching value tensor {v_name}")
        out[k_name.replace(".attn.k.", ".attn.kv.")] = torch.cat([out.pop(k_name), out.pop(v_name)], dim=0)
    stray = next((k for k in out if ".attn.v." in k), None)
    if stray is not None:
        raise ValueError(f"{source}: {stray} has no matching key tensor")
    return out


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file (an 8-byte little-endian header size, a JSON header of
    ``{name: {dtype, shape, data_offsets}}``, the raw data), read without the safetensors package."""
    raw = Path(path).read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + size])
    data = memoryview(raw)[8 + size:]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        dtype = _SAFETENSORS_DTYPES[info["dtype"]]
        flat = torch.frombuffer(bytearray(data[start:end]), dtype=dtype) if end > start else torch.empty(0, dtype=dtype)
        out[name] = flat.reshape(info["shape"])
    return out
