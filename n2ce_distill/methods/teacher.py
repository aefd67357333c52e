"""Train a diffusion teacher from scratch by denoising score matching in sigma space.

Loss ``lambda(s) ||D(x + s n; s) - x||^2`` with the denoiser's own noise-level distribution and
weight: the EDM loss for EDM models and exactly DDPM's epsilon MSE for VP models. On labelled data the
net is class-conditional, and with ``method.net.label_dropout = p`` a share p of the labels is replaced
by a null class (one more row of the class table), so that the same net also learns the unconditional
denoiser that classifier-free guidance reads (Ho and Salimans 2022). On captioned data the net is a
``UNet2DConditionModel`` reading each caption's embedding from a small frozen CLIP text encoder, and the dropped
captions become the empty prompt; the exported folder holds the text encoder and tokenizer beside the net.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DDPMScheduler
from torch import nn

from ..config import RecipeConfig
from ..errors import InputError
from ..conditions import PromptConditions
from ..denoisers import EDMDenoiser, VPDenoiser, per_sample
from ..latent import PromptEncoder
from ..nets import ToyMLP, save_text_components, tiny_clip, tiny_text_unet, tiny_unet
from ..samplers import teacher_sample
from .base import Method, StepOutput, Update

__all__ = ["TeacherTraining"]

PREVIEW_STEPS = 50  # Euler steps for sample grids while training (the 1000-step baseline is for evaluation)


class TeacherTraining(Method):
    def __init__(self, recipe: RecipeConfig, sample_shape: tuple[int, ...], num_classes: int | None = None,
                 prompts: list[str] | None = None):
        super().__init__(recipe, num_classes)
        net_cfg = recipe.method.net
        # the null class is the table's last row
        self.null_class = num_classes if num_classes is not None and net_cfg.label_dropout > 0 else None
        table = None if num_classes is None else num_classes + (self.null_class is not None)
        if net_cfg.pooled_prompt and prompts is None:
            raise InputError("method.net.pooled_prompt: pools prompt embeddings, and the data has no captions "
                             "(set data.caption_column)")
        if prompts is not None:
            if len(sample_shape) != 3:
                raise InputError("data.caption_column: a text-conditioned teacher is a UNet over images")
            encoder = PromptEncoder(*tiny_clip(net_cfg.text_features))
            self.conditions, self.frozen["text_encoder"] = PromptConditions(prompts, encoder), encoder
            net = tiny_text_unet(sample_shape[-1], sample_shape[0], tuple(net_cfg.block_out_channels),
                                 net_cfg.text_features, outer_attention=False, pooled_prompt=net_cfg.pooled_prompt)
        elif len(sample_shape) == 3:
            net = tiny_unet(sample_shape[-1], sample_shape[0], block_out_channels=tuple(net_cfg.block_out_channels),
                            num_class_embeds=table)
        else:
            # EDM's c_noise = ln(sigma)/4 spans a narrow range: Fourier features resolve it, DDPM sinusoids do not
            embedding = "fourier" if net_cfg.parameterization == "edm" else "positional"
            net = ToyMLP(dim=sample_shape[0], width=net_cfg.hidden_features, depth=net_cfg.num_layers,
                         time_embedding_type=embedding, num_class_embeds=table)
        if net_cfg.parameterization == "vp-eps":
            scheduler = DDPMScheduler(num_train_timesteps=net_cfg.num_train_timesteps)
            self.nets["denoiser"] = VPDenoiser(net, scheduler, null_class=self.null_class)
        else:
            self.nets["denoiser"] = EDMDenoiser(net, sigma_data=net_cfg.sigma_data, null_class=self.null_class)
        if prompts is not None:  # the empty prompt is the "no prompt" that label dropout trains and guidance reads
            self.nets.read["denoiser"].set_null_prompt(encoder([""]))

    @property
    def ema_name(self) -> str:
        return "denoiser"

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"denoiser": self.adam(denoiser=self.nets.read["denoiser"].parameters())}

    def training_step(self, batch: torch.Tensor, step: int, update: Update,
                      labels: torch.Tensor | None = None) -> StepOutput:
        denoiser = self.nets.read["denoiser"]
        sigma = self.processes.draw(denoiser.sample_training_sigmas, len(batch)).to(batch.device)
        noise = self.processes.randn(len(batch), *batch.shape[1:], device=batch.device)
        if labels is not None and denoiser.can_guide and self.recipe.method.net.label_dropout > 0:
            dropped = self.processes.draw(lambda n: torch.rand(n, device=batch.device), len(batch))
            dropped = per_sample(dropped < self.recipe.method.net.label_dropout, labels)
            labels = torch.where(dropped, denoiser.null_condition(labels), labels)
        loss = denoiser.denoising_loss(batch, labels, sigma=sigma, noise=noise, model=self.nets.train["denoiser"]).mean()
        update("denoiser", loss)
        return StepOutput({"loss_denoise": loss.detach()})

    def generate(self, model: nn.Module, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        labels = self.sample_labels(batch_size, model.device)
        return teacher_sample(model, batch_size, steps=PREVIEW_STEPS, method="euler", generator=generator,
                              class_labels=labels)

    def export(self, model: nn.Module, directory: Path) -> None:
        model.save_pretrained(directory)
        if isinstance(self.conditions, PromptConditions):  # what distillation reads the prompts with
            save_text_components(directory, self.conditions.encoder.tokenizer, self.conditions.encoder.text_encoder)

