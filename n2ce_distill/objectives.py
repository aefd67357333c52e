r"""Critic objectives on logits (the distinguishability-game family) and generator-side terms.

A critic outputs a logit ``l(x)`` read directly as ``log r(x) = log p_data(x) / q(x)``, where ``q`` is
the "noise" (in distillation: the student's samples). Data logits ``ld`` come from ``x ~ p_data``,
noise logits ``ln`` from ``x' ~ q``; both batches have the same size (N²CE does not draw more noise).
All losses are minimised:

* NCE (= GAN discriminator BCE): ``E_d softplus(-l) + E_n softplus(l)``. Optimum ``l* = log p/q``.
* N²CE(M): ``E_d softplus(log M - l) + M E_n softplus(l - log M)``. Same optimum ``l* = log p/q`` for
  every ``M > 0``; ``M = 1`` is NCE. Per-sample gradient wrt ``l`` (with ``r = e^l``): data
  ``-M/(M+r)``, noise ``+M r/(M+r)``. Both stay O(1) as M grows, so no loss rescaling is needed. The
  expected gradient wrt critic parameters is ``-∫ M/(M+r) (p - q e^l) ∇l dx``: as M -> inf it tends to
  the (negated) MLE gradient ``E_data ∇l - E_model ∇l`` of the model ``q e^l``, bias O(1/M) in norm.
* NWJ (the M -> inf limit): ``-(E_d l - E_n e^l + 1)``; optimum ``log p/q`` with value ``-KL(p||q)``.
* CD (DxMI's energy loss): ``-E_d l + E_n l``: MLE-style gradient, unbounded below, needs the
  log-ratio regulariser ``gamma (E_d l^2 + E_n l^2)`` (``ratio_reg`` on the classes).

Small-logit limit (why critics whose logits stay near 0 cannot tell the objectives apart). Write
``w_d(l)`` and ``w_n(l)`` for the per-sample gradient of the loss wrt ``l`` on a data and a noise sample
(the parameter gradient is ``E_d w_d ∇l + E_n w_n ∇l``). To first order in ``l``:

* CD: ``w_d = -1``, ``w_n = +1`` exactly;
* NCE: ``w_d = -σ(-l) ≈ -(1/2)(1 - l/2)``, ``w_n = σ(l) ≈ (1/2)(1 + l/2)``;
* N²CE(M): ``w_d = -M/(M+r) ≈ -(M/(M+1))(1 - l/(M+1))``, ``w_n = M r/(M+r) ≈ (M/(M+1))(1 + M l/(M+1))``;
* NWJ: ``w_d = -1``, ``w_n = r ≈ 1 + l``.

So while ``|l| << 1`` every objective is CD times a constant (``1/2`` for NCE, ``M/(M+1)`` for N²CE) plus a
relative correction of at most ``|l|`` per sample; an optimiser such as Adam removes the constant. The
objectives differ only when the critic is confident (``|l|`` of order 1 or more; the density chasm is the
extreme). :func:`~n2ce_distill.diagnostics.critic_diagnostics` labels a batch ``"linear"`` when the RMS
logit is below 0.1, where these corrections are below 10%. ``docs/REGIMES.md`` has the derivation.

Divergence view: with ``alpha = M/(1+M)``, ``m = alpha q + (1-alpha) p`` and
``D_alpha = (1-alpha) KL(p||m) + alpha KL(q||m)``, ``D_alpha = h(alpha) - min_l N²CE_M / (1+M)``
(``h`` the binary entropy in nats): JS at M=1, and ``(1+M) D_alpha -> KL(p||q)`` as M -> inf.

Naive reweighting ``softplus(-g) + k softplus(g)`` is N²CE with ``g = l - log M``, ``k = M``: the same
optimiser, but its raw output reads ``log r - log M``, and a regulariser on ``g`` pulls ``r`` towards ``M``
instead of 1. Here the critic output is always ``log r`` itself.

Numerics: every loss is computed in (at least) float32 with autocast disabled, whatever the input
dtype (bf16/fp16 inputs are upcast; float64 stays float64). Losses and gradients are finite for
``|l|`` up to 1e4 and M in [1e-3, 1e8]. ``e^l`` uses :func:`stable_exp`, exact below a threshold and
linearly extended above it. Logits may have any shape, e.g. (B,) or (B, H, W) for patch critics: each
expectation is the mean over all elements. Optional weights (e.g. SiDA's lambda(sigma)) of shape (B,) or
the logits' shape broadcast from the leading dimension; a weighted expectation is ``mean(w * loss)``.
"""

