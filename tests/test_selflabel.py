"""Stage 1 (cpsl.methods.selflabel): each piece on hand-made inputs, then training end to end with kill + resume."""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cpsl.config import PseudoSoftConfig, TrainConfig, load
from cpsl.data.pseudo import quantize_soft, save_soft, soft_path
from cpsl.data.transforms import WeakParams, full_to_weak
from cpsl.methods import build_method
from cpsl.methods.selflabel import (SelfLabel, SoftLabelExtras, _ContrastTerms, consistency_loss, contrastive_loss,
                                    cutmix_images, cutmix_labels, ema_update, load_class_marginal, load_prototypes,
                                    rand_bbox, rectify, sample_indices, sce_loss, take_pixels)
from cpsl.models.checkpoint import load_checkpoint
from cpsl.steps import pseudo_soft
from cpsl.train.loop import train
from tests.test_transforms import brute_force_full_to_weak
from tests.train_helpers import (N_CLASS, TINY_MODEL, finish, kill_at_first_checkpoint,  # noqa: F401
                                 max_weight_diff, one_thread, pair_dir, prepared_pair, start_train, train_dict,
                                 well_conditioned_init, write_config)

pytestmark = pytest.mark.usefixtures("one_thread")
LN_1E4 = -math.log(1e-4)  # 9.2103...


# ---------------------------------------------------------------------------------------------------------
# Stage-1 inputs for the tiny model (shared with test_selflabel_ddp)


def stage1_inputs(base: Path) -> dict[str, str]:
    """Warm-up products for the tiny pair in ``base``: an init checkpoint (well-conditioned), soft labels made by
    ``cpsl pseudo-soft`` with it, a prototypes.pt with one zero (never predicted) class and a class marginal."""
    _, tgt = prepared_pair(base)
    init = base / "stage1_init.pt"
    if not init.exists():
        well_conditioned_init(init)
    soft = base / "soft"
    if not (soft / "meta.json").exists():
        pseudo_soft.run(PseudoSoftConfig(checkpoint=init, data=tgt, device="cpu", workers=0, progress=False), soft)
    protos = base / "prototypes.pt"
    if not protos.exists():
        p = torch.randn(N_CLASS, TINY_MODEL["head_channels"], generator=torch.Generator().manual_seed(0))
        p[3] = 0.0
        torch.save({"prototypes": p, "counts": torch.tensor([9, 9, 9, 0])}, protos)
    dist = base / "class_distribution.npy"
    if not dist.exists():
        np.save(dist, np.array([0.4, 0.3, 0.2, 0.1]))
    return {"init_checkpoint": str(init), "selflabel.soft_labels": str(soft), "selflabel.prototypes": str(protos),
            "selflabel.class_dist": str(dist)}


def stage1_dict(base: Path, **over) -> dict:
    """A stage-1 train config for the tiny pair; small queues so they fill within two iterations."""
    opts = {**stage1_inputs(base), "selflabel.queue_length": 32, "selflabel.pixels_per_image": 8, **over}
    return train_dict(base, "stage1", **opts)


# ---------------------------------------------------------------------------------------------------------
# Inputs


def test_load_prototypes_and_marginal(tmp_path):
    p = torch.tensor([[3.0, 4.0], [0.0, 0.0], [0.0, -2.0]])
    torch.save({"prototypes": p, "counts": torch.tensor([1, 0, 1])}, tmp_path / "p.pt")
    got, zero = load_prototypes(tmp_path / "p.pt", 3, 2)
    assert torch.allclose(got, torch.tensor([[0.6, 0.8], [0.0, 0.0], [0.0, -1.0]])) and zero == [1]
    torch.save(p, tmp_path / "bare.pt")  # the reference's file: a bare tensor
    assert torch.equal(load_prototypes(tmp_path / "bare.pt", 3, 2)[0], got)
    with pytest.raises(Exception, match=r"\[4, 2\]"):
        load_prototypes(tmp_path / "p.pt", 4, 2)
    np.save(tmp_path / "d.npy", np.array([2.0, 1.0, 1.0]))
    assert torch.allclose(load_class_marginal(tmp_path / "d.npy", 3), torch.tensor([0.5, 0.25, 0.25],
                                                                                   dtype=torch.float64))
    with pytest.raises(Exception, match="3 non-negative"):
        np.save(tmp_path / "bad.npy", np.array([1.0, -1.0, 1.0]))
        load_class_marginal(tmp_path / "bad.npy", 3)


# ---------------------------------------------------------------------------------------------------------
# full2weak + rectification against a brute-force crop


def _smooth(c: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, c, 4, 6, generator=g)
    return F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=True)[0]


