"""Critic networks: a scalar logit ``l(x) ~ log r(x) = log p_data(x) / q(x)`` per sample.

Both critics are diffusers ``ModelMixin`` + ``ConfigMixin`` models, so ``save_pretrained`` /
``from_pretrained`` round-trip them as ``config.json`` + ``diffusion_pytorch_model.safetensors``.
``forward(x, cond=None)`` returns logits of shape ``(B,)``. With ``conditioned=True`` the critic
also reads ``cond``, a float tensor ``(B,)`` (a noise level sigma or a sampler step index), through
:class:`ConditionEmbedding`, shared by both networks. With ``num_classes=K`` the critic is class-conditional
in the projection style (Miyato and Koyama 2018): ``l(x, y) = w^T phi(x) + e_y^T phi(x)`` with a learned
class embedding ``e_y`` and the features ``phi`` the unconditional read-out sees; ``forward(x, cond,
class_labels)`` then needs labels ``(B,)``. With ``text_features=D`` it is prompt-conditional the same way, with
``e_y`` a linear map of the prompt embeddings' token mean (``class_labels`` then holds embeddings (B, L, D)).

Critics that live on a score network's encoder (SiDA's and DMD2's) read it through :class:`EncoderFeatures`, the
input of the UNet's mid block captured on each forward; :class:`BottleneckHead` is DMD2's small classifier on it.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from .errors import InputError

if TYPE_CHECKING:
    from .config import CriticConfig

__all__ = ["ConditionEmbedding", "MLPCritic", "ConvCritic", "build_critic", "EncoderFeatures", "BottleneckHead"]

_ACTIVATIONS = {"silu": nn.SiLU, "relu": nn.ReLU, "gelu": nn.GELU, "leaky_relu": lambda: nn.LeakyReLU(0.2)}
_COND_SCALES = ("log", "linear")


def _activation(name: str) -> nn.Module:
    if name not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {name!r}")
    return _ACTIVATIONS[name]()


class ConditionEmbedding(nn.Module):
    """Embed a per-sample scalar ``c`` (B,) into ``out_features`` learned features.

    ``cond_scale="log"`` maps a noise level to ``t = ln(sigma) / 4`` (EDM's ``c_noise``), so the
    whole sigma range (0.002 .. 80) lands in about [-1.6, 1.1]; ``"linear"`` uses ``t = c`` (step
    indices). ``t`` goes through sinusoidal features ``[cos(t f_i), sin(t f_i)]``,
    ``f_i = max_period^(-i / half)``, then a two-layer SiLU MLP. The frequencies are recomputed on
    the fly rather than stored, so checkpoints hold only learned weights.
    """

    def __init__(self, out_features: int, num_frequencies: int = 32, cond_scale: str = "log",
                 max_period: float = 10000.0):
        super().__init__()
        if cond_scale not in _COND_SCALES:
            raise ValueError(f"cond_scale must be one of {_COND_SCALES}, got {cond_scale!r}")
        self.num_frequencies = num_frequencies
        self.cond_scale = cond_scale
        self.max_period = max_period
        self.mlp = nn.Sequential(nn.Linear(2 * num_frequencies, out_features), nn.SiLU(),
                                 nn.Linear(out_features, out_features))

    def forward(self, cond: torch.Tensor, batch_size: int) -> torch.Tensor:
        cond = torch.as_tensor(cond, device=self.mlp[0].weight.device).float()
        if cond.ndim == 0:
            cond = cond.expand(batch_size)
        if cond.shape != (batch_size,):
            raise ValueError(f"cond must have shape ({batch_size},) (one value per sample), got {tuple(cond.shape)}")
        # clamp: sigma = 0 (clean data) must not produce -inf
        t = cond.clamp_min(1e-20).log() / 4 if self.cond_scale == "log" else cond
        freqs = torch.exp(-math.log(self.max_period) / self.num_frequencies
                          * torch.arange(self.num_frequencies, device=t.device, dtype=torch.float32))
        angles = t[:, None] * freqs[None]
        features = torch.cat([angles.cos(), angles.sin()], dim=1)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


def _embed(embedding: ConditionEmbedding | None, cond: torch.Tensor | None, batch_size: int,
           name: str) -> torch.Tensor | None:
    """Validate ``cond`` against the critic's ``conditioned`` flag and embed it."""
    if embedding is None:
        if cond is not None:
            raise ValueError(f"{name} was built with conditioned=False but got cond; "
                             "rebuild it with conditioned=True to use a noise level / step index")
        return None
    if cond is None:
        raise ValueError(f"{name} was built with conditioned=True and needs cond: "
                         "a float tensor (B,) of noise levels sigma or step indices")
    return embedding(cond, batch_size)


def _condition_table(num_classes: int | None, text_features: int | None, width: int) -> nn.Module | None:
    """The projection's condition embeddings ``e_y``, zero at first: a conditional critic starts as the
    unconditional one (and DxMI's correction U at 0) and learns e_y from the features, whose gradient it is. A
    class table for ``num_classes``; for prompt embeddings (B, L, ``text_features``) a linear map of their mean
    over tokens."""
    if num_classes and text_features:
        raise ValueError("a critic is conditioned on classes or on prompts, not both")
    if not (num_classes or text_features):
        return None
    table = nn.Embedding(num_classes, width) if num_classes else nn.Linear(text_features, width, bias=False)
    nn.init.zeros_(table.weight)
    return table


def _projection(table: nn.Module | None, condition: torch.Tensor | None, features: torch.Tensor,
                name: str) -> torch.Tensor:
    """``e_y^T phi`` per sample (0 for an unconditional critic), with the condition checked against the table."""
    if table is None:
        if condition is not None:
            raise ValueError(f"{name} was built unconditional but got a condition")
        return features.new_zeros(features.shape[0])
    if isinstance(table, nn.Embedding):
        if condition is None or condition.shape != (features.shape[0],):
            got = "none" if condition is None else f"shape {tuple(condition.shape)}"
            raise ValueError(f"{name} is class-conditional ({table.num_embeddings} classes): class_labels must have "
                             f"shape ({features.shape[0]},), got {got}")
        return (table(condition).to(features.dtype) * features).sum(dim=1)
    if condition is None or condition.dim() != 3 or condition.shape[::2] != (features.shape[0], table.in_features):
        got = "none" if condition is None else f"shape {tuple(condition.shape)}"
        raise ValueError(f"{name} is prompt-conditional: it needs prompt embeddings ({features.shape[0]}, L, "
                         f"{table.in_features}), got {got}")
    return (table(condition.float().mean(dim=1)).to(features.dtype) * features).sum(dim=1)


class MLPCritic(ModelMixin, ConfigMixin):
    """MLP critic for flat data (toy 2-D sets, latents): ``(B, in_features)`` or ``(B, ...)`` -> ``(B,)``.

    ``num_layers`` hidden layers of width ``hidden_features``, then a linear read-out. When
    conditioned, the condition embedding is added to every hidden pre-activation (not only
    concatenated at the input), so each layer can change its features with the noise level.
    """

    @register_to_config
    def __init__(self, in_features: int, hidden_features: int = 256, num_layers: int = 3,
                 conditioned: bool = False, activation: str = "silu", cond_scale: str = "log",
                 num_frequencies: int = 32, num_classes: int | None = None, text_features: int | None = None):
        super().__init__()
        if in_features < 1 or hidden_features < 1 or num_layers < 1:
            raise ValueError("in_features, hidden_features and num_layers must be positive")
        widths = [in_features] + [hidden_features] * num_layers
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.act = _activation(activation)
        self.out = nn.Linear(hidden_features, 1)
        self.cond_embedding = (ConditionEmbedding(hidden_features, num_frequencies, cond_scale)
                               if conditioned else None)
        self.cond_proj = (nn.ModuleList(nn.Linear(hidden_features, hidden_features) for _ in range(num_layers))
                          if conditioned else None)
        self.condition_projection = _condition_table(num_classes, text_features, hidden_features)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None,
                class_labels: torch.Tensor | None = None) -> torch.Tensor:
        h = x.reshape(x.shape[0], -1)
        if h.shape[1] != self.config.in_features:
            raise ValueError(f"MLPCritic expects {self.config.in_features} features per sample, "
                             f"got input of shape {tuple(x.shape)} ({h.shape[1]} features)")
        emb = _embed(self.cond_embedding, cond, x.shape[0], "MLPCritic")
        for i, layer in enumerate(self.layers):
            h = layer(h)
            if emb is not None:
                h = h + self.cond_proj[i](emb)
            h = self.act(h)
        return self.out(h).squeeze(-1) + _projection(self.condition_projection, class_labels, h, "MLPCritic")


