"""The GPU-readiness benchmarks run here without a GPU: ``benchmarks/gpu_step.py`` at its reduced CPU size, and
the memory tracker of ``benchmarks/memory.py`` against hand-computed sizes and the CPU allocator's own events;
``benchmarks/demo_variants.py``'s config override; ``benchmarks/model_cost.py``'s FLOP count;
``benchmarks/demo_wall.py`` with a stand-in snakemake on a generated repository."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import demo_variants  # noqa: E402
import demo_wall  # noqa: E402
import gpu_step  # noqa: E402
import memory  # noqa: E402
import model_cost  # noqa: E402

from tests.train_helpers import one_thread  # noqa: E402,F401

pytestmark = pytest.mark.usefixtures("one_thread")


def test_live_memory_counts_storages_until_freed():
    for mode in (None, FakeTensorMode()):
        with (mode or torch.no_grad()), memory.LiveMemory(inputs=False) as tracker:
            a = torch.ones(1000)                    # 4000 bytes
            b = a * 2                               # 4000
            view = b[10:20]                         # a view: no new storage
            del b
            assert tracker.current == 8000          # the view keeps b's storage alive
            del view
            assert tracker.current == 4000
            c = torch.ones(500, dtype=torch.bfloat16)    # 1000
            assert tracker.current == 5000
            del a, c
        assert (tracker.current, tracker.peak) == (0, 8000), mode


def test_live_memory_agrees_with_the_cpu_allocator():
    """A small network's first forward and backward pass: the tracker's peak is the allocator's (whose events
    ``memory.profiler_peak`` reads). Matrix products and elementwise ops: no kernel-internal workspace."""

    def iteration():
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 10))
        x = torch.randn(64, 256)
        return lambda: net(x).square().sum().backward()

    allocator = memory.profiler_peak(iteration())
    step = iteration()
    with memory.LiveMemory(inputs=False) as tracker:
        step()
    assert allocator > 500_000
    assert tracker.peak == pytest.approx(allocator, rel=0.001)


def test_memory_validation_of_a_stage_under_fake_tensors():
    """``memory.validate``: a real training iteration, the tracker on it and on its fake twin agree."""
    got = memory.validate("source_only", "off")
    real, fake = got["LiveMemory, real tensors"], got["LiveMemory, FakeTensorMode"]
    assert fake == pytest.approx(real, rel=0.005)
    assert real == pytest.approx(got["allocator (torch.profiler)"], rel=0.05)


def test_memory_table_picks_the_smallest_accumulate_that_fits():
    gib = memory.GIB
    rows = [{"stage": "s", "amp": "off", "batch": b, "peak": p * gib, "state": gib}
            for b, p in ((4, 30), (2, 16), (1, 8))]
    text = memory.table(rows)
    # fits: peak + 1 GiB <= 90 % of the capacity: 24 GB -> 16 + 1 <= 21.6 (batch 2, accumulate 2); 40 and 80 GB:
    # 30 + 1 <= 36 (batch 4)
    assert text.splitlines()[2] == "| s | off | 1.00 | 30.00 | 16.00 | 8.00 | 2 | 1 | 1 |"
    rows[2]["peak"] = 25 * gib
    rows[1]["peak"] = 25 * gib
    assert memory.table(rows).splitlines()[2].endswith("| no | 1 | 1 |")


def test_gpu_step_runs_at_the_reduced_size(capsys):
    rows = gpu_step.main(["--small", "--stages", "stage1", "stage2", "--amp", "bf16", "off", "--channels-last",
                          "on", "--compile", "off", "--iters", "1", "--warmup", "0"])
    out = capsys.readouterr().out
    assert [(r["stage"], r["amp"]) for r in rows] == [("stage1", "bf16"), ("stage2", "bf16"), ("stage1", "off"),
                                                      ("stage2", "off")]
    for r in rows:
        assert r["finite"] and r["s_iter"] > 0 and r["peak"] is None
        assert r["samples_s"] == pytest.approx(2 / r["s_iter"])
    lines = out.splitlines()
    assert lines[0] == "| stage | amp | channels_last | compile | s/iter | samples/s | peak CUDA memory GiB |"
    assert lines[2].startswith("| stage1 | bf16 | on | off | ") and lines[2].endswith(" | n/a |")
    assert len(lines) == 6


def test_gpu_step_order_and_time_limit(capsys):
    order = gpu_step.configurations(["source_only", "stage1"], ["bf16", "off"], [True, False], [False, True])
    assert order[:2] == [("source_only", "bf16", True, False), ("stage1", "bf16", True, False)]
    assert all(c[0] == "stage1" for c in order[2:9]) and len(order) == 16
    rows = gpu_step.main(["--small", "--stages", "stage1", "--amp", "bf16", "--channels-last", "on",
                          "--compile", "off", "--time-limit", "0"])
    assert [r.get("error") for r in rows] == ["not run (time limit)"]
    assert "| stage1 | bf16 | on | off | not run (time limit) |  |  |" in capsys.readouterr().out


def test_demo_variants_sets_a_nested_setting_on_a_copy():
    import functools

    from cpsl.config import TrainConfig, load

    cfg = load(TrainConfig, {"stage": "source_only", "max_iters": 3, "data": {"source": "s", "target": "t"},
                             "model": {"backbone": "resnet18", "base_width": 8}})
    cut = demo_variants.with_setting(cfg, "selflabel.queue_length", 1024)
    cut = demo_variants.with_setting(cut, "data.crop", [80, 160])
    assert cut.selflabel.queue_length == 1024 and list(cut.data.crop) == [80, 160]
    assert cut.selflabel.tau == cfg.selflabel.tau and cut.data.source == cfg.data.source
    assert cfg.selflabel.queue_length == 65536 and list(cfg.data.crop) != [80, 160]
    with pytest.raises(TypeError, match="no_such_key"):
        demo_variants.with_setting(cfg, "selflabel.no_such_key", 1)
    for _stage, _name, settings in demo_variants.VARIANTS:   # every row names settings the config has
        for key in settings:
            functools.reduce(getattr, key.split("."), cfg)


def test_model_cost_counts_the_stem_and_the_whole_pass_by_hand():
    """One forward and backward pass at 2 x 3 x 32 x 64: the stem (7x7, 3 -> 8 channels, stride 2, 16 x 32 out)
    costs 2 FLOPs per multiply-add x (2 x 16 x 32 x 8 x 3 x 49) multiply-adds, twice: its forward and its weight
    gradient (the image needs no gradient). The modules make up the total, and a narrower ASPP head (layer5)
    costs less there and nothing elsewhere."""
    model = model_cost.build()
    x = torch.randn(2, 3, 32, 64)
    row = model_cost.flops(model, x)
    stem = 2 * 2 * (2 * 16 * 32 * 8 * 3 * 49)
    assert row["gflop_by_module"]["conv1"] * 1e9 == pytest.approx(stem, rel=1e-9)
    modules = sum(row["gflop_by_module"].values())
    assert modules <= row["gflop"] <= 1.01 * modules     # the rest: a few backward ops counted outside the modules
    assert set(row["gflop_by_module"]) == {"conv1", "layer1", "layer2", "layer3", "layer4", "layer5"}
    narrower = model_cost.flops(model_cost.build(head_channels=16), x)
    for module in ("conv1", "layer1", "layer2", "layer3", "layer4"):
        assert narrower["gflop_by_module"][module] == row["gflop_by_module"][module]
    assert narrower["gflop_by_module"]["layer5"] < row["gflop_by_module"]["layer5"]


FAKE_SNAKEMAKE = """#!{python}
# stands in for `snakemake --cores N` in a clone: writes what the workflow writes that demo_wall.py reads
import json, os, pathlib, subprocess, sys
cores = sys.argv[sys.argv.index("--cores") + 1]
sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
version = pathlib.Path("version.txt").read_text().strip()
res = pathlib.Path("results")
(res / "demo/benchmarks/seed0").mkdir(parents=True)
(res / "demo/benchmarks/seed0/train_stage1.tsv").write_text("s\\th:m:s\\tmax_rss\\n" + version + "\\t0:00:01\\t5.0\\n")
(res / "demo/benchmarks/seed0/evaluate_stage1.tsv").write_text("s\\th:m:s\\n3.5\\t0:00:03\\n")
(res / "benchmarks").mkdir()
(res / "benchmarks/collect.tsv").write_text("s\\th:m:s\\n2.0\\t0:00:02\\n")
(res / "demo/seed0/stage1").mkdir(parents=True)
(res / "demo/seed0/stage1/run_info.json").write_text(json.dumps({{"git_commit": sha, "cores": cores}}))
if os.environ.get("FAKE_FOREIGN_COMMIT"):
    (res / "demo/seed0/run_info.json").write_text(json.dumps({{"git_commit": os.environ["FAKE_FOREIGN_COMMIT"]}}))
