"""Students as diffusers pipelines, and sample sources for evaluation.

:class:`FewStepPipeline` holds three components: ``unet`` (the distilled network), ``scheduler`` (the
teacher's scheduler, which fixes the parameterisation: ``DDPMScheduler`` = VP epsilon,
``EDMEulerScheduler`` = EDM) and ``few_step`` (:class:`FewStepScheduler`: the T+1 noise levels and
learned noise scales); a student of a latent, text-conditioned teacher also holds the teacher's ``vae``,
``text_encoder`` and ``tokenizer``. It is called like ``DDPMPipeline`` (``pipe(batch_size=4)``), for a
class-conditional student like ``DiTPipeline`` (``pipe(class_labels=[3, 7])``), and for a text-conditioned one like
``StableDiffusionPipeline`` (``pipe("a photo of a cat", negative_prompt="blurry")``); a one-step SiD generator is
the case ``sigmas = [sigma_init, 0]``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, SchedulerMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config

from .data import balanced_labels, check_labels
from .denoisers import denoiser_from_components, load_denoiser
from .errors import InputError
from .fewstep import FewStepSampler
from .latent import LatentSpace, PixelSpace, PromptEncoder, clamp_images, load_text_components
from .lora import has_lora, merged_net
from .samplers import teacher_sample

__all__ = ["FewStepPipeline", "FewStepScheduler", "SampleSource", "load_sample_source"]

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
CUSTOM_PIPELINE_FILE = (
    "# Lets diffusers load this folder: DiffusionPipeline.from_pretrained(DIR, custom_pipeline=DIR,\n"
    "# trust_remote_code=True). The pipeline is n2ce-distill's (pip install n2ce-distill).\n"
    "from n2ce_distill.pipelines import FewStepPipeline  # noqa: F401\n"
)


class FewStepScheduler(SchedulerMixin, ConfigMixin):
    """The few-step schedule: ``sigmas`` (T+1, ending at 0), per-step noise ``noise_scales`` (T), the ``eta``
    that fixed the step means (see :class:`~n2ce_distill.fewstep.FewStepSampler`) or ``renoise`` (each step
    noises its denoised sample afresh, as DMD2 samples), and for a class-conditional student the
    ``guidance_scale`` it was distilled with and its net's ``null_class`` (guidance needs it)."""

    config_name = "scheduler_config.json"

    @register_to_config
    def __init__(
        self, sigmas: list[float] = (2.5, 0.0), noise_scales: list[float] = (0.0,), c_noise: str = "edm", eta: float = 1.0,
        guidance_scale: float = 1.0, null_class: int | None = None, renoise: bool = False,
    ):
        if len(noise_scales) != len(sigmas) - 1:
            raise ValueError(f"noise_scales: expected {len(sigmas) - 1} values for {len(sigmas)} sigmas")


