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


def _one_step_dxmi(recipe_file, teacher: Path) -> Path:
    return recipe_file({"method": {"name": "dxmi", "num_steps": 2}, "data": {"name": "digits"},
                        "teacher": {"path": str(teacher)}, "train": {"max_steps": 1, "batch_size": 8}})


def test_a_launch_accelerate_does_not_distribute_is_refused_before_anything_is_written(recipe_file, vp_teacher,
                                                                                        tmp_path, monkeypatch):
    """Two processes started (WORLD_SIZE=2) but one set up by Accelerate (what an FSDP launch config gives on a
    machine without a GPU): each would train alone into the same folder."""
    from n2ce_distill.config import load_recipe
    from n2ce_distill.errors import InputError
    from n2ce_distill.trainer import Trainer

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(InputError, match=r"^launch: 2 processes were started but Accelerate distributes 1 \(NO\)"):
        Trainer(load_recipe(_one_step_dxmi(recipe_file, vp_teacher)), tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("kind", ["FSDP", "DEEPSPEED", "MEGATRON_LM"])
def test_distribution_other_than_data_parallel_is_refused(kind, monkeypatch):
    """FSDP, DeepSpeed and Megatron-LM are refused with a line naming the distribution (Accelerate sets them up
    only on GPUs, so this checks the guard on a stand-in for its accelerator); one process passes."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from n2ce_distill.errors import InputError
    from n2ce_distill.trainer import _check_launch

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    accelerator = SimpleNamespace(num_processes=1, distributed_type=DistributedType[kind])
    with pytest.raises(InputError, match=rf"^launch: distributed_type {DistributedType[kind].value} is not supported"):
        _check_launch(accelerator)
    _check_launch(SimpleNamespace(num_processes=1, distributed_type=DistributedType.NO))


ACCELERATE = Path(sys.executable).with_name("accelerate")


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine Accelerate would set up FSDP itself")
def test_an_fsdp_launch_config_without_a_gpu_stops_each_process_with_one_line_and_exit_2(recipe_file, vp_teacher,
                                                                                         tmp_path):
    config = tmp_path / "fsdp.yaml"
    config.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: FSDP\nnum_processes: 2\nnum_machines: 1\n"
                      "machine_rank: 0\nmixed_precision: 'no'\nuse_cpu: true\nmain_training_function: main\n"
                      "fsdp_config: {fsdp_version: 2, fsdp_auto_wrap_policy: NO_WRAP}\n")
    done = subprocess.run([str(ACCELERATE), "launch", "--config_file", str(config), "--main_process_port", "29635",
                           "-m", "n2ce_distill.cli", "train", str(_one_step_dxmi(recipe_file, vp_teacher)),
                           "--output-dir", str(tmp_path / "run")],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    errors = [line for line in done.stderr.splitlines() if line.startswith("n2ce-distill train: error:")]
    assert len(errors) == 2 and all("launch: 2 processes were started" in line for line in errors), done.stderr[-2000:]
    assert "exitcode  : 2" in done.stderr and "[rank0]: Traceback" not in done.stderr  # torchrun's report of the children
    assert done.returncode != 0 and not (tmp_path / "run").exists()
