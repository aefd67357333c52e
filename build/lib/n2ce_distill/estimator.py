"""Fit a critic as a density-ratio estimator between two sample sources.

``fit_density_ratio(critic, data, noise)`` trains ``l = critic(x) ~ log p_data(x) / q(x)`` by
minimising a distinguishability-game objective (default N2CE) on equal-sized minibatches, and
records the :mod:`~n2ce_distill.diagnostics` of every logged step. A source is

- a ``Tensor`` of samples (first dim = samples): minibatches of ``batch_size`` drawn uniformly
  with replacement using ``generator``;
- an iterable of batches (list, ``DataLoader``): cycled, re-iterated when exhausted; a batch that
  is a tuple / list (``(x, y)`` from a ``DataLoader``) contributes its first element;
- a callable ``f(n) -> Tensor`` returning ``n`` fresh samples (it owns its randomness).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from .diagnostics import ChasmWarning, chasm_warning, critic_diagnostics
from .objectives import CriticObjective, build_objective

__all__ = ["RatioFit", "fit_density_ratio"]

Source = torch.Tensor | Iterable[torch.Tensor] | Callable[[int], torch.Tensor]


@dataclass
class RatioFit:
    """The trained ``critic`` and ``history``: one dict per logged step with ``step``, ``loss`` and
    the keys of :func:`~n2ce_distill.diagnostics.critic_diagnostics` (on that step's minibatch)."""

    critic: nn.Module
    history: list[dict[str, float]] = field(default_factory=list)


def _as_batch(batch: object, name: str) -> torch.Tensor:
    if not isinstance(batch, torch.Tensor) or batch.ndim < 1 or batch.shape[0] == 0:
        raise ValueError(f"{name} must produce non-empty Tensor batches, got {type(batch).__name__}"
                         + (f" of shape {tuple(batch.shape)}" if isinstance(batch, torch.Tensor) else ""))
    return batch


def _batches(source: Source, name: str, batch_size: int, generator: torch.Generator | None) -> Iterator[torch.Tensor]:
    """An endless stream of batches from any of the three source kinds."""
    if isinstance(source, torch.Tensor):
        if source.ndim < 1 or source.shape[0] == 0:
            raise ValueError(f"{name} tensor must hold at least one sample along dim 0, got shape {tuple(source.shape)}")
        while True:
            yield source[torch.randint(source.shape[0], (batch_size,), generator=generator).to(source.device)]
    elif callable(source):
        while True:
            yield _as_batch(source(batch_size), name)
    elif isinstance(source, Iterable) and not isinstance(source, (str, bytes)):
        while True:
            empty = True
            for batch in source:
                empty = False
                yield _as_batch(batch[0] if isinstance(batch, (tuple, list)) else batch, name)
            if empty:
                raise ValueError(f"{name} yielded no batches (an empty iterable, or a one-shot iterator "
                                 "already exhausted; pass a re-iterable such as a list or DataLoader)")
    else:
        raise ValueError(f"{name} must be a Tensor, an iterable of batches or a callable(n) -> batch, "
                         f"got {type(source).__name__}")


def _check_positive_int(value: int, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def fit_density_ratio(critic: nn.Module, data: Source, noise: Source, objective: str | CriticObjective = "n2ce", *,
                      steps: int = 1000, batch_size: int = 256, lr: float = 1e-3,
                      optimizer: torch.optim.Optimizer | None = None, device: torch.device | str | None = None,
                      generator: torch.Generator | None = None, log_every: int = 1,
                      **objective_kwargs) -> RatioFit:
    """Train ``critic`` so that ``critic(x) ~ log p_data(x) / q_noise(x)``.

    Args:
        critic: any module mapping a batch to logits (an unconditioned critic from :mod:`.critics`).
        data, noise: sources (see the module docstring).
        objective: a name of ``objectives.OBJECTIVES`` (built with ``objective_kwargs``, e.g.
            ``M=10., ratio_reg=0.1``) or a ``CriticObjective`` instance.
        steps: optimiser steps. batch_size: samples per side per step (Tensor / callable sources).
        lr: learning rate of the default Adam; ignored when ``optimizer`` is given.
        optimizer: an optimiser over the critic's parameters (default ``Adam(lr)``).
        device: where to train (the critic is moved there); default: the critic's device.
        generator: drives the minibatch draws from Tensor sources (default: the global RNG).
        log_every: record diagnostics every ``log_every`` steps (and at the last step).

    Warns once with :class:`~n2ce_distill.diagnostics.ChasmWarning` if a logged step saturates.
    """
    _check_positive_int(steps, "steps")
    _check_positive_int(batch_size, "batch_size")
    _check_positive_int(log_every, "log_every")
    if not isinstance(critic, nn.Module):
        raise ValueError(f"critic must be a torch.nn.Module, got {type(critic).__name__}")
    param = next(critic.parameters(), None)
    if param is None:
        raise ValueError("critic has no parameters to train")
    if getattr(getattr(critic, "config", None), "conditioned", False):
        raise ValueError("critic is conditioned (conditioned=True); fit_density_ratio fits an unconditioned "
                         "critic between two fixed distributions")
    if isinstance(objective, str):
        objective = build_objective(objective, **objective_kwargs)
    elif isinstance(objective, CriticObjective):
        if objective_kwargs:
            raise ValueError(f"objective_kwargs {sorted(objective_kwargs)} only apply when objective is a name")
    else:
        raise ValueError(f"objective must be a name or a CriticObjective, got {type(objective).__name__}")
    if optimizer is None:
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr!r}")
        optimizer = torch.optim.Adam(critic.parameters(), lr=lr)

    if device is not None:
        critic.to(device)
    device, dtype = param.device if device is None else torch.device(device), param.dtype
    data_stream = _batches(data, "data", batch_size, generator)
    noise_stream = _batches(noise, "noise", batch_size, generator)

    was_training = critic.training
    critic.train()
    history: list[dict[str, float]] = []
    warned = False
    for step in range(1, steps + 1):
        x_data = next(data_stream).to(device=device, dtype=dtype)
        x_noise = next(noise_stream).to(device=device, dtype=dtype)
        logits_data, logits_noise = critic(x_data), critic(x_noise)
        loss = objective(logits_data, logits_noise)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss.item()} at step {step}; lower lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % log_every == 0 or step == steps:
            # diagnostics of the logits that produced this step's loss (pre-update; no extra forward)
            entry = {"step": step, "loss": loss.item(), **critic_diagnostics(logits_data, logits_noise)}
            history.append(entry)
            message = None if warned else chasm_warning(entry)
            if message is not None:
                warnings.warn(f"step {step}: {message}", ChasmWarning, stacklevel=2)
                warned = True
    critic.train(was_training)
    return RatioFit(critic=critic, history=history)
