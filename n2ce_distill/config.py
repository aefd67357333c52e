"""Typed, validated recipes.

A recipe is a YAML file validated by pydantic models below; unknown keys, wrong types and out-of-range
values are rejected with a one-line :class:`ConfigError` naming the key (with a "did you mean" for
typos). Command-line overrides use dotted keys, ``critic.objective=nce``.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union, get_args

import yaml
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator,
                      model_validator)

from .data import DATASETS
from .errors import InputError
from .objectives import OBJECTIVES
from .samplers import SPACINGS

__all__ = [
    "ConfigError",
    "DataConfig",
    "TeacherConfig",
    "CriticConfig",
    "TrainConfig",
    "OptimConfig",
    "EvalConfig",
    "TeacherTrainingConfig",
    "DxMIConfig",
    "SiDConfig",
    "DMD2Config",
    "RecipeConfig",
    "load_recipe",
    "read_recipe",
    "parse_overrides",
]


class ConfigError(InputError):
    """A recipe problem, reported in one line that names the key or path at fault."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


PositiveFloat = Annotated[float, Field(gt=0)]
Finite = Annotated[float, Field(allow_inf_nan=False)]  # a weight or a noise level of inf passes gt=0 / ge=0
# Adam moves each parameter by about the learning rate per step: above 1 no recipe means it (1e38 passed once)
LearningRate = Annotated[float, Field(gt=0, le=1)]


_NAMES_KEY = re.compile(r"^[\w.]+: ")  # a validator message that already starts with its key
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def _registered(registry: dict | tuple, kind: str):
    """A validator that takes a name only if ``registry`` holds it, read when a recipe is validated: the
    registry is the one list of names (a new objective, data set or spacing is usable from a recipe once
    registered)."""

    def check(name: str) -> str:
        if name not in registry:
            raise ValueError(f"unknown {kind} {name!r}; choose from {', '.join(sorted(registry))}")
        return name

    return check


class DataConfig(_Strict):
    name: Annotated[str, AfterValidator(_registered(DATASETS, "data set"))]
    root: str | None = None  # image-folder / cifar10 location; prompts: the text file, one prompt per line
    image_size: int | None = Field(None, ge=1)  # images are resized to this; must match the teacher
    channels: Literal[1, 3] = 3  # image-folder: grayscale (1) or RGB (3)
    num_points: int = Field(100_000, ge=1)  # size of a generated 2-D toy set
    # batches carry class labels (digits' digit, CIFAR-10's class, an image folder's subfolder, a toy's mode):
    # what a class-conditional teacher needs, and what a teacher trained here is conditioned on
    labels: bool = False
    # image-folder only: the metadata.jsonl column holding each image's caption (diffusers' --caption_column,
    # "text" in its scripts); batches then carry captions, what a text-conditioned teacher reads
    caption_column: str | None = None

    @model_validator(mode="after")
    def _captions(self) -> "DataConfig":
        if self.caption_column is not None and self.name != "image-folder":
            raise ValueError(f"data.caption_column: only an image-folder data set has captions (data.name={self.name})")
        if self.caption_column is not None and self.labels:
            raise ValueError("data.caption_column: captions replace class labels; set data.labels=false")
        if self.name == "prompts" and (self.root is None or self.image_size is None):
            raise ValueError("data.root: a prompts data set needs data.root (the prompt file) and data.image_size "
                             "(the teacher's image side)")
        if self.name == "prompts" and self.labels:
            raise ValueError("data.labels: a prompts data set carries prompts, not class labels; set data.labels=false")
        return self


class TeacherConfig(_Strict):
    path: str  # local diffusers folder or hub id such as google/ddpm-cifar10-32
    c_noise: Literal["edm", "cm"] = "edm"  # EDM noise-conditioning convention (cm: consistency-model ports)
    # classifier-free guidance D_null + w (D_y - D_null) of a conditional teacher with a null class: 1 reads the
    # conditional teacher as it is; SiD guides the teacher's score, DxMI's sampler starts from the guided teacher
    guidance_scale: float = Field(1.0, ge=0)

    @field_validator("path")
    @classmethod
    def _exists_or_hub_id(cls, path: str) -> str:
        # "org/name" whose first part is no local folder is a hub id; anything else must exist here
        first = Path(path).parts[0] if Path(path).parts else ""
        is_hub_id = _HUB_ID.match(path) is not None and not Path(first).exists()
        if not is_hub_id and not Path(path).is_dir():
            raise ValueError(f"teacher.path: folder {path!r} not found")
        return path