from __future__ import annotations

import inspect
import math
from abc import ABC, abstractmethod
from functools import partial
from typing import Annotated, Callable

import torch
import torch.nn.functional as F
from annotated_types import Gt

__all__ = [
    "stable_exp", "nce_loss", "n2ce_loss", "nwj_loss", "cd_loss", "ratio_regularizer",
    "CriticObjective", "NCE", "N2CE", "NWJ", "CD", "OBJECTIVES", "build_objective",
    "generator_minimax", "generator_nonsat", "generator_n2ce_nonsat", "generator_reverse_kl", "generator_mle",
    "GENERATOR_LOSSES", "build_generator_loss",
]

Tensor = torch.Tensor
Weight = Tensor | None  # per-sample (B,) or per-element weights


def _upcast(x: Tensor) -> Tensor:
    # float64 callers (quadrature, tests) keep their precision; everything narrower goes to fp32.
    return x if x.dtype == torch.float64 else x.float()


def _expect(values: Tensor, weight: Weight) -> Tensor:
    """Mean of ``values`` (already fp32+), optionally weighted per leading index or per element."""
    if weight is None:
        return values.mean()
    w = torch.as_tensor(weight, device=values.device, dtype=values.dtype)
    # a (B,) weight must align with the leading (batch) dim of (B, H, W) logits, not the trailing one
    if 0 < w.dim() < values.dim():
        w = w.reshape(w.shape + (1,) * (values.dim() - w.dim()))
    return (w * values).mean()


def _no_autocast(x: Tensor) -> torch.autocast:
    return torch.autocast(device_type=x.device.type, enabled=False)


def _check_M(M: float) -> float:
    M = float(M)
    if not (M > 0 and math.isfinite(M)):
        raise ValueError(f"M (noise magnification) must be a finite number > 0, got {M!r}")
    return M


def stable_exp(l: Tensor, threshold: float = 50.0) -> Tensor:
    """``exp(l)`` for ``l <= threshold``, ``exp(t) (1 + l - t)`` above (C^1 linear extension).

    With ``t = 50`` the value at ``l = 1e4`` is ~5e25 and the gradient is capped at ``e^50``: finite in
    fp32 (and in sums over millions of elements), while any ratio a critic should produce, ``r <= e^50``,
    is exact. Gradients are NaN-free because the exp branch only sees clamped inputs.
    """
    e = torch.exp(l.clamp(max=threshold))
    return torch.where(l > threshold, e * (1.0 + (l - threshold)), e)


def nce_loss(ld: Tensor, ln: Tensor, weight_data: Weight = None, weight_noise: Weight = None) -> Tensor:
    """NCE / GAN discriminator loss ``E_d softplus(-l) + E_n softplus(l)``; optimum ``l = log p/q``."""
    return n2ce_loss(ld, ln, 1.0, weight_data, weight_noise)


def n2ce_loss(ld: Tensor, ln: Tensor, M: float = 100.0,
              weight_data: Weight = None, weight_noise: Weight = None) -> Tensor:
    """N²CE: ``E_d softplus(log M - l) + M E_n softplus(l - log M)``.

    Minimised at ``l = log p/q`` for every ``M > 0``. Per-sample gradient wrt ``l``: data ``-M/(M+r)``,
    noise ``M r/(M+r)`` (both bounded by M and O(1) in M for moderate r).
    """
    log_M = math.log(_check_M(M))
    with _no_autocast(ld):
        ld, ln = _upcast(ld), _upcast(ln)
        data = _expect(F.softplus(log_M - ld), weight_data)
        noise = _expect(F.softplus(ln - log_M), weight_noise)
        return data + M * noise


def nwj_loss(ld: Tensor, ln: Tensor, weight_data: Weight = None, weight_noise: Weight = None) -> Tensor:
    """NWJ: ``-(E_d l - E_n e^l + 1)``; optimum ``l = log p/q`` where it equals ``-KL(p||q)``.

    Per element: data ``-l``, noise ``e^l - 1`` (so weights scale the constant too: weight 2 everywhere
    doubles the loss). ``e^l`` is :func:`stable_exp` (linear beyond l = 50): finite for huge logits.
    """
    with _no_autocast(ld):
        ld, ln = _upcast(ld), _upcast(ln)
        return -_expect(ld, weight_data) + _expect(stable_exp(ln) - 1.0, weight_noise)


