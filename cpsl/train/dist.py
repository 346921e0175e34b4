"""Devices, processes and seeds: one code path for CPU, one GPU and DDP under ``torchrun``.

``torchrun --nproc_per_node N python -m cpsl train ...`` sets RANK / WORLD_SIZE / LOCAL_RANK; without them we
run as a single process. Every rank gets ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU (gloo).
The workflow runs a job with ``resources.<kind>.gpu`` >= 1 with ``CPSL_DEVICE=cuda``: ``device: auto`` then means
``cuda``, so a GPU job never falls back to the CPU.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(preference: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto``: the local GPU if there is one, else the CPU (``cuda`` when the environment sets
    ``CPSL_DEVICE=cuda``: a GPU job of the workflow). ``cpu`` / ``cuda`` force a choice."""
    if preference == "auto":
        preference = os.environ.get("CPSL_DEVICE") or "auto"
    if preference == "cpu":
        return torch.device("cpu")
    if preference in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    if preference == "cuda":
        raise RuntimeError("device: 'cuda' was requested but CUDA is not usable here (python -m cpsl.gpus 1 "
                           "says why)")
    return torch.device("cpu")


def host_to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A tensor built on the host each iteration (random keys, sampling grids, masks) on ``device``, without making
    the host wait: on CUDA through pinned memory with ``non_blocking`` (a copy from pageable memory blocks the
    host until the device has caught up); anywhere else a plain ``.to``, so CPU results are unchanged."""
    if torch.device(device).type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def setup(preference: str = "auto") -> DistInfo:
    """Join the process group when launched by torchrun; otherwise describe the single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(preference, local_rank)
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} visible CUDA devices")
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank, world_size, local_rank, device)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate ``t`` from every rank along dim 0 (no gradient); identity on one process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, 0)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` (picklable) on every rank; identity on one process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_mean_(t: torch.Tensor) -> torch.Tensor:
    """Average ``t`` over the ranks in place (identity on one process)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t.div_(dist.get_world_size())
    return t


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def opencv_threads_for_workers(workers: int) -> None:
    """Call before a DataLoader with ``workers`` worker processes starts them: OpenCV then runs one thread in each
    worker (torch already runs one), since the workers are the parallelism and an OpenCV pool in each of them
    would oversubscribe the job's CPUs. Set in this process, before the workers fork, and inherited: setting it
    inside a forked worker deadlocks when this process's OpenCV pool had threads. This process decodes no images
    while it has workers, so its own OpenCV threads do not matter."""
    if workers > 0:
        import cv2

        cv2.setNumThreads(1)


def worker_init_fn(worker_id: int) -> None:
    """DataLoader worker seeding: Python and NumPy follow torch's per-worker seed (itself derived from the
    loader's generator), so augmentations are reproducible for a given seed, rank and worker count."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)
