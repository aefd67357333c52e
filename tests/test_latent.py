"""Latent, text-conditioned teachers: the VAE space, the prompt encoder, the conditioned denoiser and critic,
captioned data, and every loop trained, exported, reloaded and sampled on a tiny Stable-Diffusion-style folder."""

import json

import pytest
import torch
from diffusers import AutoencoderKL

from n2ce_distill.conditions import PromptConditions, repeat_rows
from n2ce_distill.config import ConfigError, load_recipe
from n2ce_distill.critics import ConvCritic
from n2ce_distill.data import DIGIT_NAMES, ImageFolderDataset, build_dataset, digits
from n2ce_distill.denoisers import load_denoiser
from n2ce_distill.errors import InputError
from n2ce_distill.latent import LatentSpace, PixelSpace, load_text_components
from n2ce_distill.methods import build_method
from n2ce_distill.nets import save_tiny_text_to_image
from n2ce_distill.pipelines import FewStepPipeline
from n2ce_distill.shipped import shipped as shipped_path
from n2ce_distill.trainer import Trainer

SHRINK = ["train.max_steps=2", "train.batch_size=8", "train.checkpoint_every=2", "train.sample_every=2",
          "train.log_every=1", "eval.fid_every=0"]
LOOPS = {
    "dxmi": ["critic.channels=[8, 16]", "critic.num_res_blocks=2", "method.sampler_warmup_images=8"],
    "sid": ["method.adversarial=true", "method.generator_warmup_images=0", "method.adversarial_warmup_images=8"],
    "dmd2": ["method.fake_updates_per_step=1"],
    "dmd2-few-step": ["method.num_steps=2", "method.fake_updates_per_step=1"],
}


def captioned_recipe(recipe_file, teacher, folder, method="sid", **teacher_keys):
    return recipe_file({"method": {"name": method.split("-")[0]},
                        "data": {"name": "image-folder", "root": str(folder), "image_size": 8, "channels": 1,
                                 "caption_column": "text"},
                        "teacher": {"path": str(teacher), **teacher_keys}})


# ------------------------------------------------------------------------------------------------ components

def test_latent_space_scales_the_posterior_mean_and_decodes_back(sd_teacher):
    space, _ = load_text_components(sd_teacher)
    vae = space.vae
    images = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        z = space.encode(images)
        torch.testing.assert_close(z, vae.encode(images).latent_dist.mean * vae.config.scaling_factor)
        torch.testing.assert_close(space.decode(z), vae.decode(z / vae.config.scaling_factor).sample)
    assert space.encoded_shape((1, 8, 8)) == (4, 4, 4) == tuple(z.shape[1:])
    assert torch.equal(space.clamp(z * 10), z * 10)  # latents are not clamped, images are
    assert PixelSpace().clamp(images * 3).abs().max() == 1
    with pytest.raises(InputError, match=r"data.image_size: images of shape \(1, 7, 7\)"):
        space.encoded_shape((1, 7, 7))
    with pytest.raises(InputError, match="3 channels|1 channels"):
        space.encoded_shape((3, 8, 8))


