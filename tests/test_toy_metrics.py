import json
import math

import numpy as np
import pytest
import torch

from n2ce_distill.data import EightGaussians
from n2ce_distill.evaluation import evaluate_inputs
from n2ce_distill.toy_metrics import eight_gaussians_report, sliced_wasserstein2, toy_report


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


def test_toy_report_follows_the_named_toy_and_refuses_images():
    x = EightGaussians().sample(3000, torch.Generator().manual_seed(3))
    report = toy_report(x, "8gaussians")
    assert report["sw2"] < 0.1 and report["modes_covered"] == 8
    assert report["nll"] == pytest.approx(float(-EightGaussians().log_prob(x).double().mean()))
    # the same points against another toy: only SW2, and far worse
    assert set(toy_report(x, "checkerboard")) == {"sw2"} and toy_report(x, "checkerboard")["sw2"] > 5 * report["sw2"]
    with pytest.raises(ValueError, match=r"needs \(N, 2\) points, N >= 1, got samples of shape \(4, 1, 8, 8\)"):
        toy_report(torch.zeros(4, 1, 8, 8), "8gaussians")
    with pytest.raises(ValueError, match="unknown 2-D toy 'moons'"):
        toy_report(x, "moons")


def test_fid_command_scores_points_against_a_toy(tmp_path):
    dist = EightGaussians()
    good = tmp_path / "good"
    good.mkdir()
    np.save(good / "samples.npy", dist.sample(4000, torch.Generator().manual_seed(4)).numpy())
    np.save(tmp_path / "shifted.npy", (dist.sample(4000, torch.Generator().manual_seed(5)) + 1.0).numpy())
    table = evaluate_inputs([str(good), str(tmp_path / "shifted.npy")], "8gaussians", num_samples=None,
                            out=tmp_path / "out")
    rows = {row["label"]: row for row in json.loads((tmp_path / "out" / "fid.json").read_text())}
    assert rows["good"]["num_samples"] == 4000 and rows["good"]["sw2"] < 0.1
    assert rows["shifted.npy"]["sw2"] > 5 * rows["good"]["sw2"] and rows["shifted.npy"]["nll"] > rows["good"]["nll"] + 1
    assert table.splitlines()[0].startswith("| label | step | sw2 | nll |") and f"**{rows['good']['sw2']:.4g}**" in table
    # --num-samples takes the first points of a saved sample
    evaluate_inputs([str(good)], "8gaussians", num_samples=500, out=tmp_path / "out")
    assert json.loads((tmp_path / "out" / "fid.json").read_text())[0]["num_samples"] == 500
    # ... and more than it holds is an error naming the input, not a silent cut
    with pytest.raises(ValueError, match="input 'good': --num-samples 4001 but it holds 4000 points"):
        evaluate_inputs([str(good)], "8gaussians", num_samples=4001, out=tmp_path / "out")


def test_fid_command_refuses_what_a_toy_cannot_score(tmp_path):
    np.save(tmp_path / "images.npy", np.zeros((4, 1, 8, 8), dtype=np.float32))
    with pytest.raises(ValueError, match=r"input 'images.npy': .*needs \(N, 2\) points"):
        evaluate_inputs([str(tmp_path / "images.npy")], "8gaussians", num_samples=None, out=tmp_path / "out")
    with pytest.raises(ValueError, match="--kid, --prc and --extractor are for images"):
        evaluate_inputs([str(tmp_path / "images.npy")], "8gaussians", num_samples=None, out=tmp_path / "out", kid=True)
    # an object array would need unpickling: refused, its pickle never run
    marker = tmp_path / "ran"
    np.save(tmp_path / "crafted.npy", np.array([_Crafted(str(marker))], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="not a plain .npy array"):
        evaluate_inputs([str(tmp_path / "crafted.npy")], "8gaussians", num_samples=None, out=tmp_path / "out")
    assert not marker.exists()
    with pytest.raises(ValueError, match="from a .npy file or a folder holding samples.npy"):
        evaluate_inputs([str(tmp_path)], "8gaussians", num_samples=None, out=tmp_path / "out")


class _Crafted:
    """Unpickling it would create a marker file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_empty_or_non_finite_points_and_points_against_an_image_reference_are_refused(tmp_path, toy_teacher):
    np.save(tmp_path / "empty.npy", np.zeros((0, 2), dtype=np.float32))
    points = EightGaussians().sample(10, torch.Generator().manual_seed(0)).numpy()
    points[3] = np.nan
    np.save(tmp_path / "nan.npy", points)
    with pytest.raises(ValueError, match=r"input 'empty.npy': .*N >= 1, got samples of shape \(0, 2\)"):
        evaluate_inputs([str(tmp_path / "empty.npy")], "8gaussians", num_samples=None, out=tmp_path / "out")
    with pytest.raises(ValueError, match="input 'nan.npy': 1 of 10 points are not finite"):
        evaluate_inputs([str(tmp_path / "nan.npy")], "8gaussians", num_samples=None, out=tmp_path / "out")
    with pytest.raises(ValueError, match=r"draws points of shape \(2,\), not images; score them against a 2-D toy"):
        evaluate_inputs([f"{toy_teacher}@2"], "digits", num_samples=10, out=tmp_path / "out")
    with pytest.raises(ValueError, match="unknown reference 'moons'.*2-D toys: 8gaussians"):
        evaluate_inputs([f"{toy_teacher}@2"], "moons", num_samples=10, out=tmp_path / "out")
    np.save(tmp_path / "complex.npy", np.ones((10, 2), dtype=np.complex128))
    with pytest.raises(ValueError, match="points must be real numbers, got dtype complex128"):
        evaluate_inputs([str(tmp_path / "complex.npy")], "8gaussians", num_samples=None, out=tmp_path / "out")
    assert not (tmp_path / "out").exists()  # refused before anything was written
