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

Plain SiD reads no data (only its batch size and labels or captions): it is data-free, as SiD-LSG distils
Stable Diffusion from prompts alone (``data.name: prompts``).

Class-conditional (labelled data and a conditional teacher): the generator draws each sample for its data row's
label; the teacher (guided by ``teacher.guidance_scale``, as SiD-LSG and SiDA guide it) and the fake score
network read the same labels, and so does the SiDA critic, whose logits are the fake score network's encoder
features computed with them.
"""

from __future__ import annotations

import torch

from ..config import RecipeConfig
from ..denoisers import Denoiser, per_sample
from ..fewstep import FewStepSampler
from ..objectives import generator_reverse_kl
from ..samplers import karras_ramp
from .base import ScoreDistillation, StepOutput, Update

__all__ = ["SiD"]

FAKE_P_MEAN, FAKE_P_STD = -1.2, 1.2  # fake-score noise levels: EDM's training distribution
MIN_NORMALISER = 1e-5  # floor on w = mean |x_g - D_phi|


class SiD(ScoreDistillation):
    def __init__(self, recipe: RecipeConfig, sample_shape: tuple[int, ...], num_classes: int | None = None,
                 prompts: list[str] | None = None):
        super().__init__(recipe, sample_shape, num_classes, prompts)
        # nonsat: the objective's own consistent term (softplus(log M - l) for N²CE); kl: the reward -l
        nonsat = recipe.method.generator_loss == "nonsat"
        self.generator_term = self.objective.generator_loss if nonsat else generator_reverse_kl

    def build_generator(self, denoiser: Denoiser) -> FewStepSampler:
        return FewStepSampler(denoiser, torch.tensor([self.recipe.method.sigma_init, 0.0]), last_scale=0.0)

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {name: self.adam(**{name: self.nets.read[name].parameters()}) for name in ("fake_score", "generator")}

    def _generate(self, batch_size: int, device: torch.device, labels: torch.Tensor | None) -> torch.Tensor:
        z = self.processes.randn(batch_size, *self.nets.read["generator"].denoiser.sample_shape, device=device)
        steps = torch.zeros(batch_size, dtype=torch.long, device=device)
        return self.nets.train["generator"](self.recipe.method.sigma_init * z, steps, torch.zeros_like(z), labels)

    def _critic_logits(self) -> torch.Tensor:
        """The critic's per-position logits ``(B, h, w)``: the channel mean of the fake score network's encoder
        features (no weights of its own), clamped where ``method.logit_clamp``."""
        return self._clamped(self.encoder.read().float().mean(dim=1))

    def _clamped(self, logits: torch.Tensor) -> torch.Tensor:
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

        # 1. fake score (+ SiDA critic), on detached generator samples
        with torch.no_grad():
            x_g = self._generate(B, device, labels)
        sigma = (FAKE_P_MEAN + FAKE_P_STD * self.processes.randn(B, device=device)).exp()
        weight = (sigma**2 + sd**2) / (sigma * sd) ** 2
        denoised = self.fake_score_pass(x_g, batch, sigma, labels)
        fake_loss = (weight * (denoised[:B] - x_g).pow(2).flatten(1).sum(1)).mean()
        logs = {"loss_fake_score": fake_loss.detach()}
        critic_logits = None
        if self.encoder is not None:
            logits_fake, logits_real = self._critic_logits().split(B)
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
        sigma = karras_ramp(1 - t, opts.sigma_min, opts.sigma_max)
        x_t = x_g + per_sample(sigma, x_g) * self.processes.randn(B, *x_g.shape[1:], device=device)
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
            logits = self._critic_logits()
            adversarial = logits[0].numel() * self.generator_term(logits, weight=1 / w)
            generator_loss = (1 - opts.adv_weight) * sid_loss + opts.adv_weight * adversarial
            logs["loss_adversarial"] = adversarial.detach()
        update("generator", generator_loss)
        return StepOutput(logs, critic_logits)
