"""Distillation benchmarks: critic objectives compared at equal iterations over seeds.

- ``dxmi_toy``: DxMI T = 4 on 8 Gaussians (shipped EDM teacher): SW2, exact NLL and mode coverage;
- ``dxmi_digits``: DxMI T = 4 on digits (shipped DDPM teacher): FID on digits features;
- ``sid_digits``: one-step SiD alone and SiDA with a GAN, NCE or N²CE critic on digits: FID.
- ``dmd2_digits``: one-step DMD2 without a GAN term, with a GAN head and with an N²CE head on digits: FID.

Every variant trains from the same recipe with one key changed, checkpoints every ``eval_every``
steps, and each checkpoint's exported pipeline is evaluated, so curves against iterations come out
of one run per (variant, seed). Teacher baselines (1000 steps, and T steps where it applies) are
reference lines.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..checkpoints import list_checkpoints
from ..config import load_recipe
from ..data import EightGaussians
from ..demo import cached_baseline
from ..errors import InputError
from ..pipelines import load_sample_source
from ..shipped import shipped
from ..toy_metrics import eight_gaussians_report
from ..trainer import Trainer

__all__ = ["run_dxmi_toy", "run_dxmi_digits", "run_sid_digits", "run_dmd2_digits", "curve_report", "fid_log_report"]

Metric = Callable[[Callable], dict[str, float]]

TOY_STEPS = 1500  # iterations per run (full mode), the recipe's; curves are scored at every quarter
DIGITS_STEPS = 2000  # the recipe's length: FID rises between 500 and 1100, then falls lower
SID_STEPS = 200
SID_REACH = 12.0  # FID that "iterations to reach" counts for the one-step students
DMD2_STEPS = 4000  # the recipe's length, which RESULTS.md reports (3 variants x 3 seeds of it)
DMD2_REACH = 3.08  # the aim for the one-step student: 2x the teacher's FID at 1000 steps (1.54)


@dataclass
class Setting:
    recipe: str
    teacher: str
    variants: dict[str, list[str]]
    metric_name: str
    steps: int
    eval_every: int
    seeds: tuple[int, ...]
    baselines: dict[str, dict]  # label -> load_sample_source options for the teacher (steps, method, spacing)
    cached: dict[str, float] = field(default_factory=dict)  # reference values too slow to measure here
    overrides: tuple[str, ...] = ()  # applied to every variant
    reach: float | None = None  # report iterations to reach this value (default: 1.5x the best reference)
    timing_samples: int = 0  # > 0: time the student's T steps against the teacher's 1000 on this many samples


def _toy_metric(num_samples: int) -> Metric:
    # SW2 on 5000 points has a noise floor (~0.07 between two data sets) above the teacher's own error;
    # more points and two reference sets bring it down to ~0.02 so the teacher/student ratio means something
    references = [EightGaussians().sample(num_samples, torch.Generator().manual_seed(12345 + i)) for i in range(2)]

    def metric(source) -> dict[str, float]:
        samples = source(num_samples, torch.Generator().manual_seed(0))
        reports = [eight_gaussians_report(samples, reference) for reference in references]
        return reports[0] | {"sw2": statistics.mean(r["sw2"] for r in reports)}

    return metric


def _fid_metric(num_samples: int) -> Metric:
    from ..fid import evaluate_samples

    def metric(source) -> dict[str, float]:
        return {"fid": evaluate_samples(source, "digits", num_samples=num_samples, batch_size=500)["fid"]}

    return metric


def _sampling_cost(student: Path, teacher: str, num_samples: int) -> str:
    """Wall time of the student's T steps against the teacher's 1000 steps, measured back to back."""

    def seconds(source) -> float:
        start = time.perf_counter()
        source(num_samples, torch.Generator().manual_seed(0))
        return time.perf_counter() - start

    student_source = load_sample_source(student)
    # a first call pays one-off set-up (digits, 200 samples: 0.54-1.0 s cold against 0.31-0.40 s after), which
    # the teacher's 1000 steps amortise and the student's 4 do not
    seconds(student_source)
    student_s, teacher_s = seconds(student_source), seconds(load_sample_source(teacher, steps=1000))
    return (f"sampling {num_samples} samples: student {student_s:.3f} s, teacher 1000 steps {teacher_s:.1f} s, "
            f"ratio {teacher_s / student_s:.0f}x")


def _run(setting: Setting, metric: Metric, out: Path, title: str) -> str:
    from ..reporting import markdown_table

    teacher = str(shipped("assets", setting.teacher))
    key = setting.metric_name
    baselines = {label: metric(load_sample_source(teacher, **options))[key] for label, options in setting.baselines.items()}
    baselines |= setting.cached
    curves: dict[str, dict[int, list[float]]] = {}
    finals: dict[str, list[dict[str, float]]] = {}
    seconds: dict[str, float] = {}
    notes = []
    with tempfile.TemporaryDirectory() as scratch:
        for label, overrides in setting.variants.items():
            for seed in setting.seeds:
                run_dir = Path(scratch) / f"{label}-{seed}"
                recipe = load_recipe(shipped("recipes", setting.recipe), [
                    f"teacher.path={teacher}", f"seed={seed}", f"train.max_steps={setting.steps}",
                    f"train.checkpoint_every={setting.eval_every}", "train.checkpoint_total_limit=null",
                    f"train.sample_every={setting.steps}", "eval.fid_every=0",  # checkpoints are scored below
                    *setting.overrides, *overrides,
                ])
                start = time.perf_counter()
                Trainer(recipe, run_dir).train()
                seconds[label] = seconds.get(label, 0.0) + (time.perf_counter() - start) / len(setting.seeds)
                for step, checkpoint in list_checkpoints(run_dir):
                    result = metric(load_sample_source(checkpoint / "pipeline"))
                    curves.setdefault(label, {}).setdefault(step, []).append(result[key])
                    if step == setting.steps:
                        finals.setdefault(label, []).append(result)
        if setting.timing_samples:
            notes.append(_sampling_cost(run_dir / "pipeline", teacher, setting.timing_samples))

    extras = [e for e in ("nll", "modes_covered", "mode_balance", "off_mode_fraction") if finals and e in next(iter(finals.values()))[0]]
    headers = ["variant", f"final {key} (mean)", "std", "per seed", *extras, "train s/run"]
    rows = []
    for label, results in finals.items():
        values = [r[key] for r in results]
        rows.append([label, *_spread(values), *[statistics.mean(r[e] for r in results) for e in extras], seconds[label]])
    rows += [[label, value, "", "", *[""] * len(extras), ""] for label, value in baselines.items()]
    target = setting.reach or (1.5 * min(baselines.values()) if baselines else None)
    return "\n\n".join([markdown_table(headers, rows), *curve_report(curves, key, baselines, target, out, title), *notes])


def _spread(values: list[float]) -> list:
    """Mean, standard deviation over seeds (0 for one seed) and the per-seed values as one cell."""
    return [statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0, ", ".join(f"{v:.3f}" for v in values)]


def curve_report(
    curves: dict[str, dict[int, list[float]]], key: str, baselines: dict[str, float], reach: float | None,
    out: Path, title: str, max_columns: int = 10,
) -> list[str]:
    """The seed-mean curve table (at most ``max_columns`` evenly spaced steps), the first step at which each
    variant's seed mean reaches ``reach``, and the curves saved as ``out/<title>.png`` (baselines as lines)."""
    from ..reporting import markdown_table, new_figure, save_figure

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

    steps = sorted(set().union(*curves.values())) if curves else []
    if len(steps) > max_columns:  # evenly spaced, first and last included
        steps = [steps[round(i * (len(steps) - 1) / (max_columns - 1))] for i in range(max_columns)]
    rows = [[label, *(statistics.mean(by_step[s]) if s in by_step else "" for s in steps)] for label, by_step in curves.items()]
    tables = [markdown_table(["variant", *(f"{key} @ {s}" for s in steps)], rows)] if steps else []
    return tables + ([_iterations_to_reach(curves, reach)] if reach is not None else [])


