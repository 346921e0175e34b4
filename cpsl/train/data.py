"""Training data: augmented samples from prepared splits, a deterministic endless sampler, and the loaders.

Determinism. What a training run sees is a pure function of (seed, iteration, sample slot):

* ``InfiniteSampler`` walks an endless sequence of *global positions* ``p = iteration * batch_size + slot``.
  Position ``p`` belongs to epoch ``p // n``, whose permutation comes from a generator seeded with
  ``(seed, stream, epoch)``; the sampler yields ``(index, sample_seed)`` with ``sample_seed`` derived from
  ``(seed, stream, p)``. Under DDP, rank ``r`` takes the slots ``[r*b, (r+1)*b)`` of every global batch
  (``b = batch_size / world_size``), so the ranks together see exactly the single-process batch.
* ``TrainDataset.__getitem__`` builds its own ``random.Random`` / ``numpy`` generator from ``sample_seed`` and
  draws every augmentation parameter from them.

So the number of DataLoader workers, a restart from a checkpoint (the sampler simply starts at the saved
iteration) and the number of processes do not change the data. Each domain has its own ``stream`` id, so the
source and target orders are independent.

Sample dicts (collated by ``collate``: torch's default collate, the ``HOST_KEYS`` records as numpy arrays)::

    image        float (3, h, w) in [0, 1] (RGB / 255, no mean/std: the reference normalisation, spec 1.3)
    label        long (h, w), 255 = ignore          (when the dataset is built with label=True)
    index, name  position in the prepared split, sample name
    weak_params  WeakParams.as_dict() (recover with transforms.weak_params_from_batch); stays on the CPU, and
                 ``collate`` keeps it numpy
    image_strong, strong_params   views=("weak", "strong"): the strong view of the weak crop (spec 1.6);
                 strong_params stays on the CPU (numpy, like weak_params)
    image_full   views containing "full": the whole unaugmented image, uint8 (3, H, W) (a quarter of the bytes
                 of float32 to copy to the device: ``cpsl.inference.normalize_image`` there)
    ...          whatever the optional ``extras(index, weak_params, sample)`` callable adds (pseudo labels)
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from cpsl.data.prepared import PreparedSplit
from cpsl.data.lab import LabTransfer, lab_mean_std
from cpsl.data.transforms import StrongConfig, WeakConfig, WeakParams, random_colors, strong_augment, weak_augment
from cpsl.errors import ConfigError, DataError
from cpsl.inference import image_to_tensor, image_to_uint8_tensor  # the one normalisation: RGB / 255
from cpsl.train.dist import opencv_threads_for_workers, worker_init_fn

VIEWS = ("weak", "strong", "full")
# Batch entries that stay on the CPU when the batch moves to the device (``cpsl.train.loop.to_device``): the
# augmentation records, which the methods read on the host (numpy) to build the warps of their maps.
HOST_KEYS = frozenset({"weak_params", "strong_params"})
STREAMS = {"source": 0, "target": 1}


def _seed_int(*entropy: int) -> int:
    """A 63-bit integer seed derived from non-negative integers (SeedSequence mixing)."""
    state = np.random.SeedSequence([int(e) for e in entropy]).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & (2**63 - 1)


class InfiniteSampler(Sampler):
    """Endless ``(index, sample_seed)`` items for one rank; a pure function of (seed, stream, position).

    ``batch_size`` is the *global* batch; this rank yields its ``batch_size // world_size`` slots of every
    global batch, starting at iteration ``start_iter`` (the resume position).
    """

    def __init__(self, n: int, batch_size: int, *, seed: int, stream: int = 0, rank: int = 0,
                 world_size: int = 1, start_iter: int = 0, shuffle: bool = True) -> None:
        if n <= 0:
            raise DataError("cannot sample from an empty dataset")
        if batch_size % world_size:
            raise ConfigError(f"data.batch_size: {batch_size} is not divisible by the {world_size} processes")
        self.n, self.batch_size, self.seed, self.stream = n, batch_size, seed, stream
        self.rank, self.world_size, self.start_iter, self.shuffle = rank, world_size, start_iter, shuffle
        self.local_batch = batch_size // world_size
        self._epoch = -1
        self._perm = np.arange(n)

    def permutation(self, epoch: int) -> np.ndarray:
        """The sample order of ``epoch`` (identity when not shuffling)."""
        if not self.shuffle:
            return np.arange(self.n)
        return np.random.default_rng([self.seed, self.stream, 0, epoch]).permutation(self.n)

    def item(self, position: int) -> tuple[int, int]:
        """``(index, sample_seed)`` at global position ``position``."""
        epoch, k = divmod(position, self.n)
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, self.permutation(epoch)
        return int(self._perm[k]), _seed_int(self.seed, self.stream, 1, position)

    def positions(self, iteration: int) -> range:
        """Global positions this rank draws at ``iteration``."""
        first = iteration * self.batch_size + self.rank * self.local_batch
        return range(first, first + self.local_batch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        it = self.start_iter
        while True:
            for p in self.positions(it):
                yield self.item(p)
            it += 1


class TrainDataset(Dataset):
    """Augmented training samples of one prepared split; items are indexed by ``(index, sample_seed)``.

    ``views``: "weak" (always), "strong" (adds ``image_strong`` + ``strong_params``), "full" (adds the
    unaugmented ``image_full``, uint8). ``label``: include the weak-augmented label (a domain without it never
    decodes its label files). ``lab_stats``: (N, 2, 3) Lab mean/std of reference images; when given, each image is
    first colour-transferred to a random row (CPSL's GTA5 -> Cityscapes LAB transfer, spec 1.4), from its own
    statistics (its split's ``lab_stats.npy`` when prepared with them, else computed); the transfer is pointwise,
    so it runs on the pixels the weak crop reads only, unless the whole image is needed (``random_colors`` or the
    "full" view). ``random_colors``: then redraw the image's colours (``transforms.random_colors``, from the
    sample's generator). ``extras(index, weak_params, rng)`` may return more entries (e.g. pseudo labels carried
    into the weak crop) for later stages.
    """

    def __init__(self, split: PreparedSplit | str | Path, weak: WeakConfig, *, label: bool = True,
                 views: Sequence[str] = ("weak",), strong: StrongConfig | None = None,
                 lab_stats: np.ndarray | None = None, random_colors: bool = False,
                 extras: Callable[[int, WeakParams, np.random.Generator], dict[str, Any]] | None = None) -> None:
        unknown = [v for v in views if v not in VIEWS]
        if unknown:
            raise ValueError(f"unknown view {unknown[0]!r} (known: {', '.join(VIEWS)})")
        self.split = split if isinstance(split, PreparedSplit) else PreparedSplit(split)
        self.weak, self.label, self.views = weak, label, tuple(views)
        self.strong = strong if strong is not None else StrongConfig()
        self.lab_stats = None if lab_stats is None else np.asarray(lab_stats, np.float32)
        self.random_colors = random_colors
        self.extras = extras

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, item: tuple[int, int]) -> dict[str, Any]:
        index, sample_seed = item
        rng = np.random.default_rng(sample_seed)
        py = random.Random(sample_seed)
        image = self.split.load_image(index)
        label = self.split.load_label(index, image.shape[:2]) if self.label else None
        colour = None
        if self.lab_stats is not None:
            j = int(rng.integers(len(self.lab_stats)))
            # the image's own Lab statistics: stored by prepare (lab_stats.npy of its split), else computed
            own = self.split.lab_stats[index] if self.split.lab_stats is not None else lab_mean_std(image)
            colour = LabTransfer.fit(own, self.lab_stats[j, 0], self.lab_stats[j, 1])
            if self.random_colors or "full" in self.views:  # these need the whole transferred image
                image, colour = colour(image), None
        if self.random_colors:
            image = random_colors(image, rng)
        # colour (the pointwise LAB transfer) is applied to the pixels the weak crop reads only
        crop, crop_label, params = weak_augment(image, label, py, self.weak, colour)
        sample: dict[str, Any] = {"image": image_to_tensor(crop), "index": int(index),
                                  "name": self.split.names[index], "weak_params": params.as_dict()}
        if self.label:
            sample["label"] = torch.from_numpy(crop_label.astype(np.int64))
        if "strong" in self.views:
            strong_img, strong_params = strong_augment(crop, py, self.strong)
            sample["image_strong"] = image_to_tensor(strong_img)
            sample["strong_params"] = strong_params.as_dict()
        if "full" in self.views:
            sample["image_full"] = image_to_uint8_tensor(image)
        if self.extras is not None:
            sample.update(self.extras(int(index), params, rng))
        return sample


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """torch's default collate, except the ``HOST_KEYS`` entries of sample dicts: those stay numpy arrays
    (stacked per field).

    They are small records that the methods read on the host (``weak_params_from_batch``,
    ``strong_params_from_batch``) and ``to_device`` leaves on the CPU. As numpy arrays they travel from a loader
    worker inside the batch's pickle; as tensors each would be a shared-memory block of its own, passed to the
    training process as a file descriptor over a socket, about 0.4 ms of the training process's time apiece (12
    of the 20 tensors of a stage-1 batch; benchmarks/README.md, "Host-side costs of the demo's jobs").
    """
    if not isinstance(samples[0], dict):
        return default_collate(samples)
    host = {key: {field: np.stack([np.asarray(s[key][field]) for s in samples]) for field in samples[0][key]}
            for key in HOST_KEYS if key in samples[0]}
    batch = default_collate([{k: v for k, v in s.items() if k not in host} for s in samples])
    batch.update(host)
    return batch


def make_loader(dataset: Dataset, sampler: InfiniteSampler, *, workers: int, seed: int,
                pin_memory: bool = False) -> DataLoader:
    """An endless DataLoader of this rank's share of each global batch.

    The loader gets its own torch generator, so creating its iterator never draws from the global torch RNG
    (which a resumed run restores from the checkpoint). One OpenCV thread per worker
    (``opencv_threads_for_workers``).
    """
    opencv_threads_for_workers(workers)
    gen = torch.Generator()
    gen.manual_seed(seed)
    return DataLoader(dataset, batch_size=sampler.local_batch, sampler=sampler, num_workers=workers,
                      collate_fn=collate, pin_memory=pin_memory, drop_last=True, worker_init_fn=worker_init_fn,
                      generator=gen, prefetch_factor=2 if workers > 0 else None)


def weak_config(data_cfg: Any) -> WeakConfig:
    """The WeakConfig of a ``TrainDataConfig``."""
    return WeakConfig(crop_hw=(int(data_cfg.crop[0]), int(data_cfg.crop[1])), resize_w=data_cfg.resize,
                      scale=(float(data_cfg.scale[0]), float(data_cfg.scale[1])), flip_p=float(data_cfg.flip))


def check_same_classes(splits: dict[str, PreparedSplit]) -> None:
    """Every split must name the same classes in the same order (a train id means one class everywhere);
    DataError naming both meta.json files and the first difference."""
    items = sorted(splits.items())
    for (name_a, a), (name_b, b) in zip(items, items[1:]):
        if a.classes != b.classes:
            i = next((k for k, (x, y) in enumerate(zip(a.classes, b.classes)) if x != y), min(len(a.classes),
                                                                                         len(b.classes)))
            at = lambda c: repr(c[i]) if i < len(c) else "nothing"  # noqa: E731
            raise DataError(f"{a.root / 'meta.json'} (data.{name_a}) and {b.root / 'meta.json'} (data.{name_b}) "
                            f"name different classes: train id {i} is {at(a.classes)} in one and {at(b.classes)} "
                            "in the other; both domains need the same classes.txt (names and order)")


def build_datasets(cfg: Any, domains: dict[str, dict[str, Any]], n_class: int) -> dict[str, TrainDataset]:
    """One TrainDataset per domain the method asks for (``{"source": {...}, "target": {...}}``).

    The dict values are TrainDataset keyword arguments (``label``, ``views``, ``extras``...). The source
    gets the LAB colour transfer to the target's statistics when ``data.lab_transfer`` is on; every labelled
    domain gets ``random_colors`` when ``data.random_colors`` is on (after the LAB transfer).
    """
    weak = weak_config(cfg.data)
    splits: dict[str, PreparedSplit] = {}
    for domain in set(domains) | ({"target"} if cfg.data.lab_transfer else set()):
        path = getattr(cfg.data, domain)
        if path is None:
            raise ConfigError(f"data.{domain}: required for stage {cfg.stage!r}")
        split = PreparedSplit(path)
        if len(split) == 0:
            raise DataError(f"{split.root}: data.{domain} has no samples")
        if split.n_class != n_class:
            raise ConfigError(f"data.{domain}: {split.root} has {split.n_class} classes, "
                              f"model.n_class is {n_class}")
        splits[domain] = split
    check_same_classes(splits)
    out = {}
    for domain, kwargs in domains.items():
        kwargs = dict(kwargs)
        if kwargs.get("label", True):
            splits[domain].require_labels(f"data.{domain}", f"stage {cfg.stage!r} trains on its labels and")
        if domain == "source" and cfg.data.lab_transfer:
            stats = splits["target"].lab_stats
            if stats is None:
                raise DataError(f"{splits['target'].root}: data.lab_transfer needs lab_stats.npy (prepare the "
                                "target split with lab_stats: true)")
            kwargs.setdefault("lab_stats", stats)
        if cfg.data.random_colors and kwargs.get("label", True):
            kwargs.setdefault("random_colors", True)
        out[domain] = TrainDataset(splits[domain], weak, **kwargs)
    return out


def workers_per_rank(workers: int, world_size: int) -> int:
    """``data.workers`` is per job (like ``threads``): each of ``world_size`` ranks gets ``workers // world_size``
    worker processes per loader, at least 1 (0 stays 0: load in the training process)."""
    return 0 if workers <= 0 else max(1, workers // max(1, world_size))


def build_loaders(cfg: Any, datasets: dict[str, TrainDataset], *, rank: int, world_size: int, start_iter: int,
                  pin_memory: bool = False) -> dict[str, DataLoader]:
    """Endless loaders, one per domain, positioned at ``start_iter``, with ``workers_per_rank`` workers each."""
    loaders = {}
    for domain, ds in datasets.items():
        stream = STREAMS.get(domain, 2 + sorted(datasets).index(domain))
        sampler = InfiniteSampler(len(ds), cfg.data.batch_size, seed=cfg.seed, stream=stream, rank=rank,
                                  world_size=world_size, start_iter=start_iter)
        loaders[domain] = make_loader(ds, sampler, workers=workers_per_rank(cfg.data.workers, world_size),
                                      seed=_seed_int(cfg.seed, stream, 2, rank), pin_memory=pin_memory)
    return loaders