class TeacherNetConfig(_Strict):
    """Network of a teacher trained from scratch."""

    parameterization: Literal["vp-eps", "edm"] = "vp-eps"
    block_out_channels: list[int] = Field(default_factory=lambda: [32, 64])  # tiny UNet for 8x8 digits
    hidden_features: int = Field(128, ge=1)  # ToyMLP width for 2-D data
    num_layers: int = Field(4, ge=1)  # ToyMLP depth
    num_train_timesteps: int = Field(1000, ge=2)  # DDPM schedule length (vp-eps)
    sigma_data: PositiveFloat = 0.5  # EDM data scale; 2-D toys are wider than images in [-1, 1]
    # with data.labels: the share of labels replaced by a null class (an extra row of the class table), so the
    # teacher also learns the unconditional score that classifier-free guidance needs (0: no null class)
    label_dropout: float = Field(0.1, ge=0, lt=1)
    # with captioned data: the width of the prompt embeddings, from a small CLIP text encoder initialised at random
    # and frozen (distinct prompts get distinct embeddings; SD's pretrained encoder is what a real teacher reads)
    text_features: int = Field(32, ge=8)
    # with captioned data: add an attention-pooled prompt embedding to the time embedding (diffusers'
    # addition_embed_type="text"), so every block reads the prompt, not only the mid block's cross-attention
    # (seed-0 DxMI students kept their prompts better with it: fidelity 0.900 against 0.825 unguided)
    pooled_prompt: bool = False


class CriticConfig(_Strict):
    """The critic's objective and network. Besides these keys it takes the hyperparameters of the registered
    objectives, each typed, constrained and defaulted by its objective's ``__init__`` (``critic.M``: N²CE's noise
    magnification, 100 by default, the paper's value at batch 128)."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    objective: Annotated[str, AfterValidator(_registered(OBJECTIVES, "objective"))] = "n2ce"
    ratio_reg: float = Field(1.0, ge=0)  # gamma in gamma (E_d l^2 + E_n l^2); DxMI uses 1
    channels: list[int] = Field(default_factory=lambda: [128, 256])  # DxMI ResNet encoder widths
    num_res_blocks: int = Field(6, ge=1)
    hidden_features: int = Field(256, ge=1)  # MLP critic for vector data
    num_layers: int = Field(3, ge=1)

    @model_validator(mode="after")
    def _objective_parameters(self) -> "CriticConfig":
        """Each extra key is a hyperparameter of some registered objective, validated against that objective's
        annotation (the chosen objective's own when it has the key)."""
        owners = {name: param for cls in OBJECTIVES.values() for name, param in cls.parameters().items()}
        owners |= OBJECTIVES[self.objective].parameters()
        for key, value in list(self.model_extra.items()):
            if key not in owners:
                hint = difflib.get_close_matches(key, [*type(self).model_fields, *owners], n=1)
                raise ValueError(f"critic.{key}: unknown key" + (f"; did you mean 'critic.{hint[0]}'?" if hint else ""))
            try:
                self.model_extra[key] = TypeAdapter(owners[key].annotation).validate_python(value)
            except ValidationError as error:
                raise ValueError(f"critic.{key}: {error.errors()[0]['msg']} (got {value!r})") from None
        return self

    def objective_parameters(self) -> dict[str, Any]:
        """The chosen objective's hyperparameters: the recipe's values, else the objective's defaults."""
        return {name: self.model_extra.get(name, param.default)
                for name, param in OBJECTIVES[self.objective].parameters().items()}

    @model_validator(mode="after")
    def _blocks_per_stage(self) -> "CriticConfig":
        if not self.channels or self.num_res_blocks < len(self.channels):
            raise ValueError(f"critic.num_res_blocks: needs at least one block per stage of critic.channels ({len(self.channels)})")
        return self


class EMAConfig(_Strict):
    beta: float = Field(0.999, ge=0, le=1)  # decay per update, reached after ema-pytorch's warm-up
    power: float = Field(2 / 3, gt=0)  # warm-up: decay = min(beta, 1 - (1 + step)^-power); 1 reaches 0.999 at 1k steps
    update_after_step: int = Field(0, ge=0)
    update_every: int = Field(1, ge=1)


class TrainConfig(_Strict):
    max_steps: int = Field(1000, ge=1)
    batch_size: int = Field(128, ge=1)  # global batch, split across processes
    gradient_accumulation_steps: int = Field(1, ge=1)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    grad_clip: float = Field(1.0, gt=0)
    compile: bool = False  # torch.compile every network (inductor; on a CPU it needs a C++ compiler)
    channels_last: bool = False  # NHWC weights for the convolutional networks (tensor-core GPUs prefer it)
    # recompute the trainable diffusers nets' activations in the backward pass (less memory, ~30% more compute),
    # as diffusers' training scripts' --gradient_checkpointing; the updates are the same
    gradient_checkpointing: bool = False
    ema: EMAConfig = Field(default_factory=EMAConfig)
    checkpoint_every: int = Field(500, ge=1)
    checkpoint_total_limit: int | None = Field(3, ge=1)  # keep this many newest checkpoints
    sample_every: int = Field(500, ge=1)  # sample grid PNG cadence
    log_every: int = Field(50, ge=1)
    log_with: str = "tensorboard"  # any Accelerate tracker that is installed (wandb, mlflow, aim, ...)
    on_nonfinite: Literal["error", "skip"] = "error"

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, value: Any) -> Any:
        return "no" if value is False else value  # YAML 1.1 reads a bare `no` as false


