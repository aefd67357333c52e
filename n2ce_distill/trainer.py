"""One generic trainer on Accelerate that drives any :class:`~n2ce_distill.methods.Method`.

It owns what every loop shares: devices and mixed precision, gradient accumulation, multi-process
data sharding, EMA (ema-pytorch), atomic ``checkpoint-<step>`` folders with a total limit and
``--resume latest``, TensorBoard logging, the critic's regime diagnostics (``critic/*`` scalars, the
progress bar, and a plain-words line when the run stays linear or enters the chasm), sample grids,
the FID hook with a ``best/`` export, and non-finite guards. Methods only say what one step computes.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, ProjectConfiguration, set_seed
from torch.distributed.fsdp import CPUOffloadPolicy, StateDictType, register_fsdp_forward_method
from torch.distributed.fsdp.wrap import size_based_auto_wrap_policy
from torch.distributed.tensor import DTensor
from ema_pytorch import EMA
from tqdm.auto import tqdm

from . import checkpoints
from .config import RecipeConfig
from .data import dataset_from_config, infinite_loader
from .diagnostics import REGIMES, RegimeMonitor, critic_diagnostics
from .errors import InputError
from .methods import Processes, StepOutput, build_method
from .visualize import save_samples

__all__ = ["NonFiniteError", "Trainer"]

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """A loss or gradient became NaN/inf; the message names the step and the loss term."""


# recipe keys a checkpoint's networks, optimiser state and data stream were built for: a resume that changes
# one is refused (learning rates, EMA, schedule and evaluation keys may change and take effect)
FIXED_ON_RESUME = ("method.name", "method.num_steps", "method.share_value", "method.adversarial", "method.net",
                   "method.lora_rank",
                   "data", "critic.objective", "critic.channels", "critic.num_res_blocks", "critic.hidden_features",
                   "critic.num_layers", "train.batch_size", "train.gradient_accumulation_steps")


class Trainer:
    """Train ``recipe`` into ``output_dir``; ``resume="latest"`` continues from the newest checkpoint.

    A folder that already holds a run is refused unless ``resume`` continues it or ``overwrite`` deletes it
    (its :data:`~n2ce_distill.checkpoints.RUN_ARTEFACTS` only, once everything else has been validated).
    """

    def __init__(self, recipe: RecipeConfig, output_dir: str | Path, resume: str | None = None,
                 overwrite: bool = False):
        self.recipe, self.output_dir = recipe, Path(output_dir)
        if self.output_dir.exists() and not self.output_dir.is_dir():
            raise InputError(f"--output-dir {str(self.output_dir)!r}: exists and is not a folder")
        existing = next(p for p in (self.output_dir, *self.output_dir.absolute().parents) if p.exists())
        if not os.access(existing, os.W_OK | os.X_OK):
            raise InputError(f"--output-dir {str(self.output_dir)!r}: {str(existing)!r} is not writable")
        if recipe.eval.fid_every:
            _check_reference(recipe.eval.ref or recipe.data.name)
        earlier = checkpoints.run_artefacts(self.output_dir)
        if earlier and not resume and not overwrite:
            names = ", ".join(p.name for p in earlier[:3]) + (", ..." if len(earlier) > 3 else "")
            raise InputError(f"--output-dir {str(self.output_dir)!r} already holds a run ({names}): pass --resume "
                             "latest to continue it or --overwrite to start over")
        train = recipe.train
        _check_tracker(train.log_with)
        self.accelerator = Accelerator(
            mixed_precision=train.mixed_precision,
            gradient_accumulation_steps=train.gradient_accumulation_steps,
            log_with=train.log_with,
            project_config=ProjectConfiguration(project_dir=str(self.output_dir), logging_dir=str(self.output_dir / "logs")),
        )
        _check_launch(self.accelerator)
        set_seed(recipe.seed)
        self.dataset = dataset_from_config(recipe.data, recipe.seed)
        self.method = build_method(recipe, self.dataset)
        self.method.processes = Processes(self.accelerator.process_index, self.accelerator.num_processes)
        networks = [*self.method.nets.read.values(), *self.method.frozen.values()]
        if train.channels_last:
            for module in networks:
                module.to(memory_format=torch.channels_last)  # 4-D weights only; the EMA copy below inherits it
        if train.gradient_checkpointing:
            _enable_gradient_checkpointing(self.method.nets.read.values())
        online = self.method.nets.read[self.method.ema_name]
        # copied before compiling and sharding: what is exported and sampled stays eager and whole on every process
        ema_model = copy.deepcopy(online)
        if train.compile:
            _check_compiler(self.accelerator.device)
            for module in networks:
                _compile_models(module)
        self._prepare(self.method.optimizers())
        self.ema = EMA(
            WholeParameters(online) if self.accelerator.is_fsdp2 else online,
            ema_model=ema_model,
            beta=train.ema.beta,
            update_after_step=train.ema.update_after_step,
            update_every=train.ema.update_every,
            power=train.ema.power,
            include_online_model=False,
            use_foreach=True,  # one kernel per dtype instead of one per tensor; same state, same values
        ).to(self.accelerator.device)
        world = self.accelerator.num_processes
        if train.batch_size % world:
            raise InputError(f"train.batch_size: {train.batch_size} is not divisible by {world} processes")
        self.loader = infinite_loader(self.dataset, train.batch_size, recipe.seed)
        self.step, self.skipped_steps, self.best_fid = 0, 0, math.inf
        self.regimes, self._regime, self._fid_label = RegimeMonitor(), None, None
        self._grad_norms: dict[str, torch.Tensor] = {}
        # (step, term, what, value) of every guarded quantity since the last read: checked on the device, read
        # once per logged step (and before checkpoints)
        self._guarded: list[tuple[int, str, str, torch.Tensor]] = []
        self._loss_pending: dict[str, torch.Tensor] = {}  # non-finite losses of micro-batches not yet stepped
        if resume:
            self._resume(resume)
        elif overwrite and earlier and self.accelerator.is_main_process:
            checkpoints.remove_run(self.output_dir)
            self._say(f"removed the earlier run in {self.output_dir} (--overwrite)")
        self.accelerator.wait_for_everyone()

    def _prepare(self, optimizers: dict[str, torch.optim.Optimizer]) -> None:
        acc, nets = self.accelerator, self.method.nets.train
        if acc.is_fsdp2:  # Accelerate shards one network per prepare, together with the optimisers over it
            owners = _optimizer_networks(self.method.nets.read, optimizers, self.recipe.method.name)
            wrapped = _layer_classes_to_wrap(acc.state.fsdp_plugin, nets)
            prepared = {}
            for name, module in nets.items():
                terms = [term for term, owner in owners.items() if owner == name]
                with _wrapping_only(acc.state.fsdp_plugin, wrapped[name]):
                    out = acc.prepare(module, *(optimizers[term] for term in terms))
                out = out if isinstance(out, (tuple, list)) else (out,)
                nets[name] = out[0]
                for part in out[0].modules():  # methods besides forward that read the weights
                    for method in getattr(part, "forward_methods", ()):
                        register_fsdp_forward_method(part, method)
                prepared |= dict(zip(terms, out[1:]))
            self.optimizers = {term: prepared[term] for term in optimizers}
        else:
            names = list(nets)
            prepared = acc.prepare(*nets.values(), *optimizers.values())
            prepared = prepared if isinstance(prepared, tuple) else (prepared,)
            self.method.nets.train = dict(zip(names, prepared[: len(names)]))
            self.optimizers = dict(zip(optimizers, prepared[len(names):]))
        # the frozen teacher, VAE and text encoder are stored in the training precision, as diffusers' scripts
        # store theirs (half the memory; autocast rounds their weights so for every matmul anyway)
        weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.recipe.train.mixed_precision,
                                                                             torch.float32)
        for module in self.method.frozen.values():
            module.to(acc.device, dtype=weight_dtype).requires_grad_(False).eval()

    # ------------------------------------------------------------------ one update
    def _update(self, term: str, loss: torch.Tensor, clip: float | None = None) -> None:
        """Backward, clip and step the optimiser named ``term``. Nothing here waits for the device: a non-finite
        loss or gradient sets the fused Adam's ``found_inf``, which leaves the parameters and moments as they
        were, and is reported by :meth:`_check_finite` at the next logged step."""
        opt = self.optimizers[term]
        owned = [p for group in opt.param_groups for p in group["params"] if p.requires_grad]
        self._guarded.append((self.step, term, "loss", loss.detach().float().reshape(-1)[0]))
        bad = self._loss_pending.pop(term, False) | ~torch.isfinite(loss.detach()).all()
        # gradients reach only this optimiser's parameters: a sampler loss that runs through the
        # critic must not leave stale gradients on the critic
        if self.accelerator.is_fsdp2:
            # FSDP reduces the gradients of the whole graph into its shards (``inputs`` would name the shards,
            # which the graph does not hold): the other optimisers' gradients are set aside and put back
            others = [p for name, other in self.optimizers.items() if name != term
                      for group in other.param_groups for p in group["params"]]
            kept = [p.grad for p in others]
            for p in others:
                p.grad = None
            self.accelerator.backward(loss)
            for p, grad in zip(others, kept):
                p.grad = grad
        else:
            self.accelerator.backward(loss, inputs=owned)
        if not self.accelerator.sync_gradients:
            self._loss_pending[term] = bad  # accumulating: the step at the last micro-batch skips if any was bad
            return
        params = [p for p in owned if p.grad is not None]
        norm = _clip(opt, params, clip or self.recipe.train.grad_clip, self.accelerator.scaler)
        norm = _whole(norm.detach())
        self._grad_norms[term] = norm  # before clipping; logged at the logging steps
        # under fp16 loss scaling an overflow is routine (the first steps at the initial scale): the scaler
        # skips this step and lowers its scale itself (seen on an H200: every fp16 run stopped at step 0)
        if self.accelerator.scaler is None:
            self._guarded.append((self.step, term, "gradient", norm.float()))
            bad = bad | ~torch.isfinite(norm)
            if getattr(opt.optimizer, "_step_supports_amp_scaling", False):  # fused: skips on the device
                opt.optimizer.found_inf = bad.float()
            elif bad.item():  # any other optimiser: skip from the host, waiting for the device
                opt.zero_grad(set_to_none=True)
                return
        opt.step()
        opt.zero_grad(set_to_none=True)

    def _check_finite(self) -> None:
        """Read the guarded losses and gradient norms since the last check (one wait for the device) and act on
        the first non-finite one: an error naming its step and term, or (``train.on_nonfinite=skip``) a count of
        the steps whose updates were skipped."""
        guarded, self._guarded = self._guarded, []
        if not guarded:
            return
        values = _read([value for *_, value in guarded])
        bad = [(step, term, what, value) for (step, term, what, _), value in zip(guarded, values) if not math.isfinite(value)]
        if not bad:
            return
        step, term, what, value = bad[0]
        message = f"step {step}: non-finite {term} {what} ({value})"
        if self.recipe.train.on_nonfinite == "error":
            raise NonFiniteError(message + "; the last good checkpoint is kept")
        steps = sorted({entry[0] for entry in bad})
        self.skipped_steps += len(steps)
        log.warning("%s; its update skipped (%d step%s with skipped updates so far)", message, self.skipped_steps,
                    "" if self.skipped_steps == 1 else "s")

    # ------------------------------------------------------------------ loop
    def train(self) -> Path:
        acc, train = self.accelerator, self.recipe.train
        acc.init_trackers("n2ce-distill", config=_flat(self.recipe.model_dump()))
        self._bar = tqdm(total=train.max_steps, initial=self.step, disable=not acc.is_local_main_process, desc="train")
        while self.step < train.max_steps:
            output = self.iteration()
            self._bar.update(1)
            self._after_step(output)
        self._check_finite()
        summary = self.regimes.summary()
        if summary:
            self._say(summary)
        self._bar.close()
        final = self.output_dir / "pipeline"
        if acc.is_main_process:
            checkpoints.atomic_write_dir(final, lambda tmp: self.method.export(self.ema.ema_model, tmp))
        acc.wait_for_everyone()
        acc.end_training()
        return final

    def iteration(self) -> StepOutput:
        """One training iteration (this process's slice of the next batch, the method's step, the EMA update),
        without the logging, sampling, evaluation and checkpoint hooks that :meth:`train` runs after it."""
        acc, per_process = self.accelerator, self.recipe.train.batch_size // self.accelerator.num_processes
        batch = next(self.loader)
        batch, labels = batch if isinstance(batch, (tuple, list)) else (batch, None)  # labelled data: (x, y)
        rows = slice(acc.process_index * per_process, (acc.process_index + 1) * per_process)
        labels = None if labels is None else labels[rows].to(acc.device)
        # FSDP reduce-scatters every micro-batch: its no-sync accumulation would keep whole gradients on the
        # gathered weights, out of reach of _update's setting aside of the other optimisers' gradients
        accumulating = () if acc.is_fsdp2 else self.method.nets.train.values()
        with acc.accumulate(*accumulating), acc.autocast():
            condition = self.method.conditions.encode(labels)  # prompts: encoded once per batch
            output = self.method.training_step(batch[rows].to(acc.device), self.step, self._update, labels=condition)
        self.ema.update()
        self.step += 1
        return output

    def _after_step(self, output: StepOutput) -> None:
        train, step = self.recipe.train, self.step
        if step % train.log_every == 0 or step == train.max_steps:
            self._check_finite()
            # the step's scalars and gradient norms stay on the device until here: one read for all of them
            device_logs = output.scalars | {f"grad_norm/{term}": norm for term, norm in self._grad_norms.items()}
            logs = dict(zip(device_logs, _read(list(device_logs.values()))))
            logs["skipped_steps"] = self.skipped_steps
            logs |= {f"lr/{group['name']}": group["lr"] for opt in self.optimizers.values() for group in opt.param_groups}
            if output.critic_logits is not None:
                logs |= self._critic_logs(*output.critic_logits)
            self.accelerator.log(logs, step=step)
            postfix = {k: f"{v:.3g}" for k, v in logs.items() if k.startswith("loss")}
            postfix |= {k: v for k, v in (("regime", self._regime), ("fid", self._fid_label)) if v}
            self._bar.set_postfix(postfix, refresh=False)
        if step % train.sample_every == 0 or step == train.max_steps:
            self._save_samples()
        fid_every = self.recipe.eval.fid_every
        if fid_every and (step % fid_every == 0 or step == train.max_steps):
            self._evaluate_fid()
        if step % train.checkpoint_every == 0 or step == train.max_steps:
            self.save_checkpoint()

    def _critic_logs(self, logits_data: torch.Tensor, logits_noise: torch.Tensor) -> dict[str, float]:
        """The critic's diagnostics as ``critic/*`` scalars (regime as its index in ``REGIMES``); says once,
        in plain words, when the run stays in the linear regime and when it enters the chasm."""
        diag = critic_diagnostics(logits_data, logits_noise, M=getattr(self.method.objective, "M", None))
        self._regime = diag.pop("regime")
        for message in self.regimes.observe(self.step, diag | {"regime": self._regime}):
            self._say(message)
        return {f"critic/{k}": v for k, v in diag.items()} | {"critic/regime": float(REGIMES.index(self._regime))}

    def _say(self, message: str) -> None:
        if self.accelerator.is_local_main_process:
            tqdm.write(message, file=sys.stderr)

    def _samples(self, count: int, seed: int) -> torch.Tensor:
        generator = torch.Generator(self.accelerator.device).manual_seed(seed)
        with torch.no_grad():
            return self.method.generate(self.ema.ema_model, count, generator).cpu()

    def _save_samples(self) -> None:
        if not self.accelerator.is_main_process:
            return
        picture = save_samples(self._samples(64, self.recipe.seed), self.output_dir / "samples" / f"step-{self.step:07d}.png")
        for tracker in self.accelerator.trackers:
            if hasattr(tracker, "log_images"):
                tracker.log_images({"samples": picture[None]}, step=self.step)

    def _evaluate_fid(self) -> None:
        from .fid import evaluate_samples  # torch-fidelity is heavy; import only when the hook is on

        if not self.accelerator.is_main_process:
            return
        ev = self.recipe.eval
        metrics = evaluate_samples(
            lambda n, g: self.method.generate(self.ema.ema_model, n, g),
            ev.ref or self.recipe.data.name,
            num_samples=ev.fid_samples,
            batch_size=ev.batch_size,
            seed=self.recipe.seed,
        )
        self.accelerator.log({"fid": metrics["fid"]}, step=self.step)
        with (self.output_dir / "fid.jsonl").open("a") as handle:
            handle.write(json.dumps({"step": self.step, **metrics}) + "\n")
        improved = metrics["fid"] < self.best_fid
        if improved:
            self.best_fid = metrics["fid"]
            checkpoints.atomic_write_dir(self.output_dir / "best", lambda tmp: self.method.export(self.ema.ema_model, tmp))
        self._fid_label = f"{metrics['fid']:.3g}"
        self._say(f"step {self.step}: FID {metrics['fid']:.4g} on {metrics['num_samples']} samples "
                  f"(best {self.best_fid:.4g}{', exported to best/' if improved else ''})")

    # ------------------------------------------------------------------ checkpoints
    def _state(self) -> dict:
        return {
            "step": self.step,
            "skipped_steps": self.skipped_steps,
            "best_fid": self.best_fid,
            "loader": self.loader.state_dict(),
            "method": self.method.extra_state(),
            "recipe": self.recipe.resolved(),
        }

    def _unsound_state(self) -> str | None:
        """Why the current state must not become a checkpoint (non-finite weights, or an EMA model that
        samples non-finite values), or ``None``: the checkpoint kept after a failure must load and sample."""
        models = {**self.method.nets.read, f"EMA {self.method.ema_name}": self.ema.ema_model}
        for name, model in models.items():
            if not all(torch.isfinite(_whole(p)).all() for p in model.parameters()):
                return f"non-finite weights in {name}"
        if not torch.isfinite(self._samples(8, self.recipe.seed)).all():
            return f"the EMA {self.method.ema_name} samples non-finite values"
        return None

    def save_checkpoint(self) -> Path:
        acc = self.accelerator
        self._check_finite()  # a run that has gone non-finite since the last logged step stops before saving
        unsound = self._unsound_state()
        if unsound:
            kept = checkpoints.list_checkpoints(self.output_dir)
            last = f"{kept[-1][1].name} is" if kept else "no earlier checkpoint was"
            raise NonFiniteError(f"step {self.step}: {unsound}; not saved, {last} kept")

        def write(tmp: Path) -> None:
            acc.save_state(str(tmp), safe_serialization=True)
            if acc.is_main_process:
                checkpoints.save_module(self.ema, tmp / "ema.safetensors")  # with its step counter
                (tmp / "trainer_state.json").write_text(json.dumps(self._state(), indent=1))
                self.method.export(self.ema.ema_model, tmp / "pipeline")

        path = checkpoints.save_checkpoint(self.output_dir, self.step, write, self.recipe.train.checkpoint_total_limit, acc)
        self._say(f"saved {path.name}")
        return path

    def _resume(self, which: str) -> None:
        path = checkpoints.resolve(self.output_dir, which)
        if path is None:
            self._say(f"no checkpoint found in {self.output_dir}: starting fresh")
            return
        checkpoints.verify(path)
        sharded = any(path.glob("pytorch_model_fsdp*.bin"))  # Accelerate's name for an FSDP network's weights
        if sharded != self.accelerator.is_fsdp2:
            saved, now = ("FSDP", "DDP or one process") if sharded else ("DDP or one process", "FSDP")
            raise InputError(f"--resume {str(path)!r}: written under {saved}, launched under {now}; its optimiser "
                             f"state does not carry over, so resume it under {saved}")
        state = checkpoints.read_json(path / "trainer_state.json")
        _check_fixed_keys(state.get("recipe"), self.recipe.resolved(), path)
        # load_state restores the saved learning rates and betas; the recipe's are the ones to train with
        recipe_groups = {name: [_lr_and_betas(group) for group in opt.param_groups] for name, opt in self.optimizers.items()}
        try:
            self.accelerator.load_state(str(path))
        except RuntimeError as error:  # size mismatches: a checkpoint of other networks
            raise InputError(f"--resume {str(path)!r}: its weights do not fit this recipe's networks "
                             f"({str(error).strip().splitlines()[0][:200]})") from None
        for name, opt in self.optimizers.items():
            for group, wanted in zip(opt.param_groups, recipe_groups[name]):
                for key, saved in _lr_and_betas(group).items():
                    if saved != wanted[key]:
                        self._say(f"optim.{group['name']}.{key}: {saved} in the checkpoint, {wanted[key]} from the recipe (used)")
                group.update(wanted)
        checkpoints.load_module(self.ema, path / "ema.safetensors")
        self.step, self.skipped_steps, self.best_fid = state["step"], state["skipped_steps"], state["best_fid"]
        self.loader.load_state_dict(state["loader"])
        self.method.load_extra_state(state["method"])
        self._say(f"resumed from {path.name} (step {self.step})")


def _compile_models(module: torch.nn.Module) -> None:
    """``torch.compile`` the outermost diffusers models inside ``module`` in place (their ``state_dict`` keys, and
    so checkpoints, stay those of the eager modules); the thin preconditioning wrappers around them stay eager.

    A model whose layers carry forward hooks (SiDA's and DMD2's fake score network, whose bottleneck the critic
    reads) makes dynamo guard on hooks. By default it does not, and every copy of the teacher runs the same code:
    SiDA's fake score network, read with frozen weights right after the teacher, reused the teacher's graph
    without its hook, and the critic read the previous pass's features (measured: a shape mismatch at the first
    adversarial step on digits)."""
    from diffusers import ModelMixin

    if isinstance(module, ModelMixin):
        if any(layer._forward_pre_hooks or layer._forward_hooks for layer in module.modules()):
            torch._dynamo.config.skip_nnmodule_hook_guards = False
        module.compile()
        return
    for child in module.children():
        _compile_models(child)


def _enable_gradient_checkpointing(networks) -> None:
    """Gradient checkpointing in every diffusers model that supports it (UNets, not the critics), or one line
    naming ``train.gradient_checkpointing`` where no trainable network does."""
    from diffusers import ModelMixin

    models = [m for net in networks for m in net.modules()
              if isinstance(m, ModelMixin) and getattr(m, "_supports_gradient_checkpointing", False)]
    if not models:
        raise InputError("train.gradient_checkpointing: no trainable network supports it (only diffusers UNets do)")
    for model in models:
        model.enable_gradient_checkpointing()  # not where a step reads a network: see Method.reading


def _check_compiler(device: torch.device) -> None:
    """``train.compile`` on a CPU generates C++: refuse it at startup where no compiler is installed."""
    import shutil

    if device.type == "cpu" and not shutil.which(os.environ.get("CXX", "g++")):
        raise InputError("train.compile: torch.compile on a CPU needs a C++ compiler (none found: install g++ "
                         "or set CXX), or set train.compile=false")


def _read(values: list[torch.Tensor]) -> list[float]:
    """One-element device tensors as floats, in one read from the device (each ``float()`` would wait alone)."""
    return torch.stack([v.float().reshape(()) for v in values]).tolist() if values else []


def _lr_and_betas(group: dict) -> dict:
    return {"lr": group["lr"], "betas": tuple(group["betas"])}  # a loaded state holds betas as a list


class WholeParameters(torch.nn.Module):
    """The parameters of an FSDP-sharded module as whole tensors (one all-gather each, on every process; a
    module FSDP left gathered after a forward reads as it is, so FSDP runs in fp32 only): what ema-pytorch
    averages into the whole EMA copy (it reads only ``named_parameters`` and ``named_buffers`` of its model)."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module

    def named_parameters(self, *args, **kwargs):
        for name, param in self.module.named_parameters(*args, **kwargs):
            yield name, _whole(param)

    def named_buffers(self, *args, **kwargs):
        return self.module.named_buffers(*args, **kwargs)


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor (an FSDP shard, or a gradient norm reduced over shards) gathered whole; a tensor as it is."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _optimizer_networks(nets: dict[str, torch.nn.Module], optimizers: dict[str, torch.optim.Optimizer],
                        method: str) -> dict[str, str]:
    """The network each optimiser trains, by parameter identity: FSDP shards a network together with its
    optimisers, so an optimiser over two networks cannot be sharded (checked before anything is written)."""
    owner = {id(p): name for name, net in nets.items() for p in net.parameters()}
    found = {}
    for term, opt in optimizers.items():
        names = sorted({owner.get(id(p), "?") for group in opt.param_groups for p in group["params"]})
        if len(names) != 1:
            raise InputError(f"launch: FSDP shards one network per optimiser, but method {method}'s {term} "
                             f"optimiser trains {' and '.join(names)}; launch it with DDP (MULTI_GPU)")
        found[term] = names[0]
    return found


