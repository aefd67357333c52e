"""Reports: markdown tables, CSV/JSON rows and PNG plots, for the benchmarks, the report scripts and ``fid``.

Figures are built on :class:`matplotlib.figure.Figure` directly (no pyplot), so nothing here touches global
plotting state or needs a display backend. A metric row (``fid``, the report scripts) is a dict with ``label``,
``step`` (an int, or None for a baseline) and metrics (FID, KID, precision/recall, or the 2-D toys' SW2 and NLL),
plus any other keys, which the CSV/JSON writers keep.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Sequence

from matplotlib.figure import Figure

__all__ = ["fmt", "markdown_table", "new_figure", "save_figure", "METRIC_COLUMNS", "primary_metric", "metric_table",
           "write_rows", "plot_metric_curve"]


def fmt(value, digits: int = 3) -> str:
    """A float with ``digits`` significant digits (``%g`` style); ints and strings pass through."""
    if isinstance(value, str):
        return value
    if isinstance(value, int):
        return str(value)
    value = float(value)
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.{digits}g}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A GitHub markdown table; non-string cells are formatted with :func:`fmt`."""
    cells = [[fmt(c) for c in row] for row in rows]
    if any(len(row) != len(headers) for row in cells):
        raise ValueError("every row must have one cell per header")
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines)


def new_figure(ncols: int = 1, width: float = 5.0, height: float = 4.0, nrows: int = 1):
    """A figure with ``nrows`` x ``ncols`` axes (each ``width`` x ``height``); returns ``(fig, axes_list)``,
    the axes row by row."""
    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, [ax for row in axes for ax in row]


def save_figure(fig: Figure, out: Path, name: str) -> Path:
    """Save ``fig`` as ``out/name`` (PNG, 120 dpi), creating ``out``; returns the path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    fig.savefig(path, dpi=120)
    return path


METRIC_COLUMNS = ("fid", "fid_class_mean", "label_fidelity", "kid", "precision", "recall",  # images
                  "sw2", "nll", "modes_covered", "mode_balance", "off_mode_fraction")  # 2-D toys


def primary_metric(rows: list[dict]) -> str:
    """The lower-is-better number a table bolds and a curve plots: FID, or SW2 for the 2-D toys."""
    return "fid" if any(r.get("fid") is not None for r in rows) or not rows else "sw2"


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def metric_table(rows: list[dict]) -> str:
    """Markdown table of rows; the lowest value of the :func:`primary_metric` is in bold."""
    key = primary_metric(rows)
    cols = ["label", "step"] + [c for c in METRIC_COLUMNS if any(r.get(c) is not None for r in rows)]
    best = min((r[key] for r in rows if r.get(key) is not None), default=None)
    lines = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    for r in rows:
        cells = [_fmt(r.get(c)) for c in cols]
        if best is not None and r.get(key) == best:
            cells[cols.index(key)] = f"**{cells[cols.index(key)]}**"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_rows(rows: list[dict], path: str | Path) -> Path:
    """Write rows as CSV (``.csv``: label, step, metrics first, then other keys) or JSON (``.json``)."""
    path = Path(path)
    if path.suffix not in (".csv", ".json"):
        raise ValueError(f"write_rows writes .csv or .json files, got {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".json":
        path.write_text(json.dumps(rows, indent=2, default=float) + "\n")
        return path
    keys = list(dict.fromkeys(["label", "step", *METRIC_COLUMNS, *(k for r in rows for k in r)]))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[k for k in keys if any(k in r for r in rows)])
        writer.writeheader()
        writer.writerows(rows)
    return path


def plot_metric_curve(rows: list[dict], path: str | Path, title: str | None = None) -> Path:
    """PNG of the :func:`primary_metric` (FID, or SW2) against training step, one line per label, best checkpoint
    of each starred; baselines (step None) are dashed horizontal lines."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = Figure(figsize=(6.4, 4.2))
    FigureCanvasAgg(fig)  # the Agg canvas, without touching pyplot's global backend
    ax = fig.add_subplot()
    key = primary_metric(rows)
    curves = [r for r in rows if r.get("step") is not None and r.get(key) is not None]
    for label in dict.fromkeys(r["label"] for r in curves):
        pts = sorted((r["step"], r[key]) for r in curves if r["label"] == label)
        (line,) = ax.plot(*zip(*pts), marker="o", ms=3, label=label)
        step, value = min(pts, key=lambda p: p[1])
        ax.scatter([step], [value], marker="*", s=180, color=line.get_color(), edgecolor="k", zorder=3,
                   label=f"best {label}: {value:.3g} @ step {step}")  # fmt: skip
    for r in rows:
        if r.get("step") is None and r.get(key) is not None:
            ax.axhline(r[key], ls="--", lw=1, color="gray")
            ax.annotate(f"{r['label']} ({r[key]:.3g})", (0.01, r[key]), xycoords=("axes fraction", "data"),
                        va="bottom", fontsize=8, color="gray")  # fmt: skip
    name = key.upper()
    ax.set(xlabel="training step", ylabel=name, title=title or f"{name} during training")
    if curves:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path
