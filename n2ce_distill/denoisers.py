r"""One sigma-space denoiser abstraction shared by every loop (SPEC section 4).

All code works on ``D(x; sigma, y) ~ E[x_0 | x]`` for the variance-exploding corruption
``x = x_0 + sigma n`` (``n ~ N(0, I)``, data in [-1, 1], ``sigma_data = 0.5``), so DxMI and SiD share teachers
and samplers regardless of how the network was trained:

* :class:`EDMDenoiser` -- F-prediction (Karras et al. 2022):
  ``D = c_skip x + c_out F(c_in x, c_noise)``, ``c_skip = sd^2/(s^2+sd^2)``, ``c_out = s sd/sqrt(s^2+sd^2)``,
  ``c_in = 1/sqrt(s^2+sd^2)``; ``c_noise = ln(s)/4`` ("edm") or ``1000 * ln(s + 1e-44)/4`` ("cm", the
  convention of diffusers' consistency-model ports such as ``dg845/diffusers-cm_edm_imagenet64_ema``).
* :class:`VPEpsilonDenoiser` -- a DDPM epsilon-network. The VP state ``z_t = sqrt(abar_t) x_0 + sqrt(1-abar_t) n``
  equals ``x / sqrt(1 + s^2)`` with ``s = sigma(t) = sqrt((1 - abar_t)/abar_t)``, hence
  ``D(x; s) = x - s eps(x / sqrt(1 + s^2), t(s))`` with ``t(s)`` interpolated on the discrete schedule.

Teacher training is generic: ``loss = loss_weight(s) * mean ||D(x_0 + s n; s) - x_0||^2`` with
``s ~ sample_training_sigmas``. For EDM that is the EDM loss (``ln s ~ N(-1.2, 1.2^2)``, weight
``(s^2+sd^2)/(s sd)^2``); for VP it is *exactly* DDPM's ``||eps - eps_hat||^2`` (``t ~ U{0..T-1}``, weight
``1/s^2``, because ``D - x_0 = s (n - eps_hat)``).

Saved folders use the diffusers ``DDPMPipeline`` layout (``model_index.json``, ``unet/``, ``scheduler/``):
the scheduler class decides the parameterisation when loading, so hub teachers such as
``google/ddpm-cifar10-32`` and our own checkpoints go through the same :func:`load_denoiser` path.
"""

from __future__ import annotations

import abc
import json
import os
from collections.abc import Callable
from pathlib import Path

import diffusers
import torch
from diffusers import EDMEulerScheduler, UNet2DModel
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from torch import nn

from .nets import ToyMLP

__all__ = ["C_NOISE", "Denoiser", "EDMDenoiser", "VPEpsilonDenoiser", "load_denoiser"]

# Noise-conditioning conventions c_noise(sigma) for EDM-parameterised nets. The CM ports use ln(s + 1e-44) to keep
# the log finite at s = 0; a clamp does the same without fp32 denormals (identical for every s > 1e-20), and at
# s = 0 c_out vanishes so D = x whatever F returns.
C_NOISE: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "edm": lambda s: 0.25 * torch.log(s.clamp_min(1e-20)),
    "cm": lambda s: 1000.0 * 0.25 * torch.log(s.clamp_min(1e-20)),
}

# Classes load_denoiser may instantiate from ``unet/config.json``'s ``_class_name``.
_NET_CLASSES = {"UNet2DModel": UNet2DModel, "ToyMLP": ToyMLP}
# Schedulers that mark an EDM-parameterised net, with their c_noise convention.
_EDM_SCHEDULERS = {"EDMEulerScheduler": "edm", "CMStochasticIterativeScheduler": "cm"}
_INDEX_KEY = "_n2ce_denoiser"  # leading underscore: diffusers pipelines ignore it when loading model_index.json


def _sigma_vector(sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """Sigma as a float32 (B,) tensor on x's device (scalars are broadcast; the preconditioning stays fp32)."""
    s = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1)
    return s.expand(x.shape[0]) if s.numel() == 1 else s


