"""``cpsl class-dist``: the predicted class marginal over the target train split (spec 3.4).

Eval mode, full-size input, at the model's output resolution (stride 8): ``counts[k] = #(argmax == k)`` summed
over images (and ranks), ``distribution = counts / counts.sum()`` in float64 (the reference's shipped
``Pseudo/class_distribution.npy`` was made exactly this way).

Output folder (replaced as a whole on success)::

    class_distribution.npy    float64 (n_class,), sums to 1
    class_distribution.json   classes, counts, distribution, never_predicted, pixels, n_images, checkpoint

A class that is never predicted gets probability 0; it is listed in ``never_predicted`` (and on stderr), since
the stage-1 Sinkhorn marginal then gives that class no mass.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import torch

from cpsl import inference
from cpsl.config import ClassDistConfig


def run(cfg: ClassDistConfig, out: Path) -> dict:
    """Count the argmax classes of ``cfg.checkpoint`` on ``cfg.data``; write the distribution into ``out``."""
    with inference.session(cfg.device) as info:
        setup = inference.prepare_run(cfg, info)
        n_class = setup.model_config.n_class
        counts = torch.zeros(n_class, dtype=torch.int64, device=info.device)
        for batch in inference.iter_batches(setup.split, setup.indices, cfg, info.device, "class-dist",
                                            show_progress=info.is_main):
            logits = inference.forward(setup.model, batch.images, cfg.amp)["out"]
            with torch.inference_mode():
                counts += inference.count_ids(logits.argmax(1), n_class)
        inference.all_reduce_(counts, info)
        counts_np = counts.cpu().numpy().astype(np.int64)
        total = int(counts_np.sum())
        dist = counts_np.astype(np.float64) / total
        classes = list(setup.split.classes)
        never = [classes[k] for k in range(n_class) if counts_np[k] == 0]
        summary = {
            "classes": classes, "counts": [int(v) for v in counts_np],
            "distribution": {c: float(v) for c, v in zip(classes, dist)},
            "never_predicted": never, "pixels": total, "n_images": len(setup.split),
            "checkpoint": str(Path(cfg.checkpoint).absolute()),
            "iteration": int(setup.checkpoint.get("iteration", 0)), "data": str(setup.split.root),
        }
        with inference.staged_dir(out, info, "class-dist") as tmp:
            if info.is_main:
                buf = io.BytesIO()
                np.save(buf, dist)
                (tmp / "class_distribution.npy").write_bytes(buf.getvalue())
                inference.write_json(tmp / "class_distribution.json", summary)
        if never and info.is_main:
            print(f"cpsl class-dist: {len(never)} class(es) never predicted (probability 0): {', '.join(never)}",
                  file=sys.stderr)
    return summary