def _iterations_to_reach(curves: dict[str, dict[int, list[float]]], threshold: float) -> str:
    """First step whose seed-mean metric is at most ``threshold``, per variant."""
    parts = []
    for label, by_step in curves.items():
        hit = next((s for s in sorted(by_step) if statistics.mean(by_step[s]) <= threshold), None)
        parts.append(f"{label}: {hit if hit is not None else 'not reached'}")
    return f"iterations to reach {threshold:.3f}: " + "; ".join(parts)


def fid_log_report(
    groups: dict[str, list[Path]], out: Path, title: str, baselines: dict[str, float] | None = None,
    reach: float | None = None, max_step: int | None = None,
) -> str:
    """Tables and a plot from the ``fid.jsonl`` that the in-training FID hook (``eval.fid_every``) writes.

    ``groups``: variant label -> its run folders (one per seed). Runs too long to re-train inside a
    benchmark are compared this way: final and best FID over seeds, the curve, iterations to ``reach``.
    ``max_step`` drops later entries, to compare runs of different lengths at equal iterations.
    """
    from ..reporting import markdown_table

    baselines = baselines or {}
    curves: dict[str, dict[int, list[float]]] = {}
    rows = []
    for label, runs in groups.items():
        if not runs:
            raise InputError(f"{label}: no run folders")
        logs = [{step: fid for step, fid in _read_fid_log(run).items() if max_step is None or step <= max_step} for run in runs]
        if not all(logs):
            raise InputError(f"{label}: a run has no FID entry at or before step {max_step}")
        for log in logs:
            for step, fid in log.items():
                curves.setdefault(label, {}).setdefault(step, []).append(fid)
        finals = [log[max(log)] for log in logs]
        bests = [min(log.values()) for log in logs]
        shortest, longest = min(max(log) for log in logs), max(max(log) for log in logs)
        rows.append([label, str(longest) if shortest == longest else f"{shortest}-{longest}", *_spread(finals),
                     statistics.mean(bests), ", ".join(f"{min(log, key=log.get)}" for log in logs)])
    rows += [[label, "", value, "", "", "", ""] for label, value in baselines.items()]
    headers = ["variant", "iterations", "final fid (mean)", "std", "per seed", "best fid (mean)", "best at step"]
    return "\n\n".join([markdown_table(headers, rows), *curve_report(curves, "fid", baselines, reach, Path(out), title)])


