"""Peak memory of one training iteration of every stage at the paper presets' shapes, measured without a GPU.

Each stage's method (``benchmarks/synthetic_stage.py``: the package's own networks, losses and steps, at
``gta5_cityscapes``'s settings: DeepLab-v2 ResNet-101, batch 4, 512x896 crops, stage 1's EMA teacher on the
1024x2048 image, queues of 65,536 rows) runs under ``FakeTensorMode``: every tensor has its real shape and
dtype but no data, so nothing is computed and no memory is used, while ``LiveMemory`` (a ``TorchDispatchMode``)
adds up the bytes of every live tensor storage: a storage counts from the first operation that reads or writes
it until it is freed (weak references), so parameters, gradients, optimizer state, EMA network, queues, batch,
activations saved for the backward pass, temporaries and autocast's bf16 weight copies are all in. ``amp: bf16``
is CPU autocast (the same regions as on CUDA: convolutions and matrix products in bf16, losses in float32).

Per stage and precision: the peak over the second of two iterations (the first allocates the momentum buffers)
and the part held between iterations (``state``: weights, the gradients until the next step's ``zero_grad``,
momentum, EMA network, queues, the batch), for micro-batches of 4, 2 and 1 (``accumulate`` 1, 2, 4 at an
optimizer batch of 4: an accumulated step holds one micro-batch's iteration, plus the other micro-batches'
inputs, tens of MB). Stage 1 is measured
in its worst case: the contrastive term on (queue full, no CutMix this iteration). ``--validate`` checks the
tracker on a small real CPU iteration of each stage against the CPU allocator's own events (``torch.profiler``
with ``profile_memory``) and against itself under ``FakeTensorMode``.

    .venv/bin/python benchmarks/memory.py [--stages ...] [--amp off bf16] [--batches 4 2 1] [--json out.json]
    .venv/bin/python benchmarks/memory.py --validate

Not counted: the CUDA context (about 0.5-1 GiB), cuDNN workspaces (bounded by free memory under
``cudnn.benchmark``) and the caching allocator's rounding and fragmentation; ``fits`` leaves 1 GiB and 10 %.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import types
import unittest.mock as um
import weakref
from pathlib import Path
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map_only
from torch.utils.weak import WeakIdKeyDictionary

sys.path.insert(0, str(Path(__file__).resolve().parent))

from synthetic_stage import STAGES, offline_method, preset_config, random_batches  # noqa: E402

GIB = 2**30
CAPACITIES = (24, 40, 80)          # GiB
HEADROOM_GIB, HEADROOM_FRACTION = 1.0, 0.10
HOST_KEYS = ("weak_params", "strong_params")


class LiveMemory(TorchDispatchMode):
    """Bytes of live tensor storages, and their peak. ``inputs``: also count a storage first seen as an
    operation's input (tensors made before tracking began: weights, batch); else only the storages that
    operations allocate (a view of an older tensor, e.g. a transposed weight, is then not counted)."""

    def __init__(self, inputs: bool = True) -> None:
        super().__init__()
        self.inputs = inputs
        self.sizes: WeakIdKeyDictionary = WeakIdKeyDictionary()   # storage -> [bytes]
        self.older: WeakIdKeyDictionary = WeakIdKeyDictionary()   # storages from before (inputs=False)
        self.current = 0
        self.peak = 0

    def reset_peak(self) -> None:
        self.peak = self.current

    def _release(self, box: list[int]) -> None:
        self.current -= box[0]

    def _see(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        if st in self.older:
            return
        n = st.nbytes()
        box = self.sizes.get(st)
        if box is None:
            box = [n]
            self.sizes[st] = box
            weakref.finalize(st, self._release, box)
            self.current += n
        elif box[0] != n:                # resized in place
            self.current += n - box[0]
            box[0] = n
        self.peak = max(self.peak, self.current)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        for t in tree_flatten((args, kwargs or {}))[0]:
            if isinstance(t, torch.Tensor):
                if self.inputs:
                    self._see(t)
                elif t.untyped_storage() not in self.sizes:
                    self.older[t.untyped_storage()] = True
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._see(t)
        return out


def _on_host(fn: Any) -> Any:
    """``fn`` run with real tensors (outside the fake mode): the host-side code of a step (random draws,
    augmentation records read with numpy), which a GPU run also runs on the CPU."""
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with unset_fake_temporarily():
            return fn(*args, **kwargs)
    return wrapper


def host_code_outside_fake():
    """Patches that run the steps' host-side code on real tensors."""
    from cpsl.methods import distill, selflabel

    patches = [um.patch.object(selflabel.SelfLabel, "begin_step", _on_host(selflabel.SelfLabel.begin_step))]
    for module in (selflabel, distill):
        for name in ("weak_params_from_batch", "strong_params_from_batch"):
            if hasattr(module, name):
                patches.append(um.patch.object(module, name, _on_host(getattr(module, name))))
    return patches


