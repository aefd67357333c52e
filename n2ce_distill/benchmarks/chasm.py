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

Report: the KL estimates, the self-normalisation ``log E_q e^l`` of each fitted model (0 for a proper
log-ratio: it separates "right estimate, right ratio" from "right number by accident"), and the
estimates of four methods at d = 160 over three learning rates, since under a fixed step budget the
ranking of the methods depends on how far each gets (see benchmarks/RESULTS.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..multistage import MultiStageCritic, multistage_loss, waymark_coefficients
from ..objectives import build_objective
from .report import markdown_table, new_figure, save_figure, single_thread

__all__ = ["QuadraticCritic", "Method", "METHODS", "Problem", "block_correlation", "sample_p", "fit", "evaluate",
           "run"]

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
LR = 3e-3  # Adam learning rate shared by every method (see the sensitivity table in the report)
SENSITIVITY_LRS = (1e-3, 3e-3, 1e-2)
SENSITIVITY_METHODS = ("NCE", "N2CE M=100", "N2CE M=1000", "TRE K=4 (NCE)")


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


@dataclass(frozen=True)
class Problem:
    """One chasm instance: training samples from p and q, and fresh test samples from both."""
    dim: int
    kl: float
    x_data: Tensor
    x_noise: Tensor
    x_test: Tensor
    x_test_noise: Tensor

    @classmethod
    def draw(cls, dim: int, num: int, generator: torch.Generator) -> "Problem":
        kl = dim / 4
        rho = block_correlation(dim, kl)
        return cls(dim, kl, sample_p(num, dim, rho, generator), torch.randn(num, dim, generator=generator),
                   sample_p(num, dim, rho, generator), torch.randn(num, dim, generator=generator))


def evaluate(method: Method, problem: Problem, epochs: int, lr: float, batch_size: int,
             generator: torch.Generator) -> tuple[float, float]:
    """Fit ``method`` and return ``(E_p l, log E_q e^l)``: the KL estimate and the self-normalisation
    (0 for a proper log-ratio; both expectations on fresh samples)."""
    torch.manual_seed(0)
    critic = fit(method, problem.x_data, problem.x_noise, epochs, lr, batch_size, generator)
    with torch.no_grad():
        log_z = torch.logsumexp(critic(problem.x_test_noise), 0) - math.log(len(problem.x_test_noise))
        return float(critic(problem.x_test).mean()), float(log_z)


def _cell(est: float, kl: float) -> str:
    return f"{est:.2f} ({100 * (est / kl - 1):+.1f}%)"


@single_thread()
def run(quick: bool, out: Path) -> str:
    if quick:
        dims, num, epochs = (40,), 10_000, 8
    else:
        dims, num, epochs = (40, 80, 160, 320), 100_000, 20
    batch_size, lr = 512, LR
    generator = torch.Generator().manual_seed(0)
    estimates = {m.label: [] for m in METHODS}
    log_zs = {m.label: [] for m in METHODS}
    problems = {}
    for dim in dims:
        problems[dim] = problem = Problem.draw(dim, num, generator)
        for method in METHODS:
            est, log_z = evaluate(method, problem, epochs, lr, batch_size, generator)
            estimates[method.label].append(est)
            log_zs[method.label].append(log_z)
    truths = [d / 4 for d in dims]
    headers = ["method"] + [f"d={d} (KL {kl:g})" for d, kl in zip(dims, truths)]
    main = markdown_table(headers, [[label] + [_cell(e, kl) for e, kl in zip(ests, truths)]
                                    for label, ests in estimates.items()])
    norm = markdown_table(["method"] + [f"d={d}" for d in dims],
                          [[label] + [f"{v:+.2f}" for v in values] for label, values in log_zs.items()])

    # learning-rate sensitivity at the acceptance dimension (d = 160; the quick dimension in quick mode)
    dim = 160 if 160 in problems else dims[-1]
    column = dims.index(dim)
    sens_rows = []
    for label in SENSITIVITY_METHODS:
        method = next(m for m in METHODS if m.label == label)
        cells = [_cell(evaluate(method, problems[dim], epochs, other, batch_size, generator)[0], dim / 4)
                 if other != lr else _cell(estimates[label][column], dim / 4) for other in SENSITIVITY_LRS]
        sens_rows.append([label] + cells)
    sens = markdown_table(["method"] + [f"lr {v:g}" for v in SENSITIVITY_LRS], sens_rows)

    fig, (ax,) = new_figure(1, width=6.5, height=5.0)
    for label, ests in estimates.items():
        ax.plot(truths, ests, "s--" if "K=" in label else "o-", label=label)
    ax.plot(truths, truths, "k:", lw=2, label="truth")
    ax.set(xlabel="true KL (nats)", ylabel="estimated KL = E_p l (nats)",
           title=f"density chasm, n={num} per side, {epochs} epochs, Adam lr {lr:g}")
    ax.legend(fontsize=7)
    save_figure(fig, out, "chasm.png")
    return (f"{main}\n\nn = {num} samples per side, batch {batch_size}, {epochs} epochs of Adam (lr {lr:g}, "
            f"cosine decay) for every method; estimate = E_p l on {num} fresh samples; cells: estimate "
            f"(signed relative error).\n\nSelf-normalisation log E_q e^l on {num} fresh noise samples "
            f"(0 for a proper log-ratio):\n\n{norm}\n\nLearning-rate sensitivity at d={dim} "
            f"(KL {dim / 4:g}), same {epochs} epochs:\n\n{sens}")
