"""SiD / SiDA method: zero SiD term at initialisation, encoder logits, summed losses, warm-ups, N²CE terms."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from n2ce_distill.methods.sid import SiD
from n2ce_distill.objectives import N2CE, NCE, build_generator_loss

SHAPE = (1, 8, 8)  # digits
B = 4


@pytest.fixture
def make_sid(tiny_method):
    """Build a SiD on a tiny teacher (the 8x8 VP one by default) with extra dotted overrides."""
    return lambda *overrides, **kw: tiny_method(SiD, "sid", *overrides, **kw)


def make_update(method, calls: list):
    """A minimal ``Trainer._update``: backward into the optimiser's own parameters, clip, step, zero."""
    opts = method.optimizers()

    def update(optimizer, loss, clip=None):  # the optimiser's name is the term's
        term = optimizer
        assert torch.isfinite(loss).all(), term
        opt = opts[optimizer]
        owned = [p for group in opt.param_groups for p in group["params"] if p.requires_grad]
        loss.backward(inputs=owned)
        norm = torch.nn.utils.clip_grad_norm_([p for p in owned if p.grad is not None], clip or 1.0)
        calls.append((term, optimizer, loss.detach(), float(norm)))
        opt.step()
        opt.zero_grad(set_to_none=True)

    return update


def data_batch(seed: int = 1, shape=SHAPE) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, *shape, generator=g) * 2 - 1


def step(method, step_index: int = 0, calls: list | None = None, seed: int = 3, batch=None, full: bool = False):
    """One training step's logged scalars (``full``: the whole :class:`StepOutput`)."""
    torch.manual_seed(seed)
    batch = data_batch() if batch is None else batch
    output = method.training_step(batch, step_index, make_update(method, [] if calls is None else calls))
    return output if full else output.scalars


def params(module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in module.parameters()]).clone()


# ---------------------------------------------------------------------------------------------- SiD term

def test_sid_term_is_zero_while_fake_score_equals_teacher(make_sid):
    """D_psi = D_phi at init, so (D_phi - D_psi)(...) = 0: loss_sid is 0 and its generator gradient vanishes.

    (The gradient is zero only up to rounding: the teacher's and the fake score's equal and opposite
    contributions meet at x_t in a different summation order, so Adam would still move the weights.)
    """
    method = make_sid("optim.fake_score.lr=1.0e-30", "method.adversarial=false")
    calls = []
    logs = step(method, calls=calls)
    assert [c[1] for c in calls] == ["fake_score", "generator"]
    assert logs["loss_fake_score"] > 0
    assert abs(float(logs["loss_sid"])) < 1e-6
    assert "loss_critic" not in logs and "loss_adversarial" not in logs
    assert calls[1][3] < 1e-3, f"generator gradient norm {calls[1][3]:g} at D_psi = D_phi"


def test_sid_term_is_nonzero_once_fake_score_moves(make_sid):
    """Control for the test above: with a real fake-score learning rate, the same step gives loss_sid != 0."""
    method = make_sid("optim.fake_score.lr=1.0e-3", "method.adversarial=false")
    calls = []
    logs = step(method, calls=calls)
    assert abs(float(logs["loss_sid"])) > 1e-4
    assert calls[1][3] > 1e-1, f"generator gradient norm {calls[1][3]:g} once D_psi has moved"


# ---------------------------------------------------------------------------------------------- encoder logits

def test_critic_logits_are_the_encoder_features_channel_mean(make_sid):
    """SiDA's critic has no weights of its own: its logits are the channel mean of the fake score network's
    bottleneck, (B, h, w) at the mid block's resolution."""
    method = make_sid()
    fake = method.nets.read["fake_score"]
    with torch.no_grad():
        fake(torch.randn(3, *SHAPE), torch.tensor([0.1, 1.0, 10.0]))
    features = method.encoder.read()
    assert features.shape[0] == 3 and features.shape[2:] == (4, 4)  # the 8x8 UNet's mid block runs at 4x4
    torch.testing.assert_close(method._critic_logits(), features.float().mean(dim=1), rtol=0, atol=0)


def test_toy_teacher_without_mid_block_is_rejected(make_sid, toy_teacher):
    """A ToyMLP teacher has no mid block: SiDA's critic cannot be built and the error names method.adversarial."""
    with pytest.raises(ValueError, match=r"method\.adversarial"):
        make_sid(teacher=toy_teacher, data="8gaussians")
    # plain SiD (no critic) still trains on it
    method = make_sid("method.adversarial=false", teacher=toy_teacher, data="8gaussians")
    logs = step(method, batch=data_batch(shape=(2,)))
    assert set(logs) == {"loss_fake_score", "loss_sid"} and all(torch.isfinite(v) for v in logs.values())


# ---------------------------------------------------------------------------------------------- summed losses

