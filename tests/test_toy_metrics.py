import math

import pytest
import torch

from n2ce_distill.data import EightGaussians
from n2ce_distill.toy_metrics import eight_gaussians_report, sliced_wasserstein2


def test_sw2_is_zero_on_identical_sets_and_exact_for_a_shift():
    x = torch.randn(2000, 2, generator=torch.Generator().manual_seed(0))
    assert sliced_wasserstein2(x, x) == pytest.approx(0.0, abs=1e-12)
    # a shift c along one axis projects to c cos(theta): SW2^2 = mean c^2 cos^2 = c^2 / 2
    assert sliced_wasserstein2(x, x + torch.tensor([3.0, 0.0])) == pytest.approx(3 / math.sqrt(2), rel=1e-3)


def test_sw2_handles_unequal_sizes_and_rejects_bad_shapes():
    x = torch.randn(1000, 2, generator=torch.Generator().manual_seed(1))
    assert sliced_wasserstein2(x, x[::2]) < 0.1
    with pytest.raises(ValueError, match="expected \\(N, D\\) and \\(M, D\\)"):
        sliced_wasserstein2(x, torch.randn(10, 3))


def test_report_on_true_samples_and_on_a_collapsed_sampler():
    dist = EightGaussians()
    ref = dist.sample(4000, torch.Generator().manual_seed(0))
    good = eight_gaussians_report(dist.sample(4000, torch.Generator().manual_seed(1)), ref, dist)
    assert good["modes_covered"] == 8 and good["mode_balance"] > 0.8 and good["off_mode_fraction"] < 0.02
    collapsed = dist.centers[:1].float() + 0.1 * torch.randn(4000, 2, generator=torch.Generator().manual_seed(2))
    bad = eight_gaussians_report(collapsed, ref, dist)
    assert bad["modes_covered"] == 1 and bad["mode_balance"] == 0.0
    assert bad["sw2"] > 10 * good["sw2"]
    assert good["nll"] == pytest.approx(float(-dist.log_prob(dist.sample(4000, torch.Generator().manual_seed(1))).double().mean()))