@pytest.mark.parametrize("flip", [False, True])
def test_soft_label_extras_and_rectification_match_brute_force(tmp_path, flip):
    k, d = 4, 8
    hm, wm, h0, w0 = 17, 33, 128, 256           # stored at stride 8 (as the (19, 129, 257) labels)
    soft = F.softmax(3 * _smooth(k, hm, wm, 1), dim=0)
    feat = _smooth(d, hm, wm, 2)
    save_soft(soft_path(tmp_path, "img0"), quantize_soft(soft))
    stored = torch.from_numpy(np.load(soft_path(tmp_path, "img0"))["q"].astype(np.float32) / 255)
    p = WeakParams((h0, w0), (170, 340), (30, 71, 96, 160), flip)
    out_hw = (24, 40)                             # the quarter grid of the 96 x 160 crop

    extras = SoftLabelExtras(tmp_path, ["img0"], out_hw, k)
    got_soft = extras(0, p)["soft"]
    ref_soft = brute_force_full_to_weak(stored, p, out_hw, align_corners=True)
    assert got_soft.shape == (k, *out_hw) and got_soft.dtype == torch.float32
    # equal up to the brute force's double interpolation (bilinear of bilinear), which is not exact
    assert (got_soft - ref_soft).abs().max() < 0.02 and (got_soft - ref_soft).abs().mean() < 2e-3
    assert torch.allclose(got_soft.sum(0), torch.ones(out_hw), atol=1e-5)  # still a distribution
    # the same crop without the flip is far off: the test would notice a misaligned mapping
    unflipped = WeakParams(p.orig_hw, p.scaled_hw, p.crop, not flip)
    assert (brute_force_full_to_weak(stored, unflipped, out_hw, align_corners=True) - got_soft).abs().max() > 0.1

    protos = F.normalize(torch.randn(k, d, generator=torch.Generator().manual_seed(3)), dim=1)
    f_weak = full_to_weak(feat, p, out_hw)
    labels, w = rectify(got_soft[None], f_weak[None], protos, tau=0.08)
    ref_feat = brute_force_full_to_weak(feat, p, out_hw, align_corners=True)
    ref_labels, _ = rectify(ref_soft[None], ref_feat[None], protos, tau=0.08)
    assert (labels == ref_labels).float().mean() > 0.97
    # the formula, pixel by pixel
    cos = torch.einsum("dhw,kd->khw", F.normalize(f_weak, dim=0), protos)
    r = F.softmax(cos / 0.08, dim=0) * got_soft
    assert torch.equal(labels[0], r.argmax(0)) and torch.allclose(w[0], F.softmax(cos / 0.08, dim=0))


def test_rectification_by_hand_threshold_and_padding():
    # 2 classes, 3 pixels. Features equal to prototype 0, prototype 1, and halfway.
    protos = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    feat = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]]).reshape(1, 2, 1, 3)
    soft = torch.tensor([[0.3, 0.9, 0.6], [0.7, 0.1, 0.4]]).reshape(1, 2, 1, 3)
    labels, w = rectify(soft, feat, protos, tau=1.0)
    e = math.e
    w0 = torch.tensor([e / (e + 1), 1 / (1 + e), 0.5])  # softmax of cos / 1
    assert torch.allclose(w[0, 0, 0], w0, atol=1e-6)
    # R = W * soft. Pixel 0: (0.3 e, 0.7) / (e + 1) = (0.815, 0.7) / (e + 1): the prototype turns the soft
    # label's class 1 into class 0. Pixel 1: (0.9, 0.1 e): class 0. Pixel 2: W = (0.5, 0.5): class 0.
    assert labels.flatten().tolist() == [0, 0, 0]
    conf = [0.3 * e / (0.3 * e + 0.7), 0.9 / (0.9 + 0.1 * e), 0.6]     # max R / sum R: 0.538, 0.768, 0.6
    labels, _ = rectify(soft, feat, protos, tau=1.0, threshold=0.55)
    assert labels.flatten().tolist() == [255, 0, 0] and conf[0] < 0.55 < min(conf[1:])
    padded = soft.clone()
    padded[..., 2] = 0.0  # crop padding: no soft label there
    assert rectify(padded, feat, protos, tau=1.0)[0].flatten().tolist() == [0, 0, 255]


# ---------------------------------------------------------------------------------------------------------
# Losses by hand


def test_sce_by_hand_two_classes_two_pixels():
    # pixel a: p = (0.25, 0.75), label 1; pixel b: p = (0.8, 0.2), label 1; pixel c ignored.
    logits = torch.tensor([[0.0, math.log(4.0), 5.0], [math.log(3.0), 0.0, 0.0]]).reshape(1, 2, 1, 3)
    labels = torch.tensor([[[1, 1, 255]]])
    total, ce, rce = sce_loss(logits, labels, alpha=0.1, beta=1.0)
    ce_hand = (-math.log(0.75) - math.log(0.2)) / 2                  # 0.948560
    rce_hand = (0.25 * LN_1E4 + 0.8 * LN_1E4) / 2                     # 4.835429: 9.2103 x wrong-class mass
    assert ce.item() == pytest.approx(ce_hand, rel=1e-5)
    assert rce.item() == pytest.approx(rce_hand, rel=1e-5)
    assert total.item() == pytest.approx(0.1 * ce_hand + rce_hand, rel=1e-5)   # 4.930285
    assert total.item() == pytest.approx(4.930285, rel=1e-5)


