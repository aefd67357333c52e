"""CI smoke test of every shipped recipe: two training steps with shrunk models, local tiny teachers
standing in for hub ids (class-conditional ones for labelled recipes, a tiny Stable-Diffusion-style folder for
text-to-image ones), and digits / 2-D data standing in for CIFAR-10 and ImageNet folders (so a 1000-class recipe
runs on digits' 10 classes) and captioned digits for caption folders and prompt files."""

from pathlib import Path

import pytest
import yaml

from n2ce_distill.config import load_recipe
from n2ce_distill.trainer import Trainer

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))
SHRINK = [
    "train.max_steps=2", "train.batch_size=8", "train.checkpoint_every=2", "train.sample_every=2", "train.log_every=1",
    "train.mixed_precision=no", "eval.fid_every=0",
]
SMALL_CRITIC = ["critic.channels=[8, 16]", "critic.num_res_blocks=2", "critic.hidden_features=16", "critic.num_layers=2"]


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_trains_two_steps(path, tmp_path, vp_teacher, toy_teacher, vp_cond_teacher, toy_cond_teacher,
                                 sd_teacher, captioned_digits):
    raw = yaml.safe_load(path.read_text())
    toy = raw["data"]["name"] in ("8gaussians", "spirals", "checkerboard")
    if raw["data"].get("labels"):  # a conditional recipe: a conditional stand-in (digits' 10 classes for images)
        vp_teacher, toy_teacher = vp_cond_teacher, toy_cond_teacher
    overrides = list(SHRINK)
    text = raw["data"].get("caption_column") or raw["data"]["name"] == "prompts"
    if text:  # a Stable Diffusion recipe: the tiny SD-style stand-in on captioned digits (or their prompts)
        vp_teacher = sd_teacher
        prompts = tmp_path / "prompts.txt"
        prompts.write_text("the digit one\nthe digit seven\n" * 4)
        root = captioned_digits if raw["data"]["name"] == "image-folder" else prompts
        overrides += [f"data.root={root}", "data.image_size=8", "data.channels=1"]
    if raw["method"]["name"] == "teacher":
        net = ["method.net.hidden_features=16", "method.net.num_layers=2"] if toy else ["method.net.block_out_channels=[8, 16]"]
        overrides += net
    else:
        overrides.append(f"teacher.path={toy_teacher if toy else vp_teacher}")
    if raw["data"]["name"] in ("cifar10", "image-folder") and not text:
        overrides += ["data.name=digits", "data.root=null", "data.image_size=null"]
    if raw["method"]["name"] == "sid":
        overrides += ["method.generator_warmup_images=0", "method.adversarial_warmup_images=8"]
    if raw["method"]["name"] == "dxmi":  # the only method with a critic network of its own
        overrides += [*SMALL_CRITIC, "method.sampler_warmup_images=8"]  # step 0 trains the critic alone, step 1 everything
    recipe = load_recipe(path, overrides)
    final = Trainer(recipe, tmp_path / "run").train()
    assert (final / "model_index.json").is_file()
    assert (tmp_path / "run" / "checkpoint-2").is_dir()
    assert list((tmp_path / "run" / "samples").glob("*.png"))
