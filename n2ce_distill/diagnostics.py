"""What to watch while a critic trains (SPEC section 2, "Diagnostics").

The critic logit is read as ``l = log r = log p_data / q``. On a data batch and a noise batch:

- ``acc_data = P_data(l > 0)``, ``acc_noise = P_noise(l < 0)``: the classifier view;
- ``logit_data = E_data l``, ``logit_noise = E_noise l``;
- ``kl_estimate = E_data l``, an estimate of ``KL(p_data || q)`` when ``l`` is the true log-ratio;
- ``self_normalisation = log E_noise exp(l)``: a proper ratio integrates to one under ``q``
  (``E_q r = 1``), so this is near 0; far from 0 means ``l`` is off by a constant or in shape.

Both accuracies near 1 is the density chasm (Rhodes et al. 2020): the classifier separates the
samples easily, so the loss is nearly zero, and the logistic loss no longer pins down the
log-ratio, which then badly underestimates the KL. :func:`chasm_warning` says so.
"""

from __future__ import annotations

import math

import torch

__all__ = ["ChasmWarning", "critic_diagnostics", "chasm_warning"]


class ChasmWarning(UserWarning):
    """Warning category for a saturated critic (filter it with ``warnings.simplefilter``)."""


def _flat(logits: torch.Tensor, name: str) -> torch.Tensor:
    """Detached, flattened, at least fp32 (bf16 logits would round the means; float64 stays float64)."""
    flat = torch.as_tensor(logits).detach().reshape(-1)
    flat = flat if flat.dtype == torch.float64 else flat.float()
    if flat.numel() == 0:
        raise ValueError(f"{name} is empty")
    return flat


def critic_diagnostics(logits_data: torch.Tensor, logits_noise: torch.Tensor) -> dict[str, float]:
    """Summary statistics of critic logits on data and on noise (any shapes; flattened).

    Returns floats: ``acc_data``, ``acc_noise``, ``logit_data``, ``logit_noise``, ``kl_estimate``,
    ``self_normalisation``. The log-mean-exp uses ``logsumexp(l) - log n``, finite for any fp32 ``l``.
    """
    ld = _flat(logits_data, "logits_data")
    ln = _flat(logits_noise, "logits_noise")
    return {
        "acc_data": (ld > 0).float().mean().item(),
        "acc_noise": (ln < 0).float().mean().item(),
        "logit_data": ld.mean().item(),
        "logit_noise": ln.mean().item(),
        "kl_estimate": ld.mean().item(),
        "self_normalisation": (torch.logsumexp(ln, dim=0) - math.log(ln.numel())).item(),
    }


def chasm_warning(diag: dict[str, float], threshold: float = 0.99) -> str | None:
    """A message when both accuracies in ``diag`` exceed ``threshold``, else ``None``."""
    if diag["acc_data"] <= threshold or diag["acc_noise"] <= threshold:
        return None
    return (f"critic accuracy saturated (data {diag['acc_data']:.3f}, noise {diag['acc_noise']:.3f} > {threshold}): "
            "the classifier wins but the log-ratio is likely wrong (density chasm; KL estimate "
            f"{diag['kl_estimate']:.3g}, self-normalisation {diag['self_normalisation']:.3g}). "
            "Try a larger noise magnification M (N2CE), multistage waymarks, or log-ratio regularisation "
            "(ratio_reg).")
