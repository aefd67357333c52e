"""The method interface: a distillation loop as its networks, its losses and one training step.

A :class:`Method` never touches devices, processes, checkpoints or logging; the generic
:class:`~n2ce_distill.trainer.Trainer` does that for every method alike.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from contextlib import contextmanager, nullcontext
from typing import Callable, ContextManager, Iterable, Iterator, Protocol

import torch
from diffusers import UNet2DConditionModel
from safetensors import SafetensorError
from torch import nn
from torch.distributed.fsdp import FSDPModule

from ..conditions import ClassConditions, Conditions, PromptConditions, repeat_rows
from ..config import CriticConfig, RecipeConfig
from ..critics import EncoderFeatures
from ..denoisers import Denoiser, load_denoiser, per_sample
from ..errors import InputError
from ..fewstep import FewStepSampler
from ..latent import LatentSpace, PixelSpace, load_text_components
from ..lora import add_lora, has_lora, save_lora_weights
from ..objectives import CriticObjective, build_objective
from ..pipelines import FewStepPipeline

__all__ = ["LoadedTeacher", "Method", "Nets", "Processes", "ScoreDistillation", "StepOutput", "StudentMethod", "Update",
           "critic_objective", "load_teacher", "unwrap"]


class Update(Protocol):
    """Trainer callback for one optimiser update: backward, non-finite check, clip, step, zero. ``optimizer``
    names both the optimiser (a key of :meth:`Method.optimizers`) and the loss term in messages."""

    def __call__(self, optimizer: str, loss: torch.Tensor, clip: float | None = None) -> None: ...


@dataclass
class StepOutput:
    """What one training step reports: detached scalars to log and, for methods with a critic, the
    critic's logits on this step's data and noise (any shapes), which the trainer turns into
    :func:`~n2ce_distill.diagnostics.critic_diagnostics` at its logging steps."""

    scalars: dict[str, torch.Tensor]
    critic_logits: tuple[torch.Tensor, torch.Tensor] | None = None


@dataclass(frozen=True)
class Processes:
    """The processes a training step runs on, as much as a method needs of them (handed over by the trainer).

    Every process draws the whole global batch from the same RNG stream and keeps its own slice, so a run gives
    the same result on one process or many (same global batch); :meth:`mean` averages a per-process statistic
    so that running buffers stay identical everywhere.
    """

    index: int = 0
    count: int = 1

    def draw(self, sample: Callable[[int], torch.Tensor], batch_size: int) -> torch.Tensor:
        """This process's ``batch_size`` rows of ``sample(batch_size * count)``."""
        return sample(batch_size * self.count)[self.index * batch_size:(self.index + 1) * batch_size]

    def randn(self, batch_size: int, *shape: int, device: torch.device) -> torch.Tensor:
        return self.draw(lambda n: torch.randn(n, *shape, device=device), batch_size)

    def mean(self, stat: torch.Tensor) -> torch.Tensor:
        """Mean of a per-process statistic over all processes."""
        if self.count > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            stat = stat.clone()
            torch.distributed.all_reduce(stat)
            stat /= self.count
        return stat


class Nets:
    """A method's trainable networks, under the two views a step needs.

    ``nets.train[name]`` is the module as the trainer prepared it (a DistributedDataParallel wrapper when
    several processes train): call it for the forward passes whose gradients train it. ``nets.read[name]`` is
    the bare module: for reads that must stay out of DDP's gradient reduction, and for the module's own
    methods, which DDP does not forward. There is no third way to reach a network, so every call site says
    which it means. ``nets[name] = module`` registers a network (in ``__init__``, before the trainer wraps).
    """

    def __init__(self):
        self.train: dict[str, nn.Module] = {}

    def __setitem__(self, name: str, module: nn.Module) -> None:
        self.train[name] = module

    def __contains__(self, name: str) -> bool:
        return name in self.train

    @property
    def read(self) -> dict[str, nn.Module]:
        return {name: unwrap(module) for name, module in self.train.items()}