class FewStepPipeline(DiffusionPipeline):
    """T-step (or one-step) sampler exported from DxMI, SiD or DMD2 training."""

    _optional_components = ["vae", "text_encoder", "tokenizer"]  # a latent, text-conditioned student's

    def __init__(self, unet, scheduler, few_step: FewStepScheduler, vae=None, text_encoder=None, tokenizer=None):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, few_step=few_step, vae=vae, text_encoder=text_encoder,
                              tokenizer=tokenizer)

    @classmethod
    def from_sampler(cls, sampler: FewStepSampler, space: PixelSpace | LatentSpace | None = None,
                     prompt_encoder: PromptEncoder | None = None) -> "FewStepPipeline":
        """The pipeline of a trained sampler, with the teacher's VAE (``space``, a latent teacher's) and text
        encoder (``prompt_encoder``, a text-conditioned teacher's)."""
        denoiser = sampler.denoiser
        few_step = FewStepScheduler(
            sigmas=sampler.sigmas.tolist(), noise_scales=sampler.scales().tolist(),
            c_noise=getattr(denoiser, "c_noise", "edm"), eta=sampler.eta, guidance_scale=sampler.guidance_scale,
            null_class=denoiser.null_class, renoise=sampler.renoise,
        )
        text = {} if prompt_encoder is None else {"text_encoder": prompt_encoder.text_encoder,
                                                   "tokenizer": prompt_encoder.tokenizer}
        vae = space.vae if isinstance(space, LatentSpace) else None
        net = merged_net(denoiser.net) if has_lora(denoiser.net) else denoiser.net
        return cls(unet=net, scheduler=denoiser.to_scheduler(), few_step=few_step, vae=vae, **text)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """diffusers' save, plus a one-line ``pipeline.py`` so that diffusers' own loader finds this class:
        ``DiffusionPipeline.from_pretrained(DIR, custom_pipeline=DIR, trust_remote_code=True)`` (with
        n2ce-distill installed; the file only imports it)."""
        super().save_pretrained(save_directory, *args, **kwargs)
        (Path(save_directory) / "pipeline.py").write_text(CUSTOM_PIPELINE_FILE)

    @property
    def space(self) -> PixelSpace | LatentSpace:
        """Where the student samples: the VAE's latents, or pixels."""
        return PixelSpace() if getattr(self, "vae", None) is None else LatentSpace(self.vae)

    @property
    def prompt_encoder(self) -> PromptEncoder | None:
        """The text encoder of a text-conditioned student (``None`` for the others)."""
        if getattr(self, "text_encoder", None) is None:
            return None
        return PromptEncoder(self.tokenizer, self.text_encoder)

    def sampler(self, guidance_scale: float | None = None, negative_prompt: str | list[str] = "") -> FewStepSampler:
        """The student as a :class:`FewStepSampler`; ``guidance_scale`` replaces the one it was distilled with, and
        ``negative_prompt`` (one, or one per sample) is a text-conditioned student's "no prompt" under guidance
        (the empty prompt by default, as it was distilled)."""
        config = self.few_step.config
        denoiser = denoiser_from_components(self.unet, self.scheduler, c_noise=config.c_noise,
                                            settings={"null_class": config.null_class})
        if (encoder := self.prompt_encoder) is not None:
            negatives = [negative_prompt] if isinstance(negative_prompt, str) else list(negative_prompt)
            denoiser.set_null_prompt(encoder(negatives))
        *learned, last = config.noise_scales
        scale = config.guidance_scale if guidance_scale is None else guidance_scale
        sampler = FewStepSampler(denoiser, torch.tensor(config.sigmas), last_scale=last, eta=config.eta,
                                 guidance_scale=scale, renoise=config.renoise)
        with torch.no_grad():
            sampler.log_scales[:-1].copy_(torch.tensor(learned).log())
        return sampler.to(self.device)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        batch_size: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_inference_steps: int | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        class_labels: list[int] | torch.Tensor | None = None,
        guidance_scale: float | None = None,
    ):
        """Sample like ``DDPMPipeline``: ``generator`` may be one generator or one per sample (as diffusers'
        ``randn_tensor``); ``num_inference_steps`` is the student's T or omitted (a distilled student has
        exactly its T steps); ``output_type`` is ``"pil"``, ``"np"``, ``"pt"`` or, for a latent student,
        ``"latent"``. A class-conditional student needs ``class_labels`` (one per sample, like ``DiTPipeline``;
        ``batch_size`` defaults to their number); a text-conditioned one needs ``prompt`` (one, or a list; each
        drawn ``num_images_per_prompt`` times, like ``StableDiffusionPipeline``) and reads ``negative_prompt`` (one,
        or one per prompt) as the "no prompt" of guidance. Both sample with the ``guidance_scale`` they were
        distilled with unless given one."""
        if output_type not in OUTPUT_TYPES or (output_type == "latent" and getattr(self, "vae", None) is None):
            raise InputError(f"output_type: {output_type!r} is not one of {', '.join(OUTPUT_TYPES[:3])}"
                             + (" (a pixel-space student has no latents)" if output_type == "latent" else ""))
        encoder = self.prompt_encoder
        if encoder is None:
            if prompt is not None or negative_prompt is not None:
                raise InputError("prompt: this student reads no prompts; leave prompt and negative_prompt out")
            sampler = self.sampler(guidance_scale)
            batch_size, condition = _batch_labels(batch_size, class_labels, sampler.num_classes, sampler.sigmas.device)
        else:
            if class_labels is not None:
                raise InputError("class_labels: this student reads prompts; pass prompt instead")
            prompts, negatives = _prompts(prompt, negative_prompt, num_images_per_prompt, batch_size)
            sampler, condition, batch_size = self.sampler(guidance_scale, negatives), encoder(prompts), len(prompts)
        if num_inference_steps is not None and num_inference_steps != sampler.num_steps:
            raise InputError(f"num_inference_steps: this student was distilled to {sampler.num_steps} steps and "
                             f"samples with exactly those, got {num_inference_steps}")
        noise = None
        if isinstance(generator, list):
            if len(generator) != batch_size:
                raise InputError(f"generator: a list of {len(generator)} generators for batch_size {batch_size}")
            device, generators, generator = sampler.sigmas.device, generator, None
            noise = lambda shape: torch.cat([  # noqa: E731  (each sample from its own generator)
                torch.randn((1, *shape[1:]), generator=g, device=g.device).to(device) for g in generators])
        samples = sampler.sample(batch_size, generator=generator, noise=noise, class_labels=condition)
        if output_type == "latent":
            images = samples
        elif (samples := clamp_images(self.space.decode(samples))).dim() != 4:  # 2-D points: only tensors make sense
            if output_type == "pil":
                raise InputError("output_type: 'pil' needs image samples; use 'pt' or 'np' for vector data")
            images = samples.cpu().numpy() if output_type == "np" else samples
        elif output_type == "pt":
            images = samples
        else:
            images = (samples / 2 + 0.5).cpu().permute(0, 2, 3, 1).numpy()
            if output_type == "pil":
                images = self.numpy_to_pil(images)
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)


