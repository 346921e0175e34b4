"""Shared pieces of the dataset readers: sample records, strict image/label decoding, atomic PNG writing.

Every decode failure (missing file, empty file, non-image bytes, truncated PNG/JPEG, wrong channel layout)
becomes one ``DataError`` whose message starts with the file path, so that ``prepare`` can report it per file
or skip the image. Decoders are strict on purpose: ``cv2.imread`` returns ``None`` silently and PIL decodes
lazily, so a PNG that was cut short during a copy could otherwise slip through as a half-grey image.
"""

from __future__ import annotations

import io
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
from PIL import Image

from cpsl.errors import DataError
from cpsl.provenance import fix_temp_mode, temp_prefix

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class Sample:
    """One image/label pair. ``name`` is a stable id (``aachen/aachen_000000_000019``, ``00001``). ``label`` is
    None in an unlabelled split (``dataset.labels: false``)."""

    name: str
    image: Path
    label: Path | None


@dataclass(frozen=True)
class Problem:
    """A file that cannot be used, and why (one short phrase). ``unpaired_image``: the sample ``name`` has an image
    but no label (usable in an unlabelled split)."""

    file: Path
    reason: str
    name: str = ""
    unpaired_image: bool = False

    def to_dict(self) -> dict[str, str]:
        return {"file": str(self.file), "reason": self.reason}


def _read_bytes(path: Path) -> bytes:
    """The file's bytes; missing or empty files raise DataError."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror or err})") from None
    if not data:
        raise DataError(f"{path}: empty file")
    return data


def _check_png_complete(data: bytes, path: Path) -> bool:
    """True if ``data`` is a PNG; raise DataError if it is a PNG without its closing IEND chunk (truncated)."""
    if not data.startswith(_PNG_SIGNATURE):
        return False
    if data.rfind(b"IEND", max(0, len(data) - 4096)) < 0:
        raise DataError(f"{path}: truncated PNG (no IEND chunk; the file was cut short)")
    return True


def _is_gray8_png(data: bytes) -> bool:
    """Whether PNG bytes hold an 8-bit grayscale image (IHDR bit depth 8, colour type 0)."""
    return data[12:16] == b"IHDR" and data[24] == 8 and data[25] == 0


def _pil_open(data: bytes, path: Path) -> Image.Image:
    """Open and fully decode with PIL (``load`` forces decoding, so truncation raises here)."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as err:  # PIL raises many types (OSError, SyntaxError, ValueError, DecompressionBomb...)
        raise DataError(f"{path}: not a readable image ({_short(err)})") from None
    return img


