"""Where the shipped recipes and assets are, in a checkout and after ``pip install .`` alike.

A checkout (or an editable install) has them beside the package: ``<repo>/recipes``, ``<repo>/assets``. A
regular install puts them in ``<prefix>/share/n2ce-distill/`` (``[tool.setuptools.data-files]`` in
``pyproject.toml``), with the same layout, so a recipe's ``../assets/...`` resolves in both.
"""

from __future__ import annotations

import sys
from pathlib import Path

__all__ = ["SHIPPED_ROOTS", "shipped"]

SHIPPED_ROOTS = (Path(__file__).resolve().parents[1], Path(sys.prefix) / "share" / "n2ce-distill")


def shipped(*parts: str) -> Path:
    """``shipped("assets", "digits-teacher")``: the path under the first root that holds it (the checkout
    first); under the checkout's root when none does, so that the caller's own missing-path error names it."""
    found = (root.joinpath(*parts) for root in SHIPPED_ROOTS if root.joinpath(*parts).exists())
    return next(found, SHIPPED_ROOTS[0].joinpath(*parts))
