"""Benchmarks: each runs in quick mode, returns its markdown table and writes its PNG; plus cheap checks
of the properties the benchmarks exist to show."""

from __future__ import annotations

import math

import pytest
import torch

from n2ce_distill.benchmarks import BENCHMARKS, chasm, mle_gradient, u_curve
from n2ce_distill.reporting import fmt, markdown_table


def _table(text: str) -> tuple[list[str], list[list[str]]]:
    """Header and body cells of the first markdown table in ``text``."""
    lines = []
    for ln in text.splitlines():
        if ln.startswith("|"):
            lines.append(ln)
        elif lines:  # the first table ended
            break
    split = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]
    assert set(lines[1].replace("|", "").split()) == {"---"}
    return split[0], split[2:]


OURS = ("chasm", "mle_gradient", "u_curve", "overhead")


def test_registry_names():
    assert set(OURS) <= set(BENCHMARKS)
    assert all(callable(BENCHMARKS[name]) for name in OURS)


def test_markdown_table_and_fmt():
    text = markdown_table(["a", "b"], [[1, 0.123456], ["x", float("inf")]])
    assert text.splitlines() == ["| a | b |", "| --- | --- |", "| 1 | 0.123 |", "| x | inf |"]
    assert fmt(12345.0) == "1.23e+04"
    with pytest.raises(ValueError):
        markdown_table(["a"], [[1, 2]])


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    return out, {name: BENCHMARKS[name](quick=True, out=out) for name in OURS}


def test_chasm_quick(quick_results):
    out, results = quick_results
    header, rows = _table(results["chasm"])
    assert header == ["method", "d=40 (KL 10)"]
    assert [r[0] for r in rows] == [chasm.TRUTH] + [m.label for m in chasm.METHODS]
    assert (out / "chasm.png").stat().st_size > 0 and (out / "chasm_steps.png").stat().st_size > 0
    est = {r[0]: float(r[1].split()[0]) for r in rows}
    assert all(math.isfinite(v) for v in est.values())
    assert est[chasm.TRUTH] == pytest.approx(10, rel=0.05)  # the exact ratio's E_p l on 10k samples
    # the point of the benchmark: magnifying the noise pulls the estimate towards the truth (10 nats)
    assert abs(est["N2CE M=1000"] - 10) < abs(est["NCE"] - 10)


def test_mle_gradient_quick(quick_results):
    out, results = quick_results
    header, rows = _table(results["mle_gradient"])
    assert header[0] == "M" and len(header) == 8
    assert [r[0] for r in rows] == ["1", "10", "100", "1000", "10000", "MLE"]
    assert (out / "mle_gradient.png").stat().st_size > 0
    errors = [float(r[2]) for r in rows[:-1]]
    assert all(a > b for a, b in zip(errors, errors[1:]))  # bias shrinks monotonically in M
    # SCE: the measured ratio is exactly M/(M+1)
    assert all(r[4] == r[5] for r in rows)


def test_u_curve_quick(quick_results):
    out, results = quick_results
    header, rows = _table(results["u_curve"])
    assert header[:4] == ["n", "sqrt(n)", "M*", "C = M*/sqrt(n)"]
    assert [int(r[0]) for r in rows] == list(u_curve.NS)
    assert (out / "u_curve.png").stat().st_size > 0
    for r in rows:
        at_one, best, at_inf = float(r[5]), float(r[6]), float(r[7])
        assert best <= at_one and best <= at_inf


def test_overhead_quick(quick_results):
    out, results = quick_results
    header, rows = _table(results["overhead"])
    assert header == ["variant", "noise samples / step", "median step (ms)", "IQR (ms)",
                      "ratio to NCE, paired by round (IQR)"]
    assert [r[0] for r in rows] == ["NCE", "N2CE (M=100)", "naive copies (M=4)"]
    assert rows[0][4] == "1.000 (1.000 .. 1.000)" and all(float(r[4].split()[0]) > 0 for r in rows)
    assert int(rows[2][1]) == 4 * int(rows[0][1])
    assert (out / "overhead.png").stat().st_size > 0


# exact properties, cheaper than a quick run

