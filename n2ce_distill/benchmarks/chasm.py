r"""Density chasm (Rhodes et al. 2020, TRE): estimate a KL of d/4 nats with a quadratic log-ratio model.

``p = N(0, S)`` with ``S`` block-diagonal in 2x2 blocks of correlation ``rho = sqrt(1 - exp(-4 KL / d))``,
``q = N(0, I)``, so ``KL(p||q) = -(d/4) log(1 - rho^2) = d/4`` nats (10, 20, 40, 80 for d = 40 .. 320) and
the true log-ratio ``log p/q = -x^T (S^-1 - I) x / 2 + d/4`` is exactly quadratic. The model

    l(x) = -x^T A x / 2 + d * beta,        A symmetric, both initialised at 0,

is fitted on n samples per side (batch 512, Adam, cosine learning-rate decay, the same budget for every
method) and read out as the KL estimate ``E_p l`` on fresh samples from p.

Why ``d * beta`` rather than a bare offset ``b``: the log-normaliser is extensive in d (it is d/4 here).
Adam moves every parameter by about the learning rate per step, so a bare scalar ``b`` crawls towards
d/4 while the d^2 entries of A move ``tr(A S)`` d times faster; the optimiser then fakes the offset with a
wrong A. Scaling the offset by d gives it the same per-step reach as A. The choice is the same for every
method.

Methods: NCE, N²CE with M in {10, 100, 1000}, NWJ (the M -> inf limit), TRE with K in {2, 4, 8} (NCE on
adjacent waymarks ``x_k = sqrt(1-a_k^2) x_data + a_k x_noise``, linear ``a_k``, one quadratic head per
stage, ``log r = sum_k l_k``) and N²CE(M=100) with K=4 stages. Single-ratio methods are the K=1 case of
the same code path (:func:`~n2ce_distill.multistage.multistage_loss`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..multistage import MultiStageCritic, multistage_loss, waymark_coefficients
from ..objectives import build_objective
from .report import markdown_table, new_figure, save_figure

__all__ = ["QuadraticCritic", "Method", "METHODS", "sample_p", "fit", "run"]

Tensor = torch.Tensor


class QuadraticCritic(nn.Module):
    """``l(x) = -x^T A x / 2 + d * beta`` with ``A = (W + W^T) / 2``; starts at ``l = 0``."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.weight = nn.Parameter(torch.zeros(dim, dim))
        self.beta = nn.Parameter(torch.zeros(()))

    def forward(self, x: Tensor) -> Tensor:
        a = 0.5 * (self.weight + self.weight.T)
        return -0.5 * ((x @ a) * x).sum(-1) + self.dim * self.beta


@dataclass(frozen=True)
class Method:
    label: str
    objective: str
    M: float | None = None
    stages: int = 1

    def build(self):
        return build_objective(self.objective) if self.M is None else build_objective(self.objective, M=self.M)


METHODS = (
    Method("NCE", "nce"),
    Method("N2CE M=10", "n2ce", 10.0),
    Method("N2CE M=100", "n2ce", 100.0),
    Method("N2CE M=1000", "n2ce", 1000.0),
    Method("NWJ", "nwj"),
    Method("TRE K=2 (NCE)", "nce", None, 2),
    Method("TRE K=4 (NCE)", "nce", None, 4),
    Method("TRE K=8 (NCE)", "nce", None, 8),
    Method("N2CE M=100, K=4", "n2ce", 100.0, 4),
)


def block_correlation(dim: int, kl: float) -> float:
    """``rho`` such that ``p = N(0, S)`` has ``KL(p || N(0, I)) = kl`` in ``dim / 2`` 2x2 blocks."""
    return math.sqrt(1.0 - math.exp(-4.0 * kl / dim))


def sample_p(num: int, dim: int, rho: float, generator: torch.Generator) -> Tensor:
    """``num`` samples of ``N(0, S)`` (S: 2x2 blocks of correlation rho)."""
    z = torch.randn(num, dim // 2, 2, generator=generator)
    second = rho * z[..., 0] + math.sqrt(1.0 - rho * rho) * z[..., 1]
    return torch.stack([z[..., 0], second], dim=-1).reshape(num, dim)


def fit(method: Method, x_data: Tensor, x_noise: Tensor, epochs: int, lr: float, batch_size: int,
        generator: torch.Generator) -> MultiStageCritic:
    """Train one quadratic head per stage on the method's objective; Adam with cosine decay."""
    dim = x_data.shape[1]
    critic = MultiStageCritic([QuadraticCritic(dim) for _ in range(method.stages)])
    objective, a = method.build(), waymark_coefficients(method.stages)
    opt = torch.optim.Adam(critic.parameters(), lr=lr)
    steps_per_epoch = len(x_data) // batch_size
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * steps_per_epoch)
    for _ in range(epochs):
        # independent shuffles: each batch pairs data and noise at random (the waymarks' coupling)
        idx_d = torch.randperm(len(x_data), generator=generator)
        idx_n = torch.randperm(len(x_noise), generator=generator)
        for s in range(steps_per_epoch):
            batch = slice(s * batch_size, (s + 1) * batch_size)
            loss = multistage_loss(critic, objective, x_data[idx_d[batch]], x_noise[idx_n[batch]], a)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
    return critic


def run(quick: bool, out: Path, *, dims: tuple[int, ...] | None = None, epochs: int | None = None,
        lr: float = 1e-2) -> str:
    if quick:
        dims, num, epochs = dims or (40,), 20_000, epochs or 6
    else:
        dims, num, epochs = dims or (40, 80, 160, 320), 100_000, epochs or 20
    batch_size = 512
    generator = torch.Generator().manual_seed(0)
    estimates = {m.label: [] for m in METHODS}
    truths = [d / 4 for d in dims]
    for dim, kl in zip(dims, truths):
        rho = block_correlation(dim, kl)
        x_data = sample_p(num, dim, rho, generator)
        x_noise = torch.randn(num, dim, generator=generator)
        x_test = sample_p(num, dim, rho, generator)
        for method in METHODS:
            torch.manual_seed(0)
            critic = fit(method, x_data, x_noise, epochs, lr, batch_size, generator)
            with torch.no_grad():
                estimates[method.label].append(float(critic(x_test).mean()))
    headers = ["method"] + [f"d={d} (KL {kl:g})" for d, kl in zip(dims, truths)]
    rows = [[label] + [f"{est:.2f} ({100 * (est / kl - 1):+.1f}%)" for est, kl in zip(ests, truths)]
            for label, ests in estimates.items()]

    fig, (ax,) = new_figure(1, width=6.5, height=5.0)
    for label, ests in estimates.items():
        ax.plot(truths, ests, "o-" if "TRE" not in label and "K=" not in label else "s--", label=label)
    ax.plot(truths, truths, "k:", lw=2, label="truth")
    ax.set(xlabel="true KL (nats)", ylabel="estimated KL = E_p l (nats)",
           title=f"density chasm, n={num} per side, {epochs} epochs, Adam lr {lr:g}")
    ax.legend(fontsize=7)
    save_figure(fig, out, "chasm.png")
    setup = (f"n = {num} samples per side, batch {batch_size}, {epochs} epochs of Adam (lr {lr:g}, cosine decay) "
             f"for every method; estimate = E_p l on {num} fresh samples; cells: estimate (signed relative error).")
    return markdown_table(headers, rows) + "\n\n" + setup
