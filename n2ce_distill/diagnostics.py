"""What to watch while a critic trains (SPEC section 2, "Diagnostics"), and which regime it is in.

The critic logit is read as ``l = log r = log p_data / q``. On a data batch and a noise batch:

- ``acc_data = P_data(l > 0)``, ``acc_noise = P_noise(l < 0)``: the classifier view;
- ``logit_data = E_data l``, ``logit_noise = E_noise l`` and their difference ``logit_gap``;
- ``logit_rms = sqrt(mean of l^2 over both batches)``: how far from 0 the logits are;
- ``kl_estimate = E_data l``, an estimate of ``KL(p_data || q)`` when ``l`` is the true log-ratio;
- ``self_normalisation = log E_noise exp(l)``: a proper ratio integrates to one under ``q``
  (``E_q r = 1``), so this is near 0 on large batches in low dimension. It is a biased estimate:
  for the true ratio of the density-chasm problem it reads about -0.4 at d = 40 but -18..-27 at
  d = 160 on 100k samples, so compare it with the true ratio's reading where one is known;
- ``capped_noise`` (with ``M``, for N²CE): the fraction of noise samples with ``r > M``, where the
  noise-side weight ``M r / (M + r)`` is capped near ``M``.

``regime`` names what the objective choice can change (see ``docs/REGIMES.md``):

- ``"linear"``: ``logit_rms < LINEAR_RMS`` (0.1). To first order in ``l`` NCE, N²CE and CD give the same
  per-sample weights up to one constant, and the corrections are at most ``|l|`` relative
  (``objectives`` module docstring), so below 0.1 they are within 10%: swapping the objective changes
  the step size, not the direction. This is sufficient, not necessary: a heavily regularised critic
  can behave alike under every objective at larger logits too.
- ``"chasm"``: not linear, and both accuracies above ``CHASM_ACCURACY`` (0.99): the classifier separates
  the samples and the logistic loss no longer pins down the log-ratio (Rhodes et al. 2020), which then
  badly underestimates the KL. This is where N²CE's magnified noise is meant to help. (Tiny logits that
  separate the batches perfectly are still linear: every objective gives them the same update.)
- ``"informative"``: anything else: the logits are large enough for the objectives to differ.
"""

from __future__ import annotations

import math

import torch

__all__ = ["ChasmWarning", "LINEAR_RMS", "CHASM_ACCURACY", "REGIMES", "critic_diagnostics", "chasm_warning",
           "RegimeMonitor"]

LINEAR_RMS = 0.1  # first-order weight corrections (at most |l| relative) below 10%
CHASM_ACCURACY = 0.99  # both sides classified this well: the density chasm
REGIMES = ("linear", "informative", "chasm")  # TensorBoard logs the index


class ChasmWarning(UserWarning):
    """Warning category for a saturated critic (filter it with ``warnings.simplefilter``)."""


def _flat(logits: torch.Tensor, name: str) -> torch.Tensor:
    """Detached, flattened, at least fp32 (bf16 logits would round the means; float64 stays float64)."""
    flat = torch.as_tensor(logits).detach().reshape(-1)
    flat = flat if flat.dtype == torch.float64 else flat.float()
    if flat.numel() == 0:
        raise ValueError(f"{name} is empty")
    return flat


def _regime(acc_data: float, acc_noise: float, logit_rms: float) -> str:
    # linear first: tiny logits give every objective the same update, even when their signs separate
    # the batches perfectly (the logistic loss saturates only at large logits)
    if logit_rms < LINEAR_RMS:
        return "linear"
    return "chasm" if acc_data > CHASM_ACCURACY and acc_noise > CHASM_ACCURACY else "informative"