class Method(ABC):
    """One training loop.

    Subclasses fill ``self.nets`` (:class:`Nets`: trainable modules, checkpointed and wrapped by Accelerate;
    ``nets.train`` to train them, ``nets.read`` to read them) and implement the abstract methods.
    ``self.frozen`` holds modules that are moved to the device but never trained (teachers).
    ``self.objective`` is the critic objective of methods that train a critic. Random numbers that must
    agree across processes are drawn through ``self.processes`` (:class:`Processes`). ``num_classes`` is the
    data's number of classes (``None``: unlabelled data, an unconditional loop). ``self.conditions``
    (:class:`~n2ce_distill.conditions.Conditions`) says what the nets are conditioned on: a conditional method's
    :meth:`training_step` gets each batch's condition (``conditions.encode`` of its labels: class indices, or
    prompt embeddings) and its :meth:`generate` draws every class or prompt equally often. ``self.space`` maps
    data images to what the nets read (:class:`~n2ce_distill.latent.PixelSpace` or, for a latent teacher,
    :class:`~n2ce_distill.latent.LatentSpace`): a step encodes the data it reads, :meth:`generate` decodes.
    """

    def __init__(self, recipe: RecipeConfig, num_classes: int | None = None):
        self.recipe, self.num_classes = recipe, num_classes
        self.objective: CriticObjective | None = None
        self.nets = Nets()
        self.frozen: dict[str, nn.Module] = {}
        self.processes = Processes()  # the trainer hands over its own at start
        self.conditions: Conditions = Conditions() if num_classes is None else ClassConditions(num_classes)
        self.space: PixelSpace | LatentSpace = PixelSpace()

    @abstractmethod
    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """Optimisers by name, built over ``self.nets`` parameters (before Accelerate wraps them)."""

    @property
    @abstractmethod
    def ema_name(self) -> str:
        """Key in ``self.nets`` of the network whose EMA is exported and sampled."""

    @abstractmethod
    def training_step(self, batch: torch.Tensor, step: int, update: Update,
                      labels: torch.Tensor | None = None) -> StepOutput:
        """Run one iteration on a data batch (and its condition: ``self.conditions.encode`` of its labels, for a
        conditional method), calling ``update`` once per optimiser."""

    @abstractmethod
    def generate(self, model: nn.Module, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """Draw samples in data space ([-1, 1] for images) with ``model`` (the EMA network), every class
        equally often (:meth:`sample_labels`) for a conditional method."""

    def sample_labels(self, batch_size: int, device: torch.device) -> torch.Tensor | None:
        """The conditions of ``batch_size`` samples, every class or prompt equally often (``None`` for an
        unconditional method)."""
        return self.conditions.sample(batch_size, device)

    @abstractmethod
    def export(self, model: nn.Module, directory: Path) -> None:
        """Write ``model`` as a diffusers pipeline folder reloadable with ``from_pretrained``."""

    @property
    def cycle(self) -> int:
        """Iterations after which the work of an iteration repeats (1; DMD2: its generator updates on one
        iteration in ``fake_updates_per_step``): what the ``train_step`` benchmark averages an iteration over."""
        return 1

    def phase(self, name: str) -> ContextManager:
        """Marks a stretch of a step that no update ends (DxMI's trajectory): a no-op, which the ``train_step``
        benchmark replaces to count FLOPs and time per phase. The stretch that ends with ``update(term, ...)`` is
        phase ``term`` without a marker."""
        return nullcontext()

    @staticmethod
    @contextmanager
    def reading(*modules: nn.Module) -> Iterator[None]:
        """Forward passes through networks that are read, not trained, here (a critic judging the sampler's
        output): their weights stop requiring gradients for the duration, so autograd keeps no graph for them;
        gradients still flow through them to their inputs. Their gradient checkpointing pauses too: a block
        recomputed in the backward pass, when the weights require gradients again, would save other tensors than
        its forward did (torch refuses it; measured on DMD2's generator step). An FSDP-sharded network keeps its
        weights' flags (FSDP2 fixes them at its first all-gather, so a network first read here would never train
        again: measured on DMD2's fake score network); the trainer sets aside the gradients it then gets."""
        params = [p for module in modules if not isinstance(module, FSDPModule)
                  for p in module.parameters() if p.requires_grad]
        checkpointed = [block for module in modules for block in module.modules()
                        if getattr(block, "gradient_checkpointing", False) is True]
        for p in params:
            p.requires_grad_(False)
        for block in checkpointed:
            block.gradient_checkpointing = False
        try:
            yield
        finally:
            for p in params:
                p.requires_grad_(True)
            for block in checkpointed:
                block.gradient_checkpointing = True

    def adam(self, **groups: Iterable[nn.Parameter]) -> torch.optim.Adam:
        """One Adam over parameter groups named as recipe ``optim`` entries, each with its own lr and betas
        (``self.adam(sampler=..., log_scales=...)``); the group names label the ``lr/*`` logs."""
        # fused: one kernel per step on CPU and GPU alike, and it takes the trainer's on-device found_inf flag,
        # which skips a non-finite update without waiting for the device
        return torch.optim.Adam([{"params": list(params), "name": name, "lr": self.recipe.optim[name].lr,
                                  "betas": self.recipe.optim[name].betas} for name, params in groups.items()],
                                fused=True)

    def extra_state(self) -> dict:
        """JSON-serialisable state outside the networks (restored by :meth:`load_extra_state`)."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        del state


class StudentMethod(Method):
    """A distillation method whose exported network is a :class:`~n2ce_distill.fewstep.FewStepSampler` (DxMI's,
    SiD's and DMD2's students): it samples every class equally often and exports as a :class:`FewStepPipeline`."""

    def generate(self, model: nn.Module, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        conditions = self.sample_labels(batch_size, model.sigmas.device)
        return self.space.decode(model.sample(batch_size, generator=generator, class_labels=conditions))

    def export(self, model: nn.Module, directory: Path) -> None:
        """The student pipeline (a LoRA student's adapters folded in) and, for a LoRA student of a Stable-Diffusion
        UNet, its adapters alone in ``lora/``, loadable onto the teacher's ``StableDiffusionPipeline``."""
        encoder = getattr(self.conditions, "encoder", None)
        FewStepPipeline.from_sampler(model, self.space, encoder).save_pretrained(directory)
        net = model.denoiser.net
        if has_lora(net) and isinstance(net, UNet2DConditionModel):
            save_lora_weights(net, Path(directory) / "lora")

    def trainable_copy(self, teacher: Denoiser) -> Denoiser:
        """A copy of the teacher to train: all its weights, or LoRA adapters alone (``method.lora_rank``)."""
        copied = copy.deepcopy(teacher).requires_grad_(True)
        if self.recipe.method.lora_rank is not None:
            add_lora(copied.net, self.recipe.method.lora_rank, self.recipe.method.lora_alpha)
        return copied

    def use_teacher(self, teacher: "LoadedTeacher") -> Denoiser:
        """Adopt a loaded teacher's space and conditions (its VAE and text encoder join ``self.frozen``)."""
        self.space, self.conditions = teacher.space, teacher.conditions
        if isinstance(teacher.space, LatentSpace):
            self.frozen["vae"] = teacher.space
        if isinstance(teacher.conditions, PromptConditions):
            self.frozen["text_encoder"] = teacher.conditions.encoder
        return teacher.denoiser


class ScoreDistillation(StudentMethod):
    """SiD's and DMD2's networks: the frozen teacher (the real score), and a fake score network and a generator
    (:meth:`build_generator`) both initialised from it; with ``method.adversarial``, a critic reads the fake score
    network's bottleneck through ``self.encoder``. The generator is the EMA network."""

    def __init__(self, recipe: RecipeConfig, sample_shape: tuple[int, ...], num_classes: int | None = None,
                 prompts: list[str] | None = None):
        super().__init__(recipe, num_classes)
        teacher = self.use_teacher(load_teacher(recipe, sample_shape, num_classes, prompts))
        self.frozen["teacher"] = teacher.requires_grad_(False)
        self.nets["fake_score"] = self.trainable_copy(teacher)
        self.nets["generator"] = self.build_generator(self.trainable_copy(teacher))
        fake = self.nets.read["fake_score"].net
        self.encoder = EncoderFeatures(fake, "method.adversarial") if recipe.method.adversarial else None
        self.objective = critic_objective(recipe.critic)

    @abstractmethod
    def build_generator(self, denoiser: Denoiser) -> FewStepSampler:
        """The generator around ``denoiser`` (the teacher's copy that it trains)."""

    def fake_score_pass(self, x_g: torch.Tensor, batch: torch.Tensor, sigma: torch.Tensor,
                        labels: torch.Tensor | None) -> torch.Tensor:
        """The fake score network, trained, on the noised generated samples ``x_g + sigma n`` and, when a critic
        reads its bottleneck, on the noised data batch too, at the same ``sigma`` row for row (one pass: the
        critic's features come from it). Returns the denoised rows, generated first."""
        halves = 1 if self.encoder is None else 2
        samples = x_g if halves == 1 else torch.cat([x_g, self.space.encode(batch)])  # data only for the critic
        noise = torch.cat([self.processes.randn(len(x_g), *x_g.shape[1:], device=x_g.device) for _ in range(halves)])
        sigmas = sigma.repeat(halves)
        return self.nets.train["fake_score"](samples + per_sample(sigmas, noise) * noise, sigmas,
                                             repeat_rows(labels, halves))

    @property
    def ema_name(self) -> str:
        return "generator"


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper, whose custom methods it does not forward."""
    return getattr(module, "module", module)


def critic_objective(cfg: CriticConfig) -> CriticObjective:
    """The recipe's critic objective with its log-ratio regulariser and the hyperparameters it takes (``critic.M``
    for N²CE)."""
    return build_objective(cfg.objective, ratio_reg=cfg.ratio_reg, **cfg.objective_parameters())


@dataclass
class LoadedTeacher:
    """A teacher as the loops read it: its sigma-space denoiser, the space it works in (pixels, or a VAE's
    latents) and the conditions it reads (none, classes, or the data's prompts through its text encoder)."""

    denoiser: Denoiser
    space: PixelSpace | LatentSpace
    conditions: Conditions


def load_teacher(recipe: RecipeConfig, sample_shape: tuple[int, ...], num_classes: int | None = None,
                 prompts: list[str] | None = None) -> LoadedTeacher:
    """The recipe's teacher, checked against the data: its samples' shape (``sample_shape``, the data's images,
    encoded by the teacher's VAE where it has one), its classes (``num_classes``: the data's, ``None`` for
    unlabelled data) or its captions (``prompts``: the data's, for a text-conditioned teacher), and
    ``teacher.guidance_scale``.

    Whatever stops it from loading (a hub id that cannot be reached, a broken ``config.json``, missing or
    truncated weights) is one ``ValueError`` naming ``teacher.path``.
    """
    path = recipe.teacher.path
    try:
        teacher = load_denoiser(path, c_noise=recipe.teacher.c_noise)
        space, encoder = load_text_components(path)
    except (OSError, ValueError, SafetensorError) as error:  # OSError covers the hub's connection errors
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        hint = (f"; download it where there is a network (huggingface-cli download {path} --local-dir DIR) "
                "and set teacher.path=DIR" if not Path(path).exists() else "")
        raise InputError(f"teacher.path {path!r}: cannot load the teacher ({reason[:200]}){hint}") from None
    space = space or PixelSpace()
    if tuple(teacher.sample_shape) != space.encoded_shape(sample_shape):
        encoded = "" if isinstance(space, PixelSpace) else f" (latents {space.encoded_shape(sample_shape)})"
        raise InputError(
            f"data.image_size: data samples have shape {tuple(sample_shape)}{encoded} but teacher "
            f"{recipe.teacher.path!r} expects {tuple(teacher.sample_shape)}"
        )
    if teacher.text_features is None:
        if prompts is not None:
            raise InputError(f"data.caption_column: teacher {path!r} reads no prompts; leave data.caption_column unset")
        _check_classes(teacher, recipe, num_classes)
        return LoadedTeacher(teacher, space, Conditions() if num_classes is None else ClassConditions(num_classes))
    return LoadedTeacher(teacher, space, _prompt_conditions(teacher, encoder, recipe, prompts))


def _prompt_conditions(teacher: Denoiser, encoder, recipe: RecipeConfig, prompts: list[str] | None) -> PromptConditions:
    """A text-conditioned teacher's conditions: the data's prompts through the folder's text encoder, whose empty
    prompt is the teacher's "no prompt" for guidance."""
    path = recipe.teacher.path
    if encoder is None:
        raise InputError(f"teacher.path {path!r}: its net reads prompts, but the folder has no text_encoder/ and "
                         "tokenizer/")
    if encoder.features != teacher.text_features:
        raise InputError(f"teacher.path {path!r}: text_encoder/ gives {encoder.features}-wide embeddings, the net "
                         f"reads {teacher.text_features}")
    if prompts is None:
        raise InputError(f"data.caption_column: teacher {path!r} is text-conditioned; use captioned data "
                         "(an image folder with metadata.jsonl, data.caption_column=text)")
    teacher.set_null_prompt(encoder([""]))
    teacher.check_guidance(recipe.teacher.guidance_scale, "teacher.guidance_scale", f"teacher {path!r}")
    return PromptConditions(prompts, encoder)
def _check_classes(teacher: Denoiser, recipe: RecipeConfig, num_classes: int | None) -> None:
    path, classes = recipe.teacher.path, teacher.num_classes
    if classes is None and teacher.net.config.get("class_embed_type") is not None:
        raise InputError(f"teacher.path {path!r}: its net embeds class_embed_type="
                         f"{teacher.net.config.get('class_embed_type')!r} vectors, not class indices; not supported")
    if classes is not None and num_classes is None:
        raise InputError(f"data.labels: teacher {path!r} is class-conditional ({classes} classes); set "
                         "data.labels=true so that batches carry labels")
    if classes is None and num_classes is not None:
        raise InputError(f"data.labels: teacher {path!r} is unconditional; set data.labels=false")
    if classes != num_classes:
        raise InputError(f"data.labels: the data has {num_classes} classes but teacher {path!r} was trained on {classes}")
    teacher.check_guidance(recipe.teacher.guidance_scale, "teacher.guidance_scale", f"teacher {path!r}")
