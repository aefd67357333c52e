"""``make demo``: distil the shipped digits DDPM teacher into a 4-step DxMI sampler with an N²CE critic.

Trains the digits recipe for its first :data:`DEMO_STEPS` iterations (inside its first FID dip, a few minutes
on two CPU cores; the whole recipe takes proportionally longer), prints a table of FID on digits features
for the teacher at 1000 steps (DDPM), DDIM at T steps and the student at T steps, and writes a sample grid
PNG. The 1000-step row takes tens of minutes on a CPU: it is read from the teacher's ``baselines.json``
(written by ``scripts/teacher_baselines.py`` with the same sample count and seed) when present.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .config import RecipeConfig, load_recipe
from .pipelines import load_sample_source
from .shipped import shipped
from .trainer import Trainer
from .visualize import save_samples

__all__ = ["run_demo", "load_demo_recipe", "cached_baseline"]

DEMO_RECIPE = "digits_dxmi_n2ce.yaml"  # in the shipped recipes; its teacher path points at the shipped teacher
DEMO_FID_SAMPLES = 1000  # digits features: enough for a stable ranking in seconds
DEMO_STEPS = 300  # inside the recipe's first dip (seed-mean FID 3.1-3.4 from 300 to 600); lower only from ~1400
FULL_OVERRIDES = [f"train.max_steps={DEMO_STEPS}"]
QUICK_OVERRIDES = ["train.max_steps=4", "train.checkpoint_every=2", "train.sample_every=2", "train.batch_size=16"]


def load_demo_recipe(overrides: list[str] = ()) -> RecipeConfig:
    """The shipped digits recipe (found from any working directory, in a checkout or an install) and
    ``overrides``; its relative teacher path resolves next to the recipe file."""
    return load_recipe(shipped("recipes", DEMO_RECIPE), list(overrides))


def run_demo(out: Path, quick: bool = False) -> str:
    from .fid import evaluate_samples
    from .reporting import metric_table

    # no FID hook: the table below scores the student once, at the end
    recipe = load_demo_recipe([*(QUICK_OVERRIDES if quick else FULL_OVERRIDES), "eval.fid_every=0"])
    out = Path(out)
    run_dir = out / "run"
    student = Trainer(recipe, run_dir, resume="latest").train()
    T = recipe.method.num_steps
    teacher = recipe.teacher.path
    num_samples = 200 if quick else DEMO_FID_SAMPLES
    candidates = [
        (f"teacher DDIM {T} steps", load_sample_source(teacher, steps=T, method="euler")),
        # what training starts from: the teacher's ancestral steps on the student's own schedule
        (f"untrained student {T} steps", load_sample_source(teacher, steps=T, spacing=recipe.method.spacing)),
        (f"student DxMI+N²CE {T} steps", load_sample_source(student)),
    ]
    rows = []
    cached = cached_baseline(Path(teacher), f"1000:ancestral:{num_samples}:{recipe.seed}")
    if cached is not None:
        rows.append({"label": "teacher DDPM 1000 steps (cached)", "step": None, "fid": cached["fid"]})
    elif not quick:  # a smoke run skips the slow 1000-step row
        candidates.insert(0, ("teacher DDPM 1000 steps", load_sample_source(teacher, steps=1000, method="ancestral")))
    for label, source in candidates:
        metrics = evaluate_samples(source, "digits", num_samples=num_samples, seed=recipe.seed)
        rows.append({"label": label, "step": None, "fid": metrics["fid"]})
    grid = out / "student_samples.png"
    save_samples(load_sample_source(student)(64, torch.Generator().manual_seed(0)), grid)
    table = metric_table(rows)
    (out / "results.md").write_text(table + "\n")
    return (f"{table}\n\nsample grid: {grid}\nrun folder: {run_dir}\n"
            f"trained {recipe.train.max_steps} of the recipe's {load_demo_recipe().train.max_steps} iterations; the whole run: "
            f"n2ce-distill train {shipped('recipes', DEMO_RECIPE)} (README: 'Distil a teacher')")


def cached_baseline(teacher: Path, key: str) -> dict | None:
    """A teacher's stored baseline (``"STEPS:METHOD:SAMPLES:SEED"`` in its ``baselines.json``), or None."""
    path = teacher / "baselines.json"
    return json.loads(path.read_text()).get(key) if path.is_file() else None
