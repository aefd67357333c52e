"""A T-step stochastic sampler with learned per-step noise, on any sigma-space denoiser.

One step is ``x_{k+1} = mu(x_k, k) + s_k z`` with the ancestral mean
``mu = D(x_k; sigma_k) + (sigma_down_k / sigma_k) (x_k - D(x_k; sigma_k))`` (``sigma_down`` from the
schedule, so the mean is the DDPM posterior mean for a VP teacher) and a learned scale
``s_k = exp(log_s_k)`` initialised to the ancestral ``sigma_up_k``. ``x_0 = sigma_0 z``. With
``sigmas = [sigma_init, 0]`` and ``s = 0`` this is SiD's one-step generator ``D(sigma_init z; sigma_init)``.
With ``renoise`` every step predicts the clean sample and noises it afresh to the next level,
``x_{k+1} = D(x_k; sigma_k) + sigma_{k+1} z`` (``sigma_down = 0``, fixed ``s_k = sigma_{k+1}``): the multistep
sampling of consistency models and DMD2.
A class-conditional denoiser takes ``class_labels`` (B,) at every step; with ``guidance_scale != 1`` each mean
reads the classifier-free-guided denoiser (two net evaluations per step).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .denoisers import Denoiser, per_sample
from .samplers import ancestral_step_scales

__all__ = ["FewStepSampler"]



class FewStepSampler(nn.Module):
    """``sigmas``: T+1 decreasing noise levels ending at 0. ``last_scale`` fixes ``s_{T-1}`` (None: learnt);
    ``eta`` splits each step's noise between the mean and ``s_k`` as in DDIM (1: ancestral, 0: deterministic);
    ``guidance_scale``: classifier-free guidance of the denoiser in every mean (1: none); ``renoise``: each step
    re-noises the denoised sample with fresh noise at the next level (no learned scales; ``eta`` and
    ``last_scale`` unused)."""

    def __init__(
        self, denoiser: Denoiser, sigmas: torch.Tensor, last_scale: float | None = 1e-3, min_scale: float = 1e-3,
        eta: float = 1.0, guidance_scale: float = 1.0, renoise: bool = False,
    ):
        super().__init__()
        sigmas = torch.as_tensor(sigmas, dtype=torch.float32)
        if sigmas.dim() != 1 or len(sigmas) < 2 or sigmas[-1] != 0 or (sigmas[1:] >= sigmas[:-1]).any():
            raise ValueError(f"sigmas: expected T+1 strictly decreasing values ending at 0, got {sigmas.tolist()}")
        self.denoiser, self.eta, self.guidance_scale = denoiser, float(eta), float(guidance_scale)
        self.renoise = bool(renoise)
        if renoise:
            sigma_down, sigma_up = torch.zeros(len(sigmas) - 1), sigmas[1:].clone()
        else:
            sigma_down, sigma_up = ancestral_step_scales(sigmas, eta)  # eta = 1: DDPM posterior, 0: DDIM mean
        self.register_buffer("sigmas", sigmas)
        self.register_buffer("sigma_down", sigma_down.float())
        # log 0 is -inf: a step whose ancestral noise is 0 starts from a tiny positive scale instead
        self.log_scales = nn.Parameter(sigma_up.float().clamp_min(min_scale).log())
        # a fixed scale lives in a buffer (it may be exactly 0, as in SiD's deterministic generator)
        fixed = torch.full((len(sigma_up),), self.renoise)
        fixed_values = sigma_up.float() if renoise else torch.zeros(len(sigma_up))
        if last_scale is not None and not renoise:
            fixed[-1], fixed_values[-1] = True, last_scale
        self.log_scales.requires_grad_(not bool(fixed.all()))  # nothing to learn when every scale is fixed
        self.register_buffer("fixed_scale", fixed)
        self.register_buffer("fixed_values", fixed_values)

    @property
    def num_steps(self) -> int:
        return len(self.sigmas) - 1

    # read the weights, with gradients, outside forward (DxMI's running cost): the trainer has FSDP gather them
    forward_methods = ("scales",)

    def scales(self) -> torch.Tensor:
        """``s_k``; fixed entries carry no gradient."""
        return self._scales()

    def _scales(self) -> torch.Tensor:  # what forward reads: FSDP has already gathered the weights there
        return torch.where(self.fixed_scale, self.fixed_values, self.log_scales.exp())

    @property
    def num_classes(self) -> int | None:
        return self.denoiser.num_classes

    def mean(self, x: torch.Tensor, k: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """Ancestral mean for a batch whose rows may sit at different steps ``k`` (LongTensor (B,))."""
        sigma = self.sigmas[k]
        x0 = self.denoiser.guided(x, sigma, class_labels, self.guidance_scale)
        ratio = per_sample(self.sigma_down[k] / sigma, x)
        return x0 + ratio * (x - x0)

    def forward(self, x: torch.Tensor, k: torch.Tensor, noise: torch.Tensor,
                class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """One step ``x_{k+1} = mu(x_k, k) + s_k z``, differentiable in the denoiser and in ``s_k``.

        Training calls this through the module (so distributed wrappers see it); sampling uses :meth:`sample`.
        """
        scale = per_sample(self._scales()[k], x)
        return self.mean(x, k, class_labels) + scale * noise

    def sample(
        self,
        batch_size: int,
        generator: torch.Generator | None = None,
        return_trajectory: bool = False,
        noise: Callable[[tuple[int, ...]], torch.Tensor] | None = None,
        class_labels: torch.Tensor | None = None,
    ):
        """Sample ``batch_size`` points (of classes ``class_labels`` (B,), for a conditional denoiser).
        ``noise(shape)`` replaces the standard-normal draws (default: from ``generator``)."""
        device = self.sigmas.device
        shape = (batch_size, *self.denoiser.sample_shape)
        noise = noise or (lambda s: torch.randn(s, generator=generator, device=device))
        x = self.sigmas[0] * noise(shape)
        trajectory = [x]
        for k in range(self.num_steps):
            ks = torch.full((batch_size,), k, device=device, dtype=torch.long)
            x = self(x, ks, noise(shape), class_labels)
            trajectory.append(x)
        return torch.stack(trajectory) if return_trajectory else x
