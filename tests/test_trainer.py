"""The generic trainer: resume equivalence, crash safety, non-finite guards, FID-free smoke runs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from n2ce_distill.config import load_recipe
from n2ce_distill.trainer import NonFiniteError, Trainer

TINY = [
    "train.batch_size=8", "train.log_every=1", "train.sample_every=1000", "critic.channels=[8, 16]",
    "critic.num_res_blocks=2", "critic.hidden_features=16", "critic.num_layers=2",
]


@pytest.fixture
def dxmi_recipe(recipe_file, vp_teacher):
    return recipe_file({"method": {"name": "dxmi", "num_steps": 2}, "data": {"name": "digits"}, "teacher": {"path": str(vp_teacher)}})


def _weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    folder = run / f"checkpoint-{step}"
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors |= {f"{path.name}:{k}": v for k, v in load_file(str(path)).items()}
    for path in sorted(folder.glob("optimizer*.bin")):
        state = torch.load(path, weights_only=True)["state"]
        tensors |= {f"{path.name}:{i}:{k}": v for i, s in state.items() for k, v in s.items() if torch.is_tensor(v)}
    return tensors


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_resume_equals_uninterrupted_run(dxmi_recipe, tmp_path):
    steps = ["train.max_steps=4", "train.checkpoint_every=2", *TINY]
    Trainer(load_recipe(dxmi_recipe, steps), tmp_path / "straight").train()
    first = load_recipe(dxmi_recipe, ["train.max_steps=2", "train.checkpoint_every=2", *TINY])
    Trainer(first, tmp_path / "resumed").train()
    Trainer(load_recipe(dxmi_recipe, steps), tmp_path / "resumed", resume="latest").train()
    _assert_same(_weights(tmp_path / "straight", 4), _weights(tmp_path / "resumed", 4))
    state = (tmp_path / "resumed" / "checkpoint-4" / "trainer_state.json").read_text()
    assert state == (tmp_path / "straight" / "checkpoint-4" / "trainer_state.json").read_text()


def test_total_limit_and_exported_pipeline(dxmi_recipe, tmp_path):
    recipe = load_recipe(dxmi_recipe, ["train.max_steps=3", "train.checkpoint_every=1", "train.checkpoint_total_limit=2", *TINY])
    final = Trainer(recipe, tmp_path).train()
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    assert (final / "model_index.json").is_file() and (tmp_path / "checkpoint-3" / "pipeline" / "few_step").is_dir()
    assert list((tmp_path / "logs").rglob("events.out.tfevents*")), "TensorBoard logs missing"


def test_nonfinite_loss_stops_with_step_and_term(dxmi_recipe, tmp_path, monkeypatch):
    recipe = load_recipe(dxmi_recipe, ["train.max_steps=4", "train.checkpoint_every=1", *TINY])
    trainer = Trainer(recipe, tmp_path)
    original = trainer.method.objective

    def poisoned(ld, ln, **kw):
        loss = original(ld, ln, **kw)
        return loss * float("nan") if trainer.step == 2 else loss

    monkeypatch.setattr(trainer.method, "objective", poisoned)
    with pytest.raises(NonFiniteError, match=r"step 2: non-finite critic loss .*last good checkpoint is kept"):
        trainer.train()
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]


def test_nonfinite_steps_can_be_skipped(dxmi_recipe, tmp_path, monkeypatch):
    recipe = load_recipe(dxmi_recipe, ["train.max_steps=3", "train.checkpoint_every=3", "train.on_nonfinite=skip", *TINY])
    trainer = Trainer(recipe, tmp_path)
    original = trainer.method.objective
    monkeypatch.setattr(trainer.method, "objective", lambda ld, ln, **kw: original(ld, ln) * (float("inf") if trainer.step == 1 else 1))
    trainer.train()
    assert trainer.skipped_steps == 1
    params = torch.cat([p.detach().flatten() for p in trainer.method.nets.read["critic"].parameters()])
    assert torch.isfinite(params).all()


def test_fp16_overflow_is_left_to_the_loss_scaler(dxmi_recipe, tmp_path):
    """With a GradScaler (fp16 on a GPU) an overflowing gradient skips the step and halves the scale; without
    one the same gradient is an error. A CPU scaler whose scale overflows fp32 stands in for the GPU's."""
    from accelerate.optimizer import AcceleratedOptimizer

    trainer = Trainer(load_recipe(dxmi_recipe, ["train.max_steps=1", *TINY]), tmp_path / "scaled")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127)
    trainer.accelerator.scaler = scaler
    trainer.optimizers = {name: AcceleratedOptimizer(opt.optimizer, scaler=scaler) for name, opt in trainer.optimizers.items()}
    nets = trainer.method.nets.read
    before = {name: {k: v.clone() for k, v in nets[name].state_dict().items()} for name in ("critic", "sampler")}
    trainer.train()
    for name, weights in before.items():
        assert all(torch.equal(v, nets[name].state_dict()[k]) for k, v in weights.items()), f"{name} moved on overflow"
    # critic (loss ~5.6) and sampler (~0.6) overflow at 2^127 and each halves the scale; the value's loss, ~1e-10
    # while U = 0, does not
    assert scaler.get_scale() == 2.0**125

    plain = Trainer(load_recipe(dxmi_recipe, ["train.max_steps=1", *TINY]), tmp_path / "plain")
    critic = plain.method.nets.read["critic"]
    weights = {k: v.clone() for k, v in critic.state_dict().items()}
    plain._update("critic", critic(torch.zeros(2, 1, 8, 8)).sum() * 1e30)
    assert all(torch.equal(v, critic.state_dict()[k]) for k, v in weights.items()), "critic moved on overflow"
    with pytest.raises(NonFiniteError, match="step 0: non-finite critic gradient"):
        plain._check_finite()  # the device-side flag, read at the next logged step


