"""Train a diffusion teacher from scratch by denoising score matching in sigma space.

Loss ``lambda(s) ||D(x + s n; s) - x||^2`` with the denoiser's own noise-level distribution and
weight: the EDM loss for EDM models and exactly DDPM's epsilon MSE for VP models.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DDPMScheduler, EDMEulerScheduler
from torch import nn

from ..config import RecipeConfig
from ..denoisers import EDMDenoiser, VPEpsilonDenoiser
from ..nets import ToyMLP, tiny_unet
from ..samplers import teacher_sample
from .base import Method, StepOutput, Update

__all__ = ["TeacherTraining"]

PREVIEW_STEPS = 50  # Euler steps for sample grids while training (the 1000-step baseline is for evaluation)


class TeacherTraining(Method):
    def __init__(self, recipe: RecipeConfig, sample_shape: tuple[int, ...]):
        super().__init__(recipe)
        net_cfg = recipe.method.net
        if len(sample_shape) == 3:
            net = tiny_unet(sample_shape[-1], sample_shape[0], block_out_channels=tuple(net_cfg.block_out_channels))
        else:
            # EDM's c_noise = ln(sigma)/4 spans a narrow range: Fourier features resolve it, DDPM sinusoids do not
            embedding = "fourier" if net_cfg.parameterization == "edm" else "positional"
            net = ToyMLP(dim=sample_shape[0], width=net_cfg.hidden_features, depth=net_cfg.num_layers, time_embedding_type=embedding)
        if net_cfg.parameterization == "vp-eps":
            scheduler = DDPMScheduler(num_train_timesteps=net_cfg.num_train_timesteps)
            self.nets["denoiser"] = VPEpsilonDenoiser(net, scheduler)
        else:
            self.nets["denoiser"] = EDMDenoiser(net, sigma_data=net_cfg.sigma_data)

    @property
    def ema_name(self) -> str:
        return "denoiser"

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"denoiser": self.adam(denoiser=self.nets.read["denoiser"].parameters())}

    def training_step(self, batch: torch.Tensor, step: int, update: Update) -> StepOutput:
        denoiser = self.nets.read["denoiser"]
        sigma = self.processes.draw(denoiser.sample_training_sigmas, len(batch)).to(batch.device)
        noise = self.processes.randn(len(batch), *batch.shape[1:], device=batch.device)
        loss = denoiser.denoising_loss(batch, sigma=sigma, noise=noise, model=self.nets.train["denoiser"]).mean()
        update("denoiser", loss)
        return StepOutput({"loss_denoise": loss.detach()})

    def generate(self, model: nn.Module, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        return teacher_sample(model, batch_size, steps=PREVIEW_STEPS, method="euler", generator=generator)

    def export(self, model: nn.Module, directory: Path) -> None:
        model.save_pretrained(directory)

