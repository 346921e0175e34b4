"""Validation during training: an mIoU curve per stage and the best model so far (``eval_interval``).

Every ``eval_interval`` iterations, and at ``max_iters``, the loop (``cpsl.train.loop``) calls ``Validator.run``:

* the student, and the EMA teacher where the stage has one (stage 1's ``ema_model``), are evaluated in eval
  mode on ``eval_data`` (the target val split in the workflow), or on ``eval_images`` of its images spread evenly
  over the split (a fixed subset: images ``i * n // eval_images``). The evaluation is ``cpsl evaluate``'s own
  (``cpsl.steps.evaluate.confusion``, the same protocol and the same sharding: under DDP each rank takes every
  ``world_size``-th image of the subset and the confusion matrices are summed), without a second evaluator;
* one line goes into ``metrics.jsonl``: ``iteration``, ``val/student`` (mIoU, percent), ``val/teacher`` (stage
  1), ``val_iou/<class>`` (the student's per-class IoU, null for a class absent from labels and predictions),
  ``val_best`` and ``val_best_iteration`` (the best student so far), ``val_images``, ``val_pixels`` (the
  labelled pixels counted, over all processes), ``val_time_s``;
* when the student's mIoU is at least the best so far (``>=``: a later equal score wins, as in the reference),
  ``checkpoints/best.pt`` is written (rank 0, atomically): the networks only, like ``checkpoint.pt``, with
  ``iteration`` = that iteration and ``extra.validation`` = the score. ``cpsl evaluate`` with ``selection:
  best_on_val`` evaluates it (``metrics_best.json``).

The best score and iteration are part of the resumable state (``extra.validation`` in ``checkpoints/last.pt``),
so a run killed between two validations resumes with the same best; the validations it repeats after the resume
give the same scores and rewrite ``best.pt`` with the same weights. The evaluation changes no training state: the
RNG states are restored afterwards (the evaluation's DataLoader draws a seed from torch's generator) and the
networks go back to train mode, so the trained weights equal those of a run without validation.
A fresh run (not a resumption) first removes a ``best.pt`` that an earlier run in the same folder left.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import torch

from cpsl import inference
from cpsl.config import EvaluateConfig, TrainConfig, to_dict
from cpsl.errors import DataError
from cpsl.metrics import ConfusionMatrix
from cpsl.models.checkpoint import capture_rng_state, make_checkpoint, restore_rng_state, save_checkpoint
from cpsl.train import dist as D

BEST = Path("checkpoints") / "best.pt"
STATE_KEY = "validation"   # in the checkpoints' ``extra``: {"best_miou", "best_iteration"}


def subset(n: int, count: int) -> list[int]:
    """``count`` indices of ``0..n-1`` spread evenly over the split (``i * n // count``), all of them when
    ``count`` is 0 or at least ``n``."""
    if count <= 0 or count >= n:
        return list(range(n))
    return [i * n // count for i in range(count)]


class Validator:
    """The validation of one training run (every rank builds one; rank 0 writes)."""

    def __init__(self, cfg: TrainConfig, info: D.DistInfo, out: Path, state: dict[str, Any] | None) -> None:
        self.cfg, self.info, self.out = cfg, info, out
        self.enabled = cfg.eval_interval > 0
        saved = ((state or {}).get("extra") or {}).get(STATE_KEY) or {}
        self.best = saved.get("best_miou")
        self.best_iteration = saved.get("best_iteration")
        if state is None and info.is_main and (out / BEST).is_file():
            # an earlier run's best model, not this run's (is_file: a `checkpoints` that is not a folder is left
            # for the first checkpoint save to report, on every rank at once)
            (out / BEST).unlink()
        if not self.enabled:
            return
        self.split = inference.open_split(cfg.eval_data, "eval_data")
        if self.split.n_class != cfg.model.n_class:
            raise DataError(f"eval_data: {self.split.root / 'meta.json'} has {self.split.n_class} classes, "
                            f"model.n_class is {cfg.model.n_class}")
        self.split.require_labels("eval_data", "validation during training (eval_interval)")
        chosen = subset(len(self.split), cfg.eval_images)
        self.n_images = len(chosen)
        self.indices = [chosen[i] for i in inference.shard_indices(len(chosen), info.rank, info.world_size)]
        amp = cfg.amp == "bf16" or (cfg.amp == "fp16" and info.device.type == "cuda")
        self.eval_cfg = EvaluateConfig(checkpoint=out / BEST, data=Path(cfg.eval_data), device=cfg.device,
                                       batch_size=cfg.eval_batch_size, workers=cfg.eval_workers, amp=amp,
                                       progress=False, samples=0, stage=cfg.stage, experiment=cfg.experiment,
                                       seed=cfg.seed)

    @staticmethod
    def describe(record: dict[str, Any]) -> str:
        """The log line of a validation record."""
        text = f"iteration {record['iteration']}: validation mIoU {record['val/student']:.2f}"
        if "val/teacher" in record:
            text += f" (teacher {record['val/teacher']:.2f})"
        if record["val_best"] is not None:
            text += f", best {record['val_best']:.2f} at iteration {record['val_best_iteration']}"
        return text + f" ({record['val_images']} images, {record['val_time_s']:.1f} s)"

    def due(self, done: int) -> bool:
        return self.enabled and (done % self.cfg.eval_interval == 0 or done == self.cfg.max_iters)

    def state(self) -> dict[str, Any]:
        """The entry of ``extra`` in the resumable checkpoint."""
        return {STATE_KEY: {"best_miou": self.best, "best_iteration": self.best_iteration}}

    def _miou(self, model: torch.nn.Module) -> tuple[float, dict[str, float | None], int]:
        setup = inference.Setup(self.info, self.split, self.indices, model, self.cfg.model, {})
        from cpsl.steps.evaluate import confusion

        hist = confusion(self.eval_cfg, setup)
        cm = ConfusionMatrix(self.cfg.model.n_class)
        cm.merge(hist)
        summary = cm.summary(self.split.classes)
        return float(summary["miou"]), summary["per_class"], int(hist.sum())

    def run(self, method: Any, done: int, on_main: Callable[[str, Callable[[], None]], None]) -> dict[str, Any]:
        """Evaluate at iteration ``done`` (every rank: the evaluation is sharded), keep ``best.pt`` and return the
        metrics.jsonl record. ``on_main(what, write)`` runs ``write`` on rank 0 and reports failures to every rank
        (``cpsl.train.loop._on_main_rank``)."""
        t0 = time.perf_counter()
        rng = capture_rng_state()
        nets = {"student": method.student}
        if "ema_model" in method.nets:
            nets["teacher"] = method.nets["ema_model"]
        modes = {name: net.training for name, net in nets.items()}
        scores: dict[str, float] = {}
        per_class: dict[str, float | None] = {}
        pixels = 0
        try:
            for name, net in nets.items():
                net.eval()
                scores[name], classes, counted = self._miou(net)
                if name == "student":
                    per_class, pixels = classes, counted
        finally:
            for name, net in nets.items():
                net.train(modes[name])
            restore_rng_state(rng)
        miou = scores["student"]
        finite = all(bool(torch.isfinite(v).all()) for v in method.student.state_dict().values()
                     if torch.is_tensor(v) and v.is_floating_point())
        if finite and (self.best is None or miou >= self.best):
            self.best, self.best_iteration = miou, done
            entry = {"miou": miou, "iteration": done, "n_images": self.n_images, "data": str(self.cfg.eval_data)}
            on_main(f"writing {self.out / BEST}", lambda: save_checkpoint(self.out / BEST, make_checkpoint(
                method.student, self.cfg.model, iteration=done, config=to_dict(self.cfg), seed=self.cfg.seed,
                rng=capture_rng_state(), extra={"stage": self.cfg.stage, **method.describe(), STATE_KEY: entry},
                **{k: v for k, v in method.state_dict(full=False).items() if k != "model"})))
        record: dict[str, Any] = {"iteration": done, **{f"val/{k}": v for k, v in scores.items()},
                                  **{f"val_iou/{k}": v for k, v in per_class.items()},
                                  "val_best": self.best, "val_best_iteration": self.best_iteration,
                                  "val_images": self.n_images, "val_pixels": pixels,
                                  "val_time_s": time.perf_counter() - t0}
        return record
