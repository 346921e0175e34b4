"""Warm-up (spec 3.0, the reference ``CustomModel.step_adv``): source CE + output-space adversarial training.

One iteration:

1. Generator step, discriminator frozen (no gradient reaches it):
   ``ce = CE(up(G(xs)), ys)`` and ``adv = GAN(D(softmax(up(G(xt)))), source label 0)``;
   backward ``ce + adv_weight * adv``; SGD step on G.
2. Discriminator step: ``disc = GAN(D(softmax(ps.detach())), 0) + GAN(D(softmax(pt.detach())), 1)``;
   backward; Adam step on D.

``up`` is the bilinear (align_corners=True) upsampling to the crop. GAN is LS (MSE, default) or vanilla (BCE
with logits). The D optimizer is Adam(disc_lr, disc_betas) with the same poly schedule as G. The reference
runs this with ``--freeze_bn`` (``freeze_bn: true`` in the config). With ``accumulate: k`` both backward passes
run per micro-batch and both optimizer steps once per iteration (``forward_backward``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from cpsl.methods.base import Method, Micro, scaled, set_requires_grad
from cpsl.methods.losses import SOURCE_LABEL, TARGET_LABEL, gan_loss, seg_cross_entropy, upsample
from cpsl.models import build_discriminator, place
from cpsl.train.optim import poly_scheduler


class Warmup(Method):
    """Source CE + LS-GAN (or vanilla GAN) on the softmax outputs, with the reference FCDiscriminator."""

    name = "warmup"

    def __init__(self, cfg, ctx) -> None:
        super().__init__(cfg, ctx)
        self.domains = {"source": {"label": True}, "target": {"label": False}}
        w = cfg.warmup
        self.disc = place(build_discriminator(cfg.model.n_class, w.disc_width), ctx.device, cfg.channels_last)
        self.disc_net = ctx.wrap(self.disc)
        self.disc_optimizer = torch.optim.Adam([{"name": "disc", "params": list(self.disc.parameters())}],
                                               lr=w.disc_lr, betas=(w.disc_betas[0], w.disc_betas[1]))
        self.nets["discriminator"] = self.disc
        self.optimizers["disc_optimizer"] = self.disc_optimizer
        self.schedulers["discriminator"] = poly_scheduler(self.disc_optimizer, cfg.max_iters,
                                                          cfg.optim.poly_power)

    def generator_losses(self, batch: dict[str, dict[str, Any]], micro: Micro | None = None
                         ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """Step-1 losses ``{"ce_source", "adv"}`` and the upsampled source / target logits.

        The discriminator is called as the plain module with its parameters frozen, so the adversarial
        gradient reaches the generator only. ``micro``: the source CE's mean is over the step's valid pixels.
        """
        src, tgt = batch["source"], batch["target"]
        size = src["label"].shape[-2:]
        set_requires_grad(self.disc, False)
        count = None if micro is None else micro.count_for("label/source")
        with self.amp.autocast():
            ps = upsample(self.net(src["image"])["out"], size)
            ce = seg_cross_entropy(ps, src["label"], count=count)
            pt = upsample(self.net(tgt["image"])["out"], tgt["image"].shape[-2:])
            adv = gan_loss(self.disc(F.softmax(pt, dim=1)), SOURCE_LABEL, self.cfg.warmup.gan)
        return {"ce_source": ce, "adv": adv}, ps, pt

    def discriminator_loss(self, ps: torch.Tensor, pt: torch.Tensor) -> torch.Tensor:
        """Step-2 loss on detached outputs; one forward over both domains (D has no batch statistics)."""
        set_requires_grad(self.disc, True)
        n = ps.shape[0]
        with self.amp.autocast():
            d_in = torch.cat([F.softmax(ps.detach(), dim=1), F.softmax(pt.detach(), dim=1)])
            d_out = self.disc_net(d_in)
            kind = self.cfg.warmup.gan
            return gan_loss(d_out[:n], SOURCE_LABEL, kind) + gan_loss(d_out[n:], TARGET_LABEL, kind)

    def forward_backward(self, batch: dict[str, dict[str, Any]], micro: Micro) -> dict[str, Any]:
        """Both steps' backward passes for one micro-batch. D's loss reads G's outputs of this micro-batch before
        G's update, and G's update does not change D, so computing it here, before the optimizer steps, gives
        the gradients of the sequential G-then-D iteration. The GAN terms are means over the micro-batch's
        discriminator outputs (the same size for every micro-batch): scaled by 1/k."""
        losses, ps, pt = self.generator_losses(batch, micro)
        adv = scaled(losses["adv"], micro.scale)
        self.amp.backward(losses["ce_source"] + self.cfg.warmup.adv_weight * adv)
        disc = scaled(self.discriminator_loss(ps, pt), micro.scale)
        self.amp.backward(disc)
        return {"ce_source": losses["ce_source"].detach(), "adv": adv.detach(), "disc": disc.detach()}

    def optimizer_step(self) -> None:
        self.amp.step(self.optimizer)
        self.amp.step(self.disc_optimizer)
