r"""One sigma-space denoiser ``D(x; sigma, y) ~ E[x_0 | x]`` for ``x = x_0 + sigma n`` shared by every loop
(SPEC section 4; data in [-1, 1], ``sigma_data = 0.5``): :class:`EDMDenoiser` or :class:`VPDenoiser`.

Teacher training is generic: ``loss_weight(s) * mean (D(x_0 + s n; s) - x_0)^2`` with ``s ~
sample_training_sigmas``: the EDM loss for EDM (``ln s ~ N(-1.2, 1.2^2)``, weight ``(s^2+sd^2)/(s sd)^2``),
*exactly* DDPM's ``|eps - eps_hat|^2`` for VP (``t ~ U{0..T-1}``, weight ``1/s^2``: ``D - x_0 = s (n - eps_hat)``).
Folders use the diffusers ``DDPMPipeline`` layout (``model_index.json``, ``unet/``, ``scheduler/``).
"""

from __future__ import annotations

import abc
import json
import os
import socket
import warnings
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

import diffusers
import torch
from diffusers import EDMEulerScheduler, UNet2DConditionModel, UNet2DModel
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from torch import nn

from .errors import InputError
from .nets import ToyMLP

__all__ = ["C_NOISE", "Denoiser", "EDMDenoiser", "VPDenoiser", "denoiser_from_components", "load_denoiser",
           "per_sample"]

# c_noise(sigma) conventions of EDM nets. The CM ports' ln(s + 1e-44) becomes a clamp (same value for s > 1e-20, no
# fp32 denormals); at s = 0 c_out vanishes, so D = x whatever F returns.
C_NOISE: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "edm": lambda s: 0.25 * torch.log(s.clamp_min(1e-20)),
    "cm": lambda s: 1000.0 * 0.25 * torch.log(s.clamp_min(1e-20)),
}
# by unet/config.json's _class_name; a UNet2DConditionModel reads prompt embeddings (encoder_hidden_states)
_NET_CLASSES = {"UNet2DModel": UNet2DModel, "UNet2DConditionModel": UNet2DConditionModel, "ToyMLP": ToyMLP}
_EDM_SCHEDULERS = {"EDMEulerScheduler": "edm", "CMStochasticIterativeScheduler": "cm"}  # -> default c_noise
_INDEX_KEY = "_n2ce_denoiser"  # leading underscore: diffusers pipelines ignore it in model_index.json


def _sigma_vector(sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """Sigma as a float32 (B,) tensor on x's device (scalars broadcast; preconditioning stays in fp32)."""
    s = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1)
    return s.expand(x.shape[0]) if s.numel() == 1 else s


