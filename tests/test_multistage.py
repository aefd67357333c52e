"""Multi-stage (telescoping) ratio estimation: waymarks, summed heads, per-stage objectives."""

import math

import pytest
import torch
from torch import nn

from n2ce_distill.multistage import MultiStageCritic, multistage_loss, waymark_coefficients, waymarks
from n2ce_distill.objectives import CD, N2CE, NCE, NWJ

DTYPE = torch.float64


class Quadratic(nn.Module):
    """l(x) = w2 x^2 + w1 x + w0 on 1-D inputs: contains every log-ratio of two 1-D Gaussians."""

    def __init__(self, w=(0.0, 0.0, 0.0)):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w, dtype=DTYPE))

    def forward(self, x, shift=0.0):
        return self.w[0] * x ** 2 + self.w[1] * x + self.w[2] + shift


def gaussian_log_ratio(x, m1, s1, m2, s2):
    return (-0.5 * ((x - m1) / s1) ** 2 - math.log(s1)) - (-0.5 * ((x - m2) / s2) ** 2 - math.log(s2))


def test_waymark_coefficients():
    torch.testing.assert_close(waymark_coefficients(4), torch.tensor([0, 0.25, 0.5, 0.75, 1], dtype=DTYPE))
    torch.testing.assert_close(waymark_coefficients(4, power=2.0),
                               torch.tensor([0, 1 / 16, 1 / 4, 9 / 16, 1], dtype=DTYPE))
    root = waymark_coefficients(3, power=0.5)
    torch.testing.assert_close(root, torch.tensor([0, (1 / 3) ** 0.5, (2 / 3) ** 0.5, 1], dtype=DTYPE))
    assert (root.diff() > 0).all()
    for K, power in ((0, 1.0), (1.5, 1.0), (3, 0.0), (3, -1.0)):
        with pytest.raises(ValueError, match="K" if power == 1.0 else "power"):
            waymark_coefficients(K, power)


def test_waymarks_endpoints_and_interpolation():
    g = torch.Generator().manual_seed(0)
    xd, xn = torch.randn(16, 3, generator=g), torch.randn(16, 3, generator=g)
    a = waymark_coefficients(3, power=1.5)
    xs = waymarks(xd, xn, a)
    assert len(xs) == 4
    assert torch.equal(xs[0], xd) and torch.equal(xs[-1], xn)
    for ak, xk in zip(a.tolist(), xs):
        torch.testing.assert_close(xk, math.sqrt(1 - ak ** 2) * xd + ak * xn)
    with pytest.raises(ValueError, match="same shape"):
        waymarks(xd, xn[:8], a)
    for bad in ([0.0, 0.5], [0.2, 1.0], [0.0, 0.6, 0.4, 1.0], [0.0]):
        with pytest.raises(ValueError, match="waymark coefficients"):
            waymarks(xd, xn, bad)


def test_multistage_critic_sums_heads_and_passes_arguments():
    heads = [Quadratic((0.1, -1.0, 2.0)), Quadratic((0.0, 3.0, 0.5)), Quadratic((-0.2, 0.0, 1.0))]
    critic = MultiStageCritic(heads)
    x = torch.linspace(-2, 2, 7, dtype=DTYPE)
    assert critic.num_stages == 3
    torch.testing.assert_close(critic(x), sum(h(x) for h in heads))
    torch.testing.assert_close(critic(x, shift=1.0), critic(x) + 3.0)
    assert len(list(critic.parameters())) == 3
    with pytest.raises(ValueError):
        MultiStageCritic([])


@pytest.mark.parametrize("objective", [NCE(), N2CE(M=100.0, ratio_reg=0.5), NWJ(), CD(ratio_reg=1.0)],
                         ids=repr)
def test_one_stage_is_the_single_stage_objective(objective):
    g = torch.Generator().manual_seed(1)
    xd, xn = 2 + torch.randn(32, generator=g, dtype=DTYPE), torch.randn(32, generator=g, dtype=DTYPE)
    head = Quadratic((0.3, -0.7, 0.2))
    w = torch.rand(32, generator=g, dtype=DTYPE)
    single = objective(head(xd, shift=0.1), head(xn, shift=0.1), w, w)
    multi = multistage_loss(MultiStageCritic([head]), objective, xd, xn, [0.0, 1.0], weight=w, shift=0.1)
    assert torch.equal(multi, single)


def test_loss_is_sum_of_adjacent_stage_losses():
    g = torch.Generator().manual_seed(2)
    xd, xn = torch.randn(32, generator=g, dtype=DTYPE), torch.randn(32, generator=g, dtype=DTYPE)
    heads = [Quadratic((0.1 * k, -0.5, 0.3 * k)) for k in range(3)]
    a = waymark_coefficients(3, power=2.0)
    xs = waymarks(xd, xn, a)
    objective = N2CE(M=10.0)
    expected = sum(objective(h(xs[k]), h(xs[k + 1])) for k, h in enumerate(heads))
    torch.testing.assert_close(multistage_loss(MultiStageCritic(heads), objective, xd, xn, a), expected)
    # a defaults to linear waymarks for K stages; a length mismatch is an error
    critic = MultiStageCritic(heads)
    torch.testing.assert_close(multistage_loss(critic, objective, xd, xn),
                               multistage_loss(critic, objective, xd, xn, waymark_coefficients(3)))
    with pytest.raises(ValueError, match="stages"):
        multistage_loss(MultiStageCritic(heads), objective, xd, xn, waymark_coefficients(2))


@pytest.mark.parametrize("objective", [NCE(), N2CE(M=10.0)], ids=repr)
def test_trained_heads_telescope_to_total_log_ratio(objective):
    """p_data = N(2, 0.5^2), q = N(0, 1), K = 3: each trained head finds log p_k/p_{k+1}, and their sum
    the total log p/q, although p and q barely overlap."""
    m, s, n = 2.0, 0.5, 20000
    g = torch.Generator().manual_seed(3)
    xd = m + s * torch.randn(n, generator=g, dtype=DTYPE)
    xn = torch.randn(n, generator=g, dtype=DTYPE)
    a = waymark_coefficients(3)
    critic = MultiStageCritic([Quadratic() for _ in range(3)])
    opt = torch.optim.LBFGS(critic.parameters(), lr=1, max_iter=200, tolerance_grad=1e-10,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = multistage_loss(critic, objective, xd, xn, a)
        loss.backward()
        return loss

    opt.step(closure)
    # waymark k is N(c_k m, c_k^2 s^2 + a_k^2) with c_k = sqrt(1 - a_k^2)
    c = (1 - a ** 2).sqrt()
    means, stds = (c * m).tolist(), (c ** 2 * s ** 2 + a ** 2).sqrt().tolist()
    x = torch.linspace(0.0, 3.0, 31, dtype=DTYPE)
    with torch.no_grad():
        for k, head in enumerate(critic.heads):
            stage = gaussian_log_ratio(x, means[k], stds[k], means[k + 1], stds[k + 1])
            assert (head(x) - stage).abs().max() < 0.1, k
        total = gaussian_log_ratio(x, m, s, 0.0, 1.0)
        err = (critic(x) - total).abs()
        assert err.max() < 0.15 and err.max() / total.abs().max() < 0.05
