"""Compact on-disk storage of soft and hard pseudo labels (written by ``pseudo-soft`` / ``pseudo-hard``).

Both kinds live in one folder per run, one file set per image, under the prepared split's sample name (which
may hold a ``/``, e.g. ``aachen/aachen_000000_000019``, giving a sub-folder), plus ``meta.json``.

Soft labels (``<name>.npz``)
    A ``np.savez_compressed`` archive with one array ``q``: uint8, shape (C, h, w), the class probabilities at the
    model's output resolution (stride 8: 129 x 257 for a 1024 x 2048 image) quantised to 1/255 steps with
    *sum-preserving rounding* (largest remainder): ``q_k`` is ``floor(255 p_k)`` or ``floor(255 p_k) + 1`` and
    ``sum_k q_k = 255`` at every pixel. Decoding is ``p_k = q_k / 255`` (``load_soft``), which is exactly
    normalised. Error bound: ``|q_k / 255 - p_k| < 1/255`` for every entry, and ``<= 1/510`` wherever plain
    rounding ``round(255 p)`` already sums to 255 (then ``q`` *is* ``round(255 p)``). By contrast, plain rounding
    followed by renormalisation can move an entry by up to ``(1 + C) / (510 - C)`` (0.041 for C = 19).
    Size: at most C*h*w bytes of payload (1/4 of the reference's float32 ``.npy``), and much less after deflate,
    since most pixels are confident (see ``cpsl.steps.pseudo_soft`` for measured sizes).

Hard labels (``<name>.png``, ``<name>_conf.png``, ``<name>_color.png``)
    ``<name>.png``: uint8 argmax train ids at label resolution. ``<name>_conf.png``: 16-bit grayscale PNG holding
    ``round(65535 * conf)``, conf being the max of the (flip-averaged) probabilities; 32x finer than the
    reference's float16 near 0.95 (float16 spacing there is 4.9e-4, ours 1.5e-5). ``<name>_color.png``: the
    label in the Cityscapes palette (for viewing only). The confidence threshold is applied when *loading*
    (``load_hard``): pixels with ``conf <= threshold`` become 255 (ignore), evaluated as
    ``q <= threshold * 65535`` on the stored integers. Only pixels whose true confidence lies within 1/131070
    of the threshold can land on the other side of it because of the quantisation.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import cv2
import numpy as np
import torch

from cpsl.data.common import read_png_unchanged
from cpsl.errors import DataError
from cpsl.labels import IGNORE_INDEX

SOFT_LEVELS = 255
CONF_LEVELS = 65535
SOFT_SUFFIX = ".npz"
SOFT_ENCODING = "uint8 largest-remainder quantisation, sum 255 per pixel; p = q / 255"
CONF_ENCODING = "uint16 PNG, conf = q / 65535"


# ---------------------------------------------------------------------------------------------------------
# Soft labels


def quantize_soft(probs: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Probabilities (..., C, h, w) -> uint8 tensor of the same shape with ``sum_k q_k = 255`` per pixel.

    Largest-remainder rounding: floor(255 p), then +1 for the classes with the largest remainders until each
    pixel sums to 255. The input is clamped to [0, 1] and renormalised first (float32), so fp16/bf16 softmax
    outputs are fine. Works on any device; the result stays there.
    """
    p = torch.as_tensor(probs).float().clamp(0.0, 1.0)  # out of place: never modify the caller's tensor
    if p.dim() < 3:
        raise ValueError(f"expected (..., C, h, w) probabilities, got shape {tuple(p.shape)}")
    dim = p.dim() - 3
    p = p / p.sum(dim, keepdim=True).clamp_min(1e-12)
    x = p * SOFT_LEVELS
    base = x.floor()
    rem = x - base
    deficit = (SOFT_LEVELS - base.sum(dim, keepdim=True)).round().clamp_(0, p.shape[dim])
    order = rem.argsort(dim=dim, descending=True, stable=True)
    rank = order.argsort(dim=dim, stable=True)
    q = base + (rank < deficit).to(base.dtype)
    return q.clamp_(0, SOFT_LEVELS).to(torch.uint8)


def dequantize_soft(q: np.ndarray | torch.Tensor, renormalize: bool = True) -> np.ndarray:
    """uint8 (C, h, w) -> float32 probabilities ``q / 255`` (renormalised per pixel: a no-op for our files)."""
    q = q.cpu().numpy() if isinstance(q, torch.Tensor) else np.asarray(q)
    p = q.astype(np.float32) / np.float32(SOFT_LEVELS)
    if renormalize:
        s = p.sum(axis=-3, keepdims=True)
        p /= np.maximum(s, np.float32(1e-12))
    return p


def soft_path(root: str | Path, name: str) -> Path:
    """The soft-label file of sample ``name`` in folder ``root``."""
    return Path(root) / f"{name}{SOFT_SUFFIX}"


