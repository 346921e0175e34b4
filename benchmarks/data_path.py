"""The training data path at a paper preset's settings: CPU seconds per sample and per iteration, per stage.

    .venv/bin/python benchmarks/data_path.py [--preset gta5_cityscapes] [--iters 4] [--data /tmp/cpsl_data_path]
                                             [--out /tmp/data_path.json]
    .venv/bin/python benchmarks/data_path.py --save-samples /tmp/samples.npz    # in one checkout, then
    .venv/bin/python benchmarks/data_path.py --compare /tmp/samples.npz         # in another: are they equal?

Generates real-size images in the real layouts (GTA5 1914 x 1052 palettised labels, Cityscapes 2048 x 1024
``leftImg8bit``/``gtFine``, SYNTHIA 1280 x 760 16-bit labels; content from ``cpsl.data.synth.make_sample``:
street scenes, the target ones with texture, haze, noise and JPEG blocking), prepares them with
``cpsl.steps.prepare`` (target with lab_stats), and writes the stage products the training stages read at their
real sizes: stage-1 soft labels (C x 129 x 257 for a 1024 x 2048 image, ``pseudo.save_soft``) and stage-2/3 hard
labels with their confidence (full size, ``pseudo.save_hard``). Everything goes under ``--data`` and is reused
by later runs.

Each stage's training settings come from ``config.yaml`` through ``cpsl.workflow.train_config`` (as the workflow
writes them for ``cpsl train``), its datasets from ``cpsl.train.data.build_datasets`` with the domains its method
asks for (``method.domains``, written out below: building the methods would need ResNet-101 and the stage
inputs' networks), and its samples in the order the training loop draws them (``InfiniteSampler``: iteration
``i`` takes positions ``4i .. 4i+3`` of each domain). One thread (OpenCV and torch), no DataLoader workers: CPU
seconds of this process (``time.process_time``) per ``dataset[item]``.

The per-part breakdown comes from a second pass under ``cProfile`` (cumulative time of the functions that do
each part; the profiler adds a few per cent): decode (image file to RGB), label (the label PNG, its resize and
crop; in stages 2-3 the hard pseudo label and its confidence), LAB (the colour transfer), resize (RandomSized +
crop + flip of the image), strong (the strong view), tensor (numpy to torch), extras (the soft label's
resampling), other (the rest). A part's functions differ between versions (before #21 the label was resized
inside ``apply_weak``, so "resize" held it, and the LAB transfer ran on the whole image in ``lab_transfer``).

``--save-samples`` / ``--compare``: the first 4 samples of every stage and domain, written by one checkout and
compared by another (the images to the level, every other entry for equality), on the same generated data.
"""

from __future__ import annotations

import argparse
import cProfile
import importlib
import json
import os
import platform
import pstats
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from PIL import Image  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cpsl import workflow  # noqa: E402
from cpsl.config import DatasetConfig, PrepareConfig, TrainConfig, load  # noqa: E402
from cpsl.data import pseudo  # noqa: E402
from cpsl.data.prepared import PreparedSplit  # noqa: E402
from cpsl.data.synth import _GTA5_PALETTE, make_sample  # noqa: E402
from cpsl.methods.distill import HardLabelExtras  # noqa: E402
from cpsl.methods.selflabel import SoftLabelExtras  # noqa: E402
from cpsl.steps import prepare  # noqa: E402
from cpsl.train.data import STREAMS, InfiniteSampler, build_datasets  # noqa: E402

STAGES = ("source_only", "warmup", "stage1", "stage2", "stage3")
SIZES = {"gta5": (1052, 1914), "cityscapes": (1024, 2048), "synthia": (760, 1280)}
CITY = "aachen"
# Cityscapes labelIds -> SYNTHIA class ids for the generated SYNTHIA labels (0 = void); the classes only need to
# be valid ids, the cost does not depend on them.
SYNTHIA_IDS = {7: 3, 8: 4, 11: 2, 12: 12, 13: 11, 17: 15, 19: 9, 20: 8, 21: 6, 23: 1, 24: 10, 25: 17, 26: 5,
               28: 16, 32: 19, 33: 18}

# What makes up each part: the cumulative time of (function, caller) pairs, minus the parts nested in it. A
# function is (file name ending, name); "*" matches any file; caller None: from anywhere.
_HARD = ("distill.py", "__call__")  # HardLabelExtras
_SOFT = ("selflabel.py", "__call__")  # SoftLabelExtras
_LAB_MAP = ("lab.py", "__call__")  # LabTransfer
_WEAK_LABEL = ("*", "weak_label")  # in transforms.py since #21, distill.py before
_HARD_LABEL = [(("pseudo.py", f), _HARD) for f in ("load_hard", "load_hard_conf", "threshold_hard")] + \
    [(_WEAK_LABEL, _HARD)]
