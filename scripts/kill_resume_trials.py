"""Fault injection: SIGKILL a real training process at random moments, resume, compare with an uninterrupted run.

    .venv/bin/python scripts/kill_resume_trials.py --trials 10 --out /tmp/kill-trials

A tiny 8x8 DxMI run (untrained tiny teacher, 12 steps, a checkpoint every 2) is trained once straight through;
each trial starts the same run and kills it with SIGKILL at a random moment (a random time after the start, or
a random time after a random checkpoint appears: in set-up, a step, a checkpoint save or the final export),
resumes it with ``--resume latest`` until it finishes, and compares every tensor of the final checkpoint
(weights, EMA, optimiser states) with the straight run's, exactly. Prints one row per trial.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from diffusers import DDPMScheduler
from safetensors.torch import load_file

from n2ce_distill.reporting import markdown_table
from n2ce_distill.denoisers import VPDenoiser
from n2ce_distill.nets import tiny_unet

STEPS = 12
OVERRIDES = [f"train.max_steps={STEPS}", "train.checkpoint_every=2", "train.batch_size=8", "train.sample_every=1000",
             "critic.channels=[8, 16]", "critic.num_res_blocks=2"]
CLI = [sys.executable, "-m", "n2ce_distill.cli", "train"]


def final_tensors(run: Path) -> dict[str, torch.Tensor]:
    folder = run / f"checkpoint-{STEPS}"
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors |= {f"{path.name}:{k}": v for k, v in load_file(str(path)).items()}
    for path in sorted(folder.glob("optimizer*.bin")):
        state = torch.load(path, weights_only=True)["state"]
        tensors |= {f"{path.name}:{i}:{k}": v for i, s in state.items() for k, v in s.items() if torch.is_tensor(v)}
    return tensors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--out", type=Path, required=True, help="scratch folder (emptied first)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill delays")
    args = parser.parse_args(argv)
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    torch.manual_seed(0)
    teacher = args.out / "teacher"
    VPDenoiser(tiny_unet(8, 1, block_out_channels=(8, 16), norm_num_groups=4),
                      DDPMScheduler(num_train_timesteps=1000)).save_pretrained(teacher)
    recipe = args.out / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"method": {"name": "dxmi", "num_steps": 2}, "data": {"name": "digits"},
                                      "teacher": {"path": str(teacher)}}))
    started = time.perf_counter()
    subprocess.run([*CLI, str(recipe), *OVERRIDES, "--output-dir", str(args.out / "straight")], check=True,
                   capture_output=True)
    straight_seconds = time.perf_counter() - started
    reference = final_tensors(args.out / "straight")
    # seconds between two checkpoints of the straight run, from the last three it keeps
    saved = [(args.out / "straight" / f"checkpoint-{step}").stat().st_mtime for step in (STEPS - 4, STEPS)]
    interval = (saved[1] - saved[0]) / 2
    rng = random.Random(args.seed)
    rows, identical = [], 0
    for trial in range(args.trials):
        run = args.out / f"trial-{trial}"
        # set-up (imports, loading) takes most of a tiny run's time, so a delay drawn over the whole run would
        # mostly kill it before step 1: wait for a random checkpoint instead (none: during set-up), then a
        # random fraction of one checkpoint interval, so kills land in set-up, steps and saves alike
        after = rng.choice([None, *range(2, STEPS + 1, 2)])
        delay = rng.uniform(0.1, 0.6) * straight_seconds if after is None else rng.uniform(0.0, 1.0) * interval
        proc = subprocess.Popen([*CLI, str(recipe), *OVERRIDES, "--output-dir", str(run)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while after is not None and not (run / f"checkpoint-{after}").is_dir() and proc.poll() is None:
            time.sleep(0.01)
        time.sleep(delay)
        finished = proc.poll() is not None
        if not finished:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        left = sorted(p.name for p in run.glob("checkpoint-*")) if run.exists() else []
        partial = sorted(p.name for p in run.glob(".tmp-*")) if run.exists() else []
        resumes = 0
        while not (run / f"checkpoint-{STEPS}").is_dir():
            subprocess.run([*CLI, str(recipe), *OVERRIDES, "--output-dir", str(run), "--resume", "latest"],
                           check=True, capture_output=True)
            resumes += 1
        got = final_tensors(run)
        same = got.keys() == reference.keys() and all(torch.equal(got[k], reference[k]) for k in reference)
        identical += same
        moment = f"{delay:.2f} s after " + (f"checkpoint-{after}" if after is not None else "start")
        rows.append([trial, moment, "no (finished first)" if finished else "yes",
                     ", ".join(left) or "none", ", ".join(partial) or "-", resumes, "yes" if same else "NO"])
    print(markdown_table(["trial", "kill", "killed", "complete checkpoints left", "half-written left",
                          "resumes", "final state identical"], rows))
    print(f"\n{identical}/{args.trials} identical to the uninterrupted run ({straight_seconds:.1f} s straight, "
          f"{interval:.2f} s between checkpoints)")
    return 0 if identical == args.trials else 1


if __name__ == "__main__":
    sys.exit(main())