def test_consistency_by_hand_two_classes_two_pixels():
    t = torch.tensor([[0.5, 0.9, 0.3], [0.5, 0.1, 0.7]]).reshape(1, 2, 1, 3)
    s = torch.log(torch.tensor([[0.25, 0.5, 0.5], [0.75, 0.5, 0.5]])).reshape(1, 2, 1, 3)
    valid = torch.tensor([[[True, True, False]]])
    kl_a = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)  # 0.143841
    kl_b = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)    # 0.368064
    got = consistency_loss(t, valid, s, 2)
    assert got.item() == pytest.approx((kl_a + kl_b) / (2 * 2), rel=1e-5)   # / (#valid pixels x K) = 0.127976
    # the default divisor, 19 whatever K is (#27): / (#valid pixels x 19) = 0.026942
    assert consistency_loss(t, valid, s, 19).item() == pytest.approx((kl_a + kl_b) / (2 * 19), rel=1e-5)
    # the student gets the gradient, the teacher none
    s_param = s.clone().requires_grad_(True)
    consistency_loss(t, valid, s_param, 2).backward()
    assert s_param.grad[..., 2].abs().max() == 0 and s_param.grad[..., :2].abs().max() > 0


def test_contrastive_by_hand():
    a = torch.tensor([[1.0, 0.0]])
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.6, 0.8]])
    ql = torch.tensor([0, 1, 2, 255])
    tau = 0.5
    logits = torch.tensor([2.0, 0.0, -2.0]) - 2.0   # a.q / tau - max (the ignored row is left out)
    neg = math.exp(logits[1]) + math.exp(logits[2])
    by_hand = -(logits[0] - math.log(math.exp(logits[0]) + neg)) / (1 + 1e-5)
    assert contrastive_loss(a, torch.tensor([0]), q, ql, tau).item() == pytest.approx(by_hand.item(), rel=1e-5)
    assert contrastive_loss(a, torch.tensor([255]), q, ql, tau).item() == 0.0


def _contrastive_one_image_at_a_time(anchors, labels, queue_feats, queue_labels, tau):
    """The loss as written before #26 (one image at a time, keeping the valid anchors by boolean indexing):
    the oracle of the batched ``contrastive_loss``."""
    losses = []
    for a, y in zip(anchors, labels):
        keep = y != 255
        if not bool(keep.any()):
            losses.append(a.sum() * 0.0)
            continue
        logits = a[keep] @ queue_feats.t() / tau
        logits = logits - logits.max(1, keepdim=True).values.detach()
        ok = (queue_labels != 255)[None, :]
        pos = (y[keep][:, None] == queue_labels[None, :]) & ok
        exp = torch.exp(logits)
        log_prob = logits - torch.log(exp + (exp * (~pos & ok)).sum(1, keepdim=True))
        losses.append((-(log_prob * pos).sum(1) / (pos.sum(1) + 1e-5)).mean())
    return torch.stack(losses).mean()


