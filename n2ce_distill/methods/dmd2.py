"""DMD2-style distribution matching distillation (Yin et al. 2024; SPEC section 6b), with a swappable GAN critic.

Networks: the frozen teacher ``D_phi`` (the real score); a fake score network ``D_psi`` and a generator
``G_theta``, both initialised from it; with ``method.adversarial``, a small :class:`~n2ce_distill.critics.
BottleneckHead` ``h`` on ``D_psi``'s bottleneck (the features SiDA's critic reads), giving one logit per sample.

The generator is a :class:`~n2ce_distill.fewstep.FewStepSampler` that re-noises: ``x_0 = sigma_0 z``,
``x_{k+1} = G(x_k; sigma_k) + sigma_{k+1} z'`` over ``T = method.num_steps`` levels from ``sigma_0 =
method.sigma_init`` (default: the teacher's ``sigma_max``) down the Karras ramp (one step: ``G(sigma_0 z;
sigma_0)``). Training draws its samples by backward simulation: one step index ``k`` per
iteration, ``x_k`` by running the student's own first ``k`` steps without gradients, then ``x_g = G(x_k; sigma_k)``.

One iteration (two time scales, ``K = method.fake_updates_per_step``: every iteration updates ``D_psi`` and ``h``;
iterations 0, K, 2K, ... first update ``G``, and ``D_psi`` then trains on that same ``x_g``):

1. generator (its turns): ``t ~ U[dm_t_min, dm_t_max]`` on the Karras ramp of ``[sigma_min, sigma_max]``,
   ``x_t = x_g + sigma n``; per pixel ``g = (D_psi(x_t) - D_phi(x_t)) / w`` with ``w = mean |x_g - D_phi(x_t)|`` per
   sample (the real score guided by ``teacher.guidance_scale``), and the loss ``0.5 mean (x_g - sg(x_g - g))^2``,
   whose gradient in ``x_g`` is ``g`` over the element count (no regression loss). With a critic, plus
   ``adversarial_weight`` times the objective's own generator term on ``h``'s logits of ``x_g`` (read at the same
   ``x_t``: the head and ``D_psi`` are read, not trained, and only ``x_g`` receives their gradient);
2. fake score on detached ``x_g``: ``t ~ U[0, 1]`` on the ramp, ``mean (1/sigma^2 + 1/sd^2) (D_psi(x_g + sigma n) -
   x_g)^2`` (DMD2's weighting; elements averaged); with a critic, plus ``critic_weight`` times the objective
   (``gan`` = NCE, ``nce``, ``n2ce``, ...) on real vs generated logits, both noised at that same ``sigma``.

Losses are means over elements and samples, as in DMD2, so its loss weights carry over. Class-conditional: the
generator draws each sample for its data row's label, and the teacher, ``D_psi`` and hence ``h``'s features read
the same labels.
"""

from __future__ import annotations

import torch

from ..config import RecipeConfig
from ..critics import BottleneckHead
from ..denoisers import Denoiser, per_sample
from ..errors import InputError
from ..fewstep import FewStepSampler
from ..samplers import karras_ramp
from .base import ScoreDistillation, StepOutput, Update
from .sid import MIN_NORMALISER

__all__ = ["DMD2"]

EDM_SIGMA_MAX = 80.0  # the top of DMD2's EDM noise ramp


def _ramp_top(sigma_max: float | None, teacher_max: float) -> float:
    return min(EDM_SIGMA_MAX, teacher_max) if sigma_max is None else sigma_max

