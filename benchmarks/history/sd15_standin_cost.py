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

import numpy as np
import torch

from n2ce_distill.config import load_recipe
from n2ce_distill.trainer import Trainer

ROOT = Path("/tmp/sd15-standin")


def standin() -> Path:
    """SD-1.5's architecture (its diffusers configs, restated) with random weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from n2ce_distill.nets import save_text_to_image, sd15_scheduler, tiny_clip

    teacher = ROOT / "teacher"
    if (teacher / "model_index.json").is_file():
        return teacher
    torch.manual_seed(0)
    tokenizer, _ = tiny_clip(768, max_length=77)  # a character-level stand-in for CLIP's BPE vocabulary
    encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072,
                                           num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                                           bos_token_id=0, eos_token_id=1, pad_token_id=1))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=2, sample_size=512, scaling_factor=0.18215)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
    return save_text_to_image(teacher, unet, sd15_scheduler(), tokenizer, encoder, vae)


def captioned_images() -> Path:
    from PIL import Image

    folder = ROOT / "images"
    if not (folder / "metadata.jsonl").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        rng, lines = np.random.default_rng(0), []
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)).save(folder / f"{i}.png")
            lines.append(json.dumps({"file_name": f"{i}.png", "text": f"a photo of thing number {i}"}))
        (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
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
