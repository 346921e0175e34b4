"""CPSL's LAB colour transfer (spec §1.4): per-image Lab statistics and the transfer to a target's statistics.

``prepare`` stores ``lab_stats`` of every image of a split (``lab_stats.npy``); training transfers each source
image to the statistics of a random target image with ``LabTransfer``, a pointwise map, which
``cpsl.data.transforms.weak_image`` applies to the pixels of the weak crop only. numpy and OpenCV only (no torch),
so ``prepare`` and its worker processes stay light.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


def _to_lab(img_uint8: np.ndarray) -> np.ndarray:
    rgb = np.asarray(img_uint8)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {rgb.dtype} {rgb.shape}")
    return cv2.cvtColor(np.multiply(rgb, np.float32(1.0 / 255.0), dtype=np.float32), cv2.COLOR_RGB2Lab)


def lab_mean_std(img_uint8: np.ndarray) -> np.ndarray:
    """Per-channel Lab mean and (population) std of an RGB uint8 image, float64 (2, 3) (row 0 mean, row 1 std),
    in cv2's float Lab convention (L 0..100; a, b about -128..127, like ``skimage.color.rgb2lab``, the
    reference's). ``cv2.meanStdDev`` sums in float64: within 1e-9 relative of numpy's float64 mean/std, 50x
    faster."""
    mean, std = cv2.meanStdDev(_to_lab(img_uint8))
    return np.stack([mean.ravel(), std.ravel()])


def lab_stats(img_uint8: np.ndarray) -> np.ndarray:
    """``lab_mean_std`` as float32 (2, 3): what ``prepare`` stores per image as an (N, 2, 3) array."""
    return lab_mean_std(img_uint8).astype(np.float32)


@dataclass(frozen=True)
class LabTransfer:
    """The LAB transfer of one image as a pointwise map: each Lab channel ``lab * gain + offset`` (float32),
    then back to RGB, clipped and truncated to uint8 as the reference does. Pointwise, so it can be applied to
    only the pixels a crop reads (``weak_image``)."""

    gain: np.ndarray
    offset: np.ndarray

    @classmethod
    def fit(cls, stats: np.ndarray, target_mean: np.ndarray, target_std: np.ndarray,
            eps: float = 1e-6) -> "LabTransfer":
        """The map that gives an image with Lab mean/std ``stats`` (2, 3) the target's mean and std:
        ``(lab - mean) / std * target_std + target_mean``."""
        stats = np.asarray(stats, np.float64).reshape(2, 3)
        mean, std = stats[0], np.maximum(stats[1], eps)
        tm = np.asarray(target_mean, np.float64).reshape(3)
        ts = np.asarray(target_std, np.float64).reshape(3)
        return cls((ts / std).astype(np.float32), (tm - mean * ts / std).astype(np.float32))

    def __call__(self, img_uint8: np.ndarray) -> np.ndarray:
        lab = _to_lab(img_uint8)
        lab *= self.gain
        lab += self.offset
        rgb = cv2.cvtColor(lab, cv2.COLOR_Lab2RGB)
        rgb *= np.float32(255.0)
        return np.clip(rgb, 0, 255, out=rgb).astype(np.uint8)


def lab_transfer(
    img_uint8: np.ndarray, target_mean: np.ndarray, target_std: np.ndarray, eps: float = 1e-6,
    stats: np.ndarray | None = None,
) -> np.ndarray:
    """Match each Lab channel's mean/std of ``img_uint8`` to ``target_mean``/``target_std`` (spec §1.4).

    ``lab_c = (lab_c - mean_c) / std_c * target_std_c + target_mean_c``, then back to RGB, clipped and truncated
    to uint8 as the reference does. The reference uses skimage's rgb2lab on both images at full resolution;
    we use cv2 in float32 (about the same Lab space, far cheaper) and precomputed target statistics.
    ``stats``: the image's own ``lab_stats`` when known (its prepared split's ``lab_stats.npy``), else computed.
    """
    own = lab_mean_std(img_uint8) if stats is None else stats
    return LabTransfer.fit(own, target_mean, target_std, eps)(img_uint8)
