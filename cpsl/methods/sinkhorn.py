"""Class-balanced self-labeling of stage 1 (spec 3.5 step 9): Sinkhorn-Knopp with a class marginal, the pixel
queues it runs over, and the loss that trains the learnable prototypes.

Three plain pieces, each testable alone:

* ``sinkhorn(scores, marginal, epsilon, iters)``: the entropic optimal-transport assignment of M pixels to K
  classes. Each pixel's assignment sums to 1 and, as the iterations converge, the mean assignment of class k
  over the pixels approaches ``marginal[k]`` (the warm-up model's predicted class distribution, not 1/K: this is
  what makes the self-labeling *class-balanced*). With a uniform marginal it is the plain (SwAV) Sinkhorn.
* ``PixelQueue``: a FIFO of sampled pixels, three aligned tensors (EMA features, EMA logits, labels), stored as
  a ring buffer (a push writes n rows in place: no copy of the queue) and read in queue order
  (``newest_first``): the newest rows first, as in the reference, and the oldest fall off the back. ``full``
  once ``length`` rows have been pushed.
* ``self_label_loss``: for each image in order, Sinkhorn over ``[queue; this image's pixels]`` (the queue only
  once it is full, as in the reference), push the image's pixels, and the cross-entropy between the Sinkhorn
  assignment of the image's pixels and ``softmax(cos(feature, P) / tau)``. Two branches share the prediction:
  Sinkhorn on the feature-prototype similarities and Sinkhorn on the EMA's (L2-normalised) logits.
  The gradient reaches only the prototypes P (the features come from the no-grad EMA network).

Under DDP the caller gathers every rank's sampled pixels first (``cpsl.train.dist.all_gather_cat``, rank order =
the global batch order), so every rank runs the same loop on the same global batch, holds the same queue and
computes the same prototype gradient: 2 processes assign exactly what 1 process assigns.

Deliberate differences from the reference (spec 7 items 3, 4), each with a switch:
* the queue scores use the L2-normalised prototypes N(P), like the current image's scores
  (``reference_scores=True``: ``queue @ P^T`` with the unnormalised P, as the reference does);
* the labels pushed with the pixels are the labels *of those pixels* (the reference pushes the first n labels of
  a label map stretched onto another grid; the caller decides, see ``cpsl.methods.selflabel``);
* "full" is a count of pushed rows, not "the last row is non-zero";
* the Sinkhorn row sums are clamped away from 0, so a class whose marginal is 0 gets no mass instead of NaN;
  the arithmetic runs in float64 after subtracting the maximum score (the normalisation makes it invariant).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from cpsl.labels import IGNORE_INDEX


@torch.no_grad()
def sinkhorn(scores: Tensor, marginal: Tensor, epsilon: float = 0.05, iters: int = 3) -> Tensor:
    """Soft assignment (M, K) of M pixels to K classes from similarity ``scores`` (M, K).

    The reference's ``CustomModel.sinkhorn``, written out: ``Q = exp(S / eps)^T`` (K, M), normalised to sum 1;
    then ``iters`` times: rows (classes) to sum ``marginal[k]``, columns (pixels) to sum ``1/M``; finally scaled
    by M and transposed, so each pixel's row sums to exactly 1. The class totals match the marginal exactly
    right after the row step, and only approximately after the closing column step. Measured (max over classes of
    |mean_n q_nk - marginal_k|, random cosine scores, eps 0.05, K = 19, a random marginal far from the scores'
    own class distribution): 3 iterations (the reference's setting) 0.015, 10 iterations 1e-3, 30 iterations
    2e-6, for M = 256 or 65792 pixels; the spec measured 4e-3 at 3 iterations on its random data.
    ``tests/test_sinkhorn.py`` checks < 1e-3 with 60 iterations.

    ``marginal`` (K,) is renormalised to sum 1. Classes with marginal 0 get no mass. No gradient.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be (M, K), got {tuple(scores.shape)}")
    m, k = scores.shape
    if marginal.numel() != k:
        raise ValueError(f"marginal has {marginal.numel()} classes, scores have {k}")
    s = scores.detach().double()
    r = marginal.detach().to(device=s.device, dtype=torch.float64).reshape(k)
    r = r / r.sum().clamp_min(1e-300)
    tiny = torch.finfo(torch.float64).tiny
    q = torch.exp((s - s.max()) / epsilon).t()  # (K, M)
    q /= q.sum().clamp_min(tiny)
    for _ in range(iters):
        q /= q.sum(dim=1, keepdim=True).clamp_min(tiny)
        q *= r[:, None]
        q /= q.sum(dim=0, keepdim=True).clamp_min(tiny)
        q /= m
    q *= m
    return q.t().to(scores.dtype)


def safe_normalize(x: Tensor, dim: int = -1, eps: float = 1e-12) -> Tensor:
    """L2 normalisation along ``dim`` that maps a (near-)zero vector to zero *with zero gradient*.

    ``F.normalize`` divides a zero vector by ``eps`` in the backward pass (gradient x 1e12); prototypes of
    classes the warm-up model never predicted are zero vectors, and they must stay inert (cosine 0).
    """
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True)
    ok = norm > eps
    return torch.where(ok, x / norm.clamp_min(eps), torch.zeros_like(x))