def _short(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def scale_16bit(arr: np.ndarray, bits: int = 16) -> np.ndarray:
    """The one rule for 16-bit samples (``dataset.image_bits``): ``value * 255 / (2**bits - 1)``, rounded and
    clipped to uint8. 16 keeps the full range; a 12-bit camera or microscope (values up to 4095) needs 12, or its
    images come out near-black."""
    scale = np.float32(255.0 / ((1 << bits) - 1))
    return np.clip(np.rint(arr.astype(np.float32) * scale), 0, 255).astype(np.uint8)


def decode_image(path: Path, bits: int = 16) -> tuple[np.ndarray, int | None]:
    """Decode an image file to uint8 (H, W, 3) RGB, and the largest raw sample value of a 16-bit PNG (None for
    8-bit images). PNGs go through OpenCV (fast), other formats through PIL; 16-bit PNGs are scaled by
    ``scale_16bit(bits)``."""
    path = Path(path)
    data = _read_bytes(path)
    if _check_png_complete(data, path):
        arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        if arr is None:
            raise DataError(f"{path}: not a readable PNG image")
        peak = None
        if arr.dtype == np.uint16:
            peak = int(arr.max(initial=0))
            arr = scale_16bit(arr, bits)
        elif arr.dtype != np.uint8:
            raise DataError(f"{path}: unsupported PNG sample type {arr.dtype}")
        if arr.ndim == 2:
            return cv2.cvtColor(arr, cv2.COLOR_GRAY2RGB), peak
        if arr.shape[2] == 4:
            return cv2.cvtColor(arr, cv2.COLOR_BGRA2RGB), peak
        if arr.shape[2] == 3:
            return cv2.cvtColor(arr, cv2.COLOR_BGR2RGB), peak
        raise DataError(f"{path}: PNG with {arr.shape[2]} channels is not an RGB image")
    img = _pil_open(data, path)
    try:
        return np.asarray(img.convert("RGB"), dtype=np.uint8).copy(), None
    except Exception as err:
        raise DataError(f"{path}: cannot convert {img.mode} image to RGB ({_short(err)})") from None


def read_image(path: Path, bits: int = 16) -> np.ndarray:
    """Decode an image file to uint8 (H, W, 3) RGB (``decode_image``)."""
    return decode_image(path, bits)[0]


def read_index_png(path: Path) -> np.ndarray:
    """Read an 8-bit id map: a grayscale ("L") PNG, or the palette *indices* of a palettised ("P") PNG.

    Cityscapes ``*_labelIds.png`` are grayscale; GTA5 label PNGs are palettised, and their indices (not the RGB
    colours) are Cityscapes labelIds. 16-bit grayscale is accepted too (values are checked later against the
    format's known ids). RGB label images are refused: their colours are not ids.
    """
    path = Path(path)
    data = _read_bytes(path)
    if _check_png_complete(data, path) and _is_gray8_png(data):
        # 8-bit grayscale (Cityscapes labelIds, our prepared train ids): OpenCV decodes the same values as PIL,
        # in about half the time. Palettised PNGs go to PIL, which keeps the indices.
        arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        if arr is not None and arr.dtype == np.uint8 and arr.ndim == 2:
            return arr
    img = _pil_open(data, path)
    if img.mode in ("L", "P"):
        return np.array(img, dtype=np.uint8)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.array(img)
        if arr.min(initial=0) < 0:
            raise DataError(f"{path}: negative label ids")
        return arr.astype(np.uint16) if arr.max(initial=0) < 65536 else arr.astype(np.int64)
    raise DataError(f"{path}: label image has mode {img.mode}; expected single-channel or palettised ids")


def read_png_unchanged(path: Path) -> np.ndarray:
    """Read a PNG with all its channels and bit depth (OpenCV channel order: BGR / BGRA)."""
    path = Path(path)
    data = _read_bytes(path)
    if not _check_png_complete(data, path):
        raise DataError(f"{path}: not a PNG file")
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise DataError(f"{path}: not a readable PNG image")
    return arr


def read_train_id_png(path: Path) -> np.ndarray:
    """Read a prepared train-id PNG (uint8, single channel)."""
    arr = read_index_png(path)
    if arr.dtype != np.uint8:
        raise DataError(f"{Path(path)}: train-id PNG must be 8-bit")
    return arr


def write_label_png(path: Path, arr: np.ndarray) -> None:
    """Write a uint8 (H, W) array as a single-channel PNG, atomically (temp file in the same folder, then
    ``os.replace``), so a crash never leaves a half-written label under its final name. Output bytes depend only
    on ``arr`` (deterministic), which keeps prepared datasets byte-identical across runs."""
    path = Path(path)
    arr = np.ascontiguousarray(arr)
    if arr.dtype != np.uint8 or arr.ndim != 2:
        raise ValueError(f"{path}: label to write must be uint8 (H, W), got {arr.dtype} {arr.shape}")
    ok, buf = cv2.imencode(".png", arr, [cv2.IMWRITE_PNG_COMPRESSION, 3])
    if not ok:
        raise DataError(f"{path}: PNG encoding failed")
    write_bytes_atomic(path, buf.tobytes())


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), suffix=".tmp", dir=path.parent)
    fix_temp_mode(fd)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def pair_by_name(
    images: dict[str, Path], labels: dict[str, Path], expected_label: Callable[[str], Path]
) -> tuple[list[Sample], list[Problem]]:
    """Pair images and labels that share a name; the rest become Problems. Output sorted by name.

    ``expected_label(name)`` is the label path an image should have; it is named in the problem reason.
    """
    samples: list[Sample] = []
    problems: list[Problem] = []
    for name in sorted(set(images) | set(labels)):
        img, lab = images.get(name), labels.get(name)
        if img is not None and lab is not None:
            samples.append(Sample(name, img, lab))
        elif img is not None:
            problems.append(Problem(img, f"image without label (no {expected_label(name)})", name, True))
        else:
            problems.append(Problem(lab, "label without image"))
    return samples, problems


def images_only(samples: list[Sample], problems: list[Problem]) -> tuple[list[Sample], list[Problem]]:
    """A format's ``scan`` result as an unlabelled split: every image is a sample (label None), with or without a
    label file; a label without its image is no problem; other problems stay. Sorted by name."""
    found = [Sample(s.name, s.image, None) for s in samples]
    found += [Sample(p.name, p.file, None) for p in problems if p.unpaired_image]
    rest = [p for p in problems if not p.unpaired_image and p.reason != "label without image"]
    return sorted(found, key=lambda s: s.name), rest


def require_dir(path: Path, what: str) -> Path:
    """``path`` if it is a folder, else DataError naming it and what it should hold."""
    if not path.is_dir():
        raise DataError(f"{path}: folder not found ({what}; check dataset.root and dataset.split)")
    return path
