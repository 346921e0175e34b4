"""`model.init: imagenet`: torchvision's file fetched once by the workflow with torch's download code, checked
against the hash in its name (#21 item 4). Offline: local file:// URLs to generated files."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import torch
import torchvision
import yaml

from cpsl.steps.fetch_weights import IMAGENET_URLS, file_name, hash_prefix
from tests.reliability_helpers import error_line, run_cli, write_yaml
from tests.train_helpers import make_folder_split

REPO = Path(__file__).resolve().parent.parent


def _served(tmp: Path, backbone: str, data: bytes, prefix: str | None = None) -> str:
    """A file named like torchvision's (``<backbone>-<sha256 prefix>.pth``) and its file:// URL."""
    prefix = prefix or hashlib.sha256(data).hexdigest()[:8]
    path = tmp / "mirror" / f"{backbone}-{prefix}.pth"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(data)
    return path.as_uri()


def test_the_reference_file_and_its_hash():
    assert file_name(IMAGENET_URLS["resnet101"]) == "resnet101-5d3b4d8f.pth"
    assert hash_prefix(IMAGENET_URLS["resnet101"]) == "5d3b4d8f"


def test_fetch_downloads_once_and_checks_the_hash(tmp_path):
    data = b"weights" * 1000
    url = _served(tmp_path, "resnet101", data)
    config = write_yaml(tmp_path / "f.yaml", {"backbone": "resnet101", "url": url, "progress": False})
    out = tmp_path / "weights"
    assert run_cli("fetch-weights", config, out)[0] == 0
    cached = out / file_name(url)
    assert cached.read_bytes() == data
    Path(url[len("file://"):]).unlink()  # a second run does not download again
    assert run_cli("fetch-weights", config, out)[0] == 0 and cached.read_bytes() == data


def test_a_corrupt_download_caches_nothing(tmp_path):
    data = b"not the file" * 100
    url = _served(tmp_path, "resnet101", data, prefix="5d3b4d8f")
    config = write_yaml(tmp_path / "f.yaml", {"backbone": "resnet101", "url": url, "progress": False})
    out = tmp_path / "weights"
    rc, err = run_cli("fetch-weights", config, out)
    assert rc == 2
    got = hashlib.sha256(data).hexdigest()[:8]
    assert error_line(err, "fetch-weights") == (f"{url}: the download does not match the hash in its name (sha256 "
                                                f"5d3b4d8f..., got {got}...); nothing was cached")
    assert [p.name for p in out.iterdir()] == [".cpsl-output.json"]  # no file, no partial download


def test_an_unreachable_url_is_one_line(tmp_path):
    url = (tmp_path / "nowhere" / "resnet101-5d3b4d8f.pth").as_uri()
    config = write_yaml(tmp_path / "f.yaml", {"backbone": "resnet101", "url": url, "progress": False})
    rc, err = run_cli("fetch-weights", config, tmp_path / "weights")
    assert rc == 2
    line = error_line(err, "fetch-weights")
    assert line.startswith(f"{url}: cannot download (") and line.endswith(
        "without network access, download it elsewhere and set model.init to its path (nothing was cached)")


def test_the_workflow_fetches_imagenet_weights_for_a_stage(tmp_path):
    """A resnet18 stage with `init: imagenet`: the local rule fetches the (generated) torchvision file from a
    mirror, and training starts from it."""
    torch.manual_seed(0)
    state = torchvision.models.resnet18().state_dict()
    buf = tmp_path / "r18.pth"
    torch.save(state, buf)
    url = _served(tmp_path, "resnet18", buf.read_bytes())
    root = make_folder_split(tmp_path / "data", n=4, hw=(32, 64))
    cfg = {
        "experiments": ["mine"], "results_dir": str(tmp_path / "results"), "imagenet_urls": {"resnet18": url},
        "resources": {"train": {"threads": 1}},
        "experiment_settings": {"mine": {
            "n_class": 4, "model": {"backbone": "resnet18", "init": "imagenet"},
            "datasets": {r: {"format": "folder", "root": str(root), "split": "train", "workers": 0}
                         for r in ("source", "target_train", "target_val")},
            "train": {"data": {"crop": [32, 64], "resize": 64, "batch_size": 2, "workers": 0}},
            "stages": {"source_only": {"max_iters": 1}},
            "inference": {"batch_size": 2, "workers": 0, "progress": False}}},
    }
    (tmp_path / "wd").mkdir()
    target = tmp_path / "results" / "mine" / "seed0" / "source_only" / "checkpoint.pt"
    res = subprocess.run([str(Path(sys.executable).parent / "snakemake"), "-s", str(REPO / "Snakefile"), "-d",
                          str(tmp_path / "wd"), "--configfile", str(REPO / "config.yaml"),
                          str(write_yaml(tmp_path / "c.yaml", cfg)), "--cores", "2", str(target)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    cached = tmp_path / "results" / "weights" / file_name(url)
    assert cached.read_bytes() == buf.read_bytes()
    summary = json.loads((target.parent / "train_summary.json").read_text())
    assert summary["student_init"] == f"imagenet:{cached}"
    resolved = yaml.safe_load((tmp_path / "results/mine/seed0/configs/train_source_only.yaml").read_text())
    assert resolved["model"]["init"] == str(cached)
