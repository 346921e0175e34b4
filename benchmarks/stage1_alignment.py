"""Two stage-1 geometry measurements behind #20 (items 1 and 4); prints plain lines, runs in seconds on a CPU.

1. Where the student's outputs land on the quarter-grid labels. DeepLab-v2's outputs are a stride-8 grid rounded
   up (65 x 113 for 512 x 896; sample i centred on crop pixel 8i); the labels sit at the centres of the crop's
   4x4 cells. A coordinate ramp upsampled to the label grid gives each label pixel's offset, per axis.
2. Which strong-view consistency teacher is closest to the exact one. Stride-8 features (40 regions of 19
   classes, 64 dims, plus noise) are sampled bilinearly on the weak crop's quarter grid, as ``full_to_weak``
   does; for 40 random strong views (``strong_augment``) per noise level the teacher at each strong pixel is
   compared with softmax(cos(f(pre-image), P) / tau) at the pixel's exact pre-image.
"""

from __future__ import annotations

import random

import numpy as np
import torch
import torch.nn.functional as F

from cpsl.data.transforms import compose, strong_augment, warp_maps_batch
from cpsl.methods.selflabel import cosine_scores


def grid_offsets() -> None:
    for hh, ww in ((512, 896), (96, 192)):
        h, w, qh, qw = hh // 8 + 1, ww // 8 + 1, hh // 4, ww // 4
        ys, xs = torch.meshgrid(torch.arange(h) * 8 + 0.5, torch.arange(w) * 8 + 0.5, indexing="ij")
        ramp = torch.stack([ys, xs])[None].double()
        cy, cx = torch.meshgrid((torch.arange(qh) + 0.5) * 4, (torch.arange(qw) + 0.5) * 4, indexing="ij")
        for ac in (True, False):
            up = F.interpolate(ramp, size=(qh, qw), mode="bilinear", align_corners=ac)[0]
            dy, dx = (up[0] - cy).abs(), (up[1] - cx).abs()
            print(f"crop {hh}x{ww} align_corners={ac!s:5}: offset x mean {dx.mean():.2f} max {dx.max():.2f} px, "
                  f"y mean {dy.mean():.2f} max {dy.max():.2f} px")


def teacher_error(tau: float = 0.08) -> None:
    torch.manual_seed(0)
    np.random.seed(0)
    hh, ww, k, d = 256, 448, 19, 64
    h, w, hs, ws = hh // 4, ww // 4, hh // 8 + 1, ww // 8 + 1
    protos = F.normalize(torch.randn(k, d), dim=1)

    def sample(f8: torch.Tensor, py: torch.Tensor, px: torch.Tensor) -> torch.Tensor:
        g = torch.stack([(px - 0.5) / 8 / (ws - 1) * 2 - 1, (py - 0.5) / 8 / (hs - 1) * 2 - 1], -1)[None].float()
        return F.grid_sample(f8, g, mode="bilinear", align_corners=True, padding_mode="border")

    qy, qx = torch.meshgrid((torch.arange(h) + 0.5) * 4.0, (torch.arange(w) + 0.5) * 4.0, indexing="ij")
    names = ("softmax, then bilinear warp", "bilinear warp, then softmax", "nearest warp, then softmax (ref.)")
    tv: dict[str, list[float]] = {n: [] for n in names}
    kl: dict[str, list[float]] = {n: [] for n in names}
    agree: dict[str, list[float]] = {n: [] for n in names}
    for noise in (0.5, 1.0):
        for s in range(40):
            seeds, cls = np.random.rand(40, 2) * [hh, ww], np.random.randint(0, k, 40)
            yy, xx = np.meshgrid(8 * np.arange(hs) + 0.5, 8 * np.arange(ws) + 0.5, indexing="ij")
            lab = cls[np.argmin((yy[..., None] - seeds[:, 0]) ** 2 + (xx[..., None] - seeds[:, 1]) ** 2, -1)]
            f8 = (protos[torch.from_numpy(lab)] + noise * torch.randn(hs, ws, d) / d ** 0.5).permute(2, 0, 1)[None]
            scores = cosine_scores(sample(f8, qy, qx), protos)
            _, sp = strong_augment(np.zeros((hh, ww, 3), np.uint8), random.Random(s))
            a = np.linalg.inv(compose(sp))
            px, py = a[0, 0] * qx + a[0, 1] * qy + a[0, 2], a[1, 0] * qx + a[1, 1] * qy + a[1, 2]
            exact = F.softmax(cosine_scores(sample(f8, py, px), protos) / tau, 1)[0]
            warped, valid = warp_maps_batch(scores, [sp])
            cands = {names[0]: warp_maps_batch(F.softmax(scores / tau, 1), [sp])[0][0],
                     names[1]: F.softmax(warped / tau, 1)[0],
                     names[2]: F.softmax(warp_maps_batch(scores, [sp], mode="nearest")[0] / tau, 1)[0]}
            m = valid[0] & (px >= 0) & (px < ww) & (py >= 0) & (py < hh)
            if not bool(m.any()):
                continue
            for n, t in cands.items():
                tv[n].append(float((0.5 * (t - exact).abs().sum(0))[m].mean()))
                log_ratio = exact.clamp_min(1e-30).log() - t.clamp_min(1e-30).log()
                kl[n].append(float((exact * log_ratio).sum(0)[m].mean()))
                agree[n].append(float((t.argmax(0) == exact.argmax(0))[m].float().mean()))
    for n in names:
        print(f"teacher {n:34s}: total variation {np.mean(tv[n]):.4f}, KL {np.mean(kl[n]):.4f}, "
              f"argmax agreement {100 * np.mean(agree[n]):.2f} %")


if __name__ == "__main__":
    torch.set_num_threads(1)
    grid_offsets()
    teacher_error()
