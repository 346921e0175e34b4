"""Supervised training on one labelled domain: ``source_only`` (source labels) and ``oracle`` (target labels).

Loss: pixel cross-entropy of the weak-augmented crop, logits upsampled bilinearly (``align_corners=True``) to
the crop, label 255 ignored (the reference's ``loss_src`` without the adversarial term). With ``accumulate: k``
the mean is over the valid pixels of the step's k micro-batches (exactly the loss of one k times larger batch).
"""

from __future__ import annotations

from typing import Any

from cpsl.methods.base import Method, Micro
from cpsl.methods.losses import seg_cross_entropy, upsample


class SourceOnly(Method):
    """Cross-entropy on the labelled crops of ``domain`` (the source)."""

    name = "source_only"
    domain = "source"

    def __init__(self, cfg, ctx) -> None:
        super().__init__(cfg, ctx)
        self.domains = {self.domain: {"label": True}}

    def forward_backward(self, batch: dict[str, dict[str, Any]], micro: Micro) -> dict[str, Any]:
        b = batch[self.domain]
        with self.amp.autocast():
            logits = upsample(self.net(b["image"])["out"], b["label"].shape[-2:])
            loss = seg_cross_entropy(logits, b["label"], count=micro.count_for(f"label/{self.domain}"))
        self.amp.backward(loss)
        return {f"ce_{self.domain}": loss.detach()}


class Oracle(SourceOnly):
    """The same loss on the target train split's labels: the supervised upper bound."""

    name = "oracle"
    domain = "target"
