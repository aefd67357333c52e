"""SiD / SiDA one-step distillation (Zhou et al. 2024/2025; SPEC section 6), with an N²CE critic.

Networks: the frozen teacher ``D_phi``; a fake score network ``D_psi`` and a one-step generator
``x_g = D_theta(sigma_init z; sigma_init)``, both initialised from it. One iteration:

1. fake-score step on detached ``x_g``: ``lambda(s) ||D_psi(x_g + s n; s) - x_g||^2`` with
   ``log s ~ N(-1.2, 1.2^2)``, ``lambda(s) = (s^2 + sd^2) / (s sd)^2``; SiDA adds a critic whose logits
   are the channel mean of ``D_psi``'s encoder output (the UNet mid block's input: no new weights),
   real vs ``x_g`` noised at the same ``s``, any critic objective weighted by ``lambda(s)``;
2. generator step: ``t ~ U[0, t_max]``, ``s = (smax^(1/7) + (1 - t)(smin^(1/7) - smax^(1/7)))^7``,
   ``x_t = x_g + s n``, per pixel ``(D_phi - D_psi)((D_phi - x_g) - alpha (D_phi - D_psi)) / w`` with
   ``w = sg(mean |x_g - D_phi|)``; SiDA mixes in the adversarial generator term on the same ``x_t``.

Every loss is a sum over its elements (pixels for the score terms, logit positions for the critic) and
a mean over the batch, as in SiD's and EDM's training code: the balance between the score terms and
the critic terms then follows the ratio of pixels to logit positions, as in SiDA, at any resolution.

Class-conditional (labelled data and a conditional teacher): the generator draws each sample for its data row's
label; the teacher (guided by ``teacher.guidance_scale``, as SiD-LSG and SiDA guide it) and the fake score
network read the same labels, and so does the SiDA critic, whose logits are the fake score network's encoder
features computed with them.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from ..config import RecipeConfig
from ..errors import InputError
from ..fewstep import FewStepSampler
from ..objectives import generator_reverse_kl
from ..pipelines import FewStepPipeline
from .base import Method, StepOutput, Update, critic_objective, load_teacher

__all__ = ["SiD", "EncoderLogits"]

FAKE_P_MEAN, FAKE_P_STD = -1.2, 1.2  # fake-score noise levels: EDM's training distribution
MIN_NORMALISER = 1e-5  # floor on w = mean |x_g - D_phi|


class EncoderLogits:
    """Captures a UNet's mid-block input on each forward; its channel mean is a per-position logit map."""

    def __init__(self, unet: nn.Module):
        mid = getattr(unet, "mid_block", None)
        if mid is None:
            raise InputError("method.adversarial: the SiDA critic needs a UNet teacher with a mid block (set it false)")
        self.features: torch.Tensor | None = None
        mid.register_forward_pre_hook(self._capture)

    def _capture(self, module: nn.Module, args: tuple) -> None:
        self.features = args[0]

    def logits(self) -> torch.Tensor:
        return self.features.float().mean(dim=1)  # (B, h, w)


