"""What every inference step shares: model loading, the forward pass, sharded data loading, staged outputs.

* ``image_to_tensor``: the reference normalisation, RGB / 255 (no mean/std), as a (3, H, W) float tensor.
* ``load_model_from_checkpoint``: build the network described by the checkpoint's own ``model_config`` (so
  ``n_class`` and ``bn_pretrain`` always come from the file) and load its student weights, in eval mode.
* ``forward`` / ``predict_probs``: one pass (optionally plus the horizontally flipped pass, flipped back and
  averaged, as the reference's hard pseudo labels), softmax in float32, optional bilinear upsampling.
* ``session``: joins the process group under ``torchrun`` (one process otherwise); ``shard_indices`` gives each
  rank the images ``rank, rank + world_size, ...``; sums are all-reduced by the steps, per-image files are
  written by the rank that computed them.
* ``iter_batches``: a DataLoader (worker processes decode the images) over one rank's shard, yielding batches
  of same-size images on the device, with a tqdm bar on rank 0.
* ``staged_dir``: every rank writes into one hidden folder next to ``out``; rank 0 renames it to ``out`` at
  the end, so an interrupted step leaves nothing under the final name.

Everything runs under ``torch.inference_mode()``; autocast is used only on CUDA and only when asked for.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from cpsl import progress
from cpsl.config import InferenceSettings, ModelConfig
from cpsl.data.common import read_image
from cpsl.data.prepared import PreparedSplit
from cpsl.errors import CheckpointError, ConfigError, DataError
from cpsl.models import build_model, place
from cpsl.models.checkpoint import checkpoint_model_config, load_checkpoint, load_model_state
from cpsl.outputs import publish_dir, remove_path, remove_stale_staging, staging_dir
from cpsl.provenance import atomic_write_text
from cpsl.train import dist as D


def image_to_uint8_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) RGB -> uint8 (3, H, W), a quarter of the float32 bytes to carry (normalise it where it is
    used, with ``normalize_image``)."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected a uint8 (H, W, 3) RGB image, got {image.dtype} {image.shape}")
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))


def normalize_image(image: torch.Tensor) -> torch.Tensor:
    """uint8 RGB (..., 3, H, W) on any device -> float32 in [0, 1]: the reference normalisation, RGB / 255 (no
    mean/std). The one place this normalisation is written."""
    return image.float().div_(255.0)


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) RGB -> float32 (3, H, W) in [0, 1] (the reference normalisation: RGB / 255)."""
    return normalize_image(image_to_uint8_tensor(image))


