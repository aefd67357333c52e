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

Report: the KL estimates beside the exact log-ratio's reading on the same samples (the truth row), the
self-normalisation ``log E_q e^l`` of each fitted model beside the truth's (``E_q e^l = 1`` for a proper
ratio, but on 100k samples the exact ratio itself reads -18..-27 at d = 160: the sample mean of ``e^l`` is
dominated by rare large ratios, so only the comparison with the truth row means anything), ``E_p l``
during training (every ``TRACK_EVERY`` steps: the plot ``chasm_steps.png``), the estimates of four methods
at d = 160 over three learning rates (under a fixed step budget the ranking depends on how far each gets),
and N²CE at d = 160 with samples reused against fresh samples every step, in the main batch and in 8x
larger ones: whether an overshoot comes from reusing 100k samples or from the batch-level variance of
large M (see benchmarks/RESULTS.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from ..multistage import MultiStageCritic, multistage_loss, waymark_coefficients
from ..objectives import build_objective
from ..reporting import markdown_table, new_figure, save_figure
from .report import single_thread

__all__ = ["QuadraticCritic", "Method", "METHODS", "Problem", "block_correlation", "block_covariance",
           "true_log_ratio", "sample_p", "epoch_batches", "fresh_batches", "fit", "evaluate", "run"]

Tensor = torch.Tensor


class QuadraticCritic(nn.Module):
    """``l(x) = -x^T A x / 2 + d * beta`` with ``A = (W + W^T) / 2``; starts at ``l = 0``.

    ``linear=True`` adds ``+ c^T x`` (``c`` from 0): the log-ratio of any two Gaussians, not only of two
    centred ones.
    """

    def __init__(self, dim: int, linear: bool = False):
        super().__init__()
        self.dim = dim
        self.weight = nn.Parameter(torch.zeros(dim, dim))
        self.beta = nn.Parameter(torch.zeros(()))
        self.shift = nn.Parameter(torch.zeros(dim)) if linear else None

    def forward(self, x: Tensor) -> Tensor:
        a = 0.5 * (self.weight + self.weight.T)
        out = -0.5 * ((x @ a) * x).sum(-1) + self.dim * self.beta
        return out if self.shift is None else out + x @ self.shift


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
VARIANCE_METHODS = ("N2CE M=100", "N2CE M=1000")
TRACK_EVERY = 100  # steps between readings of E_p l during a fit (the trajectory plot)
TRACK_SAMPLES = 10_000  # samples of p those readings average over
TRUTH = "truth (exact log p/q)"


def block_correlation(dim: int, kl: float) -> float:
    """``rho`` such that ``p = N(0, S)`` has ``KL(p || N(0, I)) = kl`` in ``dim / 2`` 2x2 blocks."""
    return math.sqrt(1.0 - math.exp(-4.0 * kl / dim))


def block_covariance(dim: int, rho: float) -> Tensor:
    """The covariance ``S`` of ``p``: ``dim / 2`` 2x2 blocks ``[[1, rho], [rho, 1]]`` (float64)."""
    block = torch.tensor([[1.0, rho], [rho, 1.0]], dtype=torch.float64)
    return torch.block_diag(*[block] * (dim // 2))


def true_log_ratio(x: Tensor, rho: float) -> Tensor:
    """``log p(x) / q(x)`` for ``p = N(0, S)``, ``q = N(0, I)``, block by block (as ``x``'s dtype)."""
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    first, second = pairs[..., 0], pairs[..., 1]
    in_p = (first.square() - 2 * rho * first * second + second.square()) / (1 - rho * rho)
    quadratic = (in_p - first.square() - second.square()).sum(-1)
    return -0.5 * quadratic - 0.5 * pairs.shape[-2] * math.log(1 - rho * rho)


def sample_p(num: int, dim: int, rho: float, generator: torch.Generator) -> Tensor:
    """``num`` samples of ``N(0, S)`` (S: 2x2 blocks of correlation rho)."""
    z = torch.randn(num, dim // 2, 2, generator=generator)
    second = rho * z[..., 0] + math.sqrt(1.0 - rho * rho) * z[..., 1]
    return torch.stack([z[..., 0], second], dim=-1).reshape(num, dim)


def epoch_batches(x_data: Tensor, x_noise: Tensor, batch_size: int, epochs: int,
                  generator: torch.Generator) -> Iterator[tuple[Tensor, Tensor]]:
    """``epochs`` passes over fixed samples; independent shuffles pair data and noise at random (the
    waymarks' coupling)."""
    steps_per_epoch = len(x_data) // batch_size
    for _ in range(epochs):
        idx_d = torch.randperm(len(x_data), generator=generator)
        idx_n = torch.randperm(len(x_noise), generator=generator)
        for s in range(steps_per_epoch):
            batch = slice(s * batch_size, (s + 1) * batch_size)
            yield x_data[idx_d[batch]], x_noise[idx_n[batch]]


def fresh_batches(dim: int, batch_size: int, steps: int, generator: torch.Generator) -> Iterator[tuple[Tensor, Tensor]]:
    """``steps`` batches of new samples from p and q: no sample is seen twice, so nothing can be overfitted."""
    rho = block_correlation(dim, dim / 4)
    for _ in range(steps):
        yield sample_p(batch_size, dim, rho, generator), torch.randn(batch_size, dim, generator=generator)


def fit(method: Method, dim: int, batches: Iterator[tuple[Tensor, Tensor]], steps: int, lr: float,
        track: Tensor | None = None) -> tuple[MultiStageCritic, list[float]]:
    """Train one quadratic head per stage on the method's objective over ``steps`` batches; Adam with
    cosine decay. With ``track`` (samples of p), also returns ``E_p l`` on them every ``TRACK_EVERY`` steps
    and at the end."""
    critic = MultiStageCritic([QuadraticCritic(dim) for _ in range(method.stages)])
    objective, a = method.build(), waymark_coefficients(method.stages)
    opt = torch.optim.Adam(critic.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    trajectory = []
    for step, (x_data, x_noise) in enumerate(batches):
        if track is not None and step % TRACK_EVERY == 0:
            with torch.no_grad():
                trajectory.append(float(critic(track).mean()))
        loss = multistage_loss(critic, objective, x_data, x_noise, a)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
    if track is not None:
        with torch.no_grad():
            trajectory.append(float(critic(track).mean()))
    return critic, trajectory


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

    @property
    def rho(self) -> float:
        return block_correlation(self.dim, self.kl)

    def readout(self, log_ratio) -> tuple[float, float]:
        """``(E_p l, log E_q e^l)`` of a log-ratio function on the fresh test samples."""
        with torch.no_grad():
            log_z = torch.logsumexp(log_ratio(self.x_test_noise), 0) - math.log(len(self.x_test_noise))
            return float(log_ratio(self.x_test).mean()), float(log_z)


def evaluate(method: Method, problem: Problem, epochs: int, lr: float, batch_size: int,
             generator: torch.Generator) -> tuple[float, float, list[float]]:
    """Fit ``method`` and return ``(E_p l, log E_q e^l, trajectory)``: the KL estimate and the
    self-normalisation on fresh samples, and ``E_p l`` every ``TRACK_EVERY`` steps during the fit."""
    torch.manual_seed(0)
    steps = epochs * (len(problem.x_data) // batch_size)
    batches = epoch_batches(problem.x_data, problem.x_noise, batch_size, epochs, generator)
    critic, trajectory = fit(method, problem.dim, batches, steps, lr, track=problem.x_test[:TRACK_SAMPLES])
    return (*problem.readout(critic), trajectory)


def _cell(est: float, kl: float) -> str:
    return f"{est:.2f} ({100 * (est / kl - 1):+.1f}%)"


def _variance_table(problem: Problem, epochs: int, lr: float, batch_size: int, main: dict[str, float],
                    generator: torch.Generator) -> str:
    """N²CE at large M with the samples reused (the main run), never reused, and never reused in 8x larger
    batches, over the same number of steps: reuse (overfitting) against batch-level variance."""
    steps = epochs * (len(problem.x_data) // batch_size)
    rows = []
    for label in VARIANCE_METHODS:
        method = next(m for m in METHODS if m.label == label)
        rows.append([label, f"reused (n = {len(problem.x_data)}), batch {batch_size}", _cell(main[label], problem.kl)])
        for batch in (batch_size, 8 * batch_size):
            torch.manual_seed(0)
            critic, _ = fit(method, problem.dim, fresh_batches(problem.dim, batch, steps, generator), steps, lr)
            rows.append([label, f"fresh every step, batch {batch}", _cell(problem.readout(critic)[0], problem.kl)])
    return markdown_table(["method", "samples", "E_p l (error)"], rows)


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
    trajectories = {m.label: {} for m in METHODS}
    problems, truth = {}, []
    for dim in dims:
        problems[dim] = problem = Problem.draw(dim, num, generator)
        truth.append(problem.readout(lambda x: true_log_ratio(x, problem.rho)))
        for method in METHODS:
            est, log_z, trajectory = evaluate(method, problem, epochs, lr, batch_size, generator)
            estimates[method.label].append(est)
            log_zs[method.label].append(log_z)
            trajectories[method.label][dim] = trajectory
    kls = [d / 4 for d in dims]
    headers = ["method"] + [f"d={d} (KL {kl:g})" for d, kl in zip(dims, kls)]
    main = markdown_table(headers, [[TRUTH] + [_cell(e, kl) for (e, _), kl in zip(truth, kls)]] +
                          [[label] + [_cell(e, kl) for e, kl in zip(ests, kls)] for label, ests in estimates.items()])
    norm = markdown_table(["method"] + [f"d={d}" for d in dims],
                          [[TRUTH] + [f"{z:+.2f}" for _, z in truth]] +
                          [[label] + [f"{v:+.2f}" for v in values] for label, values in log_zs.items()])

    # learning-rate sensitivity and reuse-vs-variance at the acceptance dimension (d = 160; quick: its dimension)
    dim = 160 if 160 in problems else dims[-1]
    column = dims.index(dim)
    sens_rows = []
    for label in SENSITIVITY_METHODS:
        method = next(m for m in METHODS if m.label == label)
        cells = [_cell(evaluate(method, problems[dim], epochs, other, batch_size, generator)[0], dim / 4)
                 if other != lr else _cell(estimates[label][column], dim / 4) for other in SENSITIVITY_LRS]
        sens_rows.append([label] + cells)
    sens = markdown_table(["method"] + [f"lr {v:g}" for v in SENSITIVITY_LRS], sens_rows)
    variance = _variance_table(problems[dim], epochs, lr, batch_size,
                               {label: estimates[label][column] for label in VARIANCE_METHODS}, generator)

    fig, (ax,) = new_figure(1, width=6.5, height=5.0)
    for label, ests in estimates.items():
        ax.plot(kls, ests, "s--" if "K=" in label else "o-", label=label)
    ax.plot(kls, kls, "k:", lw=2, label="truth")
    ax.set(xlabel="true KL (nats)", ylabel="estimated KL = E_p l (nats)",
           title=f"density chasm, n={num} per side, {epochs} epochs, Adam lr {lr:g}")
    ax.legend(fontsize=7)
    save_figure(fig, out, "chasm.png")
    fig, axes = new_figure(len(dims), width=4.2, height=3.6)
    for ax, panel in zip(axes, dims):
        for label, by_dim in trajectories.items():
            ax.plot([TRACK_EVERY * i for i in range(len(by_dim[panel]))], by_dim[panel], "--" if "K=" in label else "-",
                    label=label)
        ax.axhline(panel / 4, color="k", ls=":", lw=2, label="truth")
        ax.set(xlabel="training step", title=f"d={panel} (KL {panel / 4:g})")
    axes[0].set_ylabel(f"E_p l on {TRACK_SAMPLES} fresh samples")
    axes[0].legend(fontsize=6)
    save_figure(fig, out, "chasm_steps.png")
    return (f"{main}\n\nn = {num} samples per side, batch {batch_size}, {epochs} epochs of Adam (lr {lr:g}, "
            f"cosine decay) for every method; estimate = E_p l on {num} fresh samples; cells: estimate "
            f"(signed relative error); {TRUTH}: the exact log p/q on the same samples.\n\nSelf-normalisation "
            f"log E_q e^l on {num} fresh noise samples (0 in expectation of e^l for a proper log-ratio; the "
            f"truth row is what a finite sample reads for the exact ratio):\n\n{norm}\n\nLearning-rate "
            f"sensitivity at d={dim} (KL {dim / 4:g}), same {epochs} epochs:\n\n{sens}\n\nReused samples "
            f"against fresh ones at d={dim}, same number of steps and learning rate:\n\n{variance}")
