"""Sample-quality metrics for 2-D toys: sliced Wasserstein-2, exact NLL under 8 Gaussians, mode coverage."""

from __future__ import annotations

import math

import torch

from .data import EightGaussians

__all__ = ["sliced_wasserstein2", "eight_gaussians_report"]

NUM_PROJECTIONS = 256  # fixed directions: the metric is deterministic given the two sample sets


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
