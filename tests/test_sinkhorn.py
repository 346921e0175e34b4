"""Sinkhorn-Knopp with a class marginal, the pixel queue, and the self-labeling loss (cpsl.methods.sinkhorn)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cpsl.methods.sinkhorn import PixelQueue, safe_normalize, self_label_loss, sinkhorn
from tests.train_helpers import one_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


def _scores(m: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    f = F.normalize(torch.randn(m, 16, generator=g), dim=1)
    p = F.normalize(torch.randn(k, 16, generator=g), dim=1)
    return f @ p.t()  # cosine similarities, as in stage 1


def _marginal(k: int, seed: int = 1) -> torch.Tensor:
    r = torch.rand(k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + 0.05
    return r / r.sum()


def test_rows_sum_to_one_and_columns_match_the_marginal():
    s, r = _scores(4096, 19), _marginal(19)
    q = sinkhorn(s, r, epsilon=0.05, iters=60)
    assert q.shape == (4096, 19) and (q >= 0).all()
    assert torch.allclose(q.sum(1), torch.ones(4096), atol=1e-5)
    assert (q.double().mean(0) - r).abs().max() < 1e-3
    # The reference's 3 iterations: rows still sum to 1, the class means are only roughly on the marginal
    # (max error ~0.015 here; 10 iterations ~1e-3, 30 ~2e-6: the error shrinks geometrically).
    errs = [(sinkhorn(s, r, 0.05, it).double().mean(0) - r).abs().max().item() for it in (3, 10, 30)]
    assert torch.allclose(sinkhorn(s, r, 0.05, 3).sum(1), torch.ones(4096), atol=1e-5)
    assert 1e-3 < errs[0] < 0.05 and errs[1] < errs[0] and errs[2] < 1e-4


def _plain_sinkhorn(scores: torch.Tensor, eps: float, iters: int) -> torch.Tensor:
    """SwAV's Sinkhorn, written independently: equal class and pixel marginals."""
    q = torch.exp(scores.double() / eps).t()
    q /= q.sum()
    k, m = q.shape
    for _ in range(iters):
        q /= q.sum(dim=1, keepdim=True)
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= m
    return (q * m).t()


@pytest.mark.parametrize("iters", [1, 3, 7])
def test_uniform_marginal_is_plain_sinkhorn(iters):
    s = _scores(500, 7, seed=3)
    ours = sinkhorn(s, torch.full((7,), 1 / 7), 0.05, iters)
    assert torch.allclose(ours.double(), _plain_sinkhorn(s, 0.05, iters), atol=1e-6)


def test_zero_marginal_class_gets_no_mass_and_no_nan():
    r = torch.tensor([0.5, 0.0, 0.3, 0.2], dtype=torch.float64)
    q = sinkhorn(_scores(300, 4, seed=5), r, 0.05, 3)
    assert torch.isfinite(q).all() and q[:, 1].abs().max() == 0
    assert torch.allclose(q.sum(1), torch.ones(300), atol=1e-5)


def test_safe_normalize_keeps_zero_vectors_inert():
    p = torch.tensor([[3.0, 4.0], [0.0, 0.0]], requires_grad=True)
    n = safe_normalize(p, dim=1)
    assert torch.allclose(n, torch.tensor([[0.6, 0.8], [0.0, 0.0]]))
    (n * torch.tensor([[1.0, 2.0], [5.0, 7.0]])).sum().backward()
    assert torch.isfinite(p.grad).all() and p.grad[1].abs().max() == 0  # F.normalize would give 1e12


def _queue_rows(start: int, n: int):
    v = torch.arange(start, start + n, dtype=torch.float32)
    return v[:, None].repeat(1, 2), v[:, None].repeat(1, 3), torch.arange(start, start + n)


def _in_queue_order(q: PixelQueue, name: str) -> list:
    return q.newest_first(getattr(q, name)).tolist()