def per_sample(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-sample values (B,) -> (B, 1, ..., 1), broadcastable against x (a noise level per row over its pixels)."""
    return v.reshape(-1, *([1] * (x.dim() - 1)))


class Denoiser(nn.Module, abc.ABC):
    """Abstract ``D(x; sigma, condition) -> x0_hat`` in VE sigma space.

    The condition (the argument ``class_labels``, as diffusers names it for class tables) is class indices (B,)
    for a class-conditional net, prompt embeddings (B, L, D) for a text-conditioned one (a
    ``UNet2DConditionModel``, which reads them as ``encoder_hidden_states``), ``None`` for an unconditional one.

    Attributes: ``net`` (the wrapped network; every weight trainable, SiDA hooks its middle block),
    ``sigma_data``, ``sigma_min`` / ``sigma_max`` (the noise range samplers stop at and start from) and
    ``null_class``: the label index a teacher trained with label dropout reads as "no label" (the last row of
    its class table), which classifier-free guidance (:meth:`guided`) needs; ``None`` when it has none. A
    text-conditioned net's "no prompt" is the empty prompt's embedding (:meth:`set_null_prompt`)."""

    net: nn.Module
    sigma_data: float
    sigma_min: float
    sigma_max: float
    null_class: int | None = None
    pipeline_name: str  # model_index.json's _class_name

    @abc.abstractmethod
    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, class_labels: torch.Tensor | None = None):
        """Denoised estimate of x_0 for ``x = x_0 + sigma n``; ``sigma`` (B,) or a scalar."""

    @abc.abstractmethod
    def sample_training_sigmas(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """(n,) noise levels from the teacher's training distribution, on this module's device."""

    @abc.abstractmethod
    def loss_weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """Per-sample weight lambda(sigma) of the x_0-space squared error."""

    @abc.abstractmethod
    def _export(self) -> tuple[object, dict]:
        """The diffusers scheduler for ``scheduler/`` and the settings no scheduler config holds."""

    def to_scheduler(self):
        """The diffusers scheduler that, with ``net``, rebuilds this denoiser (:func:`denoiser_from_components`)."""
        return self._export()[0]

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """One sample's shape: (C, H, W) for a UNet2DModel, (D,) for a ToyMLP."""
        cfg = self.net.config
        if "dim" in cfg:
            return (cfg.dim,)
        if (size := cfg.get("sample_size")) is None:
            raise ValueError(f"{type(self.net).__name__} config has no sample_size; cannot infer sample_shape")
        return (cfg.in_channels, *((size, size) if isinstance(size, int) else size))

    @property
    def num_classes(self) -> int | None:
        """How many classes the net is conditioned on (its null class not counted); ``None``: unconditional.
        Only class tables (``num_class_embeds`` with diffusers' default ``class_embed_type``) take class indices."""
        cfg = self.net.config
        table = cfg.get("num_class_embeds")
        if table is None or cfg.get("class_embed_type") is not None:
            return None
        return table - (self.null_class is not None)

    @property
    def text_features(self) -> int | None:
        """The width D of the prompt embeddings a text-conditioned net reads (its ``cross_attention_dim``);
        ``None`` for nets that read class labels or nothing (their configs have no such key)."""
        return self.net.config.get("cross_attention_dim")

    def set_null_prompt(self, embedding: torch.Tensor) -> None:
        """The "no prompt" condition of a text-conditioned net (1 or B rows of (L, D)): the empty prompt for the
        teacher, a negative prompt when sampling. Not saved with the weights (a folder's text encoder gives it)."""
        if self.text_features is None:
            raise ValueError("set_null_prompt: this denoiser's net reads no prompts")
        self.register_buffer("null_prompt", embedding.float(), persistent=False)

    @property
    def can_guide(self) -> bool:
        """Whether the net has a "no condition" input for classifier-free guidance."""
        return self.null_class is not None or getattr(self, "null_prompt", None) is not None

    def null_condition(self, condition: torch.Tensor) -> torch.Tensor:
        """The "no condition" input for each row of ``condition``."""
        if self.text_features is None:
            return torch.full_like(condition, self.null_class)
        return self.null_prompt.to(condition).expand(len(condition), -1, -1)

    def guided(self, x: torch.Tensor, sigma, class_labels: torch.Tensor | None, guidance_scale: float = 1.0):
        r"""Classifier-free guidance ``D_0 + w (D_y - D_0)`` with ``D_0 = D(x; sigma, null)`` (one batched call
        over both); ``w = 1`` is the conditional denoiser itself, ``w = 0`` the unconditional one."""
        if guidance_scale == 1 or class_labels is None:
            return self(x, sigma, class_labels)
        self.check_guidance(guidance_scale)
        null = self.null_condition(class_labels)
        sigma = _sigma_vector(sigma, x)
        conditional, unconditional = self(torch.cat([x, x]), sigma.repeat(2), torch.cat([class_labels, null])).chunk(2)
        return unconditional + guidance_scale * (conditional - unconditional)

    def check_guidance(self, guidance_scale: float, key: str = "guidance_scale", name: str = "this teacher") -> None:
        """Refuse ``guidance_scale != 1`` where guidance is undefined, naming the recipe key or option ``key``."""
        if guidance_scale != 1 and not self.can_guide:
            why = ("is unconditional" if self.num_classes is None and self.text_features is None else
                   "has no null class (trained without label dropout)" if self.text_features is None else
                   "has no empty-prompt embedding (load it with its text encoder)")
            raise InputError(f"{key}: {name} {why}, so classifier-free guidance is undefined; set {key}=1")

    def _label_settings(self) -> dict:
        return {} if self.null_class is None else {"null_class": self.null_class}  # unconditional folders unchanged

    device = property(lambda self: next(self.net.parameters()).device)

    def _net_output(self, x: torch.Tensor, timestep: torch.Tensor, condition: torch.Tensor | None) -> torch.Tensor:
        """The raw net's prediction in fp32; preconditioning stays in fp32, the net runs in its own dtype."""
        dtype = next(self.net.parameters()).dtype
        if self.text_features is None:
            return self.net(x.to(dtype), timestep, class_labels=condition).sample.float()
        if condition is None or condition.dim() != 3 or condition.shape[-1] != self.text_features:
            got = "none" if condition is None else f"shape {tuple(condition.shape)}"
            raise ValueError(f"this denoiser is text-conditioned: it needs prompt embeddings (B, L, "
                             f"{self.text_features}), got {got}")
        return self.net(x.to(dtype), timestep, encoder_hidden_states=condition.to(dtype)).sample.float()

    def _rng_device(self, generator: torch.Generator | None) -> torch.device:  # same draws on any accelerator
        return generator.device if generator is not None else self.device

    def denoising_loss(self, x0, class_labels=None, sigma=None, noise=None, generator=None, model=None) -> torch.Tensor:
        """Per-sample teacher loss ``lambda(s) * mean_dims (D(x0 + s n; s) - x0)^2``, shape (B,); ``sigma`` and
        ``noise`` default to fresh draws (from ``generator``) of the training distribution. ``model`` is the
        module to call for D (this one by default; a distributed wrapper of it when training)."""
        if sigma is None:
            sigma = self.sample_training_sigmas(x0.shape[0], generator)
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, device=self._rng_device(generator)).to(x0)
        sigma = _sigma_vector(sigma, x0)
        err = ((model or self)(x0 + per_sample(sigma, x0) * noise, sigma, class_labels) - x0).float().square()
        return self.loss_weight(sigma) * err.flatten(1).mean(1)

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write ``unet/``, ``scheduler/`` and ``model_index.json``, readable by :func:`load_denoiser` (and, for
        VP, by diffusers' ``DDPMPipeline.from_pretrained``)."""
        self.net.save_pretrained((root := Path(save_directory)) / "unet")  # creates root too
        scheduler, settings = self._export()
        scheduler.save_pretrained(root / "scheduler")
        index = {"_class_name": self.pipeline_name, "_diffusers_version": diffusers.__version__,
                 "scheduler": ["diffusers", type(scheduler).__name__],
                 "unet": [type(self.net).__module__.split(".")[0], type(self.net).__name__], _INDEX_KEY: settings}
        (root / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


class EDMDenoiser(Denoiser):
    r"""EDM preconditioning (Karras et al. 2022) around ``net(c_in x, c_noise, class_labels=...).sample = F``:

    ``D = c_skip x + c_out F``, ``c_skip = sd^2/(s^2+sd^2)``, ``c_out = s sd/sqrt(s^2+sd^2)``,
    ``c_in = 1/sqrt(s^2+sd^2)``, ``c_noise = ln(s)/4`` (``"edm"``) or ``1000 ln(s)/4`` (``"cm"``: diffusers'
    consistency-model ports, e.g. ``dg845/diffusers-cm_edm_imagenet64_ema``). Training sigmas:
    ``ln s ~ N(p_mean, p_std^2)``. Saved with an ``EDMEulerScheduler`` (which holds the same formulas)."""

    pipeline_name = "EDMDenoiser"  # no diffusers pipeline runs a bare EDM net

    def __init__(self, net: nn.Module, sigma_data: float = 0.5, sigma_min: float = 0.002, sigma_max: float = 80.0,
                 c_noise: str = "edm", p_mean: float = -1.2, p_std: float = 1.2, null_class: int | None = None):
        super().__init__()
        self.null_class = null_class
        if c_noise not in C_NOISE:
            raise InputError(f"unknown c_noise convention {c_noise!r}; choose from {sorted(C_NOISE)}")
        self.net, self.c_noise, self.p_mean, self.p_std = net, c_noise, float(p_mean), float(p_std)
        self.sigma_data, self.sigma_min, self.sigma_max = float(sigma_data), float(sigma_min), float(sigma_max)

    def coefficients(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(c_skip, c_out, c_in, c_noise)``, elementwise in sigma."""
        sd, norm = self.sigma_data, (sigma.square() + self.sigma_data**2).sqrt()
        return sd**2 / norm.square(), sigma * sd / norm, 1 / norm, C_NOISE[self.c_noise](sigma)

    def forward(self, x, sigma, class_labels=None):
        c_skip, c_out, c_in, c_noise = self.coefficients(_sigma_vector(sigma, x))
        f = self._net_output(per_sample(c_in, x) * x, c_noise, class_labels)
        return (per_sample(c_skip, x) * x + per_sample(c_out, x) * f).to(x.dtype)

    def sample_training_sigmas(self, n, generator=None):
        z = torch.randn(n, generator=generator, device=self._rng_device(generator))
        return (self.p_mean + self.p_std * z).exp().to(self.device)

    def loss_weight(self, sigma):
        return (sigma.square() + self.sigma_data**2) / (sigma * self.sigma_data).square()

    def _export(self):
        scheduler = EDMEulerScheduler(sigma_min=self.sigma_min, sigma_max=self.sigma_max, sigma_data=self.sigma_data)
        return scheduler, {"kind": "edm", "c_noise": self.c_noise, "p_mean": self.p_mean, "p_std": self.p_std,
                           **self._label_settings()}


class VPDenoiser(Denoiser):
    r"""A DDPM network (``scheduler``: any diffusers scheduler with ``alphas_cumprod``; its ``prediction_type``
    ``epsilon`` or ``v_prediction``) in sigma space: the VP state ``x_t = a x_0 + b n`` (``a = sqrt(abar_t)``,
    ``b = sqrt(1 - abar_t)``) is ``x / sqrt(1 + s^2)`` at ``s = sigma(t) = b / a``, so for epsilon
    ``D(x; s) = x - s eps(x_t, t(s))`` and for ``v = a n - b x_0``, ``D = a x_t - b v = x / (1 + s^2) - s v /
    sqrt(1 + s^2)``. ``t(s)`` is linear in ``ln sigma`` between grid points (as in k-diffusion): exact at
    ``sigma(t_i)`` (the full grid reproduces DDPM exactly), monotone, clamped to ``[0, T-1]`` outside the grid."""

    pipeline_name = "DDPMPipeline"  # our VP folders load in diffusers as they are

    def __init__(self, unet: nn.Module, scheduler, sigma_data: float = 0.5, null_class: int | None = None):
        super().__init__()
        self.null_class = null_class
        self.prediction_type = scheduler.config.get("prediction_type", "epsilon")
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise InputError(f"VPDenoiser reads epsilon or v_prediction nets, got prediction_type="
                             f"{self.prediction_type!r}")
        self.net, self.scheduler, self.sigma_data = unet, scheduler, float(sigma_data)
        abar = scheduler.alphas_cumprod.to(torch.float64)
        # a plain fp32 attribute, not a buffer: rebuilt from scheduler/ on load, and .half() must not round it
        self.discrete_sigmas = ((1 - abar) / abar).sqrt().float()
        self.sigma_min, self.sigma_max = float(self.discrete_sigmas[0]), float(self.discrete_sigmas[-1])

    def _grid(self, device: torch.device) -> torch.Tensor:
        if self.discrete_sigmas.device != device:  # follow the inputs' device, once
            self.discrete_sigmas = self.discrete_sigmas.to(device)
        return self.discrete_sigmas

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Continuous timestep ``t = i + ln(s/s_i)/ln(s_{i+1}/s_i)`` for ``s_i <= s < s_{i+1}``."""
        grid = self._grid(sigma.device)
        s = sigma.float().clamp(grid[0], grid[-1])
        i = (torch.searchsorted(grid, s, right=True) - 1).clamp(0, grid.numel() - 2)
        lo, hi = grid[i], grid[i + 1]
        return i + (s.log() - lo.log()) / (hi.log() - lo.log())

    def forward(self, x, sigma, class_labels=None):
        s = _sigma_vector(sigma, x)
        norm = per_sample((1 + s.square()).sqrt(), x)
        out = self._net_output(x / norm, self.sigma_to_t(s), class_labels)
        if self.prediction_type == "epsilon":
            return (x - per_sample(s, x) * out).to(x.dtype)
        return (x / norm.square() - per_sample(s, x) / norm * out).to(x.dtype)

    def sample_training_sigmas(self, n, generator=None):
        t = torch.randint(0, len(self.discrete_sigmas), (n,), generator=generator, device=self._rng_device(generator))
        return self._grid(self.device)[t.to(self.device)]

    def loss_weight(self, sigma):
        # |eps - eps_hat|^2 = |D - x_0|^2 / s^2, and |v - v_hat|^2 = |D - x_0|^2 (1 + s^2) / s^2
        return (1 + sigma.square() * (self.prediction_type == "v_prediction")) / sigma.square()

    def _export(self):
        return self.scheduler, {"kind": "vp", "sigma_data": self.sigma_data, **self._label_settings()}


def denoiser_from_components(net: nn.Module, scheduler, c_noise: str | None = None, settings: dict | None = None):
    """Wrap an instantiated net and diffusers scheduler; the scheduler decides the parameterisation.

    ``EDMEulerScheduler`` / ``CMStochasticIterativeScheduler`` -> :class:`EDMDenoiser` (sigma_data/min/max from its
    config; c_noise ``"edm"`` / ``"cm"`` unless ``c_noise`` or ``settings`` say otherwise); any scheduler with
    ``alphas_cumprod`` (DDPM, DDIM, ...) -> :class:`VPDenoiser`. ``settings``: model_index.json's
    ``_n2ce_denoiser`` (with the teacher's ``null_class``, if it has one). Consistency-*distilled* nets
    (boundary-condition scalings) are not EDM denoisers."""
    name, settings = type(scheduler).__name__, settings or {}
    if name in _EDM_SCHEDULERS:
        cfg = scheduler.config
        return EDMDenoiser(net, sigma_data=cfg.sigma_data, sigma_min=cfg.sigma_min, sigma_max=cfg.sigma_max,
                           c_noise=c_noise or settings.get("c_noise", _EDM_SCHEDULERS[name]),
                           p_mean=settings.get("p_mean", -1.2), p_std=settings.get("p_std", 1.2),
                           null_class=settings.get("null_class"))
    if not hasattr(scheduler, "alphas_cumprod"):
        raise InputError(f"scheduler {name} is neither EDM-type nor a discrete VP schedule")
    return VPDenoiser(net, scheduler, sigma_data=settings.get("sigma_data", 0.5),
                             null_class=settings.get("null_class"))


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connection at once: offline, the hub client would retry
    for about a minute before failing (measured: 63 s for one unknown id)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def _hub_files(root: str, hub_kwargs: dict) -> dict:
    """``hub_kwargs`` for a hub id: the local cache alone when it holds the id or the hub is unreachable."""
    if hub_kwargs.get("local_files_only"):
        return hub_kwargs
    try:
        UNet2DModel.load_config(root, subfolder="unet", local_files_only=True,
                                **{k: v for k, v in hub_kwargs.items() if k != "local_files_only"})
        return {**hub_kwargs, "local_files_only": True}
    except OSError:
        if _hub_reachable():
            return hub_kwargs
        raise OSError(f"{root} is not a local folder, not in the local Hugging Face cache, and the hub cannot be "
                      "reached") from None


# diffusers passes huggingface_hub an argument it has deprecated on every hub lookup; the warning says nothing
# to our users and would turn the one-line error for an unreachable hub id into three lines
_DEPRECATED_HUB_ARGUMENT = "The `local_dir_use_symlinks` argument is deprecated"


def load_denoiser(path_or_hub_id: str | os.PathLike, *, c_noise: str | None = None, **from_pretrained_kwargs):
    """:func:`denoiser_from_components` on a diffusers folder or hub id holding ``unet/`` and ``scheduler/``.

    The net class (``UNet2DModel`` or :class:`ToyMLP`) is ``unet/config.json``'s ``_class_name``;
    ``from_pretrained_kwargs`` (``revision``, ``cache_dir``, ``local_files_only``, ``torch_dtype``, ...) go to
    the diffusers loaders."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_DEPRECATED_HUB_ARGUMENT, category=UserWarning)
        return _load_denoiser(str(path_or_hub_id), c_noise, from_pretrained_kwargs)


def _load_denoiser(root: str, c_noise: str | None, from_pretrained_kwargs: dict):
    hub_kwargs = {k: v for k, v in from_pretrained_kwargs.items() if k != "torch_dtype"}
    if os.path.isdir(root):
        missing = [p for p in ("scheduler/scheduler_config.json", "unet/config.json") if not (Path(root) / p).is_file()]
        if missing:
            raise FileNotFoundError(f"{root}: missing {', '.join(missing)}; a denoiser folder needs unet/ and "
                                    "scheduler/ (the diffusers DDPMPipeline layout written by Denoiser.save_pretrained)")
        index_file = Path(root) / "model_index.json"
        index = json.loads(index_file.read_text()) if index_file.is_file() else {}
    elif os.path.exists(root):
        raise NotADirectoryError(f"{root} is a file; load_denoiser needs a folder or a hub id")
    else:
        hub_kwargs = _hub_files(root, hub_kwargs)
        from_pretrained_kwargs = {**from_pretrained_kwargs, **hub_kwargs}
        try:
            index = DiffusionPipeline.load_config(root, **hub_kwargs)
        except OSError:  # model_index.json is optional; unet/ and scheduler/ are not
            index = {}
    scheduler_config = EDMEulerScheduler.load_config(root, subfolder="scheduler", **hub_kwargs)
    scheduler_cls = getattr(diffusers, str(scheduler_config.get("_class_name")), None)
    if scheduler_cls is None:
        raise InputError(f"{root}: unknown scheduler class {scheduler_config.get('_class_name')!r} in scheduler/")
    net_name = UNet2DModel.load_config(root, subfolder="unet", **hub_kwargs).get("_class_name")
    if net_name not in _NET_CLASSES:
        raise InputError(f"{root}: unet/ holds a {net_name!r}; supported nets: {sorted(_NET_CLASSES)}")
    net = _NET_CLASSES[net_name].from_pretrained(root, subfolder="unet", **from_pretrained_kwargs)
    return denoiser_from_components(net, scheduler_cls.from_config(scheduler_config), c_noise, index.get(_INDEX_KEY))