def test_sigkill_then_resume_matches(dxmi_recipe, tmp_path):
    """Kill a real training process with SIGKILL after its first checkpoint, resume, compare weights."""
    args = [str(dxmi_recipe), "train.max_steps=6", "train.checkpoint_every=2", *TINY]
    cli = [sys.executable, "-m", "n2ce_distill.cli", "train"]
    subprocess.run([*cli, *args, "--output-dir", str(tmp_path / "straight")], check=True, capture_output=True)
    proc = subprocess.Popen([*cli, *args, "--output-dir", str(tmp_path / "killed")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (tmp_path / "killed" / "checkpoint-2").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    complete = sorted(p.name for p in (tmp_path / "killed").glob("checkpoint-*"))
    assert complete and "checkpoint-6" not in complete, "the kill came too late to test anything"
    subprocess.run([*cli, *args, "--output-dir", str(tmp_path / "killed"), "--resume", "latest"], check=True, capture_output=True)
    _assert_same(_weights(tmp_path / "straight", 6), _weights(tmp_path / "killed", 6))


@pytest.mark.parametrize("victim", ["model_1.safetensors", "optimizer.bin", "random_states_0.pkl", "ema.safetensors", "trainer_state.json"])
def test_corrupted_checkpoint_is_named_on_resume(dxmi_recipe, tmp_path, victim):
    from n2ce_distill.checkpoints import CheckpointError

    recipe = load_recipe(dxmi_recipe, ["train.max_steps=1", "train.checkpoint_every=1", *TINY])
    Trainer(recipe, tmp_path).train()
    path = tmp_path / "checkpoint-1" / victim
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(CheckpointError, match=victim.replace(".", r"\.")):
        Trainer(load_recipe(dxmi_recipe, ["train.max_steps=2", *TINY]), tmp_path, resume="latest")


def test_fid_hook_logs_and_keeps_best_export(dxmi_recipe, tmp_path):
    import json

    recipe = load_recipe(dxmi_recipe, ["train.max_steps=2", "train.checkpoint_every=2", "eval.fid_every=1",
                                       "eval.fid_samples=64", "eval.batch_size=32", *TINY])
    trainer = Trainer(recipe, tmp_path)
    trainer.train()
    lines = [json.loads(line) for line in (tmp_path / "fid.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2] and all(line["fid"] > 0 for line in lines)
    assert trainer.best_fid == min(line["fid"] for line in lines)
    assert (tmp_path / "best" / "model_index.json").is_file()


@pytest.mark.parametrize("scale, said", [(1e-4, "changes only the step size"), (None, "entered the density chasm")])
def test_critic_regime_is_logged_and_said_once(dxmi_recipe, tmp_path, monkeypatch, capsys, scale, said):
    """The trainer logs the critic's diagnostics at every logged step and says each regime change once:
    the method's logits are rescaled (tiny: linear) or replaced by separated ones (chasm)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recipe = load_recipe(dxmi_recipe, ["train.max_steps=12", "train.checkpoint_every=12", *TINY])
    trainer = Trainer(recipe, tmp_path)
    original = trainer.method.training_step

    def rescaled(*args, **kwargs):
        output = original(*args, **kwargs)
        ld, ln = output.critic_logits
        output.critic_logits = (scale * ld, scale * ln) if scale else (ld.abs() + 20, -ln.abs() - 20)
        return output

    monkeypatch.setattr(trainer.method, "training_step", rescaled)
    trainer.train()
    err = capsys.readouterr().err
    assert err.count(said) == 1
    regime = "linear" if scale else "chasm"
    assert err.count("critic regime over 12 logged steps: ") == 1 and f"{regime} 100%" in err
    events = EventAccumulator(str(next((tmp_path / "logs").rglob("events.out.tfevents*")).parent))
    events.Reload()
    logged = {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"] if tag.startswith("critic/")}
    assert {"critic/acc_data", "critic/logit_gap", "critic/logit_rms", "critic/capped_noise", "critic/regime"} <= set(logged)
    others = set(events.Tags()["scalars"])
    assert {"grad_norm/critic", "grad_norm/sampler", "grad_norm/value", "lr/critic", "lr/sampler", "lr/log_scales"} <= others
    assert [e.value for e in events.Scalars("lr/critic")][-1] == pytest.approx(recipe.optim["critic"].lr)
    assert events.Tags()["images"] == ["samples"]  # the final step's grid
    assert len(logged["critic/regime"]) == 12
    assert set(logged["critic/regime"]) == {float(["linear", "informative", "chasm"].index(regime))}


def test_a_folder_holding_a_run_is_refused_unless_resumed_or_overwritten(dxmi_recipe, tmp_path, capsys):
    recipe = load_recipe(dxmi_recipe, ["train.max_steps=2", "train.checkpoint_every=1", *TINY])
    Trainer(recipe, tmp_path / "run").train()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    before = sorted(p.name for p in (tmp_path / "run").iterdir())
    with pytest.raises(ValueError, match=r"already holds a run \(checkpoint-1, checkpoint-2, logs, \.\.\.\): pass --resume"):
        Trainer(recipe, tmp_path / "run")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == before  # refused before anything changed
    Trainer(recipe, tmp_path / "run", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["notes.txt"]  # only the run's own artefacts go
    assert "removed the earlier run" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a folder"):
        Trainer(recipe, tmp_path / "file")


def test_resume_takes_new_learning_rates_and_refuses_fixed_keys(dxmi_recipe, tmp_path, capsys):
    first = load_recipe(dxmi_recipe, ["train.max_steps=1", "train.checkpoint_every=1", *TINY])
    Trainer(first, tmp_path).train()
    faster = load_recipe(dxmi_recipe, ["train.max_steps=2", "optim.critic.lr=3e-3", "optim.log_scales.lr=7e-4",
                                       "optim.value.betas=[0.5,0.9]", *TINY])
    trainer = Trainer(faster, tmp_path, resume="latest")
    err = capsys.readouterr().err
    assert "resumed from checkpoint-1 (step 1)" in err
    assert "optim.critic.lr: 1e-05 in the checkpoint, 0.003 from the recipe (used)" in err
    assert "optim.value.betas: (0.9, 0.999) in the checkpoint, (0.5, 0.9) from the recipe (used)" in err
    assert "optim.sampler" not in err  # unchanged settings are not mentioned
    assert [g["lr"] for g in trainer.optimizers["critic"].param_groups] == [3e-3]
    assert [g["lr"] for g in trainer.optimizers["sampler"].param_groups] == [faster.optim["sampler"].lr, 7e-4]
    assert [tuple(g["betas"]) for g in trainer.optimizers["value"].param_groups] == [(0.5, 0.9)]
    for override, key in [("train.batch_size=4", "train.batch_size"), ("critic.objective=nce", "critic.objective"),
                          ("method.num_steps=3", "method.num_steps")]:
        changed = load_recipe(dxmi_recipe, ["train.max_steps=2", *TINY, override])
        with pytest.raises(ValueError, match=rf"^{key}: cannot change on resume \(checkpoint checkpoint-1 has"):
            Trainer(changed, tmp_path, resume="latest")
    Trainer(first, tmp_path / "empty", resume="latest")
    assert "no checkpoint found in" in capsys.readouterr().err


@pytest.mark.parametrize("poison, culprit", [
    (lambda m: m.nets.read["critic"].out.weight, "non-finite weights in critic"),
    # finite but huge: every loss and gradient check passes, yet the student samples inf/NaN
    (lambda m: next(m.nets.read["sampler"].denoiser.parameters()), "samples non-finite values"),
])
def test_a_checkpoint_is_never_written_from_unsound_weights(dxmi_recipe, tmp_path, monkeypatch, poison, culprit):
    from n2ce_distill.pipelines import load_sample_source

    recipe = load_recipe(dxmi_recipe, ["train.max_steps=3", "train.checkpoint_every=1", *TINY])
    trainer = Trainer(recipe, tmp_path)
    original = trainer.method.training_step

    def poisoning(batch, step, update, labels=None):
        output = original(batch, step, update, labels=labels)
        if step == 1:  # after the step's updates, before its checkpoint
            with torch.no_grad():
                poison(trainer.method).fill_(float("nan") if "weights" in culprit else 1e30)
            trainer.ema.ema_model.load_state_dict(trainer.method.nets.read["sampler"].state_dict())
        return output

    monkeypatch.setattr(trainer.method, "training_step", poisoning)
    with pytest.raises(NonFiniteError, match=rf"step 2: .*{culprit}; not saved, checkpoint-1 is kept"):
        trainer.train()
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-1"]
    samples = load_sample_source(str(tmp_path / "checkpoint-1" / "pipeline"))(4, torch.Generator().manual_seed(0))
    assert torch.isfinite(samples).all()  # the kept checkpoint loads and samples


def test_resume_of_other_networks_is_one_clear_error(dxmi_recipe, tmp_path):
    """A checkpoint written before recipes were stored in it (no fixed-key check) that does not fit."""
    import json

    Trainer(load_recipe(dxmi_recipe, ["train.max_steps=1", *TINY]), tmp_path).train()
    state_file = tmp_path / "checkpoint-1" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    del state["recipe"]
    state_file.write_text(json.dumps(state))
    wider = load_recipe(dxmi_recipe, ["train.max_steps=2", *TINY, "critic.channels=[8, 32]"])
    with pytest.raises(ValueError, match=r"--resume '.*checkpoint-1': its weights do not fit this recipe's networks"):
        Trainer(wider, tmp_path, resume="latest")


def _losses(recipe, out: Path, monkeypatch) -> tuple[Trainer, list[dict[str, float]]]:
    """The trainer of a short run, and the logged losses of each of its steps."""
    trainer = Trainer(recipe, out)
    seen, after = [], trainer._after_step
    monkeypatch.setattr(trainer, "_after_step", lambda output: (
        seen.append({k: float(v) for k, v in output.scalars.items() if k.startswith("loss")}), after(output)))
    trainer.train()
    return trainer, seen


@pytest.mark.parametrize("key", ["train.channels_last=true", "train.compile=true"])
def test_fast_paths_compute_the_eager_losses(recipe_file, vp_teacher, toy_teacher, tmp_path, monkeypatch, key):
    """channels_last and torch.compile change how the networks run, not what they compute: the same run's losses
    agree with eager to within fp32 reordering (rel 1e-4) over three steps, for every loss term of DxMI. The
    convolutional case runs on digits; compile runs on the 2-D toy, whose MLPs inductor compiles in seconds
    (the digits UNet takes minutes on two cores)."""
    import shutil

    if key == "train.compile=true" and not shutil.which("g++"):
        pytest.skip("torch.compile on a CPU needs a C++ compiler")
    data, teacher = ("digits", vp_teacher) if "channels_last" in key else ("8gaussians", toy_teacher)
    recipe = recipe_file({"method": {"name": "dxmi", "num_steps": 2}, "data": {"name": data, "num_points": 512},
                          "teacher": {"path": str(teacher)}})
    steps = ["train.max_steps=3", "train.checkpoint_every=3", *TINY]
    _, eager = _losses(load_recipe(recipe, steps), tmp_path / "eager", monkeypatch)
    trainer, fast = _losses(load_recipe(recipe, [*steps, key]), tmp_path / "fast", monkeypatch)
    modules = [m for net in trainer.method.nets.read.values() for m in net.modules()]
    if "compile" in key:  # the fast path did run: every network's model is compiled
        assert sum(getattr(m, "_compiled_call_impl", None) is not None for m in modules) == len(trainer.method.nets.read)
    else:
        convs = [m.weight for m in modules if isinstance(m, torch.nn.Conv2d)]
        # (1x1 kernels and one-channel inputs are contiguous in both layouts: the others show the conversion)
        assert all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
        assert sum(not w.is_contiguous() for w in convs) > len(convs) / 2
    assert [set(s) for s in eager] == [set(s) for s in fast] and {"loss_critic", "loss_value", "loss_sampler"} <= set(eager[-1])
    for a, b in zip(eager, fast):
        for name in a:
            assert b[name] == pytest.approx(a[name], rel=1e-4, abs=1e-6), name


def test_compile_guards_hooks_so_the_fake_score_network_reads_its_own_bottleneck(recipe_file, vp_teacher):
    """Every network is compiled, SiDA's fake score network too, whose bottleneck the critic reads through a
    forward hook. Dynamo skips guards on hooks by default: read with frozen weights right after the teacher (the
    generator step), the fake score network reused the teacher's graph, without its hook, and the critic read
    the previous pass's features (4 rows here instead of 2)."""
    import shutil

    from n2ce_distill.methods.sid import SiD
    from n2ce_distill.trainer import _compile_models

    if not shutil.which("g++"):
        pytest.skip("torch.compile on a CPU needs a C++ compiler")
    recipe = recipe_file({"method": {"name": "sid", "adversarial": True}, "data": {"name": "digits"},
                          "teacher": {"path": str(vp_teacher)}})
    method = SiD(load_recipe(recipe, ["train.batch_size=4"]), (1, 8, 8))
    for module in [*method.nets.read.values(), *method.frozen.values()]:
        _compile_models(module)
    teacher, fake = method.frozen["teacher"], method.nets.read["fake_score"]
    assert all(getattr(net.net, "_compiled_call_impl", None) is not None for net in (teacher, fake))
    assert getattr(method.nets.read["generator"].denoiser.net, "_compiled_call_impl", None) is not None
    g = torch.Generator().manual_seed(0)
    x, sigma = torch.randn(4, 1, 8, 8, generator=g), torch.full((4,), 2.0)
    fake(x, sigma, None)  # the fake score step: trained weights
    first = method.encoder.read()
    with torch.no_grad(), method.reading(fake):  # the generator step: the teacher, then the fake score network
        teacher(x[:2], sigma[:2], None)
        fake(x[:2], sigma[:2], None)
    assert method.encoder.read().shape[0] == 2
    torch.testing.assert_close(method.encoder.read(), first[:2].detach(), rtol=1e-4, atol=1e-5)


def test_compile_without_a_compiler_is_refused_at_startup(dxmi_recipe, tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler")
    with pytest.raises(ValueError, match=r"^train.compile: torch.compile on a CPU needs a C\+\+ compiler"):
        Trainer(load_recipe(dxmi_recipe, ["train.compile=true", *TINY]), tmp_path)
    assert not (tmp_path / "logs").exists()


def test_an_optimiser_without_a_device_side_skip_is_skipped_from_the_host(dxmi_recipe, tmp_path):
    """A method may return an optimiser without fused Adam's ``found_inf`` (SGD here): a non-finite update is
    then skipped by reading the flag on the host, and reported like any other at the next check."""
    from accelerate.optimizer import AcceleratedOptimizer

    trainer = Trainer(load_recipe(dxmi_recipe, ["train.max_steps=1", *TINY]), tmp_path)
    critic = trainer.method.nets.read["critic"]
    trainer.optimizers["critic"] = AcceleratedOptimizer(torch.optim.SGD(critic.parameters(), lr=0.1))
    weights = {k: v.clone() for k, v in critic.state_dict().items()}
    trainer._update("critic", critic(torch.zeros(2, 1, 8, 8)).sum() * float("nan"))
    assert all(torch.equal(v, critic.state_dict()[k]) for k, v in weights.items()), "critic moved on a NaN loss"
    with pytest.raises(NonFiniteError, match="step 0: non-finite critic loss"):
        trainer._check_finite()


def test_clipping_under_loss_scaling_unscales_only_the_stepped_optimisers_gradients():
    """Accumulating under fp16, another network's gradients of the earlier micro-batches wait, scaled, for its own
    step; clipping this optimiser's must leave them scaled (Accelerate's clip unscales every optimiser's, and they
    were then unscaled twice). The returned norm is the unscaled one."""
    from n2ce_distill.trainer import _clip

    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    stepped, waiting = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))
    opts = [torch.optim.SGD([p], lr=0.1) for p in (stepped, waiting)]
    scaler.scale((stepped * torch.tensor([3.0, 4.0, 0.0])).sum() + waiting.sum()).backward()
    norm = _clip(opts[0], [stepped], max_norm=1.0, scaler=scaler)
    assert norm.item() == pytest.approx(5.0)
    torch.testing.assert_close(stepped.grad, torch.tensor([0.6, 0.8, 0.0]))
    torch.testing.assert_close(waiting.grad, torch.full((2,), 8.0))  # still scaled, for its own unscale
    torch.testing.assert_close(_clip(opts[1], [waiting], max_norm=10.0, scaler=scaler), torch.tensor(2.0 ** 0.5))