def _layer_classes_to_wrap(plugin, nets: dict[str, torch.nn.Module]) -> dict[str, list[str] | None]:
    """Per trained network, the classes of ``fsdp_transformer_layer_cls_to_wrap`` it holds (None: the plugin
    names none). Accelerate applies the one list to every network it prepares and fails on a network that lacks
    one of the classes (DxMI's critic holds no ResnetBlock2D); a class no network holds is a typo."""
    names = getattr(plugin, "transformer_cls_names_to_wrap", None)
    if not names:
        return dict.fromkeys(nets)
    held = {net: {type(part).__name__ for part in module.modules()} for net, module in nets.items()}
    missing = [name for name in names if not any(name in classes for classes in held.values())]
    if missing:
        blocks = sorted({type(part).__name__ for module in nets.values() for part in module.modules()
                         if not type(part).__module__.startswith("torch.")})
        raise InputError(f"fsdp_config.fsdp_transformer_layer_cls_to_wrap: no trained network holds a {missing[0]} "
                         f"(their blocks: {', '.join(blocks)})")
    return {net: [name for name in names if name in held[net]] for net in nets}


@contextmanager
def _wrapping_only(plugin, names: list[str] | None):
    """The plugin wraps ``names`` while one network is prepared (an empty list wraps none but the root)."""
    if names is None:
        yield
        return
    every = plugin.transformer_cls_names_to_wrap
    plugin.transformer_cls_names_to_wrap = names
    try:
        yield
    finally:
        plugin.transformer_cls_names_to_wrap = every


