"""DxMI-style few-step distillation (Yoon et al. 2024; SPEC section 5).

Networks: a T-step sampler initialised from the teacher (all weights trainable, plus learned
per-step noise ``log s_k``), a critic ``l(x)`` (log-ratio / negative energy) trained with a
swappable objective (``cd`` is DxMI's original, ``nce``, ``n2ce``), and a time-conditioned value
``V(x, k) = -l(x) + U(x, k)``: the terminal energy plus a correction ``U`` learnt by TD and initialised
at 0 (``method.share_value`` drops ``U``: DxMI's one time-independent network). For images the critic
sees ``clamp(x, -1, 1)``, the samples as exported. One iteration:

1. draw B trajectories without gradients;
2. ``v_k <- m v_k + (1 - m) mean ||x_{k+1} - x_k||^2`` from ``v_k = 1`` (adaptive velocity scale);
3. critic step: data vs ``x_T``, objective + ``gamma (E l_d^2 + E l_n^2)``;
4. value step: ``V(x_k, k) -> V(x_{k+1}, k+1)`` detached, with ``V(x_T, T) = -l(x_T)``, for the steps whose
   value is read (``k > sampler_steps_from``);
5. sampler step on transitions with ``k >= method.sampler_steps_from`` (0: all, as DxMI): re-draw
   ``x_{k+1}`` by reparameterisation and minimise
   ``V(x_{k+1}, k+1) + tau2 ||x_{k+1} - x_k||^2 / (2 v_k) - tau1 log s_k`` (per-dimension means).

Steps 4 and 5 wait until ``method.sampler_warmup_images`` images have been seen (the critic trains alone).

Class-conditional (labelled data and a conditional teacher): each trajectory is drawn for its data row's
label, so the critic compares ``(x, y)`` pairs of data and samples with the same labels; the critic ``l(x, y)``
and the correction ``U(x, k, y)`` are projection-conditional and the sampler is the conditional teacher
(guided by ``teacher.guidance_scale``, which the exported pipeline keeps).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule

from ..conditions import repeat_rows
from ..config import RecipeConfig
from ..critics import build_critic
from ..errors import InputError
from ..fewstep import FewStepSampler
from ..samplers import few_step_sigmas
from .base import StepOutput, StudentMethod, Update, critic_objective, load_teacher

__all__ = ["DxMI"]

SAMPLER_CLIP = 0.1  # DxMI clips the sampler's gradient norm at 0.1


class DxMI(StudentMethod):
    def __init__(self, recipe: RecipeConfig, sample_shape: tuple[int, ...], num_classes: int | None = None,
                 prompts: list[str] | None = None):
        super().__init__(recipe, num_classes)
        opts = recipe.method
        teacher = self.use_teacher(load_teacher(recipe, sample_shape, num_classes, prompts))
        shape, text_features = teacher.sample_shape, teacher.text_features  # latents, for a latent teacher
        try:
            sigmas = few_step_sigmas(teacher, opts.num_steps, spacing=opts.spacing)
        except ValueError as error:  # a spacing this teacher's schedule cannot give
            raise InputError(f"method.spacing: {error}") from None
        self.nets["sampler"] = FewStepSampler(self.trainable_copy(teacher), sigmas, opts.last_scale,
                                              eta=opts.eta, guidance_scale=recipe.teacher.guidance_scale)
        self.nets["critic"] = build_critic(recipe.critic, shape, num_classes=num_classes, text_features=text_features)
        if not opts.share_value:
            # U starts at 0, so V starts as the critic's energy: a freshly initialised value network's
            # gradients are a smooth random field that the sampler would follow before TD has taught it
            # anything (measured on digits: FID 11.6 -> 22 in 100 iterations, against 4.7 with U = 0)
            value = build_critic(recipe.critic, shape, conditioned=True, num_classes=num_classes,
                                 text_features=text_features)
            nn.init.zeros_(value.out.weight)
            nn.init.zeros_(value.out.bias)
            self.nets["value"] = value
        self.objective = critic_objective(recipe.critic)
        # v_k = 1 at the start, as DxMI: a step that barely moves (sigma 0.002 -> 0) has v ~ 1e-6, and a
        # penalty normalised by it at once would dominate the sampler's gradient
        self.velocity = torch.ones(opts.num_steps)

    @property
    def ema_name(self) -> str:
        return "sampler"

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        sampler = self.nets.read["sampler"]
        net_params = [p for name, p in sampler.named_parameters() if name != "log_scales"]
        optimizers = {"sampler": self.adam(sampler=net_params, log_scales=[sampler.log_scales]),
                      "critic": self.adam(critic=self.nets.read["critic"].parameters())}
        if "value" in self.nets:
            optimizers["value"] = self.adam(value=self.nets.read["value"].parameters())
        return optimizers

    def value(self, x: torch.Tensor, k: torch.Tensor, labels: torch.Tensor | None = None,
              correction: nn.Module | None = None) -> torch.Tensor:
        """Cost-to-go ``V(x, k) = -l(x) + U(x, k)``, with ``U = 0`` at the final step (and when shared); both read
        the rows' class ``labels`` in a conditional run.

        ``k`` lives on the host (a CPU tensor), so the rows that need ``U`` (``k < T``) are picked without waiting
        for the device, and ``U`` is computed on those rows only. ``correction`` is the network that computes
        ``U``: the bare one by default, since the value is read, not trained, there (and so never enters a
        distributed gradient reduction).
        """
        energy = -self.nets.read["critic"](self.space.clamp(x), class_labels=labels)
        if "value" not in self.nets:
            return energy
        correction = correction or self.nets.read["value"]
        inner = torch.nonzero(k < self.recipe.method.num_steps).squeeze(1)
        # an FSDP-sharded network's forward is a collective: every process runs it, rows or none
        if len(inner) == 0 and not isinstance(self.nets.read["value"], FSDPModule):
            return energy
        rows = inner.to(x.device)
        # U sees x as the critic does (not rescaled by c_in(sigma_k): measured, that made the 8-Gaussians
        # student diverge, SW2 > 100, where raw inputs reached 0.12)
        row_labels = None if labels is None else labels[rows]
        correction_rows = correction(x[rows], k[inner].to(device=x.device, dtype=x.dtype), class_labels=row_labels)
        return energy.index_add(0, rows, correction_rows.to(energy.dtype))

    @property
    def first_value_step(self) -> int:
        """The first step k whose ``V(., k)`` anything reads: the sampler reads ``V(x_{k+1}, k+1)`` for
        ``k >= sampler_steps_from``; TD trains no earlier step (on digits, ``sampler_steps_from = 2``, one step of
        the four). Sampling reads no value: what is exported is the sampler alone."""
        return self.recipe.method.sampler_steps_from + 1

    def training_step(self, batch: torch.Tensor, step: int, update: Update,
                      labels: torch.Tensor | None = None) -> StepOutput:
        opts = self.recipe.method
        sampler, bare_sampler = self.nets.train["sampler"], self.nets.read["sampler"]
        batch = self.space.encode(batch)
        B, T, device = batch.shape[0], opts.num_steps, batch.device
        shape = tuple(batch.shape[1:])
        with torch.no_grad(), self.phase("trajectory"):
            noise = lambda s: self.processes.randn(B, *shape, device=device)  # noqa: E731
            traj = bare_sampler.sample(B, return_trajectory=True, noise=noise, class_labels=labels)  # (T+1, B, ...)
        x_now, x_next = traj[:-1], traj[1:]

        # the running velocity stays on the device (read back only for checkpoints)
        sq_step = self.processes.mean((x_next - x_now).pow(2).flatten(2).mean(dim=2).mean(dim=1))
        self.velocity = opts.velocity_momentum * self.velocity.to(device) + (1 - opts.velocity_momentum) * sq_step

        # one forward over data and samples together: half the launches, one DDP forward per backward.
        # The critic judges the samples as the pipeline exports them, clamped to the data range: half of
        # the digits' pixels sit exactly at -1, a boundary unclamped samples can only approach, and a critic
        # that tells them apart there led the sampler into speckled backgrounds (digits, one seed: FID 4.5 ->
        # 12-15 by 350 iterations unclamped; clamped, 3.7-5.9 up to 400, and ~3 up to 800 with sampler_steps_from 2)
        logits_data, logits_noise = self.nets.train["critic"](torch.cat([batch, self.space.clamp(traj[-1])]),
                                                              class_labels=repeat_rows(labels, 2)).split(B)
        critic_loss = self.objective(logits_data, logits_noise)
        update("critic", critic_loss)
        logs = {"loss_critic": critic_loss.detach()}
        critic_logits = (logits_data.detach(), logits_noise.detach())
        if step * self.recipe.train.batch_size < opts.sampler_warmup_images:
            return StepOutput(logs, critic_logits)

        first = self.first_value_step
        if "value" in self.nets and first < T:
            n = T - first
            k_all = torch.arange(first, T).repeat_interleave(B)  # on the host: see value()
            row_labels = repeat_rows(labels, n)  # rows are step-major, as k_all
            with torch.no_grad():
                target = self.value(x_next[first:].reshape(n * B, *shape), k_all + 1, row_labels)
            with self.reading(self.nets.read["critic"]):
                value = self.value(x_now[first:].reshape(n * B, *shape), k_all, row_labels, self.nets.train["value"])
            value_loss = (value - target).pow(2).mean()
            update("value", value_loss)
            logs["loss_value"] = value_loss.detach()

        # the sampler learns from B transitions drawn from the buffer (one random step per
        # trajectory, all k >= sampler_steps_from mixed), so its cost per iteration does not grow with T
        # (steps drawn on the host: see value())
        k_host = self.processes.draw(lambda n: torch.randint(opts.sampler_steps_from, T, (n,)), B)
        k = k_host.to(device)
        x_prev = x_now[k, torch.arange(B, device=device)]
        x_new = sampler(x_prev, k, self.processes.randn(B, *shape, device=device), labels)
        velocity = self.velocity[k]
        log_scale = bare_sampler.scales()[k].log()
        running = opts.tau2 * (x_new - x_prev).pow(2).flatten(1).mean(1) / (2 * velocity) - opts.tau1 * log_scale
        # gradients reach x_new, not the critic's or U's weights
        with self.reading(*(self.nets.read[name] for name in ("critic", "value") if name in self.nets)):
            sampler_loss = (self.value(x_new, k_host + 1, labels) + running).mean()
        update("sampler", sampler_loss, clip=SAMPLER_CLIP)
        logs["loss_sampler"] = sampler_loss.detach()
        # the learned noise scales (after this update): on digits s_0 grew whenever the early steps trained
        logs.update({f"scale_{i}": s.detach() for i, s in enumerate(bare_sampler.scales())})
        return StepOutput(logs, critic_logits)

    def extra_state(self) -> dict:
        return {"velocity": self.velocity.tolist()}

    def load_extra_state(self, state: dict) -> None:
        self.velocity = torch.tensor(state["velocity"])