AdamBeta = Annotated[float, Field(ge=0, lt=1)]


class OptimConfig(_Strict):
    """Adam for one network of the method (a parameter group of its optimiser): ``optim.<net>.lr``."""

    lr: LearningRate | None = None  # None: the method's default for this network (its ``optimized`` table)
    betas: tuple[AdamBeta, AdamBeta] = (0.9, 0.999)  # torch's defaults; SiD recipes use (0, 0.999)


class EvalConfig(_Strict):
    fid_every: int = Field(0, ge=0)  # 0 disables the in-training FID hook
    fid_samples: int = Field(2000, ge=2)
    ref: str | None = None  # defaults to the training data set name
    batch_size: int = Field(500, ge=1)


class _MethodSection(_Strict):
    """What every ``method`` section declares besides its own keys."""

    # the critic section keys the method reads besides the objective's own (critic.objective, ratio_reg, M, ...)
    critic_keys: ClassVar[frozenset[str]] = frozenset()
    trains_critic: ClassVar[bool] = False
    optimized: ClassVar[dict[str, float]] = {}  # network -> default learning rate (the keys of ``optim``)

    def optimized_networks(self) -> dict[str, float]:
        """The networks this recipe's method trains, each with its default learning rate."""
        return dict(self.optimized)

    @property
    def reads_images(self) -> bool:
        """Whether the method reads data samples (not only their labels or captions)."""
        return True


class TeacherTrainingConfig(_MethodSection):
    """Diffusion teacher trained from scratch by denoising score matching."""

    name: Literal["teacher"]
    net: TeacherNetConfig = Field(default_factory=TeacherNetConfig)

    optimized: ClassVar[dict[str, float]] = {"denoiser": 1e-4}


class _StudentSection(_MethodSection):
    """What every distillation method declares: how the teacher's trainable copies train."""

    # LoRA students (peft): adapters of this rank on every trainable copy of the teacher (the student and, in SiD
    # and DMD2, the fake score network), whose own weights stay frozen; None trains the full networks
    lora_rank: int | None = Field(None, ge=1)
    lora_alpha: PositiveFloat | None = None  # the adapters' scale is alpha / rank; None: alpha = rank (scale 1)

    @model_validator(mode="after")
    def _alpha_needs_rank(self) -> "_StudentSection":
        if self.lora_alpha is not None and self.lora_rank is None:
            raise ValueError("method.lora_alpha: set method.lora_rank too (no LoRA without a rank)")
        return self


