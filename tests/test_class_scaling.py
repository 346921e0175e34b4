"""#27: class-count-invariant loss scaling by default, the reference's behind train.reference_class_scaling; the
class-share monitor and its collapse warning."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import yaml
import torch
import torch.nn.functional as F

from cpsl.config import TrainConfig, load
from cpsl.errors import ConfigError
from cpsl.methods.distill import kd_reference
from cpsl.methods.losses import REFERENCE_N_CLASS, class_divisor, logit_sinkhorn_epsilon, sinkhorn_iterations
from cpsl.methods.selflabel import consistency_loss
from cpsl.methods.sinkhorn import sinkhorn
from cpsl.methods.shares import ShareMonitor, class_counts, class_map

from .train_helpers import train_dict


def test_reference_switch_keeps_todays_value_and_19_classes_are_unchanged():
    assert REFERENCE_N_CLASS == 19
    assert class_divisor(19, False) == class_divisor(19, True) == 19.0      # the demo and gta5_cityscapes
    assert class_divisor(16, True) == 16.0 and class_divisor(16, False) == 19.0   # synthia_cityscapes: preset
    assert class_divisor(2, True) == 2.0 and class_divisor(2, False) == 19.0
    assert logit_sinkhorn_epsilon(0.05, 19, False) == 0.05                   # bit-identical at 19 classes
    assert logit_sinkhorn_epsilon(0.05, 2, True) == 0.05
    assert logit_sinkhorn_epsilon(0.05, 2, False) == pytest.approx(0.05 * math.sqrt(9.5))   # 0.154110
    assert logit_sinkhorn_epsilon(0.05, 2, False) == pytest.approx(0.154110, abs=1e-6)


def _padded(probs: list[float], k: int) -> torch.Tensor:
    """Logits (1, k, 1, 1) whose softmax is ``probs`` on the first classes and exactly 0 on the others."""
    z = torch.full((k,), -1e4)
    z[:len(probs)] = torch.log(torch.tensor(probs))
    return z.reshape(1, k, 1, 1)


@pytest.mark.parametrize("reference", [False, True])
def test_consistency_gradient_per_pixel_does_not_depend_on_the_class_count(reference):
    # The same pixel in a 2-class and a 19-class problem (the 17 extra classes have probability 0 in both the
    # teacher and the student): the per-pixel KL is the same, and so is the gradient w.r.t. the student's scores
    # (s - t) / divisor, under the default divisor 19; the reference's divisor K makes it 19/2 = 9.5 times larger.
    grads, losses = {}, {}
    for k in (2, 19):
        teacher = F.softmax(_padded([0.9, 0.1], k), dim=1)
        z = _padded([0.6, 0.4], k).requires_grad_(True)
        loss = consistency_loss(teacher, torch.ones(1, 1, 1, dtype=torch.bool), F.log_softmax(z, dim=1),
                                class_divisor(k, reference))
        loss.backward()
        grads[k], losses[k] = z.grad.reshape(-1)[:2], loss.item()
        assert float(z.grad.reshape(-1)[2:].abs().sum()) == 0.0
    kl = 0.9 * math.log(0.9 / 0.6) + 0.1 * math.log(0.1 / 0.4)                  # 0.226289
    assert kl == pytest.approx(0.226289, abs=1e-6)
    assert losses[19] == pytest.approx(kl / 19, rel=1e-5)
    assert losses[2] == pytest.approx(kl / (2 if reference else 19), rel=1e-5)
    assert grads[19] == pytest.approx(torch.tensor([-0.3, 0.3]) / 19, abs=1e-6)   # (s - t) / 19
    if reference:
        assert grads[2] == pytest.approx(torch.tensor([-0.3, 0.3]) / 2, abs=1e-6)
        assert (grads[2] / grads[19]) == pytest.approx(torch.tensor([9.5, 9.5]), rel=1e-5)
    else:
        assert grads[2] == pytest.approx(grads[19], abs=1e-7)                    # independent of K


@pytest.mark.parametrize("reference", [False, True])
def test_reference_kd_gradient_per_pixel_does_not_depend_on_the_class_count(reference):
    grads = {}
    for k in (2, 19):
        z = _padded([0.6, 0.4], k).requires_grad_(True)
        kd_reference(z, _padded([0.9, 0.1], k), class_divisor(k, reference)).backward()
        grads[k] = z.grad.reshape(-1)[:2]
    # d/dz_j of -sum_k t_k p_k = -p_j (t_j - t.p), t.p = 0.9 x 0.6 + 0.1 x 0.4 = 0.58
    by_hand = torch.tensor([-0.6 * (0.9 - 0.58), -0.4 * (0.1 - 0.58)])        # [-0.192, 0.192]
    assert grads[19] == pytest.approx(by_hand / 19, abs=1e-6)
    assert grads[2] == pytest.approx(by_hand / (2 if reference else 19), abs=1e-6)


def test_logit_epsilon_keeps_the_sinkhorn_odds_of_equal_rms_logits():
    # L2-normalised logit rows of entries +-a: K = 2 gives +-0.707, K = 19 gives +-0.229; the odds
    # exp(gap / epsilon) between a class and a competitor are the same at both K under the default
    for reference, same in ((False, True), (True, False)):
        odds = {}
        for k in (2, 19):
            row = F.normalize(torch.tensor([1.0] + [-1.0] * (k - 1), dtype=torch.float64), dim=0)
            odds[k] = float((row[0] - row[1]) / logit_sinkhorn_epsilon(0.05, k, reference))
        assert odds[19] == pytest.approx(2 / math.sqrt(19) / 0.05)                    # 9.1766
        assert (odds[2] == pytest.approx(odds[19], rel=1e-12)) == same
        if not same:
            assert odds[2] == pytest.approx(28.2843, rel=1e-5)                        # 3.08 x sharper


def test_sinkhorn_iterations_scale_with_the_class_count():
    assert sinkhorn_iterations(3, 19, False) == sinkhorn_iterations(3, 19, True) == 3       # the demo: unchanged
    assert [sinkhorn_iterations(3, k, False) for k in (2, 3, 4, 16, 38)] == [29, 19, 15, 4, 2]   # ceil(57 / K)
    assert sinkhorn_iterations(3, 2, True) == sinkhorn_iterations(3, 16, True) == 3         # the presets
    assert sinkhorn_iterations(10, 2, False) == 95


def _class_total_error_left(k: int, iters: int, gap: float = 0.3, eps: float = 0.05, per: int = 60) -> float:
    """Sinkhorn on ``per`` pixels of each of k classes, scored 1 for their class and 1 - gap for every other, with
    a marginal that gives class 0 2 % more than its share 1/k: the fraction of class 0's total error (mean
    assignment - marginal) left after ``iters`` iterations."""
    labels = torch.arange(k).repeat_interleave(per)
    scores = torch.full((k * per, k), 1.0 - gap, dtype=torch.float64)
    scores[torch.arange(k * per), labels] = 1.0
    r = torch.full((k,), 1.0 / k, dtype=torch.float64)
    r[1:] -= 0.02 / k / (k - 1)
    r[0] *= 1.02
    start = sinkhorn(scores, r, eps, 0).mean(0)[0] - r[0]
    return float((sinkhorn(scores, r, eps, iters).mean(0)[0] - r[0]) / start)


def test_sinkhorn_balancing_per_run_does_not_depend_on_the_class_count():
    # The linearised Sinkhorn (losses.sinkhorn_iterations) leaves exp(-2 K a T) of the error, a = exp(-gap / eps)
    # = exp(-6): 19 classes x 3 iterations 0.754, 2 classes x 29 iterations 0.750, 2 x 3 0.971
    a = math.exp(-0.3 / 0.05)
    assert math.exp(-2 * 19 * a * 3) == pytest.approx(0.7538, abs=1e-4)
    assert math.exp(-2 * 2 * a * 29) == pytest.approx(0.7501, abs=1e-4)
    at19 = _class_total_error_left(19, sinkhorn_iterations(3, 19, False))
    at2 = _class_total_error_left(2, sinkhorn_iterations(3, 2, False))
    at2_reference = _class_total_error_left(2, sinkhorn_iterations(3, 2, True))
    at3 = _class_total_error_left(3, sinkhorn_iterations(3, 3, False))
    assert at19 == pytest.approx(0.760, abs=0.005)
    assert at2 == pytest.approx(0.710, abs=0.005) and at3 == pytest.approx(0.746, abs=0.005)   # within 0.05 of 19
    assert at2_reference == pytest.approx(0.971, abs=0.005)       # the reference's 3 iterations barely balance


def test_presets_set_the_reference_switch_and_the_template_does_not():
    cfg = yaml.safe_load((Path(__file__).resolve().parents[1] / "config.yaml").read_text())
    for name in ("gta5_cityscapes", "synthia_cityscapes"):
        assert cfg["experiment_settings"][name]["train"]["reference_class_scaling"] is True
    assert "reference_class_scaling" not in cfg["experiment_settings"]["demo"]["train"]
    fields = TrainConfig.__dataclass_fields__
    assert fields["reference_class_scaling"].default is False
    assert (fields["share_drift"].default, fields["share_drift_logs"].default) == (0.10, 3)
    assert fields["share_drift_ratio"].default == 3.0


# ---------------------------------------------------------------------------------------------------------
# Class shares and the collapse warning


def test_class_counts_by_hand():
    pred = torch.tensor([[[0, 1, 1], [2, 1, 0]]])
    valid = torch.tensor([[[True, True, False], [True, True, True]]])
    assert class_counts(pred, valid, 3).tolist() == [2.0, 2.0, 1.0]


def test_class_map_is_argmax_with_the_first_index_on_ties():
    logits = torch.tensor([[[[0.5, 2.0]], [[1.0, 2.0]], [[1.0, -1.0]]]])  # (1, 3, 1, 2): ties at both pixels
    assert class_map(logits).tolist() == [[[1, 0]]]                        # the first of the tied classes
    rounded = torch.randn(4, 19, 24, 48).mul(4).round()                    # many ties
    assert torch.equal(class_map(rounded), rounded.argmax(1))


def _monitor(drift=0.15, logs=2, marginal=(0.8, 0.2)):
    m = None if marginal is None else torch.tensor(marginal, dtype=torch.float64)
    return ShareMonitor("stage1", 2, m, drift, logs)


def _window(mon, student_ones, teacher_ones, n=20):
    """One log window of one batch of n pixels: the student predicts class 1 on ``student_ones`` of them."""
    s = torch.zeros(1, 1, n, dtype=torch.long)
    s[..., :student_ones] = 1
    t = torch.zeros(1, 1, n, dtype=torch.long)
    t[..., :teacher_ones] = 1
    mon.add(s, t, torch.ones(1, 1, n, dtype=torch.bool))


def test_share_monitor_records_and_progress_text(capsys):
    mon = _monitor()
    _window(mon, 7, 6)          # student 7/20 = 0.35 class 1, teacher 6/20 = 0.30; marginal 0.2
    _window(mon, 5, 6)          # the window: student 12/40 = 0.30, teacher 12/40 = 0.30
    record, text = mon.log(40)
    assert record == pytest.approx({"share/student/0": 0.7, "share/student/1": 0.3, "share/teacher/0": 0.7,
                                    "share/teacher/1": 0.3, "share/marginal/0": 0.8, "share/marginal/1": 0.2})
    assert text == "c0 s.70 t.70 m.80"          # the class farthest from the marginal (ties: the first)
    assert capsys.readouterr().err == ""        # 0.1 from the marginal: within share_drift 0.15
    assert mon.log(60) == ({}, "")              # nothing counted in the window


def test_collapse_warning_once_then_only_if_it_persists(capsys):
    mon = _monitor(drift=0.15, logs=2)
    # class 1: student share 0.40 (0.20 from the marginal's 0.2) at logs 1-3, 0.25 at log 4, 0.45 at logs 5-11
    shares = [8, 8, 8, 5] + [9] * 7
    warned = []
    for i, ones in enumerate(shares, start=1):
        _window(mon, ones, 4)
        mon.log(20 * i)
        err = capsys.readouterr().err
        if err:
            warned.append((20 * i, err))
    # streak of 2 at iteration 40 -> warn; 3 at 60: quiet; back within 0.15 at 80: reset; a new streak from
    # 100: warn at 120 (2 logs), again at 160 (4 logs); the next would be at 8 logs (240), past the end (220)
    assert [it for it, _ in warned] == [40, 120, 160]
    first = warned[0][1]
    assert first.count("\n") == 2 and "warning" in first  # classes 0 and 1 both moved 0.2 (shares sum to 1)
    assert ("cpsl train: stage1: warning: the student predicts class 1 on 40.0% of the target pixels against "
            "20.0% for the class marginal (more than train.share_drift = 0.15 apart) at the last 2 logged "
            "iterations (since iteration 20)") in first
    assert "at the last 4 logged iterations (since iteration 100)" in warned[2][1]


def test_a_dropped_minority_class_warns_by_the_ratio_above_a_floor(capsys):
    """Class 1 holds 12% of the marginal; the student predicts it on 3%: 0.09 apart, within share_drift 0.10,
    but under 12% / 3. A class under share_drift / 2 = 5% of the marginal is left to the absolute test."""
    def run(marginal, ones, ratio, n=100, logs=2):
        mon = ShareMonitor("stage2", 2, torch.tensor(marginal, dtype=torch.float64), 0.10, logs,
                           drift_ratio=ratio)
        for i in range(logs):
            _window(mon, ones, ones, n=n)
            mon.log(10 * (i + 1))
        return capsys.readouterr().err

    err = run((0.88, 0.12), 3, 3.0)
    assert err == ("cpsl train: stage2: warning: the student predicts class 1 on 3.0% of the target pixels against "
                   "12.0% for the class marginal (less than 1/3 of it: train.share_drift_ratio = 3) at the last 2 "
                   "logged iterations (since iteration 10): a collapse toward a fixed class share? (README, own "
                   "pairs)\n")
    assert run((0.88, 0.12), 4, 3.0) == ""       # 4% is a third of 12%: not below it
    assert run((0.88, 0.12), 3, 0.0) == ""       # 0: no ratio test
    assert run((0.96, 0.04), 0, 3.0) == ""       # a 4% class dropped to 0: under the 5% floor, 0.04 apart
    assert run((0.95, 0.05), 1, 3.0) != ""       # 5% is at the floor: 1% is under 5% / 3
    # the large class 0 moves by the same 0.09 and stays far above a third of its share: no line for it
    assert "class 0" not in run((0.88, 0.12), 3, 3.0)


@pytest.mark.parametrize("value, ok", [(0.0, True), (1.5, True), (1.0, False), (0.5, False), (-2.0, False)])
def test_share_drift_ratio_is_validated(tmp_path, value, ok):
    data = train_dict(tmp_path, share_drift_ratio=value)
    if ok:
        assert load(TrainConfig, data).share_drift_ratio == value
    else:
        with pytest.raises(ConfigError, match=r"share_drift_ratio: must be > 1, or 0 for no ratio test"):
            load(TrainConfig, data)


def test_share_monitor_state_survives_a_checkpoint_round_trip(tmp_path, capsys):
    # The same windows as above, once uninterrupted and once "killed" after the 5th log with a window half
    # counted, the monitor rebuilt from a checkpoint (torch.save / torch.load weights_only=True) and resumed.
    shares = [8, 8, 8, 5] + [9] * 7

    def run(mon, windows, start):
        out = []
        for i, ones in enumerate(windows, start=start):
            _window(mon, ones, 4)
            mon.log(20 * i)
            out.append(capsys.readouterr().err)
        return out

    whole = run(_monitor(drift=0.15, logs=2), shares, 1)
    first = _monitor(drift=0.15, logs=2)
    before = run(first, shares[:5], 1)
    _window(first, 5, 2, n=10)                                  # half of the 6th window counted before the kill
    torch.save({"shares": first.state_dict()}, tmp_path / "last.pt")
    state = torch.load(tmp_path / "last.pt", weights_only=True)["shares"]
    assert state["streak"] == [1, 1] and state["since"] == [100, 100] and state["next_warn"] == [2, 2]
    assert state["counts"].tolist() == [[5.0, 5.0], [8.0, 2.0]]    # (student, teacher) x class
    resumed = _monitor(drift=0.15, logs=2)
    resumed.load_state_dict(state)
    _window(resumed, 4, 2, n=10)                                # the rest: 9 / 20 of class 1, as uninterrupted
    resumed.log(120)
    after = [capsys.readouterr().err] + run(resumed, shares[6:], 7)
    assert before + after == whole                              # the same warnings at the same logs
    assert "at the last 2 logged iterations (since iteration 100)" in whole[5]
    with pytest.raises(ValueError, match="for 2 classes, the model has 3"):
        ShareMonitor("stage1", 3, None, 0.1, 3).load_state_dict(state)


def test_without_a_marginal_the_reference_is_the_teachers_share(capsys):
    mon = _monitor(marginal=None, logs=1)
    _window(mon, 10, 4)          # student 0.5, teacher 0.2 on class 1
    record, text = mon.log(20)
    assert "share/marginal/1" not in record and record["share/teacher/1"] == pytest.approx(0.2)
    assert text == "c0 s.50 t.80"
    assert "against 20.0% for the teacher's share" in capsys.readouterr().err


@pytest.mark.parametrize("key, value, msg", [("share_drift", 0.0, "must be in (0, 1]"),
                                             ("share_drift", 1.5, "must be in (0, 1]"),
                                             ("share_drift_logs", 0, "must be >= 1")])
def test_share_settings_are_validated(tmp_path, key, value, msg):
    with pytest.raises(ConfigError, match=rf"{key}: {re.escape(msg)}"):
        load(TrainConfig, train_dict(tmp_path, **{key: value}))



def test_few_class_benchmark_pairs_and_config(tmp_path):
    import importlib.util
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "few_class.py"
    spec = importlib.util.spec_from_file_location("few_class", path)
    fc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fc)
    shares = fc.make_pair(tmp_path / "few2", 2)
    # the minority class near 15 % of the target pixels, more of it in the source (a biased warm-up marginal)
    assert shares["target/val"] == pytest.approx([0.856, 0.144], abs=1e-3)
    assert shares["source/train"] == pytest.approx([0.8168, 0.1832], abs=1e-4)
    assert (tmp_path / "few2" / "target" / "classes.txt").read_text() == "background\nnucleus\n"
    # the shift changes each class's look but swaps none (few3's source fibres were once the target nuclei's
    # colour: 0.26 of those pixels nearest the source nucleus colour, 0.67 nearest the fibre's)
    for n_class, diagonal in ((2, [0.98, 0.85]), (3, [0.93, 0.69, 0.76])):
        confusion = fc.colour_confusion(n_class)
        assert confusion.sum(1) == pytest.approx(1.0)
        assert confusion.diagonal() == pytest.approx(diagonal, abs=0.01), confusion
    exp = fc.experiment(tmp_path / "few2", 2, [0, 1, 2])
    assert "oracle" not in exp["stages"] and exp["datasets"]["target_train"]["labels"] is False
    assert {s: exp["stages"][s]["max_iters"] for s in exp["stages"]} == fc.SCHEDULE
    assert exp["stages"]["stage1"]["selflabel"] == {"queue_length": 2048, "ema_momentum": 0.98,
                                                 "ema_mode": "train"}   # the template's
    assert "reference_class_scaling" not in exp["train"]                                          # the default
