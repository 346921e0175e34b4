"""Predicted class shares on the target batch, and the collapse warning (#27).

A stage with a teacher (stage 1: the rectified pseudo labels; stages 2 and 3: the teacher network) counts, per
iteration and on the device (no host sync), how many target pixels the student's argmax and the teacher put in
each class. At each logged iteration the counts since the last log line become shares (summed over the ranks),
which go into ``metrics.jsonl`` beside the reference shares (stage 1: the Sinkhorn class marginal; stages 2 and
3: the warm-up's class marginal when the workflow passes it, ``distill.class_dist``, else none)::

    share/student/<k>, share/teacher/<k>, share/marginal/<k>     k = train id, shares in [0, 1]

into the progress line in compact form (the class farthest from the reference, ``c1 s.36 t.30 m.19``), and into
a warning (stderr, rank 0) when the student's share of a class stays away from the reference for
``train.share_drift_logs`` logged iterations in a row. The reference is the marginal where there is one, else the
teacher's shares of the same window. "Away" is either of:

- more than ``train.share_drift`` apart (absolute, default 0.10): a class taking over, or a large class shrinking;
- below the reference divided by ``train.share_drift_ratio`` (default 3; 0: off) for a class the reference gives
  at least ``share_drift / 2`` (5%): a minority class the student all but drops. A 15% class predicted on 4% of
  the pixels is 0.11 apart, one at 12% predicted on 3% only 0.09: the absolute distance misses the second, and
  more so the fewer pixels a class has, while most of a small class's IoU is gone. The floor keeps the ratio
  away from Cityscapes' rare classes (train, motorcycle: under 1% of the pixels), whose shares are noisy.

The warning is printed once when that happens, and again only if it persists: after 2, 4, 8, ... times as many
logged iterations; a class that comes back within the distance starts over.
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor

from cpsl.train.dist import all_reduce_sum


def class_map(logits: Tensor) -> Tensor:
    """(B, K, h, w) scores -> (B, h, w) long: the index of each pixel's largest score, the first on a tie (what
    ``argmax(1)`` gives). ``max(1).indices`` computes it 2.5x faster on the CPU for the (4, 19, 96, 192) logits
    of a demo batch (5 against 13 ms, one thread; ``benchmarks/README.md``, "Where the demo's time goes")."""
    return logits.max(1).indices


def class_counts(pred: Tensor, valid: Tensor, n_class: int) -> Tensor:
    """(n_class,) float64: the number of ``valid`` pixels of each class in ``pred`` (B, h, w) long; computed on
    the device with ``scatter_add`` (no host sync, unlike boolean indexing or ``bincount``)."""
    out = torch.zeros(n_class, dtype=torch.float64, device=pred.device)
    return out.scatter_add_(0, pred.reshape(-1).clamp(0, n_class - 1), valid.reshape(-1).to(torch.float64))


def shares_of(counts: Tensor) -> Tensor:
    """Counts -> shares (sum 1); all zeros when nothing was counted."""
    return counts / counts.sum().clamp(min=1.0)


class ShareMonitor:
    """Accumulates the student's and the teacher's class counts between log lines; ``log(done)`` returns the
    metrics.jsonl entries and the progress text and prints the collapse warning (see the module docstring)."""

    def __init__(self, stage: str, n_class: int, marginal: Tensor | None, drift: float, drift_logs: int,
                 device: torch.device | str = "cpu", is_main: bool = True, drift_ratio: float = 3.0) -> None:
        self.stage, self.n_class, self.is_main = stage, n_class, is_main
        self.drift, self.drift_logs, self.drift_ratio = drift, drift_logs, drift_ratio
        self.marginal = None if marginal is None else [float(v) for v in (marginal / marginal.sum()).tolist()]
        self.counts = torch.zeros(2, n_class, dtype=torch.float64, device=device)
        self.streak = [0] * n_class           # logged iterations in a row with the class beyond the distance
        self.since = [0] * n_class            # the iteration where the current streak began
        self.next_warn = [drift_logs] * n_class

    def state_dict(self) -> dict:
        """The open window's counts (CPU) and the warning's counters: what a resumed run needs to log and warn
        as the uninterrupted run does."""
        return {"counts": self.counts.detach().cpu().clone(), "streak": list(self.streak),
                "since": list(self.since), "next_warn": list(self.next_warn)}

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict``; ValueError when it is for another number of classes."""
        counts = state["counts"]
        lists = [state[k] for k in ("streak", "since", "next_warn")]
        if tuple(counts.shape) != tuple(self.counts.shape) or any(len(v) != self.n_class for v in lists):
            raise ValueError(f"class shares state for {counts.shape[-1]} classes, the model has {self.n_class}")
        self.counts.copy_(counts.to(self.counts.device, self.counts.dtype))
        self.streak, self.since, self.next_warn = ([int(x) for x in v] for v in lists)

    def add(self, student_pred: Tensor, teacher_pred: Tensor, valid: Tensor) -> None:
        """Count one batch: argmax maps (B, h, w) of the student and the teacher, ``valid`` (B, h, w) bool."""
        self.counts[0] += class_counts(student_pred, valid, self.n_class)
        self.counts[1] += class_counts(teacher_pred, valid, self.n_class)

    def log(self, done: int) -> tuple[dict[str, float], str]:
        """(metrics.jsonl entries, progress text) of the window ending at iteration ``done``; resets the window.
        Every rank must call it (the counts are summed over the ranks)."""
        counts = all_reduce_sum(self.counts.clone())
        student, teacher = (shares_of(c).tolist() for c in counts)
        self.counts.zero_()
        if counts[0].sum() <= 0:
            return {}, ""
        record = {f"share/student/{k}": student[k] for k in range(self.n_class)}
        record.update({f"share/teacher/{k}": teacher[k] for k in range(self.n_class)})
        if self.marginal is not None:
            record.update({f"share/marginal/{k}": self.marginal[k] for k in range(self.n_class)})
        ref = self.marginal if self.marginal is not None else teacher
        gaps = [student[k] - ref[k] for k in range(self.n_class)]
        k = max(range(self.n_class), key=lambda c: abs(gaps[c]))
        text = f"c{k} s{_short(student[k])} t{_short(teacher[k])}"
        if self.marginal is not None:
            text += f" m{_short(self.marginal[k])}"
        self._check(done, student, ref)
        return record, text

    def _away(self, student: float, ref: float) -> str | None:
        """Why ``student`` is away from ``ref`` (the module docstring), or None."""
        if abs(student - ref) > self.drift:
            return f"more than train.share_drift = {self.drift:g} apart"
        if self.drift_ratio > 0 and ref >= self.drift / 2 and student < ref / self.drift_ratio:
            return f"less than 1/{self.drift_ratio:g} of it: train.share_drift_ratio = {self.drift_ratio:g}"
        return None

    def _check(self, done: int, student: list[float], ref: list[float]) -> None:
        what = "the class marginal" if self.marginal is not None else "the teacher's share"
        for k in range(self.n_class):
            why = self._away(student[k], ref[k])
            if why is None:
                self.streak[k], self.next_warn[k] = 0, self.drift_logs
                continue
            if self.streak[k] == 0:
                self.since[k] = done
            self.streak[k] += 1
            if self.streak[k] == self.next_warn[k]:
                self.next_warn[k] *= 2
                if self.is_main:
                    print(f"cpsl train: {self.stage}: warning: the student predicts class {k} on "
                          f"{student[k]:.1%} of the target pixels against {ref[k]:.1%} for {what} ({why}) at "
                          f"the last {self.streak[k]} logged iterations (since iteration {self.since[k]}): a "
                          f"collapse toward a fixed class share? (README, own pairs)", file=sys.stderr, flush=True)


def _short(share: float) -> str:
    """A share in two digits without the leading zero: 0.364 -> '.36', 1.0 -> '1.0'."""
    return "1.0" if share >= 0.995 else f"{share:.2f}"[1:]