def test_shift_factor_is_applied_both_ways():
    vae = AutoencoderKL(in_channels=1, out_channels=1, latent_channels=4, block_out_channels=(8,), norm_num_groups=4,
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                        scaling_factor=0.5, shift_factor=0.25)
    space, images = LatentSpace(vae), torch.zeros(1, 1, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(space.encode(images), (vae.encode(images).latent_dist.mean - 0.25) * 0.5)
        z = torch.randn(1, 4, 4, 4)
        torch.testing.assert_close(space.decode(z), vae.decode(z / 0.5 + 0.25).sample)


def test_prompt_encoder_pads_to_the_tokenizer_length_and_tells_prompts_apart(sd_teacher):
    _, encoder = load_text_components(sd_teacher)
    e = encoder(["the digit seven", "the digit one", "the digit seven"])
    assert e.shape == (3, encoder.tokenizer.model_max_length, encoder.features) == (3, 16, 32)
    assert torch.equal(e[0], e[2]) and not torch.allclose(e[0], e[1])
    with pytest.raises(TypeError, match="list of strings"):
        encoder("the digit seven")


def test_pixel_folders_have_no_text_components(vp_teacher):
    assert load_text_components(vp_teacher) == (None, None)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_text_denoiser_reads_prompts_and_guides_against_the_empty_prompt(tmp_path, prediction_type):
    path = save_tiny_text_to_image(tmp_path / "t", prediction_type=prediction_type)
    denoiser, (_, encoder) = load_denoiser(path), load_text_components(path)
    assert denoiser.prediction_type == prediction_type and denoiser.text_features == 32
    assert denoiser.num_classes is None and not denoiser.can_guide
    with pytest.raises(ValueError, match="classifier-free guidance is undefined"):
        denoiser.check_guidance(2.0)
    denoiser.set_null_prompt(encoder([""]))
    prompts = encoder(["the digit seven", "the digit one"])
    x, sigma = torch.randn(2, 4, 4, 4), torch.tensor([0.5, 3.0])
    with torch.no_grad():
        conditional, unconditional = denoiser(x, sigma, prompts), denoiser(x, sigma, encoder(["", ""]))
        torch.testing.assert_close(denoiser.guided(x, sigma, prompts, 3.0),
                                   unconditional + 3.0 * (conditional - unconditional), rtol=1e-4, atol=1e-5)
        assert not torch.allclose(denoiser(x, sigma, prompts.flip(0)), conditional)
    with pytest.raises(ValueError, match=r"prompt embeddings \(B, L, 32\), got none"):
        denoiser(x, sigma)
    with pytest.raises(ValueError, match=r"got shape \(2,\)"):
        denoiser(x, sigma, torch.tensor([1, 2]))


def test_prompt_critic_starts_unconditional_and_reads_embeddings():
    critic, plain = ConvCritic(in_channels=4, channels=(8,), num_res_blocks=1, text_features=6), None
    x, e = torch.randn(3, 4, 4, 4), torch.randn(3, 5, 6)
    plain = ConvCritic(in_channels=4, channels=(8,), num_res_blocks=1)
    plain.load_state_dict({k: v for k, v in critic.state_dict().items() if "condition_projection" not in k})
    assert torch.equal(critic(x, class_labels=e), plain(x))  # e_y = 0 at first
    with torch.no_grad():
        critic.condition_projection.weight.normal_()
    assert not torch.allclose(critic(x, class_labels=e), critic(x, class_labels=e.flip(0)))
    with pytest.raises(ValueError, match=r"prompt embeddings \(3, L, 6\), got shape \(3, 5, 7\)"):
        critic(x, class_labels=torch.randn(3, 5, 7))
    with pytest.raises(ValueError, match="classes or on prompts, not both"):
        ConvCritic(in_channels=4, channels=(8,), num_res_blocks=1, text_features=6, num_classes=3)


def test_prompt_conditions_encode_captions_and_sample_every_prompt(sd_teacher):
    _, encoder = load_text_components(sd_teacher)
    conditions = PromptConditions(["a", "b", "c"], encoder)
    torch.testing.assert_close(conditions.encode(torch.tensor([2, 0])), encoder(["c", "a"]))
    torch.testing.assert_close(conditions.sample(4, "cpu"), encoder(["a", "b", "c", "a"]))
    e = torch.randn(2, 3, 4)
    assert torch.equal(repeat_rows(e, 2), torch.cat([e, e])) and repeat_rows(None, 3) is None


# ---------------------------------------------------------------------------------------------------- data

def test_captioned_folder_labels_index_its_sorted_prompts(captioned_digits):
    data = ImageFolderDataset(captioned_digits, 8, channels=1, caption_column="text")
    assert data.prompts == sorted(f"the digit {name}" for name in DIGIT_NAMES) and data.num_classes is None
    reference = digits(labels=True)
    for i in (0, 5, 1000):
        x, label = data[i]
        assert data.prompts[label] == f"the digit {DIGIT_NAMES[reference.y[i]]}"
        assert (x - reference.x[i]).abs().max() <= 1 / 127.5  # the PNGs hold the digits to within a grey level


def write_folder(tmp_path, lines, files=("a.png",)):
    from PIL import Image

    for name in files:
        Image.new("L", (8, 8)).save(tmp_path / name)
    (tmp_path / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path


@pytest.mark.parametrize("lines, message", [
    (['{"file_name": "b.png", "text": "x"}'], r"a\.png has no line in .*metadata\.jsonl \(1 images without captions\)"),
    (['{"file_name": "a.png"}'], r"metadata\.jsonl, line 1: no key 'text'"),
    (['not json'], r"metadata\.jsonl, line 1: not a JSON object"),
    (['{"file_name": "a.png", "text": 3}'], r"metadata\.jsonl, line 1: 'text' is not a string"),
])
def test_bad_caption_metadata_is_a_one_line_error(tmp_path, lines, message):
    with pytest.raises(InputError, match="^data.caption_column: (.*/)?" + message):
        ImageFolderDataset(write_folder(tmp_path, lines), 8, channels=1, caption_column="text")


def test_captions_without_metadata_and_bad_caption_keys(tmp_path, recipe_file, sd_teacher):
    from PIL import Image

    Image.new("L", (8, 8)).save(tmp_path / "a.png")
    with pytest.raises(InputError, match="metadata.jsonl not found"):
        ImageFolderDataset(tmp_path, 8, caption_column="text")
    base = {"method": {"name": "sid"}, "teacher": {"path": str(sd_teacher)}}
    with pytest.raises(ConfigError, match="^data.caption_column: only an image-folder"):
        load_recipe(recipe_file({**base, "data": {"name": "digits", "caption_column": "text"}}))
    with pytest.raises(ConfigError, match="^data.caption_column: captions replace class labels"):
        load_recipe(recipe_file({**base, "data": {"name": "image-folder", "root": str(tmp_path), "labels": True,
                                                   "caption_column": "text"}}))


def test_teacher_and_data_conditioning_must_agree(recipe_file, sd_teacher, vp_teacher, captioned_digits):
    with pytest.raises(InputError, match="^data.caption_column: teacher .* is text-conditioned"):
        build_method(load_recipe(recipe_file({"method": {"name": "sid"}, "data": {"name": "digits"},
                                              "teacher": {"path": str(sd_teacher)}}), SHRINK),
                     build_dataset("digits"))
    captioned = ImageFolderDataset(captioned_digits, 8, channels=1, caption_column="text")
    with pytest.raises(InputError, match="^data.caption_column: teacher .* reads no prompts"):
        build_method(load_recipe(captioned_recipe(recipe_file, vp_teacher, captioned_digits), SHRINK), captioned)
    rgb = ImageFolderDataset(captioned_digits, 8, channels=3, caption_column="text")
    with pytest.raises(InputError, match=r"^data.image_size: images of shape \(3, 8, 8\) do not fit"):
        build_method(load_recipe(captioned_recipe(recipe_file, sd_teacher, captioned_digits), SHRINK), rgb)


# ----------------------------------------------------------------------------------------------------- loops

@pytest.mark.parametrize("loop", LOOPS)
def test_every_loop_trains_exports_and_samples_by_prompt(loop, recipe_file, sd_teacher, captioned_digits, tmp_path):
    path = captioned_recipe(recipe_file, sd_teacher, captioned_digits, loop, guidance_scale=2.0)
    final = Trainer(load_recipe(path, [*SHRINK, *LOOPS[loop]]), tmp_path / "run").train()
    assert {"vae", "text_encoder", "tokenizer", "unet", "few_step"} <= {p.name for p in final.iterdir()}
    pipe = FewStepPipeline.from_pretrained(final)
    # DxMI's sampler is the guided teacher; SiD's and DMD2's generators learn the guided distribution itself
    assert pipe.few_step.config.guidance_scale == (2.0 if loop == "dxmi" else 1.0)
    seed = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    images = pipe(["the digit seven", "the digit one"], generator=seed(), output_type="pt").images
    assert images.shape == (2, 1, 8, 8) and images.abs().max() <= 1
    torch.testing.assert_close(pipe(["the digit seven", "the digit one"], generator=seed(), output_type="pt").images,
                               images)
    guided = pipe(["the digit seven", "the digit one"], guidance_scale=2.0, generator=seed(), output_type="pt").images
    other = pipe(["the digit seven", "the digit one"], negative_prompt="the digit zero", guidance_scale=2.0,
                 generator=seed(), output_type="pt").images
    assert not torch.allclose(other, guided)  # the negative prompt is the guidance's "no prompt"
    unguided = pipe(["the digit seven", "the digit one"], negative_prompt="the digit zero", guidance_scale=1.0,
                    generator=seed(), output_type="pt").images
    torch.testing.assert_close(unguided, pipe(["the digit seven", "the digit one"], guidance_scale=1.0,
                                              generator=seed(), output_type="pt").images)
    assert pipe("the digit two", num_images_per_prompt=3, output_type="latent").images.shape == (3, 4, 4, 4)
    assert len(pipe("the digit two").images) == 1 and pipe("the digit two").images[0].size == (8, 8)


def test_text_pipeline_call_errors(recipe_file, sd_teacher, captioned_digits, tmp_path, vp_teacher):
    path = captioned_recipe(recipe_file, sd_teacher, captioned_digits, "dmd2")
    pipe = FewStepPipeline.from_pretrained(
        Trainer(load_recipe(path, [*SHRINK, "train.max_steps=1", *LOOPS["dmd2"]]), tmp_path / "run").train())
    for kwargs, message in [({}, "^prompt: this student is text-conditioned"),
                            ({"prompt": ["a", "b"], "negative_prompt": ["c"]}, "^negative_prompt: 1 negative prompts for 2"),
                            ({"prompt": "a", "class_labels": [1]}, "^class_labels: this student reads prompts"),
                            ({"prompt": "a", "num_images_per_prompt": 2, "batch_size": 3}, "^batch_size: 3 for 2"),
                            ({"prompt": [3]}, "^prompt: pass a string"),
                            ({"prompt": "a", "output_type": "latents"}, "^output_type: 'latents' is not one of")]:
        with pytest.raises(InputError, match=message):
            pipe(**kwargs)


def test_pixel_students_refuse_prompts_and_latents(tmp_path, vp_teacher):
    from n2ce_distill.fewstep import FewStepSampler
    from n2ce_distill.samplers import few_step_sigmas

    denoiser = load_denoiser(vp_teacher)
    FewStepPipeline.from_sampler(FewStepSampler(denoiser, few_step_sigmas(denoiser, 2))).save_pretrained(tmp_path)
    pipe = FewStepPipeline.from_pretrained(tmp_path)
    with pytest.raises(InputError, match="^prompt: this student reads no prompts"):
        pipe("the digit seven")
    with pytest.raises(InputError, match="a pixel-space student has no latents"):
        pipe(batch_size=1, output_type="latent")
    assert json.loads((tmp_path / "model_index.json").read_text())["vae"] == [None, None]


def test_a_pixel_text_teacher_needs_no_vae(recipe_file, captioned_digits, tmp_path):
    teacher = save_tiny_text_to_image(tmp_path / "pixel", latent=False)
    path = captioned_recipe(recipe_file, teacher, captioned_digits, "sid")
    final = Trainer(load_recipe(path, SHRINK), tmp_path / "run").train()
    pipe = FewStepPipeline.from_pretrained(final)
    assert pipe.vae is None and pipe("the digit one", output_type="pt").images.shape == (1, 1, 8, 8)


@pytest.mark.parametrize("loop", ["dxmi", "sid", "dmd2-few-step"])
def test_prompt_embeddings_reach_every_network(loop, recipe_file, sd_teacher, captioned_digits):
    """Every UNet call of a text loop (teacher, student, fake score) reads, row by row, the embedding of the
    caption of the data row it was drawn for (rows ``i`` and ``i + B`` of a doubled batch: row ``i``'s), or (the
    guided teacher's second half) the empty prompt's; DxMI's critics, which also score subsets of rows, read only
    the batch's embeddings."""
    from diffusers import UNet2DConditionModel

    from test_conditional import plain_update  # the minimal update every loop test uses

    from n2ce_distill.data import infinite_loader

    path = captioned_recipe(recipe_file, sd_teacher, captioned_digits, loop, guidance_scale=2.0)
    recipe = load_recipe(path, [*SHRINK, *LOOPS[loop], "method.sampler_warmup_images=0"] if loop == "dxmi"
                         else [*SHRINK, *LOOPS[loop]])
    data = ImageFolderDataset(captioned_digits, 8, channels=1, caption_column="text")
    torch.manual_seed(0)
    method = build_method(recipe, data)
    seen = []
    teacher = {"teacher": method.frozen["teacher"]} if "teacher" in method.frozen else {}  # DxMI's sampler is its copy
    for owner, module in {**method.nets.read, **teacher}.items():
        for model in module.modules():
            if isinstance(model, (UNet2DConditionModel, ConvCritic)):
                key = "encoder_hidden_states" if isinstance(model, UNet2DConditionModel) else "class_labels"
                model.register_forward_pre_hook(
                    lambda _, args, kwargs, owner=owner, key=key: seen.append((owner, key, kwargs.get(key))),
                    with_kwargs=True)
    x, labels = next(infinite_loader(data, 8))
    condition = method.conditions.encode(labels)
    method.training_step(x, 0, plain_update(method), labels=condition)
    empty = method.conditions.encoder([""])
    same = lambda a, b: (a - b).abs().flatten(1).amax(1) < 1e-5  # noqa: E731  (per row)
    owners = {owner for owner, _, _ in seen}
    assert owners >= {*teacher, *method.nets.read} - {"gan_head"}, owners
    for owner, key, got in seen:
        assert got is not None and got.dim() == 3, owner
        if key == "encoder_hidden_states":
            own = condition.repeat(len(got) // len(condition), 1, 1)  # row i's caption, for every i
            assert len(got) % len(condition) == 0 and (same(got, own) | same(got, empty)).all(), owner
        else:
            matches = (got[:, None] - condition[None]).abs().flatten(2).amax(2) < 1e-5  # (rows, batch rows)
            assert matches.any(1).all(), owner
    if teacher:  # the guided teacher reads the empty prompt too
        assert any(same(got, empty).any() for owner, _, got in seen if owner == "teacher")


@pytest.mark.parametrize("loop", ["dxmi", "sid", "dmd2"])
def test_gradient_checkpointing_changes_memory_not_updates(loop, recipe_file, sd_teacher, captioned_digits, tmp_path):
    """One iteration with and without train.gradient_checkpointing, from the same seed: the same losses and the
    same weights after the update (checkpointing recomputes activations; it must not change what they are)."""
    path = captioned_recipe(recipe_file, sd_teacher, captioned_digits, loop, guidance_scale=2.0)
    runs = []
    for checkpointing in (False, True):
        warmup = ["method.sampler_warmup_images=0"] if loop == "dxmi" else []  # every network updates at step 0
        overrides = [*SHRINK, *LOOPS[loop], *warmup, f"train.gradient_checkpointing={str(checkpointing).lower()}"]
        trainer = Trainer(load_recipe(path, overrides), tmp_path / str(checkpointing))
        output = trainer.iteration()
        weights = {name: torch.cat([p.detach().flatten() for p in net.parameters()])
                   for name, net in trainer.method.nets.read.items()}
        runs.append(({k: float(v) for k, v in output.scalars.items()}, weights))
    (plain_losses, plain_weights), (checkpointed_losses, checkpointed_weights) = runs
    assert plain_losses == pytest.approx(checkpointed_losses, rel=1e-5, abs=1e-6)
    for name in plain_weights:
        torch.testing.assert_close(checkpointed_weights[name], plain_weights[name], rtol=1e-5, atol=1e-6)


@pytest.fixture
def fresh_accelerator():
    """Accelerate keeps one process-wide state: a test that changes its precision starts and ends with a new one."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_frozen_components_are_stored_in_the_training_precision(recipe_file, sd_teacher, captioned_digits, tmp_path,
                                                                fresh_accelerator):
    path = captioned_recipe(recipe_file, sd_teacher, captioned_digits, "sid")
    trainer = Trainer(load_recipe(path, [*SHRINK, "train.mixed_precision=bf16"]), tmp_path / "run")
    assert set(trainer.method.frozen) == {"teacher", "vae", "text_encoder"}
    for name, module in trainer.method.frozen.items():
        assert {p.dtype for p in module.parameters()} == {torch.bfloat16}, name
    for name, module in trainer.method.nets.read.items():
        assert {p.dtype for p in module.parameters()} == {torch.float32}, name
    output = trainer.iteration()
    assert all(torch.isfinite(v) for v in output.scalars.values())


# ------------------------------------------------------------------------------------------------------ LoRA

@pytest.mark.parametrize("loop", ["dxmi", "sid", "dmd2"])
def test_lora_students_train_adapters_alone_and_export_both_ways(loop, recipe_file, sd_teacher, captioned_digits,
                                                                 tmp_path):
    """A LoRA student starts as the teacher, trains its adapters only, exports a self-contained pipeline (adapters
    folded in) that samples as the trained student does, and adapters that diffusers loads onto the teacher's
    StableDiffusionPipeline, giving the student's UNet; a resumed run continues from the adapters."""
    from diffusers import StableDiffusionPipeline

    path = captioned_recipe(recipe_file, sd_teacher, captioned_digits, loop, guidance_scale=2.0)
    warmup = ["method.sampler_warmup_images=0"] if loop == "dxmi" else []
    recipe = load_recipe(path, [*SHRINK, *LOOPS[loop], *warmup, "method.lora_rank=4", "method.lora_alpha=8"])
    trainer = Trainer(recipe, tmp_path / "run")
    student = trainer.method.nets.read[trainer.method.ema_name].denoiser
    teacher = load_denoiser(sd_teacher)
    teacher.set_null_prompt(student.null_prompt)
    x, sigma = torch.randn(2, 4, 4, 4), torch.tensor([0.5, 2.0])
    prompts = trainer.method.conditions.sample(2, "cpu")
    with torch.no_grad():
        torch.testing.assert_close(student(x, sigma, prompts), teacher(x, sigma, prompts))  # B = 0 at first
    frozen = {k: v.clone() for k, v in student.net.state_dict().items() if ".lora_" not in k}
    trainable = {name for name, p in student.net.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in name for name in trainable)
    final = trainer.train()
    after = student.net.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())  # the teacher's weights never move
    assert any(v.abs().max() > 0 for k, v in after.items() if "lora_B" in k)  # the adapters trained (B left 0)
    pipe = FewStepPipeline.from_pretrained(final)
    ema, seed = trainer.ema.ema_model, lambda: torch.Generator().manual_seed(0)  # noqa: E731
    cond = trainer.method.conditions.encoder(["the digit one"])
    expected = trainer.method.space.decode(ema.sample(1, generator=seed(), class_labels=cond)).clamp(-1, 1)
    torch.testing.assert_close(pipe("the digit one", generator=seed(), output_type="pt").images, expected,
                               rtol=1e-4, atol=1e-5)
    sd = StableDiffusionPipeline.from_pretrained(sd_teacher, safety_checker=None, requires_safety_checker=False)
    sd.load_lora_weights(final / "lora")
    t = torch.tensor([500.0])
    with torch.no_grad():
        torch.testing.assert_close(sd.unet(x, t, cond.expand(2, -1, -1)).sample,
                                   pipe.unet(x, t, cond.expand(2, -1, -1)).sample, rtol=1e-4, atol=1e-5)
    resumed = Trainer(load_recipe(path, [*SHRINK, *LOOPS[loop], *warmup, "method.lora_rank=4", "method.lora_alpha=8",
                                         "train.max_steps=3"]), tmp_path / "run", resume="latest")
    assert resumed.step == 2
    resumed_state = resumed.method.nets.read[resumed.method.ema_name].denoiser.net.state_dict()
    assert resumed_state.keys() == after.keys() and all(torch.equal(resumed_state[k], after[k]) for k in after)


def test_lora_alpha_needs_a_rank(recipe_file, sd_teacher, captioned_digits):
    with pytest.raises(ConfigError, match="^method.lora_alpha: set method.lora_rank too"):
        load_recipe(captioned_recipe(recipe_file, sd_teacher, captioned_digits, "sid"), ["method.lora_alpha=4"])


# --------------------------------------------------------------------------- prompt-only data, text teachers, CLI

def test_prompt_data_drives_data_free_sid_and_is_refused_where_images_are_read(recipe_file, sd_teacher, tmp_path):
    from n2ce_distill.data import PromptDataset

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the digit seven\n\nthe digit one\nthe digit seven\n")
    data = PromptDataset(prompts, 8, channels=1)
    assert data.prompts == ["the digit one", "the digit seven"] and len(data) == 3
    assert data[0][0].numel() == 0 and data[0][1] == 1  # no image; the line's prompt index
    section = {"data": {"name": "prompts", "root": str(prompts), "image_size": 8, "channels": 1},
               "teacher": {"path": str(sd_teacher)}}
    final = Trainer(load_recipe(recipe_file({"method": {"name": "sid", "adversarial": False}, **section}),
                                [*SHRINK, "train.batch_size=2"]),
                    tmp_path / "run").train()
    assert FewStepPipeline.from_pretrained(final)("the digit one", output_type="pt").images.shape == (1, 1, 8, 8)
    for method, message in [({"name": "dxmi"}, "method 'dxmi' reads data images$"),
                            ({"name": "sid", "adversarial": True}, r"\(set method.adversarial=false\)"),
                            ({"name": "dmd2"}, r"\(set method.adversarial=false\)")]:
        with pytest.raises(ConfigError, match="^data.name: a prompts data set holds no images.*" + message):
            load_recipe(recipe_file({"method": method, **section}))
    with pytest.raises(ConfigError, match="^data.root: a prompts data set needs"):
        load_recipe(recipe_file({"method": {"name": "sid", "adversarial": False}, "data": {"name": "prompts", "root": str(prompts)},
                                 "teacher": {"path": str(sd_teacher)}}))
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(InputError, match="^data.root: .*empty.txt holds no prompts"):
        PromptDataset(tmp_path / "empty.txt", 8)


def test_text_teacher_trains_on_captions_and_reloads_with_its_text_encoder(recipe_file, captioned_digits, tmp_path):
    path = recipe_file({"method": {"name": "teacher", "net": {"block_out_channels": [8, 16], "label_dropout": 0.5}},
                        "data": {"name": "image-folder", "root": str(captioned_digits), "image_size": 8, "channels": 1,
                                 "caption_column": "text"}})
    trainer = Trainer(load_recipe(path, [*SHRINK, "train.batch_size=200"]), tmp_path / "run")
    seen = []
    trainer.method.nets.read["denoiser"].net.register_forward_pre_hook(
        lambda _, args, kwargs: seen.append(kwargs["encoder_hidden_states"].clone()), with_kwargs=True)
    trainer.iteration()
    empty = trainer.method.conditions.encoder([""])
    dropped = ((seen[0] - empty).abs().flatten(1).amax(1) < 1e-6).float().mean()
    assert 0.35 < dropped < 0.65  # label_dropout 0.5 of 200 captions became the empty prompt
    final = trainer.train()
    teacher = load_denoiser(final)
    _, encoder = load_text_components(final)
    assert teacher.text_features == 32 and encoder is not None
    torch.testing.assert_close(encoder(["the digit one"]), trainer.method.conditions.encoder(["the digit one"]))
    # the teacher then distils like any text-conditioned teacher, with guidance against its empty prompt
    student = captioned_recipe(recipe_file, final, captioned_digits, "dmd2", guidance_scale=2.0)
    Trainer(load_recipe(student, [*SHRINK, *LOOPS["dmd2"]]), tmp_path / "student").train()


def test_a_pooled_prompt_reaches_a_text_teacher_block_without_cross_attention(recipe_file, tmp_path):
    """``method.net.pooled_prompt`` adds the attention-pooled prompt to the time embedding, so the first down block
    (no cross-attention) reads the prompt: in the shipped teacher it tells "one" from "seven" by over 1% of its
    feature scale, and without the key the same block gives both prompts the same features. The key needs captions."""
    from n2ce_distill.nets import tiny_text_unet

    def first_block_features(unet, encoder):
        seen = []
        unet.down_blocks[0].register_forward_hook(lambda _, __, output: seen.append(output[0]))
        with torch.no_grad():
            unet(torch.zeros(2, 1, 8, 8), 500, encoder_hidden_states=encoder(["the digit one", "the digit seven"]))
        return seen[0]

    shipped = shipped_path("assets", "digits-text-teacher")
    _, encoder = load_text_components(shipped)
    pooled = first_block_features(load_denoiser(shipped).net, encoder)
    assert (pooled[0] - pooled[1]).abs().max() > 0.01 * pooled.abs().max()
    torch.manual_seed(0)
    plain = first_block_features(tiny_text_unet(8, 1, (32, 64), 32, outer_attention=False), encoder)
    assert torch.equal(plain[0], plain[1])
    recipe = recipe_file({"method": {"name": "teacher", "net": {"pooled_prompt": True}}, "data": {"name": "digits"}})
    with pytest.raises(InputError, match=r"^method.net.pooled_prompt: .*\(set data.caption_column\)$"):
        Trainer(load_recipe(recipe, SHRINK), tmp_path / "uncaptioned")
    assert not (tmp_path / "uncaptioned").exists()  # refused before the output folder is made


def test_cli_samples_and_scores_text_sources_by_prompt(recipe_file, sd_teacher, captioned_digits, tmp_path, capsys):
    from n2ce_distill.cli import main

    path = captioned_recipe(recipe_file, sd_teacher, captioned_digits, "dmd2")
    Trainer(load_recipe(path, [*SHRINK, *LOOPS["dmd2"]]), tmp_path / "run").train()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the digit one\nthe digit seven\nthe digit two\n")
    assert main(["sample", str(tmp_path / "run"), "--prompts", str(prompts), "--num-samples", "5",
                 "--out", str(tmp_path / "s")]) == 0
    assert json.loads((tmp_path / "s" / "labels.json").read_text()) == [0, 1, 2, 0, 1]
    assert len(list((tmp_path / "s" / "images").glob("*.png"))) == 5
    assert main(["sample", f"{sd_teacher}@4", "--prompts", str(prompts), "--guidance-scale", "2", "--num-samples", "3",
                 "--out", str(tmp_path / "t")]) == 0
    assert main(["fid", str(tmp_path / "run"), "--ref", "digits", "--prompts", str(prompts), "--num-samples", "20",
                 "--out", str(tmp_path / "f")]) == 0
    assert "run" in capsys.readouterr().out
    assert main(["sample", str(tmp_path / "run"), "--num-samples", "2", "--out", str(tmp_path / "x")]) == 2
    assert "--prompts: this source is text-conditioned" in capsys.readouterr().err


def test_a_cached_hub_id_loads_its_text_components_from_the_cache_alone(sd_teacher, tmp_path):
    """A hub id already in the local Hugging Face cache loads without reaching the hub (local files only)."""
    import shutil

    revision = "0" * 40
    repo = tmp_path / "hub" / "models--tiny--sd"
    shutil.copytree(sd_teacher, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    denoiser = load_denoiser("tiny/sd", cache_dir=str(tmp_path / "hub"))
    space, encoder = load_text_components("tiny/sd", cache_dir=str(tmp_path / "hub"))
    assert denoiser.text_features == 32 and isinstance(space, LatentSpace) and encoder.features == 32
