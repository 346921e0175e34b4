"""The command line: subcommands, one-line errors, exit status, recorded provenance."""

import json
import subprocess
import sys

import yaml

from cpsl import cli
from cpsl import config as C


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "cpsl", *args], capture_output=True, text=True, cwd=cwd)


def test_help_lists_the_steps():
    res = run_cli("--help")
    assert res.returncode == 0
    for step in ("synth", "prepare", "import-checkpoint"):
        assert step in res.stdout


def test_bad_config_is_one_line_naming_the_key(tmp_path):
    cfg = tmp_path / "prepare.yaml"
    cfg.write_text(yaml.safe_dump({"dataset": {"format": "gta5", "root": str(tmp_path), "n_clas": 19}}))
    out = tmp_path / "out"
    res = run_cli("prepare", "--config", str(cfg), "--out", str(out))
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        f"cpsl prepare: error: {cfg}: dataset.n_clas: unknown setting (did you mean 'n_class'?)"]
    assert not out.exists()


def test_missing_config_file(tmp_path):
    res = run_cli("synth", "--config", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "o"))
    assert res.returncode == 2
    assert res.stderr.strip() == f"cpsl synth: error: {tmp_path / 'nope.yaml'}: config file not found"


def test_success_records_config_and_run_info(tmp_path, monkeypatch):
    import torch  # noqa: F401  (imported before the step runs, as by every step that runs a network)
    import torchvision  # noqa: F401

    calls = []
    step = cli.Step("fake", "test step", "SynthConfig", "tests.test_cli:_fake_step")
    monkeypatch.setattr(cli, "_fake_calls", calls, raising=False)
    cfg = tmp_path / "synth.yaml"
    cfg.write_text("seed: 3\nheight: 64\n")
    out = tmp_path / "out"
    cli.run_step(step, cfg, out)
    assert calls and calls[0][0].seed == 3 and calls[0][1] == out
    recorded = yaml.safe_load((out / "config.yaml").read_text())
    assert recorded["seed"] == 3 and recorded["height"] == 64 and recorded["width"] == 256
    info = json.loads((out / "run_info.json").read_text())
    assert info["step"] == "fake" and info["seed"] == 3 and info["cpsl_version"] == "0.1.0"
    assert info["git_commit"]
    assert "device" not in info  # synth runs no network
    # the software that ran: torch's own __version__ names its build ("+cu130", "+cpu"); imported above
    assert info["torch"] == torch.__version__ and info["torchvision"] == torchvision.__version__
    # a package the step did not import is read from its installed distribution, without importing it
    from importlib.metadata import version

    from cpsl import provenance

    assert "snakefmt" not in sys.modules and provenance._installed_version("snakefmt") == version("snakefmt")
    assert "snakefmt" not in sys.modules
    assert provenance._installed_version("no-such-distribution") is None


def test_run_info_records_the_device_and_what_gpu_auto_resolved_to(tmp_path, monkeypatch):
    from cpsl import provenance

    monkeypatch.delenv("CPSL_GPU_AUTO", raising=False)
    assert "gpu_auto" not in provenance.run_info("train", 0, device="cpu")
    monkeypatch.setenv("CPSL_GPU_AUTO", "0")
    monkeypatch.setenv("CPSL_GPU_AUTO_REASON", "no NVIDIA driver")
    info = provenance.run_info("evaluate", None, device="cpu")
    assert info["device"] == "cpu" and info["gpu_auto"] == {"resolved": 0, "reason": "no NVIDIA driver"}
    # a step with a device setting records the device it resolves to (no GPU on the test machine)
    monkeypatch.delenv("CPSL_DEVICE", raising=False)
    assert cli._device_used(C.EvaluateConfig(checkpoint=tmp_path / "c.pt", data=tmp_path)) == "cpu"
    monkeypatch.setenv("CPSL_DEVICE", "cuda")  # a GPU job where CUDA is not usable: the step fails, nothing to record
    assert cli._device_used(C.EvaluateConfig(checkpoint=tmp_path / "c.pt", data=tmp_path)) is None
    assert cli._device_used(C.SynthConfig()) is None


def _fake_step(cfg, out):
    out.mkdir(parents=True)
    cli._fake_calls.append((cfg, out))
