"""fit_density_ratio: recovers a known Gaussian log-ratio; source kinds; determinism; warnings; validation."""

import math
import warnings

import pytest
import torch

from n2ce_distill.critics import MLPCritic
from n2ce_distill.diagnostics import ChasmWarning
from n2ce_distill.estimator import RatioFit, fit_density_ratio
from n2ce_distill.objectives import N2CE

D, MU, S = 2, torch.tensor([1.0, 0.5]), 1.5
# p = N(0, I) (data), q = N(MU, S^2 I) (noise)
TRUE_KL = 0.5 * (D / S**2 + MU.pow(2).sum().item() / S**2 - D + 2 * D * math.log(S))


def true_log_ratio(x):
    return -0.5 * x.pow(2).sum(1) + 0.5 * (x - MU).pow(2).sum(1) / S**2 + D * math.log(S)


def sample_data(n, generator=None):
    return torch.randn(n, D, generator=generator)


def sample_noise(n, generator=None):
    return MU + S * torch.randn(n, D, generator=generator)


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    # these tiny nets gain nothing from intra-op threads, and on a busy shared machine they lose a lot
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def pools():
    g = torch.Generator().manual_seed(0)
    data, noise = sample_data(20_000, g), sample_noise(20_000, g)
    test_data, test_noise = sample_data(2000, g), sample_noise(2000, g)
    return data, noise, test_data, test_noise


def errors(critic, test_data, test_noise):
    test = torch.cat([test_data, test_noise])
    with torch.no_grad():
        mae = (critic(test) - true_log_ratio(test)).abs().mean().item()
        kl = critic(test_data).mean().item()
    return mae, kl


@pytest.mark.parametrize("objective, kwargs", [("n2ce", {"M": 10.0}), ("nce", {})])
def test_recovers_gaussian_log_ratio(pools, objective, kwargs):
    data, noise, test_data, test_noise = pools
    torch.manual_seed(0)
    critic = MLPCritic(D, hidden_features=64, num_layers=2)
    mae_before, _ = errors(critic, test_data, test_noise)
    fit = fit_density_ratio(critic, data, noise, objective, steps=400, batch_size=512, lr=2e-3,
                            generator=torch.Generator().manual_seed(1), log_every=50, **kwargs)
    assert isinstance(fit, RatioFit) and fit.critic is critic
    mae, kl = errors(critic, test_data, test_noise)
    assert mae < 0.2 < mae_before
    assert kl == pytest.approx(TRUE_KL, abs=0.1)
    last = fit.history[-1]
    assert [h["step"] for h in fit.history] == list(range(50, 401, 50))
    assert abs(last["self_normalisation"]) < 0.2
    assert set(last) >= {"step", "loss", "acc_data", "acc_noise", "kl_estimate", "self_normalisation"}


def test_three_source_kinds(pools):
    data, noise, test_data, test_noise = pools
    g = torch.Generator().manual_seed(2)
    sources = {
        "tensor": (data, noise),
        "iterable": (list(data[:10_240].split(256)), [(x, torch.zeros(len(x))) for x in noise[:10_240].split(256)]),
        "callable": (lambda n: sample_data(n, g), lambda n: sample_noise(n, g)),
    }
    for kind, (d, n) in sources.items():
        torch.manual_seed(0)
        critic = MLPCritic(D, hidden_features=32, num_layers=2)
        fit_density_ratio(critic, d, n, "n2ce", M=10.0, steps=250, batch_size=256, lr=3e-3,
                          generator=torch.Generator().manual_seed(1), log_every=250)
        mae, kl = errors(critic, test_data, test_noise)
        assert mae < 0.3, kind
        assert kl == pytest.approx(TRUE_KL, abs=0.15), kind


def test_iterable_is_cycled_and_tuples_take_first_element():
    seen = []

    class Recording(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 1)

        def forward(self, x):
            seen.append(x.shape[0])
            return self.lin(x).squeeze(-1)

    batches = [torch.randn(3, 2), torch.randn(5, 2)]
    fit_density_ratio(Recording(), batches, [(torch.randn(4, 2), "label")], "nce", steps=3)
    assert seen == [3, 4, 5, 4, 3, 4]


def test_objective_instance_and_determinism(pools):
    data, noise, _, _ = pools

    def run(seed):
        torch.manual_seed(0)
        critic = MLPCritic(D, hidden_features=16, num_layers=1)
        fit = fit_density_ratio(critic, data, noise, N2CE(M=5.0, ratio_reg=0.01), steps=30, batch_size=64,
                                generator=torch.Generator().manual_seed(seed))
        return fit.history, critic.state_dict()

    (h1, w1), (h2, w2), (h3, _) = run(7), run(7), run(8)
    assert len(h1) == 30 and h1 == h2
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    assert h1 != h3


def test_chasm_warning_emitted_once_when_saturated():
    g = torch.Generator().manual_seed(0)
    data, far_noise = torch.randn(4000, D, generator=g), 8.0 + torch.randn(4000, D, generator=g)
    torch.manual_seed(0)
    with pytest.warns(ChasmWarning, match="density chasm") as record:
        fit = fit_density_ratio(MLPCritic(D, 16, 1), data, far_noise, "nce", steps=150, batch_size=128,
                                lr=1e-2, generator=g, log_every=10)
    assert len([w for w in record if issubclass(w.category, ChasmWarning)]) == 1
    assert fit.history[-1]["acc_data"] > 0.99 and fit.history[-1]["acc_noise"] > 0.99


def test_no_chasm_warning_on_overlapping_gaussians(pools):
    data, noise, _, _ = pools
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ChasmWarning)
        fit_density_ratio(MLPCritic(D, 16, 1), data, noise, "nce", steps=100, batch_size=128, lr=1e-2,
                          generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("kwargs, match", [
    ({"steps": 0}, "steps"),
    ({"batch_size": -1}, "batch_size"),
    ({"log_every": 1.5}, "log_every"),
    ({"lr": 0.0}, "lr"),
    ({"data": "samples"}, "data"),
    ({"noise": 3.0}, "noise"),
    ({"data": torch.empty(0, 2)}, "data"),
    ({"noise": []}, "noise"),
    ({"noise": lambda n: [0.0] * n}, "noise"),
    ({"objective": "bogus"}, "bogus"),
    ({"objective": 42}, "objective"),
    ({"objective": N2CE(M=5.0), "M": 10.0}, "objective_kwargs"),
    ({"critic": MLPCritic(D, 8, 1, conditioned=True)}, "conditioned"),
    ({"critic": lambda x: x}, "critic"),
    ({"critic": torch.nn.ReLU()}, "no parameters"),
])
def test_validation_errors_name_the_argument(kwargs, match):
    args = {"critic": MLPCritic(D, 8, 1), "data": torch.randn(10, D), "noise": torch.randn(10, D),
            "steps": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        fit_density_ratio(**args)
