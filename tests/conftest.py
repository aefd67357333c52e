"""Shared fixtures: tiny teachers saved locally in the diffusers layout (nothing comes from a hub)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler

from n2ce_distill.denoisers import EDMDenoiser, VPDenoiser
from n2ce_distill.nets import ToyMLP, tiny_unet

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def vp_teacher(tmp_path_factory) -> Path:
    """An untrained 8x8 DDPM (VP epsilon) teacher: the digits shape."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vp_teacher")
    net = tiny_unet(8, 1, block_out_channels=(8, 16), norm_num_groups=4)
    VPDenoiser(net, DDPMScheduler(num_train_timesteps=1000)).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def vp_cond_teacher(tmp_path_factory) -> Path:
    """An untrained class-conditional 8x8 DDPM teacher: 10 classes (the digits') and a null class, index 10."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vp_cond_teacher")
    net = tiny_unet(8, 1, block_out_channels=(8, 16), norm_num_groups=4, num_class_embeds=11)
    VPDenoiser(net, DDPMScheduler(num_train_timesteps=1000), null_class=10).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def toy_cond_teacher(tmp_path_factory) -> Path:
    """An untrained class-conditional 2-D EDM teacher: the 8 Gaussians' 8 modes and a null class, index 8."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("toy_cond_teacher")
    EDMDenoiser(ToyMLP(dim=2, width=32, depth=2, num_class_embeds=9), null_class=8).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def edm_unet_teacher(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("edm_unet_teacher")
    EDMDenoiser(tiny_unet(8, 1, block_out_channels=(8, 16), norm_num_groups=4)).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def toy_teacher(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("toy_teacher")
    EDMDenoiser(ToyMLP(dim=2, width=32, depth=2)).save_pretrained(path)
    return path


@pytest.fixture
def recipe_file(tmp_path):
    """Write a recipe dict to a YAML file and return its path."""
    import yaml

    def write(recipe: dict, name: str = "recipe.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(recipe))
        return path

    return write


@pytest.fixture
def tiny_method(recipe_file, vp_teacher):
    """Build a method object (class ``cls``, recipe ``method.name`` ``name``) on a tiny untrained teacher (the 8x8 VP
    one by default) at batch 4, with extra dotted overrides; its frozen networks in eval mode, as the trainer sets
    them."""
    from n2ce_distill.config import load_recipe

    def make(cls, name: str, *overrides: str, teacher=vp_teacher, data: str = "digits"):
        path = recipe_file({"method": {"name": name}, "data": {"name": data}, "teacher": {"path": str(teacher)}})
        torch.manual_seed(0)
        method = cls(load_recipe(path, ["train.batch_size=4", *overrides]), (1, 8, 8) if data == "digits" else (2,))
        for module in method.frozen.values():
            module.eval()
        return method

    return make


@pytest.fixture(scope="session")
def sd_teacher(tmp_path_factory) -> Path:
    """An untrained Stable-Diffusion-style folder for 8x8 grayscale images: UNet2DConditionModel on 4x4x4
    latents, AutoencoderKL, CLIP text encoder, a character-level tokenizer and SD-1.5's scheduler config."""
    from n2ce_distill.nets import save_tiny_text_to_image

    return save_tiny_text_to_image(tmp_path_factory.mktemp("sd_teacher"))


@pytest.fixture(scope="session")
def captioned_digits(tmp_path_factory) -> Path:
    """The digits as an image-caption folder (PNGs and metadata.jsonl, "the digit seven")."""
    from n2ce_distill.data import save_captioned_digits

    return save_captioned_digits(tmp_path_factory.mktemp("captioned_digits"))