def test_mle_gradient_matches_spec_reference():
    quad = mle_gradient.gauss_hermite_2d(40)
    g1 = mle_gradient.expected_gradient((1.0, 0.0), 1.0, quad)
    g100 = mle_gradient.expected_gradient((1.0, 0.0), 100.0, quad)
    assert torch.allclose(g1, torch.tensor([0.324, 0.316], dtype=torch.float64), atol=1e-3)
    assert torch.allclose(g100, torch.tensor([1.628, 2.569], dtype=torch.float64), atol=1e-3)
    # at mu = 0 the critic is 0 (r = 1), so N2CE is exactly M/(M+1) times the MLE gradient
    for M in (1.0, 10.0, 1e3):
        g = mle_gradient.expected_gradient((0.0, 0.0), M, quad)
        assert torch.allclose(g, M / (M + 1) * mle_gradient.mle_gradient((0.0, 0.0)), rtol=1e-10)


def test_mle_gradient_sce_is_half_for_nce():
    quad = mle_gradient.gauss_hermite_2d(30)
    mu = (2.0, -1.0)
    g = mle_gradient.expected_gradient(mu, 1.0, quad, self_contrastive=True)
    assert torch.allclose(g, 0.5 * mle_gradient.mle_gradient(mu), rtol=1e-10)


