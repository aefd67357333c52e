"""Small denoising networks with the diffusers call convention ``net(sample, timestep, class_labels).sample``.

* :class:`ToyMLP` -- a residual MLP for 2-D (or any flat ``D``-dim) data. It is a diffusers ``ModelMixin`` +
  ``ConfigMixin`` so ``save_pretrained`` / ``from_pretrained`` work exactly as for ``UNet2DModel`` and
  :func:`n2ce_distill.denoisers.load_denoiser` can rebuild it from ``unet/config.json``.
* :func:`tiny_unet` -- a small ``UNet2DModel`` that runs at 8x8 (digits) and keeps a middle block, whose input
  (the encoder output) SiDA reads as per-position critic logits.

The ``timestep`` argument is whatever the wrapping denoiser feeds: ``c_noise = ln(sigma)/4`` for EDM, a
continuous DDPM step ``t in [0, T-1]`` for VP, so embeddings must accept fractional and negative values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from diffusers import ModelMixin, UNet2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import get_timestep_embedding
from diffusers.utils import BaseOutput
from torch import nn

__all__ = ["ToyMLP", "ToyMLPOutput", "save_text_components", "save_text_to_image", "save_tiny_text_to_image",
           "sd15_scheduler", "tiny_clip", "tiny_text_unet", "tiny_unet"]


@dataclass
class ToyMLPOutput(BaseOutput):
    """Output of :class:`ToyMLP`; ``sample`` has the input's shape ``(B, D)``."""

    sample: torch.Tensor


class ToyMLP(ModelMixin, ConfigMixin):
    r"""Residual MLP ``F(x, t[, y])`` for flat data.

    ``e = MLP(emb(t)) [+ Embed(y)]``; ``h_0 = W_in x``; ``h_{k+1} = h_k + f_k(h_k + e)`` with
    ``f_k = Linear . SiLU . Linear . SiLU``; output ``W_out SiLU(h_depth)``.

    Timestep embeddings (``time_embedding_type``):
      * ``"positional"``: DDPM sinusoids ``[cos(t w_j), sin(t w_j)]``, ``w_j = 10000^{-j/half}``;
      * ``"fourier"``: random Fourier features ``[cos(2 pi t b_j), sin(2 pi t b_j)]``, ``b_j ~ N(0, scale^2)``
        (a fixed buffer saved with the weights), better for the narrow range of EDM's ``ln(sigma)/4``.
    """

    @register_to_config
    def __init__(
        self,
        dim: int = 2,
        width: int = 128,
        depth: int = 3,
        time_embed_dim: int = 64,
        time_embedding_type: str = "positional",
        fourier_scale: float = 16.0,
        num_class_embeds: int | None = None,
    ):
        super().__init__()
        if time_embedding_type not in ("positional", "fourier"):
            raise ValueError(f"time_embedding_type must be 'positional' or 'fourier', got {time_embedding_type!r}")
        if time_embed_dim % 2:
            raise ValueError(f"time_embed_dim must be even, got {time_embed_dim}")
        if time_embedding_type == "fourier":
            self.register_buffer("fourier_freqs", torch.randn(time_embed_dim // 2) * fourier_scale)
        self.time_mlp = nn.Sequential(nn.Linear(time_embed_dim, width), nn.SiLU(), nn.Linear(width, width))
        self.class_embedding = nn.Embedding(num_class_embeds, width) if num_class_embeds else None
        self.in_proj = nn.Linear(dim, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.SiLU(), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width)) for _ in range(depth)
        )
        self.out_proj = nn.Sequential(nn.SiLU(), nn.Linear(width, dim))

    def _embed_time(self, t: torch.Tensor) -> torch.Tensor:
        if self.config.time_embedding_type == "fourier":
            arg = 2 * math.pi * t[:, None] * self.fourier_freqs[None, :]
            return torch.cat([arg.cos(), arg.sin()], dim=-1)
        return get_timestep_embedding(t, self.config.time_embed_dim, flip_sin_to_cos=True, downscale_freq_shift=0)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float,
        class_labels: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> ToyMLPOutput | tuple[torch.Tensor]:
        """``sample`` (B, D); ``timestep`` (B,) or a scalar broadcast to the batch; ``class_labels`` (B,) long."""
        t = torch.as_tensor(timestep, device=sample.device, dtype=torch.float32).reshape(-1)
        t = t.expand(sample.shape[0]) if t.numel() == 1 else t
        emb = self.time_mlp(self._embed_time(t).to(sample.dtype))
        if self.class_embedding is not None:
            if class_labels is None:
                raise ValueError("this ToyMLP is class-conditional: pass class_labels")
            emb = emb + self.class_embedding(class_labels)
        elif class_labels is not None:
            raise ValueError("class_labels given to an unconditional ToyMLP (num_class_embeds=None)")
        h = self.in_proj(sample)
        for block in self.blocks:
            h = h + block(h + emb)
        out = self.out_proj(h)
        return ToyMLPOutput(sample=out) if return_dict else (out,)


