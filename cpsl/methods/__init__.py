"""Training methods, one per stage: each builds its state and does one iteration in ``step(batch)``.

``METHODS`` maps a ``TrainConfig.stage`` to its class; ``build_method(cfg, ctx)`` instantiates it.
"""

from __future__ import annotations

from cpsl.config import TrainConfig
from cpsl.errors import ConfigError
from cpsl.methods.base import Amp, Method, TrainContext
from cpsl.methods.source_only import Oracle, SourceOnly
from cpsl.methods.warmup import Warmup
from cpsl.methods.selflabel import SelfLabel
from cpsl.methods.distill import Stage2, Stage3

METHODS: dict[str, type[Method]] = {"source_only": SourceOnly, "oracle": Oracle, "warmup": Warmup,
                                     "stage1": SelfLabel, "stage2": Stage2, "stage3": Stage3}

__all__ = ["METHODS", "Amp", "Method", "Oracle", "SelfLabel", "SourceOnly", "Stage2", "Stage3", "TrainContext", "Warmup",
           "build_method"]


def build_method(cfg: TrainConfig, ctx: TrainContext) -> Method:
    """The method of ``cfg.stage``, with its networks, optimizers and schedulers built on ``ctx.device``."""
    try:
        cls = METHODS[cfg.stage]
    except KeyError:
        raise ConfigError(f"stage: no training method for {cfg.stage!r} (known: {', '.join(METHODS)})") from None
    return cls(cfg, ctx)
