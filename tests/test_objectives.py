"""Critic objectives and generator terms: optima, MLE limit, divergences, numerics, weights, registries."""

import math
from typing import get_args

import pytest
import torch
import torch.nn.functional as F
from annotated_types import Gt

from n2ce_distill.objectives import (
    CD, GENERATOR_LOSSES, N2CE, NCE, NWJ, OBJECTIVES, CriticObjective, build_generator_loss,
    build_objective, cd_loss, generator_mle, generator_minimax, generator_n2ce_nonsat, generator_nonsat,
    generator_reverse_kl, n2ce_loss, nce_loss, nwj_loss, ratio_regularizer, stable_exp,
)

DTYPE = torch.float64
# two distributions on 5 states, with a large ratio range (log p/q from about -2.7 to 2.9)
P = torch.tensor([0.02, 0.08, 0.2, 0.3, 0.4], dtype=DTYPE)
Q = torch.tensor([0.3, 0.3, 0.25, 0.1, 0.05], dtype=DTYPE)
S = len(P)


def discrete_loss(objective, l, p=P, q=Q):
    """Exact expectation over the discrete states: mean(w * loss) with w = S * prob is sum(prob * loss)."""
    return objective(l, l, weight_data=S * p, weight_noise=S * q)


def minimise_free_logits(objective, p=P, q=Q):
    l = torch.zeros(S, dtype=DTYPE, requires_grad=True)
    opt = torch.optim.LBFGS([l], lr=1, max_iter=500, tolerance_grad=1e-13, tolerance_change=1e-15,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = discrete_loss(objective, l, p, q)
        loss.backward()
        return loss

    opt.step(closure)
    return l.detach()


def gauss_hermite(n):
    """Nodes/weights (summing to 1) for E f(z), z ~ N(0, 1), by Golub-Welsch in float64."""
    off = torch.arange(1, n, dtype=DTYPE).sqrt()
    nodes, vecs = torch.linalg.eigh(torch.diag(off, 1) + torch.diag(off, -1))
    return nodes, vecs[0] ** 2


def binary_entropy(a):
    return -a * math.log(a) - (1 - a) * math.log(1 - a)


def kl(p, q):
    return float((p * (p / q).log()).sum())


# ---------------------------------------------------------------------------------------------- basics

def test_nce_and_n2ce_at_M1_equal_bce_with_logits():
    g = torch.Generator().manual_seed(0)
    ld, ln = 3 * torch.randn(64, generator=g), 3 * torch.randn(64, generator=g)
    bce = (F.binary_cross_entropy_with_logits(ld, torch.ones_like(ld))
           + F.binary_cross_entropy_with_logits(ln, torch.zeros_like(ln)))
    for loss in (nce_loss(ld, ln), n2ce_loss(ld, ln, 1.0), N2CE(M=1)(ld, ln), NCE()(ld, ln)):
        torch.testing.assert_close(loss, bce)
    w = torch.rand(64, generator=g)
    weighted = (F.binary_cross_entropy_with_logits(ld, torch.ones_like(ld), weight=w)
                + F.binary_cross_entropy_with_logits(ln, torch.zeros_like(ln), weight=w))
    torch.testing.assert_close(nce_loss(ld, ln, w, w), weighted)


def test_n2ce_per_sample_gradients():
    l = torch.linspace(-6, 6, 13, dtype=DTYPE)
    r = l.exp()
    for M in (0.1, 1.0, 100.0):
        ld, ln = l.clone().requires_grad_(), l.clone().requires_grad_()
        n2ce_loss(ld, ln, M).backward()
        torch.testing.assert_close(ld.grad * len(l), -M / (M + r))
        torch.testing.assert_close(ln.grad * len(l), M * r / (M + r))


def test_naive_reweighting_is_n2ce_of_shifted_logit():
    """softplus(-g) + M softplus(g) with g = l - log M is N²CE; reading g as log r is off by log M."""
    g = torch.Generator().manual_seed(1)
    ld, ln, M = torch.randn(32, generator=g), torch.randn(32, generator=g), 50.0
    gd, gn = ld - math.log(M), ln - math.log(M)
    naive = F.softplus(-gd).mean() + M * F.softplus(gn).mean()
    torch.testing.assert_close(n2ce_loss(ld, ln, M), naive)
    # ... and its optimum g* = log p/q - log M (so g is not the log-ratio)
    l_star = minimise_free_logits(N2CE(M=M))
    torch.testing.assert_close(l_star - math.log(M), (P / Q).log() - math.log(M))


# ---------------------------------------------------------------------------------------------- optima

@pytest.mark.parametrize("objective", [NCE(), N2CE(M=0.1), N2CE(M=10), N2CE(M=1000), NWJ()],
                         ids=repr)
def test_free_logit_minimiser_is_log_ratio(objective):
    torch.testing.assert_close(minimise_free_logits(objective), (P / Q).log(), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("gamma", [0.25, 1.0])
def test_cd_with_ratio_reg_has_shrunk_optimum(gamma):
    # d/dl [-p l + q l + gamma (p + q) l^2] = 0  =>  l = (p - q) / (2 gamma (p + q))
    expected = (P - Q) / (2 * gamma * (P + Q))
    l_star = minimise_free_logits(CD(ratio_reg=gamma))
    torch.testing.assert_close(l_star, expected, atol=1e-6, rtol=1e-6)
    assert (l_star - (P / Q).log()).abs().max() > 0.5


def test_closed_forms_and_ratio_reg_term():
    g = torch.Generator().manual_seed(2)
    ld, ln = torch.randn(16, generator=g), torch.randn(16, generator=g)
    torch.testing.assert_close(ratio_regularizer(ld, ln), ld.square().mean() + ln.square().mean())
    torch.testing.assert_close(cd_loss(ld, ln), -ld.mean() + ln.mean())
    torch.testing.assert_close(nwj_loss(ld, ln), -(ld.mean() - ln.exp().mean() + 1))
    for plain, reg in ((NCE(), NCE(ratio_reg=0.3)), (N2CE(M=7), N2CE(M=7, ratio_reg=0.3)),
                       (NWJ(), NWJ(ratio_reg=0.3)), (CD(), CD(ratio_reg=0.3))):
        torch.testing.assert_close(reg(ld, ln), plain(ld, ln) + 0.3 * ratio_regularizer(ld, ln))


# ------------------------------------------------------------------------- MLE limit (SPEC's example)

def n2ce_parameter_gradient(M, n_nodes=60):
    """Expected N²CE ascent direction wrt mu for q* = N((3,3), I), q0 = N(0, I), model N(mu, I), mu=(1,0).

    The critic is l(x) = log N(x; mu, I) - log q0(x) = mu.x - |mu|^2/2; expectations by 2-D Gauss-Hermite.
    """
    z, w = gauss_hermite(n_nodes)
    z2 = torch.stack(torch.meshgrid(z, z, indexing="ij"), -1).reshape(-1, 2)
    w2 = (w[:, None] * w[None, :]).reshape(-1) * len(z2)
    mu = torch.tensor([1.0, 0.0], dtype=DTYPE, requires_grad=True)

    def logit(x):
        return x @ mu - mu.square().sum() / 2

    x_data = z2 + torch.tensor([3.0, 3.0], dtype=DTYPE)
    loss = n2ce_loss(logit(x_data), logit(z2), M, weight_data=w2, weight_noise=w2)
    (grad,) = torch.autograd.grad(loss, mu)
    return -grad


@pytest.mark.parametrize("M, expected", [(1.0, (0.32, 0.32)), (100.0, (1.63, 2.57)), (1e4, (1.995, 2.991))])
def test_n2ce_gradient_matches_spec_gaussian_example(M, expected):
    torch.testing.assert_close(n2ce_parameter_gradient(M), torch.tensor(expected, dtype=DTYPE),
                               atol=5e-3, rtol=0)


def test_n2ce_gradient_error_falls_like_one_over_M():
    mle = torch.tensor([2.0, 3.0], dtype=DTYPE)
    errors = {M: float((n2ce_parameter_gradient(M) - mle).norm()) for M in (1.0, 10.0, 1e2, 1e3, 1e4, 1e5)}
    values = list(errors.values())
    assert all(b < a for a, b in zip(values, values[1:]))
    # asymptotically error * M is constant
    scaled = [errors[M] * M for M in (1e3, 1e4, 1e5)]
    assert max(scaled) / min(scaled) < 1.1, errors


# ---------------------------------------------------------------------------------- divergence views

def test_nwj_at_optimum_is_minus_kl_between_gaussians():
    mp, sp, mq, sq = 1.0, 0.7, 0.0, 1.0

    def log_ratio(x):
        return (-0.5 * ((x - mp) / sp) ** 2 - math.log(sp)) - (-0.5 * ((x - mq) / sq) ** 2 - math.log(sq))

    z, w = gauss_hermite(80)
    x_p, x_q = mp + sp * z, mq + sq * z
    true_kl = math.log(sq / sp) + (sp ** 2 + (mp - mq) ** 2) / (2 * sq ** 2) - 0.5
    value = nwj_loss(log_ratio(x_p), log_ratio(x_q), len(z) * w, len(z) * w)
    assert abs(float(value) + true_kl) < 1e-10
    # and it is a minimum: perturbing the log-ratio raises the loss
    for bump in (0.1 * torch.ones_like(z), 0.05 * z):
        worse = nwj_loss(log_ratio(x_p) + bump, log_ratio(x_q) + bump, len(z) * w, len(z) * w)
        assert float(worse) > float(value) + 1e-4


def test_nwj_free_logit_minimum_is_minus_kl():
    l_star = minimise_free_logits(NWJ())
    assert abs(float(discrete_loss(NWJ(), l_star)) + kl(P, Q)) < 1e-10


def test_n2ce_value_gives_d_alpha_which_tends_to_kl():
    """D_alpha = h(alpha) - min N²CE / (1 + M), alpha = M/(1+M); (1+M) D_alpha -> KL(p||q)."""
    target = kl(P, Q)
    gaps = []
    for M in (1.0, 10.0, 100.0, 1e3, 1e4):
        alpha = M / (1 + M)
        l_star = (P / Q).log().requires_grad_()
        min_loss = discrete_loss(N2CE(M=M), l_star)
        (grad,) = torch.autograd.grad(min_loss, l_star)
        assert grad.abs().max() < 1e-12  # log p/q is the stationary point (and the loss is convex in l)
        m = alpha * Q + (1 - alpha) * P
        d_alpha = (1 - alpha) * kl(P, m) + alpha * kl(Q, m)
        assert abs(d_alpha - (binary_entropy(alpha) - float(min_loss.detach()) / (1 + M))) < 1e-12
        if M == 1.0:  # Jensen-Shannon
            assert abs(d_alpha - 0.5 * (kl(P, (P + Q) / 2) + kl(Q, (P + Q) / 2))) < 1e-12
        gaps.append(abs((1 + M) * d_alpha - target))
    assert all(b < a for a, b in zip(gaps, gaps[1:]))
    assert gaps[-1] < 1e-3 * target


@pytest.mark.parametrize("M, factor", [(1.0, 0.5), (0.5, 1 / 3), (3.0, 0.75), (100.0, 100 / 101)])
def test_self_contrastive_estimation_gives_fraction_of_mle_gradient(M, factor):
    """Noise = stop-grad copy of the model p_theta = softmax(theta): gradient = M/(M+1) x NLL gradient."""
    theta = torch.tensor([0.3, -1.0, 0.5, 2.0, 0.0], dtype=DTYPE, requires_grad=True)
    log_model = theta.log_softmax(0)
    l = log_model - log_model.detach()  # value 0 (r = 1), gradient = grad log p_theta
    loss = discrete_loss(N2CE(M=M), l, P, log_model.detach().exp())
    (grad,) = torch.autograd.grad(loss, theta)
    nll_grad = theta.detach().softmax(0) - P  # gradient of -E_P log softmax(theta)
    torch.testing.assert_close(grad, factor * nll_grad, atol=1e-14, rtol=1e-12)


# --------------------------------------------------------------------------------------------- numerics

def all_objectives():
    return [NCE(), NCE(ratio_reg=1.0), N2CE(M=1e-3), N2CE(M=1.0), N2CE(M=1e8), N2CE(M=1e8, ratio_reg=1.0),
            NWJ(), NWJ(ratio_reg=1.0), CD(), CD(ratio_reg=1.0)]


def all_generator_losses():
    return [generator_minimax, generator_nonsat, generator_reverse_kl, generator_mle,
            lambda l, weight=None: generator_n2ce_nonsat(l, 1e-3, weight),
            lambda l, weight=None: generator_n2ce_nonsat(l, 1e8, weight)]


EXTREME = [1e4, -1e4, 0.0, 60.0, -60.0, 1.0]


@pytest.mark.parametrize("objective", all_objectives(), ids=repr)
def test_objectives_finite_at_extreme_logits_fp32(objective):
    ld = torch.tensor(EXTREME, requires_grad=True)
    ln = torch.tensor(EXTREME[::-1], requires_grad=True)
    loss = objective(ld, ln)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert torch.isfinite(ld.grad).all() and torch.isfinite(ln.grad).all()


def test_generator_losses_finite_at_extreme_logits():
    for fn in all_generator_losses():
        l = torch.tensor(EXTREME, requires_grad=True)
        loss = fn(l)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(l.grad).all()


def bf16_logits(scale):
    """Logits from a Linear layer run under CPU bf16 autocast (so they are bf16), reaching +-scale."""
    layer = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[scale, 0.0]]))
    x = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.01, 0.0], [0.0, 0.0]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return layer, layer(x).squeeze(-1)