class DxMIConfig(_StudentSection):
    """Few-step DxMI sampler, SPEC section 5."""

    name: Literal["dxmi"]
    num_steps: int = Field(4, ge=1)  # T
    spacing: Annotated[str, AfterValidator(_registered(SPACINGS, "spacing"))] = "auto"
    tau1: float = Field(0.1, ge=0)  # entropy weight on -log s_k
    tau2: float = Field(0.01, ge=0)  # velocity regularisation weight
    velocity_momentum: float = Field(0.99, ge=0, lt=1)  # v_k <- m v_k + (1-m) mean ||dx||^2
    last_scale: float | None = Field(1e-3, gt=0)  # fixes s_{T-1}; None learns it too
    eta: float = Field(1.0, ge=0, le=1)  # initial noise split: 1 = DDPM posterior std (DxMI), 0 = DDIM
    share_value: bool = False  # DxMI original: one time-independent net for energy and value
    # the sampler learns only from steps k >= this: earlier steps land on noisy x_{k+1}, where V is the
    # critic's extrapolation plus a young TD correction (0 = every step, as DxMI)
    sampler_steps_from: int = Field(0, ge=0)
    # the critic trains alone (no value or sampler steps) until this many images: a critic that already
    # separates the initial student (0 = none, as DxMI; the density-chasm experiments use it)
    sampler_warmup_images: int = Field(0, ge=0)

    # its own critic network, MLP or ResNet
    critic_keys: ClassVar[frozenset[str]] = frozenset({"channels", "num_res_blocks", "hidden_features", "num_layers"})
    trains_critic: ClassVar[bool] = True
    # DxMI CIFAR-10 learning rates; the learned per-step noise log s_k is a parameter group of the sampler's Adam
    optimized: ClassVar[dict[str, float]] = {"sampler": 1e-4, "log_scales": 1e-5, "critic": 1e-5, "value": 1e-5}

    def optimized_networks(self) -> dict[str, float]:
        networks = dict(self.optimized)
        if self.share_value:
            del networks["value"]  # the critic is the value
        return networks

    @model_validator(mode="after")
    def _trains_some_step(self) -> "DxMIConfig":
        if self.sampler_steps_from >= self.num_steps:
            raise ValueError(
                f"method.sampler_steps_from: must be below method.num_steps ({self.num_steps}) or no step trains, "
                f"got {self.sampler_steps_from}"
            )
        return self


class SiDConfig(_StudentSection):
    """One-step SiD / SiDA generator, SPEC section 6."""

    name: Literal["sid"]
    sigma_init: PositiveFloat = 2.5
    alpha: float = 1.2
    adversarial: bool = True  # SiDA critic on the fake score network's encoder
    generator_loss: Literal["nonsat", "kl"] = "nonsat"  # nonsat follows the critic: softplus(log M - l) for n2ce
    adv_weight: float = Field(0.5, ge=0, le=1)  # generator loss (1-w) SiD + w adversarial
    critic_weight: PositiveFloat = 1.0  # critic loss added to the fake-score loss
    sigma_min: PositiveFloat = 0.002  # generator-loss noise range (EDM)
    sigma_max: PositiveFloat = 80.0
    t_max: float = Field(0.8, gt=0, le=1)  # t ~ U[0, t_max] keeps sigma <= ~24.4
    generator_warmup_images: int = Field(0, ge=0)  # SiDA: 100k
    adversarial_warmup_images: int = Field(0, ge=0)  # SiDA: 200k
    logit_clamp: float | None = Field(None, gt=0)  # clamp on l - log M, never on l

    # the critic is the fake score network's encoder (trained with it at optim.fake_score.lr): no network keys
    trains_critic: ClassVar[bool] = True
    optimized: ClassVar[dict[str, float]] = {"generator": 1e-4, "fake_score": 1e-5}

    @property
    def reads_images(self) -> bool:
        return self.adversarial  # the critic compares data with samples; plain SiD is data-free