def test_queue_push_order_newest_first_oldest_dropped():
    q = PixelQueue(length=6, feat_dim=2, n_class=3)
    assert not q.full and q.filled == 0 and (q.labels == 255).all()
    buffers = (q.feats.data_ptr(), q.logits.data_ptr(), q.labels.data_ptr())

    q.push(*_queue_rows(0, 2))   # queue order [0 1 . . . .]
    q.push(*_queue_rows(10, 2))  # [10 11 0 1 . .]
    assert q.filled == 4 and not q.full
    assert _in_queue_order(q, "labels") == [10, 11, 0, 1, 255, 255]
    assert q.labels.tolist() == [255, 255, 10, 11, 0, 1] and q.head == 2   # the ring: written in place
    q.push(*_queue_rows(20, 2))
    assert q.full and _in_queue_order(q, "labels") == [20, 21, 10, 11, 0, 1] and q.head == 0
    q.push(*_queue_rows(30, 2))  # the oldest pair (0, 1) falls off the back
    assert _in_queue_order(q, "labels") == [30, 31, 20, 21, 10, 11] and q.filled == 6
    assert q.labels.tolist() == [20, 21, 10, 11, 30, 31]
    assert q.feats[:, 0].tolist() == q.labels.tolist() and q.logits[:, 2].tolist() == q.feats[:, 1].tolist()
    assert (q.feats.data_ptr(), q.logits.data_ptr(), q.labels.data_ptr()) == buffers
    assert q.newest_first(q.labels, torch.tensor([7])).tolist() == [30, 31, 20, 21, 10, 11, 7]

    # the checkpoint holds the queue order, the format of the shifting queue; a loaded queue starts at head 0
    state = q.state_dict()
    assert set(state) == {"feats", "logits", "labels", "filled"} and state["filled"] == 6
    assert state["labels"].tolist() == [30, 31, 20, 21, 10, 11] and state["feats"][:, 0].tolist() == \
        state["labels"].tolist() and state["logits"][:, 0].tolist() == state["labels"].tolist()
    r = PixelQueue(6, 2, 3)
    r.load_state_dict(state)
    assert r.full and r.head == 0 and r.labels.tolist() == [30, 31, 20, 21, 10, 11]
    for x in (q, r):
        x.push(*_queue_rows(40, 2))
    for name in ("feats", "logits", "labels"):
        assert torch.equal(q.newest_first(getattr(q, name)), r.newest_first(getattr(r, name))), name
    with pytest.raises(ValueError):
        PixelQueue(4, 2, 3).load_state_dict(state)


def test_queue_push_wraps_around_the_end_of_the_buffers():
    # pushes of 4 rows into 6: the writes wrap; the queue order is the shifting queue's (empty rows: 0, label 255)
    q = PixelQueue(length=6, feat_dim=2, n_class=3)
    shifted: list = [255] * 6
    for start in (0, 10, 20, 30):
        q.push(*_queue_rows(start, 4))
        shifted = list(range(start, start + 4)) + shifted[:2]
        assert _in_queue_order(q, "labels") == shifted
        assert _in_queue_order(q, "feats") == [[v % 255] * 2 for v in shifted]
    assert q.full and q.state_dict()["labels"].tolist() == [30, 31, 32, 33, 20, 21]


def test_self_label_loss_values_queue_use_and_gradients():
    g = torch.Generator().manual_seed(7)
    k, d, n = 3, 4, 5
    feats = F.normalize(torch.randn(2 * n, d, generator=g), dim=1)
    logits = F.normalize(torch.randn(2 * n, k, generator=g), dim=1)
    labels = torch.randint(0, k, (2 * n,), generator=g)
    protos = torch.nn.Parameter(torch.randn(k, d, generator=g))
    r = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    queue = PixelQueue(2 * n, d, k)  # full after these two images

    loss, assigned = self_label_loss(feats, logits, labels, protos, queue, r, n_images=2, tau=0.08)
    # By hand: the queue is not full before either image, so each image's Sinkhorn sees that image only.
    pn = F.normalize(protos.detach(), dim=1)
    expect = []
    for i in range(2):
        s = feats[i * n:(i + 1) * n] @ pn.t()
        log_p = F.log_softmax(s / 0.08, dim=1)
        qf = sinkhorn(s, r, 0.05, 3)
        qo = sinkhorn(logits[i * n:(i + 1) * n], r, 0.05, 3)
        expect.append(-(qf * log_p).sum(1).mean() - (qo * log_p).sum(1).mean())
    assert loss.item() == pytest.approx(torch.stack(expect).mean().item(), rel=1e-5)
    assert assigned.shape == (2 * n,)
    assert queue.full and torch.equal(queue.labels, torch.cat([labels[n:], labels[:n]]))  # image 1 in front
    loss.backward()
    assert protos.grad is not None and protos.grad.abs().sum() > 0

    # Once full, the queue rows join the Sinkhorn: the result differs from the image alone, and with
    # reference_scores the queue is scored against the unnormalised prototypes.
    q2 = PixelQueue(2 * n, d, k)
    q2.load_state_dict(queue.state_dict())
    l_full, _ = self_label_loss(feats[:n], logits[:n], labels[:n], protos, q2, r, n_images=1)
    s = feats[:n] @ pn.t()
    log_p = F.log_softmax(s / 0.08, dim=1)
    qf = sinkhorn(torch.cat([queue.feats @ pn.t(), s]), r, 0.05, 3)[-n:]
    qo = sinkhorn(torch.cat([queue.logits, logits[:n]]), r, 0.05, 3)[-n:]
    by_hand = -(qf * log_p).sum(1).mean() - (qo * log_p).sum(1).mean()
    assert l_full.item() == pytest.approx(by_hand.item(), rel=1e-5)
    q3 = PixelQueue(2 * n, d, k)
    q3.load_state_dict(queue.state_dict())
    with torch.no_grad():
        protos.mul_(3.0)  # same direction, larger norm: only the reference scores see it
    l_ref, _ = self_label_loss(feats[:n], logits[:n], labels[:n], protos, q3, r, n_images=1,
                               reference_scores=True)
    assert l_ref.item() != pytest.approx(l_full.item(), rel=1e-6)
