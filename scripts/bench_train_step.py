"""Seconds per training iteration of the CIFAR-10 recipes, at their own sizes, under each mixed precision.

The teacher is a randomly initialised network of the architecture of ``google/ddpm-cifar10-32`` (35.7M
parameters, saved locally as a DDPM pipeline: nothing comes from a hub) and the data a folder of random
32x32 images, so a run costs what the real recipe costs per iteration. Each (recipe, precision) case trains
``--steps`` iterations, times those after ``--warmup`` (device synchronised at every step), checks that every
logged loss is finite, then resumes from its last checkpoint for one more step. Prints a markdown table with
the hours the recipe's ``train.max_steps`` would take at that rate.

    python scripts/bench_train_step.py [--steps 30] [--warmup 5] [--precision no bf16 fp16] [--batch-size N]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMScheduler, UNet2DModel
from PIL import Image

from n2ce_distill.config import load_recipe
from n2ce_distill.denoisers import VPEpsilonDenoiser
from n2ce_distill.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
RECIPES = ("cifar10_ddpm_dxmi_n2ce.yaml", "cifar10_sid_n2ce.yaml")
COLUMNS = ("recipe", "precision", "batch", "s/it", "peak GiB", "finite", "resumed", "max_steps", "hours for max_steps")


def ddpm_cifar10_standin(path: Path) -> Path:
    """google/ddpm-cifar10-32's UNet and scheduler configuration, random weights."""
    unet = UNet2DModel(
        sample_size=32, in_channels=3, out_channels=3, layers_per_block=2, block_out_channels=(128, 256, 256, 256),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        freq_shift=1, flip_sin_to_cos=False, norm_eps=1e-6, downsample_padding=0,
    )
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True)
    VPEpsilonDenoiser(unet, scheduler).save_pretrained(path)
    return path


def random_image_folder(path: Path, count: int = 512) -> Path:
    path.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path / f"{i:04d}.png")
    return path


class TimedTrainer(Trainer):
    """Records the wall time at the end of every iteration, after the device has finished it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.stamps: list[float] = []
        self.losses: list[dict[str, float]] = []

    def _after_step(self, logs: dict[str, float]) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.stamps.append(time.perf_counter())
        self.losses.append(logs)
        super()._after_step(logs)


def run_case(recipe_name: str, precision: str, args, teacher: Path, images: Path, out: Path) -> dict:
    overrides = [
        f"teacher.path={teacher}", "data.name=image-folder", f"data.root={images}", "data.image_size=32",
        f"train.max_steps={args.steps}", f"train.checkpoint_every={args.steps}", f"train.sample_every={args.steps}",
        "train.log_every=1", f"train.mixed_precision={precision}", "eval.fid_every=0",
        # the SiDA warm-ups would leave the generator idle for the whole timed window
        *(["method.generator_warmup_images=0", "method.adversarial_warmup_images=0"] if "sid" in recipe_name else []),
        *([f"train.batch_size={args.batch_size}"] if args.batch_size else []),
    ]
    recipe = load_recipe(REPO / "recipes" / recipe_name, overrides)
    full_steps = load_recipe(REPO / "recipes" / recipe_name).train.max_steps  # the schedule a real run trains
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer = TimedTrainer(recipe, out)
    trainer.train()
    per_step = statistics.median(np.diff(trainer.stamps[args.warmup:]))
    finite = all(math.isfinite(v) for logs in trainer.losses for v in logs.values())
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
    resumed = load_recipe(REPO / "recipes" / recipe_name, overrides + [f"train.max_steps={args.steps + 1}"])
    again = Trainer(resumed, out, resume="latest")
    start_step = again.step
    again.train()
    return {
        "recipe": recipe_name.removesuffix(".yaml"), "precision": precision, "batch": recipe.train.batch_size,
        "s/it": per_step, "peak GiB": peak, "finite": finite, "resumed": f"{start_step} -> {again.step}",
        "hours for max_steps": per_step * full_steps / 3600, "max_steps": full_steps,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--precision", nargs="+", default=["no", "bf16", "fp16"], choices=["no", "bf16", "fp16"])
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES))
    parser.add_argument("--batch-size", type=int, default=None, help="override the recipes' batch (smoke runs)")
    parser.add_argument("--case", nargs=4, metavar=("RECIPE", "PRECISION", "TEACHER", "IMAGES"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps < args.warmup + 2:
        parser.error(f"--steps must exceed --warmup by at least 2, got {args.steps} and {args.warmup}")
    if args.case:  # one case per process: Accelerate fixes the mixed precision once per process
        recipe_name, precision, teacher, images = args.case
        print(json.dumps(run_case(recipe_name, precision, args, Path(teacher), Path(images), Path(images).parent / f"{recipe_name}-{precision}")))
        return
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"{device}, torch {torch.__version__}; {args.steps} iterations per case, median of the last "
          f"{args.steps - args.warmup - 1} step times\n")
    print("| " + " | ".join(COLUMNS) + " |\n|" + " --- |" * len(COLUMNS), flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        teacher = ddpm_cifar10_standin(Path(scratch) / "teacher")
        images = random_image_folder(Path(scratch) / "images")
        for precision in args.precision:
            for recipe_name in args.recipes:
                command = [sys.executable, __file__, "--case", recipe_name, precision, str(teacher), str(images),
                           "--steps", str(args.steps), "--warmup", str(args.warmup)]
                command += ["--batch-size", str(args.batch_size)] if args.batch_size else []
                done = subprocess.run(command, capture_output=True, text=True)
                if done.returncode:  # a failing case is a row too, with the error's last line
                    # (progress bars redraw after the traceback when the process exits: skip them)
                    lines = [line for line in done.stderr.replace("\r", "\n").splitlines() if line.strip()]
                    last = next((line for line in reversed(lines) if not line.startswith("train:")), "no output")
                    row = {"recipe": recipe_name.removesuffix(".yaml"), "precision": precision, "finite": f"failed: {last}"}
                else:
                    row = json.loads(done.stdout.strip().splitlines()[-1])
                cells = (row.get(key, "") for key in COLUMNS)
                print("| " + " | ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in cells) + " |", flush=True)


if __name__ == "__main__":
    main()
