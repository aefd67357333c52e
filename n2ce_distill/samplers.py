r"""Sigma schedules and samplers over any :class:`~n2ce_distill.denoisers.Denoiser` (VE sigma space).

Every schedule is a decreasing tensor ``sigma_0 > ... > sigma_{n-1} > sigma_n = 0`` (``n`` steps = ``n`` denoiser
calls) and every sampler starts from ``x_0 = sigma_0 z``, ``z ~ N(0, I)``.

* Euler on the probability-flow ODE ``dx/dsigma = (x - D(x; sigma))/sigma``:
  ``x' = D + (sigma'/sigma)(x - D)``. In VE coordinates this *is* deterministic DDIM.
* Ancestral (``eta = 1``): the exact Gaussian posterior ``q(x_{sigma'} | x_sigma, x_0)`` with ``x_0 := D``:
  ``x' = D + (sigma_down/sigma)(x - D) + sigma_up z`` with ``sigma_up^2 = sigma'^2 (sigma^2 - sigma'^2)/sigma^2``
  and ``sigma_down^2 = sigma'^2 - sigma_up^2`` (so ``sigma_down/sigma = sigma'^2/sigma^2``). On the full discrete
  schedule of a VP teacher this is DDPM ancestral sampling with the "fixed_small" variance.
"""

from __future__ import annotations

import math

import torch

from .denoisers import Denoiser

__all__ = [
    "SPACINGS",
    "ancestral_sample",
    "ancestral_step_scales",
    "euler_sample",
    "few_step_sigmas",
    "karras_ramp",
    "karras_sigmas",
    "teacher_sample",
    "vp_quadratic_sigmas",
    "vp_uniform_sigmas",
]

SPACINGS = ("auto", "karras", "quadratic", "uniform")


def _with_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas.float(), sigmas.new_zeros(1).float()])


def karras_ramp(t: torch.Tensor, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    r"""The EDM noise ramp at ``t`` in [0, 1]: ``(smax^{1/rho} + t (smin^{1/rho} - smax^{1/rho}))^rho``, from
    ``sigma_max`` at 0 to ``sigma_min`` at 1 (the levels SiD's and DMD2's training losses draw)."""
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + t * (lo - hi)) ** rho


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    r"""EDM schedule: :func:`karras_ramp` at ``t = i/(n-1)``, i < n, then 0. ``n = 1`` gives ``[sigma_max, 0]``."""
    return _with_zero(karras_ramp(torch.linspace(0, 1, n, dtype=torch.float64), sigma_min, sigma_max, rho))


def vp_quadratic_sigmas(denoiser: Denoiser, n: int) -> torch.Tensor:
    r"""DxMI's "quadratic" few-step schedule (from FastDPM / SFT-PG's VAR noise).

    ``n`` step betas grow quadratically, ``b_i = b_0 (1 + i c)^2`` (``b_0 = 1 - abar(sigma_min)``), and the
    cumulative products ``g_k = prod_{i<=k} (1 - b_i)`` give ``sigma_k = sqrt((1 - g_k)/g_k)`` (returned for
    ``k = n-1 .. 0``, then 0), dense at low noise. ``c`` is bisected on DxMI's interval ``[0, 0.95/(sqrt(b_0) n)]``
    (every ``b_i < 1``) for ``g_{n-1} = abar(sigma_max)``; when even its top end adds too little noise the schedule
    stops short, as in DxMI: ``n = 10`` on the 1000-step linear DDPM schedule tops out at sigma ~ 6.86.
    """
    if n == 1:
        return _with_zero(torch.tensor([denoiser.sigma_max]))
    b0 = denoiser.sigma_min**2 / (1 + denoiser.sigma_min**2)
    log_target = -math.log1p(denoiser.sigma_max**2)  # ln abar at sigma_max
    i = torch.arange(n, dtype=torch.float64)

    def log_gamma(c: float) -> torch.Tensor:
        return torch.log1p(-b0 * (1 + i * c) ** 2).cumsum(0)

    lo, hi = 0.0, 0.95 / math.sqrt(b0) / n  # hi keeps every b_i < 1
    for _ in range(200):  # bisection: log_gamma(c)[-1] is decreasing in c
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if log_gamma(mid)[-1] > log_target else (lo, mid)
    g = log_gamma(0.5 * (lo + hi)).exp()
    return _with_zero(((1 - g) / g).sqrt().flip(0))


def vp_uniform_sigmas(denoiser: Denoiser, n: int) -> torch.Tensor:
    """``n`` of the discrete schedule's sigmas at timesteps ``round(linspace(T-1, 0, n))``, then 0.

    ``n = T`` is the full DDPM grid; values are taken from ``denoiser.discrete_sigmas`` bit-for-bit so that
    ``t(sigma)`` lands exactly on integer timesteps."""
    grid = getattr(denoiser, "discrete_sigmas", None)
    if grid is None:
        raise ValueError(f"uniform spacing needs a discrete-time (VP) denoiser, got {type(denoiser).__name__}")
    if not 1 <= n <= grid.numel():
        raise ValueError(f"uniform spacing takes 1 <= n <= {grid.numel()} steps, got {n}")
    t = torch.linspace(grid.numel() - 1, 0, n).round().long()
    return _with_zero(grid.detach().cpu()[t])