class DMD2Config(_StudentSection):
    """One-step or few-step DMD2 generator (distribution matching with a GAN critic), SPEC section 6b. An
    iteration updates the fake score network and its critic head; every ``fake_updates_per_step``-th one also
    updates the generator (the EMA follows every iteration)."""

    name: Literal["dmd2"]
    num_steps: int = Field(1, ge=1)  # 1: one-step; more: few-step, trained by backward simulation
    # the generator's first level (its input sigma_init z): None is the teacher's sigma_max, as DMD2 on EDM and SD;
    # the other levels follow evenly on the Karras ramp below it, as DMD2's timesteps 999, 749, 499, 249. A
    # VP-epsilon teacher's x0 = x - sigma eps is ill-conditioned at its sigma_max (~157 for 1000 DDPM steps)
    sigma_init: Finite | None = Field(None, gt=0)
    fake_updates_per_step: int = Field(5, ge=1)  # two time-scale rule: DMD2's dfake_gen_update_ratio (ImageNet)
    # the Karras ramp (rho 7) that the noise levels are drawn on: DMD2's EDM grid
    sigma_min: Finite = Field(0.002, gt=0)
    # None: EDM's 80, or the teacher's largest level where that is lower (SD-1.5's ~14.6)
    sigma_max: Finite | None = Field(None, gt=0)
    dm_t_min: float = Field(0.02, ge=0, lt=1)  # distribution matching at t ~ U[dm_t_min, dm_t_max] on the ramp
    dm_t_max: float = Field(0.98, gt=0, le=1)  # (DMD2: min/max_step_percent); the fake score at t ~ U[0, 1]
    adversarial: bool = True  # the GAN critic: a head on the fake score network's bottleneck
    critic_weight: Finite = Field(1e-2, ge=0)  # fake-score loss + this x critic loss (DMD2's cls_loss_weight)
    adversarial_weight: Finite = Field(3e-3, ge=0)  # generator: DM + this x adversarial (gen_cls_loss_weight)
    adversarial_warmup_images: int = Field(0, ge=0)  # the generator's adversarial term waits this long

    # the critic is a head on the fake score network's encoder (trained with it at optim.fake_score.lr)
    trains_critic: ClassVar[bool] = True
    optimized: ClassVar[dict[str, float]] = {"generator": 2e-6, "fake_score": 2e-6}  # DMD2 ImageNet-64

    @property
    def reads_images(self) -> bool:
        return self.adversarial  # the GAN head compares data with samples; distribution matching reads none

    @model_validator(mode="after")
    def _ordered(self) -> "DMD2Config":
        if self.dm_t_min >= self.dm_t_max:
            raise ValueError(f"method.dm_t_min: must be below method.dm_t_max ({self.dm_t_max}), got {self.dm_t_min}")
        if self.sigma_max is not None and self.sigma_min >= self.sigma_max:
            raise ValueError(f"method.sigma_min: must be below method.sigma_max ({self.sigma_max}), got {self.sigma_min}")
        return self


MethodConfig = Annotated[Union[TeacherTrainingConfig, DxMIConfig, SiDConfig, DMD2Config], Field(discriminator="name")]


