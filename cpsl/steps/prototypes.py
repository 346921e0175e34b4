"""``cpsl prototypes``: initial class prototypes for stage 1 (spec 3.3).

The model (eval mode, so no dropout on ``feat``) runs over the target train split at full size; at its output
resolution (stride 8) each pixel is assigned its own argmax class, and its ``feat`` vector (``head_channels``,
256 for the paper model) goes to that class.

* ``mode: pixel`` (default): prototype = sum of the class's feature vectors / its pixel count, summed over all
  images (and ranks): a pixel-weighted mean, independent of image order.
* ``mode: image_mean`` (the reference): for each image and each class with at least ``min_pixels`` (10)
  predicted pixels, the image's class-mean vector ``v``; then, in image order (the split's order), a running
  mean ``obj = (obj * n + v) / (n + 1)`` with ``n = min(n + 1, cap)`` (``cap`` 3000: past it an EMA with weight
  1/(cap+1)). The reference makes 4 identical passes over the images (``passes: 4`` replays the same sequence
  of vectors without recomputing them). Under torchrun the per-image vectors are summed over ranks (each image
  belongs to one rank) and the running mean is applied in image order, so the result does not depend on the
  number of processes. Memory: n_images x n_class x D float32 (58 MB for Cityscapes train).

Output folder (replaced as a whole on success)::

    prototypes.pt     torch.save of {"prototypes": float32 [C, D], "counts": int64 [C], "pixel_counts",
                      "image_counts": int64 [C], "mode": str, "classes": [names], "normalized": False}
                      (plain tensors/lists: loads with torch.load(weights_only=True)). "counts" is
                      pixel_counts in pixel mode and image_counts (per pass) in image_mean mode.
    prototypes.json   summary: mode, classes, counts, never_predicted (zero vector, count 0), norms, ...

Classes that are never predicted (or never reach ``min_pixels`` in one image) keep a zero vector and count 0,
and are listed in ``never_predicted`` and on stderr. The prototypes are not L2-normalised here; stage 1 does
that when it loads them (the reference: ``F.normalize(objective_vectors, dim=1)``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from cpsl import inference
from cpsl.config import PrototypesConfig


def class_sums(feat: torch.Tensor, pred: torch.Tensor, n_class: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class feature sums (n_class, D) float32 and pixel counts (n_class,) int64 of one image.

    ``feat``: (D, h, w); ``pred``: (h, w) class ids.
    """
    d = feat.shape[0]
    flat = feat.reshape(d, -1).t()
    idx = pred.reshape(-1)
    sums = torch.zeros(n_class, d, dtype=flat.dtype, device=flat.device).index_add_(0, idx, flat)
    return sums, inference.count_ids(idx, n_class)


def running_mean(vectors: torch.Tensor, valid: torch.Tensor, cap: int, passes: int = 1) -> tuple[torch.Tensor,
                                                                                                   torch.Tensor]:
    """The reference's running mean over (image, class) vectors, images in order, ``passes`` times.

    ``vectors``: (N, C, D); ``valid``: (N, C) bool. Returns (prototypes (C, D) float64, capped counts (C,)).
    """
    n, c, d = vectors.shape
    obj = torch.zeros(c, d, dtype=torch.float64)
    cnt = torch.zeros(c, dtype=torch.float64)
    vectors = vectors.to(torch.float64)
    for _ in range(passes):
        for i in range(n):
            m = valid[i]
            if not bool(m.any()):
                continue
            obj[m] = (obj[m] * cnt[m, None] + vectors[i, m]) / (cnt[m, None] + 1)
            cnt[m] = torch.clamp(cnt[m] + 1, max=float(cap))
    return obj, cnt


