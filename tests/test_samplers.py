import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from n2ce_distill.denoisers import EDMDenoiser, VPDenoiser
from n2ce_distill.nets import ToyMLP, tiny_unet
from n2ce_distill.samplers import (
    ancestral_sample,
    ancestral_step_scales,
    euler_sample,
    few_step_sigmas,
    karras_sigmas,
    teacher_sample,
    vp_quadratic_sigmas,
    vp_uniform_sigmas,
)


class GaussianOracle:
    """Exact denoiser for data ~ N(0, c^2 I): D(x; s) = x c^2 / (c^2 + s^2)."""

    def __init__(self, c=0.5, sigma_min=0.002, sigma_max=80.0, dim=4):
        self.c, self.sigma_min, self.sigma_max = c, sigma_min, sigma_max
        self.sample_shape, self.device = (dim,), torch.device("cpu")

    def __call__(self, x, sigma, class_labels=None):
        s = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
        return x * self.c**2 / (self.c**2 + s**2)


def make_vp(num_train_timesteps=1000, **sched_kw):
    torch.manual_seed(0)
    unet = tiny_unet(8, in_channels=1, block_out_channels=(8, 16), norm_num_groups=4).eval()
    return VPDenoiser(unet, DDPMScheduler(num_train_timesteps=num_train_timesteps, **sched_kw))


def assert_schedule(sigmas, n):
    assert sigmas.shape == (n + 1,) and sigmas.dtype == torch.float32
    assert sigmas[-1] == 0 and (sigmas.diff() < 0).all()


def test_karras_endpoints_and_n1():
    s = karras_sigmas(18, 0.002, 80.0)
    assert_schedule(s, 18)
    torch.testing.assert_close(s[[0, 17]], torch.tensor([80.0, 0.002]))
    # rho-th roots are evenly spaced
    roots = s[:-1].double() ** (1 / 7)
    torch.testing.assert_close(roots.diff(), roots.diff()[:1].expand(17), rtol=1e-4, atol=0)
    torch.testing.assert_close(karras_sigmas(1, 0.002, 80.0), torch.tensor([80.0, 0.0]))


@pytest.mark.parametrize("spacing", ["auto", "karras", "quadratic", "uniform"])
@pytest.mark.parametrize("n", [1, 4, 10, 40])
def test_few_step_sigmas_vp(spacing, n):
    den = make_vp()
    s = few_step_sigmas(den, n, spacing)
    assert_schedule(s, n)
    assert s[0] <= den.sigma_max * (1 + 1e-6) and (n == 1 or s[n - 1] >= den.sigma_min * (1 - 1e-6))


def test_few_step_sigmas_edm_and_errors():
    den = EDMDenoiser(ToyMLP(width=8, depth=1))
    torch.testing.assert_close(few_step_sigmas(den, 7), karras_sigmas(7, 0.002, 80.0))  # auto = karras
    assert_schedule(few_step_sigmas(den, 7, "quadratic"), 7)
    with pytest.raises(ValueError, match="discrete-time"):
        few_step_sigmas(den, 7, "uniform")
    with pytest.raises(ValueError, match="spacing"):
        few_step_sigmas(den, 7, "cosine")
    with pytest.raises(ValueError, match="step"):
        few_step_sigmas(den, 0)


def test_quadratic_is_dxmi_var_schedule():
    den = make_vp()
    s = vp_quadratic_sigmas(den, 10).double()
    g = 1 / (1 + s[:-1].flip(0) ** 2)  # cumulative alpha-bar products, low noise first
    betas = 1 - torch.cat([g[:1], g[1:] / g[:-1]])
    root = (betas / betas[0]).sqrt()  # 1 + i c: linear in i
    torch.testing.assert_close(root.diff(), root.diff()[:1].expand(9), rtol=1e-4, atol=0)
    torch.testing.assert_close(betas[0], torch.tensor(1e-4, dtype=torch.float64), rtol=1e-3, atol=0)
    # T=10: DxMI's bounded search stops short of alpha-bar_T; the top noise is sigma ~ 6.86 as in DxMI
    assert abs(s[0].item() - 6.86) < 0.01
    # with enough steps the product reaches the teacher's top noise exactly
    torch.testing.assert_close(vp_quadratic_sigmas(den, 30)[0], torch.tensor(den.sigma_max), rtol=1e-4, atol=0)


def test_uniform_full_grid_is_the_ddpm_grid():
    den = make_vp()
    s = vp_uniform_sigmas(den, 1000)
    torch.testing.assert_close(s[:-1], den.discrete_sigmas.flip(0), rtol=0, atol=0)
    with pytest.raises(ValueError, match="1000"):
        vp_uniform_sigmas(den, 1001)


