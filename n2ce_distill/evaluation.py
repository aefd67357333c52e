"""FID over a run's checkpoints, exported pipelines, teacher baselines and image folders.

Inputs understood by :func:`evaluate_inputs` (and ``n2ce-distill fid``):

- a training run directory: every ``checkpoint-<step>/pipeline`` plus the final ``pipeline/``;
- an exported pipeline folder (``FewStepPipeline``);
- a teacher with a sampler: ``PATH@STEPS`` (ancestral, i.e. DDPM for a VP teacher) or
  ``PATH@STEPS:euler`` (deterministic, i.e. DDIM);
- a folder of images.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .checkpoints import list_checkpoints
from .pipelines import load_sample_source

__all__ = ["EvalInput", "resolve_inputs", "evaluate_inputs"]


@dataclass
class EvalInput:
    label: str
    step: int | None  # training step for checkpoints; None for baselines and folders
    source: Callable[[int, torch.Generator], torch.Tensor] | Path


def resolve_inputs(specs: list[str], device: str = "cpu") -> list[EvalInput]:
    """Expand each input spec into the sample sources it stands for."""
    resolved: list[EvalInput] = []
    for spec in specs:
        path_part, at, steps_part = spec.rpartition("@") if "@" in spec else (spec, "", "")
        path = Path(path_part)
        if not path.exists():
            raise FileNotFoundError(f"fid input {spec!r}: {path} does not exist")
        if at:
            steps, _, method = steps_part.partition(":")
            if not steps.isdigit():
                raise ValueError(f"fid input {spec!r}: expected PATH@STEPS[:ancestral|euler]")
            method = method or "ancestral"
            source = load_sample_source(path, steps=int(steps), method=method, device=device)
            resolved.append(EvalInput(f"{path.name} {method} {steps} steps", None, source))
        elif (path / "model_index.json").is_file():
            resolved.append(EvalInput(path.name, None, load_sample_source(path, device=device)))
        elif (path / "pipeline").is_dir() or list_checkpoints(path):
            checkpoints = list_checkpoints(path)
            for step, checkpoint in checkpoints:
                resolved.append(EvalInput(f"{path.name} {checkpoint.name}", step, load_sample_source(checkpoint / "pipeline", device=device)))
            if not checkpoints:  # a run exported without checkpoints: its final pipeline
                resolved.append(EvalInput(f"{path.name} final", None, load_sample_source(path / "pipeline", device=device)))
        else:
            resolved.append(EvalInput(path.name, None, path))  # a folder of images
    return resolved


def evaluate_inputs(
    specs: list[str],
    ref: str,
    *,
    num_samples: int,
    out: Path,
    batch_size: int = 500,
    seed: int = 0,
    inception_weights: str | None = None,
    kid: bool = False,
    prc: bool = False,
) -> str:
    """Evaluate every input against ``ref``; write ``fid.csv``, ``fid.json`` and ``fid.png`` into ``out``."""
    from .fid import evaluate_samples, fid_table, plot_fid_curve, write_rows

    rows = []
    for item in resolve_inputs(specs):
        metrics = evaluate_samples(
            item.source, ref, num_samples=num_samples, batch_size=batch_size, seed=seed,
            inception_weights=inception_weights, kid=kid, prc=prc,
        )
        rows.append({"label": item.label, "step": item.step, **metrics})
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_rows(rows, out / "fid.csv")
    write_rows(rows, out / "fid.json")
    if any(row["step"] is not None for row in rows):
        plot_fid_curve(rows, out / "fid.png")
    return fid_table(rows)