def _clip(optimizer, params: list[torch.nn.Parameter], max_norm: float, scaler) -> torch.Tensor:
    """Clip the gradients of ``params``, which ``optimizer`` steps, to ``max_norm`` in total; their norm before
    clipping (a DTensor under FSDP). Under fp16 loss scaling only ``optimizer``'s gradients are unscaled first.
    Accelerate's clip unscales every optimiser's: accumulating, another network's gradients of the earlier
    micro-batches were unscaled once there and again at its own step. Accelerate's clip also matches ``params``
    against each FSDP network by tensor equality, which fails when two networks have as many parameters (SiD's
    generator and fake score network); torch's clip reads DTensor gradients itself."""
    if scaler is not None:
        scaler.unscale_(getattr(optimizer, "optimizer", optimizer))  # the torch optimiser inside Accelerate's
    return torch.nn.utils.clip_grad_norm_(params, max_norm)


def _check_launch(accelerator: Accelerator) -> None:
    """The processes the launcher started (its ``WORLD_SIZE``, where it sets one) are the ones Accelerate
    distributes, by data parallelism (DDP, or one process) or by FSDP2; checked before anything is written.

    Measured here: without a GPU, Accelerate turns an FSDP launch config into independent single processes, which
    all trained into the same folder and collided at the first checkpoint. FSDP (version 1), DeepSpeed and
    Megatron-LM are refused: the trainer's FSDP path is built on FSDP2's per-parameter shards. FSDP2 checkpoints
    must be whole state dicts: a sharded one loads its metadata through pickle (torch.distributed.checkpoint).
    """
    launched = os.environ.get("WORLD_SIZE")
    if launched is not None and int(launched) != accelerator.num_processes:
        raise InputError(f"launch: {launched} processes were started but Accelerate distributes "
                         f"{accelerator.num_processes} ({accelerator.distributed_type.value}), so each would train alone "
                         "into the same folder; on CPUs launch with ACCELERATE_USE_CPU=true torchrun (see the README)")
    kind = accelerator.distributed_type
    if kind in (DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM):
        raise InputError(f"launch: distributed_type {kind.value} is not supported (the trainer is built and tested "
                         "for DDP and FSDP2); use MULTI_GPU (DDP) or FSDP with fsdp_version: 2")
    if kind == DistributedType.FSDP:
        plugin = accelerator.state.fsdp_plugin
        if plugin.fsdp_version != 2:
            raise InputError(f"launch: fsdp_config.fsdp_version {plugin.fsdp_version} is not supported; set "
                             "fsdp_version: 2 (FSDP2, whose per-parameter shards the trainer is built on)")
        untested = [name for name, on in (
            (f"mixed_precision {accelerator.mixed_precision}", accelerator.mixed_precision != "no"),
            ("fsdp_activation_checkpointing", getattr(plugin, "activation_checkpointing", False)),
            ("fsdp_offload_params", isinstance(getattr(plugin, "cpu_offload", None), CPUOffloadPolicy))) if on]
        if untested:  # bf16 shards reached the fp32 EMA; checkpoint wrappers renamed what the EMA pairs by name
            raise InputError(f"launch: {untested[0]} is not supported under FSDP; use DDP, or FSDP in fp32 with "
                             "train.gradient_checkpointing")
        if plugin.auto_wrap_policy is not None and getattr(plugin.auto_wrap_policy, "func",
                                                          plugin.auto_wrap_policy) is size_based_auto_wrap_policy:
            # every module above the size is sharded, diffusers' ModuleLists too, which FSDP2 cannot shard
            raise InputError("launch: fsdp_config.fsdp_auto_wrap_policy SIZE_BASED_WRAP is not supported (it selects "
                             "diffusers' ModuleLists, which have no forward to shard); use TRANSFORMER_BASED_WRAP with "
                             "fsdp_transformer_layer_cls_to_wrap: ResnetBlock2D, or NO_WRAP")
        if plugin.state_dict_type != StateDictType.FULL_STATE_DICT:
            raise InputError(f"launch: fsdp_config.fsdp_state_dict_type {plugin.state_dict_type.name} is not "
                             "supported: its checkpoints load their metadata through pickle; use FULL_STATE_DICT")