def load_model_from_checkpoint(path: str | Path, device: torch.device | str = "cpu",
                               channels_last: bool | str = "auto"
                               ) -> tuple[nn.Module, ModelConfig, dict[str, Any]]:
    """(model in eval mode on ``device``, its ModelConfig, the checkpoint dict) from our ``checkpoint.pt``;
    ``channels_last`` as in ``cpsl.models.place``.

    The architecture comes from the file's ``model_config``; the student weights (``model``) are loaded
    strictly. Errors are one-line CheckpointErrors naming the file.
    """
    state = load_checkpoint(path)
    mcfg = checkpoint_model_config(state, path)
    model = build_model(mcfg)
    load_model_state(model, state["model"], path)
    model = place(model, device, channels_last).eval()
    return model, mcfg, state


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bfloat16 autocast when ``enabled`` (on CUDA float16 where the GPU has no bf16); else a no-op."""
    if not enabled:
        return contextlib.nullcontext()
    if device.type != "cuda":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast(device_type="cuda", dtype=dtype)


def forward(model: nn.Module, images: torch.Tensor, amp: bool = False) -> dict[str, torch.Tensor]:
    """``model(images)`` under inference mode (and autocast if ``amp`` on CUDA); float32 ``out`` and ``feat``."""
    with torch.inference_mode(), autocast(images.device, amp):
        res = model(images)
    return {k: v.float() for k, v in res.items()}


def predict_probs(model: nn.Module, images: torch.Tensor, out_size: tuple[int, int] | None = None,
                  flip: bool = False, align_corners: bool = True, upsample_logits: bool = False,
                  amp: bool = False) -> torch.Tensor:
    """Class probabilities (B, C, H, W) float32 for ``images`` (B, 3, H, W) in [0, 1].

    ``out_size``: resize to (H, W) bilinearly (None: the model's output resolution). By default the softmax is
    taken first and the probabilities are resized (the reference's pseudo labels); ``upsample_logits`` resizes
    the logits before the softmax (the reference's evaluation; the argmax is that of the resized logits).
    ``flip``: average with the pass on the horizontally flipped images, flipped back.
    """
    def one(x: torch.Tensor) -> torch.Tensor:
        logits = forward(model, x, amp)["out"]
        with torch.inference_mode():
            if out_size is not None and upsample_logits:
                logits = F.interpolate(logits, size=tuple(out_size), mode="bilinear", align_corners=align_corners)
            p = logits.softmax(1)
            if out_size is not None and not upsample_logits:
                p = F.interpolate(p, size=tuple(out_size), mode="bilinear", align_corners=align_corners)
        return p

    probs = one(images)
    if flip:
        flipped = one(images.flip(-1))
        with torch.inference_mode():
            probs = (probs + flipped.flip(-1)) / 2
    return probs


# ---------------------------------------------------------------------------------------------------------
# Processes, sharding, outputs


def count_ids(ids: torch.Tensor, n: int) -> torch.Tensor:
    """How often each of 0..n-1 occurs in ``ids`` (every id must be one of them): int64 (n,) on their device.
    ``torch.bincount(ids, minlength=n)`` without its host syncs on CUDA (it reads the ids' min and max to size its
    output); the same counts."""
    ids = ids.flatten().long()
    return torch.zeros(n, dtype=torch.int64, device=ids.device).index_add_(0, ids, torch.ones_like(ids))


def shard_indices(n: int, rank: int, world_size: int) -> list[int]:
    """The images of one rank: ``range(rank, n, world_size)`` (every image exactly once over all ranks)."""
    return list(range(rank, n, world_size))


@contextlib.contextmanager
def session(device: str = "auto") -> Iterator[D.DistInfo]:
    """Join the torchrun process group if there is one (and leave it at the end if we joined it here)."""
    import torch.distributed as tdist

    was = tdist.is_available() and tdist.is_initialized()
    try:
        info = D.setup(device)
    except RuntimeError as err:
        raise ConfigError(f"device: {err}") from None
    try:
        yield info
    finally:
        if not was:
            D.cleanup()


def all_reduce_(t: torch.Tensor, info: D.DistInfo) -> torch.Tensor:
    """Sum ``t`` over ranks in place (through the rank's device, as NCCL needs) and return it on its device."""
    if not info.distributed:
        return t
    with torch.inference_mode():  # accumulators made under inference mode may only change in it
        moved = t.to(info.device)
        D.all_reduce_sum(moved)
        if moved is not t:
            t.copy_(moved.to(t.device))
    return t


@contextlib.contextmanager
def staged_dir(out: str | Path, info: D.DistInfo, step: str) -> Iterator[Path]:
    """A hidden folder next to ``out`` that all ranks write into; renamed to ``out`` (replacing an earlier ``out``
    of the same ``step`` only: ``cpsl.outputs.publish_dir``) on success.

    On an error the folder is removed (by rank 0) and ``out`` is left as it was; the folder of a run that was
    killed (no cleanup code runs) is removed by the next run.
    """
    out = Path(os.path.abspath(out))
    name = D.broadcast_object(staging_dir(out).name)
    tmp = out.parent / name
    if info.is_main:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(out)  # what a killed run left
        remove_path(tmp)
        tmp.mkdir()
    D.barrier()
    try:
        yield tmp
        D.barrier()
        if info.is_main:
            publish_dir(tmp, out, step)
        D.barrier()
    except BaseException:
        if info.is_main:
            remove_path(tmp)
        raise


def write_json(path: str | Path, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON."""
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------------------
# Data


def open_split(data: str | Path, key: str = "data") -> PreparedSplit:
    """The prepared split at ``data``; a one-line DataError naming the folder and the setting if missing."""
    path = Path(data)
    if not path.is_dir():
        raise DataError(f"{path}: prepared dataset folder not found ({key}; run `cpsl prepare` first)")
    split = PreparedSplit(path)
    if len(split) == 0:
        raise DataError(f"{split.root / 'list.txt'}: the prepared split has no images ({key})")
    return split


def check_classes(split: PreparedSplit, mcfg: ModelConfig, checkpoint: str | Path) -> None:
    """The checkpoint's class count must equal the split's; else one line naming both files."""
    if mcfg.n_class != split.n_class:
        raise CheckpointError(f"{checkpoint} has {mcfg.n_class} classes but the prepared split "
                              f"{split.root / 'meta.json'} has {split.n_class}")


class _Items(Dataset):
    """Images (and labels) of some indices of a prepared split, as tensors; decoded in worker processes."""

    def __init__(self, split: PreparedSplit, indices: list[int], labels: bool,
                 input_size: tuple[int, int] | None) -> None:
        self.split, self.indices, self.labels, self.input_size = split, indices, labels, input_size

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int) -> dict[str, Any]:
        i = self.indices[j]
        if self.labels:
            image, label = self.split.load(i)
        else:
            image, label = read_image(self.split.image_paths[i]), None
        size = image.shape[:2]
        if self.input_size is not None and tuple(self.input_size) != size:
            h, w = self.input_size
            image = cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)
        return {"image": image_to_tensor(image), "label": None if label is None else torch.from_numpy(label),
                "index": i, "name": self.split.names[i], "size": size}


def _as_list(batch: list) -> list:
    return batch


def _worker_init(worker_id: int) -> None:
    torch.set_num_threads(1)


@dataclass
class Batch:
    """Same-size images on the device, and per image: split index, name, original (H, W), label or None."""

    images: torch.Tensor
    indices: list[int]
    names: list[str]
    sizes: list[tuple[int, int]]
    labels: list[torch.Tensor | None]


def iter_batches(split: PreparedSplit, indices: list[int], cfg: InferenceSettings, device: torch.device,
                 desc: str, labels: bool = False, input_size: tuple[int, int] | None = None,
                 show_progress: bool = True) -> Iterator[Batch]:
    """Batches of up to ``cfg.batch_size`` consecutive images of ``indices`` (split where sizes change)."""
    D.opencv_threads_for_workers(cfg.workers)
    loader = DataLoader(_Items(split, indices, labels, input_size), batch_size=cfg.batch_size, shuffle=False,
                        num_workers=cfg.workers, collate_fn=_as_list, pin_memory=device.type == "cuda",
                        worker_init_fn=_worker_init if cfg.workers > 0 else None,
                        persistent_workers=False)
    bar = None
    if cfg.progress and show_progress:
        bar = progress.bar(total=len(indices), desc=desc, unit="img")
    try:
        for items in loader:
            start = 0
            while start < len(items):
                shape = items[start]["image"].shape
                end = start + 1
                while end < len(items) and items[end]["image"].shape == shape:
                    end += 1
                group = items[start:end]
                images = torch.stack([it["image"] for it in group]).to(device, non_blocking=True)
                yield Batch(images, [it["index"] for it in group], [it["name"] for it in group],
                            [tuple(it["size"]) for it in group], [it["label"] for it in group])
                if bar is not None:
                    bar.update(len(group))
                start = end
    finally:
        if bar is not None:
            bar.close()


@dataclass
class Setup:
    """What a step has after ``prepare_run``: process info, the split, this rank's shard, the model."""

    info: D.DistInfo
    split: PreparedSplit
    indices: list[int]
    model: nn.Module
    model_config: ModelConfig
    checkpoint: dict[str, Any]


def prepare_run(cfg: InferenceSettings, info: D.DistInfo) -> Setup:
    """Open the split, load the model from the checkpoint on the rank's device, check the class counts."""
    split = open_split(cfg.data)
    model, mcfg, state = load_model_from_checkpoint(cfg.checkpoint, info.device)
    check_classes(split, mcfg, cfg.checkpoint)
    return Setup(info, split, shard_indices(len(split), info.rank, info.world_size), model, mcfg, state)


class BackgroundWriter:
    """Runs file-writing calls in a few threads (PNG/deflate encoding releases the GIL), so encoding overlaps the
    next forward pass. At most ``max_pending`` calls are queued; ``close`` waits and re-raises the first error.
    """

    def __init__(self, threads: int = 2, max_pending: int = 8) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="cpsl-writer")
        self._pending: list = []
        self._max = max_pending
        self.results: list[Any] = []

    def submit(self, fn: Any, *args: Any) -> None:
        self._pending.append(self._pool.submit(fn, *args))
        while len(self._pending) > self._max:
            self.results.append(self._pending.pop(0).result())

    def close(self) -> list[Any]:
        try:
            while self._pending:
                self.results.append(self._pending.pop(0).result())
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)
        return self.results

    def __enter__(self) -> "BackgroundWriter":
        return self

    def __exit__(self, exc_type: Any, *rest: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self._pool.shutdown(wait=True, cancel_futures=True)
