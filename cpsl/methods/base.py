"""What every training method shares: the run context (device, processes, AMP), the student, the interface.

A method owns its networks, optimizers and schedulers and does a whole iteration (one optimizer step) in
``step(batches)``: the forward and backward passes of each of the ``accumulate`` micro-batches
(``forward_backward``), then the optimizer steps (``optimizer_step``: one or several), returning the loss values
as detached 0-d tensors on the device (the loop reads them on the host only when it logs; plain numbers for
host-side flags).
The loop (``cpsl.train.loop``) steps the schedulers, logs, checks for NaN and checkpoints. ``state_dict`` /
``load_state_dict`` give the checkpoint entries (cpsl.models.checkpoint keys: ``model``, ``optimizer``,
``scheduler``, ``discriminator``, ``disc_optimizer``, ...).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from cpsl.config import TrainConfig
from cpsl.errors import CheckpointError
from cpsl.labels import IGNORE_INDEX
from cpsl.models import build_model, convert_sync_bn, freeze_bn, place
from cpsl.methods.shares import ShareMonitor
from cpsl.models.checkpoint import check_model_fits, load_checkpoint, load_model_state
from cpsl.train.dist import DistInfo
from cpsl.train.optim import build_optimizer, build_scheduler


class Amp:
    """Mixed precision: ``off`` | ``bf16`` | ``fp16`` (fp16 with a GradScaler). bf16 autocasts on CUDA and on the
    CPU alike (the same operations run in bf16 on both: convolutions and matrix products; softmax, losses and
    reductions in float32; float32 master weights), so CPU runs and tests go through the regions a GPU run uses;
    fp16 applies on CUDA only.

    Methods run forward passes under ``autocast()``, call ``backward(loss)`` and ``step(optimizer)``; the loop
    calls ``update()`` once per iteration.
    """

    def __init__(self, mode: str, device: torch.device) -> None:
        self.mode = mode
        self.device = device
        self.enabled = mode == "bf16" or (mode == "fp16" and device.type == "cuda")
        self.dtype = torch.bfloat16 if mode == "bf16" else torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.enabled and mode == "fp16")

    def autocast(self) -> contextlib.AbstractContextManager:
        if not self.enabled:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        self.scaler.step(optimizer)

    def update(self) -> None:
        self.scaler.update()

    def state_dict(self) -> dict[str, Any]:
        return self.scaler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state and self.scaler.is_enabled():
            self.scaler.load_state_dict(state)


@dataclass
class Micro:
    """Where a forward/backward pass sits in its optimizer step (``accumulate: k``): micro-batch ``index`` of
    ``count``, and ``counts``, this rank's valid-pixel counts over the whole step by name (``Method.step_counts``;
    empty when ``count`` is 1), so that a pixel mean is taken over the step's pixels, as one batch of k times the
    size would take it."""

    index: int = 0
    count: int = 1
    counts: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def last(self) -> bool:
        """The step's last micro-batch: its backward pass all-reduces the accumulated gradients under DDP."""
        return self.index == self.count - 1

    @property
    def scale(self) -> float:
        """The factor of a loss that is a mean over the micro-batch's images (or pixels, see ``count_for``)."""
        return 1.0 / self.count

    def count_for(self, name: str) -> torch.Tensor | None:
        """The step's count ``name`` to divide a pixel sum by (None: the micro-batch's own count, k = 1)."""
        return self.counts.get(name)


def scaled(loss: torch.Tensor, factor: float) -> torch.Tensor:
    """``factor * loss``; ``loss`` itself for 1 (so runs without accumulation compute exactly what they did)."""
    return loss if factor == 1.0 else loss * factor


@dataclass
class TrainContext:
    """Where and how a method runs: the device, the process group (``DistInfo``) and the AMP helper."""

    device: torch.device
    dist: DistInfo
    amp: Amp

    def wrap(self, module: nn.Module) -> nn.Module:
        """``module`` wrapped in DistributedDataParallel under torchrun (world size > 1); else itself. With
        SyncBatchNorm the BatchNorm statistics are the same on every rank already, so DDP does not broadcast
        rank 0's buffers before every forward pass (``forward_sync_buffers=False``, torch's new name for
        ``broadcast_buffers=False``; the buffers are still synced once, when wrapping)."""
        if not self.dist.distributed:
            return module
        ids = [self.device.index] if self.device.type == "cuda" else None
        sync_bn = any(isinstance(m, nn.SyncBatchNorm) for m in module.modules())
        extra = {"forward_sync_buffers": False} if sync_bn else {}
        return nn.parallel.DistributedDataParallel(module, device_ids=ids, **extra)


