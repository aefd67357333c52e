import json
import math
from types import SimpleNamespace

import pytest
import torch
from diffusers import CMStochasticIterativeScheduler, DDPMPipeline, DDPMScheduler, EDMEulerScheduler, ScoreSdeVeScheduler
from torch import nn

from n2ce_distill.denoisers import C_NOISE, EDMDenoiser, VPDenoiser, denoiser_from_components, load_denoiser
from n2ce_distill.nets import ToyMLP, tiny_unet


def small_unet(**kw):
    torch.manual_seed(0)
    return tiny_unet(8, in_channels=1, block_out_channels=(8, 16), norm_num_groups=4, **kw).eval()


class RecordingNet(nn.Module):
    """F(x, c) = 3 x + c (broadcast), remembering its inputs: lets us check the preconditioning algebra."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(3.0))
        self.config = {"dim": 2}

    def forward(self, x, c_noise, class_labels=None):
        self.seen = (x, c_noise)
        return SimpleNamespace(sample=self.w * x + c_noise[:, None])


def test_edm_coefficients_match_formulas_and_diffusers():
    den = EDMDenoiser(RecordingNet(), sigma_data=0.5)
    s = torch.tensor([0.002, 0.1, 0.5, 1.0, 80.0])
    c_skip, c_out, c_in, c_noise = den.coefficients(s)
    sd = 0.5
    torch.testing.assert_close(c_skip, sd**2 / (s**2 + sd**2))
    torch.testing.assert_close(c_out, s * sd / (s**2 + sd**2).sqrt())
    torch.testing.assert_close(c_in, 1 / (s**2 + sd**2).sqrt())
    torch.testing.assert_close(c_noise, s.log() / 4)
    # c_skip^2 + c_out^2 / sd^2 = 1: D is a convex-type interpolation between x and the net's guess
    torch.testing.assert_close(c_skip**2 * (s**2 + sd**2) / sd**2 + c_out**2 / sd**2, torch.ones(5))
    sched = EDMEulerScheduler(sigma_data=sd)
    x = torch.randn(5, 2)
    d = den(x, s)
    f = 3 * (c_in[:, None] * x) + c_noise[:, None]
    torch.testing.assert_close(d, sched.precondition_outputs(x, f, s[:, None]))
    torch.testing.assert_close(den.net.seen[0], sched.precondition_inputs(x, s[:, None]))
    torch.testing.assert_close(den.net.seen[1], sched.precondition_noise(s))


def test_edm_limits_and_scalar_sigma():
    torch.manual_seed(0)
    den = EDMDenoiser(ToyMLP(width=16, depth=1))
    x = torch.randn(6, 2)
    torch.testing.assert_close(den(x, 0.0), x, rtol=0, atol=0)  # sigma = 0: the identity, exactly
    torch.testing.assert_close(den(x, 1e-6), x, rtol=0, atol=1e-5)
    torch.testing.assert_close(den(x, 0.7), den(x, torch.full((6,), 0.7)))
    c_skip, c_out, _, _ = den.coefficients(torch.tensor([1e4]))
    assert c_skip.item() < 1e-8 and abs(c_out.item() - 0.5) < 1e-6  # sigma -> inf: D -> sd * F


def test_cm_convention_matches_consistency_model_ports():
    s = torch.tensor([0.002, 0.5, 80.0], dtype=torch.float64)
    ref = CMStochasticIterativeScheduler().sigma_to_t(s.numpy())
    torch.testing.assert_close(C_NOISE["cm"](s), torch.as_tensor(ref))
    with pytest.raises(ValueError, match="c_noise"):
        EDMDenoiser(RecordingNet(), c_noise="ddpm")


def test_edm_training_distribution_and_weight():
    den = EDMDenoiser(ToyMLP(width=8, depth=1))
    s = den.sample_training_sigmas(40_000, torch.Generator().manual_seed(0))
    assert abs(s.log().mean().item() + 1.2) < 0.03 and abs(s.log().std().item() - 1.2) < 0.03
    sig = torch.tensor([0.1, 1.0, 5.0])
    torch.testing.assert_close(den.loss_weight(sig), (sig**2 + 0.25) / (sig * 0.5) ** 2)


def make_vp(**kw):
    return VPDenoiser(small_unet(**kw), DDPMScheduler(num_train_timesteps=1000))


def test_vp_denoiser_equals_ddpm_x0_prediction():
    den = make_vp()
    sched = den.scheduler
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(4, 1, 8, 8, generator=g) * 2 - 1
    n = torch.randn(4, 1, 8, 8, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    abar = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = sched.add_noise(x0, n, t)  # sqrt(abar) x0 + sqrt(1 - abar) n
    with torch.no_grad():
        eps = den.net(x_t, t).sample
        x0_ddpm = (x_t - (1 - abar).sqrt() * eps) / abar.sqrt()
        sigma = den.discrete_sigmas[t]
        d = den(x0 + sigma.view(-1, 1, 1, 1) * n, sigma)
    torch.testing.assert_close(sigma, ((1 - abar) / abar).sqrt().flatten())
    torch.testing.assert_close(d, x0_ddpm, rtol=1e-4, atol=1e-4)


def test_vp_sigma_to_t_exact_on_grid_and_monotone():
    den = make_vp()
    grid = den.discrete_sigmas
    torch.testing.assert_close(den.sigma_to_t(grid), torch.arange(1000, dtype=torch.float32), rtol=0, atol=0)
    fine = torch.logspace(math.log10(den.sigma_min), math.log10(den.sigma_max), 20_000)
    t = den.sigma_to_t(fine)
    assert (t.diff() >= 0).all() and t[0] == 0 and t[-1] == 999
    mid = (grid[41] * grid[42]).sqrt()  # geometric midpoint: halfway in log sigma
    assert abs(den.sigma_to_t(mid).item() - 41.5) < 1e-3
    torch.testing.assert_close(den.sigma_to_t(torch.tensor([0.0, 1e6])), torch.tensor([0.0, 999.0]))
    assert den.sample_shape == (1, 8, 8)


def test_vp_loss_weighting_is_exactly_ddpm_eps_mse():
    den = make_vp()
    g = torch.Generator().manual_seed(2)
    x0 = torch.rand(6, 1, 8, 8, generator=g) * 2 - 1
    n = torch.randn(6, 1, 8, 8, generator=g)
    sigma = den.sample_training_sigmas(6, torch.Generator().manual_seed(3))
    t = torch.searchsorted(den.discrete_sigmas, sigma)  # draws are grid points
    torch.testing.assert_close(den.discrete_sigmas[t], sigma, rtol=0, atol=0)
    with torch.no_grad():
        ours = den.denoising_loss(x0, sigma=sigma, noise=n)
        eps = den.net(den.scheduler.add_noise(x0, n, t), t).sample
    torch.testing.assert_close(ours, (n - eps).square().flatten(1).mean(1), rtol=1e-4, atol=1e-5)


def test_vp_v_prediction_matches_diffusers_and_its_loss_is_the_v_mse():
    """A v-prediction net (SD-2-style schedulers): D is DDPM's ``pred_original_sample = a x_t - b v`` at grid
    points, and the teacher loss is exactly ``|v - v_hat|^2`` with v from the scheduler's ``get_velocity``."""
    torch.manual_seed(0)
    scheduler = DDPMScheduler(prediction_type="v_prediction")
    den = VPDenoiser(small_unet(), scheduler)
    g = torch.Generator().manual_seed(2)
    x0, n = torch.rand(6, 1, 8, 8, generator=g) * 2 - 1, torch.randn(6, 1, 8, 8, generator=g)
    t = torch.tensor([0, 10, 200, 500, 900, 999])
    sigma = den.discrete_sigmas[t]
    with torch.no_grad():
        x_t = scheduler.add_noise(x0, n, t)
        v_hat = den.net(x_t, t).sample
        abar = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
        expected = abar.sqrt() * x_t - (1 - abar).sqrt() * v_hat
        torch.testing.assert_close(den(x0 + sigma.view(-1, 1, 1, 1) * n, sigma), expected, rtol=1e-4, atol=1e-4)
        v = scheduler.get_velocity(x0, n, t)
        torch.testing.assert_close(den.denoising_loss(x0, sigma=sigma, noise=n), (v - v_hat).square().flatten(1).mean(1),
                                   rtol=1e-4, atol=1e-5)