def _read_fid_log(run: Path) -> dict[int, float]:
    path = Path(run) / "fid.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no FID log (train with eval.fid_every > 0)")
    log = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            entry = json.loads(line)
            log[int(entry["step"])] = float(entry["fid"])  # a resumed run re-logs a step: the later entry wins
        except (ValueError, KeyError, TypeError) as error:
            raise InputError(f"{path}:{number}: not a FID log entry ({error})") from None
    if not log:
        raise InputError(f"{path}: empty FID log")
    return log


def _digits_teacher_1000() -> dict[str, float]:
    """The digits teacher's 1000-step FID, measured once by scripts/teacher_baselines.py with the same
    samples and seed (ten minutes per thousand samples on a CPU); empty when it has not been measured."""
    stored = cached_baseline(shipped("assets", "digits-teacher"), "1000:ancestral:1000:0")
    return {} if stored is None else {"teacher 1000 steps (cached)": stored["fid"]}


OBJECTIVES = {"DxMI cd": ["critic.objective=cd"], "DxMI nce": ["critic.objective=nce"], "DxMI n2ce (M=100)": []}
QUICK_OVERRIDES = ("train.batch_size=16",)


def run_dxmi_toy(quick: bool, out: Path) -> str:
    setting = Setting(
        recipe="toy2d_dxmi_n2ce.yaml", teacher="8gaussians-teacher", variants=OBJECTIVES,
        metric_name="sw2", steps=20 if quick else TOY_STEPS, eval_every=10 if quick else TOY_STEPS // 4,
        seeds=(0,) if quick else (0, 1, 2),
        baselines={"DDIM 4 steps": {"steps": 4, "method": "euler"}}
        | ({} if quick else {"teacher 1000 steps": {"steps": 1000}}),
    )
    return _run(setting, _toy_metric(500 if quick else 20000), Path(out), "dxmi toy")


def run_dxmi_digits(quick: bool, out: Path) -> str:
    setting = Setting(
        recipe="digits_dxmi_n2ce.yaml", teacher="digits-teacher", variants=OBJECTIVES,
        metric_name="fid", steps=4 if quick else DIGITS_STEPS, eval_every=2 if quick else DIGITS_STEPS // 4,
        seeds=(0,) if quick else (0, 1, 2),
        baselines={
            "DDIM 4 steps": {"steps": 4, "method": "euler"},
            "untrained student (ancestral 4 steps, its schedule)": {"steps": 4, "spacing": "auto"},
        },
        cached={} if quick else _digits_teacher_1000(),
        overrides=QUICK_OVERRIDES if quick else (),
        timing_samples=8 if quick else 200,
    )
    return _run(setting, _fid_metric(200 if quick else 1000), Path(out), "dxmi digits")


def run_sid_digits(quick: bool, out: Path) -> str:
    setting = Setting(
        recipe="digits_sid_n2ce.yaml", teacher="digits-teacher",
        variants={
            "SiD": ["method.adversarial=false"],
            "SiD + GAN (= NCE)": ["critic.objective=gan"],  # gan is NCE by name: training both repeated a run
            "SiD + N2CE (M=50)": [],
        },
        metric_name="fid", steps=4 if quick else SID_STEPS, eval_every=2 if quick else SID_STEPS // 4,
        seeds=(0,) if quick else (0, 1, 2),
        baselines={"DDIM 4 steps": {"steps": 4, "method": "euler"}},
        cached={} if quick else _digits_teacher_1000(),
        overrides=QUICK_OVERRIDES if quick else (),
        reach=None if quick else SID_REACH,
    )
    return _run(setting, _fid_metric(200 if quick else 1000), Path(out), "sid digits")


def run_dmd2_digits(quick: bool, out: Path) -> str:
    setting = Setting(
        recipe="digits_dmd2_n2ce.yaml", teacher="digits-teacher",
        variants={
            "DMD2 (no GAN)": ["method.adversarial=false"],
            "DMD2 + GAN (= NCE)": ["critic.objective=gan"],
            "DMD2 + N2CE (M=100)": [],
        },
        metric_name="fid", steps=10 if quick else DMD2_STEPS, eval_every=5 if quick else DMD2_STEPS // 8,
        seeds=(0,) if quick else (0, 1, 2),
        baselines={"DDIM 4 steps": {"steps": 4, "method": "euler"}},
        cached={} if quick else _digits_teacher_1000(),
        overrides=QUICK_OVERRIDES if quick else (),
        reach=None if quick else DMD2_REACH,
    )
    return _run(setting, _fid_metric(200 if quick else 1000), Path(out), "dmd2 digits")
