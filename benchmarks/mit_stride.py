"""What a stride-4 network (MiT) does to the stage-1 soft labels: bytes per file and the per-sample read cost.

One 1024 x 2048 image's synthetic class probabilities (19 classes; softmax of smooth, strongly scaled logits
drawn once on an 8 x 16 grid of the image, so both strides see the same scene) stored three ways:

* ``stride8``:            DeepLab-v2's grid, 129 x 257 (today's files)
* ``stride4``:            MiT's own grid, 256 x 512 (``pseudo-soft grid_stride: null``)
* ``stride4_to_grid8``:   the MiT probabilities resized to the stride-8 grid (``grid_stride: 8``, the default)

For each: the .npz bytes (``cpsl.data.pseudo.save_soft``) and the stage-1 sample's soft-label cost
(``SoftLabelExtras``: read + decode the file, carry it into a 512 x 896 weak crop's 128 x 224 quarter grid),
median of ``--repeat`` runs on one torch thread.

    PYTHONPATH=. python benchmarks/mit_stride.py [--repeat 20]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from cpsl.data import pseudo
from cpsl.data.transforms import WeakParams
from cpsl.methods.selflabel import SoftLabelExtras
from cpsl.models import deeplabv2, mit


def probabilities(h: int, w: int, seed: int = 0, n_class: int = 19) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, n_class, 8, 16, generator=g)
    return (F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=True)[0] * 8).softmax(0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(1)
    H, W = 1024, 2048
    g8 = (deeplabv2.output_size(H), deeplabv2.output_size(W))
    g4 = (mit.output_size(H), mit.output_size(W))
    p4 = probabilities(*g4)
    cases = {
        "stride8": probabilities(*g8),
        "stride4": p4,
        "stride4_to_grid8": F.interpolate(p4[None], size=g8, mode="bilinear", align_corners=True)[0],
    }
    weak = WeakParams(orig_hw=(H, W), scaled_hw=(1100, 2200), crop=(300, 700, 512, 896), flip=True)
    print(f"{'layout':<18} {'grid':>9} {'npz bytes':>10} {'read+carry ms':>14}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, p in cases.items():
            path = pseudo.soft_path(Path(tmp), name)
            pseudo.save_soft(path, pseudo.quantize_soft(p[None])[0].numpy())
            extras = SoftLabelExtras(tmp, [name], (128, 224), 19)
            times = []
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                extras(0, weak)
                times.append(time.perf_counter() - t0)
            grid = f"{p.shape[1]}x{p.shape[2]}"
            print(f"{name:<18} {grid:>9} {path.stat().st_size:>10,} {statistics.median(times) * 1e3:>14.1f}")


if __name__ == "__main__":
    main()
