"""Training-time image transforms with recorded parameters, and the maps that replay them.

Four families live here:

* **Weak** augmentation (spec §1.5): RandomSized -> RandomCrop -> horizontal flip. ``weak_augment`` returns the
  augmented image/label and a ``WeakParams`` record; ``full_to_weak`` / ``full_to_weak_batch`` (the reference's
  ``full2weak``) carry any map defined on the *full* image grid, at whatever resolution it is stored (a
  (19,129,257) soft label, (256,129,257) EMA features, a full-size hard label), into the weak crop at a requested
  output size (e.g. 1/4 of the crop) with one ``grid_sample``. The stored map is resampled at its own resolution:
  we never upsample it to full image size first (the reference's 159-413 MB per sample, spec §6).
* **Strong** augmentation (spec §1.6, FixMatch-style RandAugment): ``strong_augment`` applies flip, blur, colour
  jitter, two pool ops and Cutout to the weak crop and returns a ``StrongParams`` record that holds every
  *geometric* op, in the order applied, as a 3x3 matrix, plus the cutout box. The image's geometry is resampled
  **once** (exact flip, then one bilinear warp of the composed pool-op matrix at the first geometric pool op),
  not once per op. ``warp_map`` (numpy or torch, one sample) and ``warp_maps_batch`` (torch, batched,
  device-agnostic) replay that record with the same composed matrix on label maps (default ``"onehot"``: the
  argmax of a bilinear warp of the one-hot labels, which is what the thresholded image shows, so 2-3 px
  structures agree with the image; ``"nearest"`` available; outside/cutout -> 255) and probability/feature maps
  (bilinear; plus a validity mask) at any resolution of the crop, with one sampling pass per batch. Deliberate
  fixes of the reference's ``label_strong_T`` (spec §7 item 5): ops are replayed in the order applied, an op
  drawn twice is replayed twice, x shifts scale with the width (not 2/H), and the image and the maps use the
  *same* composed matrix, the same single resampling and the same pixel convention.
* The **LAB colour transfer** (spec §1.4) lives in ``cpsl.data.lab`` (no torch: ``prepare`` computes its
  statistics); ``weak_image`` applies it, as a pointwise map, to the pixels the weak crop reads only.
* **Random colours** (not in the reference; ``data.random_colors``): ``random_colors`` redraws an image's colours
  (channel order, inversion, gain, offset, gamma, greyscale, blur, noise) so that a network trained on it has to
  rely on shape and layout. The demo's source-only model trains with it and starts the warm-up, as a stand-in
  for the ImageNet initialisation that the paper presets load.

Coordinate convention (shared by every function here; the training code must follow it):

* **Continuous pixel coordinates with the origin at the top-left corner of the top-left pixel.** Pixel
  (row i, col j) covers [j, j+1) x [i, i+1); its centre is (j+0.5, i+0.5). This is PIL's convention for
  ``Image.transform`` (it evaluates the inverse matrix at x+0.5, y+0.5) and ``Image.resize``, and it is the
  ``align_corners=False`` convention of ``torch.nn.functional.grid_sample`` / ``interpolate``.
* A recorded matrix ``A`` is **forward**: it maps a point of the op's input image to the point of its output
  image, in the pixel units of the crop (``StrongParams.size_hw``). The image warp evaluates ``inv(A)`` at each
  output pixel centre (that is what PIL's AFFINE coefficients are); the map warp does the same at the map's own
  pixel centres after scaling x by W/w and y by H/h. Changing resolution is therefore the diagonal scaling
  ``S A S^-1`` with ``S = diag(w/W, h/H, 1)`` (``scale_matrix``).
* Maps produced at a reduced resolution (e.g. 128x224 for a 512x896 crop) are on the ``align_corners=False``
  grid of the crop: map pixel (i, j) sits at crop point ((j+0.5)*W/w, (i+0.5)*H/h). The network's outputs are
  on another grid (stride 8, rounded up: 65x113 for 512x896, sample i centred on crop pixel 8i); every stage
  brings them to a label grid with ``F.interpolate(..., align_corners=True)`` (``cpsl.methods.losses.upsample``,
  as the reference), which lands 1.07 px on average and at most 2.5 px (per axis) from these maps' pixel
  centres at 128x224; ``align_corners=False`` would be 2.00 px and 4.4 px off.

Every random draw comes from an explicit ``random.Random`` (or ``numpy.random.Generator``) argument: a
DataLoader worker seeded deterministically gives reproducible samples.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence, Union

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from cpsl.labels import IGNORE_INDEX
from cpsl.train.dist import host_to_device

Rng = Union[random.Random, np.random.Generator]
ImageLike = Union[Image.Image, np.ndarray]
MapLike = Union[np.ndarray, torch.Tensor]

FILL_GREY = (127, 127, 127)
# The reference's RandomSized(resize=2200) on 2048-wide Cityscapes/GTA images and RandomCrop((896, 512)).
REFERENCE_RESIZE_W = 2200
REFERENCE_CROP_HW = (512, 896)
# At most one strong flip plus ``n_ops`` geometric pool ops are recorded; the collate-friendly encoding pads to this.
MAX_GEOMETRIC_OPS = 8


def as_py_rng(rng: Rng) -> random.Random:
    """A ``random.Random`` for ``rng``: itself, or one seeded by a single draw from a numpy Generator."""
    if isinstance(rng, random.Random):
        return rng
    if isinstance(rng, np.random.Generator):
        return random.Random(int(rng.integers(0, 2**63 - 1)))
    raise TypeError(f"rng must be random.Random or numpy.random.Generator, got {type(rng).__name__}")


def _to_pil(img: ImageLike) -> Image.Image:
    if isinstance(img, Image.Image):
        return img.convert("RGB") if img.mode != "RGB" else img
    arr = np.asarray(img)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {arr.dtype} {arr.shape}")
    return Image.fromarray(np.ascontiguousarray(arr), "RGB")


def _rgb_array(img: ImageLike) -> np.ndarray:
    """An (H, W, 3) uint8 RGB array of ``img`` (a PIL image is converted; an array is checked, not copied)."""
    if isinstance(img, Image.Image):
        return np.asarray(_to_pil(img))
    arr = np.asarray(img)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {arr.dtype} {arr.shape}")
    return arr


def _like_input(img: Image.Image, template: ImageLike) -> ImageLike:
    return img if isinstance(template, Image.Image) else np.asarray(img, dtype=np.uint8).copy()


# ---------------------------------------------------------------------------------------------------------------
# Weak augmentation
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WeakParams:
    """What ``weak_augment`` did: enough to map any full-image map into the weak crop (``full_to_weak``).

    ``orig_hw``: the input image size. ``scaled_hw``: the RandomSized size. ``crop``: (y1, x1, h, w) in the
    scaled image (the box may reach past the scaled image when it was smaller than the crop; that part is
    padding). ``flip``: whether the crop was mirrored horizontally (after cropping).
    """

    orig_hw: tuple[int, int]
    scaled_hw: tuple[int, int]
    crop: tuple[int, int, int, int]
    flip: bool

    def as_dict(self) -> dict[str, np.ndarray]:
        """Fixed-shape int64 arrays, so torch's default collate batches them (``weak_params_from_batch``)."""
        return {
            "orig_hw": np.asarray(self.orig_hw, np.int64),
            "scaled_hw": np.asarray(self.scaled_hw, np.int64),
            "crop": np.asarray(self.crop, np.int64),
            "flip": np.asarray(int(self.flip), np.int64),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "WeakParams":
        def ints(v: Any) -> tuple[int, ...]:
            return tuple(int(x) for x in np.asarray(v).reshape(-1))

        return cls(
            ints(d["orig_hw"]),  # type: ignore[arg-type]
            ints(d["scaled_hw"]),  # type: ignore[arg-type]
            ints(d["crop"]),  # type: ignore[arg-type]
            bool(int(np.asarray(d["flip"]))),
        )


def weak_params_from_batch(batch: dict[str, Any]) -> list[WeakParams]:
    """Split a collated ``WeakParams.as_dict`` batch (tensors with a leading batch dim) into records."""
    n = len(batch["flip"])
    return [WeakParams.from_dict({k: np.asarray(v[i]) for k, v in batch.items()}) for i in range(n)]


@dataclass(frozen=True)
class WeakConfig:
    """Weak augmentation settings.

    ``resize_w``: the RandomSized base width (the reference's ``resize=2200`` for 2048-wide images); None means
    the input width times ``2200/2048``, i.e. the reference's relative setting. The scaled width is
    ``int(U(*scale) * resize_w)`` and the height keeps the input aspect ratio, as in the reference.
    ``crop_hw``: the RandomCrop size (h, w). ``flip_p``: horizontal flip probability.
    """

    crop_hw: tuple[int, int] = REFERENCE_CROP_HW
    resize_w: int | None = None
    scale: tuple[float, float] = (0.5, 1.5)
    flip_p: float = 0.5


def sample_weak_params(orig_hw: tuple[int, int], cfg: WeakConfig, rng: Rng) -> WeakParams:
    """Draw RandomSized, RandomCrop and flip for an image of size ``orig_hw`` (no pixels touched)."""
    r = as_py_rng(rng)
    h0, w0 = orig_hw
    base_w = cfg.resize_w if cfg.resize_w is not None else w0 * REFERENCE_RESIZE_W / 2048
    ws = max(1, int(r.uniform(*cfg.scale) * base_w))
    hs = max(1, int(ws / (w0 / h0)))  # the reference's formula
    ch, cw = cfg.crop_hw
    y1 = r.randint(0, max(0, hs - ch))
    x1 = r.randint(0, max(0, ws - cw))
    flip = r.random() < cfg.flip_p
    return WeakParams((h0, w0), (hs, ws), (y1, x1, ch, cw), flip)


def _nearest_indices(n_in: int, n_out: int) -> np.ndarray:
    """The input index PIL's NEAREST resize from ``n_in`` to ``n_out`` pixels reads for each output pixel (int64
    (n_out,)). Obtained from PIL itself (a one-row image of the indices, resized), so a label carried by these
    indices is bit-identical to PIL's resize of the whole label."""
    row = Image.fromarray(np.arange(n_in, dtype=np.int32)[None, :])
    return np.asarray(row.resize((n_out, 1), Image.Resampling.NEAREST), np.int64)[0]


def weak_label(label: np.ndarray, params: WeakParams) -> np.ndarray:
    """A label map of the full image carried into the weak crop: nearest resize to ``scaled_hw`` (PIL's), crop
    (255 where the box passes the scaled image), flip. uint8 (H, W) in, uint8 (crop h, crop w) out.

    Only the crop's pixels are looked up (``_nearest_indices``): the same values as PIL's nearest resize of the
    whole map followed by the crop, without building the scaled map. Any dtype keeps its dtype (a uint16
    confidence map too); labels are uint8.
    """
    label = np.asarray(label)
    if label.shape[:2] != tuple(params.orig_hw):
        raise ValueError(f"label is {label.shape[0]}x{label.shape[1]}, the image is "
                         f"{params.orig_hw[0]}x{params.orig_hw[1]}")
    (h0, w0), (hs, ws) = params.orig_hw, params.scaled_hw
    y1, x1, ch, cw = params.crop
    rows = _nearest_indices(h0, hs)[y1:y1 + ch]
    cols = _nearest_indices(w0, ws)[x1:x1 + cw]
    out = np.full((ch, cw), IGNORE_INDEX, label.dtype)
    out[:len(rows), :len(cols)] = label[rows[:, None], cols[None, :]]
    return out[:, ::-1].copy() if params.flip else out


def weak_window(params: WeakParams) -> tuple[int, int, int, int]:
    """``(y0, y1, x0, x1)``, end-exclusive: the block of the full image that the weak crop's bilinear resize
    reads (the crop's pre-image plus the filter's support and one pixel), clipped to the image."""
    (h0, w0), (hs, ws) = params.orig_hw, params.scaled_hw
    y1, x1, ch, cw = params.crop
    oh, ow = max(0, min(ch, hs - y1)), max(0, min(cw, ws - x1))
    sy, sx = h0 / hs, w0 / ws
    my, mx = math.ceil(max(sy, 1.0)) + 1, math.ceil(max(sx, 1.0)) + 1  # bilinear support: 1 output pixel
    return (max(0, math.floor(y1 * sy) - my), min(h0, math.ceil((y1 + oh) * sy) + my),
            max(0, math.floor(x1 * sx) - mx), min(w0, math.ceil((x1 + ow) * sx) + mx))


def weak_image(image: np.ndarray, params: WeakParams, colour: Callable[[np.ndarray], np.ndarray] | None = None
               ) -> np.ndarray:
    """The weak crop of an (H, W, 3) uint8 image: PIL bilinear resize to ``scaled_hw``, crop (0 where the box
    passes the scaled image), flip.

    Only the crop is resampled: PIL resizes the image block the crop reads (``weak_window``) with the crop's box
    in that block: the same filter on the same pixels, in the same order (rows, then columns), as resizing the
    whole image and cropping, 5-10x cheaper at the presets' sizes. PIL takes the box in float32, so a filter
    weight moves by about 1e-7 and a value that lands near a rounding boundary rounds the other way: each value
    is within 2 of 255 of the whole-image resize (1 per pass); on the benchmark's real-size images 0.07-0.24 %
    of the values differ on average, up to 5 % in a crop whose scale repeats a phase near a boundary
    (tests/test_data_path.py). ``colour``, a pointwise uint8 -> uint8 map (the LAB transfer), is applied to that
    block only, before the resize: exactly what applying it to the whole image first gives.
    """
    if image.shape[:2] != tuple(params.orig_hw):
        raise ValueError(f"image is {image.shape[0]}x{image.shape[1]}, params expect {params.orig_hw}")
    (h0, w0), (hs, ws) = params.orig_hw, params.scaled_hw
    y1, x1, ch, cw = params.crop
    out = np.zeros((ch, cw, 3), np.uint8)
    oh, ow = min(ch, hs - y1), min(cw, ws - x1)
    if oh > 0 and ow > 0:
        r0, r1, c0, c1 = weak_window(params)
        block = image[r0:r1, c0:c1]
        block = np.ascontiguousarray(block) if colour is None else colour(block)
        sy, sx = h0 / hs, w0 / ws
        # PIL resizes rows first, then columns (rounding to uint8 in between); two calls keep that order (one
        # call on the block may take the columns first, its choice depends on the sizes)
        rows = Image.fromarray(block, "RGB").resize(
            (ow, r1 - r0), Image.Resampling.BILINEAR, box=(x1 * sx - c0, 0, min((x1 + ow) * sx - c0, c1 - c0), r1 - r0))
        out[:oh, :ow] = np.asarray(rows.resize(
            (ow, oh), Image.Resampling.BILINEAR, box=(0, y1 * sy - r0, ow, min((y1 + oh) * sy - r0, r1 - r0))))
    return out[:, ::-1].copy() if params.flip else out


def apply_weak(
    img: ImageLike, label: np.ndarray | None, params: WeakParams,
    colour: Callable[[np.ndarray], np.ndarray] | None = None,
) -> tuple[ImageLike, np.ndarray | None]:
    """Replay ``params`` on an image (bilinear resize, zero padding: ``weak_image``) and a label map (nearest,
    255 padding: ``weak_label``); ``colour``: see ``weak_image``.

    Unlike the reference's unreachable and broken "too small" branch, a scaled image smaller than the crop is
    padded at the bottom/right (image 0, label ``IGNORE_INDEX``).
    """
    out = weak_image(_rgb_array(img), params, colour)
    lab_out = None
    if label is not None:
        lab_out = weak_label(np.asarray(label).astype(np.uint8, copy=False), params)
    return (Image.fromarray(out, "RGB") if isinstance(img, Image.Image) else out), lab_out


def weak_augment(
    img: ImageLike, label: np.ndarray | None, rng: Rng, cfg: WeakConfig = WeakConfig(),
    colour: Callable[[np.ndarray], np.ndarray] | None = None,
) -> tuple[ImageLike, np.ndarray | None, WeakParams]:
    """RandomSized -> RandomCrop -> hflip (spec §1.5). Returns (image crop, label crop or None, params).

    The image comes back in the type it came in (PIL or (H, W, 3) uint8 numpy); the label as uint8 (h, w).
    ``colour``: a pointwise map applied to the pixels the crop reads only (``weak_image``).
    """
    h0, w0 = (img.height, img.width) if isinstance(img, Image.Image) else np.asarray(img).shape[:2]
    params = sample_weak_params((h0, w0), cfg, rng)
    out, lab = apply_weak(img, label, params, colour)
    return out, lab, params


def _axis_centres(n_out: int, length: float, align_corners: bool) -> np.ndarray:
    """Positions (continuous, corner origin) of ``n_out`` samples spanning ``length`` pixels."""
    if align_corners and n_out > 1:
        return 0.5 + np.arange(n_out, dtype=np.float64) * ((length - 1.0) / (n_out - 1.0))
    return (np.arange(n_out, dtype=np.float64) + 0.5) * (length / n_out)


def _weak_grid(
    p: WeakParams, out_hw: tuple[int, int], src_align_corners: bool, out_align_corners: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-axis normalised source coordinates (gx, gy) and in-image flags for ``full_to_weak``."""
    oh, ow = out_hw
    h0, w0 = p.orig_hw
    hs, ws = p.scaled_hw
    y1, x1, ch, cw = p.crop
    xc = _axis_centres(ow, cw, out_align_corners)
    yc = _axis_centres(oh, ch, out_align_corners)
    if p.flip:
        xc = cw - xc  # the flip mirrors the crop
    xs, ys = xc + x1, yc + y1  # scaled-image coordinates
    inx, iny = (xs >= 0) & (xs < ws), (ys >= 0) & (ys < hs)
    xf, yf = xs * (w0 / ws), ys * (h0 / hs)  # full-image coordinates (resize is a pure scale in this convention)
    if src_align_corners:  # map's first/last samples sit on the full image's first/last pixel centres
        gx = 2.0 * (xf - 0.5) / max(w0 - 1, 1) - 1.0
        gy = 2.0 * (yf - 0.5) / max(h0 - 1, 1) - 1.0
    else:  # map pixels tile the full image
        gx = 2.0 * xf / w0 - 1.0
        gy = 2.0 * yf / h0 - 1.0
    return gx, gy, inx, iny


def _resample(
    maps: torch.Tensor,
    grid: np.ndarray,
    valid: np.ndarray,
    mode: str | None,
    fill: float | None,
    align_corners: bool,
    int_mode: str = "nearest",
) -> torch.Tensor:
    """``grid_sample`` maps (B, C, h, w) or (B, h, w) on a float64 numpy grid (B, oh, ow, 2); fill where not valid.

    Defaults by dtype: float maps bilinear with fill 0, integer maps (labels) ``int_mode`` with fill 255. Sampling runs
    in float32 (or float64) whatever the storage dtype (float16 soft labels, uint8 labels or quantised
    probabilities), and the result is cast back to the input dtype (rounded for integer dtypes).
    """
    is_float = maps.is_floating_point()
    mode = mode or ("bilinear" if is_float else int_mode)
    if fill is None:
        fill = 0.0 if is_float else float(IGNORE_INDEX)
    no_channel = maps.dim() == 3
    x = maps.unsqueeze(1) if no_channel else maps
    if x.dim() != 4:
        raise ValueError(f"expected (B, C, h, w) or (B, h, w), got {tuple(maps.shape)}")
    work = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    g = host_to_device(torch.from_numpy(grid).to(work), x.device)
    v = host_to_device(torch.from_numpy(valid), x.device)
    if mode == "onehot":
        out = _onehot_sample(x, g, align_corners).to(work)
    else:
        out = F.grid_sample(x.to(work), g, mode=mode, padding_mode="border", align_corners=align_corners)
    out = torch.where(v[:, None], out, float(fill))
    out = out.to(maps.dtype) if is_float else out.round().to(maps.dtype)
    return out[:, 0] if no_channel else out


def _onehot_sample(x: torch.Tensor, grid: torch.Tensor, align_corners: bool = False) -> torch.Tensor:
    """Label resampling as the image sees it: the argmax over classes of a bilinear warp of the one-hot labels
    (``grid_sample`` semantics, border padding), ties going to the smallest label value. A
    thresholded bilinear image warp and this agree on thin structures where nearest does not.

    Computed without the (B, K, h, w) one-hot tensor: each output pixel has 4 bilinear taps, and a class's
    bilinear weight is the sum of the weights of the taps carrying it, so the argmax is among the 4 tap labels.
    Cost is independent of the number of classes (about 60 bytes per output pixel of temporaries). Returns
    (B, 1, oh, ow) labels in ``x``'s dtype.
    """
    if x.shape[1] != 1:
        raise ValueError("mode='onehot' needs a label map (B, h, w) or (B, 1, h, w)")
    b, _, hi, wi = x.shape
    # grid_sample's unnormalisation and border padding (clamp the coordinate)
    if align_corners:
        ix = ((grid[..., 0] + 1.0) * (0.5 * (wi - 1))).clamp_(0, wi - 1)
        iy = ((grid[..., 1] + 1.0) * (0.5 * (hi - 1))).clamp_(0, hi - 1)
    else:
        ix = (((grid[..., 0] + 1.0) * wi - 1.0) * 0.5).clamp_(0, wi - 1)
        iy = (((grid[..., 1] + 1.0) * hi - 1.0) * 0.5).clamp_(0, hi - 1)
    x0f, y0f = ix.floor(), iy.floor()
    wx, wy = ix - x0f, iy - y0f
    del ix, iy
    x0, y0 = x0f.long(), y0f.long()
    del x0f, y0f
    x1, y1 = (x0 + 1).clamp_(max=wi - 1), (y0 + 1).clamp_(max=hi - 1)
    flat = x.reshape(b, hi * wi)
    out_hw = grid.shape[1:3]

    def tap(yy: torch.Tensor, xx: torch.Tensor) -> torch.Tensor:
        return flat.gather(1, (yy * wi + xx).reshape(b, -1)).reshape(b, *out_hw)

    labels = torch.stack((tap(y0, x0), tap(y0, x1), tap(y1, x0), tap(y1, x1)))  # taps nw, ne, sw, se
    del x0, y0, x1, y1
    ux, uy = 1.0 - wx, 1.0 - wy
    weights = torch.stack((ux * uy, wx * uy, ux * wy, wx * wy))
    del wx, wy, ux, uy
    best_l, best_s = labels[0], None
    for i in range(4):
        # the bilinear weight of tap i's class: the sum of the weights of the taps that carry it
        si = (weights * (labels == labels[i])).sum(0)
        if best_s is None:
            best_s = si
        else:
            better = (si > best_s) | ((si == best_s) & (labels[i] < best_l))
            best_l = torch.where(better, labels[i], best_l)
            best_s = torch.where(better, si, best_s)
    return best_l[:, None]


def full_to_weak_batch(
    maps: torch.Tensor,
    params: Sequence[WeakParams],
    out_hw: tuple[int, int],
    *,
    mode: str | None = None,
    fill: float | None = None,
    src_align_corners: bool = True,
    out_align_corners: bool = False,
) -> torch.Tensor:
    """Map full-image maps (B, C, hm, wm) (or integer labels (B, hm, wm)) into each sample's weak crop.

    The reference's ``full2weak``, done exactly and at the map's own resolution: for every output pixel we
    compute where it falls in the full image (through crop, RandomSized scale and flip) and sample the stored
    map there with one ``grid_sample`` (``mode`` 'bilinear' for probabilities/features, 'nearest' for labels).
    Memory is O(B*C*out_h*out_w); nothing is ever upsampled to the image size.

    ``src_align_corners``: how the map's grid sits on the full image. True (default) means its corner samples
    are on the image's corner pixel centres, which is how the reference treats network outputs such as the
    (129, 257) EMA grid and the stored soft labels (it upsamples them with ``align_corners=True``). False means
    the map's pixels tile the image (a full-size label map gives the same result either way).
    ``out_align_corners``: the output grid's convention on the crop; keep the default False (see the module
    docstring) unless the consumer upsampled with ``align_corners=True``.
    Defaults by dtype: float maps bilinear, integer maps (labels) nearest. Output pixels that fall in the crop's
    padding (scaled image smaller than the crop) get ``fill`` (default 0 for floats, ``IGNORE_INDEX`` for
    integers). The result has the input's dtype (float16 storage is sampled in float32 and cast back).
    """
    if len(params) != maps.shape[0]:
        raise ValueError(f"{maps.shape[0]} maps but {len(params)} params")
    oh, ow = out_hw
    grids, valids = [], []
    for p in params:
        gx, gy, inx, iny = _weak_grid(p, out_hw, src_align_corners, out_align_corners)
        g = np.empty((oh, ow, 2), np.float64)
        g[..., 0] = gx[None, :]
        g[..., 1] = gy[:, None]
        grids.append(g)
        valids.append(iny[:, None] & inx[None, :])
    return _resample(maps, np.stack(grids), np.stack(valids), mode, fill, src_align_corners)


def full_to_weak(
    map_: MapLike,
    params: WeakParams,
    out_hw: tuple[int, int],
    *,
    mode: str | None = None,
    fill: float | None = None,
    src_align_corners: bool = True,
    out_align_corners: bool = False,
) -> MapLike:
    """One-sample ``full_to_weak_batch``: (C, hm, wm) or (hm, wm) numpy/torch in, same kind out at ``out_hw``."""
    is_np = isinstance(map_, np.ndarray)
    t = torch.from_numpy(np.ascontiguousarray(map_)) if is_np else map_
    out = full_to_weak_batch(
        t[None],
        [params],
        out_hw,
        mode=mode,
        fill=fill,
        src_align_corners=src_align_corners,
        out_align_corners=out_align_corners,
    )[0]
    return out.numpy() if is_np else out


# ---------------------------------------------------------------------------------------------------------------
# Affine matrices (forward, continuous corner-origin pixel coordinates)
# ---------------------------------------------------------------------------------------------------------------


def hflip_matrix(w: int) -> np.ndarray:
    """x -> W - x (pixel j -> W-1-j)."""
    return np.array([[-1.0, 0.0, w], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])


def rotate_matrix(deg: float, h: int, w: int) -> np.ndarray:
    """Counter-clockwise (as displayed, y down) rotation by ``deg`` about the image centre, like ``PIL.rotate``."""
    t = math.radians(deg)
    c, s = math.cos(t), math.sin(t)
    cx, cy = w / 2.0, h / 2.0
    return np.array([[c, s, cx - c * cx - s * cy], [-s, c, cy + s * cx - c * cy], [0.0, 0.0, 1.0]])


def shear_x_matrix(v: float) -> np.ndarray:
    """FixMatch ShearX: PIL coefficients (1, v, 0, 0, 1, 0), i.e. x_in = x_out + v*y; forward x_out = x_in - v*y."""
    return np.array([[1.0, -v, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])


def shear_y_matrix(v: float) -> np.ndarray:
    """FixMatch ShearY: y_in = y_out + v*x; forward y_out = y_in - v*x."""
    return np.array([[1.0, 0.0, 0.0], [-v, 1.0, 0.0], [0.0, 0.0, 1.0]])


def translate_matrix(tx: float, ty: float) -> np.ndarray:
    """Forward shift by (tx, ty) pixels. FixMatch TranslateX(v) samples x_in = x_out + v, i.e. tx = -v."""
    return np.array([[1.0, 0.0, tx], [0.0, 1.0, ty], [0.0, 0.0, 1.0]])


def scale_matrix(a: np.ndarray, from_hw: tuple[int, int], to_hw: tuple[int, int]) -> np.ndarray:
    """Express the forward matrix ``a`` (pixels of a ``from_hw`` image) in pixels of a ``to_hw`` map.

    x scales by the width ratio and y by the height ratio (the reference used 2/H for x shifts, spec §7.5).
    """
    s = np.diag([to_hw[1] / from_hw[1], to_hw[0] / from_hw[0], 1.0])
    return s @ a @ np.linalg.inv(s)


# ---------------------------------------------------------------------------------------------------------------
# Strong augmentation (FixMatch RandAugmentMC(n=2, m=10) as CPSL uses it)
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class GeoOp:
    """One geometric op as applied: its name, the drawn parameter (degrees, shear, or signed FixMatch pixel
    value), and the forward 3x3 matrix in the crop's pixel coordinates."""

    name: str
    value: float
    matrix: np.ndarray = field(repr=False)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, GeoOp):
            return NotImplemented
        return self.name == other.name and self.value == other.value and np.array_equal(self.matrix, other.matrix)

    __hash__ = None  # type: ignore[assignment]