@contextlib.contextmanager
def fake_build(cfg: Any):
    """While building a method under ``FakeTensorMode``: ``module.to(cpu)`` of a module already there returns it
    (torch would swap each fake parameter with itself, which fails; other conversions, channels_last, make new
    fake parameters), the class shares' marginal is left out (read on the host for the log), and stage 1's copy
    of the student for its EMA network is a new network loaded with the student's state (``copy.deepcopy`` of
    fake parameters fails)."""
    from cpsl.methods import base, selflabel
    from cpsl.methods.shares import ShareMonitor
    from cpsl.models import build_model, place

    real_to = torch.nn.Module.to

    def to(self: torch.nn.Module, *args: Any, **kwargs: Any) -> torch.nn.Module:
        if not kwargs and len(args) == 1 and torch.device(args[0]).type == "cpu":
            return self
        return real_to(self, *args, **kwargs)

    def deepcopy(module: torch.nn.Module) -> torch.nn.Module:
        twin = place(build_model(cfg.model), "cpu", cfg.channels_last)
        twin.load_state_dict(module.state_dict())
        return twin

    def share_monitor(stage: str, n_class: int, marginal: Any, *args: Any) -> ShareMonitor:
        return ShareMonitor(stage, n_class, None, *args)   # the marginal is read on the host, for the log only

    with um.patch.object(torch.nn.Module, "to", to), \
            um.patch.object(selflabel, "copy", types.SimpleNamespace(deepcopy=deepcopy)), \
            um.patch.object(base, "ShareMonitor", share_monitor):
        yield


