r"""LoRA students (peft): a trainable copy of the teacher whose weights stay frozen, with low-rank adapters
``W + (alpha / r) B A`` on its attention projections and convolutions, as diffusers' LoRA training scripts add
them; ``B`` starts at 0, so a LoRA student starts as the teacher.

:func:`add_lora` adapts a denoiser's net in place; :func:`merged_net` is the plain net with the adapters folded
in (what a student pipeline holds, reloadable without peft); :func:`save_lora_weights` writes the adapters alone in
diffusers' LoRA format, which ``StableDiffusionPipeline.load_lora_weights`` loads onto the teacher's pipeline.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

__all__ = ["LORA_TARGETS", "add_lora", "has_lora", "merged_net", "save_lora_weights"]

# attention projections, transformer feed-forwards and ResNet convolutions of diffusers UNets: the layers
# DMD2's SDXL LoRA adapts (diffusers' own text-to-image LoRA script adapts the attention projections alone)
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                "conv2")


def add_lora(net: nn.Module, rank: int, alpha: float | None = None) -> nn.Module:
    """Freeze ``net`` and add rank-``rank`` adapters (scale ``alpha / rank``; ``alpha`` defaults to ``rank``) on
    its :data:`LORA_TARGETS`; only the adapters then require gradients. Returns ``net``."""
    from peft import LoraConfig, inject_adapter_in_model

    net.requires_grad_(False)
    present = sorted({target for target in LORA_TARGETS for name, _ in net.named_modules()
                      if name == target or name.endswith("." + target)})
    if not present:
        raise ValueError(f"method.lora_rank: {type(net).__name__} has none of the layers LoRA adapts ({', '.join(LORA_TARGETS)})")
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=present, init_lora_weights=True)
    inject_adapter_in_model(config, net)
    return net


def has_lora(net: nn.Module) -> bool:
    from peft.tuners.lora import LoraLayer

    return any(isinstance(module, LoraLayer) for module in net.modules())


def merged_net(net: nn.Module) -> nn.Module:
    """A plain copy of a LoRA-adapted diffusers net (same class and config) whose weights are ``W + (alpha/r) B A``:
    the adapted net stays as it is, and only the plain copy is built (no copy of the adapted one)."""
    from peft.tuners.lora import LoraLayer

    with torch.no_grad():
        deltas = {f"{name}.base_layer.weight": module.get_delta_weight(module.active_adapters[0])
                  for name, module in net.named_modules() if isinstance(module, LoraLayer)}
        state = {key.replace(".base_layer.", "."): value + deltas[key] if key in deltas else value
                 for key, value in net.state_dict().items() if ".lora_" not in key}
    plain = type(net).from_config(net.config)
    plain.load_state_dict(state)
    return plain.to(next(net.parameters()).device)


def save_lora_weights(net: nn.Module, directory: str | Path) -> None:
    """The adapters of a LoRA-adapted ``UNet2DConditionModel`` as ``pytorch_lora_weights.safetensors`` (diffusers'
    format: ``pipe.load_lora_weights(directory)`` on the teacher's ``StableDiffusionPipeline``)."""
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    layers = {key: value.detach().to(torch.float32).cpu() for key, value in get_peft_model_state_dict(net).items()}
    config = net.peft_config["default"]  # its alpha, so that the loader scales the adapters as they were trained
    StableDiffusionPipeline.save_lora_weights(str(directory), unet_lora_layers=layers, safe_serialization=True,
                                              unet_lora_adapter_metadata=config.to_dict())