@pytest.mark.parametrize("objective", all_objectives(), ids=repr)
def test_objectives_under_bf16_autocast_compute_in_fp32(objective):
    layer, l = bf16_logits(1e4)
    assert l.dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = objective(l, l.flip(0))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    # the same as computing from the upcast logits outside autocast: no bf16 rounding inside the loss
    torch.testing.assert_close(loss, objective(l.float(), l.float().flip(0)), rtol=0, atol=0)
    loss.backward()
    assert torch.isfinite(layer.weight.grad).all()


def test_generator_losses_under_bf16_autocast():
    for fn in all_generator_losses():
        layer, l = bf16_logits(1e4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = fn(l)
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        loss.backward()
        assert torch.isfinite(layer.weight.grad).all()


def test_stable_exp_exact_below_threshold_linear_above():
    l = torch.tensor([-1e4, -5.0, 0.0, 49.0, 50.0, 51.0, 1e4], dtype=DTYPE, requires_grad=True)
    e = stable_exp(l)
    torch.testing.assert_close(e[:5], l[:5].detach().exp())
    e50 = math.exp(50.0)
    torch.testing.assert_close(e[5:], torch.tensor([2 * e50, (1 + 1e4 - 50) * e50], dtype=DTYPE))
    e.sum().backward()
    torch.testing.assert_close(l.grad[5:], torch.full((2,), e50, dtype=DTYPE))


# ---------------------------------------------------------------------------------------------- weights

@pytest.mark.parametrize("objective", [NCE(), NCE(ratio_reg=1.0), N2CE(M=30.0), NWJ(ratio_reg=0.5), CD()],
                         ids=repr)
def test_weights_scale_and_ignore(objective):
    g = torch.Generator().manual_seed(3)
    ld, ln = torch.randn(8, generator=g), torch.randn(8, generator=g)
    two = torch.full((8,), 2.0)
    torch.testing.assert_close(objective(ld, ln, two, two), 2 * objective(ld, ln))
    # zero-weighted samples do not matter, whatever their logits, and get no gradient
    keep = torch.tensor([1.0, 1, 1, 1, 0, 0, 0, 0])
    wild_d = torch.cat([ld[:4], torch.tensor([1e4, -1e4, 5.0, 7.0])]).requires_grad_()
    wild_n = torch.cat([ln[:4], torch.tensor([-1e4, 1e4, 3.0, -9.0])]).requires_grad_()
    loss = objective(wild_d, wild_n, keep, keep)
    torch.testing.assert_close(loss, 0.5 * objective(ld[:4], ln[:4]))
    loss.backward()
    assert (wild_d.grad[4:] == 0).all() and (wild_n.grad[4:] == 0).all()


def test_batch_weights_broadcast_over_patch_logits():
    g = torch.Generator().manual_seed(4)
    ld, ln = torch.randn(4, 3, 5, generator=g), torch.randn(4, 3, 5, generator=g)
    wd, wn = torch.rand(4, generator=g), torch.rand(4, generator=g)
    for objective in (NCE(ratio_reg=0.1), N2CE(M=20.0), NWJ(), CD()):
        expected = objective(ld, ln, wd[:, None, None].expand_as(ld), wn[:, None, None].expand_as(ln))
        torch.testing.assert_close(objective(ld, ln, wd, wn), expected)
        # patch logits average over all elements
        torch.testing.assert_close(objective(ld, ln), objective(ld.reshape(-1), ln.reshape(-1)))
    torch.testing.assert_close(generator_nonsat(ld, wd), (wd[:, None, None] * F.softplus(-ld)).mean())


# ------------------------------------------------------------------------------------ generator terms

def test_generator_term_values_and_gradients():
    l = torch.linspace(-4, 4, 9, dtype=DTYPE)
    r, n, M = l.exp(), len(l), 20.0
    cases = [
        (generator_minimax, -F.softplus(l), -torch.sigmoid(l)),
        (generator_nonsat, F.softplus(-l), -1 / (1 + r)),
        (lambda x: generator_n2ce_nonsat(x, M), F.softplus(math.log(M) - l), -M / (M + r)),
        (generator_reverse_kl, -l, -torch.ones_like(l)),
        (generator_mle, -r, -r),
    ]
    for fn, value, grad in cases:
        x = l.clone().requires_grad_()
        loss = fn(x)
        loss.backward()
        torch.testing.assert_close(loss, value.mean())
        torch.testing.assert_close(x.grad * n, grad)
    # every term pushes the critic logit of generated samples up
    for name in GENERATOR_LOSSES:
        x = l.clone().requires_grad_()
        build_generator_loss(name, M=M)(x).backward()
        assert (x.grad < 0).all(), name
    torch.testing.assert_close(generator_n2ce_nonsat(l, 1.0), generator_nonsat(l))


def test_each_objective_owns_its_offset_generator_term_and_parameters():
    """What a loop asks of an objective: the logit offset (log M for N²CE, else 0), the consistent
    non-saturating generator term softplus(offset - l), and the recipe parameters its __init__ takes."""
    l = torch.linspace(-6, 6, 13, dtype=DTYPE)
    for name, cls in OBJECTIVES.items():
        objective = build_objective(name, **({"M": 20.0} if "M" in cls.parameters() else {}))
        offset = math.log(20.0) if isinstance(objective, N2CE) else 0.0
        assert objective.log_offset == pytest.approx(offset), name
        torch.testing.assert_close(objective.generator_loss(l), F.softplus(offset - l).mean())
    torch.testing.assert_close(N2CE(M=20.0).generator_loss(l), generator_n2ce_nonsat(l, 20.0))
    torch.testing.assert_close(NCE().generator_loss(l), generator_nonsat(l))
    w = torch.rand(13, dtype=DTYPE)
    torch.testing.assert_close(N2CE(M=5.0).generator_loss(l, weight=w), (w * F.softplus(math.log(5.0) - l)).mean())
    assert list(N2CE.parameters()) == ["M"] and NCE.parameters() == CD.parameters() == NWJ.parameters() == {}
    assert N2CE.parameters()["M"].default == 100.0 and Gt(0) in get_args(N2CE.parameters()["M"].annotation)


def test_build_generator_loss():
    l = torch.randn(6)
    assert set(GENERATOR_LOSSES) == {"minimax", "nonsat", "n2ce_nonsat", "kl", "mle"}
    torch.testing.assert_close(build_generator_loss("n2ce_nonsat", M=5.0)(l), generator_n2ce_nonsat(l, 5.0))
    torch.testing.assert_close(build_generator_loss("kl", M=5.0)(l), -l.mean())
    w = torch.rand(6)
    torch.testing.assert_close(build_generator_loss("nonsat")(l, weight=w), (w * F.softplus(-l)).mean())
    with pytest.raises(ValueError, match="n2ce_nonsat.*M"):
        build_generator_loss("n2ce_nonsat")
    with pytest.raises(ValueError, match="M"):
        build_generator_loss("n2ce_nonsat", M=-1.0)
    with pytest.raises(ValueError, match="'wasserstein'.*kl, minimax, mle, n2ce_nonsat, nonsat"):
        build_generator_loss("wasserstein")


# ---------------------------------------------------------------------------------------- registries

def test_build_objective_and_registry():
    assert set(OBJECTIVES) == {"nce", "n2ce", "nwj", "cd", "gan"}
    obj = build_objective("n2ce", M=50, ratio_reg=1.0)
    assert isinstance(obj, N2CE) and obj.M == 50.0 and obj.ratio_reg == 1.0
    assert isinstance(build_objective("gan"), NCE) and isinstance(build_objective("NWJ"), NWJ)
    assert all(isinstance(build_objective(name), CriticObjective) for name in OBJECTIVES)
    assert repr(obj) == "N2CE(M=50, ratio_reg=1)" and repr(NWJ()) == "NWJ(ratio_reg=0)"
    with pytest.raises(ValueError, match="'hinge'.*cd, gan, n2ce, nce, nwj"):
        build_objective("hinge")
    with pytest.raises(ValueError, match="'nce' does not take M"):
        build_objective("nce", M=100)
    with pytest.raises(TypeError):
        CriticObjective()


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_invalid_hyperparameters_raise(bad):
    with pytest.raises(ValueError, match="M"):
        N2CE(M=bad)
    with pytest.raises(ValueError, match="M"):
        n2ce_loss(torch.zeros(2), torch.zeros(2), bad)
    if bad != 0.0:
        with pytest.raises(ValueError, match="ratio_reg"):
            NCE(ratio_reg=bad)
    with pytest.raises(ValueError, match="ratio_reg"):
        build_objective("cd", ratio_reg=-1e-3)


# ---------------------------------------------------------------------------------- small-logit limit

def test_first_order_weights_in_the_small_logit_limit():
    """Per-sample weights dL/dl against the first-order formulas of the module docstring (error O(l^2))."""
    M, B = 50.0, 4
    for l0 in (1e-2, -1e-2, 1e-3):
        l = torch.full((B,), l0, dtype=DTYPE)
        first_order = {
            NCE(): (-0.5 * (1 - l0 / 2), 0.5 * (1 + l0 / 2)),
            N2CE(M=M): (-(M / (M + 1)) * (1 - l0 / (M + 1)), (M / (M + 1)) * (1 + M * l0 / (M + 1))),
            NWJ(): (-1.0, 1 + l0),
            CD(): (-1.0, 1.0),
        }
        for objective, (w_data, w_noise) in first_order.items():
            ld, ln = l.clone().requires_grad_(), l.clone().requires_grad_()
            objective(ld, ln).backward()
            assert (B * ld.grad).tolist() == pytest.approx([w_data] * B, abs=l0**2), objective
            assert (B * ln.grad).tolist() == pytest.approx([w_noise] * B, abs=l0**2), objective


def _separating_critic():
    """A small MLP critic fitted (NCE) on data N(3, I) against noise N(0, I) in 4-D: far apart."""
    g = torch.Generator().manual_seed(0)
    x_data = torch.randn(256, 4, generator=g, dtype=DTYPE) + 3.0
    x_noise = torch.randn(256, 4, generator=g, dtype=DTYPE)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).to(DTYPE)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(300):
        ld, ln = net(torch.cat([x_data, x_noise])).squeeze(-1).split(256)
        loss = NCE()(ld, ln)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net, x_data, x_noise


