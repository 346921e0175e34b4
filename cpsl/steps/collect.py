"""``cpsl collect``: the results tables (and plots) from every stage's ``metrics.json``.

Writes into ``out`` (the workflow uses ``results/``)::

    <experiment>/summary.csv  per experiment: one row per seed, stage and evaluated split, plus ``mean`` and
                  ``std`` rows (over seeds) where several seeds ran; columns ``experiment, seed, stage, selection,
                  miou, miou13, <the experiment's class names>, split, backbone, init, iteration`` (interfaces.md;
                  ``split``, ``backbone``, ``init`` and ``iteration`` extend it). Per-class values are IoU percent, empty where a class
                  never occurred. The class names are the experiment's own, in train-id order, from its
                  metrics.json files (its label table or ``classes.txt``).
    <experiment>/summary.md   the same as a Markdown table (mIoU, mIoU-13 and per-class IoU, one decimal; iteration)
                  Rows of a stage: ``selection`` ``last`` (metrics.json) first, then ``best_on_val``
                  (metrics_best.json: checkpoints/best.pt of a stage that validated during training). With a
                  reference table for the experiment (``references``, the paper presets): its rows (``seed`` =
                  ``paper`` for CPSL, ``peer`` for the others) and per stage and selection a ``delta`` row (ours
                  minus the paper's, per class by name), and a last column ``reference`` naming the source.
    summary.csv   every experiment's rows, with the per-class columns only when every experiment has the same
                  classes (never one experiment's values under another's class names); else the mIoU columns
    summary.md    the same as a Markdown table, with the ``notes`` (e.g. an experiment without an oracle)
    plots/<experiment>_per_class.png     per-class IoU of every stage on target val (mean over seeds)
    plots/<experiment>_seed<S>_curves.png training losses per stage (from each stage's metrics.jsonl) and, for
                                          stages 1-3, the predicted class shares of student, teacher and
                                          class marginal on the target (``share/*`` keys, cpsl.methods.shares)
    plots/<experiment>_seed<S>_validation.png mIoU over iterations of the stages that validated during training
    plots/<experiment>_seed<S>_samples.png target-val images, their labels and every stage's prediction in the
                                          Cityscapes palette (from each evaluation's samples/, see evaluate)

``split`` is the evaluated prepared split (``target_val`` for the headline rows, ``source_val`` for the
source-only model on held-out source images); ``backbone`` is the network the stage trained (``model.backbone``
of its recorded ``config.yaml``: resnet101, mit_b5, ...; for reference rows the paper's); ``init`` is how the
stage's student was initialised, as recorded by training (``train_summary.json``).
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from cpsl.config import CollectConfig
from cpsl.errors import DataError
from cpsl.provenance import atomic_write_text

STAGE_ORDER = ("source_only", "warmup", "stage1", "stage2", "stage3", "oracle")
BASE_COLUMNS = ("experiment", "seed", "stage", "selection", "miou", "miou13")
EXTRA_COLUMNS = ("split", "backbone", "init", "iteration")
REFERENCE_COLUMN = "reference"   # after EXTRA_COLUMNS, in a table with reference rows: what the row reports
# Rows of a stage: ``last`` first (the default, the honest number), then ``best_on_val``, then the others.
SELECTION_ORDER = ("last", "best_on_val")
# Non-numeric seeds, in this order after the seeds: aggregates, then the reference rows and the differences.
SEED_LABELS = ("mean", "std", "paper", "peer", "delta")
# The columns of a reference table (results/reference/*.csv) before its class columns.
REFERENCE_META = ("method", "backbone", "source", "stage", "selection", "iteration", "miou", "miou13")
PAPER_METHOD = "CPSL"


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: metrics file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not a valid metrics.json ({err})") from None


SEED_DIR = re.compile(r"([/\\])seed\d+([/\\])")


def _init_of(metrics_path: Path) -> str:
    """The student initialisation recorded by training next to the stage's checkpoint, if any."""
    for folder in (metrics_path.parent, metrics_path.parent.parent):
        summary = folder / "train_summary.json"
        if summary.is_file():
            try:
                return str(json.loads(summary.read_text()).get("student_init", ""))
            except json.JSONDecodeError:
                return ""
    return ""


def _backbone_of(metrics_path: Path) -> str:
    """The network the evaluated model was trained as (``model.backbone`` of the stage's training config, which
    ``cpsl train`` records as ``config.yaml`` in the stage's folder): resnet101, mit_b5, ...; "" if unknown."""
    for folder in (metrics_path.parent, metrics_path.parent.parent):
        recorded = folder / "config.yaml"
        if recorded.is_file():
            try:
                data = yaml.safe_load(recorded.read_text(encoding="utf-8"))
            except (yaml.YAMLError, UnicodeDecodeError):
                return ""
            model = data.get("model") if isinstance(data, dict) else None
            return str(model.get("backbone", "")) if isinstance(model, dict) else ""
    return ""


def load_rows(paths: list[Path]) -> tuple[list[dict[str, Any]], dict[str, list[str]]]:
    """One row per metrics.json (the interfaces.md fields, split, init, and ``iou``: per-class IoU by name), and
    each experiment's class names in train-id order. Every metrics.json of an experiment must name the same
    classes (DataError naming the two files otherwise)."""
    rows = []
    classes: dict[str, tuple[list[str], Path]] = {}
    for path in paths:
        m = _read_json(Path(path))
        missing = [k for k in ("stage", "experiment", "seed", "miou", "per_class") if k not in m]
        if missing:
            raise DataError(f"{path}: metrics.json lacks {', '.join(missing)}")
        if not isinstance(m["per_class"], dict):
            raise DataError(f"{path}: per_class must map class names to IoU values")
        names = [str(k) for k in m["per_class"]]
        first = classes.setdefault(m["experiment"], (names, Path(path)))
        if first[0] != names:
            raise DataError(f"{path}: its classes differ from those of {first[1]} (same experiment "
                            f"{m['experiment']!r}): {', '.join(names[:5])}... against {', '.join(first[0][:5])}...")
        rows.append({
            "experiment": m["experiment"], "seed": m["seed"], "stage": m["stage"],
            "selection": m.get("selection", "last"), "miou": m["miou"], "miou13": m.get("miou13"),
            "split": Path(m["data"]).name if m.get("data") else "target_val",
            "backbone": _backbone_of(Path(path)), "init": _init_of(Path(path)), "iteration": m.get("iteration"),
            "iou": dict(m["per_class"]),
        })
    rows.sort(key=_row_order)
    return rows, {exp: names for exp, (names, _) in classes.items()}


def _row_order(row: dict) -> tuple:
    stage = row["stage"]
    rank = STAGE_ORDER.index(stage) if stage in STAGE_ORDER else len(STAGE_ORDER)
    seed = row["seed"] if isinstance(row["seed"], int) else 10**9 + SEED_LABELS.index(row["seed"])
    sel = row["selection"]
    sel_rank = SELECTION_ORDER.index(sel) if sel in SELECTION_ORDER else len(SELECTION_ORDER)
    return (row["experiment"], row["split"] != "target_val", row["split"], rank, stage, sel_rank, sel, seed)


def _mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None, None
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return round(mean, 4), round(std, 4)


