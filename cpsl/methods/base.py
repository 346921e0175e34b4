"""What every training method shares: the run context (device, processes, AMP), the student, the interface.

A method owns its networks, optimizers and schedulers and does a whole iteration in ``step(batch)``: forward
passes, losses, backward passes and optimizer steps (one or several), returning the loss values as detached 0-d
tensors on the device (the loop reads them on the host only when it logs; plain numbers for host-side flags).
The loop (``cpsl.train.loop``) steps the schedulers, logs, checks for NaN and checkpoints. ``state_dict`` /
``load_state_dict`` give the checkpoint entries (cpsl.models.checkpoint keys: ``model``, ``optimizer``,
``scheduler``, ``discriminator``, ``disc_optimizer``, ...).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from cpsl.config import TrainConfig
from cpsl.errors import CheckpointError
from cpsl.models import build_model, convert_sync_bn, freeze_bn, place
from cpsl.methods.shares import ShareMonitor
from cpsl.models.checkpoint import check_model_fits, load_checkpoint, load_model_state
from cpsl.train.dist import DistInfo
from cpsl.train.optim import build_sgd, poly_scheduler


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
    (``model.sync_bn``), frozen BatchNorm when ``freeze_bn``, on the run's device (``place``: channels_last on
    CUDA)."""
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
    model = place(model, ctx.device)
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
        self.optimizer = build_sgd(self.student, o.lr, head_lr_mult=o.head_lr_mult,
                                   backbone_lr_mult=o.backbone_lr_mult, momentum=o.momentum,
                                   weight_decay=o.weight_decay)
        self.nets: dict[str, nn.Module] = {"model": self.student}
        self.optimizers: dict[str, torch.optim.Optimizer] = {"optimizer": self.optimizer}
        self.schedulers: dict[str, Any] = {"student": poly_scheduler(self.optimizer, cfg.max_iters,
                                                                     o.poly_power)}
        self.shares: ShareMonitor | None = None   # set by the stages with a teacher (cpsl.methods.shares)

    def share_monitor(self, marginal: torch.Tensor | None) -> ShareMonitor:
        """The stage's ``ShareMonitor`` (class shares of student, teacher and ``marginal`` on the target)."""
        self.shares = ShareMonitor(self.cfg.stage, self.cfg.model.n_class, marginal, self.cfg.share_drift,
                                   self.cfg.share_drift_logs, self.ctx.device, self.ctx.dist.is_main)
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

    def step(self, batch: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """One iteration; ``{name: detached 0-d loss tensor, or a number}``."""
        raise NotImplementedError

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
        """Checkpoint entries: the networks, and with ``full`` the optimizers and schedulers (to resume)."""
        state: dict[str, Any] = {k: m.state_dict() for k, m in self.nets.items()}
        if full:
            state.update({k: o.state_dict() for k, o in self.optimizers.items()})
            state["scheduler"] = {k: s.state_dict() for k, s in self.schedulers.items()}
        return state

    def load_state_dict(self, state: dict[str, Any], path: Any = "checkpoint") -> None:
        for k in [*self.nets, *self.optimizers, "scheduler"]:
            if k not in state:
                raise CheckpointError(f"{path}: no {k!r} entry (not a resumable {self.name} checkpoint)")
        for k, m in self.nets.items():
            load_model_state(m, state[k], path, what=k)
        for k, o in self.optimizers.items():
            o.load_state_dict(state[k])
        for k, s in self.schedulers.items():
            s.load_state_dict(state["scheduler"][k])
