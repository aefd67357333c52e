"""Shared helpers for the benchmarks: markdown tables, number formatting, PNG figures.

Figures are built on :class:`matplotlib.figure.Figure` directly (no pyplot), so benchmarks never touch
global plotting state or need a display backend.
"""

from __future__ import annotations

import argparse
import glob
import math
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from matplotlib.figure import Figure

from ..errors import InputError

__all__ = ["markdown_table", "fmt", "new_figure", "save_figure", "single_thread", "label_pair", "run_groups",
           "print_report"]


@contextmanager
def single_thread() -> Iterator[None]:
    """Run torch ops on one intra-op thread, restoring the previous setting afterwards.

    The benchmarks' tensors are small (at most ~1e6 elements, 320x320 matmuls), so extra threads buy
    little, and on a shared machine their synchronisation makes steps 10-30x slower (measured: a d=40
    chasm step took 27 ms on two busy cores and 0.9 ms on one). One thread also makes timings stable.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


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


def label_pair(text: str) -> tuple[str, str]:
    """``"LABEL=VALUE"`` -> ``(LABEL, VALUE)`` for command-line arguments (an argparse ``type``).

    Split at the last ``=``: labels may hold one (``M=50``), the globs and numbers after it do not.
    """
    label, sep, value = text.rpartition("=")
    if not sep or not label or not value:
        raise argparse.ArgumentTypeError(f"{text!r}: expected LABEL=VALUE")
    return label, value


def run_groups(pairs: Sequence[tuple[str, str]]) -> dict[str, list[Path]]:
    """``[(LABEL, GLOB), ...]`` -> ``{LABEL: sorted run folders}`` (each folder one seed of the variant)."""
    return {label: sorted(Path(p) for p in glob.glob(pattern)) for label, pattern in pairs}


def print_report(make: Callable[[], str]) -> int:
    """Print ``make()`` and return 0; bad input (:class:`~n2ce_distill.errors.InputError`, a missing file) is one
    line on stderr and 2, anything else a traceback."""
    try:
        print(make())
    except (InputError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