(res / "summary.csv").write_text(
    "experiment,seed,stage,selection,miou,road,split\\n"
    "demo,0,stage1,last,19.0749,91.1,target_val\\n"
    "demo,0,stage1,best,25.0,91.1,target_val\\n"
    "demo,1,stage1,last,18.8,90.0,target_val\\n"
    "demo,0,source_only,last,14.3,86.3,source_val\\n")
sys.exit(0 if version != "3" else 3)
"""


def _git(repo: Path, *args: str) -> str:
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t",
           "PATH": "/usr/bin:/bin", "HOME": str(repo)}
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True,
                          env=env).stdout.strip()


def test_demo_wall_runs_each_commit_in_its_own_clone_and_reads_its_results(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    shas = []
    for version in ("1", "2", "3"):
        (repo / "version.txt").write_text(version + "\n")
        _git(repo, "add", "version.txt")
        _git(repo, "commit", "-q", "-m", "v" + version)
        shas.append(_git(repo, "rev-parse", "HEAD"))
    fake = tmp_path / "fake_snakemake"
    fake.write_text(FAKE_SNAKEMAKE.format(python=sys.executable))
    fake.chmod(0o755)
    out = tmp_path / "rows.json"
    work = tmp_path / "work"

    rc = demo_wall.main([shas[1][:8], "HEAD~2", shas[1], "--work", str(work), "--snakemake", str(fake),
                         "--repo", str(repo), "--cores", "3", "--out", str(out)])
    assert rc == 0
    rows = json.loads(out.read_text())
    assert [r["sha"] for r in rows] == [shas[1], shas[0], shas[1]]
    assert [r["commit"] for r in rows] == [shas[1][:8], "HEAD~2", shas[1]]
    assert sorted(p.name for p in work.iterdir()) == ["0-" + shas[1][:7], "1-" + shas[0][:7], "2-" + shas[1][:7]]
    # each clone is at its commit, the command's output kept in the clone
    assert (work / f"1-{shas[0][:7]}" / "version.txt").read_text() == "1\n"
    assert (work / f"1-{shas[0][:7]}" / "demo_wall.log").is_file()
    # training jobs only, their first column; seed 0's target-val last-checkpoint mIoU, rounded to 2 decimals
    assert [r["jobs_s"] for r in rows] == [{"demo/benchmarks/seed0/train_stage1.tsv": 2.0},
                                           {"demo/benchmarks/seed0/train_stage1.tsv": 1.0},
                                           {"demo/benchmarks/seed0/train_stage1.tsv": 2.0}]
    assert rows[0]["seed0_target_val"] == {"stage1": 19.07}
    assert all(r["rc"] == 0 and r["commit_recorded"] is True and r["wall_s"] >= 0 for r in rows)
    run_info = json.loads((work / f"1-{shas[0][:7]}" / "results/demo/seed0/stage1/run_info.json").read_text())
    assert run_info["cores"] == "3"

    # a failing run is reported in its row and in the exit status
    rc = demo_wall.main(["HEAD", "--work", str(tmp_path / "w2"), "--snakemake", str(fake), "--repo", str(repo)])
    assert rc == 1
    # a clone folder that exists is not touched, an unknown commit is named
    clone = next((tmp_path / "w2").iterdir())
    (clone / "mine.txt").write_text("user's file")
    before = {p: p.read_bytes() for p in clone.rglob("*") if p.is_file()}
    with pytest.raises(SystemExit, match=r"w2/0-\w{7} exists; give an empty --work folder"):
        demo_wall.main(["HEAD", "--work", str(tmp_path / "w2"), "--snakemake", str(fake), "--repo", str(repo)])
    assert {p: p.read_bytes() for p in clone.rglob("*") if p.is_file()} == before
    with pytest.raises(SystemExit, match=r"'nosuch' is not a commit of .*repo"):
        demo_wall.main(["nosuch", "--work", str(tmp_path / "w3"), "--repo", str(repo)])

    # a run whose steps recorded another commit beside the one given is flagged
    monkeypatch.setenv("FAKE_FOREIGN_COMMIT", shas[0])
    assert demo_wall.main(["HEAD~1", "--work", str(tmp_path / "w4"), "--snakemake", str(fake), "--repo", str(repo),
                           "--out", str(out)]) == 0
    assert [r["commit_recorded"] for r in json.loads(out.read_text())] == [False]
