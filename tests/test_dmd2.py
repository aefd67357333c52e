"""DMD2 method: the distribution-matching gradient, its zero at initialisation, the two time scales, backward
simulation, the GAN head's losses under each objective, warm-up, and the recipe checks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from n2ce_distill.config import ConfigError, load_recipe
from n2ce_distill.errors import InputError
from n2ce_distill.methods.dmd2 import DMD2
from n2ce_distill.samplers import karras_ramp

from test_sid import data_batch, make_update, params

SHAPE = (1, 8, 8)  # digits
B = 4
TINY = [f"train.batch_size={B}"]


@pytest.fixture
def make_dmd2(tiny_method):
    """Build a DMD2 on a tiny teacher (the 8x8 VP one by default) with extra dotted overrides."""
    return lambda *overrides, **kw: tiny_method(DMD2, "dmd2", *overrides, **kw)


def run(method, step_index: int = 0, calls: list | None = None, seed: int = 3, batch=None):
    torch.manual_seed(seed)
    batch = data_batch() if batch is None else batch
    return method.training_step(batch, step_index, make_update(method, [] if calls is None else calls))


def perturb(module, scale: float = 0.05) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))


# ------------------------------------------------------------------------------------------ distribution matching

def test_dm_term_is_zero_while_fake_score_equals_teacher(make_dmd2):
    """D_psi = D_phi at initialisation: the direction (D_psi - D_phi) / w is exactly 0, and so are loss_dm and the
    generator's gradient (no regression loss to move it)."""
    method = make_dmd2("method.adversarial=false")
    calls = []
    logs = run(method, calls=calls).scalars
    assert [c[1] for c in calls] == ["generator", "fake_score"]
    assert float(logs["loss_dm"]) == 0.0 and calls[0][3] == 0.0
    assert logs["loss_fake_score"] > 0
    assert "loss_critic" not in logs and "loss_adversarial" not in logs


@pytest.mark.parametrize("guidance", [False, True])
def test_dm_gradient_is_the_normalised_score_difference(make_dmd2, recipe_file, vp_cond_teacher, guidance):
    """d loss_dm / d x_g = (D_psi(x_t) - D_phi(x_t)) / (w N), w = mean |x_g - D_phi(x_t)| per sample and N the
    element count (DMD2's mean), at x_t = x_g + sigma n with sigma on the ramp within [dm_t_min, dm_t_max];
    with guidance the real score is the guided teacher."""
    if guidance:
        path = recipe_file({"method": {"name": "dmd2", "adversarial": False}, "data": {"name": "digits", "labels": True},
                            "teacher": {"path": str(vp_cond_teacher), "guidance_scale": 2.0}})
        torch.manual_seed(0)
        method = DMD2(load_recipe(path, TINY), SHAPE, num_classes=10)
        method.frozen["teacher"].eval()
        labels = torch.tensor([1, 4, 4, 9])
    else:
        method, labels = make_dmd2("method.adversarial=false"), None
    perturb(method.nets.read["fake_score"])
    x_g = torch.randn(B, *SHAPE, requires_grad=True)
    torch.manual_seed(5)
    loss, logs = method._generator_loss(x_g, labels, step=0)
    loss.backward()

    opts = method.recipe.method
    torch.manual_seed(5)
    t = opts.dm_t_min + (opts.dm_t_max - opts.dm_t_min) * torch.rand(B)
    sigma = karras_ramp(t, opts.sigma_min, method.ramp_max)
    x_t = x_g.detach() + sigma.view(-1, 1, 1, 1) * torch.randn(B, *SHAPE)
    with torch.no_grad():
        teacher = method.frozen["teacher"]
        real = teacher.guided(x_t, sigma, labels, 2.0) if guidance else teacher(x_t, sigma)
        fake = method.nets.read["fake_score"](x_t, sigma, labels)
    w = (x_g.detach() - real).abs().flatten(1).mean(1).view(-1, 1, 1, 1)
    direction = (fake - real) / w
    assert direction.abs().max() > 1e-3  # the perturbed fake score differs from the teacher
    torch.testing.assert_close(x_g.grad, direction / direction.numel())
    torch.testing.assert_close(logs["loss_dm"], 0.5 * direction.pow(2).mean())
    if guidance:  # the unguided teacher would give another direction
        with torch.no_grad():
            unguided = teacher(x_t, sigma, labels)
        assert not torch.allclose(unguided, real)