def save_soft(path: str | Path, q: np.ndarray | torch.Tensor) -> int:
    """Write a quantised (uint8, (C, h, w)) soft label; returns the file size in bytes.

    Not atomic by itself: the steps write into a staging folder that is renamed when complete.
    """
    q = q.cpu().numpy() if isinstance(q, torch.Tensor) else np.asarray(q)
    if q.dtype != np.uint8 or q.ndim != 3:
        raise ValueError(f"{path}: soft label to write must be uint8 (C, h, w), got {q.dtype} {q.shape}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.savez_compressed(buf, q=np.ascontiguousarray(q))
    data = buf.getvalue()
    path.write_bytes(data)
    return len(data)


def load_soft_quantized(path: str | Path) -> np.ndarray:
    """The stored uint8 (C, h, w) array of a soft-label file (one-line DataError naming the file)."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            q = z["q"]
    except FileNotFoundError:
        raise DataError(f"{path}: soft pseudo label not found") from None
    except KeyError:
        raise DataError(f"{path}: not a soft pseudo-label file (no array 'q')") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise DataError(f"{path}: corrupt soft pseudo-label file ({str(err).splitlines()[0] if str(err) else err!r})"
                        ) from None
    if q.dtype != np.uint8 or q.ndim != 3:
        raise DataError(f"{path}: soft pseudo label must be uint8 (C, h, w), got {q.dtype} {q.shape}")
    return q


def load_soft(path: str | Path, renormalize: bool = True) -> np.ndarray:
    """float32 class probabilities (C, h, w) of a soft-label file (``q / 255``, renormalised per pixel)."""
    return dequantize_soft(load_soft_quantized(path), renormalize)


# ---------------------------------------------------------------------------------------------------------
# Hard labels


def hard_paths(root: str | Path, name: str) -> dict[str, Path]:
    """``{"label", "conf", "color"}`` file paths of sample ``name`` in folder ``root``."""
    root = Path(root)
    return {"label": root / f"{name}.png", "conf": root / f"{name}_conf.png", "color": root / f"{name}_color.png"}


def quantize_conf(conf: np.ndarray | torch.Tensor) -> np.ndarray:
    """Confidences in [0, 1] -> uint16 ``round(65535 * conf)`` (numpy)."""
    c = conf.detach().float().cpu().numpy() if isinstance(conf, torch.Tensor) else np.asarray(conf, np.float64)
    return np.rint(np.clip(c, 0.0, 1.0) * CONF_LEVELS).astype(np.uint16)


def _encode_png(arr: np.ndarray, path: Path, level: int = 3) -> bytes:
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(arr), [cv2.IMWRITE_PNG_COMPRESSION, level])
    if not ok:
        raise DataError(f"{path}: PNG encoding failed")
    return buf.tobytes()


def save_hard(root: str | Path, name: str, label: np.ndarray, conf_q: np.ndarray,
              color: np.ndarray | None = None) -> dict[str, int]:
    """Write ``<name>.png`` (uint8 ids), ``<name>_conf.png`` (uint16) and optionally ``<name>_color.png`` (RGB).

    Returns the byte size of each file written. Not atomic by itself (the steps stage the whole folder).
    """
    paths = hard_paths(root, name)
    label = np.asarray(label)
    conf_q = np.asarray(conf_q)
    if label.dtype != np.uint8 or label.ndim != 2:
        raise ValueError(f"{paths['label']}: label must be uint8 (H, W), got {label.dtype} {label.shape}")
    if conf_q.dtype != np.uint16 or conf_q.shape != label.shape:
        raise ValueError(f"{paths['conf']}: confidence must be uint16 {label.shape}, got {conf_q.dtype} "
                         f"{conf_q.shape}")
    paths["label"].parent.mkdir(parents=True, exist_ok=True)
    files = {"label": _encode_png(label, paths["label"]), "conf": _encode_png(conf_q, paths["conf"])}
    if color is not None:
        files["color"] = _encode_png(np.asarray(color, np.uint8)[:, :, ::-1], paths["color"])
    sizes = {}
    for key, data in files.items():
        paths[key].write_bytes(data)
        sizes[key] = len(data)
    return sizes


def load_hard_conf(root: str | Path, name: str) -> np.ndarray:
    """The stored uint16 confidence map (``conf = q / 65535``) of sample ``name``."""
    path = hard_paths(root, name)["conf"]
    q = read_png_unchanged(path)
    if q.dtype != np.uint16 or q.ndim != 2:
        raise DataError(f"{path}: confidence PNG must be 16-bit single-channel, got {q.dtype} {q.shape}")
    return q


def load_hard(root: str | Path, name: str, threshold: float | None = None) -> np.ndarray:
    """uint8 (H, W) hard pseudo label of ``name``; with ``threshold``, pixels of ``conf <= threshold`` -> 255.

    The comparison is made on the stored integers (``q <= threshold * 65535``), so a pixel is ignored exactly
    when its stored confidence ``q / 65535`` is ``<= threshold``.
    """
    path = hard_paths(root, name)["label"]
    label = read_png_unchanged(path)
    if label.dtype != np.uint8 or label.ndim != 2:
        raise DataError(f"{path}: hard pseudo label must be 8-bit single-channel, got {label.dtype} {label.shape}")
    if threshold is None:
        return label
    conf_q = load_hard_conf(root, name)
    if conf_q.shape != label.shape:
        raise DataError(f"{hard_paths(root, name)['conf']}: shape {conf_q.shape} differs from the label's "
                        f"{label.shape}")
    return threshold_hard(label, conf_q, threshold)


def threshold_hard(label: np.ndarray, conf_q: np.ndarray, threshold: float) -> np.ndarray:
    """A copy of ``label`` with 255 where the stored confidence ``conf_q`` (uint16, same shape) is
    ``<= threshold * 65535``: the threshold rule of ``load_hard``, for any crop of the two maps."""
    label = label.copy()
    label[conf_q <= threshold * CONF_LEVELS] = IGNORE_INDEX
    return label