class _ResBlock(nn.Module):
    """Pre-activation residual block (leaky ReLU); the condition enters as a per-channel bias."""

    def __init__(self, in_channels: int, out_channels: int, padding_mode: str, emb_features: int | None):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, padding_mode=padding_mode)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, padding_mode=padding_mode)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()
        self.emb_proj = nn.Linear(emb_features, out_channels) if emb_features else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None) -> torch.Tensor:
        h = self.conv1(F.leaky_relu(x, 0.2))
        if emb is not None:
            h = h + self.emb_proj(emb)[:, :, None, None]
        h = self.conv2(F.leaky_relu(h, 0.2))
        return self.skip(x) + h


class ConvCritic(ModelMixin, ConfigMixin):
    """ResNet energy critic for images (DxMI's shape): ``(B, C, H, W)`` -> ``(B,)``.

    Stem conv -> ``num_res_blocks`` leaky-ReLU residual blocks spread evenly over the stages in
    ``channels`` (default 128 -> 256; 2x average-pool between stages when ``downsample``) ->
    leaky ReLU -> spatial SUM -> linear to 1 -> times a learned scalar ``output_scale``.

    Why a spatial sum rather than a mean: the log-ratio (an energy difference) of images is
    extensive in the number of pixels, a sum of local contributions as in a product of local
    experts, and the KL between two image distributions grows with resolution. A mean would
    squeeze every logit into an O(1) per-location value and force huge read-out weights for the
    large log-ratios that distant distributions need. With the sum, logits scale with area for
    free, and the same weights apply at any resolution.

    Why a learned output scale: the sum makes the logit magnitude grow with area, so the scalar,
    initialised small (``output_scale_init``), starts every critic near ``l = 0`` (ratio 1, a
    balanced classifier) whatever the image size, and lets the optimiser set the overall scale
    of the log-ratio with one parameter instead of moving every weight (with Adam, one parameter
    moves as fast as any other, so the scale adapts quickly).

    ``padding_mode="circular"`` makes the network exactly translation-equivariant on the torus,
    which makes the spatial-sum structure testable (tiling an image multiplies the pre-read-out
    sum by the number of tiles).
    """

    @register_to_config
    def __init__(self, in_channels: int = 3, channels: tuple[int, ...] = (128, 256), num_res_blocks: int = 6,
                 conditioned: bool = False, downsample: bool = True, padding_mode: str = "zeros",
                 output_scale_init: float = 1e-2, cond_scale: str = "log", emb_features: int = 128,
                 num_frequencies: int = 32, num_classes: int | None = None, text_features: int | None = None):
        super().__init__()
        channels = tuple(channels)
        if not channels or num_res_blocks < len(channels):
            raise ValueError("channels must be non-empty and num_res_blocks >= len(channels) (>= 1 block per stage)")
        self.stem = nn.Conv2d(in_channels, channels[0], 3, padding=1, padding_mode=padding_mode)
        per_stage = [num_res_blocks // len(channels) + (i < num_res_blocks % len(channels))
                     for i in range(len(channels))]
        self.blocks = nn.ModuleList()
        self.pool_before: set[int] = set()  # block indices preceded by a 2x downsample (rebuilt from config)
        width = channels[0]
        for stage, (out_width, n_blocks) in enumerate(zip(channels, per_stage)):
            if stage > 0 and downsample:
                self.pool_before.add(len(self.blocks))
            for _ in range(n_blocks):
                self.blocks.append(_ResBlock(width, out_width, padding_mode, emb_features if conditioned else None))
                width = out_width
        self.out = nn.Linear(width, 1)
        # one element, not a scalar: FSDP2 shards no 0-d parameter (checkpoints that hold a scalar still load)
        self.output_scale = nn.Parameter(torch.tensor([float(output_scale_init)]))
        self.register_load_state_dict_pre_hook(_scale_as_vector)
        self.cond_embedding = (ConditionEmbedding(emb_features, num_frequencies, cond_scale)
                               if conditioned else None)
        self.condition_projection = _condition_table(num_classes, text_features, width)

    def features(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """Feature map ``(B, C', H', W')`` that the read-out sums over space."""
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"ConvCritic expects images (B, {self.config.in_channels}, H, W), "
                             f"got shape {tuple(x.shape)}")
        emb = _embed(self.cond_embedding, cond, x.shape[0], "ConvCritic")
        h = self.stem(x)
        for i, block in enumerate(self.blocks):
            if i in self.pool_before:
                h = F.avg_pool2d(h, 2)
            h = block(h, emb)
        return F.leaky_relu(h, 0.2)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None,
                class_labels: torch.Tensor | None = None) -> torch.Tensor:
        summed = self.features(x, cond).sum(dim=(2, 3))
        projection = _projection(self.condition_projection, class_labels, summed, "ConvCritic")
        return self.output_scale * (self.out(summed).squeeze(-1) + projection)

    def _fix_state_dict_keys_on_load(self, state_dict: dict) -> None:
        # diffusers' from_pretrained checks shapes against the meta model before any load_state_dict hook runs;
        # this is its own place for architecture changes (a folder saved with a scalar output_scale)
        super()._fix_state_dict_keys_on_load(state_dict)
        _scale_as_vector(self, state_dict, "")