@pytest.mark.parametrize("b, n, d, length", [(4, 16, 8, 256), (3, 64, 32, 4096)])
def test_batched_contrastive_equals_the_per_image_mean(b, n, d, length):
    # one image with no valid anchor (it counts 0 in the mean over images), one with half of them ignored, a class
    # absent from the queue (anchors without positives), ignored queue rows
    g = torch.Generator().manual_seed(b)
    anchors = F.normalize(torch.randn(b, n, d, generator=g), dim=-1).requires_grad_()
    labels = torch.randint(0, N_CLASS, (b, n), generator=g)
    labels[0] = 255
    labels[1, : n // 2] = 255
    labels[2, :3] = N_CLASS - 1
    q_labels = torch.randint(0, N_CLASS - 1, (length,), generator=g)
    q_labels[: length // 8] = 255
    q_feats = F.normalize(torch.randn(length, d, generator=g), dim=-1)
    saved = []   # the sizes of the tensors the graph keeps for the backward pass
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        got = contrastive_loss(anchors, labels, q_feats, q_labels, 0.08)
    assert max(saved) == length * d < b * n * length    # the queue; no (images, anchors, queue rows) tensor
    want = _contrastive_one_image_at_a_time(anchors, labels, q_feats, q_labels, 0.08)
    (g_got,), (g_want,) = torch.autograd.grad(got, anchors), torch.autograd.grad(want, anchors)
    assert 1.0 < got.item() < 20.0
    assert abs(got.item() - want.item()) <= 1e-6 and (g_got - g_want).abs().max() <= 1e-6
    assert g_got[0].abs().max() == 0 and g_got[1, : n // 2].abs().max() == 0 and g_got[1:].abs().max() > 0
    # the queue's row order does not matter (up to float summation order): the ring buffer reads it as stored
    perm = torch.randperm(length, generator=g)
    assert contrastive_loss(anchors, labels, q_feats[perm], q_labels[perm], 0.08).item() == \
        pytest.approx(got.item(), abs=1e-6)


def test_contrastive_positive_counts_per_label_equal_the_mask_counts():
    # _n_pos counts each anchor's positives from per-label counts of the queue; the (B, n, L) mask says the same
    g = torch.Generator().manual_seed(3)
    labels = torch.randint(0, N_CLASS, (3, 50), generator=g)
    labels[0, :10] = 255
    labels[1, :5] = N_CLASS - 1                       # a class absent from the queue
    q_labels = torch.randint(0, N_CLASS - 1, (300,), generator=g)
    q_labels[:40] = 255
    not_pos, _ = _ContrastTerms._masks(labels, q_labels)
    got = _ContrastTerms._n_pos(labels, q_labels)
    assert got.dtype == torch.int64 and torch.equal(got, (~not_pos).sum(-1))
    assert got[0, :10].eq(0).all() and got[1, :5].eq(0).all() and got.max() > 0


# ---------------------------------------------------------------------------------------------------------
# CutMix, sampling, EMA


def test_rand_bbox_area_and_bounds():
    rng = np.random.default_rng(0)
    h, w = 512, 896
    props = []
    for _ in range(300):
        y1, x1, y2, x2 = rand_bbox((h, w), rng)
        assert 0 <= y1 < y2 <= h and 0 <= x1 < x2 <= w
        assert abs((y2 - y1) * (x2 - x1) / (h * w) - 0.5) < 0.003   # half the crop up to rounding
        props.append((y2 - y1) / h)
    props = np.array(props)
    assert props.min() >= 0.5 - 1e-3 and props.max() <= 1.0
    # y_prop = exp(U ln 0.5): ln(y_prop) / ln 0.5 is uniform on [0, 1]
    assert abs(np.mean(np.log(props) / math.log(0.5)) - 0.5) < 0.05
    # explicit uniforms: u0 = 0 gives a full-height box, the position follows u1, u2
    assert rand_bbox((h, w), [0.0, 0.0, 1.0]) == (0, 448, 512, 896)
    assert rand_bbox((h, w), [1.0, 0.5, 0.0]) == (128, 0, 384, 896)
    assert rand_bbox((h, w), torch.Generator().manual_seed(1)) == rand_bbox((h, w), torch.Generator().manual_seed(1))


def test_cutmix_pastes_images_and_labels():
    g = torch.Generator().manual_seed(0)
    tgt, src = torch.rand(2, 3, 32, 64, generator=g), torch.rand(2, 3, 32, 64, generator=g)
    box = (5, 10, 23, 41)
    mixed = cutmix_images(tgt, src, box)
    assert torch.equal(mixed[..., 5:23, 10:41], src[..., 5:23, 10:41])
    inside = torch.zeros(32, 64, dtype=torch.bool)
    inside[5:23, 10:41] = True
    assert torch.equal(mixed[..., ~inside], tgt[..., ~inside]) and not torch.equal(mixed, tgt)

    labels = torch.randint(0, 4, (2, 8, 16), generator=g)          # quarter grid of the 32 x 64 crop
    src_label = torch.randint(0, 4, (2, 32, 64), generator=g)
    src_label[0, 0, 0] = 255
    got = cutmix_labels(labels, src_label, box)
    # brute force at crop resolution: upsample x4 nearest, paste, read each 4x4 cell's centre pixel (4i+2)
    up = labels.repeat_interleave(4, 1).repeat_interleave(4, 2)
    up[:, 5:23, 10:41] = src_label[:, 5:23, 10:41]
    assert torch.equal(got, up[:, 2::4, 2::4])
    assert not torch.equal(got, labels)


def test_sample_indices_prefer_valid_pixels_and_take_pixels():
    keys = torch.tensor([[0.9, 0.1, 0.5, 0.3, 0.7]])
    valid = torch.tensor([[True, False, True, True, True]])
    assert sample_indices(keys, valid, 3).tolist() == [[3, 2, 4]]
    assert sample_indices(keys, torch.tensor([[False, False, True, False, False]]), 2).tolist() == [[2, 1]]
    maps = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(1, 2, 3, 4)   # C=2, h=3, w=4
    idx = torch.tensor([[0, 5, 11]])
    assert take_pixels(maps, idx).tolist() == [[0, 12], [5, 17], [11, 23]]
    assert take_pixels(maps[:, 0].long(), idx).tolist() == [0, 5, 11]


def test_ema_update_weights_and_buffers():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2))
    ema = nn.Sequential(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2))
    student[1].running_mean.fill_(3.0)
    before = [p.detach().clone() for p in ema.parameters()]
    ema_update(ema, student, 0.9)
    for b, pe, ps in zip(before, ema.parameters(), student.parameters()):
        assert torch.allclose(pe, 0.9 * b + 0.1 * ps)
    assert torch.equal(ema[1].running_mean, student[1].running_mean)   # buffers copied, as the reference


