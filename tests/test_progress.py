"""Progress bars: in place on a terminal; plain, sparse lines in a log file (Snakemake rule logs, SLURM output)."""

from __future__ import annotations

import io

from cpsl import progress


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_log_file_gets_one_line_per_redraw_without_carriage_returns():
    buf = io.StringIO()
    bar = progress.bar(total=5, desc="stage1", stream=buf)
    assert bar.mininterval == progress.FILE_INTERVAL_S == 30.0
    for _ in range(5):
        bar.update(1)
    bar.close()
    out = buf.getvalue()
    assert "\r" not in out and out.endswith("\n")
    lines = out.splitlines()
    # a fast loop redraws only at the start and at the close: two lines, no blank one
    assert len(lines) == 2, lines
    assert lines[0].startswith("stage1:") and "0/5" in lines[0]
    assert lines[1].startswith("stage1: 100%") and "5/5" in lines[1]


def test_log_file_lines_keep_the_whole_postfix():
    buf = io.StringIO()
    bar = progress.bar(total=2, desc="stage1", stream=buf)
    losses = {"ce_source": "0.4772", "cts": "1.056", "consist": "0.1042", "sl": "1.421", "contrast": "2.397",
              "loss": "1.721", "cutmix": "0.5"}
    bar.update(2)
    bar.set_postfix(losses, refresh=False)
    bar.close()
    last = buf.getvalue().splitlines()[-1]
    assert last.startswith("stage1: 100%") and last.endswith(", ".join(f"{k}={v}" for k, v in losses.items()) + "]")


def test_iterable_and_resume_position_in_a_log_file():
    buf = io.StringIO()
    assert list(progress.bar(range(3), total=3, desc="prepare target_val", unit="img", stream=buf)) == [0, 1, 2]
    assert buf.getvalue().splitlines()[-1].startswith("prepare target_val: 100%")
    assert "3/3" in buf.getvalue().splitlines()[-1]
    buf = io.StringIO()
    bar = progress.bar(total=10, initial=7, desc="warmup", stream=buf)   # a resumed run starts at 7/10
    bar.update(3)
    bar.close()
    first, last = buf.getvalue().splitlines()
    assert "7/10" in first and "10/10" in last


def test_terminal_redraws_in_place():
    term = FakeTerminal()
    bar = progress.bar(total=4, desc="evaluate", stream=term)
    assert bar.mininterval == progress.TTY_INTERVAL_S == 1.0
    bar.update(4)
    bar.close()
    assert term.getvalue().count("\r") >= 2 and "4/4" in term.getvalue()


def test_disabled_bar_writes_nothing():
    for stream in (io.StringIO(), FakeTerminal()):
        bar = progress.bar(total=3, desc="stage2", disable=True, stream=stream)
        bar.update(3)
        bar.close()
        assert stream.getvalue() == ""


def test_line_writer_drops_carriage_returns_and_blank_redraws():
    buf = io.StringIO()
    w = progress.LineWriter(buf)
    assert w.write("\rwarmup:  50%|#####     | 1/2   ") == len("\rwarmup:  50%|#####     | 1/2   ")
    w.write("\n")
    w.write("\r")
    assert buf.getvalue() == "warmup:  50%|#####     | 1/2\n"