def test_losses_are_sums_over_elements(make_sid):
    """Recompute every logged loss from captured tensors: sums over pixels / logit positions, means over batch."""
    M, alpha, adv_weight = 100.0, 1.2, 0.5
    method = make_sid("critic.objective=n2ce", f"critic.M={M}", "critic.ratio_reg=1.0", "optim.fake_score.lr=1.0e-3",
                      f"method.alpha={alpha}", f"method.adv_weight={adv_weight}")
    fake_score, generator, teacher = method.nets.read["fake_score"], method.nets.read["generator"], method.frozen["teacher"]
    sd = fake_score.sigma_data
    mid_inputs, score_calls, score_out, gen_out, teacher_out, objective_calls = [], [], [], [], [], []
    fake_score.net.mid_block.register_forward_pre_hook(lambda m, a: mid_inputs.append(a[0].detach().clone()))
    fake_score.register_forward_pre_hook(lambda m, a: score_calls.append((a[0].detach().clone(), a[1].detach().clone())))
    fake_score.register_forward_hook(lambda m, a, out: score_out.append(out.detach().clone()))
    generator.register_forward_hook(lambda m, a, out: gen_out.append(out.detach().clone()))
    teacher.register_forward_hook(lambda m, a, out: teacher_out.append(out.detach().clone()))
    original = method.objective

    def recording(ld, ln, **kw):
        value = original(ld, ln, **kw)
        objective_calls.append((ld.detach(), ln.detach(), kw, value.detach()))
        return value

    method.objective = recording
    calls = []
    logs = step(method, calls=calls)
    assert len(mid_inputs) == len(score_calls) == 2 and len(gen_out) == 2 and len(teacher_out) == 1

    # 1. fake-score step: x = cat([x_g, data]) noised at the same sigma
    sigma = score_calls[0][1][:B]
    torch.testing.assert_close(score_calls[0][1], sigma.repeat(2))
    weight = (sigma**2 + sd**2) / (sigma * sd) ** 2
    x_g = gen_out[0]
    expected_fake = (weight * (score_out[0][:B] - x_g).pow(2).sum(dim=(1, 2, 3))).mean()
    torch.testing.assert_close(logs["loss_fake_score"], expected_fake)

    features = mid_inputs[0]
    positions = features.shape[-2] * features.shape[-1]
    assert positions == 16  # the 8x8 UNet's mid block runs at 4x4
    logits_fake, logits_real = features.mean(dim=1).split(B)
    ld, ln, kw, mean_value = objective_calls[0]
    torch.testing.assert_close(ld, logits_real)
    torch.testing.assert_close(ln, logits_fake)
    torch.testing.assert_close(kw["weight_data"], weight)
    torch.testing.assert_close(logs["loss_critic"], positions * mean_value)
    torch.testing.assert_close(logs["loss_critic"], positions * N2CE(M=M, ratio_reg=1.0)(logits_real, logits_fake, weight, weight))
    torch.testing.assert_close(calls[0][2], logs["loss_fake_score"] + logs["loss_critic"])

    # 2. generator step on x_t = x_g + s n: the teacher and the (updated) fake score see the same x_t
    x_t, sigma_t = score_calls[1]
    x_g, real, fake = gen_out[1], teacher_out[0], score_out[1]
    assert (sigma_t >= method.recipe.method.sigma_min).all() and (sigma_t <= method.recipe.method.sigma_max).all()
    w = (x_g - real).abs().flatten(1).mean(1)
    per_pixel = (real - fake) * ((real - x_g) - alpha * (real - fake))
    expected_sid = (per_pixel.flatten(1).sum(1) / w).mean()
    assert abs(float(expected_sid)) > 1e-4
    torch.testing.assert_close(logs["loss_sid"], expected_sid)
    logits = mid_inputs[1].mean(dim=1)
    adversarial = positions * (F.softplus(math.log(M) - logits) / w.view(-1, 1, 1)).mean()
    torch.testing.assert_close(logs["loss_adversarial"], adversarial)
    torch.testing.assert_close(calls[1][2], (1 - adv_weight) * expected_sid + adv_weight * adversarial)


# ---------------------------------------------------------------------------------------------- warm-ups

def test_generator_warmup_freezes_generator(make_sid):
    """Before generator_warmup_images the generator is never updated and no SiD loss is logged."""
    method = make_sid("method.generator_warmup_images=100")  # B = 4 images per step: steps 0..24 warm up
    before = params(method.nets.read["generator"])
    for index in (0, 24):
        calls = []
        logs = step(method, index, calls)
        assert "loss_sid" not in logs and "loss_adversarial" not in logs and "loss_critic" in logs
        assert [c[1] for c in calls] == ["fake_score"]
    assert torch.equal(params(method.nets.read["generator"]), before)
    calls = []
    logs = step(method, 25, calls)  # 25 * 4 = 100 images seen: warm-up over
    assert "loss_sid" in logs and [c[1] for c in calls] == ["fake_score", "generator"]
    assert not torch.equal(params(method.nets.read["generator"]), before)


