"""Progress bars (tqdm on stderr) of the long loops: training, inference and dataset preparation.

On a terminal the bar redraws in place at most once a second. When stderr is a file (a Snakemake rule's log,
a SLURM output file) every redraw would be appended to it behind a carriage return: the demo's 17-minute
stage 1 left a single line of 123 KB, a day-long run would leave one of about 10 MB. There the bar is written
as plain lines with the full postfix (the losses), one every ``FILE_INTERVAL_S`` seconds at most (and at the
start and the end), which a user can ``tail -f`` or grep. The metrics themselves go to ``metrics.jsonl``.
"""

from __future__ import annotations

import sys
from typing import IO, Any, Iterable

from tqdm import tqdm

TTY_INTERVAL_S = 1.0
FILE_INTERVAL_S = 30.0


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class LineWriter:
    """A text stream for tqdm that turns its in-place redraws (``"\\r" + bar``) into one line per redraw."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        line = text.replace("\r", "").rstrip()
        if line:
            self.stream.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


def bar(iterable: Iterable | None = None, *, total: int | None, desc: str, unit: str = "it", initial: int = 0,
        disable: bool = False, stream: IO[str] | None = None) -> tqdm:
    """A tqdm bar on ``stream`` (default stderr): in place on a terminal, plain lines every 30 s otherwise."""
    stream = sys.stderr if stream is None else stream
    if _isatty(stream):
        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, disable=disable, file=stream,
                    mininterval=TTY_INTERVAL_S, dynamic_ncols=True)
    return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, disable=disable,
                file=LineWriter(stream), mininterval=FILE_INTERVAL_S, ascii=True)
