"""Sample-quality metrics for 2-D toys: sliced Wasserstein-2, exact NLL under 8 Gaussians, mode coverage.

:func:`toy_report` is what ``n2ce-distill fid --ref 8gaussians`` (or ``spirals``, ``checkerboard``) computes for
each input: the 2-D toys have no feature extractor, so their FID stand-in is SW2 against the toy itself.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from .data import TOY_DISTRIBUTIONS, EightGaussians
from .errors import InputError

__all__ = ["sliced_wasserstein2", "eight_gaussians_report", "toy_report", "load_points"]

NUM_PROJECTIONS = 256  # fixed directions: the metric is deterministic given the two sample sets
REFERENCE_SEED = 12345  # the toy's reference sample: the same for every input, unrelated to their seeds


def sliced_wasserstein2(x: torch.Tensor, y: torch.Tensor, num_projections: int = NUM_PROJECTIONS) -> float:
    """``SW2 = sqrt(mean_theta W2^2(theta^T x, theta^T y))`` over evenly spaced fixed directions.

    In 1-D, W2 between equal-size empirical measures pairs sorted samples; unequal sizes are matched
    on a common grid of quantiles.
    """
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"sliced_wasserstein2: expected (N, D) and (M, D) points, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[1] != 2:
        raise ValueError("sliced_wasserstein2: evenly spaced directions are defined for 2-D points")
    angles = torch.arange(num_projections, dtype=torch.float64) * math.pi / num_projections
    theta = torch.stack([angles.cos(), angles.sin()], dim=1)
    px, py = (x.double() @ theta.T).sort(0).values, (y.double() @ theta.T).sort(0).values
    n = min(len(px), len(py))
    q = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    qx = px[(q * len(px)).long()]
    qy = py[(q * len(py)).long()]
    return float((qx - qy).square().mean().sqrt())


def eight_gaussians_report(samples: torch.Tensor, reference: torch.Tensor, dist: EightGaussians | None = None) -> dict[str, float]:
    """SW2 against reference samples, NLL ``-E log p(x)`` under the exact density, and mode coverage.

    A sample belongs to its nearest centre when within 3 std of it; ``modes_covered`` counts centres
    holding at least 1/4 of their fair share, ``mode_balance`` is the smallest share over the fair share.
    """
    dist = dist or EightGaussians()
    centers = dist.centers.to(samples.dtype)
    dist_to_centre = torch.cdist(samples.float(), centers.float())
    nearest, index = dist_to_centre.min(dim=1)
    inside = nearest < 3 * dist.std
    shares = torch.bincount(index[inside], minlength=len(centers)).double() / len(samples)
    fair = 1.0 / len(centers)
    return {
        "sw2": sliced_wasserstein2(samples, reference),
        "nll": float(-dist.log_prob(samples).double().mean()),
        "modes_covered": int((shares >= fair / 4).sum()),
        "mode_balance": float(shares.min() / fair),
        "off_mode_fraction": float(1 - inside.double().mean()),
    }


def toy_report(samples: torch.Tensor, name: str) -> dict[str, float]:
    """Metrics of 2-D ``samples`` against the toy ``name`` (a key of ``TOY_DISTRIBUTIONS``): SW2 against a
    reference sample of the same size drawn with a fixed seed; for 8 Gaussians also the exact NLL and the mode
    coverage of :func:`eight_gaussians_report`."""
    if name not in TOY_DISTRIBUTIONS:
        raise InputError(f"unknown 2-D toy {name!r}; choose from {sorted(TOY_DISTRIBUTIONS)}")
    if samples.dim() != 2 or samples.shape[1] != 2 or len(samples) == 0:
        raise InputError(f"the 2-D toy {name!r} needs (N, 2) points, N >= 1, got samples of shape {tuple(samples.shape)}")
    bad = int((~torch.isfinite(samples)).any(dim=1).sum())
    if bad:
        raise InputError(f"{bad} of {len(samples)} points are not finite (nan or inf)")
    dist = TOY_DISTRIBUTIONS[name]()
    reference = dist.sample(len(samples), torch.Generator().manual_seed(REFERENCE_SEED))
    if isinstance(dist, EightGaussians):
        return eight_gaussians_report(samples, reference, dist)
    return {"sw2": sliced_wasserstein2(samples, reference)}


def load_points(path: str | Path) -> torch.Tensor:
    """(N, 2) points from a ``.npy`` file, or from the ``samples.npy`` that ``n2ce-distill sample`` writes into
    its output folder (read without pickles)."""
    path = Path(path)
    file = path / "samples.npy" if path.is_dir() else path
    if not file.is_file() or file.suffix != ".npy":
        raise InputError(f"input {str(path)!r}: 2-D points are read from a .npy file or a folder holding samples.npy")
    try:
        array = np.load(file, allow_pickle=False)
    except ValueError as error:  # a pickled or damaged array
        raise InputError(f"input {str(file)!r}: not a plain .npy array ({error})") from None
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise InputError(f"input {str(file)!r}: points must be real numbers, got dtype {array.dtype}")
    return torch.from_numpy(array).float()
