"""Which regime was each run's critic in, and when? Reads the ``critic/*`` scalars the trainer logs.

    python scripts/regime_report.py "n2ce=runs/chasm/dxmi_n2ce_s*" "nce=runs/chasm/dxmi_nce_s*" --window 100

Each positional argument is LABEL=GLOB; the runs a glob matches are that variant's seeds. For every window of
iterations: the share of logged steps in each regime (linear / informative / chasm, over all seeds), and the
seed means of the RMS logit, the logit gap and the two accuracies (docs/REGIMES.md says what they mean).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from n2ce_distill.benchmarks.report import label_pair, print_report, run_groups
from n2ce_distill.diagnostics import REGIMES
from n2ce_distill.errors import InputError
from n2ce_distill.reporting import markdown_table

FIELDS = ("regime", "logit_rms", "logit_gap", "acc_data", "acc_noise")


def read_critic_log(run: Path) -> dict[str, dict[int, float]]:
    """``field -> {step: value}`` for the ``critic/*`` scalars in a run's TensorBoard log."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = sorted((Path(run) / "logs").rglob("events.out.tfevents*"))
    if not events:
        raise FileNotFoundError(f"{run}: no TensorBoard log under logs/")
    log: dict[str, dict[int, float]] = {field: {} for field in FIELDS}
    for folder in sorted({path.parent for path in events}):
        accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0})
        accumulator.Reload()
        for field in FIELDS:
            if f"critic/{field}" in accumulator.Tags()["scalars"]:
                log[field] |= {e.step: e.value for e in accumulator.Scalars(f"critic/{field}")}
    if not log["regime"]:
        raise InputError(f"{run}: no critic/regime scalars (a method without a critic, or logged before they existed)")
    return log


def regime_table(groups: dict[str, list[Path]], window: int) -> str:
    rows = []
    for label, runs in groups.items():
        if not runs:
            raise InputError(f"{label}: no run folders")
        logs = [read_critic_log(run) for run in runs]
        last = max(max(log["regime"]) for log in logs)
        for start in range(0, last, window):
            inside = lambda values: [v for step, v in values.items() if start < step <= start + window]  # noqa: E731
            regimes = [REGIMES[int(v)] for log in logs for v in inside(log["regime"])]
            if not regimes:
                continue
            means = [statistics.mean(v for log in logs for v in inside(log[field]) or [float("nan")])
                     for field in FIELDS[1:]]
            shares = " / ".join(f"{100 * regimes.count(name) / len(regimes):.0f}" for name in REGIMES)
            rows.append([label, f"{start + 1}-{start + window}", shares, *means])
    headers = ["variant", "iterations", "regime % lin / inf / chasm", "RMS logit", "logit gap", "acc data", "acc noise"]
    return markdown_table(headers, rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("groups", nargs="+", type=label_pair, help="LABEL=GLOB of run folders (one per seed)")
    parser.add_argument("--window", type=int, default=100, help="iterations per row (default 100)")
    args = parser.parse_args(argv)
    if args.window < 1:
        print("error: --window must be >= 1", file=sys.stderr)
        return 2
    groups = run_groups(args.groups)
    return print_report(lambda: regime_table(groups, args.window))


if __name__ == "__main__":
    sys.exit(main())
