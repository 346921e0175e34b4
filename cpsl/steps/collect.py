"""``cpsl collect``: the results tables (and plots) from every stage's ``metrics.json``.

Writes into ``out`` (the workflow uses ``results/``)::

    <experiment>/summary.csv  per experiment: one row per seed, stage and evaluated split, plus ``mean`` and
                  ``std`` rows (over seeds) where several seeds ran; columns ``experiment, seed, stage, selection,
                  miou, miou13, <the experiment's class names>, split, init, iteration`` (interfaces.md; ``split``,
                  ``init`` and ``iteration`` extend it). Per-class values are IoU percent, empty where a class
                  never occurred. The class names are the experiment's own, in train-id order, from its
                  metrics.json files (its label table or ``classes.txt``).
    <experiment>/summary.md   the same as a Markdown table (mIoU, mIoU-13 and per-class IoU, one decimal)
    summary.csv   every experiment's rows, with the per-class columns only when every experiment has the same
                  classes (never one experiment's values under another's class names); else the mIoU columns
    summary.md    the same as a Markdown table, with the ``notes`` (e.g. an experiment without an oracle)
    plots/<experiment>_per_class.png     per-class IoU of every stage on target val (mean over seeds)
    plots/<experiment>_seed<S>_curves.png training losses per stage (from each stage's metrics.jsonl) and, for
                                          stages 1-3, the predicted class shares of student, teacher and
                                          class marginal on the target (``share/*`` keys, cpsl.methods.shares)
    plots/<experiment>_seed<S>_samples.png target-val images, their labels and every stage's prediction in the
                                          Cityscapes palette (from each evaluation's samples/, see evaluate)

``split`` is the evaluated prepared split (``target_val`` for the headline rows, ``source_val`` for the
source-only model on held-out source images); ``init`` is how the stage's student was initialised, as
recorded by training (``train_summary.json``).
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

from cpsl.config import CollectConfig
from cpsl.errors import DataError
from cpsl.provenance import atomic_write_text

STAGE_ORDER = ("source_only", "warmup", "stage1", "stage2", "stage3", "oracle")
BASE_COLUMNS = ("experiment", "seed", "stage", "selection", "miou", "miou13")
EXTRA_COLUMNS = ("split", "init", "iteration")


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
            "init": _init_of(Path(path)), "iteration": m.get("iteration"), "iou": dict(m["per_class"]),
        })
    rows.sort(key=_row_order)
    return rows, {exp: names for exp, (names, _) in classes.items()}


def _row_order(row: dict) -> tuple:
    stage = row["stage"]
    rank = STAGE_ORDER.index(stage) if stage in STAGE_ORDER else len(STAGE_ORDER)
    seed = row["seed"] if isinstance(row["seed"], int) else 10**9 + ("mean", "std").index(row["seed"])
    return (row["experiment"], row["split"] != "target_val", row["split"], rank, stage, row["selection"], seed)


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
        mean_row = {"experiment": exp, "seed": "mean", "stage": stage, "selection": selection, "split": split,
                    "init": members[0]["init"], "iteration": members[0]["iteration"], "iou": {}}
        std_row = dict(mean_row, seed="std", iou={})
        for col in ("miou", "miou13"):
            mean_row[col], std_row[col] = _mean_std([r.get(col) for r in members])
        for name in class_names:
            mean_row["iou"][name], std_row["iou"][name] = _mean_std([r["iou"].get(name) for r in members])
        out += [mean_row, std_row]
    out.sort(key=_row_order)
    return out


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def write_csv(path: Path, rows: list[dict], class_names: list[str]) -> None:
    """Columns ``BASE_COLUMNS``, the class names, ``EXTRA_COLUMNS`` (a class may be named like a column: the
    values are placed by position, never mixed up)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([*BASE_COLUMNS, *class_names, *EXTRA_COLUMNS])
    for row in rows:
        values = [*(row.get(c) for c in BASE_COLUMNS), *(row["iou"].get(c) for c in class_names),
                  *(row.get(c) for c in EXTRA_COLUMNS)]
        writer.writerow(["" if v is None else v for v in values])
    atomic_write_text(path, buf.getvalue())


def _cell(text: str) -> str:
    """A Markdown table cell: a '|' in a class name would split it."""
    return str(text).replace("|", "\\|")


def markdown(rows: list[dict], class_names: list[str], extra_notes: list[str] = ()) -> str:
    has13 = any(r.get("miou13") is not None for r in rows)
    head = ["experiment", "seed", "stage", "split", "selection", "mIoU", *(["mIoU-13"] if has13 else []),
            *map(_cell, class_names)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["experiment"], str(r["seed"]), r["stage"], r["split"], r["selection"], _fmt(r["miou"]),
                 *([_fmt(r.get("miou13"))] if has13 else []), *(_fmt(r["iou"].get(c)) for c in class_names)]
        lines.append("| " + " | ".join(cells) + " |")
    # One entry per stage: a checkpoint of seed S's own chain is written once, with its seed folder as seed<S>.
    inits = sorted({(r["stage"], SEED_DIR.sub(r"\1seed<S>\2", r["init"])) for r in rows if r.get("init")})
    notes = ["", "mIoU and per-class IoU in percent on the evaluated split; empty: class absent from both "
             "ground truth and prediction. `selection: last` is the final checkpoint."]
    if inits:
        notes.append("Student initialisation per stage: " + "; ".join(f"{s}: {i}" for s, i in inits) + ".")
    return "\n".join(lines + notes + [f"Note: {n}." for n in extra_notes]) + "\n"


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
        fig.tight_layout()
        path = plot_dir / f"{exp}_per_class.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append(path)
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
        fig.tight_layout()
        path = plot_dir / f"{exp}_seed{seed}_curves.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        made.append(path)
    made += _sample_plots(plot_dir, stage_dirs, plt)
    return made


def _series(path: Path) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """A metrics.jsonl as ``{"loss": {name: [(iteration, value)]}, "share": {"student/1": [...], ...}}``."""
    out: dict[str, dict[str, list[tuple[int, float]]]] = {"loss": defaultdict(list), "share": defaultdict(list)}
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
        fig.tight_layout()
        path = plot_dir / f"{exp}_seed{seed}_samples.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        made.append(path)
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