def run(cfg: PrototypesConfig, out: Path) -> dict:
    """Compute the prototypes of ``cfg.checkpoint`` on ``cfg.data`` into ``out``; returns the summary."""
    with inference.session(cfg.device) as info:
        setup = inference.prepare_run(cfg, info)
        n_class = setup.model_config.n_class
        dev = info.device
        dim = None
        sums = pixel_counts = image_counts = vectors = valid = None
        n_images = len(setup.split)
        for batch in inference.iter_batches(setup.split, setup.indices, cfg, dev, "prototypes",
                                            show_progress=info.is_main):
            res = inference.forward(setup.model, batch.images, cfg.amp)
            with torch.inference_mode():
                preds = res["out"].argmax(1)
                feats = res["feat"]
                if dim is None:
                    dim = feats.shape[1]
                    sums = torch.zeros(n_class, dim, dtype=torch.float64, device=dev)
                    pixel_counts = torch.zeros(n_class, dtype=torch.int64, device=dev)
                    image_counts = torch.zeros(n_class, dtype=torch.int64, device=dev)
                    if cfg.mode == "image_mean":  # on the device: read once, at the end
                        vectors = torch.zeros(n_images, n_class, dim, dtype=torch.float32, device=dev)
                        valid = torch.zeros(n_images, n_class, dtype=torch.int64, device=dev)
                for i, feat, pred in zip(batch.indices, feats, preds):
                    s, c = class_sums(feat, pred, n_class)
                    sums += s.double()
                    pixel_counts += c
                    ok = c >= cfg.min_pixels
                    image_counts += ok.long()
                    if vectors is not None:
                        vectors[i] = s / c.clamp_min(1)[:, None].to(s.dtype)
                        valid[i] = ok.long()
        # ranks with no image still take part in the reductions
        if dim is None:
            dim = setup.model_config.head_channels
            sums = torch.zeros(n_class, dim, dtype=torch.float64, device=dev)
            pixel_counts = torch.zeros(n_class, dtype=torch.int64, device=dev)
            image_counts = torch.zeros(n_class, dtype=torch.int64, device=dev)
            if cfg.mode == "image_mean":
                vectors = torch.zeros(n_images, n_class, dim, dtype=torch.float32, device=dev)
                valid = torch.zeros(n_images, n_class, dtype=torch.int64, device=dev)
        for t in (sums, pixel_counts, image_counts):
            inference.all_reduce_(t, info)
        sums, pixel_counts, image_counts = sums.cpu(), pixel_counts.cpu(), image_counts.cpu()
        if cfg.mode == "pixel":
            protos = (sums / pixel_counts.clamp_min(1)[:, None].double()).float()
            counts = pixel_counts
        else:
            inference.all_reduce_(vectors, info)
            inference.all_reduce_(valid, info)
            obj, _ = running_mean(vectors.cpu(), valid.cpu().bool(), cfg.cap, cfg.passes)
            protos = obj.float()
            counts = image_counts
        classes = list(setup.split.classes)
        never = [classes[k] for k in range(n_class) if int(counts[k]) == 0]
        summary = {
            "mode": cfg.mode, "n_class": n_class, "feature_dim": int(dim), "classes": classes,
            "counts": [int(v) for v in counts], "pixel_counts": [int(v) for v in pixel_counts],
            "image_counts": [int(v) for v in image_counts], "never_predicted": never,
            "norms": [round(float(v), 6) for v in protos.norm(dim=1)],
            "min_pixels": cfg.min_pixels if cfg.mode == "image_mean" else None,
            "cap": cfg.cap if cfg.mode == "image_mean" else None,
            "passes": cfg.passes if cfg.mode == "image_mean" else None,
            "n_images": n_images, "normalized": False,
            "checkpoint": str(Path(cfg.checkpoint).absolute()),
            "iteration": int(setup.checkpoint.get("iteration", 0)), "data": str(setup.split.root),
        }
        with inference.staged_dir(out, info, "prototypes") as tmp:
            if info.is_main:
                torch.save({"prototypes": protos.contiguous(), "counts": counts.to(torch.int64),
                            "pixel_counts": pixel_counts, "image_counts": image_counts,
                            "mode": cfg.mode, "classes": classes, "normalized": False}, tmp / "prototypes.pt")
                inference.write_json(tmp / "prototypes.json", summary)
        if never and info.is_main:
            print(f"cpsl prototypes: {len(never)} class(es) never predicted (zero prototype, count 0): "
                  f"{', '.join(never)}", file=sys.stderr)
    return summary
