"""Seconds per training iteration of a recipe (median over N after W warm-up) on a given checkout, for old-vs-new
comparisons from a git worktree (the loop body is written out so that it runs on commits before Trainer.iteration):

    python benchmarks/history/iteration_speed.py CHECKOUT RECIPE N WARMUP [key=value ...]
"""
import json, statistics, sys, time, tempfile
import torch
repo, recipe, n, warm, *overrides = sys.argv[1:]
sys.path.insert(0, repo)
from n2ce_distill.config import load_recipe
from n2ce_distill.trainer import Trainer
r = load_recipe(recipe, ["train.max_steps=100000", "train.checkpoint_every=100000", "train.sample_every=100000",
                         "eval.fid_every=0", *overrides])
t = Trainer(r, tempfile.mkdtemp())
acc = t.accelerator
losses, stamps = [], []
for i in range(int(n) + int(warm)):
    batch = next(t.loader).to(acc.device)
    with acc.accumulate(*t.method.nets.train.values()), acc.autocast():
        out = t.method.training_step(batch, t.step, t._update)
    t.ema.update(); t.step += 1
    losses.append({k: float(v) for k, v in out.scalars.items() if k.startswith("loss")})
    stamps.append(time.perf_counter())
d = [b - a for a, b in zip(stamps[int(warm):], stamps[int(warm) + 1:])]
print(json.dumps({"s_per_it": statistics.median(d), "first_losses": losses[0], "last_losses": losses[-1]}))
