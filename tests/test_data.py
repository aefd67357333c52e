import math

import numpy as np
import pytest
import torch
from torch.distributions import Categorical, Independent, MixtureSameFamily, Normal
from torch.utils.data import Dataset

from n2ce_distill import data
from n2ce_distill.data import (
    ArrayDataset,
    Checkerboard,
    EightGaussians,
    ImageFolderDataset,
    TwoSpirals,
    build_dataset,
    digits,
    infinite_loader,
)


def test_eight_gaussians_log_prob_is_exact_and_normalised():
    dist = EightGaussians()
    assert abs(dist.radius - 2 * math.sqrt(2)) < 1e-12 and abs(dist.std - 0.5 / math.sqrt(2)) < 1e-12
    ref = MixtureSameFamily(
        Categorical(torch.ones(8, dtype=torch.float64)),
        Independent(Normal(dist.centers, torch.full((8, 2), dist.std, dtype=torch.float64)), 1),
    )
    pts = torch.randn(50, 2, dtype=torch.float64) * 3
    torch.testing.assert_close(dist.log_prob(pts), ref.log_prob(pts))
    h = 0.02
    axis = torch.arange(-5 + h / 2, 5, h, dtype=torch.float64)
    grid = torch.cartesian_prod(axis, axis)
    density = dist.log_prob(grid).exp()
    assert abs(density.sum().item() * h * h - 1) < 1e-3
    # the sampler matches the density: total variation between a 2-D histogram and the integrated density
    x = dist.sample(200_000, torch.Generator().manual_seed(0)).double()
    edges = torch.linspace(-5, 5, 21, dtype=torch.float64)  # 0.5-wide bins = 25 x 25 grid cells
    hist = torch.histogramdd(x, bins=[edges, edges]).hist / len(x)
    pbin = density.reshape(20, 25, 20, 25).sum((1, 3)) * h * h
    assert 0.5 * (hist - pbin).abs().sum().item() < 0.02


def test_toys_are_deterministic_and_have_their_support():
    for dist in (EightGaussians(), TwoSpirals(), Checkerboard()):
        a = dist.sample(1001, torch.Generator().manual_seed(5))
        b = dist.sample(1001, torch.Generator().manual_seed(5))
        assert a.shape == (1001, 2) and a.dtype == torch.float32 and torch.equal(a, b)
    board = Checkerboard().sample(5000, torch.Generator().manual_seed(0))
    assert board.abs().max() <= 4 and ((board / 2).floor().sum(1) % 2 == 0).all()  # only the "black" squares
    spiral = TwoSpirals(noise=0.0).sample(2000, torch.Generator().manual_seed(0))
    assert spiral.norm(dim=1).max() < 3 * math.pi / 3 + 0.5  # radius <= 3 pi / 3 plus jitter


def test_digits_range_shape_and_splits():
    full = digits()
    assert full.x.shape == (1797, 1, 8, 8) and full.x.dtype == torch.float32
    assert full.x.min() == -1 and full.x.max() == 1 and full.y is None
    train, test = digits("train", labels=True), digits("test", labels=True)
    assert len(train) + len(test) == 1797 and len(test) == round(0.2 * 1797)
    x, y = train[0]
    assert x.shape == (1, 8, 8) and y.dtype == torch.long
    full_labelled = digits(labels=True)
    assert torch.equal(torch.cat([train.y, test.y]).bincount(), full_labelled.y.bincount())  # a partition
    torch.testing.assert_close(torch.cat([train.x, test.x]).sum(0), full.x.sum(0))
    assert torch.equal(digits("test", seed=0).x, test.x) and not torch.equal(digits("test", seed=1).x, test.x)
    with pytest.raises(ValueError, match="split"):
        digits("val")


def write_images(root, sizes):
    from PIL import Image

    rng = np.random.default_rng(0)
    for i, (rel, size, mode) in enumerate(sizes):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)


def test_image_folder_dataset(tmp_path):
    write_images(tmp_path, [("cats/a.png", (20, 12), "RGB"), ("cats/b.jpg", (16, 16), "L"),
                            ("dogs/c.png", (9, 30), "RGB")])
    (tmp_path / "notes.txt").write_text("not an image")
    ds = ImageFolderDataset(tmp_path, image_size=8)
    assert len(ds) == 3
    for i in range(3):
        x = ds[i]
        assert x.shape == (3, 8, 8) and x.min() >= -1 and x.max() <= 1
    labelled = ImageFolderDataset(tmp_path, image_size=8, channels=1, labels=True)
    assert labelled.classes == ["cats", "dogs"] and [int(labelled[i][1]) for i in range(3)] == [0, 0, 1]
    assert labelled[0][0].shape == (1, 8, 8)
    with pytest.raises(ValueError, match="does not exist"):
        ImageFolderDataset(tmp_path / "missing", 8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        ImageFolderDataset(tmp_path / "empty", 8)


class FakeCIFAR10:
    """Stand-in for torchvision's CIFAR10 (same .data / .targets layout); no download here."""

    def __init__(self, root, train=True, download=False):
        if not download:
            raise RuntimeError("Dataset not found or corrupted. You can use download=True to download it")
        rng = np.random.default_rng(0 if train else 1)
        self.data = rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)
        self.targets = list(range(10))


def test_build_dataset_registry(tmp_path, monkeypatch):
    for name in ("8gaussians", "spirals", "checkerboard"):
        ds = build_dataset(name, n=100, seed=1)
        assert len(ds) == 100 and ds[0].shape == (2,)
    assert torch.equal(build_dataset("8gaussians", n=50, seed=2).x, build_dataset("8gaussians", n=50, seed=2).x)
    assert build_dataset("8gaussians", n=10, radius=1.0, std=0.01).x.norm(dim=1).sub(1).abs().max() < 0.1
    assert build_dataset("digits", split="train")[0].shape == (1, 8, 8)
    write_images(tmp_path / "imgs", [("a.png", (8, 8), "RGB")])
    assert build_dataset("image-folder", root=tmp_path / "imgs", image_size=4)[0].shape == (3, 4, 4)

    import torchvision.datasets

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    cifar = build_dataset("cifar10", root=tmp_path / "cifar", labels=True)
    x, y = cifar[3]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == 3
    raw = torch.as_tensor(FakeCIFAR10(None, download=True).data[3]).permute(2, 0, 1)
    torch.testing.assert_close(x, raw / 127.5 - 1)
    with pytest.raises(ValueError, match="download=True"):
        build_dataset("cifar10", root=tmp_path / "cifar", download=False)
    with pytest.raises(ValueError, match=r"unknown dataset 'mnist'.*8gaussians"):
        build_dataset("mnist")
    with pytest.raises(TypeError, match="root"):
        build_dataset("image-folder")
    with pytest.raises(ValueError, match="missing"):
        build_dataset("image-folder", root=tmp_path / "missing", image_size=8)
    assert set(data.DATASETS) == {"8gaussians", "spirals", "checkerboard", "digits", "image-folder", "prompts", "cifar10"}


def take(loader, k):
    return [next(loader) for _ in range(k)]


def as_list(batches):
    return [b.tolist() if torch.is_tensor(b) else [t.tolist() for t in b] for b in batches]


def test_loader_covers_each_epoch_and_is_deterministic():
    ds = ArrayDataset(torch.arange(10).float()[:, None])
    loader = infinite_loader(ds, 4, seed=3, drop_last=False)
    epoch = take(loader, 3)  # 4 + 4 + 2
    assert [len(b) for b in epoch] == [4, 4, 2] and sorted(torch.cat(epoch).flatten().tolist()) == list(range(10))
    assert loader.state_dict() == {"seed": 3, "epoch": 0, "index": 10}
    second = take(loader, 3)
    assert loader.state_dict()["epoch"] == 1 and not torch.equal(torch.cat(epoch), torch.cat(second))
    again = infinite_loader(ds, 4, seed=3, drop_last=False)
    assert as_list(take(again, 6)) == as_list(epoch + second)
    assert as_list(take(infinite_loader(ds, 4, seed=4), 2)) != as_list(epoch[:2])
    dropping = infinite_loader(ds, 4, seed=3)  # drop_last: every batch full, tail of each epoch skipped
    assert all(len(b) == 4 for b in take(dropping, 5))
    g_seeded = [infinite_loader(ds, 4, seed=torch.Generator().manual_seed(0)) for _ in range(2)]
    assert as_list(take(g_seeded[0], 3)) == as_list(take(g_seeded[1], 3))


@pytest.mark.parametrize("stop", [1, 2, 3, 7])  # mid-epoch, end of an epoch (2 full batches of 4 from 10), later
def test_loader_resume_equals_uninterrupted(stop):
    ds = ArrayDataset(torch.randn(10, 3), torch.arange(10))
    reference = take(infinite_loader(ds, 4, seed=11), 10)
    first = infinite_loader(ds, 4, seed=11)
    head = take(first, stop)
    state = first.state_dict()
    resumed = infinite_loader(ds, 4, seed=0)  # seed comes from the state
    resumed.load_state_dict(state)
    assert as_list(head + take(resumed, 10 - stop)) == as_list(reference)


class PlainDataset(Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return torch.full((2,), float(i)), torch.tensor(i)


@pytest.mark.parametrize("workers", [0, 1])
def test_loader_generic_datasets_match_the_array_path(workers):
    plain = PlainDataset(9)
    array = ArrayDataset(torch.arange(9).float()[:, None].expand(9, 2).contiguous(), torch.arange(9))
    a = take(infinite_loader(plain, 3, seed=1, num_workers=workers), 5)
    b = take(infinite_loader(array, 3, seed=1), 5)
    assert as_list(a) == as_list(b)
    with pytest.raises(ValueError, match="batch_size"):
        infinite_loader(plain, 10)
