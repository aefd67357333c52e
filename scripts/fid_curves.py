"""Compare runs by the FID log their in-training hook wrote (``eval.fid_every``): markdown tables and a plot.

    python scripts/fid_curves.py "SiD + N2CE=runs/sid_n2ce_s*" "SiD + GAN=runs/sid_gan_s*" \
        --reach 3.08 --baseline "teacher 1000 steps (cached)=1.54" --title "sid digits long" --out benchmarks

Each positional argument is LABEL=GLOB; the runs a glob matches are that variant's seeds.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from n2ce_distill.benchmarks.distill import fid_log_report
from n2ce_distill.benchmarks.report import label_pair, print_report, run_groups


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("groups", nargs="+", type=label_pair, help="LABEL=GLOB of run folders (one per seed)")
    parser.add_argument("--baseline", action="append", type=label_pair, default=[], help="LABEL=FID reference line")
    parser.add_argument("--reach", type=float, help="report the first iteration whose seed-mean FID is at most this")
    parser.add_argument("--max-step", type=int, help="ignore later entries (compare at equal iterations)")
    parser.add_argument("--title", default="fid curves")
    parser.add_argument("--out", default="benchmarks")
    args = parser.parse_args(argv)
    groups = run_groups(args.groups)
    return print_report(lambda: fid_log_report(groups, Path(args.out), args.title,
                                               {label: float(value) for label, value in args.baseline},
                                               args.reach, args.max_step))


if __name__ == "__main__":
    sys.exit(main())