def _per_sample(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape a (B,) tensor to (B, 1, ..., 1) so it broadcasts against x."""
    return v.reshape(-1, *([1] * (x.dim() - 1)))


def _dtype(net: nn.Module) -> torch.dtype:
    return next(net.parameters()).dtype


def _net_sample_shape(net: nn.Module) -> tuple[int, ...]:
    cfg = net.config
    if "dim" in cfg:  # ToyMLP: flat vectors
        return (cfg.dim,)
    size = cfg.get("sample_size")
    if size is None:
        raise ValueError(f"{type(net).__name__} has no sample_size in its config; cannot infer sample_shape")
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return (cfg.in_channels, h, w)


class Denoiser(nn.Module, abc.ABC):
    """Abstract ``D(x; sigma, class_labels) -> x0_hat`` in VE sigma space. ``self.net`` is the wrapped network
    (every weight trainable; SiDA hooks its middle block)."""

    net: nn.Module
    sigma_data: float

    @abc.abstractmethod
    def forward(
        self, x: torch.Tensor, sigma: torch.Tensor | float, class_labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Denoised estimate of x_0 for ``x = x_0 + sigma n``; ``sigma`` (B,) or a scalar."""

    @property
    @abc.abstractmethod
    def sigma_min(self) -> float: ...

    @property
    @abc.abstractmethod
    def sigma_max(self) -> float: ...

    @abc.abstractmethod
    def sample_training_sigmas(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """(n,) noise levels drawn from the teacher's training distribution, on this module's device."""

    @abc.abstractmethod
    def loss_weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """Per-sample weight lambda(sigma) of the x_0-space squared error."""

    @abc.abstractmethod
    def _scheduler(self):
        """The diffusers scheduler written to ``scheduler/`` by :meth:`save_pretrained`."""

    @abc.abstractmethod
    def _settings(self) -> dict:
        """Settings that the scheduler config cannot hold, stored under ``_n2ce_denoiser`` in model_index.json."""

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one sample: (C, H, W) for images, (D,) for flat data."""
        return _net_sample_shape(self.net)

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def denoising_loss(
        self,
        x0: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        sigma: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Per-sample teacher loss ``lambda(s) * mean_dims (D(x0 + s n; s) - x0)^2``, shape (B,).

        ``sigma`` / ``noise`` default to fresh draws (from ``generator``) of the training distribution."""
        if sigma is None:
            sigma = self.sample_training_sigmas(x0.shape[0], generator)
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, device=self._rng_device(generator)).to(x0)
        sigma = _sigma_vector(sigma, x0)
        err = (self(x0 + _per_sample(sigma, x0) * noise, sigma, class_labels) - x0).float().square()
        return self.loss_weight(sigma) * err.flatten(1).mean(1)

    def _rng_device(self, generator: torch.Generator | None) -> torch.device:
        # Draws happen on the generator's device so a CPU generator gives the same numbers on any accelerator.
        return generator.device if generator is not None else self.device

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write ``unet/`` (the net), ``scheduler/`` and ``model_index.json`` so :func:`load_denoiser` (and, for
        VP, diffusers' ``DDPMPipeline.from_pretrained``) can read the folder back."""
        root = Path(save_directory)
        root.mkdir(parents=True, exist_ok=True)
        self.net.save_pretrained(root / "unet")
        scheduler = self._scheduler()
        scheduler.save_pretrained(root / "scheduler")
        index = {
            "_class_name": "DDPMPipeline",
            "_diffusers_version": diffusers.__version__,
            "scheduler": ["diffusers", type(scheduler).__name__],
            "unet": [type(self.net).__module__.split(".")[0], type(self.net).__name__],
            _INDEX_KEY: self._settings(),
        }
        (root / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


class EDMDenoiser(Denoiser):
    """EDM preconditioning around an F-network called as ``net(c_in x, c_noise, class_labels=...).sample``."""

    def __init__(
        self,
        net: nn.Module,
        sigma_data: float = 0.5,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        c_noise: str = "edm",
        p_mean: float = -1.2,
        p_std: float = 1.2,
    ):
        super().__init__()
        if c_noise not in C_NOISE:
            raise ValueError(f"unknown c_noise convention {c_noise!r}; choose from {sorted(C_NOISE)}")
        self.net = net
        self.sigma_data, self._sigma_min, self._sigma_max = float(sigma_data), float(sigma_min), float(sigma_max)
        self.c_noise, self.p_mean, self.p_std = c_noise, float(p_mean), float(p_std)

    @property
    def sigma_min(self) -> float:
        return self._sigma_min

    @property
    def sigma_max(self) -> float:
        return self._sigma_max

    def coefficients(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(c_skip, c_out, c_in, c_noise)`` for a sigma tensor (elementwise)."""
        sd2, s2 = self.sigma_data**2, sigma.square()
        c_skip = sd2 / (s2 + sd2)
        c_out = sigma * self.sigma_data / (s2 + sd2).sqrt()
        c_in = 1 / (s2 + sd2).sqrt()
        return c_skip, c_out, c_in, C_NOISE[self.c_noise](sigma)

    def forward(self, x, sigma, class_labels=None):
        c_skip, c_out, c_in, c_noise = self.coefficients(_sigma_vector(sigma, x))
        f = self.net((_per_sample(c_in, x) * x).to(_dtype(self.net)), c_noise, class_labels=class_labels).sample
        return (_per_sample(c_skip, x) * x + _per_sample(c_out, x) * f.float()).to(x.dtype)

    def sample_training_sigmas(self, n, generator=None):
        z = torch.randn(n, generator=generator, device=self._rng_device(generator))
        return (self.p_mean + self.p_std * z).exp().to(self.device)

    def loss_weight(self, sigma):
        return (sigma.square() + self.sigma_data**2) / (sigma * self.sigma_data).square()

    def _scheduler(self):
        return EDMEulerScheduler(sigma_min=self.sigma_min, sigma_max=self.sigma_max, sigma_data=self.sigma_data)

    def _settings(self):
        return {"kind": "edm", "c_noise": self.c_noise, "p_mean": self.p_mean, "p_std": self.p_std}


class VPEpsilonDenoiser(Denoiser):
    r"""DDPM epsilon-network in sigma space. ``scheduler`` is any diffusers scheduler with ``alphas_cumprod``
    (``DDPMScheduler``, ``DDIMScheduler``, ...) and ``prediction_type == "epsilon"``.

    ``t(s)`` interpolates linearly in ``ln sigma`` between grid points (as k-diffusion does): exact at
    ``sigma(t_i)`` (so the full grid reproduces DDPM bit-for-bit in ``t``), monotone, and smooth in between;
    sigmas outside ``[sigma(0), sigma(T-1)]`` are clamped to the end steps.
    """

    discrete_sigmas: torch.Tensor

    def __init__(self, unet: nn.Module, scheduler, sigma_data: float = 0.5):
        super().__init__()
        prediction = scheduler.config.get("prediction_type", "epsilon")
        if prediction != "epsilon":
            raise ValueError(f"VPEpsilonDenoiser needs an epsilon-prediction scheduler, got prediction_type={prediction!r}")
        self.net, self.scheduler, self.sigma_data = unet, scheduler, float(sigma_data)
        abar = scheduler.alphas_cumprod.to(torch.float64)
        # Non-persistent: the schedule is rebuilt from scheduler/ on load, never stored twice.
        self.register_buffer("discrete_sigmas", ((1 - abar) / abar).sqrt().float(), persistent=False)

    @property
    def num_train_timesteps(self) -> int:
        return self.discrete_sigmas.numel()

    @property
    def sigma_min(self) -> float:
        return float(self.discrete_sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.discrete_sigmas[-1])

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Continuous DDPM timestep: ``t = i + ln(s/s_i)/ln(s_{i+1}/s_i)`` for ``s_i <= s < s_{i+1}``."""
        grid = self.discrete_sigmas
        s = sigma.to(grid).clamp(grid[0], grid[-1])
        i = (torch.searchsorted(grid, s, right=True) - 1).clamp(0, grid.numel() - 2)
        lo, hi = grid[i], grid[i + 1]
        return i + (s.log() - lo.log()) / (hi.log() - lo.log())

    def forward(self, x, sigma, class_labels=None):
        s = _sigma_vector(sigma, x)
        x_vp = x / _per_sample((1 + s.square()).sqrt(), x)
        eps = self.net(x_vp.to(_dtype(self.net)), self.sigma_to_t(s), class_labels=class_labels).sample
        return (x - _per_sample(s, x) * eps.float()).to(x.dtype)

    def sample_training_sigmas(self, n, generator=None):
        t = torch.randint(0, self.num_train_timesteps, (n,), generator=generator, device=self._rng_device(generator))
        return self.discrete_sigmas[t.to(self.device)]

    def loss_weight(self, sigma):
        return 1 / sigma.square()

    def _scheduler(self):
        return self.scheduler

    def _settings(self):
        return {"kind": "vp", "sigma_data": self.sigma_data}


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def load_denoiser(path_or_hub_id: str | os.PathLike, *, c_noise: str | None = None, **from_pretrained_kwargs) -> Denoiser:
    """Build a :class:`Denoiser` from a diffusers folder or hub id with ``unet/`` and ``scheduler/``.

    The scheduler class decides the parameterisation: ``EDMEulerScheduler`` / ``CMStochasticIterativeScheduler``
    -> :class:`EDMDenoiser` (``sigma_data``, ``sigma_min``, ``sigma_max`` from its config; c_noise ``"edm"`` /
    ``"cm"`` unless ``model_index.json`` or ``c_noise=`` says otherwise); any scheduler with ``alphas_cumprod``
    (``DDPMScheduler``, ``DDIMScheduler``, ...) -> :class:`VPEpsilonDenoiser`. The net class (``UNet2DModel`` or
    :class:`ToyMLP`) comes from ``unet/config.json``'s ``_class_name``. ``from_pretrained_kwargs`` (``revision``,
    ``cache_dir``, ``local_files_only``, ``torch_dtype``, ...) go to the diffusers loaders.
    """
    root = str(path_or_hub_id)
    hub_kwargs = {k: v for k, v in from_pretrained_kwargs.items() if k != "torch_dtype"}
    if os.path.isdir(root):
        for piece in ("scheduler/scheduler_config.json", "unet/config.json"):
            if not (Path(root) / piece).is_file():
                raise FileNotFoundError(
                    f"{root}: missing {piece}; a denoiser folder needs unet/ and scheduler/ "
                    "(the diffusers DDPMPipeline layout written by Denoiser.save_pretrained)"
                )
        index = _read_json(Path(root) / "model_index.json")
    elif os.path.exists(root):
        raise NotADirectoryError(f"{root} is a file; load_denoiser needs a folder or a hub id")
    else:
        try:
            index = DiffusionPipeline.load_config(root, **hub_kwargs)
        except OSError:  # model_index.json is optional; unet/ and scheduler/ are not
            index = {}
    scheduler_config = EDMEulerScheduler.load_config(root, subfolder="scheduler", **hub_kwargs)
    net_config = UNet2DModel.load_config(root, subfolder="unet", **hub_kwargs)
    net_name, scheduler_name = net_config.get("_class_name"), scheduler_config.get("_class_name")
    if net_name not in _NET_CLASSES:
        raise ValueError(f"{root}: unet/ holds a {net_name!r}; supported nets: {sorted(_NET_CLASSES)}")
    scheduler_cls = getattr(diffusers, str(scheduler_name), None)
    if scheduler_cls is None:
        raise ValueError(f"{root}: unknown scheduler class {scheduler_name!r} in scheduler/scheduler_config.json")
    net = _NET_CLASSES[net_name].from_pretrained(root, subfolder="unet", **from_pretrained_kwargs)
    settings = index.get(_INDEX_KEY, {})
    if scheduler_name in _EDM_SCHEDULERS:
        return EDMDenoiser(
            net,
            sigma_data=scheduler_config.get("sigma_data", 0.5),
            sigma_min=scheduler_config.get("sigma_min", 0.002),
            sigma_max=scheduler_config.get("sigma_max", 80.0),
            c_noise=c_noise or settings.get("c_noise", _EDM_SCHEDULERS[scheduler_name]),
            p_mean=settings.get("p_mean", -1.2),
            p_std=settings.get("p_std", 1.2),
        )
    scheduler = scheduler_cls.from_config(scheduler_config)
    if not hasattr(scheduler, "alphas_cumprod"):
        raise ValueError(f"{root}: scheduler {scheduler_name} is neither EDM-type nor a discrete VP schedule")
    return VPEpsilonDenoiser(net, scheduler, sigma_data=settings.get("sigma_data", 0.5))