class PixelQueue:
    """FIFO of ``length`` sampled pixels: ``feats`` (L, D) float, ``logits`` (L, K) float, ``labels`` (L,) long.

    A ring buffer. In *queue order* the newest rows come first: ``push(feats, logits, labels)`` puts the n new
    rows in front (in the given order) and drops the n oldest from the back, as the reference's shift does. The
    buffers hold the rows rotated: queue row r is buffer row ``(head + r) % length``, so a push moves ``head`` back
    by n and writes the n rows there (one or two slice writes; no copy of the queue, no host sync). Everything
    that reads the queue reads it in queue order, through ``newest_first`` (one concatenation, which the
    Sinkhorn makes anyway), so every float sum over its rows runs in the order of the shifting queue it replaces
    and the buffers' rotation is never seen: same numbers, and ``head`` need not be saved. ``filled`` counts the
    rows pushed so far (capped at ``length``), ``full`` says whether the queue holds ``length`` real rows. Empty
    rows are zeros with label 255. ``state_dict`` / ``load_state_dict`` (checkpoint key ``queues``: ``feats``,
    ``logits``, ``labels`` in queue order and ``filled``, the format of the shifting queue) make it part of the
    resumable checkpoint.
    """

    def __init__(self, length: int, feat_dim: int, n_class: int, device: torch.device | str = "cpu") -> None:
        self.length = int(length)
        self.feats = torch.zeros(self.length, feat_dim, device=device)
        self.logits = torch.zeros(self.length, n_class, device=device)
        self.labels = torch.full((self.length,), IGNORE_INDEX, dtype=torch.long, device=device)
        self.filled = 0
        self.head = 0

    @property
    def full(self) -> bool:
        return self.filled >= self.length

    def newest_first(self, rows: Tensor, *after: Tensor) -> Tensor:
        """``rows`` (one per buffer row: a buffer, or a product of one such as ``feats @ P^T``) in queue order,
        followed by the rows of ``after``: one new tensor."""
        return torch.cat([rows[self.head:], rows[:self.head], *after])

    @torch.no_grad()
    def push(self, feats: Tensor, logits: Tensor, labels: Tensor) -> None:
        n = feats.shape[0]
        if not (logits.shape[0] == labels.shape[0] == n) or n > self.length:
            raise ValueError(f"push of {feats.shape[0]}/{logits.shape[0]}/{labels.shape[0]} rows into a queue of "
                             f"{self.length}")
        self.head = (self.head - n) % self.length
        first = min(n, self.length - self.head)  # rows before the end of the buffers; the rest wrap to row 0
        for buf, new in ((self.feats, feats), (self.logits, logits), (self.labels, labels)):
            buf[self.head:self.head + first] = new[:first]
            if first < n:
                buf[:n - first] = new[first:]
        self.filled = min(self.length, self.filled + n)

    def state_dict(self) -> dict[str, Any]:
        return {"feats": self.newest_first(self.feats.detach()), "logits": self.newest_first(self.logits.detach()),
                "labels": self.newest_first(self.labels.detach()), "filled": int(self.filled)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in ("feats", "logits", "labels"):
            src, dst = state[name], getattr(self, name)
            if tuple(src.shape) != tuple(dst.shape):
                raise ValueError(f"queue {name}: checkpoint has shape {tuple(src.shape)}, expected {tuple(dst.shape)}")
            dst.copy_(src)
        self.filled = int(state["filled"])
        self.head = 0


def self_label_loss(
    feats: Tensor,
    logits: Tensor,
    labels: Tensor,
    prototypes: Tensor,
    queue: PixelQueue,
    marginal: Tensor,
    *,
    n_images: int,
    tau: float = 0.08,
    epsilon: float = 0.05,
    iters: int = 3,
    reference_scores: bool = False,
    logit_epsilon: float | None = None,
) -> tuple[Tensor, Tensor]:
    """The class-balanced self-labeling loss ``L_SL = L_feat + L_logit`` over a (global) batch; pushes the queue.

    ``feats`` (n_images*n, D): the sampled pixels' EMA features, already L2-normalised; ``logits`` (n_images*n,
    K): their EMA logits, already L2-normalised over K; ``labels`` (n_images*n,): their labels (stored in the
    queue for the contrastive term; unused here). Rows are grouped by image, in batch order. ``prototypes`` P
    (K, D): the learnable prototypes (the only tensor that receives a gradient).

    For each image i in order, with ``S_i = F_i N(P)^T`` (n, K):
      feature branch: ``q = sinkhorn([queue.feats @ N(P)^T; S_i])[-n:]`` (queue rows only when the queue is full);
      logit branch:   ``q' = sinkhorn([queue.logits; O_i])[-n:]``;
      then the image's rows are pushed, and
      ``l_i = CE(q, softmax(S_i / tau)) + CE(q', softmax(S_i / tau))``, CE(q, p) = -mean_n sum_k q log p.
    ``logit_epsilon``: the logit branch's epsilon (``epsilon`` when None; stage 1 passes
    ``losses.logit_sinkhorn_epsilon``, which scales it with the number of classes).
    Returns ``(mean_i l_i, assignments)`` with ``assignments`` (n_images*n,) = argmax of the feature-branch q
    (for inspection and tests).
    """
    total = feats.shape[0]
    if total % n_images:
        raise ValueError(f"{total} pixel rows do not split into {n_images} images")
    n = total // n_images
    p_norm = safe_normalize(prototypes, dim=1)
    losses, assigned = [], []
    for i in range(n_images):
        f_i, o_i, y_i = feats[i * n:(i + 1) * n], logits[i * n:(i + 1) * n], labels[i * n:(i + 1) * n]
        s_i = f_i @ p_norm.t()
        with torch.no_grad():
            if queue.full:  # the queue's rows in queue order (newest first), then the image's
                q_scores = queue.feats @ (prototypes.t() if reference_scores else p_norm.t())
                s_all = queue.newest_first(q_scores, s_i)
                o_all = queue.newest_first(queue.logits, o_i)
            else:
                s_all, o_all = s_i, o_i
            q_feat = sinkhorn(s_all, marginal, epsilon, iters)[-n:]
            q_logit = sinkhorn(o_all, marginal, epsilon if logit_epsilon is None else logit_epsilon, iters)[-n:]
        queue.push(f_i.detach(), o_i.detach(), y_i)
        log_p = F.log_softmax(s_i / tau, dim=1)
        l_feat = -(q_feat * log_p).sum(1).mean()
        l_logit = -(q_logit * log_p).sum(1).mean()
        losses.append(l_feat + l_logit)
        assigned.append(q_feat.argmax(1))
    return torch.stack(losses).mean(), torch.cat(assigned)