def _prompts(prompt, negative_prompt, per_prompt: int, batch_size: int | None) -> tuple[list[str], list[str]]:
    """The prompts and negative prompts of a text-conditioned pipeline call, one of each per sample."""
    if prompt is None:
        raise InputError("prompt: this student is text-conditioned; pass a prompt or a list of prompts")
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    negatives = [negative_prompt or ""] * len(prompts) if negative_prompt is None or isinstance(negative_prompt, str) \
        else list(negative_prompt)
    if not prompts or not all(isinstance(p, str) for p in [*prompts, *negatives]):
        raise InputError("prompt: pass a string or a non-empty list of strings (and the same for negative_prompt)")
    if len(negatives) != len(prompts):
        raise InputError(f"negative_prompt: {len(negatives)} negative prompts for {len(prompts)} prompts")
    if per_prompt < 1:
        raise InputError(f"num_images_per_prompt: must be at least 1, got {per_prompt}")
    prompts, negatives = ([p for p in group for _ in range(per_prompt)] for group in (prompts, negatives))
    if batch_size is not None and batch_size != len(prompts):
        raise InputError(f"batch_size: {batch_size} for {len(prompts)} prompts x images; leave batch_size out")
    return prompts, negatives


def _batch_labels(batch_size: int | None, class_labels, num_classes: int | None, device) -> tuple[int, torch.Tensor | None]:
    """The batch size and the labels tensor of a pipeline call, checked against the student's classes."""
    if class_labels is None:
        if num_classes is not None:
            raise InputError(f"class_labels: this student is class-conditional ({num_classes} classes); pass one "
                             "label per sample")
        return (1 if batch_size is None else batch_size), None
    if num_classes is None:
        raise InputError("class_labels: this student is unconditional; leave class_labels out")
    labels = check_labels(torch.as_tensor(class_labels, dtype=torch.long).reshape(-1), num_classes, "class_labels")
    if batch_size is not None and batch_size != len(labels):
        raise InputError(f"class_labels: {len(labels)} labels for batch_size {batch_size}")
    return len(labels), labels.to(device)