class RecipeConfig(_Strict):
    method: MethodConfig
    seed: int = Field(0, ge=0, lt=2**32)  # numpy's seed range
    data: DataConfig
    teacher: TeacherConfig | None = None  # required by distillation methods
    critic: CriticConfig = Field(default_factory=CriticConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    optim: dict[str, OptimConfig] = Field(default_factory=dict)  # filled with every network the method trains
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, raw: Any) -> Any:
        """Learning rates and betas once spread over four sections live under ``optim.<net>``: an old key is
        refused with the key that replaces it."""
        if not isinstance(raw, dict):
            return raw
        name = raw.get("method", {}).get("name") if isinstance(raw.get("method"), dict) else None
        networks = list(_METHODS[name].optimized) if name in _METHODS else ["<net>"]
        for (section, key), target in _MOVED_KEYS.items():
            if isinstance(raw.get(section), dict) and key in raw[section]:
                target = target.format(main=networks[0])
                where = (f"moved to {target}" if target.split(".")[1] in (*networks, "<net>")
                         else f"not used by method {name!r}")
                raise ValueError(f"{section}.{key}: {where} (each network's lr and betas are set under optim.<net>; "
                                 f"this method trains {', '.join(networks)})")
        return raw

    @model_validator(mode="after")
    def _optim_per_network(self) -> "RecipeConfig":
        networks = self.method.optimized_networks()
        unknown = sorted(set(self.optim) - set(networks))
        if unknown:
            raise ValueError(f"optim.{unknown[0]}: method {self.method.name!r} trains no such network "
                             f"(it trains {', '.join(networks)})")
        given = {name: self.optim.get(name, OptimConfig()) for name in networks}
        self.optim = {name: opt.model_copy(update={"lr": opt.lr or networks[name]}) for name, opt in given.items()}
        return self

    def _critic_reads(self) -> set[str]:
        """The critic keys this recipe reads: none without a critic, else the method's network keys and the
        chosen objective's (``objective``, ``ratio_reg`` and its hyperparameters)."""
        if not self.method.trains_critic:
            return set()
        return {*self.method.critic_keys, *_OBJECTIVE_KEYS, *OBJECTIVES[self.critic.objective].parameters()}

    @model_validator(mode="after")
    def _critic_keys_read_by_the_method(self) -> "RecipeConfig":
        given = self.critic.model_fields_set | set(self.critic.model_extra)
        if given and not self.method.trains_critic:
            raise ValueError(f"critic: method {self.method.name!r} trains no critic; remove the critic section")
        reads = self._critic_reads()
        # another objective's hyperparameters are noted, not refused (see unused_keys)
        unread = sorted(given - reads - _objective_parameter_names())
        if unread:
            raise ValueError(f"critic.{unread[0]}: not used by method {self.method.name!r} (it reads critic."
                             + ", critic.".join(sorted(reads)) + ")")
        return self

    def resolved(self) -> dict[str, Any]:
        """The recipe with every default filled in, as plain YAML/JSON values, holding only the critic keys the
        recipe reads, so that it validates again as a recipe (``recipe.yaml`` of a run, ``n2ce-distill config``)."""
        out = self.model_dump(mode="json")
        reads = self._critic_reads()
        kept = reads | _objective_parameter_names()  # another objective's parameters too, so one key swaps back
        out["critic"] = {k: v for k, v in out["critic"].items() if k in kept} | self.critic.objective_parameters()
        if not reads:
            del out["critic"]
        return out

    def unused_keys(self) -> list[str]:
        """Recipe keys that validate but that this recipe's choices leave unread: an objective parameter such as
        ``critic.M`` under another objective. Not an error, so that one key swaps the objective of a recipe
        written for N²CE; the CLI prints these at startup."""
        reads = OBJECTIVES[self.critic.objective].parameters()
        return [f"critic.{key}: not used by objective {self.critic.objective!r}; ignored"
                for key in sorted(self.critic.model_extra) if key not in reads]

    @model_validator(mode="after")
    def _needs_teacher(self) -> "RecipeConfig":
        if not isinstance(self.method, TeacherTrainingConfig) and self.teacher is None:
            raise ValueError(f"teacher: method {self.method.name!r} distils a teacher; set teacher.path")
        if self.data.name == "image-folder" and not self.data.root:
            raise ValueError("data.root: the image-folder data set needs a folder")
        if self.data.name == "image-folder" and not Path(self.data.root).is_dir():
            raise ValueError(f"data.root: folder {self.data.root!r} not found")
        if self.data.name == "prompts" and self.method.reads_images:
            why = " (set method.adversarial=false)" if "adversarial" in type(self.method).model_fields else ""
            raise ValueError(f"data.name: a prompts data set holds no images, and method {self.method.name!r} reads "
                             f"data images{why}")
        return self


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["critic.objective=nce", "train.max_steps=10"]`` -> nested dict (values parsed as YAML)."""
    nested: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {pair!r}: expected key=value")
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {pair!r}: {part!r} was given a value by an earlier override")
        try:
            node[leaf] = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {pair!r}: not a valid YAML value ({str(exc).splitlines()[0]})") from None
    return nested


_OBJECTIVE_KEYS = ("objective", "ratio_reg")  # critic keys of every objective


def _objective_parameter_names() -> set[str]:
    return {name for objective in OBJECTIVES.values() for name in objective.parameters()}


# keys replaced by optim.<net>.{lr,betas}; {main} is the network the method exports
_MOVED_KEYS = {("train", "lr"): "optim.{main}.lr", ("train", "adam_betas"): "optim.<net>.betas",
               ("critic", "lr"): "optim.critic.lr", ("method", "value_lr"): "optim.value.lr",
               ("method", "log_scale_lr"): "optim.log_scales.lr", ("method", "fake_lr"): "optim.fake_score.lr"}


# recipe values that name files or folders; relative ones are read against the recipe's folder first
_PATH_KEYS = (("teacher", "path"), ("data", "root"), ("eval", "ref"))


def _resolve_paths(raw: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Relative paths written in a recipe file point next to it when something is there, so a recipe
    runs from any working directory; otherwise they stay as written (the working directory, a hub id,
    a named reference)."""
    for section, key in _PATH_KEYS:
        value = raw.get(section, {}).get(key) if isinstance(raw.get(section), dict) else None
        if isinstance(value, str) and value and not Path(value).is_absolute() and (folder / value).exists():
            raw[section] = {**raw[section], key: os.path.normpath(folder / value)}
    return raw


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


