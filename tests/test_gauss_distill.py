"""gauss_distill: the exact KL and score gap of the Gaussian generator, one distillation run, the report."""

import math
import statistics

import pytest
import torch

from n2ce_distill.benchmarks import BENCHMARKS, gauss_distill
from n2ce_distill.benchmarks.chasm import block_correlation, block_covariance


def _target(dim):
    cov = block_covariance(dim, block_correlation(dim, dim / 4))
    return cov, torch.linalg.inv(cov), float(torch.logdet(cov))


def _moved_generator(dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    student = gauss_distill.GaussianGenerator(dim)
    with torch.no_grad():
        student.A.add_(0.2 * torch.randn(dim, dim, generator=g))
        student.b.copy_(torch.randn(dim, generator=g))
    return student


def test_kl_is_the_closed_form_and_starts_at_d_times_e_minus_1_5_over_2():
    dim = 8
    cov, precision, logdet = _target(dim)
    assert gauss_distill.GaussianGenerator(dim).kl_to(precision, logdet) == pytest.approx(dim * (math.e - 1.5) / 2, rel=1e-6)
    student = _moved_generator(dim)
    A, b = student.A.detach().double(), student.b.detach().double()
    q = torch.distributions.MultivariateNormal(b, A @ A.T)
    p = torch.distributions.MultivariateNormal(torch.zeros(dim, dtype=torch.float64), cov)
    assert student.kl_to(precision, logdet) == pytest.approx(float(torch.distributions.kl_divergence(q, p)), rel=1e-8)


def test_true_score_gap_is_the_gradient_of_the_exact_log_ratio():
    dim = 6
    cov, precision, _ = _target(dim)
    student = _moved_generator(dim, seed=1)
    A, b = student.A.detach().double(), student.b.detach().double()
    q = torch.distributions.MultivariateNormal(b, A @ A.T)
    p = torch.distributions.MultivariateNormal(torch.zeros(dim, dtype=torch.float64), cov)
    x = student(torch.randn(20, dim)).detach().double().requires_grad_(True)
    (want,) = torch.autograd.grad((p.log_prob(x) - q.log_prob(x)).sum(), x)
    torch.testing.assert_close(student.true_score_gap(x, precision), want.float(), rtol=1e-4, atol=1e-4)


def test_one_run_learns_and_a_run_that_blows_up_is_flagged(monkeypatch):
    setting = gauss_distill.Setting("d=16", dim=16)
    run = gauss_distill.train(setting, "nce", seed=0, iterations=300)
    assert len(run.kl) == 301 and run.kl[0] == pytest.approx(16 * (math.e - 1.5) / 2, rel=1e-5)
    assert not run.diverged and run.kl[-1] < 0.2 * run.kl[0]
    assert run.reach(0.2) is not None and run.kl[run.reach(0.2)] <= 0.2 * run.kl[0] < run.kl[run.reach(0.2) - 1]
    assert run.reach(1e-9) is None
    assert len(run.regimes) == len(run.cosines) == 300 // gauss_distill.PROBE_EVERY
    assert run.regimes[0] == "linear"  # the critic starts at l = 0
    assert min(run.cosines) > -1 and statistics.median(run.cosines) > 0.5  # it points the generator the right way
    monkeypatch.setattr(gauss_distill, "SGD_LR", 10.0)
    blown = gauss_distill.train(gauss_distill.Setting("sgd", dim=16, optimizer="sgd"), "nce", seed=0, iterations=300)
    assert blown.diverged and len(blown.kl) < 301 and not blown.kl[-1] < gauss_distill.DIVERGED


def test_quick_benchmark_reports_every_objective(tmp_path):
    report = BENCHMARKS["gauss_distill"](quick=True, out=tmp_path)
    assert (tmp_path / "gauss_distill.png").stat().st_size > 0
    import json

    saved = json.loads((tmp_path / "gauss_distill.json").read_text())
    curves = saved["kl"]["d=16"]["nce"]  # every seed's KL every CURVE_EVERY iterations
    assert len(curves) == 2 and len(curves[0]) == 300 // saved["every"] + 1
    assert curves[0][0] == pytest.approx(16 * (math.e - 1.5) / 2, rel=1e-3)  # saved to 4 significant digits
    tables = [block for block in report.split("\n\n") if block.startswith("| objective")]
    assert len(tables) == 2  # quick: d = 16 and gamma = 1
    for table in tables:
        rows = [line.split(" | ")[0].strip("| ") for line in table.splitlines()[2:]]
        assert rows == list(gauss_distill.OBJECTIVES)
        for line in table.splitlines()[2:]:
            regimes = line.split(" | ")[4]
            assert sum(float(v) for v in regimes.split(" / ")) == pytest.approx(100, abs=1.5)
