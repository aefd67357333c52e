"""Students as diffusers pipelines, and sample sources for evaluation.

:class:`FewStepPipeline` holds three components: ``unet`` (the distilled network), ``scheduler`` (the
teacher's scheduler, which fixes the parameterisation: ``DDPMScheduler`` = VP epsilon,
``EDMEulerScheduler`` = EDM) and ``few_step`` (:class:`FewStepScheduler`: the T+1 noise levels and
learned noise scales). It is called like ``DDPMPipeline``; a one-step SiD generator is the case
``sigmas = [sigma_init, 0]``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, SchedulerMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config

from .denoisers import denoiser_from_components, load_denoiser
from .errors import InputError
from .fewstep import FewStepSampler
from .samplers import teacher_sample

__all__ = ["FewStepPipeline", "FewStepScheduler", "clamp_images", "load_sample_source"]

SampleSource = Callable[[int, torch.Generator], torch.Tensor]
OUTPUT_TYPES = ("pil", "np", "pt")
CUSTOM_PIPELINE_FILE = (
    "# Lets diffusers load this folder: DiffusionPipeline.from_pretrained(DIR, custom_pipeline=DIR,\n"
    "# trust_remote_code=True). The pipeline is n2ce-distill's (pip install n2ce-distill).\n"
    "from n2ce_distill.pipelines import FewStepPipeline  # noqa: F401\n"
)


class FewStepScheduler(SchedulerMixin, ConfigMixin):
    """The few-step schedule: ``sigmas`` (T+1, ending at 0), per-step noise ``noise_scales`` (T) and the
    ``eta`` that fixed the step means (see :class:`~n2ce_distill.fewstep.FewStepSampler`)."""

    config_name = "scheduler_config.json"

    @register_to_config
    def __init__(
        self, sigmas: list[float] = (2.5, 0.0), noise_scales: list[float] = (0.0,), c_noise: str = "edm", eta: float = 1.0
    ):
        if len(noise_scales) != len(sigmas) - 1:
            raise ValueError(f"noise_scales: expected {len(sigmas) - 1} values for {len(sigmas)} sigmas")


class FewStepPipeline(DiffusionPipeline):
    """T-step (or one-step) sampler exported from DxMI or SiD training."""

    def __init__(self, unet, scheduler, few_step: FewStepScheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, few_step=few_step)

    @classmethod
    def from_sampler(cls, sampler: FewStepSampler) -> "FewStepPipeline":
        denoiser = sampler.denoiser
        few_step = FewStepScheduler(
            sigmas=sampler.sigmas.tolist(), noise_scales=sampler.scales().tolist(),
            c_noise=getattr(denoiser, "c_noise", "edm"), eta=sampler.eta,
        )
        return cls(unet=denoiser.net, scheduler=denoiser.to_scheduler(), few_step=few_step)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """diffusers' save, plus a one-line ``pipeline.py`` so that diffusers' own loader finds this class:
        ``DiffusionPipeline.from_pretrained(DIR, custom_pipeline=DIR, trust_remote_code=True)`` (with
        n2ce-distill installed; the file only imports it)."""
        super().save_pretrained(save_directory, *args, **kwargs)
        (Path(save_directory) / "pipeline.py").write_text(CUSTOM_PIPELINE_FILE)

    def sampler(self) -> FewStepSampler:
        denoiser = denoiser_from_components(self.unet, self.scheduler, c_noise=self.few_step.config.c_noise)
        *learned, last = self.few_step.config.noise_scales
        config = self.few_step.config
        sampler = FewStepSampler(denoiser, torch.tensor(config.sigmas), last_scale=last, eta=config.eta)
        with torch.no_grad():
            sampler.log_scales[:-1].copy_(torch.tensor(learned).log())
        return sampler.to(self.device)

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_inference_steps: int | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ):
        """Sample like ``DDPMPipeline``: ``generator`` may be one generator or one per sample (as diffusers'
        ``randn_tensor``); ``num_inference_steps`` is the student's T or omitted (a distilled student has
        exactly its T steps); ``output_type`` is ``"pil"``, ``"np"`` or ``"pt"`` (a pixel-space student has no
        latents to return)."""
        sampler = self.sampler()
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
        samples = clamp_images(sampler.sample(batch_size, generator=generator, noise=noise))
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


def load_sample_source(
    path: str | Path, steps: int | None = None, method: str = "ancestral", spacing: str | None = None, device: str = "cpu"
) -> SampleSource:
    """A ``generate(batch_size, generator)`` callable for an exported pipeline or, with ``steps``, a teacher
    (``method`` and ``spacing`` as in :func:`~n2ce_distill.samplers.teacher_sample`). Its ``sample_shape``
    attribute is the shape of one sample, known without sampling (a 1000-step teacher takes seconds per draw)."""
    path = Path(path)
    index = path / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(f"{path}: not a pipeline folder (no model_index.json)")
    if steps is None and '"FewStepPipeline"' in index.read_text():
        pipe = FewStepPipeline.from_pretrained(str(path)).to(device)
        sampler = pipe.sampler()
        return _with_shape(lambda n, g: clamp_images(sampler.sample(n, generator=g)), sampler.denoiser.sample_shape)
    if steps is None:
        raise InputError(f"{path}: a teacher needs a number of sampling steps (PATH@STEPS)")
    denoiser = load_denoiser(str(path)).to(device).eval()
    return _with_shape(
        lambda n, g: clamp_images(teacher_sample(denoiser, n, steps=steps, method=method, spacing=spacing, generator=g)),
        denoiser.sample_shape,
    )


def _with_shape(generate: SampleSource, sample_shape) -> SampleSource:
    generate = torch.no_grad()(generate)
    generate.sample_shape = tuple(sample_shape)
    return generate


def clamp_images(samples: torch.Tensor) -> torch.Tensor:
    """Images live in [-1, 1]; points (2-D toys) are left as they are."""
    return samples.clamp(-1, 1) if samples.dim() == 4 else samples
