"""Students as diffusers pipelines, and sample sources for evaluation.

:class:`FewStepPipeline` holds three components: ``unet`` (the distilled network), ``scheduler`` (the
teacher's scheduler, which fixes the parameterisation: ``DDPMScheduler`` = VP epsilon,
``EDMEulerScheduler`` = EDM) and ``few_step`` (:class:`FewStepScheduler`: the T+1 noise levels and
learned noise scales). It is called like ``DDPMPipeline`` (and, for a class-conditional student, like
``DiTPipeline``: ``pipe(class_labels=[3, 7])``); a one-step SiD generator is the case ``sigmas = [sigma_init, 0]``.
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
from .samplers import teacher_sample

__all__ = ["FewStepPipeline", "FewStepScheduler", "SampleSource", "clamp_images", "load_sample_source"]

OUTPUT_TYPES = ("pil", "np", "pt")
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

    def __init__(self, unet, scheduler, few_step: FewStepScheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, few_step=few_step)

    @classmethod
    def from_sampler(cls, sampler: FewStepSampler) -> "FewStepPipeline":
        denoiser = sampler.denoiser
        few_step = FewStepScheduler(
            sigmas=sampler.sigmas.tolist(), noise_scales=sampler.scales().tolist(),
            c_noise=getattr(denoiser, "c_noise", "edm"), eta=sampler.eta, guidance_scale=sampler.guidance_scale,
            null_class=denoiser.null_class, renoise=sampler.renoise,
        )
        return cls(unet=denoiser.net, scheduler=denoiser.to_scheduler(), few_step=few_step)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """diffusers' save, plus a one-line ``pipeline.py`` so that diffusers' own loader finds this class:
        ``DiffusionPipeline.from_pretrained(DIR, custom_pipeline=DIR, trust_remote_code=True)`` (with
        n2ce-distill installed; the file only imports it)."""
        super().save_pretrained(save_directory, *args, **kwargs)
        (Path(save_directory) / "pipeline.py").write_text(CUSTOM_PIPELINE_FILE)

    def sampler(self, guidance_scale: float | None = None) -> FewStepSampler:
        """The student as a :class:`FewStepSampler`; ``guidance_scale`` replaces the one it was distilled with."""
        config = self.few_step.config
        denoiser = denoiser_from_components(self.unet, self.scheduler, c_noise=config.c_noise,
                                            settings={"null_class": config.null_class})
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
        exactly its T steps); ``output_type`` is ``"pil"``, ``"np"`` or ``"pt"`` (a pixel-space student has no
        latents to return). A class-conditional student needs ``class_labels`` (one per sample, like
        ``DiTPipeline``; ``batch_size`` defaults to their number) and samples with the ``guidance_scale`` it was
        distilled with unless given one."""
        sampler = self.sampler(guidance_scale)
        batch_size, labels = _batch_labels(batch_size, class_labels, sampler.num_classes, sampler.sigmas.device)
        if num_inference_steps is not None and num_inference_steps != sampler.num_steps:
            raise InputError(f"num_inference_steps: this student was distilled to {sampler.num_steps} steps and "
                             f"samples with exactly those, got {num_inference_steps}")
        if output_type not in OUTPUT_TYPES:
            raise InputError(f"output_type: {output_type!r} is not one of {', '.join(OUTPUT_TYPES)}"
                             + (" (a pixel-space student has no latents)" if output_type == "latent" else ""))
        noise = None
        if isinstance(generator, list):
            if len(generator) != batch_size:
                raise InputError(f"generator: a list of {len(generator)} generators for batch_size {batch_size}")
            device, generators, generator = sampler.sigmas.device, generator, None
            noise = lambda shape: torch.cat([  # noqa: E731  (each sample from its own generator)
                torch.randn((1, *shape[1:]), generator=g, device=g.device).to(device) for g in generators])
        samples = clamp_images(sampler.sample(batch_size, generator=generator, noise=noise, class_labels=labels))
        if samples.dim() != 4:  # 2-D points: only tensors make sense
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
    every class equally often."""

    def __init__(self, draw: Callable[..., torch.Tensor], sample_shape, num_classes: int | None,
                 labels: list[int] | None = None):
        if labels is not None:
            if num_classes is None:
                raise InputError("--class-labels: this source is unconditional")
            check_labels(torch.tensor(labels, dtype=torch.long), num_classes, "--class-labels")
        self._draw, self.sample_shape, self.num_classes = draw, tuple(sample_shape), num_classes
        self.fixed_labels = labels

    def labels(self, n: int) -> torch.Tensor | None:
        """The labels of ``n`` samples drawn without ``class_labels``."""
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
) -> SampleSource:
    """The :class:`SampleSource` of an exported pipeline or, with ``steps``, of a teacher (``method`` and
    ``spacing`` as in :func:`~n2ce_distill.samplers.teacher_sample`). ``class_labels``: the labels a conditional
    source cycles through (default: every class equally often); ``guidance_scale``: classifier-free guidance
    (default: none for a teacher, the distilled one for a student)."""
    path = Path(path)
    index = path / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(f"{path}: not a pipeline folder (no model_index.json)")
    if steps is None and '"FewStepPipeline"' in index.read_text():
        sampler = FewStepPipeline.from_pretrained(str(path)).to(device).sampler(guidance_scale)
        draw = lambda n, g, labels: sampler.sample(n, generator=g, class_labels=_on(labels, device))  # noqa: E731
        return SampleSource(draw, sampler.denoiser.sample_shape, sampler.num_classes, class_labels)
    if steps is None:
        raise InputError(f"{path}: a teacher needs a number of sampling steps (PATH@STEPS)")
    denoiser = load_denoiser(str(path)).to(device).eval()
    scale = 1.0 if guidance_scale is None else guidance_scale
    denoiser.check_guidance(scale, "--guidance-scale", str(path))
    draw = lambda n, g, labels: teacher_sample(  # noqa: E731
        denoiser, n, steps=steps, method=method, spacing=spacing, generator=g, class_labels=_on(labels, device),
        guidance_scale=scale)
    return SampleSource(draw, denoiser.sample_shape, denoiser.num_classes, class_labels)


def _on(labels: torch.Tensor | None, device) -> torch.Tensor | None:
    return None if labels is None else labels.to(device)


def clamp_images(samples: torch.Tensor) -> torch.Tensor:
    """Images live in [-1, 1]; points (2-D toys) are left as they are."""
    return samples.clamp(-1, 1) if samples.dim() == 4 else samples
