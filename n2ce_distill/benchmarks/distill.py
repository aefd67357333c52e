"""Distillation benchmarks: critic objectives compared at equal iterations over seeds.

- ``dxmi_toy``: DxMI T = 4 on 8 Gaussians (shipped EDM teacher): SW2, exact NLL and mode coverage;
- ``dxmi_digits``: DxMI T = 4 on digits (shipped DDPM teacher): FID on digits features;
- ``sid_digits``: one-step SiD alone and SiDA with a GAN, NCE or N²CE critic on digits: FID.

Every variant trains from the same recipe with one key changed, checkpoints every ``eval_every``
steps, and each checkpoint's exported pipeline is evaluated, so curves against iterations come out
of one run per (variant, seed). Teacher baselines (1000 steps, and T steps where it applies) are
reference lines.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..checkpoints import list_checkpoints
from ..config import load_recipe
from ..data import EightGaussians
from ..demo import REPO_ROOT
from ..pipelines import load_sample_source
from ..toy_metrics import eight_gaussians_report
from ..trainer import Trainer

__all__ = ["run_dxmi_toy", "run_dxmi_digits", "run_sid_digits"]

Metric = Callable[[Callable], dict[str, float]]


@dataclass
class Setting:
    recipe: str
    teacher: str
    variants: dict[str, list[str]]
    metric_name: str
    steps: int
    eval_every: int
    seeds: tuple[int, ...]
    baselines: dict[str, tuple[int, str]]  # label -> (teacher steps, sampler)


def _toy_metric(num_samples: int) -> Metric:
    reference = EightGaussians().sample(num_samples, torch.Generator().manual_seed(12345))

    def metric(source) -> dict[str, float]:
        return eight_gaussians_report(source(num_samples, torch.Generator().manual_seed(0)), reference)

    return metric


def _fid_metric(num_samples: int) -> Metric:
    from ..fid import evaluate_samples

    def metric(source) -> dict[str, float]:
        return {"fid": evaluate_samples(source, "digits", num_samples=num_samples, batch_size=500)["fid"]}

    return metric


def _run(setting: Setting, metric: Metric, out: Path, title: str) -> str:
    from .report import markdown_table, new_figure, save_figure

    teacher = str(REPO_ROOT / "assets" / setting.teacher)
    key = setting.metric_name
    baselines = {label: metric(load_sample_source(teacher, steps=s, method=m))[key] for label, (s, m) in setting.baselines.items()}
    curves: dict[str, dict[int, list[float]]] = {}
    finals: dict[str, list[dict[str, float]]] = {}
    seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for label, overrides in setting.variants.items():
            for seed in setting.seeds:
                run_dir = Path(scratch) / f"{label}-{seed}"
                recipe = load_recipe(REPO_ROOT / "recipes" / setting.recipe, [
                    f"teacher.path={teacher}", f"seed={seed}", f"train.max_steps={setting.steps}",
                    f"train.checkpoint_every={setting.eval_every}", "train.checkpoint_total_limit=null",
                    f"train.sample_every={setting.steps}", *overrides,
                ])
                start = time.perf_counter()
                Trainer(recipe, run_dir).train()
                seconds[label] = seconds.get(label, 0.0) + (time.perf_counter() - start) / len(setting.seeds)
                for step, checkpoint in list_checkpoints(run_dir):
                    result = metric(load_sample_source(checkpoint / "pipeline"))
                    curves.setdefault(label, {}).setdefault(step, []).append(result[key])
                    if step == setting.steps:
                        finals.setdefault(label, []).append(result)

    extras = [e for e in ("nll", "modes_covered", "mode_balance") if finals and e in next(iter(finals.values()))[0]]
    headers = ["variant", f"final {key} (mean)", "std", "per seed", *extras, "train s/run"]
    rows = []
    for label, results in finals.items():
        values = [r[key] for r in results]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        rows.append([label, statistics.mean(values), spread, ", ".join(f"{v:.3f}" for v in values),
                     *[statistics.mean(r[e] for r in results) for e in extras], seconds[label]])
    rows += [[label, value, "", "", *[""] * len(extras), ""] for label, value in baselines.items()]
    table = markdown_table(headers, rows)

    fig, (ax,) = new_figure()
    for label, by_step in curves.items():
        steps = sorted(by_step)
        ax.plot(steps, [statistics.mean(by_step[s]) for s in steps], marker="o", label=label)
    for label, value in baselines.items():
        ax.axhline(value, linestyle="--", linewidth=1, color="gray")
        ax.annotate(label, (0, value), fontsize=7, color="gray")
    ax.set_xlabel("iteration")
    ax.set_ylabel(f"{key} (mean over seeds)")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend(fontsize=7)
    save_figure(fig, out, f"{title.replace(' ', '_')}.png")
    reach = _iterations_to_reach(curves, min(baselines.values()) if baselines else None)
    return table + ("\n\n" + reach if reach else "")


def _iterations_to_reach(curves: dict[str, dict[int, list[float]]], target: float | None) -> str:
    """First checkpoint whose seed-mean metric is within 1.5x of the best baseline, per variant."""
    if target is None:
        return ""
    threshold = 1.5 * target
    parts = []
    for label, by_step in curves.items():
        hit = next((s for s in sorted(by_step) if statistics.mean(by_step[s]) <= threshold), None)
        parts.append(f"{label}: {hit if hit is not None else 'not reached'}")
    return f"iterations to reach 1.5x the best baseline ({threshold:.3f}): " + "; ".join(parts)


def run_dxmi_toy(quick: bool, out: Path) -> str:
    setting = Setting(
        recipe="toy2d_dxmi_n2ce.yaml", teacher="8gaussians-teacher",
        variants={"DxMI cd": ["critic.objective=cd"], "DxMI nce": ["critic.objective=nce"], "DxMI n2ce (M=100)": []},
        metric_name="sw2", steps=20 if quick else 750, eval_every=10 if quick else 250,
        seeds=(0,) if quick else (0, 1, 2),
        baselines={"teacher 1000 steps": (1000, "ancestral"), "DDIM 4 steps": (4, "euler")} if not quick else {"DDIM 4 steps": (4, "euler")},
    )
    return _run(setting, _toy_metric(500 if quick else 5000), Path(out), "dxmi toy")


def run_dxmi_digits(quick: bool, out: Path) -> str:
    # the 1000-step teacher costs tens of minutes per thousand samples on a CPU: its FID is measured
    # once by scripts/teacher_baselines.py (assets/digits-teacher/baselines.json), not here
    setting = Setting(
        recipe="digits_dxmi_n2ce.yaml", teacher="digits-teacher",
        variants={"DxMI cd": ["critic.objective=cd"], "DxMI nce": ["critic.objective=nce"], "DxMI n2ce (M=100)": []},
        metric_name="fid", steps=4 if quick else 200, eval_every=2 if quick else 100,
        seeds=(0,),  # one seed: a 200-step run costs minutes on 2 CPU cores
        baselines={"DDIM 4 steps": (4, "euler"), "ancestral 4 steps (student init)": (4, "ancestral")},
    )
    # the recorded table used the uniform (DDIM) schedule, whose untrained student is the "ancestral 4" row
    overrides = ["method.spacing=uniform", *(["train.batch_size=16"] if quick else [])]
    setting.variants = {k: v + overrides for k, v in setting.variants.items()}
    return _run(setting, _fid_metric(200 if quick else 1000), Path(out), "dxmi digits")


def run_sid_digits(quick: bool, out: Path) -> str:
    setting = Setting(
        recipe="digits_sid_n2ce.yaml", teacher="digits-teacher",
        variants={
            "SiD": ["method.adversarial=false"],
            "SiD + GAN": ["critic.objective=gan"],
            "SiD + NCE": ["critic.objective=nce"],
            "SiD + N2CE (M=50)": [],
        },
        metric_name="fid", steps=4 if quick else 100, eval_every=2 if quick else 50,
        seeds=(0,),
        baselines={"DDIM 4 steps": (4, "euler")},
    )
    overrides = ["train.batch_size=16"] if quick else []
    setting.variants = {k: v + overrides for k, v in setting.variants.items()}
    return _run(setting, _fid_metric(200 if quick else 1000), Path(out), "sid digits")