def test_ema_update_is_bit_identical_to_one_tensor_at_a_time_in_few_launches():
    """The multi-tensor EMA gives exactly the per-tensor loop's weights (float32 weights, int64 BatchNorm counters)
    and, on fake CUDA, 3 operations for the whole network instead of 3 per tensor."""
    from cpsl.models import build_model
    from cpsl.config import ModelConfig
    from tests.fake_cuda import FakeCuda

    torch.manual_seed(0)
    cfg = ModelConfig(**{**TINY_MODEL, "bn_pretrain": True})
    student, ema = build_model(cfg), build_model(cfg)
    for m in student.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.num_batches_tracked.fill_(7)
    expected = copy.deepcopy(ema)
    with torch.no_grad():
        for pe, p in zip(expected.parameters(), student.parameters()):
            pe.mul_(0.999).add_(p, alpha=1.0 - 0.999)
        for be, b in zip(expected.buffers(), student.buffers()):
            be.copy_(b)
    ema_update(ema, student, 0.999)
    for (k, a), b in zip(ema.state_dict().items(), expected.state_dict().values()):
        assert torch.equal(a, b), k
    n_tensors = len(list(student.parameters())) + len(list(student.buffers()))
    with FakeCuda() as fc:
        student.to("cuda")
        ema.to("cuda")
        fc.reset()
        ema_update(ema, student, 0.999)
    assert n_tensors > 100 and fc.launches == 3


# ---------------------------------------------------------------------------------------------------------
# The method


def _ctx():
    from cpsl.methods import Amp, TrainContext
    from cpsl.train.dist import DistInfo
    cpu = torch.device("cpu")
    return TrainContext(cpu, DistInfo(0, 1, 0, cpu), Amp("off", cpu))


def test_method_state_groups_and_gradients(pair_dir):  # noqa: F811
    cfg = load(TrainConfig, stage1_dict(pair_dir, **{"optim.head_lr_mult": 5.0}))
    m = build_method(cfg, _ctx())
    assert isinstance(m, SelfLabel)
    groups = {g["name"]: g["lr"] for g in m.optimizer.param_groups}
    assert groups == {"backbone": 0.01, "head": 0.05, "prototypes": 0.05}
    assert m.zero_prototypes == [3] and m.prototypes[3].abs().max() == 0
    assert all(not p.requires_grad for p in m.ema.parameters())
    m.train_mode()
    assert m.student.training and not m.ema.training                     # ema_mode: eval (default)

    from cpsl.train.data import build_datasets, build_loaders
    from cpsl.train.loop import to_device
    loaders = build_loaders(cfg, build_datasets(cfg, m.domains, N_CLASS), rank=0, world_size=1, start_iter=0)
    batch = {d: to_device(next(iter(ld)), torch.device("cpu")) for d, ld in loaders.items()}
    assert batch["target"]["soft"].shape == (2, N_CLASS, 8, 16)
    p0 = m.prototypes.detach().clone()
    losses = m.step(batch)
    assert set(losses) == {"ce_source", "cts", "consist", "sl", "contrast", "loss", "cutmix"}
    assert all(np.isfinite(v) for v in losses.values())
    assert not torch.equal(m.prototypes.detach(), p0)                     # L_SL trains P
    assert m.prototypes[3].abs().max() == 0                               # the zero class stays inert
    assert torch.equal(m.prototypes_ema, m.prototypes.detach())             # Pe takes P's first step
    assert m.queue.filled == 16 and m.prototypes_ema.grad is None
    # class shares of the step (#27): student and rectified labels on the same target pixels, and the marginal
    counted = m.shares.counts.clone()
    assert counted[0].sum() == counted[1].sum() > 0
    record, text = m.log_shares(1)
    assert [record[f"share/marginal/{k}"] for k in range(4)] == pytest.approx([0.4, 0.3, 0.2, 0.1])
    assert sum(record[f"share/student/{k}"] for k in range(4)) == pytest.approx(1.0)
    assert record["share/teacher/0"] == pytest.approx(float(counted[1, 0] / counted[1].sum()))
    assert text.startswith("c") and " m." in text and m.shares.counts.sum() == 0
    state = m.state_dict()
    assert {"ema_model", "prototypes", "prototypes_ema", "queues"} <= set(state)


