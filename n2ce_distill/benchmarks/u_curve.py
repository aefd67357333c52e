r"""U-curve: mean squared error of the finite-sample N²CE gradient against M, for several n.

Setting: 5-D Gaussians, data ``q* = N(1, I_5)``, noise ``q0 = N(0, I_5)``, model ``p_mu = N(mu, I_5)``
through the critic ``l(x) = mu.x - |mu|^2/2`` (as in :mod:`.mle_gradient`), evaluated at
``mu = 0.75 * 1`` (three quarters of the way from the noise to the data, where ``r = e^l`` is spread
enough for the variance to matter). With ``n`` samples per side, the N²CE gradient estimate
(``-grad_mu`` of the library's ``n2ce_loss`` on the two batches) is compared with the analytic MLE
gradient ``1 - mu``:

    MSE(M, n) = E ||g_hat_M - g_MLE||^2 = ||bias_M||^2 + trace Cov(g_hat_M),

bias O(1/M) in norm (it shrinks as M grows), variance growing with M (the noise-side weight
``M r / (M + r)`` is capped by M, and tends to the heavy-tailed importance weight ``r`` as M -> inf).
The minimiser ``M*`` is reported against ``sqrt(n)``; the paper predicts ``M* <= C sqrt(n)`` with C in
about 1..10. All M share the same samples in each repetition (common random numbers), so differences
between M are measured far more precisely than the MSE itself.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from ..objectives import n2ce_loss
from ..reporting import fmt, markdown_table, new_figure, save_figure
from .report import single_thread

__all__ = ["DIM", "DATA_SHIFT", "EVAL_FRACTION", "NS", "m_grid", "gradient_mse", "best_M", "run"]

DIM = 5
DATA_SHIFT = 1.0  # data mean = DATA_SHIFT * ones(DIM)
EVAL_FRACTION = 0.75  # gradient evaluated at mu = EVAL_FRACTION * data mean
NS = (64, 256, 1024, 4096)
CHUNK = 1 << 20  # samples per side processed at once (memory ~ 100 MB in float64)

Tensor = torch.Tensor


def m_grid(per_decade: int = 4, lo: int = -1, hi: int = 7) -> Tensor:
    """Log-spaced M values from 10^lo to 10^hi."""
    return torch.logspace(lo, hi, (hi - lo) * per_decade + 1, dtype=torch.float64)


def _batch_gradients(x_data: Tensor, x_noise: Tensor, mu: Tensor, M: float) -> Tensor:
    """N²CE ascent directions ``(R, DIM)``, one per repetition, from batches ``(R, n, DIM)``."""
    mu_rep = mu.expand(x_data.shape[0], DIM).clone().requires_grad_(True)
    half_sq = 0.5 * (mu_rep * mu_rep).sum(-1, keepdim=True)
    ld = torch.einsum("rnd,rd->rn", x_data, mu_rep) - half_sq
    ln = torch.einsum("rnd,rd->rn", x_noise, mu_rep) - half_sq
    # the loss averages over all R*n elements; times R makes each row's gradient its own batch's
    loss = n2ce_loss(ld, ln, M) * x_data.shape[0]
    (grad,) = torch.autograd.grad(loss, mu_rep)
    return -grad


def gradient_mse(n: int, reps: int, Ms: Tensor, generator: torch.Generator) -> Tensor:
    """``E ||g_hat_M - g_MLE||^2`` for each M, averaged over ``reps`` independent batch pairs of size n."""
    data_mean = torch.full((DIM,), DATA_SHIFT, dtype=torch.float64)
    mu = EVAL_FRACTION * data_mean
    g_mle = data_mean - mu
    total = torch.zeros(len(Ms), dtype=torch.float64)
    done = 0
    while done < reps:
        r = min(reps - done, max(1, CHUNK // n))
        x_data = data_mean + torch.randn(r, n, DIM, generator=generator, dtype=torch.float64)
        x_noise = torch.randn(r, n, DIM, generator=generator, dtype=torch.float64)
        for i, M in enumerate(Ms.tolist()):
            total[i] += (_batch_gradients(x_data, x_noise, mu, M) - g_mle).square().sum()
        done += r
    return total / reps


def best_M(Ms: Tensor, mse: Tensor) -> tuple[float, float, float]:
    """``(M*, lo, hi)``: the minimiser (parabola through the grid minimum and its neighbours in
    log-log) and the range of grid M whose MSE is within 5% of the minimum (the flat bottom)."""
    log_m, log_e = Ms.log().numpy(), mse.log().numpy()
    i = int(np.argmin(log_e))
    m_star = float(Ms[i])
    if 0 < i < len(Ms) - 1:
        a, b, _ = np.polyfit(log_m[i - 1:i + 2], log_e[i - 1:i + 2], 2)
        if a > 0:
            m_star = float(np.exp(np.clip(-b / (2 * a), log_m[i - 1], log_m[i + 1])))
    near = Ms[mse <= 1.05 * mse.min()]
    return m_star, float(near.min()), float(near.max())


@single_thread()
def run(quick: bool, out: Path) -> str:
    reps = 100 if quick else 4000
    Ms = m_grid(per_decade=2 if quick else 4)
    generator = torch.Generator().manual_seed(0)
    curves, rows, stars = {}, [], []
    for n in NS:
        mse = curves[n] = gradient_mse(n, reps, Ms, generator)
        m_star, lo, hi = best_M(Ms, mse)
        stars.append(m_star)
        at_one = float(mse[torch.argmin((Ms.log()).abs())])
        rows.append([n, math.sqrt(n), m_star, m_star / math.sqrt(n), f"{fmt(lo)} .. {fmt(hi)}",
                     at_one, float(mse.min()), float(mse[-1])])
    slope = float(np.polyfit(np.log(NS), np.log(stars), 1)[0])
    headers = ["n", "sqrt(n)", "M*", "C = M*/sqrt(n)", "M with MSE <= 1.05 min", "MSE at M=1 (NCE)",
               "MSE at M*", f"MSE at M={fmt(Ms[-1])}"]

    fig, (ax,) = new_figure(1, width=6.0, height=4.5)
    for n, mse in curves.items():
        line, = ax.loglog(Ms.numpy(), mse.numpy(), ".-", label=f"n = {n}")
        ax.axvline(math.sqrt(n), color=line.get_color(), ls=":", lw=1)
    ax.set(xlabel="M", ylabel="E ||g_N2CE - g_MLE||^2",
           title=f"{DIM}-D Gaussian, {reps} reps (dotted: M = sqrt(n))")
    ax.legend()
    save_figure(fig, out, "u_curve.png")
    return (markdown_table(headers, rows)
            + f"\n\nFitted M* ~ n^{slope:.2f} (the paper's bound M* <= C sqrt(n) has exponent 0.5).")
