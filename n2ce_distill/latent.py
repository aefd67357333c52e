r"""What a latent, text-conditioned teacher (a Stable-Diffusion-style diffusers folder) adds around its
sigma-space denoiser: the space the loops work in and the frozen prompt encoder.

A sample space maps data images to what the denoiser reads and back. :class:`PixelSpace` is the identity (pixel
teachers); :class:`LatentSpace` is a frozen ``AutoencoderKL``, ``z = scaling_factor (E(x) - shift_factor)`` with
``E(x)`` the posterior mean (deterministic, so a data batch always maps to the same latents), and
``x = D_vae(z / scaling_factor + shift_factor)``; the loops see latents only, and images are decoded for grids,
FID and export. :class:`PromptEncoder` is the frozen tokenizer and CLIP text encoder: prompts ->
``encoder_hidden_states`` (B, L, D), padded to the tokenizer's ``model_max_length`` as Stable Diffusion reads them.
:func:`load_text_components` reads both from a folder or hub id (``vae/``, ``text_encoder/``, ``tokenizer/``).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from .errors import InputError

__all__ = ["LatentSpace", "PixelSpace", "PromptEncoder", "clamp_images", "load_text_components"]


def clamp_images(samples: torch.Tensor) -> torch.Tensor:
    """Images live in [-1, 1]; points (2-D toys) are left as they are."""
    return samples.clamp(-1, 1) if samples.dim() == 4 else samples


class PixelSpace:
    """The identity space of pixel teachers: images in [-1, 1] (or 2-D points) are what the denoiser reads."""

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return images

    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        return samples

    def clamp(self, samples: torch.Tensor) -> torch.Tensor:
        """Samples as a critic judges them."""
        return clamp_images(samples)

    def encoded_shape(self, data_shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(data_shape)

    def decoded_shape(self, sample_shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(sample_shape)


class LatentSpace(nn.Module):
    """A frozen diffusers ``AutoencoderKL`` between images in [-1, 1] and the teacher's latents."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae.requires_grad_(False).eval()
        self.scaling_factor = float(vae.config.scaling_factor)
        self.shift_factor = float(vae.config.get("shift_factor") or 0.0)  # SD-1/2 have none, SD-3 and FLUX do

    @property
    def downsampling(self) -> int:
        """Image side / latent side: one 2x downsample per encoder block but the last."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def encoded_shape(self, data_shape: tuple[int, ...]) -> tuple[int, ...]:
        channels, height, width = data_shape
        if channels != self.vae.config.in_channels or height % self.downsampling or width % self.downsampling:
            raise InputError(f"data.image_size: images of shape {tuple(data_shape)} do not fit the teacher's VAE "
                             f"({self.vae.config.in_channels} channels, sides divisible by {self.downsampling})")
        return (self.vae.config.latent_channels, height // self.downsampling, width // self.downsampling)

    def decoded_shape(self, latent_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The images' shape for latents of ``latent_shape``."""
        _, height, width = latent_shape
        return (self.vae.config.out_channels, height * self.downsampling, width * self.downsampling)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        dtype = next(self.vae.parameters()).dtype
        mean = self.vae.encode(images.to(dtype)).latent_dist.mean.float()
        return (mean - self.shift_factor) * self.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in (about) [-1, 1]; differentiable, so a loss may read decoded samples."""
        dtype = next(self.vae.parameters()).dtype
        return self.vae.decode((latents / self.scaling_factor + self.shift_factor).to(dtype)).sample.float()

    def clamp(self, samples: torch.Tensor) -> torch.Tensor:
        return samples  # latents are unbounded: a critic reads them as they are


class PromptEncoder(nn.Module):
    """A frozen tokenizer and text encoder (CLIP's, as Stable Diffusion 1/2): ``encoder(prompts)`` is the
    teacher's ``encoder_hidden_states`` (the last hidden state, B x model_max_length x D)."""

    def __init__(self, tokenizer, text_encoder: nn.Module):
        super().__init__()
        self.tokenizer, self.text_encoder = tokenizer, text_encoder.requires_grad_(False).eval()

    @property
    def features(self) -> int:
        return int(self.text_encoder.config.hidden_size)

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> torch.Tensor:
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"PromptEncoder takes a list of strings, got {type(prompts).__name__}")
        ids = self.tokenizer(list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        device = next(self.text_encoder.parameters()).device
        return self.text_encoder(ids.to(device))[0].float()


def load_text_components(root: str | os.PathLike, **from_pretrained_kwargs) -> tuple[LatentSpace | None, PromptEncoder | None]:
    """The VAE (as a :class:`LatentSpace`) and the :class:`PromptEncoder` of a diffusers folder or hub id, each
    ``None`` where the folder has no such component (a pixel teacher: ``(None, None)``). Weights load from
    safetensors only (no pickle is ever read). ``from_pretrained_kwargs`` go to every loader (``revision``,
    ``local_files_only``, ...)."""
    import warnings

    from .denoisers import _DEPRECATED_HUB_ARGUMENT

    with warnings.catch_warnings():  # the warning diffusers' hub calls raise, which says nothing to our users
        warnings.filterwarnings("ignore", message=_DEPRECATED_HUB_ARGUMENT, category=UserWarning)
        return _load_text_components(str(root), from_pretrained_kwargs)


def _load_text_components(root: str, from_pretrained_kwargs: dict):
    from diffusers import AutoencoderKL, DiffusionPipeline

    if os.path.isdir(root):
        index_file = Path(root) / "model_index.json"
        components = _components(index_file.read_text()) if index_file.is_file() else {}
    else:  # a hub id: the local cache alone when it holds the id (no minute of retries offline)
        from .denoisers import _hub_files

        from_pretrained_kwargs = _hub_files(root, from_pretrained_kwargs)
        try:
            components = _components(DiffusionPipeline.load_config(root, **from_pretrained_kwargs))
        except OSError:
            components = {}
    space = encoder = None
    if "vae" in components:  # a dict: membership reads its keys
        space = LatentSpace(AutoencoderKL.from_pretrained(root, subfolder="vae", use_safetensors=True,
                                                          **from_pretrained_kwargs))
    if {"text_encoder", "tokenizer"} <= components.keys():
        import transformers

        # the classes model_index.json names (SD-1/2: CLIPTokenizer, CLIPTextModel); AutoTokenizer would look for a
        # config.json at the top of the folder, which a diffusers folder has not, and fail offline
        tokenizer_cls = getattr(transformers, components["tokenizer"], transformers.AutoTokenizer)
        encoder_cls = getattr(transformers, components["text_encoder"], transformers.CLIPTextModel)
        tokenizer = tokenizer_cls.from_pretrained(root, subfolder="tokenizer",
                                                  **_without(from_pretrained_kwargs, "torch_dtype"))
        text_encoder = encoder_cls.from_pretrained(root, subfolder="text_encoder", use_safetensors=True,
                                                   **_renamed_dtype(from_pretrained_kwargs))
        encoder = PromptEncoder(tokenizer, text_encoder)
    elif components.keys() & {"text_encoder", "tokenizer"}:
        raise InputError(f"{root}: a text-conditioned folder needs both text_encoder/ and tokenizer/")
    return space, encoder


def _components(index) -> dict[str, str]:
    """Component name -> class name of the components a ``model_index.json`` (text or dict) lists (``[library,
    class]``)."""
    import json

    index = json.loads(index) if isinstance(index, str) else index
    return {name: str(value[-1]) for name, value in index.items()
            if not name.startswith("_") and isinstance(value, list) and value and value[0] is not None}


def _without(kwargs: dict, key: str) -> dict:
    return {k: v for k, v in kwargs.items() if k != key}


def _renamed_dtype(kwargs: dict) -> dict:
    """transformers 5 calls diffusers' ``torch_dtype`` ``dtype``."""
    return _without(kwargs, "torch_dtype") | ({"dtype": kwargs["torch_dtype"]} if "torch_dtype" in kwargs else {})