def _check_tracker(name: str) -> None:
    """``train.log_with`` names an Accelerate tracker that is installed (checked before anything is written)."""
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import LoggerType

    known = [t.value for t in LoggerType if t.value != "all"]
    if name not in known:
        raise InputError(f"train.log_with: unknown tracker {name!r}; Accelerate knows {', '.join(known)}")
    available = [t.value for t in get_available_trackers()]
    if name not in available:
        raise InputError(f"train.log_with: tracker {name!r} is not installed (installed: {', '.join(available)}); "
                         f"pip install {name} or use tensorboard")


def _check_reference(ref: str) -> None:
    """The FID hook's reference exists (a named data set, an image folder or a statistics file), checked
    at startup rather than at the first evaluation hundreds of iterations in."""
    from .fid_inputs import reference_input

    try:
        reference_input(ref, rgb=False, tag="startup-check")
    except (ValueError, FileNotFoundError) as error:
        raise InputError(f"eval.ref: {error}") from None


def _check_fixed_keys(saved: dict | None, current: dict, path: Path) -> None:
    """Refuse a resume whose recipe changes a key in :data:`FIXED_ON_RESUME` (checkpoints written before
    recipes were stored in them are not checked)."""
    if saved is None:
        return
    saved, current = _flat(saved), _flat(current)
    for key in sorted(set(saved) & set(current)):  # a key only one side holds is one its method never reads
        if any(key == fixed or key.startswith(fixed + ".") for fixed in FIXED_ON_RESUME):
            if saved.get(key) != current.get(key):
                raise InputError(f"{key}: cannot change on resume (checkpoint {path.name} has "
                                 f"{saved.get(key)!r}, the recipe {current.get(key)!r})")


def _flat(tree: dict, prefix: str = "") -> dict:
    """TensorBoard hparams accept scalars only."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flat(value, name + "."))
        else:
            flat[name] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat
