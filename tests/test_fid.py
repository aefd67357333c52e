import csv
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch_fidelity.feature_extractor_inceptionv3 as tf_inception
from PIL import Image
from torch_fidelity import FeatureExtractorInceptionV3

from n2ce_distill import fid_inputs
from n2ce_distill.feature_extractors import digits_uint8
from n2ce_distill.fid import evaluate_samples, save_reference_stats
from n2ce_distill.reporting import metric_table, plot_metric_curve, write_rows

DIGITS = digits_uint8()
PERM = torch.randperm(len(DIGITS), generator=torch.Generator().manual_seed(0))
HALF_A, HALF_B = DIGITS[PERM[:898]], DIGITS[PERM[898:]]


def tensor_source(images: torch.Tensor, log: list | None = None):
    """Replays uint8 images in order as [-1, 1] floats, recording the batch sizes asked for."""
    x, position = images.float() / 127.5 - 1, [0]

    def generate(n: int, generator: torch.Generator) -> torch.Tensor:
        if log is not None:
            log.append(n)
        idx = torch.arange(position[0], position[0] + n) % len(x)
        position[0] += n
        return x[idx]

    return generate


def noise_source(n: int, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=generator) * 2 - 1


def write_folder(images: torch.Tensor, folder: Path) -> Path:
    folder.mkdir(parents=True)
    for i, img in enumerate(images):
        Image.fromarray(img.permute(1, 2, 0).squeeze(-1).numpy()).save(folder / f"{i:04d}.png")
    return folder


@pytest.fixture(scope="module")
def ref_b(tmp_path_factory) -> Path:
    return write_folder(HALF_B, tmp_path_factory.mktemp("half_b") / "images")


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fid_cache")


@pytest.fixture(autouse=True)
def no_download(monkeypatch, tmp_path):
    """Any attempt to fetch Inception weights fails the test; torch.hub's cache is an empty folder."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))

    def refuse(*args, **kwargs):
        raise AssertionError("tried to download Inception weights")

    monkeypatch.setattr(tf_inception, "load_state_dict_from_url", refuse)


def test_digits_halves_small_and_noise_large(ref_b, cache, tmp_path):
    kw = dict(num_samples=len(HALF_A), cache_dir=cache, extractor="digits")
    halves = evaluate_samples(tensor_source(HALF_A), ref_b, **kw)
    noise = evaluate_samples(noise_source, ref_b, **kw)
    # measured (shipped extractor, seed 0, 898 vs 899 images): halves 2.34, uniform noise vs half B 302.2
    # (half A vs all 1797 digits: 0.59; noise vs all digits: 306.1)
    assert halves["extractor"] == "digits" and halves["num_samples"] == len(HALF_A)
    assert 0 < halves["fid"] < 5.0
    assert noise["fid"] > 100 and noise["fid"] > 50 * halves["fid"]
    # the same half as an image folder goes through PNG decoding but must give the same number
    folder = evaluate_samples(write_folder(HALF_A, tmp_path / "half_a"), ref_b, **kw)
    assert folder["fid"] == pytest.approx(halves["fid"], rel=1e-4, abs=1e-6)


def test_same_seed_same_numbers_and_global_rng_untouched(cache):
    torch.manual_seed(123), np.random.seed(123), random.seed(123)
    states = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    kw = dict(num_samples=300, batch_size=128, cache_dir=cache)
    first = evaluate_samples(noise_source, "digits", seed=3, **kw)
    second = evaluate_samples(noise_source, "digits", seed=3, **kw)
    other = evaluate_samples(noise_source, "digits", seed=4, **kw)
    assert first["fid"] == second["fid"] and other["fid"] != first["fid"]

    # a source that ignores ``generator`` and draws from the global RNG is made deterministic too
    def global_rng_source(n, generator):
        return torch.rand(n, 1, 8, 8) * 2 - 1

    a = evaluate_samples(global_rng_source, "digits", **kw)
    b = evaluate_samples(global_rng_source, "digits", **kw)
    assert a["fid"] == b["fid"]
    assert torch.equal(torch.get_rng_state(), states[0])
    assert np.array_equal(np.random.get_state()[1], states[1]) and random.getstate() == states[2]


def test_reference_statistics_are_cached_and_reused(monkeypatch, tmp_path):
    loads = []
    original = fid_inputs.load_named_reference
    monkeypatch.setattr(fid_inputs, "load_named_reference", lambda name: loads.append(name) or original(name))
    kw = dict(num_samples=200, cache_dir=tmp_path)
    first = evaluate_samples(noise_source, "digits", **kw)
    assert loads == ["digits"]
    assert len(list(tmp_path.glob("digits-*-features.npz"))) == 1 and not list(tmp_path.glob("*.pt"))
    second = evaluate_samples(noise_source, "digits", **kw)
    assert loads == ["digits"] and second["fid"] == first["fid"]
    # KID / precision-recall need reference features: cached by the first call as well
    evaluate_samples(noise_source, "digits", kid=True, prc=True, **kw)
    assert loads == ["digits"]


def test_generator_is_streamed_in_batches(cache):
    log = []
    evaluate_samples(tensor_source(HALF_A, log), "digits", num_samples=300, batch_size=64, cache_dir=cache)
    assert log[0] == 1  # extractor="auto" looks at one sample to pick the extractor
    assert max(log[1:]) <= 64 and sum(log[1:]) == 300


def test_auto_extractor_and_no_inception_download(cache):
    assert evaluate_samples(noise_source, "digits", num_samples=50, cache_dir=cache)["extractor"] == "digits"

    def rgb_source(n, generator):
        return torch.rand(n, 3, 16, 16, generator=generator) * 2 - 1

    with pytest.raises(FileNotFoundError, match="inception_weights"):
        evaluate_samples(rgb_source, "digits", num_samples=10, cache_dir=cache)


def test_bad_inputs_raise_clear_errors(tmp_path, cache):
    kw = dict(num_samples=10, cache_dir=cache)
    with pytest.raises(FileNotFoundError, match="missing_samples"):
        evaluate_samples(tmp_path / "missing_samples", "digits", **kw)
    with pytest.raises(FileNotFoundError, match="missing_samples"):
        evaluate_samples(str(tmp_path / "missing_samples"), "digits", extractor="digits", **kw)
    with pytest.raises(ValueError, match="no-such-dataset"):
        evaluate_samples(noise_source, "no-such-dataset", **kw)
    with pytest.raises(FileNotFoundError, match="missing_ref"):
        evaluate_samples(noise_source, tmp_path / "missing_ref", **kw)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        evaluate_samples(noise_source, tmp_path / "empty", **kw)
    with pytest.raises(ValueError, match="unknown feature extractor 'lenet'"):
        evaluate_samples(noise_source, "digits", extractor="lenet", **kw)
    with pytest.raises(ValueError, match="num_samples"):
        evaluate_samples(noise_source, "digits", num_samples=None, cache_dir=cache)
    with pytest.raises(ValueError, match="asked for"):
        evaluate_samples(lambda n, g: torch.zeros(n + 1, 1, 8, 8), "digits", extractor="digits", **kw)


def test_npz_statistics_reference(tmp_path, cache):
    path = save_reference_stats("digits", tmp_path / "digits_stats.npz", cache_dir=cache)
    with np.load(path) as z:
        assert z["mu"].shape == (64,) and str(z["extractor"]) == "digits" and int(z["num_images"]) == 1797
    from_stats = evaluate_samples(noise_source, path, num_samples=200, cache_dir=cache)
    from_images = evaluate_samples(noise_source, "digits", num_samples=200, cache_dir=cache)
    assert from_stats["fid"] == pytest.approx(from_images["fid"], rel=1e-6)
    with pytest.raises(ValueError, match="statistics file"):
        evaluate_samples(noise_source, path, num_samples=200, kid=True, cache_dir=cache)


def test_kid_and_precision_recall(ref_b, cache):
    kw = dict(num_samples=300, kid=True, prc=True, cache_dir=cache, extractor="digits")
    real = evaluate_samples(tensor_source(HALF_A), ref_b, **kw)
    noise = evaluate_samples(noise_source, ref_b, **kw)
    assert {"fid", "kid", "kid_std", "precision", "recall", "f_score"} <= real.keys()
    # measured (300 vs 899): real kid 0.86 +- 1.6, precision 0.91, recall 0.93;
    # noise kid 316 +- 8.7, precision 0.09, recall 0.06
    assert real["kid"] < 0.05 * noise["kid"]
    assert real["precision"] > 0.8 and real["recall"] > 0.7 and noise["recall"] < 0.3


def test_table_writers_and_plot(tmp_path):
    rows = [
        {"label": "teacher 35 steps", "step": None, "fid": 5.0},
        {"label": "n2ce", "step": 100, "fid": 4.0, "kid": 0.01, "seconds": 1.5},
        {"label": "n2ce", "step": 200, "fid": 3.25},
        {"label": "nce", "step": 100, "fid": 4.5},
        {"label": "nce", "step": 200, "fid": 3.9},
    ]
    table = metric_table(rows)
    assert table.splitlines()[0] == "| label | step | fid | kid |"
    assert "| n2ce | 200 | **3.25** | - |" in table and "| teacher 35 steps | - | 5 | - |" in table
    with open(write_rows(rows, tmp_path / "fid.csv")) as f:
        back = list(csv.DictReader(f))
    assert list(back[0]) == ["label", "step", "fid", "kid", "seconds"] and back[2]["fid"] == "3.25"
    assert json.loads(write_rows(rows, tmp_path / "fid.json").read_text()) == rows
    with pytest.raises(ValueError, match=".txt"):
        write_rows(rows, tmp_path / "fid.txt")
    png = plot_metric_curve(rows, tmp_path / "plots" / "fid.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class _RandomInception(FeatureExtractorInceptionV3):
    """torch-fidelity's Inception with its random initialisation kept (weights are not loaded)."""

    def load_state_dict(self, *args, **kwargs):
        return None