# method name -> its config section, read off the union's tags
_METHODS: dict[str, type[BaseModel]] = {get_args(cls.model_fields["name"].annotation)[0]: cls
                                         for cls in get_args(get_args(MethodConfig)[0])}


def _known_keys(parents: tuple, method: type[BaseModel] | None) -> list[str]:
    """Field names of the section at ``parents`` (for "did you mean")."""
    model: type[BaseModel] | None = RecipeConfig
    for part in parents:
        if model is None:
            return []
        if part == "method":
            model = method
            continue
        field = model.model_fields.get(part)
        options = get_args(field.annotation) or (field.annotation,) if field else ()
        model = next((t for t in options if isinstance(t, type) and issubclass(t, BaseModel)), None)
    return list(model.model_fields) if model else []


def _one_line(error: ValidationError) -> str:
    first = error.errors()[0]
    loc, method = tuple(first["loc"]), None
    # pydantic reports union members under their tag: ("method", "dxmi", "tau1") -> "method.tau1"
    if len(loc) > 1 and loc[0] == "method" and loc[1] in _METHODS:
        loc, method = (loc[0],) + loc[2:], _METHODS[loc[1]]
    key = ".".join(str(p) for p in loc) or "recipe"
    if first["type"] == "extra_forbidden":
        hint = difflib.get_close_matches(str(loc[-1]), _known_keys(loc[:-1], method), n=1)
        suggestion = f"; did you mean {'.'.join(map(str, loc[:-1] + (hint[0],)))!r}?" if hint else ""
        return f"{key}: unknown key{suggestion}"
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "value_error" and (not loc or _NAMES_KEY.match(message)):
        return message  # validators already name their key
    return f"{key}: {message} (got {first.get('input')!r})"


def read_recipe(path: str | Path, overrides: list[str] = ()) -> dict[str, Any]:
    """A recipe file as a plain dict, its relative paths resolved next to it and ``overrides`` merged in, not yet
    validated; raise :class:`ConfigError` for a missing file or bad YAML."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe {str(path)!r}: file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"recipe {str(path)!r}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"recipe {str(path)!r}: expected a mapping at the top level")
    # overrides are typed on the command line: their paths stay relative to the working directory
    return _merge(_resolve_paths(raw, path.parent), parse_overrides(list(overrides)))


def load_recipe(path: str | Path, overrides: list[str] = ()) -> RecipeConfig:
    """Read, merge overrides into, and validate a recipe; raise :class:`ConfigError` on any problem."""
    try:
        return RecipeConfig.model_validate(read_recipe(path, overrides))
    except ValidationError as exc:
        raise ConfigError(_one_line(exc)) from None
