"""n2ce_distill: N²CE critics ("noisier" NCE, noise magnified by M) for diffusion distillation.

The objectives are small callables on critic logits ``l = log p_data / q``; everything else
(critics, denoisers, samplers, DxMI, SiD and DMD2 loops, the trainer, FID) builds on them.
"""

import importlib

# name -> module: exports are imported on first use (PEP 562), so ``from n2ce_distill import N2CE`` costs
# torch and nothing else, while the critics, denoisers and pipelines pull in diffusers only when asked for
_EXPORTS = {
    "CD": "objectives", "N2CE": "objectives", "NCE": "objectives", "NWJ": "objectives",
    "build_generator_loss": "objectives", "build_objective": "objectives", "n2ce_loss": "objectives",
    "nce_loss": "objectives",
    "critic_diagnostics": "diagnostics",
    "RatioFit": "estimator", "fit_density_ratio": "estimator",
    "suggest_M": "magnification",
    "MultiStageCritic": "multistage", "multistage_loss": "multistage", "waymark_coefficients": "multistage",
    "waymarks": "multistage",
    "ConvCritic": "critics", "MLPCritic": "critics",
    "Denoiser": "denoisers", "EDMDenoiser": "denoisers", "VPDenoiser": "denoisers", "load_denoiser": "denoisers",
    "FewStepSampler": "fewstep",
    "LatentSpace": "latent", "PromptEncoder": "latent", "load_text_components": "latent",
    "ToyMLP": "nets",
    "FewStepPipeline": "pipelines", "FewStepScheduler": "pipelines",
}

__all__ = [
    "CD",
    "N2CE",
    "NCE",
    "NWJ",
    "ConvCritic",
    "Denoiser",
    "EDMDenoiser",
    "FewStepPipeline",
    "FewStepSampler",
    "FewStepScheduler",
    "LatentSpace",
    "MLPCritic",
    "MultiStageCritic",
    "PromptEncoder",
    "RatioFit",
    "ToyMLP",
    "VPDenoiser",
    "build_generator_loss",
    "build_objective",
    "critic_diagnostics",
    "fit_density_ratio",
    "load_denoiser",
    "load_text_components",
    "multistage_loss",
    "n2ce_loss",
    "nce_loss",
    "suggest_M",
    "waymark_coefficients",
    "waymarks",
]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this hook
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