def test_fake_score_loss_is_dmd2_weighted_denoising(make_dmd2):
    """The fake score learns x_g from x_g + sigma n, t ~ U[0, 1] on the ramp, weight 1/sigma^2 + 1/sd^2, mean over
    elements; with the critic the real rows share the pass (and the sigma) but not the denoising loss."""
    method = make_dmd2("critic.objective=nce")
    seen = []
    method.nets.read["fake_score"].register_forward_hook(lambda m, args, out: seen.append((args[0], args[1], out)))
    generated = []
    method.nets.read["generator"].register_forward_hook(lambda m, args, out: generated.append(out.detach()))
    logs = run(method, step_index=1).scalars  # not a generator turn: one generator pass, one fake-score pass
    (inputs, sigma, out), = seen
    x_g, = generated
    assert inputs.shape[0] == 2 * B and torch.equal(sigma[:B], sigma[B:])
    opts, sd = method.recipe.method, method.nets.read["fake_score"].sigma_data
    assert ((sigma >= opts.sigma_min) & (sigma <= method.ramp_max)).all() and method.ramp_max == 80  # EDM's top
    weight = (1 / sigma[:B] ** 2 + 1 / sd**2).view(-1, 1, 1, 1)
    torch.testing.assert_close(logs["loss_fake_score"], (weight * (out[:B] - x_g).pow(2)).mean())


# -------------------------------------------------------------------------------------------------- time scales

def test_generator_moves_every_fake_updates_per_step_iterations(make_dmd2):
    """With fake_updates_per_step = 3 the generator is updated at iterations 0, 3, 6 and the fake score (with its
    head) at every one; the latest generator losses are reported at the iterations in between."""
    method = make_dmd2("method.fake_updates_per_step=3", "optim.fake_score.lr=1.0e-3")
    order = []
    for index in range(7):
        calls = []
        logs = run(method, index, calls).scalars
        order.append([c[1] for c in calls])
        assert "loss_dm" in logs and "loss_fake_score" in logs and "loss_critic" in logs
    assert order == [["generator", "fake_score"] if i % 3 == 0 else ["fake_score"] for i in range(7)]


def test_generator_update_reads_but_never_moves_the_fake_score_or_head(make_dmd2):
    """The generator's update leaves D_psi and the head as they were; the fake-score update moves both."""
    method = make_dmd2("optim.fake_score.lr=1.0e-3", "method.adversarial_weight=1.0")
    perturb(method.nets.read["fake_score"])
    fake, head, generator = (method.nets.read[k] for k in ("fake_score", "gan_head", "generator"))
    snapshots = []
    base = make_update(method, [])

    def update(term, loss, clip=None):
        before = (params(fake), params(head), params(generator))
        base(term, loss, clip)
        snapshots.append((term, before, (params(fake), params(head), params(generator))))

    torch.manual_seed(3)
    method.training_step(data_batch(), 0, update)
    (gen_term, gen_before, gen_after), (fake_term, fake_before, fake_after) = snapshots
    assert (gen_term, fake_term) == ("generator", "fake_score")
    assert torch.equal(gen_before[0], gen_after[0]) and torch.equal(gen_before[1], gen_after[1])
    assert not torch.equal(gen_before[2], gen_after[2])
    assert not torch.equal(fake_before[0], fake_after[0]) and not torch.equal(fake_before[1], fake_after[1])
    assert torch.equal(fake_before[2], fake_after[2])


# ------------------------------------------------------------------------------------------ backward simulation

def test_backward_simulation_runs_the_students_own_first_steps(make_dmd2, edm_unet_teacher):
    """Few-step: an iteration trains step k of T; x_k comes from the student's own steps 0..k-1 (fresh noise at
    each level, no gradients) and x_g = G(x_k; sigma_k). k is the same for a given (seed, step) and covers 0..T-1."""
    method = make_dmd2("method.num_steps=3", "method.adversarial=false", teacher=edm_unet_teacher)
    sampler = method.nets.read["generator"]
    assert sampler.renoise and torch.equal(sampler.scales(), sampler.sigmas[1:])
    levels = []
    sampler.denoiser.register_forward_hook(lambda m, args, out: levels.append((float(args[1][0]), torch.is_grad_enabled())))
    drawn = []
    for index in range(12):
        levels.clear()
        k = method._simulated_steps(index)
        assert k == method._simulated_steps(index)
        drawn.append(k)
        run(method, index)
        expected = [(float(sampler.sigmas[j]), False) for j in range(k)] + [(float(sampler.sigmas[k]), index % 5 == 0)]
        assert levels == expected
    assert set(drawn) == {0, 1, 2}


def test_levels_start_at_sigma_init_and_step_evenly_down_the_ramp(make_dmd2, edm_unet_teacher):
    """T levels at t = k/T on the Karras ramp from sigma_0 down to the teacher's sigma_min (which is never a level:
    re-noising there would change nothing), then 0; sigma_0 is sigma_init, else the teacher's sigma_max (DMD2)."""
    assert make_dmd2("method.sigma_init=2.5").nets.read["generator"].sigmas.tolist() == [2.5, 0.0]
    default = make_dmd2(teacher=edm_unet_teacher).nets.read["generator"]
    assert default.sigmas.tolist() == pytest.approx([80.0, 0.0])  # the teacher's sigma_max, as DMD2
    four = make_dmd2("method.num_steps=4", teacher=edm_unet_teacher).nets.read["generator"].sigmas
    expected = karras_ramp(torch.tensor([0.0, 0.25, 0.5, 0.75], dtype=torch.float64), 0.002, 80.0)
    torch.testing.assert_close(four, torch.cat([expected, torch.zeros(1, dtype=torch.float64)]).float())
    assert four[3] > 0.1  # the last re-noised step still has work to do