def build_student(cfg: TrainConfig, ctx: TrainContext) -> nn.Module:
    """The segmentation network: ``model.init`` weights or ``init_checkpoint``, SyncBN under multi-GPU DDP
    (``model.sync_bn``), frozen BatchNorm when ``freeze_bn``, on the run's device (``place``: the
    ``channels_last`` setting)."""
    # with init_checkpoint, model.init (set for the whole experiment, e.g. the presets' ImageNet file) is not
    # read: the checkpoint replaces every weight
    model = build_model(cfg.model if cfg.init_checkpoint is None else dataclasses.replace(cfg.model, init=None))
    report = model.init_report
    if cfg.init_checkpoint is not None:
        state = load_checkpoint(cfg.init_checkpoint)
        check_model_fits(state, cfg.model, cfg.init_checkpoint)
        load_model_state(model, state["model"], cfg.init_checkpoint)
    if ctx.device.type == "cuda" and ctx.dist.distributed and cfg.model.sync_bn:
        model = convert_sync_bn(model)
    if cfg.freeze_bn:
        freeze_bn(model)
    model = place(model, ctx.device, cfg.channels_last)
    model.init_report = report  # what model.init loaded (``train_summary.json``), kept across a SyncBN conversion
    return model


def student_init(cfg: TrainConfig) -> str:
    """Where the student's initial weights came from, for the summary and the results table:
    ``checkpoint:<path>`` (``init_checkpoint``, which overrides ``model.init``), ``simclr:<path>`` /
    ``imagenet:<path>`` / ``backbone:<path>`` (``model.init`` in the simclr / torchvision / checkpoint format:
    the last is another run's checkpoint without its classifier) or ``random``."""
    if cfg.init_checkpoint is not None:
        return f"checkpoint:{cfg.init_checkpoint}"
    if cfg.model.init_file is not None:
        kind = {"simclr": "simclr", "checkpoint": "backbone"}.get(cfg.model.init_format, "imagenet")
        return f"{kind}:{cfg.model.init_file}"
    return "random"


