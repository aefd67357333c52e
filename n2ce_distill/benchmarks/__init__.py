"""Benchmarks: each ``run(quick: bool, out: Path) -> str`` returns a markdown table and saves its plots into
``out``; one that takes arguments (``train_step``) has ``run(quick, out, args)``.
``n2ce-distill bench NAME [ARGS ...] [--quick] [--out DIR]`` runs one.

- ``chasm``: the density chasm (TRE's d/4-nat Gaussians): NCE, N²CE(M), NWJ, TRE, multi-stage N²CE.
- ``mle_gradient``: the expected N²CE gradient against the analytic MLE gradient, SCE, trajectories.
- ``u_curve``: finite-sample gradient MSE against M for several n; best M against sqrt(n).
- ``overhead``: critic step time of NCE, N²CE and a naive M-noise-copies implementation.
- ``gauss_distill``: a Gaussian generator distilled towards the chasm Gaussian through a critic trained with
  each objective; exact KL against iterations (does the objective matter inside the chasm?).
- ``train_step RECIPE [key=value ...]``: FLOPs and time of one training iteration of any recipe, per phase, in
  fp32 and bf16, as a fraction of the machine's measured matmul peak; and of sampling (see :mod:`.train_step`).
- ``dxmi_toy``, ``dxmi_digits``, ``sid_digits``, ``dmd2_digits``: distillation with cd / nce / n2ce (or GAN /
  NCE / N²CE adversarial critics) at equal iterations over seeds (see :mod:`.distill`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from importlib import import_module
from typing import Callable

__all__ = ["BENCHMARKS"]


class _Registry(Mapping):
    """Benchmark name -> ``run(quick, out) -> str``, importing a benchmark's module only when it is looked up,
    so ``n2ce-distill --help`` lists the names without importing the benchmarks."""

    def __init__(self, entries: dict[str, str]):
        self._entries = entries  # name -> "module:function" inside this package

    def __getitem__(self, name: str) -> Callable[..., str]:
        module, function = self._entries[name].split(":")
        return getattr(import_module(f"{__name__}.{module}"), function)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


BENCHMARKS = _Registry({
    "chasm": "chasm:run",
    "mle_gradient": "mle_gradient:run",
    "u_curve": "u_curve:run",
    "overhead": "overhead:run",
    "gauss_distill": "gauss_distill:run",
    "dxmi_toy": "distill:run_dxmi_toy",
    "dxmi_digits": "distill:run_dxmi_digits",
    "sid_digits": "distill:run_sid_digits",
    "dmd2_digits": "distill:run_dmd2_digits",
    "train_step": "train_step:run",
})
