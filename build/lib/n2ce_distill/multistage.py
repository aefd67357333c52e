r"""Multi-stage (telescoping) ratio estimation: waymarks and a K-head critic whose logits sum.

From coupled pairs ``(x_data, x_noise)`` build waymarks ``x_k = sqrt(1 - a_k^2) x_data + a_k x_noise``,
``0 = a_0 < ... < a_K = 1``, so ``x_0 = x_data`` and ``x_K = x_noise``. With ``p_k`` the law of ``x_k``,

    log p_data / q = log p_0 / p_K = sum_{k<K} log p_k / p_{k+1},

so head ``k`` is trained with any critic objective on ``x_k`` ("data") against ``x_{k+1}`` ("noise"),
and the total log-ratio is the sum of head logits. Adjacent waymarks overlap far more than the
endpoints, which cuts the variance of each stage (the density chasm). Useful in low/medium dimension
(the paper uses K = 3); in high dimension prefer the log-ratio regulariser.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from .objectives import CriticObjective

__all__ = ["waymark_coefficients", "waymarks", "MultiStageCritic", "multistage_loss"]

Tensor = torch.Tensor


def waymark_coefficients(K: int, power: float = 1.0) -> Tensor:
    """Mixing coefficients ``a_k = (k/K)^power``, k = 0..K (float64, K+1 values from 0 to 1).

    ``power > 1`` packs waymarks near the data end, ``power < 1`` near the noise end.
    """
    if int(K) != K or K < 1:
        raise ValueError(f"K (number of stages) must be an integer >= 1, got {K!r}")
    if not (power > 0 and math.isfinite(power)):
        raise ValueError(f"power must be a finite number > 0, got {power!r}")
    return (torch.arange(int(K) + 1, dtype=torch.float64) / K) ** power


def _check_coefficients(a: Sequence[float] | Tensor) -> list[float]:
    a = [float(v) for v in a]
    if len(a) < 2 or a[0] != 0.0 or a[-1] != 1.0:
        raise ValueError(f"waymark coefficients a must run from 0 to 1 (at least 2 values), got {a}")
    if any(hi <= lo for lo, hi in zip(a, a[1:])):
        raise ValueError(f"waymark coefficients a must be strictly increasing, got {a}")
    return a


def waymarks(x_data: Tensor, x_noise: Tensor, a: Sequence[float] | Tensor) -> list[Tensor]:
    """The K+1 waymarks ``sqrt(1 - a_k^2) x_data + a_k x_noise`` from the same coupled pairs."""
    if x_data.shape != x_noise.shape:
        raise ValueError(f"x_data and x_noise must have the same shape, got "
                         f"{tuple(x_data.shape)} and {tuple(x_noise.shape)}")
    return [math.sqrt(1.0 - ak * ak) * x_data + ak * x_noise for ak in _check_coefficients(a)]


class MultiStageCritic(nn.Module):
    """K critic heads; ``forward`` returns the total ``log r = sum_k l_k(x)``.

    Each head maps ``x`` (plus any extra arguments, e.g. ``cond``) to logits; head ``k`` estimates
    ``log p_k / p_{k+1}`` between adjacent waymarks.
    """

    def __init__(self, critics: Sequence[nn.Module]):
        super().__init__()
        if len(critics) < 1:
            raise ValueError("MultiStageCritic needs at least one critic")
        self.heads = nn.ModuleList(critics)

    @property
    def num_stages(self) -> int:
        return len(self.heads)

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        return sum(head(x, *args, **kwargs) for head in self.heads)


def multistage_loss(critic: MultiStageCritic, objective: CriticObjective, x_data: Tensor, x_noise: Tensor,
                    a: Sequence[float] | Tensor | None = None, *, weight: Tensor | None = None,
                    **critic_kwargs) -> Tensor:
    """Sum over stages of ``objective(head_k(x_k), head_k(x_{k+1}))``.

    ``a`` defaults to linear coefficients for ``critic.num_stages`` stages. ``weight`` (per coupled
    pair) is used on both sides of every stage; ``critic_kwargs`` (e.g. ``cond``) go to every head.
    K = 1 is exactly the single-stage objective on ``(x_data, x_noise)``.
    """
    if a is None:
        a = waymark_coefficients(critic.num_stages)
    xs = waymarks(x_data, x_noise, a)
    if len(xs) != critic.num_stages + 1:
        raise ValueError(f"{len(xs)} waymark coefficients for {critic.num_stages} stages; need K+1")
    total = 0.0
    for k, head in enumerate(critic.heads):
        total = total + objective(head(xs[k], **critic_kwargs), head(xs[k + 1], **critic_kwargs),
                                  weight, weight)
    return total
