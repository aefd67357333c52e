r"""Choosing the N²CE noise magnification M.

With n samples per estimate (e.g. the batch size), the squared error of the N²CE gradient against the
MLE gradient splits into a bias, which shrinks like O(1/M^2) (the weights ``M/(M+r)`` tend to 1), and a
variance that can grow up to O(M^2/n) (the noise term reweights each sample by up to M, i.e. becomes an
importance-sampling estimate with weights ``r``). The sum is U-shaped in M, with its minimum at about
``M ~ C sqrt(n)``, C in 1..10; a smooth ratio saturates the variance and pushes the best M up.
The paper picks M = 100 at batch 128 (DxMI, C ~ 8.8) and M = 50 at batch 256 (SiD, C ~ 3.1).
"""

from __future__ import annotations

import math

__all__ = ["suggest_M"]


def suggest_M(n: float, C: float = 3.0) -> float:
    """Rule-of-thumb magnification ``C * sqrt(n)`` for n samples per estimate (batch size).

    ``suggest_M(128) ~ 34``, ``suggest_M(256) ~ 48``; raise C (up to ~10) for smooth, well-behaved
    ratios, lower it when the critic's ratio is spiky (high variance).
    """
    if not (n >= 1 and math.isfinite(n)):
        raise ValueError(f"n (samples per estimate) must be a finite number >= 1, got {n!r}")
    if not (C > 0 and math.isfinite(C)):
        raise ValueError(f"C must be a finite number > 0, got {C!r}")
    return float(C) * math.sqrt(n)
