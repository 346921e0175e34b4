"""Stage 1 at paper scale on the CPU: one training sample from a stored soft label, and one training iteration.

    .venv/bin/python benchmarks/stage1_step.py [--threads 2] [--iters 2] [--out benchmarks/stage1_step.json]

Part 1, the data path (no network): a (19, 129, 257) soft label stored with ``cpsl.data.pseudo.save_soft``
for a 1024 x 2048 image, turned into the stage-1 target entry ``soft`` (19, 128, 224) by ``SoftLabelExtras``
for the largest weak scale (1649 x 3299, the reference's worst case), and the reference's path for comparison
(upsample to 19 x 1024 x 2048 with align_corners=True, resize to the scaled size, crop, flip). Peak RSS growth
is measured with /proc/self/clear_refs + VmHWM (Linux). Also the whole target sample (image decode, weak and
strong views, the full image, the soft label) through ``TrainDataset``.

Part 2, one stage-1 iteration (``SelfLabel.step``) with ``ModelConfig()`` (DeepLab-v2 ResNet-101, random
weights: the cost does not depend on them), crop 512 x 896, global batch 1, EMA on the full 1024 x 2048 image,
queue length 65536 *pre-filled* (steady state: Sinkhorn over 65792 rows per image and branch, and the
contrastive term against the full queue) and CutMix off (the contrastive term runs only without CutMix; the
worst case). Time per iteration and the process's peak RSS over the iteration.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cpsl.config import DatasetConfig, PrepareConfig, TrainConfig, load  # noqa: E402
from cpsl.data.pseudo import load_soft, quantize_soft, save_soft, soft_path  # noqa: E402
from cpsl.data.transforms import WeakParams  # noqa: E402
from cpsl.inference import normalize_image  # noqa: E402
from cpsl.methods import Amp, TrainContext  # noqa: E402
from cpsl.methods.selflabel import SelfLabel, SoftLabelExtras  # noqa: E402
from cpsl.steps import prepare  # noqa: E402
from cpsl.train.data import build_datasets  # noqa: E402
from cpsl.train.dist import DistInfo  # noqa: E402
from cpsl.train.loop import to_device  # noqa: E402

REF_MARGINAL = [.37922, .04930, .22665, .01551, .01721, .01403, .00219, .00221, .13338, .02424, .04341, .01315,
                .00161, .06605, .00408, .00279, .00185, .00123, .00191]


def _kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


class PeakRss:
    """Peak RSS growth (MiB) of the enclosed block: resets the high-water mark, reads VmHWM afterwards."""

    def __enter__(self) -> "PeakRss":
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        self.before = _kib("VmRSS")
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.t0
        self.peak_mib = _kib("VmHWM") / 1024
        self.growth_mib = (_kib("VmHWM") - self.before) / 1024


def smooth_soft(c: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, c, 9, 17, generator=g) * 4
    return F.softmax(F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=True)[0], dim=0)


def reference_soft_path(soft: torch.Tensor, p: WeakParams) -> torch.Tensor:
    """The reference's loader (spec 1.5): full size first, then RandomSized, RandomCrop, flip."""
    full = F.interpolate(soft[None], size=p.orig_hw, mode="bilinear", align_corners=True)
    scaled = F.interpolate(full, size=p.scaled_hw, mode="bilinear", align_corners=True)
    y1, x1, h, w = p.crop
    crop = scaled[0, :, y1:y1 + h, x1:x1 + w]
    return crop.flip(-1) if p.flip else crop.contiguous()