def test_stage1_trains_end_to_end_and_resumes_exactly(tmp_path, pair_dir):  # noqa: F811
    # Dropout on, BatchNorm in train mode, CutMix on half of the iterations, queues full from iteration 2:
    # the resumed run must restore the EMA network, P, Pe, the queues, the optimizer, every RNG state and the
    # class-share monitor (a share_drift of 0.01 makes its warning counters move)
    cfg = stage1_dict(pair_dir, max_iters=8, checkpoint_interval=2, log_interval=1, share_drift=0.01,
                      share_drift_logs=1)
    config = write_config(tmp_path / "train.yaml", cfg)
    killed, full = tmp_path / "killed", tmp_path / "full"
    last = kill_at_first_checkpoint(config, killed)
    assert last.exists() and not (killed / "checkpoint.pt").exists()
    stopped_at = load_checkpoint(last)["iteration"]
    assert 2 <= stopped_at < 8

    resumed = start_train(config, killed)
    train(load(TrainConfig, cfg), full)  # the uninterrupted run, in this process
    log = finish(resumed)
    assert "resuming from" in log
    # the progress line's compact class shares: the class farthest from the marginal (0.4, 0.3, 0.2, 0.1)
    assert re.search(r"share=c(0 s[.0-9]+ t[.0-9]+ m\.40|1 s[.0-9]+ t[.0-9]+ m\.30|2 s[.0-9]+ t[.0-9]+ m\.20|"
                     r"3 s[.0-9]+ t[.0-9]+ m\.10)\b", log), log[-500:]

    a, b = load_checkpoint(killed / "checkpoint.pt"), load_checkpoint(full / "checkpoint.pt")
    assert a["iteration"] == b["iteration"] == 8
    for key in ("model", "ema_model"):
        assert max_weight_diff(a[key], b[key]) <= 1e-6, key
    for key in ("prototypes", "prototypes_ema"):
        assert (a[key] - b[key]).abs().max() <= 1e-6, key
    assert torch.equal(a["queues"]["labels"], b["queues"]["labels"])
    shares = [load_checkpoint(run / "checkpoints" / "last.pt")["shares"] for run in (killed, full)]
    assert shares[0]["streak"] == shares[1]["streak"] and shares[0]["next_warn"] == shares[1]["next_warn"]
    assert shares[0]["since"] == shares[1]["since"] and torch.equal(shares[0]["counts"], shares[1]["counts"])
    assert max(shares[0]["streak"]) > 8 - stopped_at       # a streak counted across the kill
    assert (a["queues"]["feats"] - b["queues"]["feats"]).abs().max() <= 1e-6
    lines = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    assert [x["iteration"] for x in lines] == list(range(1, 9))
    assert any(x["loss/cutmix"] == 1.0 for x in lines) and any(x["loss/contrast"] > 0 for x in lines)
    assert lines[0]["lr/prototypes"] == pytest.approx(0.05)             # optim.lr 0.01 x proto_lr_mult 5
    assert all(sum(x[f"share/{who}/{k}"] for k in range(4)) == pytest.approx(1.0)
               for x in lines for who in ("student", "teacher", "marginal"))
    killed_lines = [json.loads(x) for x in (killed / "metrics.jsonl").read_text().splitlines()]
    keep = ("iteration", "loss/")
    assert [{k: v for k, v in x.items() if k.startswith(keep)} for x in killed_lines] == \
        [{k: v for k, v in x.items() if k.startswith(keep)} for x in lines]


def test_reference_behaviour_switches_run(pair_dir):  # noqa: F811
    # ema_mode: train, the reference's misaligned queue/contrastive labels and unnormalised queue scores, plain CE
    cfg = load(TrainConfig, stage1_dict(pair_dir, **{"selflabel.ema_mode": "train", "selflabel.sce": False,
                                                     "selflabel.reference_queue_labels": True,
                                                     "selflabel.reference_queue_scores": True,
                                                     "selflabel.cutmix_p": 0.0}))
    m = build_method(cfg, _ctx())
    from cpsl.train.data import build_datasets, build_loaders
    from cpsl.train.loop import to_device
    loaders = build_loaders(cfg, build_datasets(cfg, m.domains, N_CLASS), rank=0, world_size=1, start_iter=0)
    its = {d: iter(ld) for d, ld in loaders.items()}
    for i in range(3):
        m.train_mode()
        assert m.ema.training
        losses = m.step({d: to_device(next(it), torch.device("cpu")) for d, it in its.items()})
        m.schedulers["student"].step()
        assert all(np.isfinite(v) for v in losses.values()) and losses["cutmix"] == 0.0
    assert m.queue.full and losses["contrast"] > 0   # the queue filled in iteration 2, the contrast ran in 3


# ---------------------------------------------------------------------------------------------------------
# Fidelity to the reference (#20)


def _batches(cfg, m, n):
    from cpsl.train.data import build_datasets, build_loaders
    from cpsl.train.loop import to_device
    loaders = build_loaders(cfg, build_datasets(cfg, m.domains, N_CLASS), rank=0, world_size=1, start_iter=0)
    its = {d: iter(ld) for d, ld in loaders.items()}
    return [{d: to_device(next(it), torch.device("cpu")) for d, it in its.items()} for _ in range(n)]


