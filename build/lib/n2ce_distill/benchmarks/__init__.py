"""Density-ratio benchmarks (SPEC section 3): each ``run(quick: bool, out: Path) -> str`` returns a markdown
table and saves a PNG plot into ``out``. ``n2ce-distill bench NAME [--quick] [--out DIR]`` runs one.

- ``chasm``: the density chasm (TRE's d/4-nat Gaussians): NCE, N²CE(M), NWJ, TRE, multi-stage N²CE.
- ``mle_gradient``: the expected N²CE gradient against the analytic MLE gradient, SCE, trajectories.
- ``u_curve``: finite-sample gradient MSE against M for several n; best M against sqrt(n).
- ``overhead``: critic step time of NCE, N²CE and a naive M-noise-copies implementation.
- ``gauss_distill``: a Gaussian generator distilled towards the chasm Gaussian through a critic trained with
  each objective; exact KL against iterations (does the objective matter inside the chasm?).
- ``dxmi_toy``, ``dxmi_digits``, ``sid_digits``: distillation with cd / nce / n2ce (or GAN / NCE / N²CE
  adversarial critics) at equal iterations over seeds (see :mod:`.distill`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from . import chasm, distill, gauss_distill, mle_gradient, overhead, u_curve

__all__ = ["BENCHMARKS"]

BENCHMARKS: dict[str, Callable[..., str]] = {
    "chasm": chasm.run,
    "mle_gradient": mle_gradient.run,
    "u_curve": u_curve.run,
    "overhead": overhead.run,
    "gauss_distill": gauss_distill.run,
    "dxmi_toy": distill.run_dxmi_toy,
    "dxmi_digits": distill.run_dxmi_digits,
    "sid_digits": distill.run_sid_digits,
}
