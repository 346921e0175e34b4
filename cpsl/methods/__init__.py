"""Training methods, one per stage: each builds its state and does one iteration in ``step(batch)``.

``METHODS`` maps a ``TrainConfig.stage`` to its class; ``build_method(cfg, ctx)`` instantiates it.
"""

from __future__ import annotations

from cpsl.config import TrainConfig
from cpsl.errors import ConfigError
from cpsl.methods.base import Amp, Method, TrainContext
from cpsl.methods.source_only import Oracle, SourceOnly
from cpsl.methods.warmup import Warmup

METHODS: dict[str, type[Method]] = {"source_only": SourceOnly, "oracle": Oracle, "warmup": Warmup}

__all__ = ["METHODS", "Amp", "Method", "Oracle", "SourceOnly", "TrainContext", "Warmup", "build_method"]


def build_method(cfg: TrainConfig, ctx: TrainContext) -> Method:
    """The method of ``cfg.stage``, with its networks, optimizers and schedulers built on ``ctx.device``."""
    try:
        cls = METHODS[cfg.stage]
    except KeyError:
        raise ConfigError(f"stage: no training method for {cfg.stage!r} (known: {', '.join(METHODS)})") from None
    return cls(cfg, ctx)