@pytest.mark.parametrize("override, message", [
    ("method.sigma_init=1000", r"^method\.sigma_init: 1000 is outside the teacher's noise range \(0\.002, 80\]"),
    ("method.sigma_init=0.001", r"^method\.sigma_init: 0\.001 is outside"),
    ("method.sigma_max=1000", r"^method\.sigma_max: 1000 is above the teacher's largest noise level 80"),
])
def test_levels_outside_the_teachers_range_are_refused(make_dmd2, edm_unet_teacher, override, message):
    with pytest.raises(InputError, match=message):
        make_dmd2(override, teacher=edm_unet_teacher)


# --------------------------------------------------------------------------------------------------- GAN critic

@pytest.mark.parametrize("objective, M", [("n2ce", 100.0), ("gan", 1.0), ("nce", 1.0)])
def test_critic_and_adversarial_terms_follow_the_objective(make_dmd2, objective, M):
    """The head starts at l = 0: the critic loss is the objective at (0, 0), log(1+M) + M log(1+1/M) (2 log 2 for
    GAN = NCE), and the generator's term is the objective's own softplus(log M - l): log(1+M). The generator
    loss is DM + adversarial_weight x that term."""
    method = make_dmd2(f"critic.objective={objective}", f"critic.M={M}", "method.adversarial_weight=0.5")
    calls = []
    output = run(method, calls=calls)
    logs = output.scalars
    torch.testing.assert_close(logs["loss_critic"], torch.tensor(math.log1p(M) + M * math.log1p(1 / M)))
    torch.testing.assert_close(logs["loss_adversarial"], torch.tensor(math.log1p(M)))
    torch.testing.assert_close(calls[0][2], logs["loss_dm"] + 0.5 * logs["loss_adversarial"])
    real, fake = output.critic_logits
    assert real.shape == fake.shape == (B,) and not real.any() and not fake.any()


def test_critic_logits_are_the_heads_reading_of_the_bottleneck(make_dmd2):
    """Once the head has learnt, the generator's adversarial term is softplus(log M - h(features of x_t))."""
    method = make_dmd2("critic.M=50", "method.adversarial_weight=1.0")
    torch.nn.init.normal_(method.nets.read["gan_head"].out.weight)
    captured = []
    method.nets.read["gan_head"].register_forward_hook(lambda m, args, out: captured.append(out.detach()))
    logs = run(method).scalars
    generator_logits = captured[0]
    assert generator_logits.abs().max() > 0
    torch.testing.assert_close(logs["loss_adversarial"], F.softplus(math.log(50) - generator_logits).mean())


def test_adversarial_warmup_holds_the_generators_gan_term(make_dmd2):
    method = make_dmd2("method.adversarial_warmup_images=40")  # B = 4: iterations 0..9 warm up
    logs = run(method, 5).scalars  # a generator turn inside the warm-up
    assert "loss_dm" in logs and "loss_adversarial" not in logs and "loss_critic" in logs
    logs = run(method, 10).scalars
    assert "loss_adversarial" in logs


def test_toy_teacher_has_no_bottleneck_for_the_head(make_dmd2, toy_teacher):
    with pytest.raises(InputError, match=r"^method\.adversarial: .*mid block"):
        make_dmd2(teacher=toy_teacher, data="8gaussians")
    method = make_dmd2("method.adversarial=false", "method.sigma_init=2.5", teacher=toy_teacher, data="8gaussians")
    logs = run(method, batch=data_batch(shape=(2,))).scalars
    assert set(logs) == {"loss_dm", "loss_fake_score"} and all(torch.isfinite(v) for v in logs.values())


# -------------------------------------------------------------------------------------------------------- config

@pytest.mark.parametrize("override, message", [
    ("method.dm_t_min=0.9", r"^method\.dm_t_min: must be below method\.dm_t_max"),
    ("method.sigma_min=100 method.sigma_max=50", r"^method\.sigma_min: must be below method\.sigma_max"),
    ("method.fake_updates_per_step=0", r"^method\.fake_updates_per_step: "),
    ("critic.channels=[8]", r"^critic\.channels: not used by method 'dmd2'"),
    ("method.adv_weight=0.5", r"^method\.adv_weight: unknown key; did you mean 'method\.adversarial_weight'\?"),
    ("method.adversarial_weight=.inf", r"^method\.adversarial_weight: Input should be a finite number"),
    ("method.critic_weight=.nan", r"^method\.critic_weight: Input should be a finite number"),
    ("method.spacing=karras", r"^method\.spacing: unknown key"),
])
def test_bad_recipes_are_one_line_errors(recipe_file, vp_teacher, override, message):
    path = recipe_file({"method": {"name": "dmd2", "dm_t_max": 0.5}, "data": {"name": "digits"},
                        "teacher": {"path": str(vp_teacher)}})
    with pytest.raises(ConfigError, match=message):
        load_recipe(path, override.split())