def critic_diagnostics(logits_data: torch.Tensor, logits_noise: torch.Tensor,
                       M: float | None = None) -> dict[str, float | str]:
    """Summary statistics of critic logits on data and on noise (any shapes; flattened).

    Returns floats ``acc_data``, ``acc_noise``, ``logit_data``, ``logit_noise``, ``logit_gap``,
    ``logit_rms``, ``kl_estimate``, ``self_normalisation`` (and ``capped_noise`` when ``M`` is given),
    and the string ``regime``. The log-mean-exp uses ``logsumexp(l) - log n``, finite for any fp32 ``l``.
    """
    ld = _flat(logits_data, "logits_data")
    ln = _flat(logits_noise, "logits_noise").to(ld.dtype)
    stats = {
        "acc_data": (ld > 0).to(ld.dtype).mean(),
        "acc_noise": (ln < 0).to(ld.dtype).mean(),
        "logit_data": ld.mean(),
        "logit_noise": ln.mean(),
        "logit_gap": ld.mean() - ln.mean(),
        "logit_rms": torch.cat([ld, ln]).square().mean().sqrt(),
        "kl_estimate": ld.mean(),
        "self_normalisation": torch.logsumexp(ln, dim=0) - math.log(ln.numel()),
    }
    if M is not None:
        if not (M > 0 and math.isfinite(M)):
            raise ValueError(f"M (noise magnification) must be a finite number > 0, got {M!r}")
        stats["capped_noise"] = (ln > math.log(M)).to(ld.dtype).mean()
    # one read from the device for all of them (each .item() would wait for the device on its own)
    diag: dict[str, float | str] = dict(zip(stats, torch.stack(list(stats.values())).tolist()))
    diag["regime"] = _regime(diag["acc_data"], diag["acc_noise"], diag["logit_rms"])
    return diag


def chasm_warning(diag: dict, threshold: float = CHASM_ACCURACY) -> str | None:
    """A message when both accuracies in ``diag`` exceed ``threshold``, else ``None``."""
    if diag["acc_data"] <= threshold or diag["acc_noise"] <= threshold:
        return None
    return (f"critic accuracy saturated (data {diag['acc_data']:.3f}, noise {diag['acc_noise']:.3f} > {threshold}): "
            "the classifier wins but the log-ratio is likely wrong (density chasm; KL estimate "
            f"{diag['kl_estimate']:.3g}, self-normalisation {diag['self_normalisation']:.3g}). "
            "Try a larger noise magnification M (N2CE), multistage waymarks, or log-ratio regularisation "
            "(ratio_reg).")


class RegimeMonitor:
    """Follows a critic's regime over a run and says, in plain words and once each, when the run stays
    in the linear regime and when it enters the chasm.

    :meth:`observe` takes the diagnostics of each logged step and returns the messages to show now
    (usually none). The linear message comes after ``patience`` consecutive linear observations (5: 250
    iterations at the default ``train.log_every``).
    """

    def __init__(self, patience: int = 5):
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience!r}")
        self.patience = patience
        self.counts = dict.fromkeys(REGIMES, 0)
        self._linear_since: int | None = None
        self._linear_run = 0
        self._said: set[str] = set()

    def observe(self, step: int, diag: dict) -> list[str]:
        regime = diag["regime"]
        self.counts[regime] += 1
        messages = []
        if regime == "linear":
            self._linear_since = step if self._linear_run == 0 else self._linear_since
            self._linear_run += 1
        else:
            self._linear_run = 0
        if self._linear_run >= self.patience and "linear" not in self._said:
            self._said.add("linear")
            messages.append(
                f"step {step}: the critic's logits have stayed near 0 since step {self._linear_since} "
                f"(RMS {diag['logit_rms']:.3g} < {LINEAR_RMS}, the linear regime): NCE, N²CE and CD give the same "
                "update here up to a scale, so swapping the critic objective changes only the step size.")
        if regime == "chasm" and "chasm" not in self._said:
            self._said.add("chasm")
            messages.append(f"step {step}: the critic entered the density chasm: {chasm_warning(diag)}")
        return messages

    def summary(self) -> str | None:
        """One line with the share of logged steps in each regime, and what it means when most were linear
        (``None`` before any observation)."""
        total = sum(self.counts.values())
        if not total:
            return None
        shares = ", ".join(f"{name} {100 * count / total:.0f}%" for name, count in self.counts.items())
        reading = ("; mostly linear: another critic objective would have changed the step size, not the updates"
                   if self.counts["linear"] >= total / 2 else "")
        return f"critic regime over {total} logged steps: {shares}{reading}"
