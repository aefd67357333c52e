"""Helpers the benchmarks and the report scripts share: one-thread timing, ``LABEL=GLOB`` run groups, and a
report printer that turns bad input into one line. Tables, CSV/JSON and figures are in :mod:`n2ce_distill.reporting`.
"""

from __future__ import annotations

import argparse
import glob
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from ..errors import InputError

__all__ = ["single_thread", "label_pair", "run_groups", "print_report"]


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