def few_step_sigmas(denoiser: Denoiser, n: int, spacing: str = "auto", rho: float = 7.0) -> torch.Tensor:
    """``n + 1`` decreasing sigmas ending at 0 over the denoiser's ``[sigma_min, sigma_max]``.

    ``spacing``: ``"karras"`` (EDM, ``rho``), ``"quadratic"`` (DxMI), ``"uniform"`` (evenly spaced discrete VP
    timesteps), or ``"auto"`` = quadratic for a discrete VP teacher, karras otherwise."""
    if n < 1:
        raise ValueError(f"need at least one step, got n={n}")
    if spacing == "auto":
        spacing = "quadratic" if hasattr(denoiser, "discrete_sigmas") else "karras"
    if spacing == "karras":
        return karras_sigmas(n, denoiser.sigma_min, denoiser.sigma_max, rho)
    if spacing == "quadratic":
        return vp_quadratic_sigmas(denoiser, n)
    if spacing == "uniform":
        return vp_uniform_sigmas(denoiser, n)
    raise ValueError(f"unknown spacing {spacing!r}; choose from {SPACINGS}")


def ancestral_step_scales(sigmas: torch.Tensor, eta: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-step ``(sigma_down, sigma_up)``, each (n,), for ``n + 1`` sigmas.

    ``sigma_up = min(sigma', eta sigma' sqrt(1 - sigma'^2/sigma^2))``, ``sigma_down = sqrt(sigma'^2 - sigma_up^2)``;
    ``eta = 1`` is the posterior (DDPM) noise, ``eta = 0`` gives Euler/DDIM. ``sigma_up`` initialises DxMI's
    learned per-step noise."""
    s, s_next = sigmas[:-1].double(), sigmas[1:].double()
    up = torch.minimum(s_next, eta * s_next * (1 - (s_next / s).square()).clamp_min(0).sqrt())
    down = (s_next.square() - up.square()).clamp_min(0).sqrt()
    return down.float(), up.float()


def _denoise(denoiser, x, sigma, class_labels, clip_denoised, guidance_scale):
    d = denoiser(x, sigma, class_labels) if guidance_scale == 1 else denoiser.guided(x, sigma, class_labels, guidance_scale)
    return d.clamp(-1, 1) if clip_denoised else d  # DDPM-style x0 clipping for data in [-1, 1]


def euler_sample(
    denoiser: Denoiser,
    sigmas: torch.Tensor,
    noise: torch.Tensor,
    class_labels: torch.Tensor | None = None,
    clip_denoised: bool = False,
    guidance_scale: float = 1.0,
) -> torch.Tensor:
    """Deterministic Euler / DDIM from ``x = sigmas[0] * noise``; returns the final sample (grad mode is the
    caller's). ``guidance_scale != 1``: classifier-free guidance (:meth:`Denoiser.guided`) at every step."""
    s = sigmas.tolist()
    x = s[0] * noise
    for cur, nxt in zip(s[:-1], s[1:]):
        d = _denoise(denoiser, x, cur, class_labels, clip_denoised, guidance_scale)
        x = d + (nxt / cur) * (x - d)
    return x


def ancestral_sample(
    denoiser: Denoiser,
    sigmas: torch.Tensor,
    noise: torch.Tensor,
    generator: torch.Generator | None = None,
    eta: float = 1.0,
    class_labels: torch.Tensor | None = None,
    clip_denoised: bool = False,
    guidance_scale: float = 1.0,
) -> torch.Tensor:
    """Ancestral sampling from ``x = sigmas[0] * noise``; step noise is drawn from ``generator`` on its device."""
    s = sigmas.tolist()
    down, up = (v.tolist() for v in ancestral_step_scales(sigmas, eta))
    x = s[0] * noise
    for cur, s_down, s_up in zip(s[:-1], down, up):
        d = _denoise(denoiser, x, cur, class_labels, clip_denoised, guidance_scale)
        x = d + (s_down / cur) * (x - d)
        if s_up > 0:
            dev = generator.device if generator is not None else x.device
            x = x + s_up * torch.randn(x.shape, generator=generator, device=dev).to(x)
    return x


@torch.no_grad()
def teacher_sample(
    denoiser: Denoiser,
    num_samples: int | None = None,
    *,
    steps: int,
    noise: torch.Tensor | None = None,
    method: str = "ancestral",
    spacing: str | None = None,
    generator: torch.Generator | None = None,
    class_labels: torch.Tensor | None = None,
    clip_denoised: bool = False,
    guidance_scale: float = 1.0,
) -> torch.Tensor:
    """Baseline samples from a teacher (no grad), conditioned on ``class_labels`` (B,) when given. ``spacing=None`` means evenly spaced discrete timesteps for
    a VP teacher (``steps = T`` with ``method="ancestral"`` is DDPM; ``"euler"`` is DDIM) and Karras otherwise.
    Give ``noise`` (B, *sample_shape) or ``num_samples`` (drawn from ``generator``)."""
    if method not in ("ancestral", "euler"):
        raise ValueError(f"method must be 'ancestral' or 'euler', got {method!r}")
    if noise is None:
        if num_samples is None:
            raise ValueError("give num_samples or noise")
        dev = generator.device if generator is not None else denoiser.device
        noise = torch.randn((num_samples, *denoiser.sample_shape), generator=generator, device=dev)
    noise = noise.to(denoiser.device)
    if spacing is None:
        spacing = "uniform" if hasattr(denoiser, "discrete_sigmas") else "karras"
    sigmas = few_step_sigmas(denoiser, steps, spacing)
    if class_labels is not None:
        class_labels = torch.as_tensor(class_labels, device=denoiser.device)
    if method == "euler":
        return euler_sample(denoiser, sigmas, noise, class_labels, clip_denoised, guidance_scale)
    return ancestral_sample(denoiser, sigmas, noise, generator, 1.0, class_labels, clip_denoised, guidance_scale)