def test_vp_rejects_other_prediction_types():
    with pytest.raises(ValueError, match="sample"):
        VPDenoiser(small_unet(), DDPMScheduler(prediction_type="sample"))


def round_trip(den, tmp_path, x, sigma, labels=None):
    den.save_pretrained(tmp_path / "den")
    again = load_denoiser(tmp_path / "den")
    assert type(again) is type(den) and type(again.net) is type(den.net)
    with torch.no_grad():
        torch.testing.assert_close(again(x, sigma, labels), den(x, sigma, labels), rtol=0, atol=0)
    assert (again.sigma_min, again.sigma_max, again.sigma_data) == (den.sigma_min, den.sigma_max, den.sigma_data)
    return again, json.loads((tmp_path / "den" / "model_index.json").read_text())


def test_round_trip_vp_unet_and_diffusers_interop(tmp_path):
    den = make_vp()
    x = torch.randn(2, 1, 8, 8)
    _, index = round_trip(den, tmp_path, x, torch.tensor([0.05, 20.0]))
    assert index["unet"] == ["diffusers", "UNet2DModel"] and index["scheduler"] == ["diffusers", "DDPMScheduler"]
    pipe = DDPMPipeline.from_pretrained(tmp_path / "den")  # our folder is a plain diffusers DDPM pipeline
    assert isinstance(pipe.scheduler, DDPMScheduler)


