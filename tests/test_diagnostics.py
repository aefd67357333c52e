"""Critic diagnostics: analytic values, self-normalisation of a true log-ratio, the regimes, the chasm warning."""

import math

import pytest
import torch

from n2ce_distill.diagnostics import CHASM_ACCURACY, LINEAR_RMS, RegimeMonitor, chasm_warning, critic_diagnostics


def test_hand_made_logits():
    ld = torch.tensor([2.0, -1.0, 3.0, 0.5])
    ln = torch.tensor([-2.0, -1.0, 1.0, 0.0])  # 0 counts as neither side's win
    diag = critic_diagnostics(ld, ln)
    expected = {
        "acc_data": 0.75, "acc_noise": 0.5, "logit_data": 1.125, "logit_noise": -0.5, "logit_gap": 1.625,
        "logit_rms": math.sqrt((4 + 1 + 9 + 0.25 + 4 + 1 + 1 + 0) / 8), "kl_estimate": 1.125,
        "self_normalisation": math.log((math.exp(-2) + math.exp(-1) + math.e + 1) / 4),
    }
    assert diag.pop("regime") == "informative"
    assert diag.keys() == expected.keys()
    for key, value in expected.items():
        assert isinstance(diag[key], float)
        assert diag[key] == pytest.approx(value, abs=1e-6), key
    # with M: the share of noise samples whose N²CE weight M r / (M + r) is capped (r > M, i.e. l > log M)
    assert critic_diagnostics(ld, ln, M=math.e ** 0.5)["capped_noise"] == 0.25
    assert critic_diagnostics(ld, ln, M=100.0)["capped_noise"] == 0.0
    with pytest.raises(ValueError, match="M"):
        critic_diagnostics(ld, ln, M=0.0)


def test_any_shape_is_flattened_and_gradients_are_ignored():
    ld = torch.randn(4, 3, 5, requires_grad=True)
    ln = torch.randn(6, 2)
    assert critic_diagnostics(ld, ln) == critic_diagnostics(ld.detach().reshape(-1), ln.reshape(-1))


def test_self_normalisation_is_finite_for_huge_logits():
    diag = critic_diagnostics(torch.zeros(3), torch.tensor([1e4, 1e4, -1e4, -1e4]))
    assert diag["self_normalisation"] == pytest.approx(1e4 - math.log(2), rel=1e-6)


def test_true_gaussian_log_ratio_is_self_normalised_and_gives_the_kl():
    # p = N(0, I), q = N(mu, s^2 I) in 2-D: log r = -|x|^2/2 + |x - mu|^2 / (2 s^2) + d log s
    g = torch.Generator().manual_seed(0)
    mu, s, d, n = torch.tensor([1.0, -0.5]), 1.3, 2, 400_000
    log_r = lambda x: -0.5 * x.pow(2).sum(1) + 0.5 * (x - mu).pow(2).sum(1) / s**2 + d * math.log(s)
    x_data = torch.randn(n, d, generator=g, dtype=torch.float64)
    x_noise = mu + s * torch.randn(n, d, generator=g, dtype=torch.float64)
    diag = critic_diagnostics(log_r(x_data), log_r(x_noise))
    kl = 0.5 * (d / s**2 + mu.pow(2).sum().item() / s**2 - d + 2 * d * math.log(s))
    assert abs(diag["self_normalisation"]) < 0.02
    assert diag["kl_estimate"] == pytest.approx(kl, abs=0.01)
    # a wrong constant offset shows up one-for-one in the self-normalisation
    shifted = critic_diagnostics(log_r(x_data) + 0.7, log_r(x_noise) + 0.7)
    assert shifted["self_normalisation"] == pytest.approx(diag["self_normalisation"] + 0.7, abs=1e-9)


def test_chasm_warning_on_saturated_logits_only():
    g = torch.Generator().manual_seed(0)
    saturated = critic_diagnostics(8 + torch.randn(1000, generator=g), -8 + torch.randn(1000, generator=g))
    message = chasm_warning(saturated)
    assert message is not None
    for hint in ("larger noise magnification M", "multistage", "regularisation"):
        assert hint in message
    balanced = critic_diagnostics(0.5 + torch.randn(1000, generator=g), -0.5 + torch.randn(1000, generator=g))
    assert chasm_warning(balanced) is None
    # only one side saturated is not the chasm
    assert chasm_warning({**saturated, "acc_noise": 0.6}) is None
    # the threshold is respected
    assert chasm_warning(balanced, threshold=0.5) is not None


def test_empty_logits_raise():
    with pytest.raises(ValueError, match="logits_noise"):
        critic_diagnostics(torch.ones(3), torch.ones(0))


def test_regimes_follow_the_documented_thresholds():
    g = torch.Generator().manual_seed(0)
    tiny = critic_diagnostics(0.02 + 0.01 * torch.randn(500, generator=g), -0.02 + 0.01 * torch.randn(500, generator=g))
    assert tiny["regime"] == "linear" and tiny["logit_rms"] < LINEAR_RMS
    # same signs, scaled past the RMS threshold: informative, though the accuracies are unchanged
    scaled = critic_diagnostics(10 * (0.02 + 0.01 * torch.randn(500, generator=g)), 10 * (-0.02 + 0.01 * torch.randn(500, generator=g)))
    assert scaled["regime"] == "informative"
    # saturated accuracies on both sides are the chasm, unless the logits are tiny: then every objective
    # gives the same update however well their signs separate the batches
    separated = critic_diagnostics(torch.full((200,), 0.05), torch.full((200,), -0.05))
    assert separated["acc_data"] == separated["acc_noise"] == 1.0 > CHASM_ACCURACY
    assert separated["regime"] == "linear"
    assert critic_diagnostics(torch.full((200,), 0.5), torch.full((200,), -0.5))["regime"] == "chasm"
    one_side = critic_diagnostics(torch.full((200,), 5.0), torch.cat([torch.full((190,), -5.0), torch.full((10,), 5.0)]))
    assert one_side["regime"] == "informative"  # noise accuracy 0.95


def test_regime_monitor_says_linear_once_after_patience_and_chasm_once():
    monitor = RegimeMonitor(patience=3)
    linear = {"regime": "linear", "logit_rms": 0.01}
    chasm = critic_diagnostics(torch.full((200,), 9.0), torch.full((200,), -9.0))
    assert monitor.observe(0, linear) == [] and monitor.observe(50, linear) == []
    assert monitor.observe(100, {"regime": "informative"}) == []  # the run of linear steps is broken
    assert [monitor.observe(s, linear) for s in (150, 200)] == [[], []]
    (message,) = monitor.observe(250, linear)
    assert "since step 150" in message and "changes only the step size" in message
    assert monitor.observe(300, linear) == []  # said once
    (entered,) = monitor.observe(350, chasm)
    assert "step 350" in entered and "density chasm" in entered
    assert monitor.observe(400, chasm) == []
    assert monitor.summary() == ("critic regime over 9 logged steps: linear 67%, informative 11%, chasm 22%; mostly "
                                 "linear: another critic objective would have changed the step size, not the updates")
    mostly_chasm = RegimeMonitor()
    mostly_chasm.observe(0, chasm)
    assert mostly_chasm.summary() == "critic regime over 1 logged steps: linear 0%, informative 0%, chasm 100%"
    assert RegimeMonitor().summary() is None
    with pytest.raises(ValueError, match="patience"):
        RegimeMonitor(patience=0)