def aggregate(rows: list[dict[str, Any]], class_names: list[str]) -> list[dict[str, Any]]:
    """Add ``mean`` and ``std`` (sample std over seeds) rows for every group that ran with several seeds."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        groups[(row["experiment"], row["stage"], row["split"], row["selection"])].append(row)
    out = list(rows)
    for (exp, stage, split, selection), members in groups.items():
        if len({r["seed"] for r in members}) < 2:
            continue
        iterations = {r["iteration"] for r in members}   # best_on_val: each seed's own best iteration
        mean_row = {"experiment": exp, "seed": "mean", "stage": stage, "selection": selection, "split": split,
                    "backbone": members[0].get("backbone", ""), "init": members[0]["init"], "iteration": iterations.pop() if len(iterations) == 1 else None,
                    "iou": {}}
        std_row = dict(mean_row, seed="std", iou={})
        for col in ("miou", "miou13"):
            mean_row[col], std_row[col] = _mean_std([r.get(col) for r in members])
        for name in class_names:
            mean_row["iou"][name], std_row["iou"][name] = _mean_std([r["iou"].get(name) for r in members])
        out += [mean_row, std_row]
    out.sort(key=_row_order)
    return out


def read_reference(path: Path) -> list[dict[str, Any]]:
    """The rows of a reference table (``results/reference/*.csv``): the ``REFERENCE_META`` fields (``iteration``,
    ``miou``, ``miou13`` as numbers, None where empty) and ``iou``: {class name: IoU or None}, from the columns
    after them. DataError naming the file, line and column for a bad table."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: reference table not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read the reference table ({err})") from None
    reader = csv.DictReader(io.StringIO(text))
    fields = list(reader.fieldnames or [])
    missing = [c for c in REFERENCE_META if c not in fields]
    if missing:
        raise DataError(f"{path}: not a reference table (no column {', '.join(missing)})")
    classes = [c for c in fields if c not in REFERENCE_META]
    rows = []
    for line, raw in enumerate(reader, start=2):
        def number(key: str) -> float | None:
            text = (raw.get(key) or "").strip()
            try:
                return float(text) if text else None
            except ValueError:
                raise DataError(f"{path}: line {line}, column {key}: not a number ({text!r})") from None
        iteration = number("iteration")
        rows.append({**{k: (raw.get(k) or "").strip() for k in ("method", "backbone", "source", "stage", "selection")},
                     "iteration": None if iteration is None else int(iteration), "miou": number("miou"),
                     "miou13": number("miou13"), "iou": {c: number(c) for c in classes}})
    return rows


def _difference(ours: float | None, theirs: float | None) -> float | None:
    return None if ours is None or theirs is None else round(float(ours) - float(theirs), 4)


def reference_rows(reference: list[dict[str, Any]], exp: str, ours: list[dict[str, Any]],
                   class_names: list[str]) -> list[dict[str, Any]]:
    """Table rows for an experiment from its reference table: the rows of the experiment's stages (and the peers'
    ``final`` rows), ``seed`` = ``paper`` for CPSL's and ``peer`` for the others (the validation runs' ``first``
    rows and README rows repeating a log row left out), and per stage and selection of ours on target val a
    ``delta`` row: ours (the ``mean`` row over seeds, or the one seed's) minus CPSL's row of the same stage and
    selection, else its ``best_on_val`` row, else its ``reported`` one; per class by name, in ``class_names``."""
    mine = [r for r in ours if r["split"] == "target_val"]
    stages = {r["stage"] for r in mine}
    logged = {(r["method"], r["stage"], r["selection"]) for r in reference if r["iteration"] is not None}
    shown = [r for r in reference if r["selection"] != "first" and (r["stage"] in stages or r["stage"] == "final")
             and not (r["iteration"] is None and (r["method"], r["stage"], r["selection"]) in logged)]
    rows = []
    for r in shown:
        rows.append({"experiment": exp, "seed": "paper" if r["method"] == PAPER_METHOD else "peer",
                     "stage": r["stage"], "selection": r["selection"], "miou": r["miou"], "miou13": r["miou13"],
                     "split": "target_val", "backbone": r["backbone"], "init": "", "iteration": r["iteration"],
                     "iou": {c: r["iou"].get(c) for c in class_names},
                     REFERENCE_COLUMN: f"{r['method']} ({r['backbone']}; {r['source']})"})
    for (stage, selection) in sorted({(r["stage"], r["selection"]) for r in mine}):
        group = [r for r in mine if r["stage"] == stage and r["selection"] == selection]
        mean = [r for r in group if r["seed"] == "mean"]
        if not mean and len(group) != 1:
            continue
        own = mean[0] if mean else group[0]
        paper = [r for r in shown if r["method"] == PAPER_METHOD and r["stage"] == stage]
        base = next((r for sel in (selection, "best_on_val", "reported") for r in paper if r["selection"] == sel),
                    None)
        if base is None:
            continue
        at = f" at iteration {base['iteration']}" if base["iteration"] is not None else ""
        rows.append({"experiment": exp, "seed": "delta", "stage": stage, "selection": selection,
                     "miou": _difference(own["miou"], base["miou"]),
                     "miou13": _difference(own.get("miou13"), base["miou13"]), "split": "target_val",
                     "backbone": own.get("backbone", ""), "init": "",
                     "iteration": own["iteration"],
                     "iou": {c: _difference(own["iou"].get(c), base["iou"].get(c)) for c in class_names},
                     REFERENCE_COLUMN: f"ours ({own['seed']}) minus {PAPER_METHOD} {base['selection']}{at} "
                                       f"({base['source']})"})
    return rows


def _signed(value: Any) -> str:
    return "" if value is None else f"{float(value):+.1f}"


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def write_csv(path: Path, rows: list[dict], class_names: list[str]) -> None:
    """Columns ``BASE_COLUMNS``, the class names, ``EXTRA_COLUMNS`` and, when the table has reference rows,
    ``reference`` (a class may be named like a column: the values are placed by position, never mixed up)."""
    extra = [*EXTRA_COLUMNS, *([REFERENCE_COLUMN] if any(r.get(REFERENCE_COLUMN) for r in rows) else [])]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([*BASE_COLUMNS, *class_names, *extra])
    for row in rows:
        values = [*(row.get(c) for c in BASE_COLUMNS), *(row["iou"].get(c) for c in class_names),
                  *(row.get(c) for c in extra)]
        writer.writerow(["" if v is None else v for v in values])
    atomic_write_text(path, buf.getvalue())


def _cell(text: str) -> str:
    """A Markdown table cell: a '|' in a class name would split it."""
    return str(text).replace("|", "\\|")


def markdown(rows: list[dict], class_names: list[str], extra_notes: list[str] = ()) -> str:
    has13 = any(r.get("miou13") is not None for r in rows)
    has_ref = any(r.get(REFERENCE_COLUMN) for r in rows)
    head = ["experiment", "seed", "stage", "split", "selection", "mIoU", *(["mIoU-13"] if has13 else []),
            *map(_cell, class_names), "iteration", *(["reference"] if has_ref else [])]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        fmt = _signed if r["seed"] == "delta" else _fmt
        cells = [r["experiment"], str(r["seed"]), r["stage"], r["split"], r["selection"], fmt(r["miou"]),
                 *([fmt(r.get("miou13"))] if has13 else []), *(fmt(r["iou"].get(c)) for c in class_names),
                 _fmt(r.get("iteration")), *([_cell(r.get(REFERENCE_COLUMN) or "")] if has_ref else [])]
        lines.append("| " + " | ".join(cells) + " |")
    # One entry per stage: a checkpoint of seed S's own chain is written once, with its seed folder as seed<S>.
    inits = sorted({(r["stage"], SEED_DIR.sub(r"\1seed<S>\2", r["init"])) for r in rows if r.get("init")})
    notes = ["", "mIoU and per-class IoU in percent on the evaluated split; empty: class absent from both "
             "ground truth and prediction. `selection: last` is the final checkpoint."]
    if any(r["selection"] == "best_on_val" and r["seed"] not in ("paper", "peer") for r in rows):
        notes.append("`selection: best_on_val` is the checkpoint with the best mIoU of the validations during "
                     "training (eval_interval), selected on the evaluation set itself, as the reference does: an "
                     "optimistic number; `last` is the honest one. `iteration`: the checkpoint's iteration.")
    if has_ref:
        notes.append("Rows `paper` and `peer`: published numbers (results/reference/, the `reference` column says "
                     "where from); `delta`: ours minus the paper's, per class, for the same stage (and selection, "
                     "where the paper has it).")
    if inits:
        notes.append("Student initialisation per stage: " + "; ".join(f"{s}: {i}" for s, i in inits) + ".")
    return "\n".join(lines + notes + [f"Note: {n}." for n in extra_notes]) + "\n"


def _save(fig: Any, path: Path, plt: Any, dpi: int = 100) -> Path:
    """Lay out, write and close one figure; returns its path."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def _plots(out: Path, rows: list[dict], classes: dict[str, list[str]],
           stage_dirs: dict[tuple, Path]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    plot_dir = out / "plots"
    plot_dir.mkdir(parents=True, exist_ok=True)
    for exp in sorted({r["experiment"] for r in rows}):
        sel = [r for r in rows if r["experiment"] == exp and r["split"] == "target_val" and r["selection"] == "last"]
        multi = any(r["seed"] == "mean" for r in sel)
        sel = [r for r in sel if (r["seed"] == "mean") == multi and r["seed"] != "std"]
        if not sel:
            continue
        class_names = classes[exp]
        fig, ax = plt.subplots(figsize=(max(8, len(class_names) * 0.6), 4))
        width = 0.8 / len(sel)
        for i, r in enumerate(sel):
            vals = [r["iou"].get(c) if r["iou"].get(c) is not None else 0.0 for c in class_names]
            ax.bar([x + i * width for x in range(len(class_names))], vals, width,
                   label=f"{r['stage']} ({_fmt(r['miou'])})")
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(class_names))])
        ax.set_xticklabels(class_names, rotation=60, ha="right", fontsize=8)
        ax.set_ylabel("IoU (%)")
        ax.set_ylim(0, 100)
        ax.set_title(f"{exp}: per-class IoU on target val" + (" (mean over seeds)" if multi else ""))
        ax.legend(fontsize=7, ncol=3)
        made.append(_save(fig, plot_dir / f"{exp}_per_class.png", plt, dpi=110))
    by_seed: dict[tuple, dict[str, Path]] = defaultdict(dict)
    for (exp, seed, stage), folder in stage_dirs.items():
        if (folder / "metrics.jsonl").is_file():
            by_seed[(exp, seed)][stage] = folder / "metrics.jsonl"
    for (exp, seed), logs in sorted(by_seed.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
        order = sorted(logs, key=lambda s: STAGE_ORDER.index(s) if s in STAGE_ORDER else 99)
        series = {stage: _series(logs[stage]) for stage in order}
        with_shares = any(s["share"] for s in series.values())
        fig, axes = plt.subplots(2 if with_shares else 1, len(logs), figsize=(4 * len(logs), 6 if with_shares else 3),
                                 squeeze=False)
        for col, stage in enumerate(order):
            ax = axes[0][col]
            for name, pts in series[stage]["loss"].items():
                ax.plot([p[0] for p in pts], [p[1] for p in pts], label=name, linewidth=1)
            ax.set_title(stage)
            ax.set_xlabel("iteration")
            ax.legend(fontsize=6)
            if with_shares:
                _share_panel(axes[1][col], stage, series[stage]["share"], classes.get(exp, []))
        fig.suptitle(f"{exp} seed {seed}: training losses" + (" and predicted class shares on the target"
                                                              if with_shares else ""))
        made.append(_save(fig, plot_dir / f"{exp}_seed{seed}_curves.png", plt))
    made += _validation_plots(plot_dir, by_seed, plt)
    made += _sample_plots(plot_dir, stage_dirs, plt)
    return made


def _validation_plots(plot_dir: Path, logs_by_seed: dict[tuple, dict[str, Path]], plt: Any) -> list[Path]:
    """Per experiment and seed with validations during training (``val/*`` in metrics.jsonl, eval_interval): the
    mIoU over iterations of every such stage's student (and stage 1's EMA teacher), the best one marked."""
    made = []
    for (exp, seed), logs in sorted(logs_by_seed.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
        curves = {stage: _series(path)["val"] for stage, path in logs.items()}
        curves = {stage: c for stage, c in curves.items() if c.get("student")}
        if not curves:
            continue
        order = sorted(curves, key=lambda s: STAGE_ORDER.index(s) if s in STAGE_ORDER else 99)
        fig, axes = plt.subplots(1, len(order), figsize=(4 * len(order), 3.2), squeeze=False)
        for ax, stage in zip(axes[0], order):
            for who, pts in sorted(curves[stage].items()):
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "-o" if who == "student" else "--", markersize=2,
                        linewidth=1, label=who)
            best = max(reversed(curves[stage]["student"]), key=lambda p: p[1])   # the latest of equal scores
            ax.plot([best[0]], [best[1]], "*", markersize=10, color="black",
                    label=f"best {best[1]:.1f} at {best[0]}")
            ax.set_title(stage)
            ax.set_xlabel("iteration")
            ax.set_ylabel("mIoU (%)")
            ax.legend(fontsize=6)
        fig.suptitle(f"{exp} seed {seed}: mIoU on the validation images during training", fontsize=9)
        made.append(_save(fig, plot_dir / f"{exp}_seed{seed}_validation.png", plt))
    return made


def _series(path: Path) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """A metrics.jsonl as ``{"loss": {name: [(iteration, value)]}, "share": {"student/1": [...], ...},
    "val": {"student": [...], "teacher": [...]}}`` (``val``: the validations during training)."""
    out: dict[str, dict[str, list[tuple[int, float]]]] = {"loss": defaultdict(list), "share": defaultdict(list),
                                                          "val": defaultdict(list)}
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        for key, value in rec.items():
            kind, _, name = key.partition("/")
            if kind in out and isinstance(value, (int, float)):
                out[kind][name].append((rec["iteration"], value))
    return out


SHARE_STYLES = {"student": "-", "teacher": "--", "marginal": ":"}


def _share_panel(ax: Any, stage: str, shares: dict[str, list[tuple[int, float]]], names: list[str]) -> None:
    """The student's (solid), the teacher's (dashed) and the marginal's (dotted) class shares over iterations,
    one colour per class (``cpsl.methods.shares``); the classes the student ever gives 1 % or more."""
    if not shares:
        ax.set_axis_off()
        return
    n = 1 + max(int(name.split("/")[1]) for name in shares)
    shown = [k for k in range(n) if max(v for _, v in shares.get(f"student/{k}", [(0, 0.0)])) >= 0.01]
    for i, k in enumerate(shown[:10]):
        colour = f"C{i}"
        for who, style in SHARE_STYLES.items():
            pts = shares.get(f"{who}/{k}")
            if pts:
                label = (names[k] if k < len(names) else f"class {k}") if who == "student" else None
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, color=colour, linewidth=1, label=label)
    ax.set_title(f"{stage}: class shares (student -, teacher --, marginal :)", fontsize=8)
    ax.set_xlabel("iteration")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=6)


def _sample_plots(plot_dir: Path, stage_dirs: dict[tuple, Path], plt: Any) -> list[Path]:
    """Per experiment and seed: rows = the evaluated target-val samples, columns = image, label, each stage."""
    from PIL import Image

    from cpsl.data.common import read_image

    by_seed: dict[tuple, dict[str, Path]] = defaultdict(dict)
    for (exp, seed, stage), folder in stage_dirs.items():
        if (folder / "samples" / "index.json").is_file():
            by_seed[(exp, seed)][stage] = folder / "samples"
    made = []
    for (exp, seed), folders in sorted(by_seed.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
        stages = sorted(folders, key=lambda s: STAGE_ORDER.index(s) if s in STAGE_ORDER else 99)
        index = {s: {e["name"]: e for e in json.loads((folders[s] / "index.json").read_text())} for s in stages}
        names = [n for n in index[stages[0]] if all(n in index[s] for s in stages)]
        if not names:
            continue
        cols = ["image", "label", *stages]
        fig, axes = plt.subplots(len(names), len(cols), figsize=(2.4 * len(cols), 1.4 * len(names) + 0.4),
                                 squeeze=False)
        for r, name in enumerate(names):
            first = index[stages[0]][name]
            preds = [Image.open(folders[s] / index[s][name]["prediction"]) for s in stages]
            pal = np.array(preds[0].getpalette(), dtype=np.uint8).reshape(-1, 3)  # the experiment's class colours
            pal = np.concatenate([pal, np.zeros((256 - len(pal), 3), np.uint8)])
            panels = [read_image(Path(first["image"])), pal[np.array(Image.open(first["label"]))]]
            panels += [np.array(p.convert("RGB")) for p in preds]
            for c, (ax, panel) in enumerate(zip(axes[r], panels)):
                ax.imshow(panel)
                ax.set_xticks([])
                ax.set_yticks([])
                if r == 0:
                    ax.set_title(cols[c], fontsize=8)
        fig.suptitle(f"{exp} seed {seed}: target val predictions", fontsize=9)
        made.append(_save(fig, plot_dir / f"{exp}_seed{seed}_samples.png", plt))
    return made


def run(cfg: CollectConfig, out: Path) -> dict:
    """Build ``<experiment>/summary.{csv,md}`` per experiment, ``summary.{csv,md}`` over all of them (and plots)
    in ``out`` from ``cfg.metrics``."""
    out = Path(out)
    if not cfg.metrics:
        raise DataError("metrics: no metrics.json files given")
    rows, classes = load_rows([Path(p) for p in cfg.metrics])
    out.mkdir(parents=True, exist_ok=True)
    for exp, names in classes.items():
        mine = aggregate([r for r in rows if r["experiment"] == exp], names)
        if exp in cfg.references:
            mine = sorted(mine + reference_rows(read_reference(cfg.references[exp]), exp, mine, names),
                          key=_row_order)
        write_csv(out / exp / "summary.csv", mine, names)
        atomic_write_text(out / exp / "summary.md", markdown(mine, names))
    # the per-class columns of the overall table only when every experiment has the same classes
    shared = next(iter(classes.values())) if len({tuple(c) for c in classes.values()}) == 1 else []
    table = aggregate(rows, shared)
    write_csv(out / "summary.csv", table, shared)
    atomic_write_text(out / "summary.md", markdown(table, shared, cfg.notes))
    plots: list[Path] = []
    (out / "plots").mkdir(exist_ok=True)  # the workflow's output folder, also when plots are off
    if cfg.plots:
        stage_dirs = {}
        for p in cfg.metrics:
            folder = Path(p).parent
            if folder.name.startswith("eval_"):
                continue
            m = _read_json(Path(p))
            stage_dirs[(m["experiment"], m["seed"], m["stage"])] = folder
        plots = _plots(out, table, classes, stage_dirs)
    return {"rows": len(table), "plots": [str(p) for p in plots]}