class DMD2(ScoreDistillation):
    def __init__(self, recipe: RecipeConfig, sample_shape: tuple[int, ...], num_classes: int | None = None,
                 prompts: list[str] | None = None):
        super().__init__(recipe, sample_shape, num_classes, prompts)
        if self.encoder is not None:  # the head reads the mid block's input: the last down block's width
            self.nets["gan_head"] = BottleneckHead(self.nets.read["fake_score"].net.config.block_out_channels[-1])
        self._generator_logs: dict[str, torch.Tensor] = {}

    def build_generator(self, denoiser: Denoiser) -> FewStepSampler:
        """``T`` levels evenly spaced on the Karras ramp from the first level (``method.sigma_init``, else the
        teacher's ``sigma_max``) down, without the ramp's end: a re-noised step at the teacher's ``sigma_min``
        would change nothing."""
        opts, low, high = self.recipe.method, denoiser.sigma_min, denoiser.sigma_max
        first = high if opts.sigma_init is None else opts.sigma_init
        if not low < first <= high:
            raise InputError(f"method.sigma_init: {first:g} is outside the teacher's noise range ({low:g}, {high:g}]")
        if opts.sigma_max is not None and opts.sigma_max > high * (1 + 1e-6):
            raise InputError(f"method.sigma_max: {opts.sigma_max:g} is above the teacher's largest noise level {high:g}")
        top = _ramp_top(opts.sigma_max, high)
        if opts.sigma_min >= top:
            raise InputError(f"method.sigma_min: {opts.sigma_min:g} is not below the ramp's top {top:g}")
        levels = karras_ramp(torch.arange(opts.num_steps, dtype=torch.float64) / opts.num_steps, low, first)
        return FewStepSampler(denoiser, torch.cat([levels, levels.new_zeros(1)]), renoise=True)

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        # the head trains with the fake score network, as DMD2's guidance optimiser holds both
        critic = [*self.nets.read["gan_head"].parameters()] if "gan_head" in self.nets else []
        return {"generator": self.adam(generator=self.nets.read["generator"].parameters()),
                "fake_score": self.adam(fake_score=[*self.nets.read["fake_score"].parameters(), *critic])}

    def _simulated_steps(self, step: int) -> int:
        """The student step this iteration trains (backward simulation), one for the whole batch: drawn from a
        stream seeded by the recipe's seed and the step, so every process agrees without a device read."""
        steps = self.nets.read["generator"].num_steps
        if steps == 1:
            return 0
        stream = torch.Generator().manual_seed(self.recipe.seed * 1_000_003 + step)
        return int(torch.randint(steps, (1,), generator=stream))

    def _generate(self, batch_size: int, device: torch.device, labels: torch.Tensor | None, step: int,
                  grad: bool) -> torch.Tensor:
        """``x_g = G(x_k; sigma_k)`` with ``x_k`` from the student's own first ``k`` steps (no gradients)."""
        sampler = self.nets.read["generator"]
        shape = sampler.denoiser.sample_shape
        x = sampler.sigmas[0] * self.processes.randn(batch_size, *shape, device=device)
        k = self._simulated_steps(step)
        if k:  # a phase of its own in the train_step benchmark, only where there is one
            with self.phase("simulation"), torch.no_grad():
                for j in range(k):
                    rows = torch.full((batch_size,), j, dtype=torch.long, device=device)
                    x = sampler(x, rows, self.processes.randn(batch_size, *shape, device=device), labels)
        rows = torch.full((batch_size,), k, dtype=torch.long, device=device)
        with torch.set_grad_enabled(grad):  # zero noise: the step's denoised sample itself
            return self.nets.train["generator"](x, rows, torch.zeros_like(x), labels)

    def _ramp(self, low: float, high: float, batch_size: int, device: torch.device) -> torch.Tensor:
        """Noise levels at ``t ~ U[low, high]`` on the Karras ramp of ``[method.sigma_min, method.sigma_max]``."""
        t = low + (high - low) * self.processes.draw(lambda n: torch.rand(n, device=device), batch_size)
        return karras_ramp(t, self.recipe.method.sigma_min, self.ramp_max)

    @property
    def ramp_max(self) -> float:
        """The top of the noise ramp: ``method.sigma_max``, else EDM's 80 capped at the teacher's largest level."""
        return _ramp_top(self.recipe.method.sigma_max, self.frozen["teacher"].sigma_max)

    def _generator_loss(self, x_g: torch.Tensor, labels: torch.Tensor | None, step: int) -> tuple[torch.Tensor, dict]:
        opts, B = self.recipe.method, x_g.shape[0]
        sigma = self._ramp(opts.dm_t_min, opts.dm_t_max, B, x_g.device)
        x_t = x_g + per_sample(sigma, x_g) * self.processes.randn(B, *x_g.shape[1:], device=x_g.device)
        adversarial = self.encoder is not None and step * self.recipe.train.batch_size >= opts.adversarial_warmup_images
        with torch.no_grad():
            real = self.frozen["teacher"].guided(x_t, sigma, labels, self.recipe.teacher.guidance_scale)
        # read, not trained: bare modules (outside DDP's reduction), no graph for their weights; the pass keeps a
        # graph to x_g only when the head's logits need one
        critic = [self.nets.read["gan_head"]] if adversarial else []
        with self.reading(self.nets.read["fake_score"], *critic), torch.set_grad_enabled(adversarial):
            fake = self.nets.read["fake_score"](x_t, sigma, labels)
            logits = self.nets.read["gan_head"](self.encoder.read()) if adversarial else None
        w = (x_g.detach() - real).abs().flatten(1).mean(1).clamp_min(MIN_NORMALISER)
        direction = ((fake.detach() - real).float() / per_sample(w, x_g)).nan_to_num()
        dm_loss = 0.5 * (x_g.float() - (x_g.detach().float() - direction)).pow(2).mean()
        logs = {"loss_dm": dm_loss.detach()}
        if not adversarial:
            return dm_loss, logs
        term = self.objective.generator_loss(logits)
        logs["loss_adversarial"] = term.detach()
        return dm_loss + opts.adversarial_weight * term, logs

    @property
    def cycle(self) -> int:
        return self.recipe.method.fake_updates_per_step

    def training_step(self, batch: torch.Tensor, step: int, update: Update,
                      labels: torch.Tensor | None = None) -> StepOutput:
        opts, sd = self.recipe.method, self.nets.read["fake_score"].sigma_data
        B, device = batch.shape[0], batch.device
        generator_turn = step % opts.fake_updates_per_step == 0
        x_g = self._generate(B, device, labels, step, grad=generator_turn)
        if generator_turn:
            generator_loss, self._generator_logs = self._generator_loss(x_g, labels, step)
            update("generator", generator_loss)
            x_g = x_g.detach()
        logs = dict(self._generator_logs)  # the latest generator update's, so that every logged step shows them

        # fake score (+ critic) on this iteration's samples: the real rows only feed the critic
        sigma = self._ramp(0.0, 1.0, B, device)
        weight = 1 / sigma**2 + 1 / sd**2
        denoised = self.fake_score_pass(x_g, batch, sigma, labels)
        fake_loss = (per_sample(weight, x_g) * (denoised[:B].float() - x_g.float()).pow(2)).mean()
        logs["loss_fake_score"] = fake_loss.detach()
        critic_logits = None
        if self.encoder is not None:
            logits_fake, logits_real = self.nets.train["gan_head"](self.encoder.read()).split(B)
            critic_loss = self.objective(logits_real, logits_fake)
            fake_loss = fake_loss + opts.critic_weight * critic_loss
            logs["loss_critic"] = critic_loss.detach()
            critic_logits = (logits_real.detach(), logits_fake.detach())
        update("fake_score", fake_loss)
        return StepOutput(logs, critic_logits)
