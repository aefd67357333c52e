"""The few-step sampler on an exact denoiser: EDM preconditioning with F = 0 is the Bayes denoiser of
N(0, sigma_data^2 I), D(x; s) = x sd^2 / (sd^2 + s^2)."""

import pytest
import torch

from n2ce_distill.denoisers import EDMDenoiser
from n2ce_distill.fewstep import FewStepSampler
from n2ce_distill.nets import ToyMLP
from n2ce_distill.samplers import ancestral_step_scales, karras_sigmas


def exact_gaussian_denoiser(dim: int = 2) -> EDMDenoiser:
    net = ToyMLP(dim=dim, width=16, depth=2)
    for p in net.parameters():
        torch.nn.init.zeros_(p)
    return EDMDenoiser(net)


def test_one_step_is_the_denoiser_at_sigma_init():
    denoiser = exact_gaussian_denoiser()
    sampler = FewStepSampler(denoiser, torch.tensor([2.5, 0.0]), last_scale=0.0)
    z = torch.randn(8, 2, generator=torch.Generator().manual_seed(3))
    out = sampler.sample(8, generator=torch.Generator().manual_seed(3))
    expected = 2.5 * z * 0.25 / (0.25 + 2.5**2)
    torch.testing.assert_close(out, expected)


def test_many_ancestral_steps_reach_the_data_variance():
    sampler = FewStepSampler(exact_gaussian_denoiser(), karras_sigmas(200, 0.002, 80.0), last_scale=None)
    with torch.no_grad():
        x = sampler.sample(20000, generator=torch.Generator().manual_seed(0))
    # plugging x0 := D(x) into the posterior drops x0's own uncertainty, so a little variance is lost
    assert x.var().item() == pytest.approx(0.25, rel=0.1)


def test_scales_start_at_sigma_up_and_fixed_ones_get_no_gradient():
    sigmas = karras_sigmas(4, 0.002, 80.0)
    sampler = FewStepSampler(exact_gaussian_denoiser(), sigmas, last_scale=1e-3)
    _, sigma_up = ancestral_step_scales(sigmas)
    torch.testing.assert_close(sampler.scales()[:-1], sigma_up[:-1])
    assert sampler.scales()[-1].item() == pytest.approx(1e-3)
    x = torch.randn(16, 2)
    k = torch.arange(4).repeat(4)
    sampler(x, k, torch.randn_like(x)).pow(2).sum().backward()
    assert sampler.log_scales.grad[:-1].abs().min() > 0
    assert sampler.log_scales.grad[-1] == 0


def test_trajectory_shape_and_step_mean():
    sigmas = karras_sigmas(3, 0.002, 80.0)
    sampler = FewStepSampler(exact_gaussian_denoiser(), sigmas)
    traj = sampler.sample(5, generator=torch.Generator().manual_seed(0), return_trajectory=True)
    assert traj.shape == (4, 5, 2)
    x, k = torch.randn(5, 2), torch.ones(5, dtype=torch.long)
    shrink = 0.25 / (0.25 + sigmas[1] ** 2)
    x0 = shrink * x
    expected = x0 + sampler.sigma_down[1] / sigmas[1] * (x - x0)
    torch.testing.assert_close(sampler.mean(x, k), expected)


@pytest.mark.parametrize("sigmas", [[1.0, 0.5], [1.0, 2.0, 0.0], [0.0], [[1.0, 0.0]]])
def test_bad_schedules_are_rejected(sigmas):
    with pytest.raises(ValueError, match="sigmas: expected T\\+1 strictly decreasing"):
        FewStepSampler(exact_gaussian_denoiser(), torch.tensor(sigmas))


def test_eta_zero_starts_from_the_ddim_mean():
    sigmas = karras_sigmas(4, 0.002, 80.0)
    sampler = FewStepSampler(exact_gaussian_denoiser(), sigmas, last_scale=None, eta=0.0)
    torch.testing.assert_close(sampler.sigma_down, sigmas[1:])  # the whole next noise level goes to the mean
    torch.testing.assert_close(sampler.scales(), torch.full((4,), 1e-3))  # only the floor of the learned scale


def test_renoise_denoises_then_noises_afresh_to_the_next_level():
    """DMD2's sampler: x_{k+1} = D(x_k; sigma_k) + sigma_{k+1} z with fixed scales (nothing to learn)."""
    sigmas = karras_sigmas(3, 0.002, 80.0)
    denoiser = exact_gaussian_denoiser()
    sampler = FewStepSampler(denoiser, sigmas, renoise=True)
    assert not sampler.log_scales.requires_grad
    torch.testing.assert_close(sampler.scales(), sigmas[1:])
    draws = torch.randn(4, 5, 2, generator=torch.Generator().manual_seed(0))
    queue = iter(draws)
    out = sampler.sample(5, noise=lambda shape: next(queue))
    x = sigmas[0] * draws[0]
    for k in range(3):
        x = x * 0.25 / (0.25 + sigmas[k] ** 2) + sigmas[k + 1] * draws[k + 1]
    torch.testing.assert_close(out, x)
