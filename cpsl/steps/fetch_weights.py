"""``cpsl fetch-weights``: torchvision's ImageNet weights of a backbone, downloaded once and hash-checked.

``model.init: imagenet`` names this file; the workflow fetches it with a local rule (on the login node, before
any GPU job) into ``<results_dir>/weights/``, and every stage that starts from ImageNet reads it from there.

The download is torch's own (``torch.hub.download_url_to_file``, what torchvision's weight loading uses): into a
temporary file, checked against the SHA-256 prefix in the file's name (``resnet101-5d3b4d8f.pth``: the file the
reference loads through ``model_zoo``), then renamed. A failed or corrupt download caches nothing. Without
network access, download the file elsewhere and set ``model.init`` to its path, as before; a mirror is named
with ``url`` (top-level ``imagenet_urls`` in config.yaml): its file name must carry the same hash.
"""

from __future__ import annotations

import re
from pathlib import Path

from cpsl.config import FetchWeightsConfig
from cpsl.errors import DataError

# torchvision's ImageNet ResNets in the torchvision layout our backbones load (model_zoo names; the hash prefix
# in the name is checked). The reference's DeepLab-v2 loads resnet101-5d3b4d8f.pth.
IMAGENET_URLS = {
    "resnet101": "https://download.pytorch.org/models/resnet101-5d3b4d8f.pth",
    "resnet50": "https://download.pytorch.org/models/resnet50-19c8e357.pth",
    "resnet18": "https://download.pytorch.org/models/resnet18-5c106cde.pth",
}
HASH_IN_NAME = re.compile(r"-([a-f0-9]{6,})\.")


def file_name(url: str) -> str:
    """The cached file's name: the URL's last path component (it carries the hash)."""
    return url.rstrip("/").rsplit("/", 1)[-1]


def hash_prefix(url: str) -> str:
    m = HASH_IN_NAME.search(file_name(url))
    if m is None:
        raise DataError(f"url: {url}: its file name carries no hash (like resnet101-5d3b4d8f.pth), so the download "
                        "cannot be checked")
    return m.group(1)


def url_for(backbone: str, override: str | None = None) -> str:
    return override or IMAGENET_URLS[backbone]


def run(cfg: FetchWeightsConfig, out: Path) -> dict:
    """Download ``cfg.backbone``'s ImageNet weights into ``out`` (kept if already there); returns its path."""
    import torch.hub

    url = url_for(cfg.backbone, cfg.url)
    expected = hash_prefix(url)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dst = out / file_name(url)
    if dst.is_file():
        return {"file": str(dst), "url": url, "downloaded": False}
    try:  # torch writes a temporary file next to dst and renames it only after the hash check passed
        torch.hub.download_url_to_file(url, str(dst), hash_prefix=expected, progress=cfg.progress)
    except RuntimeError as err:
        if "invalid hash value" in str(err):
            got = re.search(r'got "([0-9a-f]+)"', str(err))
            raise DataError(f"{url}: the download does not match the hash in its name (sha256 {expected}..., got "
                            f"{got.group(1)[:len(expected)] if got else 'another'}...); nothing was cached") from None
        raise DataError(f"{url}: download failed ({err}); nothing was cached") from None
    except OSError as err:
        reason = getattr(err, "reason", None) or err.strerror or err
        raise DataError(f"{url}: cannot download ({reason}); without network access, download it elsewhere and "
                        "set model.init to its path (nothing was cached)") from None
    return {"file": str(dst), "url": url, "downloaded": True}
