"""``cpsl prepare``: check one dataset split and convert its labels to train-id PNGs, once.

Every later step reads the prepared split (``cpsl.data.prepared.PreparedSplit``) instead of the raw dataset, so
label conversion, validation and per-image statistics happen here and nowhere else.

Output directory::

    list.txt            name <TAB> absolute image path <TAB> labels/<name>.png   (one line per kept sample;
                        ``-`` in place of the label in an unlabelled split, ``dataset.labels: false``)
    labels/<name>.png   uint8 train ids, 255 = ignore, same H x W as the image
    class_counts.json   {"classes", "pixels" (per train id), "ignore", "images"}
    lab_stats.npy       float32 (N, 2, 3): per image, mean and std of L, a, b (when lab_stats is on)
    meta.json           format, root, split, n_class, classes, labels, n_images, image_sizes, image_bits,
                        image_max (largest raw value of the 16-bit images, null if none), skipped, warnings,
                        cpsl_version

Warnings (printed, and listed in meta.json): a labelled split whose every label pixel is ignore (255; training
refuses it), and 16-bit images that use 12 bits or fewer while ``dataset.image_bits`` is 16 (they would come out
near-black).

Everything is written into a hidden temp folder next to ``out`` and renamed at the end, so an interrupted or
failed run leaves neither a partial ``out`` nor a changed previous one.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np

import cpsl
from cpsl import labels, progress
from cpsl.config import PrepareConfig
from cpsl.data import get_format
from cpsl.data.common import Problem, Sample, decode_image, images_only, write_label_png
from cpsl.data.lab import lab_mean_std  # the one Lab statistics function (training reads these)
from cpsl.errors import DataError
from cpsl.outputs import publish_dir, remove_path, remove_stale_staging, staging_dir

MAX_LISTED_ON_STDERR = 50
UNLABELLED = "-"  # list.txt's label column in an unlabelled split


@dataclass(frozen=True)
class _Job:
    """What every worker needs to convert one sample (sent once per worker, not per image)."""

    format: str
    n_class: int
    lut: np.ndarray
    known: frozenset[int]
    expected_size: tuple[int, int] | None
    label_dir: Path
    lab_stats: bool
    image_bits: int = 16
    min_side: int = 7


@dataclass(frozen=True)
class _Converted:
    """Per-image results gathered by the parent process."""

    name: str
    image: Path
    height: int
    width: int
    train_counts: np.ndarray | None  # int64 (256,): pixels per train id (index 255 = ignore); None: no label
    lab: np.ndarray | None    # float64 (2, 3): mean and std of L, a, b
    peak: int | None = None   # largest raw sample of a 16-bit image


_JOB: _Job | None = None


def _init_worker(job: _Job, single_thread: bool) -> None:
    global _JOB
    _JOB = job
    if single_thread:
        cv2.setNumThreads(1)  # the pool already uses every core; avoid oversubscription


def _reason(err: Exception, path: Path) -> str:
    """The message of ``err`` without its leading ``<path>: `` (the Problem names the file separately).

    Decoders raise DataError; anything else (a decoder failing in an unforeseen way, out of memory on a huge
    file) is reported with its type, as one line, so that one odd file cannot stop a 25k-image run.
    """
    msg = " ".join(str(err).split())
    if not isinstance(err, DataError):
        return f"unexpected {type(err).__name__} while decoding: {msg[:200]}"
    prefix = f"{path}: "
    return msg[len(prefix):] if msg.startswith(prefix) else msg


def _describe_ids(known: frozenset[int]) -> str:
    ids = sorted(known)
    runs: list[str] = []
    start = prev = ids[0]
    for v in ids[1:] + [None]:  # type: ignore[list-item]
        if v is not None and v == prev + 1:
            prev = v
            continue
        runs.append(f"{start}" if start == prev else f"{start}..{prev}")
        if v is not None:
            start = prev = v
    return ", ".join(runs)


def convert_sample(sample: Sample, job: _Job) -> _Converted | Problem:
    """Decode, check and convert one sample, writing its train-id PNG under ``job.label_dir``."""
    fmt = get_format(job.format)
    if any(c in s for s in (sample.name, str(sample.image)) for c in "\t\n\r"):
        return Problem(sample.image, "file name contains a tab or newline")
    try:
        image, peak = decode_image(sample.image, job.image_bits)
    except Exception as err:
        return Problem(sample.image, _reason(err, sample.image))
    h, w = image.shape[:2]
    if job.expected_size is not None and (h, w) != job.expected_size:
        eh, ew = job.expected_size
        return Problem(sample.image, f"image is {h}x{w} (HxW), expected {eh}x{ew} (dataset.expected_size)")
    if max(h, w) < job.min_side:
        return Problem(sample.image, f"image is {h}x{w} (HxW), smaller than the network takes (its output, 1/8 "
                                     f"of the image, would be a single pixel: at least {job.min_side} pixels on one "
                                     "side, dataset.min_side)")
    lab = lab_mean_std(image) if job.lab_stats else None
    if sample.label is None:
        return _Converted(sample.name, sample.image, h, w, None, lab, peak)
    try:
        raw = fmt.read_raw_label(sample.label)
    except Exception as err:
        return Problem(sample.label, _reason(err, sample.label))
    if raw.shape[:2] != (h, w):
        return Problem(sample.label, f"label is {raw.shape[0]}x{raw.shape[1]} but image {sample.image.name} is {h}x{w}")
    if raw.dtype in (np.uint8, np.uint16):
        counts = np.bincount(raw.ravel(), minlength=256 if raw.dtype == np.uint8 else 1 << 16)
        present = np.flatnonzero(counts)
    else:
        present, cnt = np.unique(raw, return_counts=True)
        counts = None
    unknown = [int(v) for v in present if int(v) not in job.known]
    if unknown:
        shown = ", ".join(map(str, unknown[:10])) + (", ..." if len(unknown) > 10 else "")
        return Problem(
            sample.label, f"unknown label ids [{shown}] (the {job.format} format defines {_describe_ids(job.known)})"
        )
    if counts is None:  # only known ids are present, so they fit the table
        raw = raw.astype(np.int64)
        counts = np.zeros(job.lut.size, dtype=np.int64)
        counts[present] = cnt
        present = np.flatnonzero(counts)
    train = labels.apply_lut(raw, job.lut)
    train_counts = np.bincount(job.lut[present], weights=counts[present], minlength=256).astype(np.int64)
    write_label_png(job.label_dir / f"{sample.name}.png", train)
    return _Converted(sample.name, sample.image, h, w, train_counts, lab, peak)


def _convert_indexed(item: tuple[int, Sample]) -> tuple[int, _Converted | Problem]:
    assert _JOB is not None, "worker not initialised"
    index, sample = item
    return index, convert_sample(sample, _JOB)


def _convert_all(samples: list[Sample], job: _Job, workers: int) -> Iterator[tuple[int, _Converted | Problem]]:
    """Yield (index, result) for every sample, in order; ``workers`` processes (0 = this process)."""
    items = list(enumerate(samples))
    if workers == 0 or len(samples) <= 1:
        _init_worker(job, single_thread=False)
        yield from map(_convert_indexed, items)
        return
    ctx = multiprocessing.get_context("spawn")  # no fork of a process that may hold threads (torch, OpenCV)
    chunk = max(1, min(16, len(items) // (workers * 8)))
    with ctx.Pool(min(workers, len(items)), initializer=_init_worker, initargs=(job, True)) as pool:
        yield from pool.imap(_convert_indexed, items, chunksize=chunk)


def _first_problem_error(problems: list[Problem], scan_only: bool = False) -> DataError:
    first, n = problems[0], len(problems)
    count = f"{n} problem{'s' if n != 1 else ''}" + (" found by the file scan" if scan_only else " in total")
    return DataError(f"{first.file}: {first.reason} ({count}; set dataset.allow_skip: true to skip such images)")


def _check_root(root: Path) -> None:
    if not root.exists():
        raise DataError(f"{root}: dataset root not found (dataset.root)")
    if not root.is_dir():
        raise DataError(f"{root}: dataset root is not a folder (dataset.root)")
    if not any(root.iterdir()):
        raise DataError(f"{root}: dataset root is empty (dataset.root)")


def _write_json(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def run(cfg: PrepareConfig, out: Path) -> dict:
    """Prepare ``cfg.dataset`` into ``out``; returns the meta.json content. Raises DataError/ConfigError."""
    ds = cfg.dataset
    out = Path(os.path.abspath(out))
    root = Path(os.path.abspath(Path(ds.root).expanduser()))
    fmt = get_format(ds.format)
    _check_root(root)
    class_names = tuple(fmt.classes(root, ds.n_class))
    samples, problems = fmt.scan(root, ds.split)
    if not ds.labels:
        samples, problems = images_only(samples, problems)
    if not samples and not problems:
        raise DataError(f"{root}: no images found for {ds.format} split {ds.split!r} (dataset.root, dataset.split)")
    if problems and not ds.allow_skip:
        raise _first_problem_error(problems, scan_only=True)

    tmp = staging_dir(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(out)  # what a killed run left
    remove_path(tmp)
    try:
        tmp.mkdir()
        job = _Job(
            format=ds.format,
            n_class=ds.n_class,
            lut=fmt.lut(ds.n_class),
            known=frozenset(fmt.known_ids(ds.n_class)),
            expected_size=tuple(ds.expected_size) if ds.expected_size else None,  # type: ignore[arg-type]
            label_dir=tmp / "labels",
            lab_stats=cfg.lab_stats,
            image_bits=ds.image_bits,
            min_side=ds.min_side,
        )
        (tmp / "labels").mkdir()
        kept: list[_Converted] = []
        counts = np.zeros(256, dtype=np.int64)
        results = _convert_all(samples, job, ds.workers)
        try:
            for _, res in progress.bar(results, total=len(samples), desc=f"prepare {ds.format}/{ds.split}", unit="img"):
                if isinstance(res, Problem):
                    problems.append(res)
                else:
                    if res.train_counts is not None:
                        counts += res.train_counts
                    kept.append(replace(res, train_counts=None))  # keep the parent's memory small
        finally:
            results.close()  # stops the worker pool at once if anything above failed
        if problems and not ds.allow_skip:
            raise _first_problem_error(problems)
        if not kept:
            first = f"; first: {problems[0].file}: {problems[0].reason}" if problems else ""
            raise DataError(
                f"{root}: no usable images in {ds.format} split {ds.split!r} "
                f"({len(problems)} skipped{first}) (dataset.root)"
            )
        meta = _write_outputs(tmp, kept, counts, problems, class_names, root, cfg)
        publish_dir(tmp, out, "prepare")
    except BaseException:
        remove_path(tmp)
        raise
    if problems:
        _report_skipped(problems)
    for warning in meta["warnings"]:
        print(f"cpsl prepare: warning: {warning}", file=sys.stderr)
    return meta


def _report_skipped(problems: list[Problem]) -> None:
    print(f"cpsl prepare: skipped {len(problems)} image(s) (listed in meta.json):", file=sys.stderr)
    for p in problems[:MAX_LISTED_ON_STDERR]:
        print(f"  {p.file}: {p.reason}", file=sys.stderr)
    if len(problems) > MAX_LISTED_ON_STDERR:
        print(f"  ... and {len(problems) - MAX_LISTED_ON_STDERR} more", file=sys.stderr)


def _write_outputs(
    tmp: Path,
    kept: list[_Converted],
    counts: np.ndarray,
    problems: list[Problem],
    class_names: tuple[str, ...],
    root: Path,
    cfg: PrepareConfig,
) -> dict:
    ds = cfg.dataset
    n_class = len(class_names)
    lines = [f"{c.name}\t{c.image}\t{f'labels/{c.name}.png' if ds.labels else UNLABELLED}\n" for c in kept]
    (tmp / "list.txt").write_text("".join(lines), encoding="utf-8")

    stray = int(counts[n_class:].sum() - counts[labels.IGNORE_INDEX])
    assert stray == 0, "lookup table produced ids outside 0..n_class-1 and 255"
    _write_json(tmp / "class_counts.json", {
        "classes": list(class_names),
        "pixels": [int(v) for v in counts[:n_class]],
        "ignore": int(counts[labels.IGNORE_INDEX]),
        "images": len(kept),
    })

    if cfg.lab_stats:
        stats = np.stack([c.lab for c in kept]).astype(np.float32)  # type: ignore[misc]
        np.save(tmp / "lab_stats.npy", stats)

    sizes: dict[tuple[int, int], int] = {}
    for c in kept:
        sizes[(c.height, c.width)] = sizes.get((c.height, c.width), 0) + 1
    peaks = [c.peak for c in kept if c.peak is not None]
    image_max = max(peaks) if peaks else None
    warnings = []
    if ds.labels and int(counts[:n_class].sum()) == 0:
        warnings.append(f"every label pixel of the {len(kept)} images is 255 (ignore): this split has no labels "
                        "to learn from, and training refuses it (an unlabelled split is `dataset.labels: false`)")
    used = int(image_max).bit_length() if image_max else 0
    if image_max is not None and used <= 12 and ds.image_bits == 16:
        warnings.append(f"the 16-bit images use only {used} bits (largest value {image_max}); with "
                        f"dataset.image_bits: 16 they are scaled by 255/65535 and come out near-black: set "
                        f"dataset.image_bits: {max(used, 8)} (value * 255 / (2**bits - 1))")
    meta = {
        "format": ds.format,
        "root": str(root),
        "split": ds.split,
        "n_class": n_class,
        "classes": list(class_names),
        "labels": bool(ds.labels),
        "n_images": len(kept),
        "image_sizes": [{"height": h, "width": w, "count": n} for (h, w), n in sorted(sizes.items())],
        "image_bits": ds.image_bits,
        "image_max": image_max,
        "lab_stats": bool(cfg.lab_stats),
        "skipped": [p.to_dict() for p in problems],
        "warnings": warnings,
        "cpsl_version": cpsl.__version__,
    }
    _write_json(tmp / "meta.json", meta)
    return meta