def make_split(base: Path, name: str, seed: int) -> Path:
    """A folder-format split with one 1024 x 2048 image (smooth colours + noise) and a 19-class label."""
    rng = np.random.default_rng(seed)
    root = base / f"raw_{name}"
    (root / "images" / "train").mkdir(parents=True)
    (root / "labels" / "train").mkdir(parents=True)
    small = rng.integers(0, 255, (16, 32, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(small).resize((2048, 1024), Image.Resampling.BILINEAR)).astype(np.int16)
    img = np.clip(img + rng.integers(-20, 20, img.shape), 0, 255).astype(np.uint8)
    lab = np.asarray(Image.fromarray(rng.integers(0, 19, (16, 32), dtype=np.uint8)).resize(
        (2048, 1024), Image.Resampling.NEAREST))
    Image.fromarray(img).save(root / "images" / "train" / "img0.png")
    Image.fromarray(lab).save(root / "labels" / "train" / "img0.png")
    (root / "classes.txt").write_text("".join(f"c{k}\n" for k in range(19)))
    out = base / f"prep_{name}"
    prepare.run(PrepareConfig(DatasetConfig(format="folder", root=root, split="train", n_class=19, workers=0),
                              lab_stats=False), out)
    return out


def part1(base: Path) -> dict:
    soft = smooth_soft(19, 129, 257)
    soft_dir = base / "soft"
    nbytes = save_soft(soft_path(soft_dir, "img0"), quantize_soft(soft))
    save_soft(soft_path(soft_dir, "tiny"), quantize_soft(smooth_soft(19, 9, 17)))
    # ours in a fresh process (a warm process's allocator reuses freed blocks and hides the growth)
    child = subprocess.run([sys.executable, __file__, "--measure-extras", str(soft_dir)], check=True,
                           capture_output=True, text=True)
    ours = json.loads(child.stdout.strip().splitlines()[-1])
    stored = torch.from_numpy(load_soft(soft_path(soft_dir, "img0")))
    with PeakRss() as ref:
        ref_out = reference_soft_path(stored, WORST)
    assert ref_out.shape == (19, 512, 896)
    del ref_out
    return {"soft_file_bytes": nbytes, "ours_s": ours["seconds"], "ours_peak_rss_growth_mib": ours["growth_mib"],
            "reference_s": ref.seconds, "reference_peak_rss_growth_mib": ref.growth_mib,
            "output_shape": ours["shape"]}


WORST = WeakParams((1024, 2048), (1649, 3299), (1000, 2000, 512, 896), True)


def measure_extras(soft_dir: Path) -> dict:
    """In a fresh process: warm the code path up on a tiny file, then build one ``soft`` entry at paper scale."""
    SoftLabelExtras(soft_dir, ["tiny"], (8, 14), 19)(0, WeakParams((64, 128), (100, 200), (60, 100, 32, 56), True))
    extras = SoftLabelExtras(soft_dir, ["img0"], (128, 224), 19)
    with PeakRss() as ours:
        out = extras(0, WORST)["soft"]
    return {"seconds": ours.seconds, "growth_mib": ours.growth_mib, "shape": list(out.shape)}


def build_cfg(base: Path, source: Path, target: Path) -> TrainConfig:
    protos = base / "prototypes.pt"
    torch.save({"prototypes": torch.randn(19, 256, generator=torch.Generator().manual_seed(0))}, protos)
    np.save(base / "class_distribution.npy", np.asarray(REF_MARGINAL) / sum(REF_MARGINAL))
    cfg = load(TrainConfig, {
        "stage": "stage1", "max_iters": 90000, "seed": 6523, "device": "cpu", "init_checkpoint": "unused",
        "data": {"source": str(source), "target": str(target), "batch_size": 1, "workers": 0},
        "optim": {"lr": 1e-4, "head_lr_mult": 5.0},
        "selflabel": {"soft_labels": str(base / "soft"), "prototypes": str(protos),
                      "class_dist": str(base / "class_distribution.npy"), "cutmix_p": 0.0}})
    return dataclasses.replace(cfg, init_checkpoint=None)  # random ResNet-101 weights: same cost


def part2(base: Path, source: Path, target: Path, iters: int) -> dict:
    cfg = build_cfg(base, source, target)
    cpu = torch.device("cpu")
    method = SelfLabel(cfg, TrainContext(cpu, DistInfo(0, 1, 0, cpu), Amp("off", cpu)))
    q = method.queue  # steady state: a full queue of unit feature / logit rows
    g = torch.Generator().manual_seed(1)
    q.feats.copy_(F.normalize(torch.randn(q.feats.shape, generator=g), dim=1))
    q.logits.copy_(F.normalize(torch.randn(q.logits.shape, generator=g), dim=1))
    q.labels.copy_(torch.randint(0, 19, q.labels.shape, generator=g))
    q.filled = q.length

    datasets = build_datasets(cfg, method.domains, 19)
    samples = {}
    with PeakRss() as sample_cost:
        samples["target"] = datasets["target"][(0, 123)]
    samples["source"] = datasets["source"][(0, 456)]
    batch = {d: to_device(torch.utils.data.default_collate([s]), cpu) for d, s in samples.items()}
    times, peaks = [], []
    for _ in range(iters):
        method.train_mode()
        with PeakRss() as it:
            losses = method.step(batch)
        for s in method.schedulers.values():
            s.step()
        times.append(it.seconds)
        peaks.append(it.peak_mib)
        print(f"  iteration: {it.seconds:.1f} s, peak RSS {it.peak_mib:.0f} MiB, losses {losses}", flush=True)
    # Where the time goes: one student forward + backward on the crop, one EMA forward on the full image.
    method.optimizer.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    out = method.net(batch["target"]["image"])
    (out["out"].float().mean() + out["feat"].float().mean()).backward()
    student_fb = time.perf_counter() - t0
    del out
    method.optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        t0 = time.perf_counter()
        method.ema(normalize_image(batch["target"]["image_full"]))
        ema_f = time.perf_counter() - t0
    print(f"  student forward+backward 512x896: {student_fb:.1f} s; EMA forward 1024x2048: {ema_f:.1f} s", flush=True)
    return {"student_forward_backward_s": student_fb, "ema_forward_full_s": ema_f,
            "target_sample_s": sample_cost.seconds, "target_sample_peak_rss_growth_mib": sample_cost.growth_mib,
            "iteration_s": times, "iteration_peak_rss_mib": peaks, "losses": losses}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--skip-step", action="store_true", help="only part 1 (the data path)")
    ap.add_argument("--measure-extras", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure_extras is not None:
        torch.set_num_threads(1)  # as in a DataLoader worker
        print(json.dumps(measure_extras(args.measure_extras)))
        return
    torch.set_num_threads(args.threads)
    result = {"torch": torch.__version__, "threads": args.threads, "cpu": platform.processor() or platform.machine(),
              "cores": os.cpu_count(), "loadavg_start": os.getloadavg()}
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        source, target = make_split(base, "source", 0), make_split(base, "target", 1)
        result["soft_label"] = part1(base)
        print(json.dumps(result["soft_label"], indent=1), flush=True)
        if not args.skip_step:
            result["step"] = part2(base, source, target, args.iters)
    result["loadavg_end"] = os.getloadavg()
    text = json.dumps(result, indent=1)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