def cd_loss(ld: Tensor, ln: Tensor, weight_data: Weight = None, weight_noise: Weight = None) -> Tensor:
    """Contrastive-divergence / DxMI energy loss ``-E_d l + E_n l`` (unbounded: regularise it)."""
    with _no_autocast(ld):
        return -_expect(_upcast(ld), weight_data) + _expect(_upcast(ln), weight_noise)


def ratio_regularizer(ld: Tensor, ln: Tensor,
                      weight_data: Weight = None, weight_noise: Weight = None) -> Tensor:
    """Log-ratio regulariser ``E_d l^2 + E_n l^2`` (pulls ``r`` towards 1 where data are scarce)."""
    with _no_autocast(ld):
        ld, ln = _upcast(ld), _upcast(ln)
        return _expect(ld.square(), weight_data) + _expect(ln.square(), weight_noise)


class CriticObjective(ABC):
    """A critic loss as a small callable holding its hyperparameters, and what a loop asks of it.

    ``objective(ld, ln, weight_data=None, weight_noise=None)`` returns the scalar loss to minimise:
    :meth:`loss` plus ``ratio_reg * (E_d l^2 + E_n l^2)``. ``M`` is the noise magnification for the
    objectives that have one (N²CE) and ``None`` for the others. A loop reads the objective's
    :attr:`log_offset` (where a critic that cannot tell the two sides apart puts its logit) and its
    consistent generator term :meth:`generator_loss`; a recipe sets the :meth:`parameters` its ``__init__``
    takes, under ``critic.``. A new objective is a subclass registered in :data:`OBJECTIVES`.
    """

    M: float | None = None

    @classmethod
    def parameters(cls) -> dict[str, inspect.Parameter]:
        """The hyperparameters a recipe gives this objective besides ``ratio_reg``: its ``__init__`` arguments, whose
        annotations (with ``annotated_types`` constraints) and defaults are the schema of its ``critic.`` keys."""
        return {name: p for name, p in inspect.signature(cls.__init__, eval_str=True).parameters.items() if name not in ("self", "ratio_reg")}

    @property
    def log_offset(self) -> float:
        """The logit at which the loss's two sides balance when ``p = q``: 0, or ``log M`` for N²CE. Clamps and
        the generator term are centred here."""
        return 0.0

    def generator_loss(self, l: Tensor, weight: Weight = None) -> Tensor:
        """The generator's non-saturating term consistent with this objective, on logits of generated samples:
        ``softplus(log_offset - l)`` (NCE / GAN ``-log D``; N²CE ``softplus(log M - l)``, gradient ``-M/(M+r)``)."""
        return _nonsat_at(self.log_offset, l, weight)

    def __init__(self, ratio_reg: float = 0.0):
        ratio_reg = float(ratio_reg)
        if not (ratio_reg >= 0 and math.isfinite(ratio_reg)):
            raise ValueError(f"ratio_reg must be a finite number >= 0, got {ratio_reg!r}")
        self.ratio_reg = ratio_reg

    @abstractmethod
    def loss(self, ld: Tensor, ln: Tensor, weight_data: Weight = None,
             weight_noise: Weight = None) -> Tensor:
        """The unregularised objective."""

    def __call__(self, ld: Tensor, ln: Tensor, weight_data: Weight = None,
                 weight_noise: Weight = None) -> Tensor:
        out = self.loss(ld, ln, weight_data, weight_noise)
        if self.ratio_reg > 0:
            out = out + self.ratio_reg * ratio_regularizer(ld, ln, weight_data, weight_noise)
        return out

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v:g}" for k, v in sorted(vars(self).items()))
        return f"{type(self).__name__}({params})"


class NCE(CriticObjective):
    """NCE / GAN discriminator BCE (see :func:`nce_loss`)."""

    def loss(self, ld, ln, weight_data=None, weight_noise=None):
        return nce_loss(ld, ln, weight_data, weight_noise)


class N2CE(CriticObjective):
    """N²CE with noise magnification ``M`` (see :func:`n2ce_loss`); the paper uses M=100 at batch 128."""

    def __init__(self, M: Annotated[float, Gt(0)] = 100.0, ratio_reg: float = 0.0):
        super().__init__(ratio_reg)
        self.M = _check_M(M)

    @property
    def log_offset(self) -> float:
        return math.log(self.M)

    def loss(self, ld, ln, weight_data=None, weight_noise=None):
        return n2ce_loss(ld, ln, self.M, weight_data, weight_noise)


