"""Seconds and peak memory of training iterations of a shipped SD-1.5 recipe on a full-size SD-1.5 architecture
stand-in with random weights (UNet2DConditionModel at 64x64 latents with 768-wide cross-attention, SD's
AutoencoderKL, a CLIP ViT-L/14-sized text encoder), on this machine, at batch 1 and 512x512 images. Prints one
JSON line: the seconds of each timed iteration, the resident memory before the first and the process's peak.

    python benchmarks/history/sd15_standin_cost.py RECIPE ITERATIONS [key=value ...]

The stand-in folder and four random 512x512 captioned images are written once under /tmp/sd15-standin.
"""
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

from n2ce_distill.benchmarks.train_step import STANDINS, random_images
from n2ce_distill.config import load_recipe
from n2ce_distill.trainer import Trainer

ROOT = Path("/tmp/sd15-standin")


def standin() -> Path:
    """SD-1.5's architecture with random weights: the ``bench train_step`` stand-in, written once."""
    teacher = ROOT / "teacher"
    if not (teacher / "model_index.json").is_file():
        torch.manual_seed(0)
        STANDINS["stable-diffusion-v1-5/stable-diffusion-v1-5"](teacher)
    return teacher


def captioned_images() -> Path:
    folder = ROOT / "images"
    if not (folder / "metadata.jsonl").is_file():
        random_images(folder, 512, count=4, caption_column="text")
    return folder


recipe_path, iterations, *overrides = sys.argv[1:]
teacher, images = standin(), captioned_images()
data = ([f"data.root={images}"] if "prompts" not in recipe_path else
        [f"data.root={images / 'metadata.jsonl'}"])  # any text file serves as a prompt list
quiet = ["train.max_steps=1000000", "train.checkpoint_every=1000000", "train.sample_every=1000000", "eval.fid_every=0",
         "train.batch_size=1", "train.mixed_precision=no", f"teacher.path={teacher}", *data]
trainer = Trainer(load_recipe(recipe_path, [*quiet, *overrides]), tempfile.mkdtemp())
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
seconds = []
for _ in range(int(iterations)):
    start = time.perf_counter()
    trainer.iteration()
    seconds.append(time.perf_counter() - start)
trainer._check_finite()
trainable = {name: sum(p.numel() for p in net.parameters() if p.requires_grad)
             for name, net in trainer.method.nets.read.items()}
print(json.dumps({"recipe": Path(recipe_path).name, "overrides": overrides, "seconds": [round(s, 1) for s in seconds],
                  "rss_after_setup_gib": round(before, 2),
                  "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
                  "trainable_parameters": trainable, "threads": torch.get_num_threads()}))
