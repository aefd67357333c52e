"""n2ce_distill: N²CE critics ("noisier" NCE, noise magnified by M) for diffusion distillation.

The objectives are small callables on critic logits ``l = log p_data / q``; everything else
(critics, denoisers, samplers, DxMI and SiD loops, the trainer, FID) builds on them.
"""

from .critics import ConvCritic, MLPCritic
from .denoisers import Denoiser, EDMDenoiser, VPEpsilonDenoiser, load_denoiser
from .diagnostics import critic_diagnostics
from .estimator import RatioFit, fit_density_ratio
from .fewstep import FewStepSampler
from .magnification import suggest_M
from .multistage import MultiStageCritic, multistage_loss, waymark_coefficients, waymarks
from .nets import ToyMLP
from .objectives import CD, N2CE, NCE, NWJ, build_generator_loss, build_objective, n2ce_loss, nce_loss
from .pipelines import FewStepPipeline, FewStepScheduler

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
    "MLPCritic",
    "MultiStageCritic",
    "RatioFit",
    "ToyMLP",
    "VPEpsilonDenoiser",
    "build_generator_loss",
    "build_objective",
    "critic_diagnostics",
    "fit_density_ratio",
    "load_denoiser",
    "multistage_loss",
    "n2ce_loss",
    "nce_loss",
    "suggest_M",
    "waymark_coefficients",
    "waymarks",
]
