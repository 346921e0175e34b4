"""The workflow's files follow Snakemake's conventions: `snakefmt --check` (at the project's line width, from
pyproject.toml) and `snakemake --lint`, whose only remaining lint (no conda environment or container per rule) is
answered in workflow/rules/common.smk."""

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
WORKFLOW_FILES = [REPO / "Snakefile", *sorted((REPO / "workflow" / "rules").glob("*.smk"))]
CONDA_LINT = "Specify a conda environment or container for each rule."


def lints(output: str) -> dict[str, list[str]]:
    """`snakemake --lint`'s text output as {"rule X" or "snakefile F": [lint titles]}."""
    found, current = {}, None
    for line in output.splitlines():
        head = re.match(r"Lints for (rule \w+|snakefile \S+?)(?: \(.*\))?:$", line)
        if head:
            current = head.group(1)
            found[current] = []
        elif current and (item := re.match(r"    \* (.+?):$", line)):
            found[current].append(item.group(1))
    return found


def test_lints_parses_snakemakes_text():
    text = ("Using workflow specific profile profiles/default\n"
            "Lints for snakefile /w/rules/common.smk:\n"
            "    * Mixed rules and functions in same snakefile.:\n"
            "      Small one-liner functions used only once should be defined as lambda\n"
            "\n"
            "Lints for rule train (line 24, /w/rules/train.smk):\n"
            f"    * {CONDA_LINT}:\n"
            "      This way, the used software for each specific step is documented, and the\n")
    assert lints(text) == {"snakefile /w/rules/common.smk": ["Mixed rules and functions in same snakefile."],
                           "rule train": [CONDA_LINT]}


def test_snakefmt_check_passes_on_every_workflow_file():
    assert len(WORKFLOW_FILES) == 5, WORKFLOW_FILES  # the Snakefile and the four rule files
    res = subprocess.run([str(BIN / "snakefmt"), "--check", *map(str, WORKFLOW_FILES)], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"run `snakefmt Snakefile workflow/rules/` to reformat:\n{res.stdout}{res.stderr}"


def test_snakemake_lint_reports_only_the_answered_conda_lint(tmp_path):
    res = subprocess.run([str(BIN / "snakemake"), "-s", str(REPO / "Snakefile"), "-d", str(tmp_path), "--configfile",
                          str(REPO / "config.yaml"), "--lint"], cwd=REPO, capture_output=True, text=True, timeout=300)
    found = lints(res.stdout + res.stderr)
    rules = set(re.findall(r"^rule (\w+):", "\n".join(f.read_text() for f in WORKFLOW_FILES), re.M))
    assert rules >= {"synth", "prepare", "fetch_weights", "train", "evaluate", "stage_product", "collect", "all"}
    # every rule that runs a command has the one answered lint, nothing else; `all` runs nothing and has none
    assert found == {f"rule {name}": [CONDA_LINT] for name in rules - {"all"}}, res.stdout + res.stderr
    common = (REPO / "workflow" / "rules" / "common.smk").read_text()
    assert "Why the rules have no `conda` or `container` directive" in common