def test_adversarial_warmup(make_sid):
    """Before adversarial_warmup_images the generator minimises the SiD term alone; after, the mix."""
    method = make_sid("method.adversarial_warmup_images=100", "method.adv_weight=0.3")
    calls = []
    logs = step(method, 24, calls)
    assert "loss_adversarial" not in logs and "loss_sid" in logs and "loss_critic" in logs
    torch.testing.assert_close(calls[1][2], logs["loss_sid"], rtol=0, atol=0)
    calls = []
    logs = step(method, 25, calls)
    assert "loss_adversarial" in logs
    torch.testing.assert_close(calls[1][2], 0.7 * logs["loss_sid"] + 0.3 * logs["loss_adversarial"])


# ---------------------------------------------------------------------------------------------- N²CE terms

def test_n2ce_generator_term_is_softplus_log_m_minus_logit():
    """build_generator_loss("n2ce_nonsat", M) = mean(w * softplus(log M - l)), weight broadcast per sample."""
    g = torch.Generator().manual_seed(0)
    logits, weight = 4 * torch.randn(B, 4, 4, generator=g), torch.rand(B, generator=g)
    for M in (1.0, 50.0, 1e4):
        term = build_generator_loss("n2ce_nonsat", M=M)
        by_hand = torch.log1p(torch.exp(math.log(M) - logits))
        torch.testing.assert_close(term(logits), by_hand.mean())
        torch.testing.assert_close(term(logits, weight=weight), (weight.view(-1, 1, 1) * by_hand).mean())
    # at M = 1 it is the ordinary non-saturating GAN term
    torch.testing.assert_close(build_generator_loss("n2ce_nonsat", M=1.0)(logits), F.softplus(-logits).mean())


@pytest.mark.parametrize("objective, generator_loss, expected", [
    ("n2ce", "nonsat", lambda l: F.softplus(math.log(20.0) - l)),
    ("nce", "nonsat", lambda l: F.softplus(-l)),
    ("gan", "nonsat", lambda l: F.softplus(-l)),
    ("n2ce", "kl", lambda l: -l),
])
def test_method_generator_term_follows_critic(make_sid, objective, generator_loss, expected):
    """SiD's adversarial term: softplus(log M - l) under an N²CE critic, the usual GAN/KL terms otherwise."""
    method = make_sid(f"critic.objective={objective}", "critic.M=20.0", f"method.generator_loss={generator_loss}")
    assert method.objective.log_offset == pytest.approx(math.log(20.0) if objective == "n2ce" else 0.0)
    assert type(method.objective) is (N2CE if objective == "n2ce" else NCE)
    logits = torch.linspace(-30, 30, 61).view(1, 61)
    torch.testing.assert_close(method.generator_term(logits), expected(logits).mean())


@pytest.mark.parametrize("objective, M", [("n2ce", 100.0), ("nce", 1.0)])
def test_logit_clamp_is_centred_on_log_m(make_sid, objective, M):
    """logit_clamp c clamps l - log M into [-c, c]: huge logits read log M + c, tiny ones log M - c."""
    c = 3.0
    method = make_sid(f"critic.objective={objective}", f"critic.M={M}", f"method.logit_clamp={c}")
    log_m = math.log(M)
    logits = torch.tensor([1e6, -1e6, log_m + 1.0, log_m - 2.5, log_m])
    expected = torch.tensor([log_m + c, log_m - c, log_m + 1.0, log_m - 2.5, log_m])
    torch.testing.assert_close(method._clamped(logits), expected)
    unclamped = make_sid(f"critic.objective={objective}", f"critic.M={M}")
    assert torch.equal(unclamped._clamped(logits), logits)


def test_logit_clamp_bounds_logged_logits(make_sid):
    """With a tight clamp, the critic's reported logits stay within log M +- c during a real step."""
    c = 1e-3
    method = make_sid("critic.objective=n2ce", "critic.M=100.0", f"method.logit_clamp={c}")
    for logits in step(method, full=True).critic_logits:
        assert (logits - math.log(100.0)).abs().max() <= c + 1e-5


# ---------------------------------------------------------------------------------------------- smoke

@pytest.mark.parametrize("objective", ["gan", "nce", "n2ce"])
@pytest.mark.parametrize("teacher_fixture", ["edm_unet_teacher", "vp_teacher"])
def test_one_step_finite(make_sid, request, teacher_fixture, objective):
    """One SiDA step with each UNet teacher and critic objective: all logs finite, both networks updated."""
    method = make_sid(f"critic.objective={objective}", teacher=request.getfixturevalue(teacher_fixture))
    before = {name: params(net) for name, net in method.nets.read.items()}
    calls = []
    output = step(method, calls=calls, full=True)
    logs = output.scalars
    assert set(logs) == {"loss_fake_score", "loss_critic", "loss_sid", "loss_adversarial"}
    assert all(torch.isfinite(v).all() for v in logs.values()), logs
    real, fake = output.critic_logits  # per-position maps, one per sample
    assert real.shape == fake.shape and real.shape[0] == B and torch.isfinite(torch.cat([real, fake])).all()
    assert [c[1] for c in calls] == ["fake_score", "generator"]
    for name, net in method.nets.read.items():
        assert not torch.equal(params(net), before[name]), name
