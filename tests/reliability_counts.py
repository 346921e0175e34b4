"""Count the reliability and security suite's cases (issue 8), from what pytest collects.

    python tests/reliability_counts.py          # counts, from `pytest --collect-only -q`
    python tests/reliability_counts.py --run    # also runs the three files and reports passed / failed / time

Fault trials are the ids of ``test_kill_*`` in test_faults.py (one kill-and-rerun trial each, per step), plus
the SLURM time-limit kill of tests/test_slurm.py (counted, not run here: it needs a SLURM controller); full-disk
cases are the ``test_full_disk_*`` ids; bad-input cases every id of test_bad_inputs.py; security cases every
id of test_security.py; output-folder cases the ids of test_outputs.py (a step's --out never deletes or
overwrites what cpsl did not make); own-pair cases those of test_own_pair_checks.py and test_own_pair.py.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FILES = ("tests/test_faults.py", "tests/test_bad_inputs.py", "tests/test_security.py", "tests/test_outputs.py",
         "tests/test_own_pair_checks.py", "tests/test_own_pair.py")
SLURM_KILL = "tests/test_slurm.py::test_training_killed_at_its_time_limit_is_resubmitted_and_resumes"


def collect(*paths: str) -> list[str]:
    """Test ids pytest collects from ``paths``."""
    res = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", *paths], cwd=REPO,
                         capture_output=True, text=True)
    ids = [line.strip() for line in res.stdout.splitlines() if "::" in line]
    if res.returncode != 0 or not ids:
        sys.exit(f"collection failed:\n{res.stdout[-3000:]}{res.stderr[-3000:]}")
    return ids


def counts(ids: list[str]) -> dict[str, object]:
    kills = [i for i in ids if "::test_kill_" in i]
    per_step = Counter(re.match(r".*\[(source_only|warmup|pseudo-soft|pseudo-hard|evaluate)-", i).group(1)
                       for i in kills)
    return {
        "fault kill trials": len(kills),
        "  per step": dict(sorted(per_step.items())),
        "  signals": dict(Counter(s for i in kills for s in re.findall(r"SIG(KILL|TERM)", i))),
        "full-disk cases": sum("::test_full_disk_" in i for i in ids),
        "bad-input cases": sum(i.startswith("tests/test_bad_inputs.py::") for i in ids),
        "security cases": sum(i.startswith("tests/test_security.py::") for i in ids),
        "output-folder cases": sum(i.startswith("tests/test_outputs.py::") for i in ids),
        "own-pair cases": sum(i.startswith(("tests/test_own_pair_checks.py::", "tests/test_own_pair.py::"))
                              for i in ids),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", action="store_true", help="also run the three files and time them")
    args = parser.parse_args()
    ids = collect(*FILES)
    slurm = [i for i in collect("tests/test_slurm.py") if i == SLURM_KILL]
    for key, value in counts(ids).items():
        print(f"{key}: {value}")
    print(f"SLURM time-limit kill (tests/test_slurm.py, needs SLURM): {len(slurm)}")
    print(f"fault trials in all (kills + SLURM): {sum('::test_kill_' in i for i in ids) + len(slurm)}")
    if args.run:
        t0 = time.monotonic()
        res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *FILES], cwd=REPO,
                             capture_output=True, text=True)
        summary = (res.stdout.strip().splitlines() or ["(no output)"])[-1]
        print(f"run: {summary} (wall {time.monotonic() - t0:.0f} s)")
        return res.returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())
