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
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

TORCHRUN = Path(sys.executable).with_name("torchrun")
FSDP_ON_CPU = Path(__file__).with_name("fsdp_on_cpu.py")
FSDP_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT"}


def launch(recipe: Path, run: Path, processes: int, port: int, *args: str, fsdp: dict | bool = False,
           check: bool = True) -> subprocess.CompletedProcess:
    """``n2ce-distill train`` on ``processes`` CPU processes under torchrun (FSDP2 through tests/fsdp_on_cpu.py;
    a dict ``fsdp`` adds to :data:`FSDP_ENV`)."""
    fsdp_env = {**FSDP_ENV, **(fsdp if isinstance(fsdp, dict) else {})} if fsdp else {}
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", **fsdp_env}
    program = [str(FSDP_ON_CPU)] if fsdp else ["-m", "n2ce_distill.cli"]
    done = subprocess.run([str(TORCHRUN), f"--nproc_per_node={processes}", f"--master_port={port}", *program, "train",
                           str(recipe), *args, "--output-dir", str(run)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0 or not check, done.stderr[-3000:]
    return done


def error_lines(done: subprocess.CompletedProcess) -> set[str]:
    """The one-line errors of a launch that stopped at startup: each process prints the same line with exit
    code 2 and no traceback (torchrun ends the other process once one has exited, at times before it prints)."""
    assert "exitcode  : 2" in done.stderr and "[rank0]: Traceback" not in done.stderr, done.stderr[-2000:]
    return {line for line in done.stderr.splitlines() if line.startswith("n2ce-distill train: error:")}


def weights(checkpoint: Path, name: str) -> dict[str, torch.Tensor]:
    """A checkpoint's weight file ``name`` (``model``, ``model_1``, ..., ``ema``): safetensors, or the whole
    state dict Accelerate saves for an FSDP-sharded network (read with ``weights_only=True``)."""
    path = checkpoint / f"{name}.safetensors"
    if path.exists():
        return load_file(str(path))
    return torch.load(checkpoint / f"pytorch_model_fsdp{name.removeprefix('model')}.bin", weights_only=True)


def assert_same_weights(one: Path, two: Path, files: tuple[str, ...], atol: float = 1e-5) -> None:
    for name in files:
        first, second = weights(one, name), weights(two, name)
        assert first.keys() == second.keys(), name
        for key in first:
            torch.testing.assert_close(first[key].float(), second[key].float(), rtol=0, atol=atol, msg=f"{name}:{key}")


def train_on_one_and_two(recipe: Path, tmp_path: Path, files: tuple[str, ...], ports=(29631, 29632),
                         fsdp: bool = False) -> None:
    """Train ``recipe`` on one and on two CPU processes (DDP, or FSDP2) and compare the checkpoint-3 weight
    files ``files``."""
    launch(recipe, tmp_path / "p1", 1, ports[0])
    launch(recipe, tmp_path / "p2", 2, ports[1], fsdp=fsdp)
    assert_same_weights(tmp_path / "p1" / "checkpoint-3", tmp_path / "p2" / "checkpoint-3", files)


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


TINY_DIGITS_TRAIN = {"batch_size": 8, "checkpoint_every": 3, "sample_every": 1000, "log_every": 1}


@needs_torchrun
@pytest.mark.parametrize("method, accumulation, ports", [
    ({"name": "sid", "adversarial": True}, 1, (29641, 29642)),
    ({"name": "sid", "adversarial": True}, 2, (29651, 29652)),
    ({"name": "dmd2", "adversarial": False, "fake_updates_per_step": 2}, 1, (29643, 29644)),
], ids=["sida", "sida-accumulating", "dmd2"])
def test_fsdp2_on_two_processes_matches_one(method, accumulation, ports, recipe_file, vp_teacher, tmp_path):
    """FSDP2 shards every trained network with its gradients and Adam moments; its reduce-scatter averages the
    gradients as DDP's all-reduce does, and the EMA averages whole weights, so the weights match one process's
    with the same global batch. SiDA's critic reads the fake score network's features through hooks; DMD2's
    generator turn reads the fake score network before it ever trains (FSDP2 fixes a weight's requires_grad at
    its first gather: the fake score network stopped training until ``reading`` left sharded networks alone).
    Accumulating, FSDP reduces every micro-batch (with FSDP2's no-sync accumulation the generator's backward
    leaked into the fake score network's gradients: 2e-4 off)."""
    recipe = recipe_file({"method": method, "data": {"name": "digits"}, "teacher": {"path": str(vp_teacher)},
                          "train": {"max_steps": 3, "gradient_accumulation_steps": accumulation, **TINY_DIGITS_TRAIN}})
    train_on_one_and_two(recipe, tmp_path, ("model", "model_1", "ema"), ports=ports, fsdp=True)  # 2 networks, EMA


@needs_torchrun
def test_fsdp2_checkpoints_resume_to_the_weights_of_an_uninterrupted_run(recipe_file, vp_teacher, tmp_path):
    """DxMI on FSDP2, each ResnetBlock2D sharded on its own: three steps, a checkpoint (whole state dicts, every
    file readable with ``weights_only``), a resumed run to five; each checkpoint matches one process's run
    straight to five. DxMI's value network runs on rows that need it only, so a process with none must still
    join the sharded forward, and the sampler's noise scales are read outside ``forward`` (both hung or failed
    before). The critic holds no ResnetBlock2D, which Accelerate's wrapping refused. A checkpoint does not move
    between DDP and FSDP: resuming across is refused with one line, before anything is written."""
    from n2ce_distill.checkpoints import verify
    from n2ce_distill.config import load_recipe
    from n2ce_distill.errors import InputError
    from n2ce_distill.trainer import Trainer

    recipe = recipe_file({"method": {"name": "dxmi", "num_steps": 2}, "data": {"name": "digits"},
                          "teacher": {"path": str(vp_teacher)}, "critic": {"channels": [8, 16], "num_res_blocks": 2},
                          "train": {"max_steps": 5, **TINY_DIGITS_TRAIN}})
    blocks = {"FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP", "FSDP_TRANSFORMER_CLS_TO_WRAP": "ResnetBlock2D"}
    launch(recipe, tmp_path / "p1", 1, 29645)
    launch(recipe, tmp_path / "p2", 2, 29646, "train.max_steps=3", fsdp=blocks)
    launch(recipe, tmp_path / "p2", 2, 29647, "--resume", "latest", fsdp=blocks)
    for step in (3, 5):
        checkpoint = tmp_path / "p2" / f"checkpoint-{step}"
        verify(checkpoint)
        assert (checkpoint / "pytorch_model_fsdp.bin").exists() and not (checkpoint / "model.safetensors").exists()
        assert_same_weights(tmp_path / "p1" / f"checkpoint-{step}", checkpoint, ("model", "model_1", "model_2", "ema"))
    assert_same_weights(tmp_path / "p1" / "pipeline" / "unet", tmp_path / "p2" / "pipeline" / "unet",
                        ("diffusion_pytorch_model",))

    before = sorted((path, path.stat().st_mtime_ns) for path in tmp_path.rglob("*"))
    done = launch(recipe, tmp_path / "p1", 2, 29653, "train.max_steps=7", "--resume", "latest", fsdp=True, check=False)
    assert error_lines(done) <= {f"n2ce-distill train: error: --resume '{tmp_path / 'p1' / 'checkpoint-5'}': written "
                                 "under DDP or one process, launched under FSDP; its optimiser state does not carry "
                                 "over, so resume it under DDP or one process"} and error_lines(done)
    with pytest.raises(InputError, match=r"checkpoint-5': written under FSDP, launched under DDP or one process"):
        Trainer(load_recipe(recipe), tmp_path / "p2", resume="latest")
    assert sorted((path, path.stat().st_mtime_ns) for path in tmp_path.rglob("*")) == before


@needs_torchrun
def test_fsdp2_on_a_latent_text_lora_student_matches_one_process(recipe_file, sd_teacher, captioned_digits, tmp_path):
    """SiDA with LoRA adapters and gradient checkpointing on a latent, text-conditioned teacher under FSDP2: the
    frozen base weights are sharded with the adapters and only the adapters train."""
    recipe = recipe_file({
        "method": {"name": "sid", "adversarial": True, "lora_rank": 4},
        "data": {"name": "image-folder", "root": str(captioned_digits), "image_size": 8, "channels": 1,
                 "caption_column": "text"},
        "teacher": {"path": str(sd_teacher), "guidance_scale": 2.0},
        "train": {"max_steps": 3, "gradient_checkpointing": True, **TINY_DIGITS_TRAIN},
    })
    train_on_one_and_two(recipe, tmp_path, ("model", "model_1", "ema"), ports=(29648, 29649), fsdp=True)


@needs_torchrun
def test_fsdp2_refuses_an_optimiser_over_two_networks_before_anything_is_written(recipe_file, vp_teacher, tmp_path):
    """DMD2's GAN head trains in the fake score network's optimiser; Accelerate's FSDP2 shards one network per
    optimiser: each process stops with one line naming both, exit code 2, and no run folder."""
    recipe = recipe_file({"method": {"name": "dmd2", "adversarial": True}, "data": {"name": "digits"},
                          "teacher": {"path": str(vp_teacher)}, "train": {"max_steps": 1, "batch_size": 8}})
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", **FSDP_ENV}
    done = subprocess.run([str(TORCHRUN), "--nproc_per_node=2", "--master_port=29650", str(FSDP_ON_CPU), "train",
                           str(recipe), "--output-dir", str(tmp_path / "run")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert error_lines(done) == {
        "n2ce-distill train: error: launch: FSDP shards one network per optimiser, but method dmd2's fake_score "
        "optimiser trains fake_score and gan_head; launch it with DDP (MULTI_GPU)"}, done.stderr[-2000:]
    assert not (tmp_path / "run").exists()


def test_layer_classes_to_wrap_are_those_each_network_holds():
    """Accelerate wraps one list of classes in every network it prepares and fails where one is missing; each
    network gets the classes it holds, and a class none holds is a one-line error naming the config key."""
    from n2ce_distill.errors import InputError
    from n2ce_distill.trainer import _layer_classes_to_wrap, _wrapping_only

    nets = {"student": torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.GroupNorm(1, 2)),
            "critic": torch.nn.Sequential(torch.nn.Linear(2, 1))}
    plugin = SimpleNamespace(transformer_cls_names_to_wrap=["GroupNorm", "Linear"])
    assert _layer_classes_to_wrap(plugin, nets) == {"student": ["GroupNorm", "Linear"], "critic": ["Linear"]}
    with _wrapping_only(plugin, ["Linear"]):
        assert plugin.transformer_cls_names_to_wrap == ["Linear"]
    assert plugin.transformer_cls_names_to_wrap == ["GroupNorm", "Linear"]
    assert _layer_classes_to_wrap(SimpleNamespace(transformer_cls_names_to_wrap=None), nets) == dict.fromkeys(nets)
    with pytest.raises(InputError, match=r"^fsdp_config.fsdp_transformer_layer_cls_to_wrap: no trained network "
                                         r"holds a ResnetBlock2D"):
        _layer_classes_to_wrap(SimpleNamespace(transformer_cls_names_to_wrap=["Linear", "ResnetBlock2D"]), nets)


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


@pytest.mark.parametrize("kind", ["DEEPSPEED", "MEGATRON_LM"])
def test_distribution_other_than_ddp_and_fsdp2_is_refused(kind, monkeypatch):
    """DeepSpeed and Megatron-LM are refused with a line naming the distribution (Accelerate sets them up only
    on GPUs, so this checks the guard on a stand-in for its accelerator); one process passes."""
    from accelerate.utils import DistributedType

    from n2ce_distill.errors import InputError
    from n2ce_distill.trainer import _check_launch

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    accelerator = SimpleNamespace(num_processes=1, distributed_type=DistributedType[kind])
    with pytest.raises(InputError, match=rf"^launch: distributed_type {DistributedType[kind].value} is not supported"):
        _check_launch(accelerator)
    _check_launch(SimpleNamespace(num_processes=1, distributed_type=DistributedType.NO))


@pytest.mark.parametrize("version, state_dict_type, extra, error", [
    (1, "FULL_STATE_DICT", {}, r"^launch: fsdp_config.fsdp_version 1 is not supported; set fsdp_version: 2"),
    (2, "SHARDED_STATE_DICT", {}, r"^launch: fsdp_config.fsdp_state_dict_type SHARDED_STATE_DICT is not supported: "
                                  r"its checkpoints load their metadata through pickle; use FULL_STATE_DICT"),
    (2, "FULL_STATE_DICT", {"mixed_precision": "bf16"}, r"^launch: mixed_precision bf16 is not supported under FSDP"),
    (2, "FULL_STATE_DICT", {"activation_checkpointing": True},
     r"^launch: fsdp_activation_checkpointing is not supported under FSDP"),
    (2, "FULL_STATE_DICT", {"auto_wrap_policy": "size"}, r"^launch: fsdp_config.fsdp_auto_wrap_policy "
                                                          r"SIZE_BASED_WRAP is not supported"),
    (2, "FULL_STATE_DICT", {"auto_wrap_policy": "transformer"}, None),
    (2, "FULL_STATE_DICT", {}, None),
])
def test_fsdp_launches_other_than_fsdp2_with_whole_state_dicts_are_refused(version, state_dict_type, extra, error,
                                                                           monkeypatch):
    from accelerate.utils import DistributedType
    from torch.distributed.fsdp import StateDictType

    from n2ce_distill.errors import InputError
    from n2ce_distill.trainer import _check_launch

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    from torch.distributed.fsdp.wrap import size_based_auto_wrap_policy, transformer_auto_wrap_policy

    policies = {"size": size_based_auto_wrap_policy, "transformer": transformer_auto_wrap_policy}
    plugin = SimpleNamespace(fsdp_version=version, state_dict_type=StateDictType[state_dict_type], cpu_offload=None,
                             activation_checkpointing=extra.get("activation_checkpointing", False),
                             auto_wrap_policy=policies.get(extra.get("auto_wrap_policy")))
    accelerator = SimpleNamespace(num_processes=2, distributed_type=DistributedType.FSDP,
                                  mixed_precision=extra.get("mixed_precision", "no"),
                                  state=SimpleNamespace(fsdp_plugin=plugin))
    if error is None:
        _check_launch(accelerator)
    else:
        with pytest.raises(InputError, match=error):
            _check_launch(accelerator)


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
    errors = error_lines(done)
    assert len(errors) == 1 and "launch: 2 processes were started" in next(iter(errors)), done.stderr[-2000:]
    assert done.returncode != 0 and not (tmp_path / "run").exists()
