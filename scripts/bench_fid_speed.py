"""Wall-clock of evaluate_samples on 10k samples from a cheap digits source; prints a markdown table.

The source replays the digits set with a little Gaussian noise (its cost is negligible), so the times
are those of the evaluation itself: feature extraction, statistics, the reference (cold or cached).

    .venv/bin/python scripts/bench_fid_speed.py [--num-samples 10000] [--batch-size 500]
"""

import argparse
import os
import tempfile
import time

import torch

from n2ce_distill.feature_extractors import digits_uint8
from n2ce_distill.fid import evaluate_samples


def noisy_digits(n: int, generator: torch.Generator) -> torch.Tensor:
    images = digits_uint8().float() / 127.5 - 1
    idx = torch.randint(len(images), (n,), generator=generator)
    return (images[idx] + 0.05 * torch.randn(n, 1, 8, 8, generator=generator)).clamp(-1, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-samples", type=int, default=10_000)
    parser.add_argument("--batch-size", type=int, default=500)
    args = parser.parse_args()
    cases = [("cold reference cache", {}), ("cached reference", {}), ("cached, + KID and PR", {"kid": True, "prc": True})]
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        for label, extra in cases:
            start = time.perf_counter()
            out = evaluate_samples(
                noisy_digits, "digits", num_samples=args.num_samples, batch_size=args.batch_size,
                cache_dir=cache, **extra,
            )  # fmt: skip
            seconds = time.perf_counter() - start
            rows.append({"label": label, **out, "seconds": seconds})
    print(f"evaluate_samples: {args.num_samples} samples, batch {args.batch_size}, extractor {rows[0]['extractor']}, "
          f"{torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs\n")  # fmt: skip
    print("| case | FID | KID | precision | recall | seconds |\n| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        cells = [f"{r[k]:.4g}" if k in r else "-" for k in ("fid", "kid", "precision", "recall")]
        print(f"| {r['label']} | {' | '.join(cells)} | {r['seconds']:.2f} |")

if __name__ == "__main__":
    main()