def fake_batch(mode: FakeTensorMode, batch: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The batch's device tensors as fake tensors (the augmentation records stay real: they stay on the host)."""
    return {d: {k: v if k in HOST_KEYS else tree_map_only(torch.Tensor, mode.from_tensor, v) for k, v in b.items()}
            for d, b in batch.items()}


@contextlib.contextmanager
def fake_method(cfg: Any) -> Any:
    """``(mode, method)``: the stage's method built under a ``FakeTensorMode`` (no real memory), with the host code
    that must run on real tensors patched out of the fake mode until the block ends."""
    patches = host_code_outside_fake()
    for p in patches:
        p.start()
    try:
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        with mode, fake_build(cfg):
            method = offline_method(cfg)
        yield mode, method
    finally:
        for p in patches:
            p.stop()


def measure(stage: str, amp: str, batch: int, iterations: int = 2, **over: Any) -> dict[str, Any]:
    """Peak and state bytes of iteration ``iterations`` of ``stage`` at micro-batch ``batch``."""
    cfg = preset_config(stage, amp=amp, **{"data.batch_size": batch, "selflabel.cutmix_p": 0.0, **over})
    with fake_method(cfg) as (mode, method):
        with unset_fake_temporarily():
            real = random_batches(cfg, method, iterations)
        batches = [fake_batch(mode, b) for b in real]
        if stage == "stage1":   # the worst case: the contrastive term against a full queue
            method.queue.filled = method.queue.length
        tracker = LiveMemory()
        t0 = time.perf_counter()
        with mode, tracker:
            for p in method.nets.values():
                for t in [*p.parameters(), *p.buffers()]:
                    tracker._see(t)
            if stage == "stage1":
                for t in (method.queue.feats, method.queue.logits, method.queue.labels, method.prototypes_ema):
                    tracker._see(t)
            for i in range(iterations):
                b = batches.pop(0)   # the previous iteration's batch is gone, as in the training loop
                for t in tree_flatten({d: {k: v for k, v in x.items() if k not in HOST_KEYS}
                                       for d, x in b.items()})[0]:
                    if isinstance(t, torch.Tensor):
                        tracker._see(t)
                if i == iterations - 1:
                    state = tracker.current
                    tracker.reset_peak()
                method.train_mode()
                method.step(b)
                del b
        return {"stage": stage, "amp": amp, "batch": batch, "peak": tracker.peak, "state": state,
                "seconds": time.perf_counter() - t0}


def fits(peak: int, capacity_gib: int) -> bool:
    return peak + HEADROOM_GIB * GIB <= (1 - HEADROOM_FRACTION) * capacity_gib * GIB


def table(rows: list[dict[str, Any]], full_batch: int = 4) -> str:
    """The Markdown table: per stage and precision the peak at each micro-batch, and per capacity the smallest
    ``accumulate`` that fits at an optimizer batch of ``full_batch``."""
    batches = sorted({r["batch"] for r in rows}, reverse=True)
    by = {(r["stage"], r["amp"], r["batch"]): r for r in rows}
    head = (["stage", "amp", "state GiB"] + [f"peak GiB, batch {b}" for b in batches]
            + [f"{c} GB: accumulate" for c in CAPACITIES])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for stage in dict.fromkeys(r["stage"] for r in rows):
        for amp in dict.fromkeys(r["amp"] for r in rows if r["stage"] == stage):
            cells = [stage, amp, f"{by[(stage, amp, batches[0])]['state'] / GIB:.2f}"]
            cells += [f"{by[(stage, amp, b)]['peak'] / GIB:.2f}" if (stage, amp, b) in by else "" for b in batches]
            for cap in CAPACITIES:
                ok = [full_batch // b for b in batches if full_batch % b == 0 and (stage, amp, b) in by
                      and fits(by[(stage, amp, b)]["peak"], cap)]
                cells.append(str(min(ok)) if ok else "no")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Validation on a real CPU iteration


def profiler_peak(fn: Any) -> int:
    """Peak of the bytes allocated minus freed by the CPU allocator while ``fn()`` runs (its own events,
    recorded by ``torch.profiler`` with ``profile_memory``), relative to the start."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    current = peak = 0
    for _, n in events:
        current += n
        peak = max(peak, current)
    return peak


def validate(stage: str = "source_only", amp: str = "off") -> dict[str, int]:
    """One first iteration of a small network (ResNet-18 at width 16, batch 2, 128x224 crops) on real CPU
    tensors, measured three ways: the allocator's events, ``LiveMemory`` on the real tensors, ``LiveMemory``
    under ``FakeTensorMode``. Peaks relative to the start of the iteration (``inputs=False``)."""
    over = {"amp": amp, "model.backbone": "resnet18", "model.base_width": 16, "model.head_channels": 32,
            "data.batch_size": 2, "data.crop": [128, 224], "data.resize": 512, "selflabel.queue_length": 1024,
            "selflabel.pixels_per_image": 16, "selflabel.cutmix_p": 0.0, "model.dropout": 0.0}
    cfg = preset_config(stage, **over)
    out = {}
    torch.manual_seed(0)
    method = offline_method(cfg)
    batch = random_batches(cfg, method, 1, (256, 512))[0]
    method.train_mode()
    out["allocator (torch.profiler)"] = profiler_peak(lambda: method.step(batch))
    torch.manual_seed(0)
    method = offline_method(cfg)
    method.train_mode()
    with LiveMemory(inputs=False) as tracker:
        method.step(batch)
    out["LiveMemory, real tensors"] = tracker.peak
    with fake_method(cfg) as (mode, method):
        fake = fake_batch(mode, batch)
        with mode, LiveMemory(inputs=False) as tracker:
            method.train_mode()
            method.step(fake)
        out["LiveMemory, FakeTensorMode"] = tracker.peak
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    parser.add_argument("--amp", nargs="+", default=["off", "bf16"], choices=["off", "bf16"])
    parser.add_argument("--batches", nargs="+", type=int, default=[4, 2, 1])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--validate", action="store_true", help="check the tracker on a real CPU iteration")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.validate:
        for stage in args.stages:
            for amp in args.amp:
                got = validate(stage, amp)
                print(f"{stage} {amp}: " + ", ".join(f"{k} {v / 2**20:.2f} MiB" for k, v in got.items()),
                      flush=True)
        return
    rows = []
    for stage in args.stages:
        for amp in args.amp:
            for b in args.batches:
                r = measure(stage, amp, b)
                rows.append(r)
                print(f"{stage} {amp} batch {b}: peak {r['peak'] / GIB:.2f} GiB, state {r['state'] / GIB:.2f} GiB "
                      f"({r['seconds']:.0f} s)", file=sys.stderr, flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
