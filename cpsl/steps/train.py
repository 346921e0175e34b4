"""``cpsl train``: one training stage (``source_only``, ``warmup``, ``oracle``; the stage is in the config).

    python -m cpsl train --config FILE --out DIR                                  # CPU or one GPU
    torchrun --standalone --nproc_per_node N -m cpsl train --config FILE --out DIR   # DDP

Writes ``DIR/checkpoint.pt`` (final model), ``DIR/metrics.jsonl``, ``DIR/train_summary.json`` and, while
running, ``DIR/checkpoints/last.pt``; a rerun after a kill resumes from it. See ``cpsl.train.loop``.
"""

from __future__ import annotations

from pathlib import Path

from cpsl.config import TrainConfig
from cpsl.train.loop import train


def run(cfg: TrainConfig, out: str | Path) -> dict:
    """Train ``cfg.stage`` into ``out`` (every torchrun rank calls this; only rank 0 writes files)."""
    return train(cfg, Path(out))