def set_requires_grad(module: nn.Module, flag: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(flag)


class Method:
    """Base class: the student with its SGD optimizer and poly schedule, and the checkpoint plumbing.

    Subclasses set ``domains`` (the training datasets they need: ``{"source": {"label": True}, ...}``, values
    are ``cpsl.train.data.TrainDataset`` keyword arguments) and implement ``step``. Extra networks are
    registered in ``nets`` (checkpoint key -> module), optimizers in ``optimizers`` (checkpoint key ->
    optimizer) and schedulers in ``schedulers`` (name -> scheduler, stored together under ``scheduler``).
    """

    name = "base"
    domains: dict[str, dict[str, Any]] = {}

    def __init__(self, cfg: TrainConfig, ctx: TrainContext) -> None:
        self.cfg, self.ctx, self.amp = cfg, ctx, ctx.amp
        self.student = build_student(cfg, ctx)
        self.net = ctx.wrap(self.student)
        o = cfg.optim
        self.optimizer = build_optimizer(self.student, o)
        self.nets: dict[str, nn.Module] = {"model": self.student}
        self.optimizers: dict[str, torch.optim.Optimizer] = {"optimizer": self.optimizer}
        self.schedulers: dict[str, Any] = {"student": build_scheduler(self.optimizer, cfg.max_iters, o)}
        self.shares: ShareMonitor | None = None   # set by the stages with a teacher (cpsl.methods.shares)

    def share_monitor(self, marginal: torch.Tensor | None) -> ShareMonitor:
        """The stage's ``ShareMonitor`` (class shares of student, teacher and ``marginal`` on the target)."""
        self.shares = ShareMonitor(self.cfg.stage, self.cfg.model.n_class, marginal, self.cfg.share_drift,
                                   self.cfg.share_drift_logs, self.ctx.device, self.ctx.dist.is_main,
                                   self.cfg.share_drift_ratio)
        return self.shares

    def log_shares(self, done: int) -> tuple[dict[str, float], str]:
        """The class-share entries of metrics.jsonl and the progress text at a log line (every rank calls it)."""
        return ({}, "") if self.shares is None else self.shares.log(done)

    # -- per iteration ------------------------------------------------------------------------------------
    def train_mode(self) -> None:
        """Train mode before each step (re-applying ``freeze_bn``, which ``train()`` undoes)."""
        for net in self.nets.values():
            net.train()
        if self.cfg.freeze_bn:
            freeze_bn(self.student)

    def step(self, batches: list[dict[str, dict[str, Any]]] | dict[str, dict[str, Any]]) -> dict[str, Any]:
        """One iteration = one optimizer step over ``batches``, the step's k micro-batches (``accumulate``; one
        batch dict for k = 1); returns ``{name: detached 0-d loss tensor, or a number}``.

        Per micro-batch (``forward_backward``): the forward passes, the losses and their backward passes, the
        gradients accumulating in ``.grad``; under DDP all but the last micro-batch run under ``no_sync``, so the
        gradients are all-reduced once per step. Each loss is a micro-batch's share of the step's loss: a mean
        over images is scaled by 1/k (``Micro.scale``), a mean over valid pixels is divided by the valid pixels of
        the whole step where the method can count them before the passes (``step_counts``: the labels of the
        batch), so that the step's gradient equals that of one batch of k times the size (BatchNorm in train mode
        excepted: it normalises with each micro-batch's statistics). Per step (``optimizer_step``): the optimizer
        steps, EMA updates. The returned losses are summed over the micro-batches (the step's loss), the numbers
        averaged.
        """
        if isinstance(batches, dict):
            batches = [batches]
        k = len(batches)
        counts = self.begin_step(batches)
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        total: dict[str, Any] = {}
        for j, batch in enumerate(batches):
            micro = Micro(j, k, counts)
            with self.no_sync(not micro.last):
                losses = self.forward_backward(batch, micro)
            for name, value in losses.items():
                total[name] = value if name not in total else total[name] + value
        self.optimizer_step()
        return {name: v if isinstance(v, torch.Tensor) else v / k for name, v in total.items()}

    def begin_step(self, batches: list[dict[str, dict[str, Any]]]) -> dict[str, torch.Tensor]:
        """Before the step's first forward pass: its ``Micro.counts`` (``step_counts`` when k > 1, else none).
        Subclasses draw the step's random numbers here too."""
        return self.step_counts(batches) if len(batches) > 1 else {}

    def forward_backward(self, batch: dict[str, dict[str, Any]], micro: Micro) -> dict[str, Any]:
        """The forward and backward passes of one micro-batch (no optimizer step); its share of each loss
        (detached), or host numbers."""
        raise NotImplementedError

    def optimizer_step(self) -> None:
        """After the step's last backward pass: the optimizer steps (the base: the student's SGD)."""
        self.amp.step(self.optimizer)

    def step_counts(self, batches: list[dict[str, dict[str, Any]]]) -> dict[str, torch.Tensor]:
        """This rank's valid-pixel counts over the step's micro-batches (k > 1), by name: ``label/<domain>`` for
        every domain with labels. Subclasses add the counts of their own targets."""
        return {f"label/{domain}": sum((b[domain]["label"] != IGNORE_INDEX).sum() for b in batches)
                for domain in batches[0] if "label" in batches[0][domain]}

    def no_sync(self, skip: bool) -> contextlib.AbstractContextManager:
        """Every DDP-wrapped network of the method under ``no_sync`` when ``skip`` (its backward passes keep their
        gradients local); else nothing."""
        stack = contextlib.ExitStack()
        if skip:
            for module in vars(self).values():
                if isinstance(module, nn.parallel.DistributedDataParallel):
                    stack.enter_context(module.no_sync())
        return stack

    def lrs(self) -> dict[str, float]:
        """Current learning rate of every parameter group, ``{group name: lr}``."""
        out = {}
        for key, opt in self.optimizers.items():
            for i, g in enumerate(opt.param_groups):
                out[str(g.get("name", f"{key}{i}"))] = float(g["lr"])
        return out

    def describe(self) -> dict[str, Any]:
        """Plain JSON-able facts about this run (e.g. ``student_init``), merged into ``train_summary.json`` and
        stored under ``extra`` in the checkpoints. Subclasses add their own entries."""
        facts: dict[str, Any] = {"student_init": student_init(self.cfg),
                                 "amp": self.amp.mode if self.amp.enabled else "off"}
        report = getattr(self.student, "init_report", None)
        if report is not None:  # what model.init gave the student (None with init_checkpoint)
            facts["student_init_report"] = {"loaded": report["loaded"],
                                            "missing": dict(Counter(k.split(".", 1)[0] for k in report["missing"])),
                                            "unexpected": dict(Counter(k.split(".", 1)[0]
                                                                       for k in report["unexpected"]))}
        return facts

    # -- checkpoints ------------------------------------------------------------------------------------
    def state_dict(self, full: bool = True) -> dict[str, Any]:
        """Checkpoint entries: the networks, and with ``full`` the optimizers and schedulers (to resume) and, in the
        stages with a teacher, the class-share monitor (``shares``: its open window and warning counters)."""
        state: dict[str, Any] = {k: m.state_dict() for k, m in self.nets.items()}
        if full:
            state.update({k: o.state_dict() for k, o in self.optimizers.items()})
            state["scheduler"] = {k: s.state_dict() for k, s in self.schedulers.items()}
            if self.shares is not None:
                state["shares"] = self.shares.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any], path: Any = "checkpoint", resumable: bool = True) -> None:
        """Restore a checkpoint of this stage. ``resumable=False``: a finished run's final checkpoint (no optimizers
        or schedulers: nothing is left to train), whose networks and monitor are restored to publish it again."""
        optimizers = [*self.optimizers, "scheduler"] if resumable else []
        for k in [*self.nets, *optimizers]:
            if k not in state:
                raise CheckpointError(f"{path}: no {k!r} entry (not a resumable {self.name} checkpoint)")
        for k, m in self.nets.items():
            load_model_state(m, state[k], path, what=k)
        if resumable:
            for k, o in self.optimizers.items():
                o.load_state_dict(state[k])
            for k, s in self.schedulers.items():
                s.load_state_dict(state["scheduler"][k])
        # a checkpoint written before the monitor was saved (#27) resumes with a fresh one
        if self.shares is not None and "shares" in state:
            try:
                self.shares.load_state_dict(state["shares"])
            except (KeyError, TypeError, ValueError) as err:
                raise CheckpointError(f"{path}: bad shares entry ({err})") from None