class NWJ(CriticObjective):
    """NWJ / KL variational bound (see :func:`nwj_loss`)."""

    def loss(self, ld, ln, weight_data=None, weight_noise=None):
        return nwj_loss(ld, ln, weight_data, weight_noise)


class CD(CriticObjective):
    """Contrastive divergence (see :func:`cd_loss`). With ``ratio_reg = gamma > 0`` its optimum on a
    discrete space is ``l = (p - q) / (2 gamma (p + q))``, not ``log p/q``."""

    def loss(self, ld, ln, weight_data=None, weight_noise=None):
        return cd_loss(ld, ln, weight_data, weight_noise)


OBJECTIVES: dict[str, type[CriticObjective]] = {"nce": NCE, "n2ce": N2CE, "nwj": NWJ, "cd": CD, "gan": NCE}


def _lookup(registry: dict, name: str, kind: str):
    key = str(name).lower()
    if key not in registry:
        raise ValueError(f"unknown {kind} {name!r}; valid names: {', '.join(sorted(registry))}")
    return registry[key]


def build_objective(name: str, **kw) -> CriticObjective:
    """Instantiate a registered objective, e.g. ``build_objective("n2ce", M=50, ratio_reg=1.0)``.

    Unknown keyword arguments (e.g. ``M`` for ``"nce"``) raise a ValueError rather than being ignored.
    """
    cls = _lookup(OBJECTIVES, name, "objective")
    accepted = {*cls.parameters(), "ratio_reg"}
    unexpected = sorted(set(kw) - accepted)
    if unexpected:
        raise ValueError(f"objective {name!r} does not take {', '.join(unexpected)}; "
                         f"accepted: {', '.join(sorted(accepted))}")
    return cls(**kw)


# Generator-side terms on logits of *generated* samples (what the generator minimises).

def _generator_term(values_fn: Callable[[Tensor], Tensor], l: Tensor, weight: Weight) -> Tensor:
    with _no_autocast(l):
        return _expect(values_fn(_upcast(l)), weight)


def generator_minimax(l: Tensor, weight: Weight = None) -> Tensor:
    """Minimax GAN ``-softplus(l)`` (= ``log(1 - D)``); gradient ``-sigmoid(l)`` vanishes when D wins."""
    return _generator_term(lambda x: -F.softplus(x), l, weight)


def _nonsat_at(offset: float, l: Tensor, weight: Weight) -> Tensor:
    """The non-saturating term centred at a logit offset: ``softplus(offset - l)``."""
    return _generator_term(lambda x: F.softplus(offset - x), l, weight)


def generator_nonsat(l: Tensor, weight: Weight = None) -> Tensor:
    """Non-saturating GAN ``softplus(-l)`` (= ``-log D``); gradient ``-1/(1+r)``."""
    return _nonsat_at(0.0, l, weight)


def generator_n2ce_nonsat(l: Tensor, M: float, weight: Weight = None) -> Tensor:
    """N²CE-consistent non-saturating term ``softplus(log M - l)``; gradient ``-M/(M+r)``."""
    return _nonsat_at(math.log(_check_M(M)), l, weight)


def generator_reverse_kl(l: Tensor, weight: Weight = None) -> Tensor:
    """Reverse-KL reward ``-l`` since ``KL(q||p) = -E_q log r`` (energy-based / DxMI use); gradient -1."""
    return _generator_term(torch.neg, l, weight)


def generator_mle(l: Tensor, weight: Weight = None) -> Tensor:
    """MLE-recovering term ``-e^l`` (Goodfellow 2014, sec. 4): correct expected gradient ``-r``, very
    high variance. ``e^l`` is :func:`stable_exp`."""
    return _generator_term(lambda x: -stable_exp(x), l, weight)


GENERATOR_LOSSES: dict[str, Callable[..., Tensor]] = {
    "minimax": generator_minimax, "nonsat": generator_nonsat, "n2ce_nonsat": generator_n2ce_nonsat,
    "kl": generator_reverse_kl, "mle": generator_mle,
}


def build_generator_loss(name: str, M: float | None = None) -> Callable[..., Tensor]:
    """Return ``fn(logits, weight=None) -> scalar`` for a registered generator term.

    ``M`` is required by ``"n2ce_nonsat"`` and ignored by the others, so a config can always pass it.
    """
    fn = _lookup(GENERATOR_LOSSES, name, "generator loss")
    if fn is generator_n2ce_nonsat:
        if M is None:
            raise ValueError("generator loss 'n2ce_nonsat' needs M (noise magnification)")
        return partial(generator_n2ce_nonsat, M=_check_M(M))
    return fn