def test_chasm_model_and_sampler():
    gen = torch.Generator().manual_seed(0)
    dim, kl = 8, 2.0
    rho = chasm.block_correlation(dim, kl)
    x = chasm.sample_p(200_000, dim, rho, gen)
    cov = x.T @ x / len(x)
    assert abs(cov[0, 1] - rho) < 0.01 and abs(cov[0, 2]) < 0.01
    # the true log-ratio is representable: A = S^-1 - I, d*beta = KL, and then E_p l = KL
    critic = chasm.QuadraticCritic(dim)
    block = torch.linalg.inv(torch.tensor([[1.0, rho], [rho, 1.0]])) - torch.eye(2)
    with torch.no_grad():
        critic.weight.copy_(torch.block_diag(*[block] * (dim // 2)))
        critic.beta.fill_(kl / dim)
        assert abs(float(critic(x).mean()) - kl) < 0.05


def test_chasm_true_log_ratio_and_linear_critic_term():
    dim = 6
    rho = chasm.block_correlation(dim, dim / 4)
    cov = chasm.block_covariance(dim, rho)
    assert cov[0, 1] == rho and cov[1, 2] == 0 and torch.equal(cov, cov.T)
    x = torch.randn(50, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    p = torch.distributions.MultivariateNormal(torch.zeros(dim, dtype=torch.float64), cov)
    q = torch.distributions.MultivariateNormal(torch.zeros(dim, dtype=torch.float64), torch.eye(dim, dtype=torch.float64))
    torch.testing.assert_close(chasm.true_log_ratio(x, rho), p.log_prob(x) - q.log_prob(x))
    critic = chasm.QuadraticCritic(dim, linear=True).double()
    assert torch.equal(critic(x), torch.zeros(50, dtype=torch.float64))  # starts at l = 0
    with torch.no_grad():
        critic.shift.fill_(1.0)
    torch.testing.assert_close(critic(x), x.sum(1))
    assert chasm.QuadraticCritic(dim).shift is None


def test_chasm_fresh_batches_never_repeat_and_fit_tracks_every_interval():
    batches = list(chasm.fresh_batches(4, 8, 5, torch.Generator().manual_seed(0)))
    assert len(batches) == 5 and all(d.shape == n.shape == (8, 4) for d, n in batches)
    assert len({tuple(d[0].tolist()) for d, _ in batches}) == 5
    steps = 2 * chasm.TRACK_EVERY + 3
    track = torch.randn(100, 4)
    method = next(m for m in chasm.METHODS if m.label == "NCE")
    critic, trajectory = chasm.fit(method, 4, chasm.fresh_batches(4, 64, steps, torch.Generator().manual_seed(0)),
                                   steps, 3e-3, track=track)
    assert len(trajectory) == 3 + 1 and trajectory[0] == 0.0  # steps 0, 100, 200, and the end
    with torch.no_grad():
        assert trajectory[-1] == pytest.approx(float(critic(track).mean()))


def test_u_curve_best_M_parabola():
    Ms = u_curve.m_grid(per_decade=2, lo=0, hi=4)
    mse = (Ms.log() - math.log(100.0)).square() + 1.0  # exact minimum at M = 100
    m_star, lo, hi = u_curve.best_M(Ms, mse)
    assert m_star == pytest.approx(100.0, rel=1e-6) and lo <= 100.0 <= hi


def test_u_curve_batch_gradient_matches_closed_form():
    gen = torch.Generator().manual_seed(1)
    x_data = 1.0 + torch.randn(3, 50, u_curve.DIM, generator=gen, dtype=torch.float64)
    x_noise = torch.randn(3, 50, u_curve.DIM, generator=gen, dtype=torch.float64)
    mu = torch.full((u_curve.DIM,), 0.75, dtype=torch.float64)
    M = 30.0
    got = u_curve._batch_gradients(x_data, x_noise, mu, M)
    r_d, r_n = (x_data @ mu - mu @ mu / 2).exp(), (x_noise @ mu - mu @ mu / 2).exp()
    want = (((M / (M + r_d))[..., None] * (x_data - mu)).mean(1)
            - ((M * r_n / (M + r_n))[..., None] * (x_noise - mu)).mean(1))
    assert torch.allclose(got, want, rtol=1e-10)


def test_train_step_stand_in_has_the_ddpm_cifar10_architecture(tmp_path):
    """The stand-in must cost what google/ddpm-cifar10-32 costs: 35.7M parameters (Ho et al. 2020), 3x32x32, the
    1000-step linear VP schedule; and it must load through the same code as the hub teacher."""
    from n2ce_distill.benchmarks.train_step import STANDINS
    from n2ce_distill.denoisers import VPDenoiser, load_denoiser

    teacher = load_denoiser(str(STANDINS["google/ddpm-cifar10-32"](tmp_path / "teacher")))
    assert isinstance(teacher, VPDenoiser) and teacher.sample_shape == (3, 32, 32)
    assert abs(sum(p.numel() for p in teacher.net.parameters()) - 35.7e6) < 0.05e6
    assert abs(teacher.sigma_max - 157.4) < 0.1


def test_train_step_stand_ins_have_their_teachers_architecture(tmp_path):
    """ImageNet-64: EDM's class-conditional ADM (296M parameters, 1000 classes, no null class, Karras et al. 2022)
    read with the consistency-model ports' c_noise; conditional CIFAR-10: the net the shipped teacher recipe
    trains (its channels, 10 classes and the null class its label dropout adds). Both load as the real ones do."""
    from n2ce_distill.benchmarks.train_step import STANDINS
    from n2ce_distill.config import load_recipe
    from n2ce_distill.denoisers import EDMDenoiser, load_denoiser
    from n2ce_distill.shipped import shipped

    imagenet = load_denoiser(str(STANDINS["dg845/diffusers-cm_edm_imagenet64_ema"](tmp_path / "imagenet")))
    assert isinstance(imagenet, EDMDenoiser) and imagenet.c_noise == "cm" and imagenet.null_class is None
    assert imagenet.sample_shape == (3, 64, 64) and imagenet.num_classes == 1000
    assert abs(sum(p.numel() for p in imagenet.net.parameters()) - 296e6) < 0.5e6
    del imagenet
    cond = load_denoiser(str(STANDINS["../runs/cifar10-cond-teacher/pipeline"](tmp_path / "cond")))
    net_cfg = load_recipe(shipped("recipes", "cifar10_cond_teacher.yaml")).method.net
    assert isinstance(cond, EDMDenoiser) and cond.sample_shape == (3, 32, 32)
    assert (cond.num_classes, cond.null_class) == (10, 10)
    assert list(cond.net.config.block_out_channels) == list(net_cfg.block_out_channels)


def test_every_shipped_recipe_has_a_teacher_or_a_stand_in():
    """So that ``bench train_step`` runs each shipped recipe offline; a recipe that renames its teacher's path
    without a stand-in fails here rather than in a user's benchmark."""
    from pathlib import Path

    from n2ce_distill.benchmarks.train_step import STANDINS
    from n2ce_distill.config import read_recipe
    from n2ce_distill.shipped import shipped

    recipes = sorted(shipped("recipes").glob("*.yaml"))
    assert len(recipes) >= 24
    for path in recipes:
        teacher = (read_recipe(path).get("teacher") or {}).get("path")
        assert teacher is None or teacher in STANDINS or Path(teacher).exists(), (path.name, teacher)


def test_train_step_writes_class_folders_for_a_labelled_recipe(recipe_file, vp_cond_teacher, tmp_path):
    """Missing labelled CIFAR-10 becomes random images in one folder per teacher class, which the image-folder
    data set reads as 10 classes (the class-count check against the teacher then passes)."""
    from n2ce_distill.benchmarks.train_step import _offline
    from n2ce_distill.config import load_recipe
    from n2ce_distill.data import dataset_from_config, num_classes

    recipe = recipe_file({"method": {"name": "dxmi"}, "teacher": {"path": str(vp_cond_teacher)},
                          "data": {"name": "cifar10", "root": str(tmp_path / "absent"), "labels": True}})
    overrides = _offline(str(recipe), [], tmp_path / "scratch")
    data = load_recipe(recipe, overrides).data
    assert data.name == "image-folder" and data.image_size == 32
    dataset = dataset_from_config(data, seed=0)
    assert num_classes(dataset) == 10 and len(dataset) == 256
    assert {int(y) for _, y in (dataset[i] for i in range(len(dataset)))} == set(range(10))


def test_train_step_writes_captions_and_prompts_for_a_text_recipe(recipe_file, sd_teacher, tmp_path):
    """Missing captioned images become random images with a metadata.jsonl caption per image (one prompt each),
    and a missing prompt file a file of prompts, both read by the recipe's own data code."""
    from n2ce_distill.benchmarks.train_step import _offline
    from n2ce_distill.config import load_recipe
    from n2ce_distill.data import dataset_from_config, prompts, read_prompts

    captioned = recipe_file({"method": {"name": "dxmi"}, "teacher": {"path": str(sd_teacher)},
                             "data": {"name": "image-folder", "root": str(tmp_path / "absent"), "image_size": 8,
                                      "caption_column": "caption"}}, name="captioned.yaml")
    data = load_recipe(captioned, _offline(str(captioned), [], tmp_path / "scratch-a")).data
    assert len(set(prompts(dataset_from_config(data, seed=0)))) == 256
    prompt_only = recipe_file({"method": {"name": "sid", "adversarial": False}, "teacher": {"path": str(sd_teacher)},
                               "data": {"name": "prompts", "root": str(tmp_path / "absent.txt"), "image_size": 8}},
                              name="prompts.yaml")
    (tmp_path / "scratch-b").mkdir()  # the benchmark's scratch folder exists
    data = load_recipe(prompt_only, _offline(str(prompt_only), [], tmp_path / "scratch-b")).data
    assert len(read_prompts(data.root, "data.root")) == 64


def test_steady_step_is_the_first_step_past_every_warm_up_at_a_cycle_start(recipe_file, vp_teacher):
    """SiD at batch 8 with warm-ups of 100k and 200k images: step 25000 is the first whose images (step x batch)
    reach both; DMD2 at batch 4 with a 10-image warm-up: step 3, rounded up to its 5-iteration cycle; no warm-up:
    step 0."""
    from n2ce_distill.benchmarks.train_step import steady_step
    from n2ce_distill.config import load_recipe

    def recipe(method: dict, batch: int):
        path = recipe_file({"method": method, "data": {"name": "digits"}, "teacher": {"path": str(vp_teacher)}})
        return load_recipe(path, [f"train.batch_size={batch}"])

    sid = {"name": "sid", "generator_warmup_images": 100_000, "adversarial_warmup_images": 200_000}
    assert steady_step(recipe(sid, 8), cycle=1) == 25_000
    assert steady_step(recipe(sid | {"adversarial_warmup_images": 200_001}, 8), cycle=1) == 25_001
    assert steady_step(recipe({"name": "dmd2", "adversarial_warmup_images": 10}, 4), cycle=5) == 5
    assert steady_step(recipe({"name": "dxmi"}, 8), cycle=1) == 0


def test_train_step_measures_past_the_warm_ups_and_averages_a_cycle(recipe_file, vp_teacher, tmp_path):
    """SiD's generator waits for its warm-up: the benchmark's iteration is past it (a generator phase is counted).
    DMD2 updates its generator on one iteration in K: the benchmark's per-iteration generator phase is the mean over
    a cycle, so doubling K halves it. A precision override measures only that precision."""
    from n2ce_distill.benchmarks.train_step import run

    def phases(method: dict, tag: str) -> dict[str, float]:
        recipe = recipe_file({"method": method, "data": {"name": "digits"}, "teacher": {"path": str(vp_teacher)}},
                             name=f"{tag}.yaml")
        text = run(quick=True, out=tmp_path / tag, args=[str(recipe), "train.mixed_precision=no"])
        assert "fp32 peak" in text and "bf16" not in text
        _, rows = _table(text.split("\n\n", 1)[1])
        assert {row[0] for row in rows} == {"no"}
        return {row[1]: float(row[2]) for row in rows}

    sid = phases({"name": "sid", "generator_warmup_images": 10**6}, "sid")
    assert sid["generator"] > 0 and sid["fake_score"] > 0
    every_second, every_fourth = (phases({"name": "dmd2", "fake_updates_per_step": k}, f"dmd2-{k}") for k in (2, 4))
    # the table prints 3 significant digits
    assert every_fourth["generator"] == pytest.approx(every_second["generator"] / 2, rel=5e-3)
    for flops in (every_second, every_fourth):
        assert flops["iteration"] == pytest.approx(flops["generator"] + flops["fake_score"] + flops["other"], rel=5e-3)


def test_train_step_accounts_every_flop_of_an_iteration(recipe_file, vp_teacher, tmp_path):
    """DxMI's trajectory (T sampler calls on B images, no grad) costs exactly what sampling B images costs; the
    critic phase (forward on B data + B samples, backward to the weights) costs two to three times the critic's
    forward alone (the weight gradients double it; the input gradients, not needed at the first layer, add up
    to one more); the phase split leaves nothing unlabelled but the FLOP-free EMA update."""
    from torch.utils.flop_counter import FlopCounterMode

    from n2ce_distill.benchmarks.train_step import run
    from n2ce_distill.config import load_recipe
    from n2ce_distill.critics import build_critic

    recipe = recipe_file({"method": {"name": "dxmi", "num_steps": 2}, "data": {"name": "digits"},
                          "teacher": {"path": str(vp_teacher)},
                          "critic": {"channels": [8, 16], "num_res_blocks": 2}})
    text = run(quick=True, out=tmp_path, args=[str(recipe)])
    headers, rows = _table(text.split("\n\n", 1)[1])
    assert headers == ["precision", "phase", "GFLOP", "ms (median)", "GFLOP/s", "% of peak"]
    critic = build_critic(load_recipe(recipe).critic, (1, 8, 8))
    with FlopCounterMode(display=False) as counter:
        critic(torch.zeros(16, 1, 8, 8))  # the quick run's batch 8: 8 data + 8 samples
    forward = counter.get_total_flops() / 1e9
    for precision in ("no", "bf16"):
        flops = {row[1]: float(row[2]) for row in rows if row[0] == precision}
        assert list(flops) == ["trajectory", "critic", "value", "sampler", "other", "iteration", "sampling (8)"]
        assert flops["trajectory"] == pytest.approx(flops["sampling (8)"], rel=0.01)
        assert 2 * forward * 0.99 <= flops["critic"] <= 3 * forward * 1.01
        assert flops["other"] == 0
    assert "fp32 peak" in text and "bf16 peak" in text


def test_bench_arguments_are_checked(capsys):
    from n2ce_distill.cli import main

    assert main(["bench", "train_step"]) == 2
    assert "bench train_step: needs a recipe" in capsys.readouterr().err
    assert main(["bench", "chasm", "extra"]) == 2
    assert "bench chasm: takes no arguments, got 'extra'" in capsys.readouterr().err
