"""The one exception type for bad input.

:class:`InputError` is what a user can fix: a recipe key, a file, a path, a shape, a command-line argument,
named in a one-line message. ``n2ce-distill`` prints it as that line and exits 2; any other exception is a bug
and keeps its traceback. It is a ``ValueError``, so code that catches those keeps working.
"""

from __future__ import annotations

__all__ = ["InputError"]


class InputError(ValueError):
    """Bad input, reported in one line that names the culprit (key, file, shape or argument)."""