def build_critic(cfg: CriticConfig, sample_shape: tuple[int, ...], conditioned: bool = False,
                 num_classes: int | None = None, text_features: int | None = None) -> nn.Module:
    """Convolutional ResNet critic for images (and latents), MLP critic for vectors; ``conditioned`` on a step
    index, and conditional (projection) on classes when ``num_classes`` is given, on prompt embeddings when
    ``text_features`` (their width) is."""
    labels = {"num_classes": num_classes, "text_features": text_features}
    if len(sample_shape) == 3:
        return ConvCritic(
            in_channels=sample_shape[0], channels=tuple(cfg.channels), num_res_blocks=cfg.num_res_blocks,
            conditioned=conditioned, cond_scale="linear", **labels,
        )
    return MLPCritic(
        in_features=int(torch.tensor(sample_shape).prod()), hidden_features=cfg.hidden_features,
        num_layers=cfg.num_layers, conditioned=conditioned, cond_scale="linear", **labels,
    )


class EncoderFeatures:
    """The bottleneck of a diffusers-style UNet (the input of its ``mid_block``), captured on every forward pass of
    the net: the features SiDA's critic reads directly and DMD2's :class:`BottleneckHead` classifies. ``key``
    names the recipe switch in the error for a net without a mid block."""

    def __init__(self, unet: nn.Module, key: str):
        mid = getattr(unet, "mid_block", None)
        if mid is None:
            raise InputError(f"{key}: the encoder critic needs a UNet teacher with a mid block (set {key}=false)")
        self._features: torch.Tensor | None = None
        mid.register_forward_pre_hook(self._capture)

    def _capture(self, module: nn.Module, args: tuple) -> None:
        self._features = args[0]

    def read(self) -> torch.Tensor:
        """The features ``(B, C, h, w)`` of the net's latest forward pass."""
        if self._features is None:
            raise RuntimeError("EncoderFeatures.read: the net has not run since the hook was installed")
        return self._features


class BottleneckHead(nn.Module):
    """DMD2's GAN classifier: a few parameters on a score network's bottleneck features ``(B, C, h, w)`` -> one
    logit per sample ``(B,)``. A 3x3 convolution, group norm and SiLU, a spatial mean (any bottleneck size), and a
    linear read-out that starts at 0 (``l = 0``: ratio 1). A plain module: it reads features, never labels (the
    features were computed with them)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm = nn.GroupNorm(math.gcd(32, channels), channels)
        # the read-out starts at 0, so the generator's adversarial term starts from no opinion (a random head's
        # logits would push the generator along a random field before the head has learnt anything)
        self.out = nn.Linear(channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.norm(self.conv(features)))
        return self.out(h.mean(dim=(2, 3))).squeeze(-1)


def _scale_as_vector(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """Load an ``output_scale`` saved as a scalar (before it became one element) into the one-element parameter."""
    key = prefix + "output_scale"
    if key in state_dict and state_dict[key].ndim == 0:
        state_dict[key] = state_dict[key].reshape(1)