def test_parameter_gradients_agree_as_logits_shrink_and_differ_when_large():
    """cos(grad_theta NCE, grad_theta N²CE, grad_theta CD) -> 1 like rms(l)^2 for the critic ``s f_theta``
    as s -> 0, and departs from 1 when the critic is confident (the diagnostics then read linear / chasm)."""
    from n2ce_distill.diagnostics import LINEAR_RMS, critic_diagnostics

    net, x_data, x_noise = _separating_critic()
    objectives = {"nce": NCE(), "n2ce": N2CE(M=100.0), "cd": CD(), "nwj": NWJ()}

    def gradients(scale):
        grads = {}
        for name, objective in objectives.items():
            net.zero_grad()
            ld, ln = (scale * net(torch.cat([x_data, x_noise])).squeeze(-1)).split(256)
            objective(ld, ln).backward()
            grads[name] = torch.cat([p.grad.flatten() for p in net.parameters()])
        return grads, critic_diagnostics(ld, ln)

    def one_minus_cos(grads):
        names = sorted(grads)
        return {(a, b): 1 - F.cosine_similarity(grads[a], grads[b], dim=0).item()
                for i, a in enumerate(names) for b in names[i + 1:]}

    small, diag_small = gradients(1e-2)
    smaller, _ = gradients(1e-3)
    assert diag_small["logit_rms"] < LINEAR_RMS and diag_small["regime"] == "linear"
    gaps, gaps_smaller = one_minus_cos(small), one_minus_cos(smaller)
    for pair, gap in gaps.items():
        assert gap < 1e-3, pair  # cosine above 0.999 in the linear regime
        assert 50 < gap / gaps_smaller[pair] < 200, pair  # second order: 10x smaller logits, ~100x closer

    large, diag_large = gradients(1.0)
    assert diag_large["regime"] == "chasm" and diag_large["logit_rms"] > 5
    gaps_large = one_minus_cos(large)
    assert gaps_large[("cd", "nce")] > 0.2  # NCE ignores the well-classified samples that CD still counts
    assert gaps_large[("n2ce", "nce")] > 0.5