PARTS: dict[str, tuple[list, list]] = {
    "decode": ([(("common.py", "read_image"), None)], []),
    "label": ([(("common.py", "read_train_id_png"), None), (_WEAK_LABEL, ("transforms.py", "apply_weak"))]
              + _HARD_LABEL, []),
    "lab": ([(("transforms.py", "lab_transfer"), None), (_LAB_MAP, ("transforms.py", "weak_image")),
             (_LAB_MAP, ("data.py", "__getitem__")), (("lab.py", "lab_mean_std"), ("data.py", "__getitem__"))],
            []),
    "resize": ([(("transforms.py", "apply_weak"), None)],
               [(_WEAK_LABEL, ("transforms.py", "apply_weak")), (_LAB_MAP, ("transforms.py", "weak_image"))]),
    "strong": ([(("transforms.py", "strong_augment"), None)], []),
    "tensor": ([(("inference.py", "image_to_tensor"), None), (("inference.py", "image_to_uint8_tensor"), None)], []),
    "extras": ([(_SOFT, None), (_HARD, None)], _HARD_LABEL),
}
ITEM = (("data.py", "__getitem__"), None)


def _save(img: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG")  # PIL's default compression (level 6), as the released datasets


def generate(data: Path, n: int) -> None:
    """n images per dataset in the real layouts (skipped when present)."""
    done = data / "generated.json"
    if done.is_file() and json.loads(done.read_text()).get("n") == n:
        return
    for i in range(n):
        img, lab = make_sample(0, "source", i, *SIZES["gta5"])
        _save(Image.fromarray(img, "RGB"), data / "gta5" / "images" / f"{i + 1:05d}.png")
        p = Image.frombytes("P", lab.shape[::-1], lab.tobytes())
        p.putpalette(_GTA5_PALETTE)
        _save(p, data / "gta5" / "labels" / f"{i + 1:05d}.png")

        img, lab = make_sample(0, "target_train", i, *SIZES["cityscapes"])
        stem = f"{CITY}_{i:06d}_000019"
        _save(Image.fromarray(img, "RGB"), data / "cityscapes" / "leftImg8bit" / "train" / CITY /
              f"{stem}_leftImg8bit.png")
        _save(Image.fromarray(lab, "L"), data / "cityscapes" / "gtFine" / "train" / CITY /
              f"{stem}_gtFine_labelIds.png")

        img, lab = make_sample(0, "source", 100 + i, *SIZES["synthia"])
        _save(Image.fromarray(img, "RGB"), data / "synthia" / "RGB" / f"{i:07d}.png")
        ids = np.zeros(lab.shape, np.uint16)
        for city_id, synthia_id in SYNTHIA_IDS.items():
            ids[lab == city_id] = synthia_id
        gt = np.zeros((*lab.shape, 3), np.uint16)  # OpenCV order: B, G (instance), R (class id)
        gt[..., 2] = ids
        gt[..., 1] = np.arange(lab.size, dtype=np.uint16).reshape(lab.shape) % 977
        path = data / "synthia" / "GT" / "LABELS" / f"{i:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        assert cv2.imwrite(str(path), gt)
    done.write_text(json.dumps({"n": n}))


def experiment(preset: str, data: Path) -> tuple[dict, dict]:
    """config.yaml with the preset's roots on the generated data and results under ``data/results``."""
    config = yaml.safe_load((ROOT / "config.yaml").read_text())
    config["results_dir"] = str(data / "results")
    settings = config["experiment_settings"][preset]
    source_format = settings["datasets"]["source"]["format"]
    for role, ds in settings["datasets"].items():
        ds["root"] = str(data / ("cityscapes" if role.startswith("target") else source_format))
        ds["split"] = "train" if role.startswith("target") else "all"
    return config, settings


def prepare_all(config: dict, preset: str, settings: dict) -> None:
    for role in ("source", "target_train"):
        out = workflow.prepared_dir(config, preset, role)
        if (out / "meta.json").is_file():
            continue
        cfg = load(PrepareConfig, workflow.prepare_config(config, preset, role))
        ds = cfg.dataset
        cfg = PrepareConfig(dataset=DatasetConfig(**{**ds.__dict__, "workers": 0}), lab_stats=cfg.lab_stats)
        prepare.run(cfg, out)


def stage_products(config: dict, preset: str, seed: int, n_class: int) -> None:
    """Soft labels (warm-up) and hard labels (stages 1 and 2) for every target image, at their real sizes."""
    split = PreparedSplit(workflow.prepared_dir(config, preset, "target_train"))
    rng = np.random.default_rng(0)
    for stage, kind in (("warmup", "pseudo_soft"), ("stage1", "pseudo_hard"), ("stage2", "pseudo_hard")):
        root = workflow.product_path(config, preset, seed, stage, kind)
        for name, path in zip(split.names, split.image_paths):
            h, w = Image.open(path).size[::-1]
            low = torch.from_numpy(rng.normal(size=(1, n_class, max(2, h // 128), max(2, w // 128))))
            low = torch.nn.functional.interpolate(low.float(), size=((h + 7) // 8 + 1, (w + 7) // 8 + 1),
                                                  mode="bicubic", align_corners=True)
            probs = (low * 8).softmax(1)
            if kind == "pseudo_soft":
                if not pseudo.soft_path(root, name).is_file():
                    pseudo.save_soft(pseudo.soft_path(root, name), pseudo.quantize_soft(probs[0]))
            elif not pseudo.hard_paths(root, name)["label"].is_file():
                full = torch.nn.functional.interpolate(probs, size=(h, w), mode="bilinear", align_corners=True)[0]
                conf, label = full.max(0)
                pseudo.save_hard(root, name, label.to(torch.uint8).numpy(), pseudo.quantize_conf(conf))


def domains(cfg: TrainConfig, stage: str, target_names: list[str]) -> dict[str, dict]:
    """What each stage's method puts in ``self.domains`` (cpsl/methods: source_only, warmup, selflabel,
    distill)."""
    if stage == "source_only":
        return {"source": {"label": True}}
    if stage == "warmup":
        return {"source": {"label": True}, "target": {"label": False}}
    if stage == "stage1":
        quarter = (int(cfg.data.crop[0]) // 4, int(cfg.data.crop[1]) // 4)
        extras = SoftLabelExtras(cfg.selflabel.soft_labels, target_names, quarter, cfg.model.n_class)
        return {"source": {"label": True},
                "target": {"label": False, "views": ("weak", "strong", "full"), "extras": extras}}
    d = cfg.distill
    views = ("weak", "strong") if d.strong_view else ("weak",)
    return {"source": {"label": True},
            "target": {"label": False, "views": views, "extras": HardLabelExtras(d.hard_labels, target_names,
                                                                                 d.threshold)}}


def _matches(key: tuple, fn: tuple[str, str]) -> bool:
    file, _line, name = key
    return name == fn[1] and (fn[0] == "*" or file.endswith(fn[0]))


def _cum(stats: pstats.Stats, pairs: list) -> float:
    """Cumulative seconds of each (function, caller) pair, summed."""
    total = 0.0
    for key, (_cc, _nc, _tt, ct, callers) in stats.stats.items():  # type: ignore[attr-defined]
        for fn, caller in pairs:
            if _matches(key, fn):
                total += ct if caller is None else sum(c[3] for k, c in callers.items() if _matches(k, caller))
    return total


def measure_stage(cfg: TrainConfig, doms: dict[str, dict], iters: int) -> dict:
    datasets = build_datasets(cfg, doms, cfg.model.n_class)
    out: dict = {"per_domain": {}}
    per_iter = 0.0
    for domain, ds in datasets.items():
        sampler = InfiniteSampler(len(ds), cfg.data.batch_size, seed=cfg.seed, stream=STREAMS[domain])
        items = [sampler.item(p) for it in range(iters) for p in sampler.positions(it)]
        ds[items[0]]  # warm-up: imports, first allocations
        times = []
        for item in items:
            t0 = time.process_time()
            ds[item]
            times.append(time.process_time() - t0)
        prof = cProfile.Profile(time.process_time)
        prof.enable()
        for item in items:
            ds[item]
        prof.disable()
        stats = pstats.Stats(prof)
        n = len(items)
        profiled = _cum(stats, [ITEM]) / n
        parts = {part: (_cum(stats, pairs) - _cum(stats, nested)) / n for part, (pairs, nested) in PARTS.items()}
        parts["other"] = profiled - sum(parts.values())
        mean = float(np.mean(times))
        out["per_domain"][domain] = {"cpu_s_per_sample": mean, "min": float(np.min(times)),
                                     "max": float(np.max(times)), "samples": n,
                                     "profiled_cpu_s_per_sample": profiled,
                                     "parts_profiled": {k: round(v, 4) for k, v in parts.items()}}
        per_iter += mean * cfg.data.batch_size
    out["cpu_s_per_iteration"] = per_iter
    return out


def stage_samples(cfg: TrainConfig, doms: dict[str, dict], n: int) -> dict[str, np.ndarray]:
    """The first ``n`` samples of each domain as flat arrays (images as uint8 levels, everything else as is),
    keyed ``domain/position/entry``."""
    out = {}
    for domain, ds in build_datasets(cfg, doms, cfg.model.n_class).items():
        sampler = InfiniteSampler(len(ds), cfg.data.batch_size, seed=cfg.seed, stream=STREAMS[domain])
        for p in range(n):
            for key, value in ds[sampler.item(p)].items():
                entries = value.items() if isinstance(value, dict) else [("", value)]
                for sub, v in entries:
                    v = v.numpy() if torch.is_tensor(v) else np.asarray(v)
                    if key in ("image", "image_strong"):
                        v = np.rint(v * 255).astype(np.uint8)
                    out[f"{domain}/{p}/{key}{'.' + sub if sub else ''}"] = v
    return out


def compare_samples(stored: dict, now: dict) -> dict[str, str]:
    """Per domain and entry: 'equal', or for images the largest difference in levels and the share of values
    that differ."""
    if stored.keys() != now.keys():
        raise SystemExit(f"different sample entries: {sorted(stored.keys() ^ now.keys())[:5]}")
    result: dict[str, list] = {}
    for key, v in now.items():
        _stage, domain, _position, entry = key.split("/", 3)
        r = result.setdefault(f"{domain} {entry}", [0, 0, 0, True])
        if entry in ("image", "image_strong", "image_full"):
            d = np.abs(v.astype(np.int16) - stored[key].astype(np.int16))
            r[0], r[1], r[2] = max(r[0], int(d.max())), r[1] + int((d > 0).sum()), r[2] + d.size
        else:
            r[3] &= bool(np.array_equal(v, stored[key]))
    return {k: (f"max {m} levels, {100 * nd / n:.3f} % of values differ" if n else ("equal" if eq else "DIFFERENT"))
            for k, (m, nd, n, eq) in result.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="gta5_cityscapes", choices=["gta5_cityscapes", "synthia_cityscapes"])
    ap.add_argument("--iters", type=int, default=4, help="iterations per stage (batch_size samples per domain each)")
    ap.add_argument("--images", type=int, default=6, help="generated images per dataset")
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--data", type=Path, default=Path("/tmp/cpsl_data_path"))
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--save-samples", type=Path, default=None,
                    help="instead of timing: write the first 4 samples of every stage and domain (.npz)")
    ap.add_argument("--compare", type=Path, default=None,
                    help="instead of timing: compare the samples with a --save-samples file (another checkout's)")
    args = ap.parse_args()
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    # imported by the strong view's colour jitter on its first use (once per process, about 1.5 s): not per sample
    importlib.import_module("torchvision.transforms.functional")
    t_start = time.time()
    generate(args.data, args.images)
    config, settings = experiment(args.preset, args.data)
    seed = workflow.seeds(config, args.preset)[0]
    prepare_all(config, args.preset, settings)
    n_class = settings["n_class"]
    stage_products(config, args.preset, seed, n_class)
    result = {"preset": args.preset, "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.platform()}",
              "load_before": os.getloadavg(), "torch": torch.__version__, "opencv": cv2.__version__,
              "stages": {}}
    if args.save_samples or args.compare:
        samples = {}
        for stage in args.stages.split(","):
            cfg = load(TrainConfig, workflow.train_config(config, args.preset, seed, stage))
            names = PreparedSplit(cfg.data.target).names if cfg.data.target else []
            samples.update({f"{stage}/{k}": v for k, v in stage_samples(cfg, domains(cfg, stage, names), 4).items()})
        if args.save_samples:
            np.savez(args.save_samples, **samples)
        else:
            with np.load(args.compare) as z:
                stored = {k: z[k] for k in z.files}
            for kind, verdict in compare_samples(stored, samples).items():
                print(f"{kind}: {verdict}")
        return
    for stage in args.stages.split(","):
        cfg = load(TrainConfig, workflow.train_config(config, args.preset, seed, stage))
        names = PreparedSplit(cfg.data.target).names if cfg.data.target else []
        r = measure_stage(cfg, domains(cfg, stage, names), args.iters)
        result["stages"][stage] = r
        parts = {d: v["parts_profiled"] for d, v in r["per_domain"].items()}
        print(f"{stage}: {r['cpu_s_per_iteration']:.3f} CPU-s per iteration; per sample " +
              ", ".join(f"{d} {v['cpu_s_per_sample']:.4f}" for d, v in r["per_domain"].items()), flush=True)
        for d, p in parts.items():
            print(f"    {d}: " + ", ".join(f"{k} {v:.4f}" for k, v in p.items()), flush=True)
    result["load_after"] = os.getloadavg()
    result["wall_s"] = time.time() - t_start
    print(f"load average before {result['load_before'][0]:.2f}, after {result['load_after'][0]:.2f}; "
          f"{result['wall_s']:.0f} s")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