def test_ancestral_step_scales():
    s = karras_sigmas(10, 0.002, 80.0)
    down, up = ancestral_step_scales(s)
    s_cur, s_next = s[:-1].double(), s[1:].double()
    torch.testing.assert_close(down.double() ** 2 + up.double() ** 2, s_next**2, rtol=1e-5, atol=1e-12)
    torch.testing.assert_close(up.double() ** 2, s_next**2 * (s_cur**2 - s_next**2) / s_cur**2, rtol=1e-5, atol=1e-12)
    torch.testing.assert_close(down.double() / s_cur, s_next**2 / s_cur**2, rtol=1e-5, atol=1e-12)  # posterior mean
    assert up[-1] == 0 and down[-1] == 0
    down0, up0 = ancestral_step_scales(s, eta=0.0)
    assert (up0 == 0).all() and torch.equal(down0, s[1:])


def test_euler_solves_the_probability_flow_ode_exactly_in_the_limit():
    oracle = GaussianOracle(c=0.5)
    z = torch.randn(256, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    # dx/ds = x s/(c^2 + s^2)  =>  x(0) = x(smax) c / sqrt(c^2 + smax^2)
    exact = 80.0 * z * 0.5 / math.sqrt(0.25 + 80.0**2)
    err = {n: ((euler_sample(oracle, karras_sigmas(n, 0.002, 80.0), z) - exact).abs().max() / exact.abs().max()).item()
           for n in (400, 1600)}
    assert err[1600] < 2e-3
    assert 3.5 < err[400] / err[1600] < 4.5  # first-order convergence


def test_ancestral_with_oracle_has_the_data_variance():
    oracle = GaussianOracle(c=0.5, dim=8)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4000, 8, generator=g)
    x = ancestral_sample(oracle, karras_sigmas(1600, 0.002, 80.0), z, generator=g)
    # the step ignores Var[x0 | x] (bias ~ -0.8% at 1600 steps); Monte-Carlo error ~ 1.6%
    assert abs(x.var().item() / 0.25 - 1) < 0.04 and abs(x.mean().item()) < 0.01
    # eta = 0 is the deterministic Euler/DDIM sampler
    s = karras_sigmas(8, 0.002, 80.0)
    torch.testing.assert_close(ancestral_sample(oracle, s, z, eta=0.0), euler_sample(oracle, s, z))


def test_ancestral_on_the_full_grid_is_diffusers_ddpm():
    den = make_vp(num_train_timesteps=40, clip_sample=False)
    z = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    ours = teacher_sample(den, noise=z, steps=40, generator=torch.Generator().manual_seed(1))
    sched, g = den.scheduler, torch.Generator().manual_seed(1)
    sched.set_timesteps(40)
    x = z * den.sigma_max / math.sqrt(1 + den.sigma_max**2)  # VP coordinates of sigma_max z
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(den.net(x, t).sample, t, x, generator=g).prev_sample
    torch.testing.assert_close(ours, x, rtol=1e-4, atol=1e-4)


def test_euler_is_diffusers_ddim():
    den = make_vp(num_train_timesteps=40)
    sched = DDIMScheduler.from_config(den.scheduler.config, clip_sample=False, set_alpha_to_one=True)
    sched.set_timesteps(8)  # "leading" spacing: 35, 30, ..., 0
    z = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    sigmas = torch.cat([den.discrete_sigmas[sched.timesteps], torch.zeros(1)])
    with torch.no_grad():
        ours = euler_sample(den, sigmas, z)
        x = z * sigmas[0] / (1 + sigmas[0] ** 2).sqrt()
        for t in sched.timesteps:
            x = sched.step(den.net(x, t).sample, t, x, eta=0.0).prev_sample
    torch.testing.assert_close(ours, x, rtol=1e-4, atol=1e-4)


def test_teacher_sample_shapes_determinism_and_errors():
    oracle = GaussianOracle(dim=3)
    a = teacher_sample(oracle, 5, steps=6, generator=torch.Generator().manual_seed(3))
    b = teacher_sample(oracle, 5, steps=6, generator=torch.Generator().manual_seed(3))
    assert a.shape == (5, 3) and torch.equal(a, b)
    assert teacher_sample(oracle, 5, steps=6, method="euler").shape == (5, 3)
    with pytest.raises(ValueError, match="method"):
        teacher_sample(oracle, 5, steps=6, method="heun")
    with pytest.raises(ValueError, match="num_samples"):
        teacher_sample(oracle, steps=6)