@pytest.mark.slow
def test_inception_path_with_local_random_weights(tmp_path):
    """Plumbing only (~10 s on 2 cores, mostly the 2048x2048 eigvals): local weights, no download."""
    empty = tmp_path / "empty.pth"
    torch.save({}, empty)
    torch.manual_seed(0)
    weights = tmp_path / "inception-random.pth"
    torch.save(_RandomInception("inception-v3-compat", ["2048"], feature_extractor_weights_path=empty).state_dict(), weights)
    ref = write_folder(torch.randint(0, 256, (3, 3, 12, 12), dtype=torch.uint8), tmp_path / "ref")

    def rgb_source(n, generator):
        return torch.rand(n, 3, 12, 12, generator=generator) * 2 - 1

    out = evaluate_samples(rgb_source, ref, num_samples=3, batch_size=3, inception_weights=weights, cache_dir=tmp_path)
    assert out["extractor"] == "inception-v3-compat" and np.isfinite(out["fid"]) and out["fid"] >= -1e-6
    assert len(list(tmp_path.glob("folder-*-features.npz"))) == 1


class _Marker:
    """Unpickling this object creates a file: the proof that a loader executed a pickle."""

    def __init__(self, path):
        self.path = Path(path)

    def __reduce__(self):
        return Path.touch, (self.path,)


def test_crafted_pickles_are_never_executed(tmp_path, cache, monkeypatch):
    """A pickle passed as extractor weights is refused; pickles planted where torch-fidelity would cache
    statistics (its default folder, and ours) are never read."""
    marker = tmp_path / "executed"
    evil = tmp_path / "evil.pth"
    torch.save({"conv.weight": torch.zeros(1), "payload": _Marker(marker)}, evil)
    with pytest.raises(ValueError, match=r"evil.pth'?: not a tensors-only state dict"):
        evaluate_samples(noise_source, "digits", num_samples=10, extractor="inception-v3-compat",
                         inception_weights=evil, cache_dir=cache)
    assert not marker.exists()
    with pytest.raises(ValueError, match="a folder; pass the weights file itself"):
        evaluate_samples(noise_source, "digits", num_samples=10, extractor="inception-v3-compat",
                         inception_weights=tmp_path, cache_dir=cache)
    planted_cache = tmp_path / "planted"
    fidelity_default = Path(torch.hub.get_dir()).parent / "fidelity_cache"
    for folder in (planted_cache, fidelity_default):
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("digits-x-digits-stat-fid-digits-features.pt", "weights-x.pt", "input2-digits-features.pt"):
            torch.save(_Marker(marker), folder / name)
    for kw in ({"cache_dir": planted_cache}, {}):
        evaluate_samples(noise_source, "digits", num_samples=50, kid=True, prc=True, **kw)
    assert not marker.exists()


def test_cifar10_reference_offline_is_one_clear_error(monkeypatch):
    import urllib.error

    import torchvision.datasets

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(ValueError, match=r"reference 'cifar10-train': not under .* and the download failed"):
        fid_inputs.load_named_reference("cifar10-train")