class _RampNet(nn.Module):
    """A stand-in student whose logit channels 0 and 1 hold the crop-pixel row and column (pixel centres) of
    each output sample: DeepLab-v2's stride-8 grid (ceil), sample i centred on crop pixel 8i."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        b, _, hh, ww = x.shape
        ys, xs = torch.meshgrid(torch.arange(hh // 8 + 1) * 8 + 0.5, torch.arange(ww // 8 + 1) * 8 + 0.5,
                                indexing="ij")
        out = torch.zeros(b, N_CLASS, *ys.shape)
        out[:, 0], out[:, 1] = ys, xs
        return {"out": out * self.scale, "feat": torch.zeros(b, TINY_MODEL["head_channels"], *ys.shape)}


class _Stop(Exception):
    pass


def test_student_logits_line_up_with_the_quarter_grid_labels(pair_dir, monkeypatch):  # noqa: F811
    # The rectified labels sit at the centres of the crop's 4x4 cells. The student's logits, upsampled with
    # align_corners=True (every stage, as the reference), land within 2.5 px of them on each axis (mean about
    # 1.1 px; 1.07 at 512x896); align_corners=False is off by up to 3.75 px here (4.4 at 512x896).
    cfg = load(TrainConfig, stage1_dict(pair_dir, **{"selflabel.cutmix_p": 0.0}))
    m = build_method(cfg, _ctx())
    m.train_mode()
    batch = _batches(cfg, m, 1)[0]
    x = batch["target"]["image"]
    assert m.student(x)["out"].shape[-2:] == _RampNet()(x)["out"].shape[-2:] == (5, 9)   # the real grid
    seen = {}

    def capture(logits, labels, *args):
        seen["logits"], seen["labels"] = logits.detach(), labels
        raise _Stop

    monkeypatch.setattr(m, "net", _RampNet())
    monkeypatch.setattr("cpsl.methods.selflabel.sce_loss", capture)
    with pytest.raises(_Stop):
        m.step(batch)
    logits, labels = seen["logits"], seen["labels"]
    assert logits.shape[-2:] == labels.shape[-2:] == (8, 16)
    cy = (torch.arange(8) + 0.5) * 4
    cx = (torch.arange(16) + 0.5) * 4
    dy, dx = (logits[:, 0] - cy[:, None]).abs(), (logits[:, 1] - cx[None, :]).abs()
    assert dy.max() <= 2.5 + 1e-5 and dx.max() <= 2.5 + 1e-5, (dy.max(), dx.max())
    assert dy.mean() <= 1.25 and dx.mean() <= 1.25


@pytest.mark.parametrize("queue_length, first", [(32, 3), (24, 2)])
def test_contrast_starts_when_the_queue_was_full_before_a_push(pair_dir, queue_length, first):  # noqa: F811
    # 2 images x 8 pixels per iteration. The reference turns the contrastive loss on when the queue is full
    # before the push of one of the batch's images (use_the_queue): a 32-row queue fills with the last push of
    # iteration 2, so the contrast starts in iteration 3; a 24-row one is full before iteration 2's second push.
    cfg = load(TrainConfig, stage1_dict(pair_dir, **{"selflabel.cutmix_p": 0.0,
                                                     "selflabel.queue_length": queue_length}))
    m = build_method(cfg, _ctx())
    contrast = []
    for batch in _batches(cfg, m, 3):
        m.train_mode()
        contrast.append(m.step(batch)["contrast"])
        m.schedulers["student"].step()
    assert [c > 0 for c in contrast] == [i + 1 >= first for i in range(3)], contrast


def test_reference_contrast_anchors_draw_one_permutation_per_image(pair_dir, monkeypatch):  # noqa: F811
    # reference_queue_labels: the anchors are a randperm of the student's own grid per image, as the
    # reference's loop draws them; the labels are read at the same flat indices of the stretched label map.
    cfg = load(TrainConfig, stage1_dict(pair_dir, **{"selflabel.reference_queue_labels": True}))
    m = build_method(cfg, _ctx())
    feat = torch.randn(2, TINY_MODEL["head_channels"], 5, 9, generator=torch.Generator().manual_seed(0))
    stretched = torch.arange(2 * 9 * 17).reshape(2, 9, 17)     # label = flat index (+ 153 for image 1)
    calls = []
    monkeypatch.setattr("cpsl.methods.selflabel.contrastive_loss",
                        lambda a, y, qf, ql, tau: calls.append((a, y)) or a.sum() * 0.0)
    m._contrastive(feat, None, None, torch.Generator().manual_seed(1), stretched)
    (anchors, labels), = calls       # one call for the batch: (images, anchors, D) and (images, anchors)
    assert anchors.shape == (2, 8, TINY_MODEL["head_channels"]) and labels.shape == (2, 8)
    idx = [labels[0], labels[1] - 153]
    for i in range(2):
        assert idx[i].unique().numel() == 8 and int(idx[i].max()) < 45
        assert torch.allclose(anchors[i], F.normalize(feat[i].flatten(1)[:, idx[i]].t(), dim=1), atol=1e-6)
    assert not torch.equal(idx[0], idx[1])
    # under DDP the permutations are drawn for the global batch: rank 1 of 2 gets what images 2, 3 of one
    # process get
    calls.clear()
    m._contrastive(torch.cat([feat, feat]), None, None, torch.Generator().manual_seed(1), torch.cat([stretched] * 2))
    single = calls[0][1][2:]
    calls.clear()
    monkeypatch.setattr(m, "_world", lambda: (1, 2))
    m._contrastive(feat, None, None, torch.Generator().manual_seed(1), stretched)
    assert torch.equal(calls[0][1], single)


def test_consistency_teacher_is_the_softmax_of_the_warped_scores():
    # A 1 crop-px shift (a quarter of a quarter-grid cell) puts the scores of pixel 4 at 0.25 x pixel 3 +
    # 0.75 x pixel 4 = (0.25, 0.75): the teacher is softmax((0.25, 0.75) / tau), p0 = 1 / (1 + e^6.25) = 0.0019,
    # not the warp of the softmax (0.25 x 1 + 0.75 x 0 = 0.25).
    from cpsl.data.transforms import GeoOp, StrongParams, translate_matrix
    from cpsl.methods.selflabel import consistency_teacher
    scores = torch.zeros(1, 2, 4, 8)
    scores[:, 0, :, :4] = 1.0
    scores[:, 1, :, 4:] = 1.0
    in_crop = torch.ones(1, 4, 8, dtype=torch.bool)
    in_crop[:, :, 7] = False
    params = [StrongParams((16, 32), (GeoOp("TranslateX", -1, translate_matrix(1, 0)),))]
    teacher, valid = consistency_teacher(scores, in_crop, params, tau=0.08)
    assert teacher[0, 0, 2, 4].item() == pytest.approx(1 / (1 + math.exp(0.5 / 0.08)), rel=1e-4)
    assert teacher[0, 0, 2, 2].item() == pytest.approx(1 / (1 + math.exp(-1 / 0.08)), rel=1e-6)
    assert torch.allclose(teacher.sum(1), torch.ones(1, 4, 8))
    # column 7 is padding (its pre-image is 3/4 in column 7); column 0's pre-image is still in the image
    assert valid[0].all(0).tolist() == [True] * 7 + [False]


def test_prototype_ema_takes_the_first_step_with_p(pair_dir):  # noqa: F811
    # The reference sets P and Pe to one tensor: Pe moves with P's first step (its EMA update then makes a new
    # tensor), so after iteration 1 Pe = P1, and from then on Pe = 0.999 Pe + 0.001 P.
    cfg = load(TrainConfig, stage1_dict(pair_dir))
    m = build_method(cfg, _ctx())
    p0 = m.prototypes.detach().clone()
    b1, b2 = _batches(cfg, m, 2)
    m.train_mode()
    m.step(b1)
    m.schedulers["student"].step()
    p1 = m.prototypes.detach().clone()
    assert (p1 - p0).abs().max() > 1e-4 and torch.equal(m.prototypes_ema, p1)
    m.train_mode()
    m.step(b2)
    assert torch.allclose(m.prototypes_ema, 0.999 * p1 + 0.001 * m.prototypes.detach(), atol=1e-7)


def test_resume_mid_ring_continues_bit_identically(pair_dir):  # noqa: F811
    # A 24-row queue, 16 rows per iteration: after 2 iterations it is full with its newest row at buffer row 16. A
    # method restored from that state (through the checkpoint's weights-only serialisation) holds the queue from
    # buffer row 0, and continues exactly as the uninterrupted one: every sum over the queue runs in queue order.
    import io
    cfg = load(TrainConfig, stage1_dict(pair_dir, **{"selflabel.cutmix_p": 0.0, "selflabel.queue_length": 24}))
    a = build_method(cfg, _ctx())
    batches = _batches(cfg, a, 4)

    def run(m, todo, first):
        out = []
        for i, batch in enumerate(todo):
            torch.manual_seed(100 + first + i)   # dropout: the loop's RNG state, restored by the checkpoint
            m.train_mode()
            out.append(m.step(batch))
            m.schedulers["student"].step()
        return out

    run(a, batches[:2], 0)
    assert a.queue.full and a.queue.head == 16
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = build_method(cfg, _ctx())
    b.load_state_dict(torch.load(buf, weights_only=True))
    assert b.queue.head == 0 and not torch.equal(b.queue.feats, a.queue.feats)
    la, lb = run(a, batches[2:], 2), run(b, batches[2:], 2)
    assert all(x["contrast"] > 0 for x in la)
    assert [{k: float(v) for k, v in x.items()} for x in la] == [{k: float(v) for k, v in x.items()} for x in lb]
    sa, sb = a.state_dict(), b.state_dict()
    for key in ("model", "ema_model"):
        assert all(torch.equal(sa[key][k], sb[key][k]) for k in sa[key]), key
    assert torch.equal(sa["prototypes"], sb["prototypes"]) and torch.equal(sa["prototypes_ema"], sb["prototypes_ema"])
    for k in ("feats", "logits", "labels"):
        assert torch.equal(sa["queues"][k], sb["queues"][k]), k
    assert (a.queue.head, b.queue.head) == (8, 16)