def tiny_unet(
    sample_size: int = 8,
    in_channels: int = 1,
    out_channels: int | None = None,
    block_out_channels: tuple[int, ...] = (32, 64),
    layers_per_block: int = 1,
    norm_num_groups: int = 8,
    mid_attention: bool = True,
    num_class_embeds: int | None = None,
    class_embed_type: str | None = None,
) -> UNet2DModel:
    """A small ``UNet2DModel``: plain ResNet down/up blocks, one downsampling per level except the last, and a
    ``UNetMidBlock2D`` (with self-attention if ``mid_attention``) so SiDA can hook the encoder output.

    ``sample_size`` must be divisible by ``2**(len(block_out_channels) - 1)`` (8x8 with two levels -> 4x4 mid).
    Class conditioning: ``num_class_embeds=K`` (learned table, ``class_embed_type=None``) or diffusers'
    ``class_embed_type`` modes ``"timestep"`` / ``"identity"``.
    """
    levels = len(block_out_channels)
    if sample_size % 2 ** (levels - 1):
        raise ValueError(f"sample_size {sample_size} is not divisible by 2**{levels - 1} ({levels} UNet levels)")
    if any(c % norm_num_groups for c in block_out_channels):
        raise ValueError(f"block_out_channels {block_out_channels} must be multiples of norm_num_groups={norm_num_groups}")
    return UNet2DModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=out_channels or in_channels,
        down_block_types=("DownBlock2D",) * levels,
        up_block_types=("UpBlock2D",) * levels,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        norm_num_groups=norm_num_groups,
        attention_head_dim=8,
        add_attention=mid_attention,
        num_class_embeds=num_class_embeds,
        class_embed_type=class_embed_type,
    )


def tiny_clip(text_features: int = 32, max_length: int = 16) -> tuple:
    """A character-level CLIP tokenizer (vocabulary written here: lowercase letters, digits and punctuation, each
    alone and ending a word; no merges) and a randomly initialised 2-layer CLIP text encoder of width
    ``text_features``: the frozen text side of the tiny text-to-image teachers. Returns ``(tokenizer, encoder)``."""
    import json
    import string
    import tempfile
    from pathlib import Path

    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in string.ascii_lowercase + string.digits + "!?.,'-":
        vocab[char], vocab[char + "</w>"] = len(vocab), len(vocab) + 1
    with tempfile.TemporaryDirectory() as scratch:
        (Path(scratch) / "vocab.json").write_text(json.dumps(vocab))
        (Path(scratch) / "merges.txt").write_text("#version: 0.2\n")
        tokenizer = CLIPTokenizer(str(Path(scratch) / "vocab.json"), str(Path(scratch) / "merges.txt"),
                                  model_max_length=max_length, pad_token="<|endoftext|>")
    encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=text_features, intermediate_size=2 * text_features, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=max_length, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    return tokenizer, encoder


