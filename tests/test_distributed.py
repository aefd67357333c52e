"""Two CPU processes (gloo, launched by torchrun) give the same weights as one with the same global batch.

Every random draw covers the global batch and each process keeps its rows, and the data loader hands
each process its slice of the same global batch; DDP's mean of per-process mean gradients is then
the one-process mean gradient, up to float summation order.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

TORCHRUN = Path(sys.executable).with_name("torchrun")


def train_on_one_and_two(recipe: Path, tmp_path: Path, files: tuple[str, ...], ports=(29631, 29632)) -> None:
    """Train ``recipe`` on one and on two CPU processes and compare the checkpoint-3 weight files ``files``."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    for processes, port in zip((1, 2), ports):
        subprocess.run(
            [str(TORCHRUN), f"--nproc_per_node={processes}", f"--master_port={port}", "-m", "n2ce_distill.cli", "train",
             str(recipe), "--output-dir", str(tmp_path / f"p{processes}")],
            check=True, capture_output=True, env=env, timeout=300,
        )
    for name in files:
        one = load_file(str(tmp_path / "p1" / "checkpoint-3" / f"{name}.safetensors"))
        two = load_file(str(tmp_path / "p2" / "checkpoint-3" / f"{name}.safetensors"))
        assert one.keys() == two.keys()
        for key in one:
            torch.testing.assert_close(one[key].float(), two[key].float(), rtol=0, atol=1e-5, msg=f"{name}:{key}")


needs_torchrun = pytest.mark.skipif(shutil.which(str(TORCHRUN)) is None, reason="torchrun not installed beside python")


@needs_torchrun
def test_two_processes_match_one(recipe_file, vp_teacher, tmp_path):
    recipe = recipe_file({
        "method": {"name": "dxmi", "num_steps": 2},
        "data": {"name": "digits"},
        "teacher": {"path": str(vp_teacher)},
        "critic": {"channels": [8, 16], "num_res_blocks": 2},
        "train": {"max_steps": 3, "batch_size": 8, "checkpoint_every": 3, "sample_every": 1000, "log_every": 1},
    })
    train_on_one_and_two(recipe, tmp_path, ("model", "model_1", "model_2", "ema"))  # sampler, critic, value, EMA
    # the DxMI velocity buffer is a mean over the global batch too (each process saw only its rows)
    states = [json.loads((tmp_path / p / "checkpoint-3" / "trainer_state.json").read_text()) for p in ("p1", "p2")]
    torch.testing.assert_close(torch.tensor(states[0]["method"]["velocity"]), torch.tensor(states[1]["method"]["velocity"]),
                               rtol=1e-6, atol=0)  # without the reduction they differ by 7e-6


@needs_torchrun
def test_two_processes_match_one_for_a_latent_text_lora_student(recipe_file, sd_teacher, captioned_digits, tmp_path):
    """The same for SiDA on a latent, text-conditioned teacher with LoRA students: the prompts are encoded per
    process for its rows, the VAE encodes its rows of the data, and DDP reduces the adapters alone."""
    recipe = recipe_file({
        "method": {"name": "sid", "adversarial": True, "lora_rank": 4},
        "data": {"name": "image-folder", "root": str(captioned_digits), "image_size": 8, "channels": 1,
                 "caption_column": "text"},
        "teacher": {"path": str(sd_teacher), "guidance_scale": 2.0},
        "train": {"max_steps": 3, "batch_size": 8, "checkpoint_every": 3, "sample_every": 1000, "log_every": 1},
    })
    train_on_one_and_two(recipe, tmp_path, ("model", "model_1", "ema"), ports=(29633, 29634))  # fake, generator, EMA