class SampleSource:
    """``source(batch_size, generator, class_labels=None)`` -> samples in data space ([-1, 1] for images), without
    gradients. ``sample_shape`` is one sample's shape, known without sampling (a 1000-step teacher takes seconds
    per draw); ``num_classes`` is the source's number of classes (``None``: unconditional). A conditional source
    draws ``class_labels`` when given, else :meth:`labels`: the fixed ``labels`` it was made with, cycled, or
    every class equally often. A prompted source (``num_prompts``, no classes) labels each sample with the index
    of its prompt, the prompts cycled."""

    def __init__(self, draw: Callable[..., torch.Tensor], sample_shape, num_classes: int | None,
                 labels: list[int] | None = None, num_prompts: int | None = None):
        if labels is not None:
            if num_classes is None:
                raise InputError("--class-labels: this source is unconditional")
            check_labels(torch.tensor(labels, dtype=torch.long), num_classes, "--class-labels")
        self._draw, self.sample_shape, self.num_classes = draw, tuple(sample_shape), num_classes
        self.fixed_labels, self.num_prompts = labels, num_prompts

    def labels(self, n: int) -> torch.Tensor | None:
        """The labels of ``n`` samples drawn without ``class_labels``."""
        if self.num_prompts is not None:
            return balanced_labels(n, self.num_prompts)
        if self.num_classes is None:
            return None
        if self.fixed_labels is not None:
            return torch.tensor(self.fixed_labels).repeat(-(-n // len(self.fixed_labels)))[:n]
        return balanced_labels(n, self.num_classes)

    @torch.no_grad()
    def __call__(self, n: int, generator: torch.Generator | None = None, class_labels: torch.Tensor | None = None):
        labels = self.labels(n) if class_labels is None else torch.as_tensor(class_labels)
        return clamp_images(self._draw(n, generator, labels))


def load_sample_source(
    path: str | Path, steps: int | None = None, method: str = "ancestral", spacing: str | None = None,
    device: str = "cpu", class_labels: list[int] | None = None, guidance_scale: float | None = None,
    prompts: list[str] | None = None,
) -> SampleSource:
    """The :class:`SampleSource` of an exported pipeline or, with ``steps``, of a teacher (``method`` and
    ``spacing`` as in :func:`~n2ce_distill.samplers.teacher_sample`). ``class_labels``: the labels a conditional
    source cycles through (default: every class equally often); ``prompts``: what a text-conditioned student is
    prompted with, cycled (its labels index them); ``guidance_scale``: classifier-free guidance (default: none for
    a teacher, the distilled one for a student)."""
    path = Path(path)
    index = path / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(f"{path}: not a pipeline folder (no model_index.json)")
    if steps is None and '"FewStepPipeline"' in index.read_text():
        pipe = FewStepPipeline.from_pretrained(str(path)).to(device)
        if pipe.prompt_encoder is not None:
            sampler = pipe.sampler(guidance_scale)
            draw = lambda n, g, condition: sampler.sample(n, generator=g, class_labels=condition)  # noqa: E731
            return _prompted_source(draw, sampler.denoiser.sample_shape, pipe.space, pipe.prompt_encoder, prompts,
                                    class_labels)
        if prompts is not None:
            raise InputError(f"--prompts: {path} reads no prompts; leave --prompts out")
        sampler = pipe.sampler(guidance_scale)
        draw = lambda n, g, labels: sampler.sample(n, generator=g, class_labels=_on(labels, device))  # noqa: E731
        return SampleSource(draw, sampler.denoiser.sample_shape, sampler.num_classes, class_labels)
    if steps is None:
        raise InputError(f"{path}: a teacher needs a number of sampling steps (PATH@STEPS)")
    denoiser = load_denoiser(str(path)).to(device).eval()
    space, encoder = load_text_components(str(path)) if denoiser.text_features is not None else (None, None)
    if encoder is not None:  # its empty prompt is the "no prompt" of guidance
        denoiser.set_null_prompt(encoder.to(device)([""]))
    scale = 1.0 if guidance_scale is None else guidance_scale
    denoiser.check_guidance(scale, "--guidance-scale", str(path))
    draw = lambda n, g, labels: teacher_sample(  # noqa: E731
        denoiser, n, steps=steps, method=method, spacing=spacing, generator=g, class_labels=_on(labels, device),
        guidance_scale=scale)
    if encoder is not None:
        space = PixelSpace() if space is None else space.to(device)
        return _prompted_source(draw, denoiser.sample_shape, space, encoder, prompts, class_labels)
    if prompts is not None:
        raise InputError(f"--prompts: {path} reads no prompts; leave --prompts out")
    return SampleSource(draw, denoiser.sample_shape, denoiser.num_classes, class_labels)


def _prompted_source(draw_samples: Callable, sample_shape, space, encoder: PromptEncoder, prompts: list[str] | None,
                     class_labels) -> SampleSource:
    """A text-conditioned sampler's (``draw_samples(n, generator, prompt embeddings)``) images, decoded from its
    latents where it has them, each for its label's prompt."""
    if not prompts:
        raise InputError("--prompts: this source is text-conditioned; pass a file with one prompt per line")
    if class_labels is not None:
        raise InputError("--class-labels: this source reads prompts; use --prompts")

    def draw(n: int, generator, labels: torch.Tensor) -> torch.Tensor:
        return space.decode(draw_samples(n, generator, encoder([prompts[i] for i in labels.tolist()])))

    return SampleSource(draw, space.decoded_shape(sample_shape), None, num_prompts=len(prompts))


def _on(labels: torch.Tensor | None, device) -> torch.Tensor | None:
    return None if labels is None else labels.to(device)