def tiny_text_unet(sample_size: int = 8, in_channels: int = 1, block_out_channels: tuple[int, ...] = (16, 32),
                   text_features: int = 32, norm_num_groups: int = 8, outer_attention: bool = True,
                   pooled_prompt: bool = False):
    """A small ``UNet2DConditionModel`` reading prompt embeddings of width ``text_features``: cross-attention in
    its mid block and, with ``outer_attention``, in its first down and last up block (as SD's outermost blocks;
    without it a 32/64-wide net on digits trains 2x faster: 0.48 against 0.98 s per batch of 128 here), one
    downsampling per level but the last. With ``pooled_prompt`` an attention-pooled prompt embedding joins the
    time embedding (``addition_embed_type="text"``), which every residual block reads."""
    from diffusers import UNet2DConditionModel

    levels, outer = len(block_out_channels), ("CrossAttn" if outer_attention else "")
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=in_channels, out_channels=in_channels,
        down_block_types=(f"{outer}DownBlock2D", *("DownBlock2D",) * (levels - 1)),
        up_block_types=(*("UpBlock2D",) * (levels - 1), f"{outer}UpBlock2D"), block_out_channels=tuple(block_out_channels),
        layers_per_block=1, norm_num_groups=norm_num_groups, cross_attention_dim=text_features,
        attention_head_dim=block_out_channels[0] // 4,
        **({"addition_embed_type": "text", "addition_embed_type_num_heads": 4} if pooled_prompt else {}))


def save_text_components(path, tokenizer, text_encoder) -> None:
    """Add ``tokenizer/`` and ``text_encoder/`` to a diffusers folder and list them in its ``model_index.json``."""
    import json
    from pathlib import Path

    path = Path(path)
    tokenizer.save_pretrained(path / "tokenizer")
    text_encoder.save_pretrained(path / "text_encoder")
    index_file = path / "model_index.json"
    index = json.loads(index_file.read_text()) if index_file.is_file() else {}
    index |= {"text_encoder": ["transformers", type(text_encoder).__name__],
              "tokenizer": ["transformers", type(tokenizer).__name__]}
    index_file.write_text(json.dumps(index, indent=2) + "\n")


def save_tiny_text_to_image(
    path,
    image_size: int = 8,
    channels: int = 1,
    prediction_type: str = "epsilon",
    latent: bool = True,
    text_features: int = 32,
    max_length: int = 16,
    seed: int = 0,
):
    """Write a Stable-Diffusion-style folder with tiny random weights (``unet`` a ``UNet2DConditionModel``,
    ``vae`` an ``AutoencoderKL`` with one 2x downsample, or none when ``latent=False``, ``text_encoder`` and
    ``tokenizer`` from :func:`tiny_clip`, ``scheduler`` SD-1.5's ``PNDMScheduler`` config with ``prediction_type``):
    the stand-in that tests and recipe smoke tests use for SD-1.5-class hub ids (no hub is reached). Returns the
    path."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    tokenizer, text_encoder = tiny_clip(text_features, max_length)
    vae = AutoencoderKL(in_channels=channels, out_channels=channels, latent_channels=4, block_out_channels=(8, 16),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=4, sample_size=image_size) if latent else None
    unet = tiny_text_unet(image_size // 2 if latent else image_size, 4 if latent else channels,
                          text_features=text_features)
    return save_text_to_image(path, unet, sd15_scheduler(prediction_type), tokenizer, text_encoder, vae)


def sd15_scheduler(prediction_type: str = "epsilon"):
    """SD-1.5's scheduler config (a ``PNDMScheduler`` on the scaled-linear schedule), with ``prediction_type``."""
    from diffusers import PNDMScheduler

    return PNDMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                         skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False, prediction_type=prediction_type)


def save_text_to_image(path, unet, scheduler, tokenizer, text_encoder, vae=None):
    """Write components as a Stable-Diffusion-style folder (``model_index.json`` listing them; no ``vae/`` for a
    pixel net) that :func:`~n2ce_distill.denoisers.load_denoiser` and diffusers both read. Returns the path."""
    import json
    from pathlib import Path

    import diffusers

    path = Path(path)
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__}
    for name, component in {"unet": unet, "vae": vae, "scheduler": scheduler}.items():
        if component is not None:
            component.save_pretrained(path / name)
            index[name] = ["diffusers", type(component).__name__]
    (path / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    save_text_components(path, tokenizer, text_encoder)
    return path