@dataclass(frozen=True)
class StrongParams:
    """What ``strong_augment`` did geometrically: ``ops`` in the order applied (an op drawn twice appears twice),
    ``size_hw`` of the image it was applied to, and the ``cutout`` box (x0, y0, x1, y1), end-exclusive, in that
    image's pixels (None if no cutout)."""

    size_hw: tuple[int, int]
    ops: tuple[GeoOp, ...] = ()
    cutout: tuple[int, int, int, int] | None = None

    @property
    def matrices(self) -> list[np.ndarray]:
        return [op.matrix for op in self.ops]

    def as_dict(self) -> dict[str, np.ndarray]:
        """Fixed-shape arrays for torch's default collate (``strong_params_from_batch`` inverts it).

        ``matrices`` (MAX_GEOMETRIC_OPS, 3, 3) float64 padded with identities, ``n_ops``, ``size_hw``,
        ``cutout`` (4,) with -1s when absent. Op names are not kept (the matrices are what a replay needs).
        """
        if len(self.ops) > MAX_GEOMETRIC_OPS:
            raise ValueError(f"{len(self.ops)} geometric ops exceed MAX_GEOMETRIC_OPS={MAX_GEOMETRIC_OPS}")
        mats = np.tile(np.eye(3), (MAX_GEOMETRIC_OPS, 1, 1))
        for i, op in enumerate(self.ops):
            mats[i] = op.matrix
        return {
            "matrices": mats,
            "n_ops": np.asarray(len(self.ops), np.int64),
            "size_hw": np.asarray(self.size_hw, np.int64),
            "cutout": np.asarray(self.cutout if self.cutout is not None else (-1, -1, -1, -1), np.int64),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "StrongParams":
        mats = np.asarray(d["matrices"], np.float64)
        n = int(np.asarray(d["n_ops"]))
        cut = tuple(int(v) for v in np.asarray(d["cutout"]).reshape(-1))
        return cls(
            size_hw=tuple(int(v) for v in np.asarray(d["size_hw"]).reshape(-1)),  # type: ignore[arg-type]
            ops=tuple(GeoOp("affine", float("nan"), mats[i].copy()) for i in range(n)),
            cutout=None if cut[0] < 0 else cut,  # type: ignore[arg-type]
        )


def strong_params_from_batch(batch: dict[str, Any]) -> list[StrongParams]:
    """Split a collated ``StrongParams.as_dict`` batch into records."""
    n = len(batch["n_ops"])
    return [StrongParams.from_dict({k: np.asarray(v[i]) for k, v in batch.items()}) for i in range(n)]


def compose(params: StrongParams) -> np.ndarray:
    """The forward 3x3 matrix of all geometric ops, in application order: ``A_n @ ... @ A_1``."""
    m = np.eye(3)
    for op in params.ops:
        m = op.matrix @ m
    return m


ALL_OPS = (
    "AutoContrast",
    "Brightness",
    "Color",
    "Contrast",
    "Equalize",
    "Identity",
    "Posterize",
    "Rotate",
    "Sharpness",
    "ShearX",
    "ShearY",
    "Solarize",
    "TranslateX",
    "TranslateY",
)
GEOMETRIC_OPS = frozenset({"Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY"})


@dataclass(frozen=True)
class StrongConfig:
    """Strong augmentation settings; defaults are the reference's ``RandAugmentMC(n=2, m=10, jitter=0.4)``.

    ``pool``: op names drawn from (with replacement), ``n_ops`` per image, each applied with ``op_p`` at a
    magnitude ``v`` uniform in 1..``max_v``. ``cutout``: whether to apply the final Cutout, a grey square of side
    ``min(W, H) // cutout_div``.
    """

    flip_p: float = 0.5
    blur_p: float = 0.5
    blur_radius: float = 1.0
    jitter_p: float = 0.5
    jitter: float = 0.4
    pool: tuple[str, ...] = ALL_OPS
    n_ops: int = 2
    op_p: float = 0.5
    max_v: int = 9
    cutout: bool = True
    cutout_div: int = 3


def _pil_affine(img: Image.Image, a: np.ndarray) -> Image.Image:
    """Warp with forward matrix ``a``: PIL samples ``inv(a)`` at output pixel centres; bilinear, grey fill."""
    inv = np.linalg.inv(a)
    coeffs = tuple(float(c) for c in inv[:2].reshape(-1))
    return img.transform(
        img.size, Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BILINEAR, fillcolor=FILL_GREY
    )


def _color_jitter(img: Image.Image, strength: float, r: random.Random) -> Image.Image:
    """torchvision ColorJitter(s, s, s, hue=min(0.5, s)) semantics, with our RNG (random order of the 4 ops)."""
    import torchvision.transforms.functional as TF

    lo, hi = max(0.0, 1.0 - strength), 1.0 + strength
    hue = min(0.5, strength)
    factors = {
        "b": r.uniform(lo, hi),
        "c": r.uniform(lo, hi),
        "s": r.uniform(lo, hi),
        "h": r.uniform(-hue, hue),
    }
    order = ["b", "c", "s", "h"]
    r.shuffle(order)
    for k in order:
        if k == "b":
            img = TF.adjust_brightness(img, factors[k])
        elif k == "c":
            img = TF.adjust_contrast(img, factors[k])
        elif k == "s":
            img = TF.adjust_saturation(img, factors[k])
        else:
            img = TF.adjust_hue(img, factors[k])
    return img


def _enhance_factor(v: int) -> float:
    return v * 0.9 / 10 + 0.05  # FixMatch _float_parameter(v, 0.9) + bias 0.05: 0.14 .. 0.86


def _signed(x: float, r: random.Random) -> float:
    return -x if r.random() < 0.5 else x


def _apply_colour_op(name: str, v: int, img: Image.Image) -> Image.Image:
    """Apply one non-geometric pool op with magnitude v (1..9); consumes no randomness."""
    if name == "AutoContrast":
        return ImageOps.autocontrast(img)
    if name == "Brightness":
        return ImageEnhance.Brightness(img).enhance(_enhance_factor(v))
    if name == "Color":
        return ImageEnhance.Color(img).enhance(_enhance_factor(v))
    if name == "Contrast":
        return ImageEnhance.Contrast(img).enhance(_enhance_factor(v))
    if name == "Sharpness":
        return ImageEnhance.Sharpness(img).enhance(_enhance_factor(v))
    if name == "Equalize":
        return ImageOps.equalize(img)
    if name == "Identity":
        return img
    if name == "Posterize":
        return ImageOps.posterize(img, int(v * 4 / 10) + 4)
    if name == "Solarize":
        return ImageOps.solarize(img, 256 - int(v * 256 / 10))
    raise ValueError(f"unknown strong op {name!r}; known: {', '.join(ALL_OPS)}")


def _draw_geo_op(name: str, v: int, h: int, w: int, r: random.Random) -> GeoOp:
    """Draw one geometric pool op with magnitude v (1..9) on an (h, w) image: its sign, and its forward matrix."""
    if name == "Rotate":
        deg = _signed(v * 30 / 10, r)
        a = rotate_matrix(deg, h, w)
    elif name == "ShearX":
        s = _signed(v * 0.3 / 10, r)
        a = shear_x_matrix(s)
        deg = s
    elif name == "ShearY":
        s = _signed(v * 0.3 / 10, r)
        a = shear_y_matrix(s)
        deg = s
    elif name == "TranslateX":
        t = _signed(int(v * 0.3 / 10 * w), r)
        a = translate_matrix(-t, 0.0)
        deg = t
    elif name == "TranslateY":
        t = _signed(int(v * 0.3 / 10 * h), r)
        a = translate_matrix(0.0, -t)
        deg = t
    else:
        raise ValueError(f"not a geometric strong op: {name!r}; known: {', '.join(sorted(GEOMETRIC_OPS))}")
    return GeoOp(name, float(deg), a)


def _apply_pool_op(
    name: str, v: int, img: Image.Image, r: random.Random
) -> tuple[Image.Image, GeoOp | None]:
    """Apply one pool op on its own (its own bilinear warp for a geometric op); return the image and, for
    geometric ops, the recorded op. ``strong_augment`` no longer calls this for geometric ops (it resamples all
    of them once); kept for op-by-op experiments."""
    if name not in GEOMETRIC_OPS:
        return _apply_colour_op(name, v, img), None
    op = _draw_geo_op(name, v, img.height, img.width, r)
    return _pil_affine(img, op.matrix), op


def _is_hflip(a: np.ndarray, w: int) -> bool:
    return bool(np.array_equal(np.asarray(a, np.float64), hflip_matrix(w)))


def _apply_geometry(pil: Image.Image, matrices: Sequence[np.ndarray]) -> Image.Image:
    """Resample ``pil`` once through the composition of ``matrices`` (forward, in order), as ``strong_augment``
    does: a leading horizontal flip is done exactly (a pixel permutation), everything after it in a single
    bilinear PIL AFFINE warp (grey fill) of the composed matrix."""
    mats = list(matrices)
    if mats and _is_hflip(mats[0], pil.width):
        pil = pil.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        mats = mats[1:]
    if mats:
        m = np.eye(3)
        for a in mats:
            m = np.asarray(a, np.float64) @ m
        pil = _pil_affine(pil, m)
    return pil


def cutout_box(h: int, w: int, side: int, r: random.Random) -> tuple[int, int, int, int]:
    """FixMatch CutoutAbs box (x0, y0, x1, y1), end-exclusive: uniform centre, square of ``side``, clipped."""
    cx, cy = r.uniform(0, w), r.uniform(0, h)
    x0, y0 = int(max(0.0, cx - side / 2.0)), int(max(0.0, cy - side / 2.0))
    return x0, y0, int(min(w, x0 + side)), int(min(h, y0 + side))


def strong_augment(
    img: ImageLike, rng: Rng, cfg: StrongConfig = StrongConfig()
) -> tuple[ImageLike, StrongParams]:
    """The strong view of a weak crop (spec §1.6). Returns (image, params); image in the input's type.

    Order of the draws (and of the recorded ``StrongParams.ops``): p=flip_p hflip; p=blur_p GaussianBlur;
    p=jitter_p ColorJitter; ``n_ops`` ops drawn with replacement from ``pool``, each with v in 1..max_v and
    applied with p=op_p; Cutout (grey 127).

    **The image's geometry is resampled once** (a deliberate change from the reference, which warps once per op):
    the flip is an exact pixel permutation done where it is drawn; the geometric pool ops (Rotate, ShearX/Y,
    TranslateX/Y) are recorded one by one, in order (an op drawn twice is recorded twice), and the composition of
    all of them is applied as a single bilinear PIL AFFINE warp (grey fill) **at the position of the first
    geometric pool op**; later geometric ops do not touch the pixels again. Colour pool ops run where they are
    drawn. With the default ``n_ops=2`` this keeps the reference's order of colour and geometric ops exactly
    (a colour op is either before or after all geometric ops). With more ops, a colour op drawn between two
    geometric ops sees the fully warped image instead of a partially warped one; that is harmless because the
    colour ops are pointwise (Brightness, Color, Posterize, Solarize, Identity), pointwise given image-wide
    statistics (AutoContrast, Contrast, Equalize: the statistics move slightly, as they do in the reference) or
    a 3x3 filter (Sharpness), so they commute with the warp up to rounding, except on the grey fill area, which
    is invalid in every replayed map anyway. Why: chained bilinear warps blur and erode thin structures (a 3 px
    stripe loses its ends and edges after two rotations) in the image only, while the labels are warped once
    with the composed matrix; one warp keeps the image and the replayed label maps (``warp_map``, default
    ``onehot`` label mode) in agreement on 2-3 px structures. Consequently, a point pushed out of the frame by
    one op and back in by another shows image content and is *valid* in the replayed maps (only the composed
    pre-image decides), and the recorded ops replayed by ``warp_map`` / ``apply_strong_geometry`` reproduce
    exactly this image.
    """
    r = as_py_rng(rng)
    pil = _to_pil(img)
    w, h = pil.size
    ops: list[GeoOp] = []
    if r.random() < cfg.flip_p:
        pil = pil.transpose(Image.Transpose.FLIP_LEFT_RIGHT)  # identical to _pil_affine(hflip_matrix), exact
        ops.append(GeoOp("Hflip", 1.0, hflip_matrix(w)))
    if r.random() < cfg.blur_p:
        pil = pil.filter(ImageFilter.GaussianBlur(radius=cfg.blur_radius))
    if r.random() < cfg.jitter_p:
        pil = _color_jitter(pil, cfg.jitter, r)
    # Draw the whole pool sequence first (same RNG order as drawing and applying op by op), then apply it.
    plan: list[tuple[str, int, GeoOp | None]] = []
    for name in r.choices(list(cfg.pool), k=cfg.n_ops):
        v = r.randint(1, cfg.max_v)
        if r.random() < cfg.op_p:
            if name in GEOMETRIC_OPS:
                plan.append((name, v, _draw_geo_op(name, v, h, w, r)))
            elif name in ALL_OPS:
                plan.append((name, v, None))
            else:
                raise ValueError(f"unknown strong op {name!r}; known: {', '.join(ALL_OPS)}")
    pool_geo = [op for _, _, op in plan if op is not None]
    warped = False
    for name, v, op in plan:
        if op is None:
            pil = _apply_colour_op(name, v, pil)
        elif not warped:  # the first geometric op: all of them, composed, in one resampling
            pil = _apply_geometry(pil, [g.matrix for g in pool_geo])
            warped = True
    ops.extend(pool_geo)
    box = None
    if cfg.cutout:
        box = cutout_box(h, w, min(w, h) // cfg.cutout_div, r)
        arr = np.array(pil)
        x0, y0, x1, y1 = box
        arr[y0:y1, x0:x1] = FILL_GREY
        pil = Image.fromarray(arr, "RGB")
    return _like_input(pil, img), StrongParams((h, w), tuple(ops), box)


def apply_strong_geometry(img: ImageLike, params: StrongParams, cutout: bool = True) -> ImageLike:
    """Replay only the recorded geometric ops (and cutout) on another image of the same size, the way
    ``strong_augment`` resamples: a leading flip exactly, then one bilinear warp (grey fill) of the composition of
    the remaining ops. Useful for tests and visualisation."""
    pil = _to_pil(img)
    if (pil.height, pil.width) != tuple(params.size_hw):
        raise ValueError(f"image is {pil.height}x{pil.width}, params expect {params.size_hw}")
    pil = _apply_geometry(pil, params.matrices)
    if cutout and params.cutout is not None:
        arr = np.array(pil)
        x0, y0, x1, y1 = params.cutout
        arr[y0:y1, x0:x1] = FILL_GREY
        pil = Image.fromarray(arr, "RGB")
    return _like_input(pil, img)


def _strong_grid(p: StrongParams, h: int, w: int, cutout: bool) -> tuple[np.ndarray, np.ndarray]:
    """Normalised sampling grid (h, w, 2) for a map of size (h, w) and its validity (h, w).

    Output map pixel centres are taken to crop pixels and pulled back through the inverse of the composed
    matrix (``compose``), the single warp ``strong_augment`` gives the image. A pixel is valid if that pre-image
    lies inside the image (where PIL samples the image rather than filling grey; a point pushed out by one op
    and back in by another is therefore valid, as it shows content in the image) and it is outside the cutout
    box.
    """
    H, W = p.size_hw
    xs = (np.arange(w, dtype=np.float64) + 0.5) * (W / w)
    ys = (np.arange(h, dtype=np.float64) + 0.5) * (H / h)
    X, Y = np.meshgrid(xs, ys)
    valid = np.ones((h, w), bool)
    if cutout and p.cutout is not None:
        x0, y0, x1, y1 = p.cutout
        valid &= ~((X >= x0) & (X < x1) & (Y >= y0) & (Y < y1))
    if p.ops:
        inv = np.linalg.inv(compose(p))
        X, Y = inv[0, 0] * X + inv[0, 1] * Y + inv[0, 2], inv[1, 0] * X + inv[1, 1] * Y + inv[1, 2]
        valid &= (X >= 0) & (X < W) & (Y >= 0) & (Y < H)
    grid = np.stack([2.0 * X / W - 1.0, 2.0 * Y / H - 1.0], axis=-1)
    return grid, valid


def warp_maps_batch(
    maps: torch.Tensor,
    params: Sequence[StrongParams],
    *,
    mode: str | None = None,
    fill: float | None = None,
    cutout: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replay each sample's strong geometry on a batch of maps of the crop, at the maps' own resolution.

    ``maps``: (B, C, h, w) float (probabilities, features, logits; bilinear by default) or (B, h, w) integer
    labels. Any (h, w) works: the matrices are scaled to it (x by w/W, y by h/H). All ops are composed into one
    sampling grid, exactly as ``strong_augment`` resamples the image once with the composed matrix; a pixel is
    valid if its composed pre-image lies inside the image.

    Label modes (integer maps): ``"onehot"`` (default) = the argmax of a bilinear warp of the one-hot labels,
    i.e. each output pixel takes the class with the largest bilinear weight, which is what thresholding the
    bilinear image warp shows: on 2-3 px stripes and poles it agrees with the warped image at IoU >= 0.98 for
    every op (``nearest`` reaches only about 0.88-0.95 on thin diagonals). ``"nearest"`` stays available (what
    the reference's ``label_strong_T`` does); ``"bilinear"`` on labels is meaningless. Cost of ``onehot``
    (implemented from the 4 bilinear taps, so it does not depend on the number of classes; measured on a busy
    2-core CPU, one torch thread, uint8 labels with 19 classes + 255, 2-3 geometric ops, whole call including
    the grid): B=8 x 128x224: 40-70 ms (nearest 15-25 ms), peak RSS growth 14-22 MiB (nearest 4-9 MiB);
    B=4 x 512x896: 0.4-0.6 s (nearest 0.11-0.17 s), peak RSS growth 160-180 MiB (nearest 100-120 MiB). The
    literal form (one-hot tensor of the 20 values, ``grid_sample``, argmax), which gives identical labels, took
    0.29 s / 58 MiB and 3.1 s / 550 MiB. On a GPU the cost is a few elementwise kernels over (4, B, h, w).

    Returns ``(warped, valid)``: ``warped`` has the input's shape and dtype, with ``fill`` where not valid
    (default: 255 = IGNORE_INDEX for integer labels, 0 for floats); ``valid`` is a (B, h, w) bool tensor that is
    False outside the image and in the cutout box. Differentiable w.r.t. float maps; works on any device (the
    grid is built on the CPU in float64 and moved to ``maps.device``). Sampling uses ``align_corners=False``:
    pixel centres at (j+0.5)/w, the same corner-origin convention PIL uses for the image.
    """
    if len(params) != maps.shape[0]:
        raise ValueError(f"{maps.shape[0]} maps but {len(params)} params")
    h, w = maps.shape[-2:]
    gs, vs = zip(*(_strong_grid(p, h, w, cutout) for p in params))
    valid = np.stack(vs)
    out = _resample(maps, np.stack(gs), valid, mode, fill, align_corners=False, int_mode="onehot")
    return out, host_to_device(torch.from_numpy(valid), maps.device)


def warp_map(
    map_: MapLike,
    params: StrongParams,
    *,
    mode: str | None = None,
    fill: float | None = None,
    cutout: bool = True,
) -> tuple[MapLike, MapLike]:
    """One-sample ``warp_maps_batch``: (C, h, w) float or (h, w) label, numpy or torch; returns
    ``(warped, valid)`` of the same kind. Labels: ``onehot`` by default (or ``mode="nearest"``), outside/cutout
    -> 255. Floats: bilinear, outside/cutout -> ``fill`` (0) and ``valid`` False."""
    is_np = isinstance(map_, np.ndarray)
    t = torch.from_numpy(np.ascontiguousarray(map_)) if is_np else map_
    out, valid = warp_maps_batch(t[None], [params], mode=mode, fill=fill, cutout=cutout)
    out, valid = out[0], valid[0]
    return (out.numpy(), valid.numpy()) if is_np else (out, valid)


def random_colors(img_uint8: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Redraw the colours of an (H, W, 3) uint8 image; geometry unchanged, so its label stays valid.

    In this order, each drawn from ``rng``: a random permutation of the channels; inversion (``1 - x``) with
    probability 0.5; per channel ``x * gain + offset`` with gain ~ U(0.4, 1.6) and offset ~ U(-0.3, 0.3) (x in
    [0, 1]), clipped; ``x ** gamma`` with gamma ~ U(0.5, 2); greyscale (channel mean) with probability 0.2;
    a Gaussian blur with sigma ~ U(0.3, 1.2) with probability 0.5; Gaussian noise of std ~ U(0, 0.05). Returns a
    new uint8 image (rounded).
    """
    if img_uint8.dtype != np.uint8 or img_uint8.ndim != 3 or img_uint8.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {img_uint8.dtype} {img_uint8.shape}")
    x = img_uint8.astype(np.float32) / 255.0
    x = x[..., rng.permutation(3)]
    if rng.random() < 0.5:
        x = 1.0 - x
    x = x * rng.uniform(0.4, 1.6, 3) + rng.uniform(-0.3, 0.3, 3)
    x = np.clip(x, 0, 1) ** rng.uniform(0.5, 2.0)
    if rng.random() < 0.2:
        x[:] = x.mean(-1, keepdims=True)
    if rng.random() < 0.5:
        x = cv2.GaussianBlur(x, (0, 0), rng.uniform(0.3, 1.2))
    x = x + rng.normal(0, rng.uniform(0, 0.05), x.shape).astype(np.float32)
    return (np.clip(x, 0, 1) * 255).round().astype(np.uint8)
