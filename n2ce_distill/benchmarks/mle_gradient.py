r"""MLE-gradient alignment: the expected N²CE gradient tends to the MLE gradient as M grows.

Setting (SPEC section 2): data ``q* = N((3, 3), I)``, noise ``q0 = N(0, I)``, model ``p_mu = N(mu, I)``
read through the critic ``l(x) = log p_mu(x) - log q0(x) = mu.x - |mu|^2 / 2``, so ``q0 e^l = p_mu`` is
normalised and the MLE (log-likelihood ascent) gradient is ``E_{q*} x - mu = (3, 3) - mu``. The N²CE
ascent direction is ``-grad_mu`` of :func:`~n2ce_distill.objectives.n2ce_loss`, i.e.

    g_M(mu) = int M / (M + r(x)) (q*(x) - p_mu(x)) (x - mu) dx,       r = e^l,

which tends to the MLE gradient with a bias O(1/M) in norm. Expectations are exact up to float64
round-off: both sides are integrated with a tensor-product Gauss-Hermite rule, fed to the library's
``n2ce_loss`` as per-node weights, and differentiated with autograd (so the benchmark checks the
library's loss, not a re-derivation of it).

Also shown: self-contrastive estimation (noise = a stop-gradient copy of the model, ``q = p_mu``), whose
N²CE gradient is exactly ``M/(M+1)`` times the MLE gradient (1/2 for NCE), and gradient-ascent
trajectories from ``mu = (1, 0)`` for each M against the MLE trajectory.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..objectives import n2ce_loss
from ..reporting import markdown_table, new_figure, save_figure
from .report import single_thread

__all__ = ["DATA_MEAN", "MS", "gauss_hermite_2d", "expected_gradient", "mle_gradient", "trajectory", "run"]

DATA_MEAN = (3.0, 3.0)
MS = (1.0, 10.0, 100.0, 1e3, 1e4)
START = (1.0, 0.0)  # the SPEC's reference point and the trajectories' start
ORIGIN = (0.0, 0.0)  # mu = q0: r = 1 everywhere, so g_M = M/(M+1) g_MLE exactly

Tensor = torch.Tensor


def gauss_hermite_2d(num_nodes: int) -> tuple[Tensor, Tensor]:
    """Nodes ``(num_nodes^2, 2)`` and weights (summing to 1) for ``E f(z)``, ``z ~ N(0, I_2)``."""
    z, w = np.polynomial.hermite_e.hermegauss(num_nodes)
    z, w = torch.from_numpy(z), torch.from_numpy(w / w.sum())
    grid = torch.stack(torch.meshgrid(z, z, indexing="ij"), dim=-1).reshape(-1, 2)
    return grid, torch.outer(w, w).reshape(-1)


def _critic(x: Tensor, mu: Tensor, noise_mean: Tensor) -> Tensor:
    # log N(x; mu, I) - log N(x; c, I); with c = 0 this is mu.x - |mu|^2/2
    return x @ (mu - noise_mean) - 0.5 * (mu @ mu - noise_mean @ noise_mean)


def expected_gradient(mu, M: float, quadrature: tuple[Tensor, Tensor], self_contrastive: bool = False) -> Tensor:
    """Exact expected N²CE ascent direction ``-d/dmu E[n2ce_loss]`` at ``mu`` (float64, shape (2,)).

    ``self_contrastive=True`` uses a stop-gradient copy of the model as the noise (``q = p_mu``).
    """
    nodes, weights = quadrature
    mu = torch.as_tensor(mu, dtype=torch.float64).clone().requires_grad_(True)
    noise_mean = mu.detach() if self_contrastive else torch.zeros(2, dtype=torch.float64)
    x_data = torch.tensor(DATA_MEAN, dtype=torch.float64) + nodes
    x_noise = noise_mean + nodes
    w = weights * len(weights)  # the loss takes mean(w * per-node loss) = sum of quadrature terms
    loss = n2ce_loss(_critic(x_data, mu, noise_mean), _critic(x_noise, mu, noise_mean), M,
                     weight_data=w, weight_noise=w)
    (grad,) = torch.autograd.grad(loss, mu)
    return -grad


def mle_gradient(mu) -> Tensor:
    """Analytic log-likelihood gradient ``E_{q*} x - mu``."""
    return torch.tensor(DATA_MEAN, dtype=torch.float64) - torch.as_tensor(mu, dtype=torch.float64)


def trajectory(M: float | None, steps: int, lr: float, quadrature) -> Tensor:
    """Gradient ascent ``mu <- mu + lr g(mu)`` from :data:`START`; ``M=None`` follows the MLE gradient."""
    mu = torch.tensor(START, dtype=torch.float64)
    path = [mu]
    for _ in range(steps):
        g = mle_gradient(mu) if M is None else expected_gradient(mu, M, quadrature)
        mu = mu + lr * g
        path.append(mu)
    return torch.stack(path)


def _rel_err(g: Tensor, ref: Tensor) -> float:
    return float((g - ref).norm() / ref.norm())


@single_thread()
def run(quick: bool, out: Path) -> str:
    num_nodes, steps, lr = (40, 15, 0.2) if quick else (120, 60, 0.1)
    quad = gauss_hermite_2d(num_nodes)
    g_mle = mle_gradient(START)
    mle_path = trajectory(None, steps, lr, quad)
    rows, errors, paths = [], {"start": [], "origin": []}, {}
    for M in MS:
        g = expected_gradient(START, M, quad)
        errors["start"].append(_rel_err(g, g_mle))
        errors["origin"].append(_rel_err(expected_gradient(ORIGIN, M, quad), mle_gradient(ORIGIN)))
        sce = expected_gradient(START, M, quad, self_contrastive=True)
        paths[M] = path = trajectory(M, steps, lr, quad)
        deviation = (path - mle_path).norm(dim=1)
        rows.append([f"{M:g}", f"({g[0]:.3f}, {g[1]:.3f})", errors["start"][-1], errors["origin"][-1],
                     f"{float(sce.norm() / g_mle.norm()):.4f}", f"{M / (M + 1):.4f}",
                     float(deviation.max()), f"({path[-1, 0]:.3f}, {path[-1, 1]:.3f})"])
    rows.append(["MLE", f"({g_mle[0]:.3f}, {g_mle[1]:.3f})", 0.0, 0.0, "1", "1", 0.0,
                 f"({mle_path[-1, 0]:.3f}, {mle_path[-1, 1]:.3f})"])
    headers = ["M", "g_N2CE at mu=(1,0)", "rel. err at (1,0)", "rel. err at (0,0)",
               "SCE ‖g‖/‖g_MLE‖", "exact M/(M+1)", f"max traj. dev. ({steps} steps)", "final mu"]

    fig, (ax_err, ax_path) = new_figure(2)
    ms = np.array(MS)
    ax_err.loglog(ms, errors["start"], "o-", label="at mu = (1, 0)")
    ax_err.loglog(ms, errors["origin"], "s-", label="at mu = (0, 0)  (= 1/(M+1))")
    ax_err.loglog(ms, errors["start"][0] / ms, "k:", label="~ 1/M")
    ax_err.set(xlabel="M", ylabel="||g_N2CE - g_MLE|| / ||g_MLE||", title="expected-gradient bias")
    ax_err.legend()
    for M, path in paths.items():
        ax_path.plot(path[:, 0], path[:, 1], ".-", ms=3, label=f"N2CE M={M:g}")
    ax_path.plot(mle_path[:, 0], mle_path[:, 1], "k--", lw=2, label="MLE")
    ax_path.plot(*DATA_MEAN, "k*", ms=12)
    ax_path.set(xlabel="mu_1", ylabel="mu_2", title=f"gradient ascent from (1, 0), lr {lr}, {steps} steps")
    ax_path.legend(fontsize=8)
    save_figure(fig, out, "mle_gradient.png")
    return markdown_table(headers, rows)
