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
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

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
    "EvalConfig",
    "TeacherTrainingConfig",
    "DxMIConfig",
    "SiDConfig",
    "RecipeConfig",
    "load_recipe",
    "parse_overrides",
]


class ConfigError(InputError):
    """A recipe problem, reported in one line that names the key or path at fault."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


PositiveFloat = Annotated[float, Field(gt=0)]
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
    root: str | None = None  # image-folder / cifar10 location
    image_size: int | None = Field(None, ge=1)  # images are resized to this; must match the teacher
    num_points: int = Field(100_000, ge=1)  # size of a generated 2-D toy set


class TeacherConfig(_Strict):
    path: str  # local diffusers folder or hub id such as google/ddpm-cifar10-32
    c_noise: Literal["edm", "cm"] = "edm"  # EDM noise-conditioning convention (cm: consistency-model ports)

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


class CriticConfig(_Strict):
    objective: Annotated[str, AfterValidator(_registered(OBJECTIVES, "objective"))] = "n2ce"
    M: PositiveFloat = 100.0  # N²CE's noise magnification; the paper used 100 at batch 128 (DxMI)
    ratio_reg: float = Field(1.0, ge=0)  # gamma in gamma (E_d l^2 + E_n l^2); DxMI uses 1
    channels: list[int] = Field(default_factory=lambda: [128, 256])  # DxMI ResNet encoder widths
    num_res_blocks: int = Field(6, ge=1)
    hidden_features: int = Field(256, ge=1)  # MLP critic for vector data
    num_layers: int = Field(3, ge=1)
    lr: LearningRate = 1e-5  # DxMI CIFAR-10 value/critic learning rate

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
    lr: LearningRate = 1e-4  # generator / sampler / teacher network learning rate
    adam_betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = Field(1.0, gt=0)
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


class EvalConfig(_Strict):
    fid_every: int = Field(0, ge=0)  # 0 disables the in-training FID hook
    fid_samples: int = Field(2000, ge=2)
    ref: str | None = None  # defaults to the training data set name
    batch_size: int = Field(500, ge=1)


class TeacherTrainingConfig(_Strict):
    """Diffusion teacher trained from scratch by denoising score matching."""

    name: Literal["teacher"]
    net: TeacherNetConfig = Field(default_factory=TeacherNetConfig)

    critic_keys: ClassVar[frozenset[str]] = frozenset()  # no critic


class DxMIConfig(_Strict):
    """Few-step DxMI sampler, SPEC section 5."""

    name: Literal["dxmi"]
    num_steps: int = Field(4, ge=1)  # T
    spacing: Annotated[str, AfterValidator(_registered(SPACINGS, "spacing"))] = "auto"
    tau1: float = Field(0.1, ge=0)  # entropy weight on -log s_k
    tau2: float = Field(0.01, ge=0)  # velocity regularisation weight
    velocity_momentum: float = Field(0.99, ge=0, lt=1)  # v_k <- m v_k + (1-m) mean ||dx||^2
    last_scale: float | None = Field(1e-3, gt=0)  # fixes s_{T-1}; None learns it too
    eta: float = Field(1.0, ge=0, le=1)  # initial noise split: 1 = DDPM posterior std (DxMI), 0 = DDIM
    log_scale_lr: LearningRate = 1e-5
    value_lr: LearningRate = 1e-5
    share_value: bool = False  # DxMI original: one time-independent net for energy and value
    # the sampler learns only from steps k >= this: earlier steps land on noisy x_{k+1}, where V is the
    # critic's extrapolation plus a young TD correction (0 = every step, as DxMI)
    sampler_steps_from: int = Field(0, ge=0)
    # the critic trains alone (no value or sampler steps) until this many images: a critic that already
    # separates the initial student (0 = none, as DxMI; the density-chasm experiments use it)
    sampler_warmup_images: int = Field(0, ge=0)

    # the critic section keys this method reads: all of them (its own critic network, MLP or ResNet)
    critic_keys: ClassVar[frozenset[str]] = frozenset(
        {"objective", "M", "ratio_reg", "channels", "num_res_blocks", "hidden_features", "num_layers", "lr"})

    @model_validator(mode="after")
    def _trains_some_step(self) -> "DxMIConfig":
        if self.sampler_steps_from >= self.num_steps:
            raise ValueError(
                f"method.sampler_steps_from: must be below method.num_steps ({self.num_steps}) or no step trains, "
                f"got {self.sampler_steps_from}"
            )
        return self


class SiDConfig(_Strict):
    """One-step SiD / SiDA generator, SPEC section 6."""

    name: Literal["sid"]
    sigma_init: PositiveFloat = 2.5
    alpha: float = 1.2
    fake_lr: LearningRate = 1e-5
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

    # the critic is the fake score network's encoder (trained with it at method.fake_lr): only the objective
    critic_keys: ClassVar[frozenset[str]] = frozenset({"objective", "M", "ratio_reg"})


MethodConfig = Annotated[Union[TeacherTrainingConfig, DxMIConfig, SiDConfig], Field(discriminator="name")]


class RecipeConfig(_Strict):
    method: MethodConfig
    seed: int = 0
    data: DataConfig
    teacher: TeacherConfig | None = None  # required by distillation methods
    critic: CriticConfig = Field(default_factory=CriticConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="after")
    def _critic_keys_read_by_the_method(self) -> "RecipeConfig":
        unread = sorted(self.critic.model_fields_set - self.method.critic_keys)
        if unread and not self.method.critic_keys:
            raise ValueError(f"critic: method {self.method.name!r} trains no critic; remove the critic section")
        if unread:
            raise ValueError(f"critic.{unread[0]}: not used by method {self.method.name!r} (it reads critic."
                             + ", critic.".join(sorted(self.method.critic_keys)) + ")")
        return self

    def resolved(self) -> dict[str, Any]:
        """The recipe with every default filled in, as plain YAML/JSON values, holding only the critic keys the
        method reads, so that it validates again as a recipe (``recipe.yaml`` of a run, ``n2ce-distill config``)."""
        out = self.model_dump(mode="json")
        out["critic"] = {k: v for k, v in out["critic"].items() if k in self.method.critic_keys}
        if not out["critic"]:
            del out["critic"]
        return out

    def unused_keys(self) -> list[str]:
        """Recipe keys that validate but that this recipe's choices leave unread: an objective parameter such as
        ``critic.M`` under another objective. Not an error, so that one key swaps the objective of a recipe
        written for N²CE; the CLI prints these at startup."""
        every = {name for objective in OBJECTIVES.values() for name in objective.parameters()}
        reads = OBJECTIVES[self.critic.objective].parameters()
        return [f"critic.{key}: not used by objective {self.critic.objective!r}; ignored"
                for key in sorted(self.critic.model_fields_set & every) if key not in reads]

    @model_validator(mode="after")
    def _needs_teacher(self) -> "RecipeConfig":
        if not isinstance(self.method, TeacherTrainingConfig) and self.teacher is None:
            raise ValueError(f"teacher: method {self.method.name!r} distils a teacher; set teacher.path")
        if self.data.name == "image-folder" and not self.data.root:
            raise ValueError("data.root: the image-folder data set needs a folder")
        if self.data.name == "image-folder" and not Path(self.data.root).is_dir():
            raise ValueError(f"data.root: folder {self.data.root!r} not found")
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


def load_recipe(path: str | Path, overrides: list[str] = ()) -> RecipeConfig:
    """Read, merge overrides into, and validate a recipe; raise :class:`ConfigError` on any problem."""
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
    raw = _merge(_resolve_paths(raw, path.parent), parse_overrides(list(overrides)))
    try:
        return RecipeConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_one_line(exc)) from None