def test_round_trip_edm_unet_with_classes(tmp_path):
    den = EDMDenoiser(small_unet(num_class_embeds=3), sigma_min=0.01, sigma_max=40.0)
    again, index = round_trip(den, tmp_path, torch.randn(3, 1, 8, 8), torch.tensor([0.1, 1.0, 30.0]),
                              torch.tensor([0, 1, 2]))
    assert index["scheduler"] == ["diffusers", "EDMEulerScheduler"] and again.c_noise == "edm"


def test_round_trip_edm_toy_mlp_keeps_settings(tmp_path):
    torch.manual_seed(0)
    den = EDMDenoiser(ToyMLP(width=16, depth=2, time_embedding_type="fourier"), c_noise="cm", p_mean=-0.5)
    again, index = round_trip(den, tmp_path, torch.randn(4, 2), 0.3)
    assert index["unet"] == ["n2ce_distill", "ToyMLP"]
    assert (again.c_noise, again.p_mean, again.p_std, again.sample_shape) == ("cm", -0.5, 1.2, (2,))
    assert load_denoiser(tmp_path / "den", c_noise="edm").c_noise == "edm"  # explicit override wins


def test_consistency_model_layout_loads_as_cm_edm(tmp_path):
    net = ToyMLP(width=8, depth=1)
    net.save_pretrained(tmp_path / "unet")
    CMStochasticIterativeScheduler(sigma_max=60.0).save_pretrained(tmp_path / "scheduler")
    den = load_denoiser(tmp_path)  # no model_index.json: the scheduler alone decides
    assert isinstance(den, EDMDenoiser) and den.c_noise == "cm" and den.sigma_max == 60.0


def test_denoiser_from_components_rebuilds_from_net_and_scheduler():
    edm = EDMDenoiser(ToyMLP(width=8, depth=1), sigma_max=20.0, c_noise="cm")
    again = denoiser_from_components(edm.net, edm.to_scheduler(), c_noise="cm")
    x = torch.randn(3, 2)
    assert isinstance(again, EDMDenoiser) and again.sigma_max == 20.0
    torch.testing.assert_close(again(x, 0.4), edm(x, 0.4), rtol=0, atol=0)
    vp = make_vp()
    assert isinstance(denoiser_from_components(vp.net, vp.to_scheduler(), c_noise="edm"), VPDenoiser)
    with pytest.raises(ValueError, match="ScoreSdeVeScheduler"):
        denoiser_from_components(vp.net, ScoreSdeVeScheduler())


def test_load_errors_name_the_path(tmp_path):
    small_unet().save_pretrained(tmp_path / "unet")
    expected = r"(?s)missing scheduler/scheduler_config\.json.*unet/ and scheduler/"
    with pytest.raises(FileNotFoundError, match=expected) as err:
        load_denoiser(tmp_path)
    assert str(tmp_path) in str(err.value)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(NotADirectoryError, match="file.txt"):
        load_denoiser(tmp_path / "file.txt")


@pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks` argument is deprecated")
def test_hub_ids_take_the_real_from_pretrained_path(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="ddpm-cifar10-32"):  # not cached here; the call is the real one
        load_denoiser("google/ddpm-cifar10-32", local_files_only=True)
