"""Measure a shipped teacher's baseline FIDs once and store them beside it (``baselines.json``).

The 1000-step teacher costs minutes per thousand samples on a CPU, so ``make demo`` reads its row
from this file (same extractor, sample count and seed) instead of recomputing it on every run.

    .venv/bin/python scripts/teacher_baselines.py assets/digits-teacher --num-samples 1000 --steps 1000:ancestral 4:euler
"""

import argparse
import json
import time
from pathlib import Path

from n2ce_distill.fid import evaluate_samples
from n2ce_distill.pipelines import load_sample_source


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("teacher")
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", nargs="+", default=["1000:ancestral"])
    args = parser.parse_args()
    path = Path(args.teacher) / "baselines.json"
    table = json.loads(path.read_text()) if path.is_file() else {}
    for spec in args.steps:
        steps, _, method = spec.partition(":")
        start = time.perf_counter()
        source = load_sample_source(args.teacher, steps=int(steps), method=method or "ancestral")
        metrics = evaluate_samples(source, "digits", num_samples=args.num_samples, seed=args.seed)
        key = f"{steps}:{method or 'ancestral'}:{args.num_samples}:{args.seed}"
        table[key] = {"fid": metrics["fid"], "seconds": round(time.perf_counter() - start, 1)}
        print(key, table[key], flush=True)
        path.write_text(json.dumps(table, indent=1) + "\n")


if __name__ == "__main__":
    main()
