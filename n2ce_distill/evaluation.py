"""FID over a run's checkpoints, exported pipelines, teacher baselines and image folders.

Inputs understood by :func:`evaluate_inputs` (and ``n2ce-distill fid``):

- a training run directory: every ``checkpoint-<step>/pipeline`` (one curve, labelled by the run),
  plus its ``best/`` and final ``pipeline/`` exports as rows of their own;
- an exported pipeline folder (``FewStepPipeline``);
- a teacher with a sampler: ``PATH@STEPS`` (ancestral, i.e. DDPM for a VP teacher) or
  ``PATH@STEPS:euler`` (deterministic, i.e. DDIM);
- a folder of images (all of them unless a number of samples is given).

A class-conditional input draws every class equally often; against a labelled named reference (``digits``,
``cifar10-train``) its row adds the mean per-class FID (``fid_class_mean``; each class's in ``fid.json``) and, on
digits, the label fidelity (:func:`~n2ce_distill.fid.evaluate_classes`).

With a 2-D toy as the reference (``--ref 8gaussians``, ``spirals``, ``checkerboard``) each input is scored by
:func:`~n2ce_distill.toy_metrics.toy_report` (SW2; for 8 Gaussians also the exact NLL and mode coverage)
instead of FID, and a saved sample is a ``.npy`` file or a folder holding ``samples.npy``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .checkpoints import list_checkpoints
from .errors import InputError
from .pipelines import load_sample_source

__all__ = ["EvalInput", "DEFAULT_SAMPLES", "resolve_source", "resolve_inputs", "default_extractor", "evaluate_inputs"]

DEFAULT_SAMPLES = 10_000  # drawn from a generative input when no number is given (folders: all their images)

Generate = Callable[[int, torch.Generator], torch.Tensor]


@dataclass
class EvalInput:
    label: str  # a run's checkpoints share one label: one curve
    step: int | None  # training step for checkpoints; None for exports, baselines and folders
    source: Generate | Path


def _is_run(path: Path) -> bool:
    return path.is_dir() and ((path / "pipeline").is_dir() or bool(list_checkpoints(path)))


def resolve_source(spec: str, device: str = "cpu", **labels) -> tuple[str, Generate]:
    """One sampler: ``PATH@STEPS[:ancestral|euler]`` (a teacher), a pipeline folder, or a run folder (its
    final ``pipeline/``); returns ``(label, source)``. ``labels``: ``class_labels``, ``guidance_scale`` and ``prompts`` of
    :func:`~n2ce_distill.pipelines.load_sample_source`."""
    path_part, at, steps_part = spec.rpartition("@") if "@" in spec else (spec, "", "")
    path = Path(path_part)
    if not path.exists():
        raise FileNotFoundError(f"input {spec!r}: {path} does not exist")
    if at:
        steps, _, method = steps_part.partition(":")
        if not steps.isdigit() or int(steps) < 1 or method not in ("", "ancestral", "euler"):
            raise InputError(f"input {spec!r}: expected PATH@STEPS[:ancestral|euler] with STEPS >= 1")
        method = method or "ancestral"
        source = load_sample_source(path, steps=int(steps), method=method, device=device, **labels)
        return f"{path.name} {method} {steps} steps", source
    if _is_run(path) and not (path / "model_index.json").is_file():
        return f"{path.name} final pipeline/", load_sample_source(path / "pipeline", device=device, **labels)
    return path.name, load_sample_source(path, device=device, **labels)


def resolve_inputs(specs: list[str], device: str = "cpu", guidance_scale: float | None = None,
                   prompts: list[str] | None = None) -> list[EvalInput]:
    """Expand each input spec into the sample sources it stands for (``guidance_scale``: of every conditional
    sampler; ``prompts``: of every text-conditioned one, see :func:`~n2ce_distill.pipelines.load_sample_source`)."""
    guided = {"guidance_scale": guidance_scale, "prompts": prompts}
    resolved: list[EvalInput] = []
    for spec in specs:
        path = Path(spec.rpartition("@")[0] if "@" in spec else spec)
        if not path.exists():
            raise FileNotFoundError(f"fid input {spec!r}: {path} does not exist")
        if "@" in spec or (path / "model_index.json").is_file():
            label, source = resolve_source(spec, device, **guided)
            resolved.append(EvalInput(label, None, source))
        elif _is_run(path):
            for step, checkpoint in list_checkpoints(path):
                source = load_sample_source(checkpoint / "pipeline", device=device, **guided)
                resolved.append(EvalInput(path.name, step, source))
            for export, label in (("best", "best/"), ("pipeline", "final pipeline/")):
                if (path / export / "model_index.json").is_file():
                    source = load_sample_source(path / export, device=device, **guided)
                    resolved.append(EvalInput(f"{path.name} {label}", None, source))
        else:
            resolved.append(EvalInput(path.name, None, path))  # a folder of images
    return resolved


def default_extractor(ref: str) -> str:
    """The feature extractor a reference implies: digits features for the digits set, Inception for every
    other named set, and for folders or statistics files the samples' shape decides (``"auto"``)."""
    from .fid import INCEPTION
    from .fid_inputs import NAMED_REFERENCES

    if ref in NAMED_REFERENCES:
        return "digits" if NAMED_REFERENCES[ref][0] == (1, 8, 8) else INCEPTION
    return "auto"


