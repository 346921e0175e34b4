"""``cpsl pseudo-hard``: hard pseudo labels of a target split for the distillation stages (spec 3.2).

For every image of the prepared split: ``p = (up(softmax(G(x))) + flip(up(softmax(G(flip(x)))))) / 2``, with
``up`` bilinear (``align_corners`` true) to the image/label size; ``conf, label = p.max(0)``. No threshold is
applied here: the training loader applies it when reading (``cpsl.data.pseudo.load_hard(dir, name, 0.95)``).

Output folder (replaced as a whole when the step succeeds)::

    <name>.png          uint8 train ids (argmax), label resolution
    <name>_conf.png     uint16 round(65535 * conf)
    <name>_color.png    RGB in the Cityscapes palette (setting ``color``, default on; for viewing)
    meta.json           kind "hard", encodings, n_class, classes, flip, n_images, names, bytes, checkpoint ...

Size per 1024 x 2048 image: the reference stores conf as float16 ``.npy`` (4,194,432 B, spacing 4.9e-4 near
0.95). Our 16-bit PNG has steps of 1/65535 and measured 2.07-2.64 MB on smooth synthetic maps (67 % / 39 % of
pixels above 0.95), plus about 65 kB for the label PNG and 100 kB for the colour PNG (``benchmark_bytes``).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch

from cpsl import inference
from cpsl.config import PseudoHardConfig
from cpsl.data import pseudo
from cpsl.labels import colorize


def _write(root: Path, name: str, label: np.ndarray, conf_q: np.ndarray, classes: tuple[str, ...] | None
           ) -> int:
    color = colorize(label, classes) if classes is not None else None
    return sum(pseudo.save_hard(root, name, label, conf_q, color).values())


def run(cfg: PseudoHardConfig, out: Path) -> dict:
    """Write the hard pseudo labels of ``cfg.data`` into ``out``; returns the meta.json content."""
    with inference.session(cfg.device) as info:
        setup = inference.prepare_run(cfg, info)
        classes = tuple(setup.split.classes)
        with inference.staged_dir(out, info, "pseudo-hard") as tmp:
            with inference.BackgroundWriter() as writer:
                for batch in inference.iter_batches(setup.split, setup.indices, cfg, info.device, "pseudo-hard",
                                                    show_progress=info.is_main):
                    probs = inference.predict_probs(setup.model, batch.images, out_size=batch.sizes[0],
                                                    flip=cfg.flip, align_corners=cfg.align_corners, amp=cfg.amp)
                    with torch.inference_mode():
                        conf, label = probs.max(1)
                        conf_q = (conf.clamp(0, 1) * pseudo.CONF_LEVELS).round().to(torch.int32)
                        # one copy to the host: the 16-bit confidence above the 8-bit label
                        packed = (conf_q * 256 + label.to(torch.int32)).cpu().numpy()
                        label, conf_q = (packed & 255).astype(np.uint8), (packed >> 8).astype(np.uint16)
                    del probs, conf
                    for name, lab, cq in zip(batch.names, label, conf_q):
                        writer.submit(_write, tmp, name, lab, cq, classes if cfg.color else None)
            total = torch.tensor([sum(writer.results), len(writer.results)], dtype=torch.int64)
            inference.all_reduce_(total, info)
            meta = {
                "kind": "hard", "label": "<name>.png: uint8 train ids (argmax of the flip-averaged probabilities)",
                "conf_encoding": pseudo.CONF_ENCODING, "conf_levels": pseudo.CONF_LEVELS,
                "color": bool(cfg.color), "flip": bool(cfg.flip), "align_corners": bool(cfg.align_corners),
                "threshold_applied": False,
                "n_class": setup.model_config.n_class, "classes": list(classes),
                "n_images": int(total[1]), "bytes": int(total[0]),
                "bytes_per_image": round(int(total[0]) / max(1, int(total[1]))),
                "checkpoint": str(Path(cfg.checkpoint).absolute()),
                "iteration": int(setup.checkpoint.get("iteration", 0)), "data": str(setup.split.root),
                "names": list(setup.split.names),
            }
            if info.is_main:
                inference.write_json(tmp / "meta.json", meta)
    return meta


def benchmark_bytes(size: tuple[int, int] = (1024, 2048), n_class: int = 19, seed: int = 0) -> dict[str, int]:
    """Bytes of one image's files: reference float16 conf .npy vs our label / conf / colour PNGs.

    Synthetic probabilities: softmax of smooth random logits at 1/8 resolution (scaled 8x, i.e. mostly
    confident), upsampled bilinearly like the real step.
    """
    h, w = size
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(1, n_class, max(2, h // 128), max(2, w // 128), generator=g)
    low = torch.nn.functional.interpolate(low, size=((h + 7) // 8 + 1, (w + 7) // 8 + 1), mode="bicubic",
                                          align_corners=True)
    probs = torch.nn.functional.interpolate((low * 8).softmax(1), size=size, mode="bilinear", align_corners=True)[0]
    conf, label = probs.max(0)
    buf = io.BytesIO()
    np.save(buf, conf.numpy().astype(np.float16))
    sizes = {"reference_conf_float16_npy": len(buf.getvalue())}
    label_np = label.to(torch.uint8).numpy()
    conf_q = pseudo.quantize_conf(conf)
    names = tuple(f"c{i}" for i in range(n_class))
    enc = pseudo._encode_png
    sizes["label_png"] = len(enc(label_np, Path("label")))
    sizes["conf_png"] = len(enc(conf_q, Path("conf")))
    sizes["color_png"] = len(enc(colorize(label_np)[:, :, ::-1] if n_class == 19 else colorize(label_np, names),
                                 Path("color")))
    return sizes
