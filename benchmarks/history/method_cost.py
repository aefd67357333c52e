"""Seconds per training iteration of two recipes, side by side in one process: each round runs a block of K
iterations of each recipe (after W warm-up iterations of both), in an order shuffled every round; prints the
per-round seconds per iteration and the median of the per-round ratios B / A with its range.

    python benchmarks/history/method_cost.py RECIPE_A RECIPE_B K ROUNDS WARMUP [key=value ...]

The overrides apply to both recipes. K should be a multiple of a DMD2 recipe's fake_updates_per_step, so that each
block holds the same share of generator updates.
"""
import json
import random
import statistics
import sys
import tempfile
import time

from n2ce_distill.config import load_recipe
from n2ce_distill.trainer import Trainer

recipe_a, recipe_b, block, rounds, warmup, *overrides = sys.argv[1:]
block, rounds, warmup = int(block), int(rounds), int(warmup)
quiet = ["train.max_steps=1000000", "train.checkpoint_every=1000000", "train.sample_every=1000000", "eval.fid_every=0"]
trainers = {path: Trainer(load_recipe(path, [*quiet, *overrides]), tempfile.mkdtemp()) for path in (recipe_a, recipe_b)}
for trainer in trainers.values():
    for _ in range(warmup):
        trainer.iteration()
    trainer._check_finite()
order, seconds = list(trainers), {path: [] for path in trainers}
rng = random.Random(0)
for _ in range(rounds):
    rng.shuffle(order)
    for path in order:
        start = time.perf_counter()
        for _ in range(block):
            trainers[path].iteration()
        trainers[path]._check_finite()  # the device work of the block is done
        seconds[path].append((time.perf_counter() - start) / block)
ratios = [b / a for a, b in zip(seconds[recipe_a], seconds[recipe_b])]
print(json.dumps({"s_per_it": {path: [round(s, 4) for s in values] for path, values in seconds.items()},
                  "ratio_b_over_a": {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}}))