class SiD(Method):
    def __init__(self, recipe: RecipeConfig, sample_shape: tuple[int, ...], num_classes: int | None = None):
        super().__init__(recipe, num_classes)
        opts = recipe.method
        teacher = load_teacher(recipe, sample_shape, num_classes)
        self.frozen["teacher"] = teacher.requires_grad_(False)
        self.nets["fake_score"] = copy.deepcopy(teacher).requires_grad_(True)
        sigmas = torch.tensor([opts.sigma_init, 0.0])
        self.nets["generator"] = FewStepSampler(copy.deepcopy(teacher).requires_grad_(True), sigmas, last_scale=0.0)
        self.encoder = EncoderLogits(self.nets.read["fake_score"].net) if opts.adversarial else None
        self.objective = critic_objective(recipe.critic)
        # nonsat: the objective's own consistent term (softplus(log M - l) for N²CE); kl: the reward -l
        self.generator_term = self.objective.generator_loss if opts.generator_loss == "nonsat" else generator_reverse_kl

    @property
    def ema_name(self) -> str:
        return "generator"

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {name: self.adam(**{name: self.nets.read[name].parameters()}) for name in ("fake_score", "generator")}

    def _generate(self, batch_size: int, device: torch.device, labels: torch.Tensor | None) -> torch.Tensor:
        z = self.processes.randn(batch_size, *self.nets.read["generator"].denoiser.sample_shape, device=device)
        steps = torch.zeros(batch_size, dtype=torch.long, device=device)
        return self.nets.train["generator"](self.recipe.method.sigma_init * z, steps, torch.zeros_like(z), labels)

    def _critic_logits(self, logits: torch.Tensor) -> torch.Tensor:
        clamp = self.recipe.method.logit_clamp
        if clamp is None:
            return logits
        offset = self.objective.log_offset  # clamp l - log M, never l itself: clamping l at +-10 kills N²CE's gradients
        return logits.clamp(offset - clamp, offset + clamp)

    def training_step(self, batch: torch.Tensor, step: int, update: Update,
                      labels: torch.Tensor | None = None) -> StepOutput:
        opts, sd = self.recipe.method, self.nets.read["fake_score"].sigma_data
        B, device = batch.shape[0], batch.device
        images_seen = step * self.recipe.train.batch_size
        view = lambda t: t.view(-1, *([1] * (batch.dim() - 1)))  # noqa: E731  (per-sample scalars over pixels)

        # 1. fake score (+ SiDA critic), on detached generator samples
        with torch.no_grad():
            x_g = self._generate(B, device, labels)
        sigma = (FAKE_P_MEAN + FAKE_P_STD * self.processes.randn(B, device=device)).exp()
        weight = (sigma**2 + sd**2) / (sigma * sd) ** 2
        noise = torch.cat([self.processes.randn(B, *batch.shape[1:], device=device) for _ in range(2)])
        inputs = torch.cat([x_g, batch]) + view(sigma.repeat(2)) * noise
        denoised = self.nets.train["fake_score"](inputs, sigma.repeat(2), None if labels is None else labels.repeat(2))
        fake_loss = (weight * (denoised[:B] - x_g).pow(2).flatten(1).sum(1)).mean()
        logs = {"loss_fake_score": fake_loss.detach()}
        critic_logits = None
        if self.encoder is not None:
            logits_fake, logits_real = self._critic_logits(self.encoder.logits()).split(B)
            positions = logits_real[0].numel()  # the objectives average over positions: sum them instead
            critic_loss = positions * self.objective(logits_real, logits_fake, weight_data=weight, weight_noise=weight)
            fake_loss = fake_loss + opts.critic_weight * critic_loss
            logs["loss_critic"] = critic_loss.detach()
            critic_logits = (logits_real.detach(), logits_fake.detach())
        update("fake_score", fake_loss)

        # 2. generator, after its warm-up
        if images_seen < opts.generator_warmup_images:
            return StepOutput(logs, critic_logits)
        x_g = self._generate(B, device, labels)
        t = opts.t_max * self.processes.draw(lambda n: torch.rand(n, device=device), B)
        lo, hi = opts.sigma_min ** (1 / 7), opts.sigma_max ** (1 / 7)
        sigma = (hi + (1 - t) * (lo - hi)) ** 7
        x_t = x_g + view(sigma) * self.processes.randn(B, *batch.shape[1:], device=device)
        # the fake score network is read, not trained, here: its bare module keeps it out of DDP's reduction, and
        # reading() keeps autograd from building a graph for its weights (the encoder's logits come from this pass)
        with self.reading(self.nets.read["fake_score"]):
            real = self.frozen["teacher"].guided(x_t, sigma, labels, self.recipe.teacher.guidance_scale)
            fake = self.nets.read["fake_score"](x_t, sigma, labels)
        w = (x_g - real).abs().flatten(1).mean(1).clamp_min(MIN_NORMALISER).detach()
        per_pixel = (real - fake) * ((real - x_g) - opts.alpha * (real - fake))
        sid_loss = (per_pixel.flatten(1).sum(1) / w).mean()
        generator_loss = sid_loss
        logs["loss_sid"] = sid_loss.detach()
        if self.encoder is not None and images_seen >= opts.adversarial_warmup_images:
            logits = self._critic_logits(self.encoder.logits())
            adversarial = logits[0].numel() * self.generator_term(logits, weight=1 / w)
            generator_loss = (1 - opts.adv_weight) * sid_loss + opts.adv_weight * adversarial
            logs["loss_adversarial"] = adversarial.detach()
        update("generator", generator_loss)
        return StepOutput(logs, critic_logits)

    def generate(self, model: nn.Module, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        return model.sample(batch_size, generator=generator, class_labels=self.sample_labels(batch_size, model.sigmas.device))

    def export(self, model: nn.Module, directory: Path) -> None:
        FewStepPipeline.from_sampler(model).save_pretrained(directory)
