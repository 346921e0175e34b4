"""Stage 1's contrastive loss and feature queue at paper size on the CPU: per image against batched, and the
queue push (#26 item 7).

    .venv/bin/python benchmarks/stage1_queue_contrast.py [--threads 2] [--out results.json]

``contrast``: ``contrastive_loss`` forward + backward for a batch of 4 images x 256 anchors against a full
65,536 x 256 queue (19 classes, 1/8 of the queue rows ignored), called once per image and averaged (how stage 1
called it before #26; the function still accepts one image) and once for the batch. Time and peak RSS growth
(``stage1_step.PeakRss``), each in a fresh process; the two values and gradients compared.

``push``: 4 pushes of 256 rows (one iteration at batch 4) into a full ``PixelQueue`` of 65,536 rows (feats 256,
logits 19): the median time of 20 iterations, and the kernel launches counted on fake CUDA (tests/fake_cuda.py).

For the code before #26 (its queue, and its loss one image at a time), copy this file into a checkout of that
commit and run ``--part push`` and ``--part per_image`` there (its ``contrastive_loss`` takes one image).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

B, N, D, L, K = 4, 256, 256, 65536, 19


def inputs() -> tuple[torch.Tensor, ...]:
    from cpsl.methods.sinkhorn import safe_normalize
    g = torch.Generator().manual_seed(0)
    anchors = safe_normalize(torch.randn(B, N, D, generator=g), dim=-1)
    labels = torch.randint(0, K, (B, N), generator=g)
    q_labels = torch.randint(0, K, (L,), generator=g)
    q_labels[: L // 8] = 255
    return anchors, labels, safe_normalize(torch.randn(L, D, generator=g), dim=-1), q_labels


def contrast(mode: str) -> dict:
    from benchmarks.stage1_step import PeakRss
    from cpsl.methods.selflabel import contrastive_loss
    anchors, labels, q_feats, q_labels = inputs()
    anchors.requires_grad_()
    t0 = time.perf_counter()
    with PeakRss() as rss:
        if mode == "per_image":
            loss = torch.stack([contrastive_loss(anchors[i], labels[i], q_feats, q_labels) for i in range(B)]).mean()
        else:
            loss = contrastive_loss(anchors, labels, q_feats, q_labels)
        loss.backward()
    grad = anchors.grad.double()
    return {"seconds": round(time.perf_counter() - t0, 2), "peak_rss_growth_mib": round(rss.growth_mib),
            "loss": loss.item(), "grad_sum": grad.sum().item(), "grad_abs_sum": grad.abs().sum().item()}


def push() -> dict:
    from cpsl.methods.sinkhorn import PixelQueue
    from tests.fake_cuda import FakeCuda
    g = torch.Generator().manual_seed(0)
    rows = [(torch.randn(N, D, generator=g), torch.randn(N, K, generator=g), torch.randint(0, K, (N,), generator=g))
            for _ in range(B)]
    q = PixelQueue(L, D, K)
    for r in rows * (L // (B * N)):
        q.push(*r)
    times = []
    for _ in range(20):
        t0 = time.perf_counter()
        for r in rows:
            q.push(*r)
        times.append(time.perf_counter() - t0)
    seconds = sorted(times)[len(times) // 2]
    with FakeCuda() as fc:
        qc = PixelQueue(L, D, K, "cuda")
        on_dev = [tuple(t.to("cuda") for t in r) for r in rows]
        fc.reset()
        for r in on_dev:
            qc.push(*r)
        launches = fc.counts()["launches"]
    return {"ms_per_iteration_median": round(seconds * 1e3, 2), "launches_per_iteration": launches}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--part", choices=["per_image", "batched", "push"], help="one part, in this process")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.part:
        print(json.dumps(push() if args.part == "push" else contrast(args.part)))
        return
    res = {}
    for part in ("push", "per_image", "batched"):
        out = subprocess.run([sys.executable, __file__, "--threads", str(args.threads), "--part", part],
                             check=True, capture_output=True, text=True).stdout
        res[part] = json.loads(out.strip().splitlines()[-1])
        print(part, res[part], flush=True)
    a, b = res["per_image"], res["batched"]
    print(f"batched - per image: loss {b['loss'] - a['loss']:.3g}, gradient sum {b['grad_sum'] - a['grad_sum']:.3g}")
    if args.out:
        args.out.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