def _toy_metrics(item: EvalInput, ref: str, count: int | None, batch_size: int, seed: int) -> dict:
    from .toy_metrics import load_points, toy_report

    start = time.perf_counter()
    if isinstance(item.source, Path):
        points = load_points(item.source)
        if count is not None and count > len(points):
            raise InputError(f"input {item.label!r}: --num-samples {count} but it holds {len(points)} points")
        points = points[:count]
    else:
        generator = torch.Generator().manual_seed(seed)
        sizes = [min(batch_size, count - done) for done in range(0, count, batch_size)]
        points = torch.cat([item.source(size, generator).cpu() for size in sizes])
    try:
        report = toy_report(points, ref)
    except InputError as error:  # name the input; anything else is a bug and keeps its traceback
        raise InputError(f"input {item.label!r}: {error}") from None
    return {**report, "num_samples": len(points), "seconds": time.perf_counter() - start}


def evaluate_inputs(
    specs: list[str],
    ref: str,
    *,
    num_samples: int | None,
    out: Path,
    batch_size: int = 500,
    seed: int = 0,
    extractor: str | None = None,
    inception_weights: str | None = None,
    kid: bool = False,
    prc: bool = False,
    guidance_scale: float | None = None,
    prompts: list[str] | None = None,
) -> str:
    """Evaluate every input against ``ref``; write ``fid.csv``, ``fid.json`` and ``fid.png`` into ``out``.

    ``num_samples`` None draws :data:`DEFAULT_SAMPLES` from generative inputs and reads every image of a
    folder; ``extractor`` None takes :func:`default_extractor` of ``ref``.
    """
    from .data import TOY_DISTRIBUTIONS
    from .fid import NAMED_REFERENCES, evaluate_classes, evaluate_samples
    from .fid_inputs import check_reference
    from .reporting import metric_table, plot_metric_curve, write_rows

    toy = ref in TOY_DISTRIBUTIONS
    if toy and (kid or prc or extractor not in (None, "auto")):
        raise InputError(f"--ref {ref}: a 2-D toy is scored by SW2 and NLL; --kid, --prc and --extractor are for images")
    if not toy:
        check_reference(ref)
    rows = []
    for item in resolve_inputs(specs, guidance_scale=guidance_scale, prompts=prompts):
        shape = getattr(item.source, "sample_shape", None)  # generative inputs state it; folders do not
        if not toy and shape is not None and len(shape) != 3:
            raise InputError(f"input {item.label!r}: draws points of shape {tuple(shape)}, not images; "
                             f"score them against a 2-D toy (--ref {' | '.join(TOY_DISTRIBUTIONS)})")
        count = num_samples if num_samples is not None or isinstance(item.source, Path) else DEFAULT_SAMPLES
        options = dict(num_samples=count, batch_size=batch_size, seed=seed, extractor=extractor or default_extractor(ref),
                       inception_weights=inception_weights, kid=kid, prc=prc)
        if toy:
            metrics = _toy_metrics(item, ref, count, batch_size, seed)
        elif getattr(item.source, "num_classes", None) is not None and ref in NAMED_REFERENCES:
            metrics = evaluate_classes(item.source, ref, **options)  # class-balanced, with per-class FID
        else:
            metrics = evaluate_samples(item.source, ref, **options)
        rows.append({"label": item.label, "step": item.step, **metrics})
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_rows(rows, out / "fid.csv")
    write_rows(rows, out / "fid.json")
    if any(row["step"] is not None for row in rows):
        plot_metric_curve(rows, out / "fid.png")
    return metric_table(rows)
