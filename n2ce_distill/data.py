r"""Datasets (SPEC section 9) and a resumable infinite batch loader.

2-D toys (BNAF/DxMI conventions, ``torch.Generator`` sampling): :class:`EightGaussians` (exact ``log_prob``),
:class:`TwoSpirals`, :class:`Checkerboard`. Images in [-1, 1], NCHW: scikit-learn digits (1797 x 1 x 8 x 8),
:class:`ImageFolderDataset`, CIFAR-10 via torchvision. :func:`build_dataset` picks one by name; items are ``x`` or
``(x, label)``; labelled data sets carry ``num_classes``. :class:`InfiniteLoader`: epoch ``e`` is a permutation seeded by ``(seed, e)``, so ``(epoch,
index)`` fixes the future and a resumed run sees exactly the uninterrupted sequence.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from .errors import InputError

if TYPE_CHECKING:
    from .config import DataConfig

__all__ = [
    "DATASETS", "TOY_DISTRIBUTIONS", "ArrayDataset", "Checkerboard", "EightGaussians", "ImageFolderDataset",
    "InfiniteLoader", "TwoSpirals", "balanced_labels", "build_dataset", "check_labels", "dataset_from_config",
    "DIGIT_NAMES", "cifar10", "digits", "save_captioned_digits",
    "PromptDataset", "has_images", "read_prompts", "infinite_loader", "num_classes", "prompts", "sample_shape",
]

_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


class ArrayDataset(Dataset):
    """In-memory tensors ``x`` (N, ...) with optional labels ``y`` (N,) in ``[0, num_classes)``. ``uint8`` images
    (N, C, H, W) are kept as bytes (4x less memory for CIFAR-10) and mapped to [-1, 1] floats on access."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor | None = None, num_classes: int | None = None):
        if y is not None and len(y) != len(x):
            raise ValueError(f"{len(x)} samples but {len(y)} labels")
        if y is not None:
            num_classes = num_classes or int(y.max()) + 1
            if len(y) and (y.min() < 0 or y.max() >= num_classes):
                raise ValueError(f"labels must lie in [0, {num_classes}), got {int(y.min())}..{int(y.max())}")
        self.x, self.y = x, y
        self.num_classes = num_classes if y is not None else None

    def __len__(self) -> int:
        return len(self.x)

    def _convert(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() / 127.5 - 1 if x.dtype == torch.uint8 else x

    def __getitem__(self, i):
        x = self._convert(self.x[i])
        return x if self.y is None else (x, self.y[i])

    def batch(self, idx: torch.Tensor):
        """Vectorised ``default_collate([self[i] for i in idx])``."""
        x = self._convert(self.x[idx])
        return x if self.y is None else (x, self.y[idx])


class _Toy:
    """What every 2-D toy shares: ``sample`` is ``sample_labelled`` without the labels (the same draws)."""

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.sample_labelled(n, generator)[0]


class EightGaussians(_Toy):
    r"""Equal mixture of 8 isotropic Gaussians at angles ``k pi/4`` on a circle (defaults: the BNAF/DxMI set,
    radius ``4/sqrt 2``, std ``0.5/sqrt 2``): ``log p(x) = logsumexp_k[-|x - mu_k|^2/(2 std^2)] - log(16 pi std^2)``.
    """

    def __init__(self, radius: float = 4 / math.sqrt(2), std: float = 0.5 / math.sqrt(2)):
        self.radius, self.std = float(radius), float(std)
        angles = torch.arange(8, dtype=torch.float64) * math.pi / 4
        self.centers = self.radius * torch.stack([angles.cos(), angles.sin()], dim=1)

    num_classes = 8  # a point's label is its mode

    def sample_labelled(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        k = torch.randint(0, 8, (n,), generator=generator)
        return (self.centers[k] + self.std * torch.randn(n, 2, generator=generator, dtype=torch.float64)).float(), k

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Exact log-density of points (N, 2), computed in float64."""
        sq = (x.double()[:, None, :] - self.centers.to(x.device)[None]).square().sum(-1)
        log_norm = math.log(16 * math.pi * self.std**2)  # 8 components x 2 pi std^2
        return (torch.logsumexp(-sq / (2 * self.std**2), dim=1) - log_norm).to(x.dtype)


class TwoSpirals(_Toy):
    """Two interleaved spirals (BNAF/DxMI): radius-angle ``r = sqrt(u) * 3 pi``, uniform jitter, Gaussian noise."""

    def __init__(self, noise: float = 0.1, scale: float = 1.0):
        self.noise, self.scale = noise, scale

    num_classes = 2  # a point's label is its arm

    def sample_labelled(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        half = n - n // 2
        r = torch.rand(half, 1, generator=generator, dtype=torch.float64).sqrt() * 3 * math.pi  # 540 degrees
        jitter = 0.5 * torch.rand(half, 2, generator=generator, dtype=torch.float64)
        arm = torch.cat([-r.cos() * r, r.sin() * r], dim=1) + jitter
        x = torch.cat([arm, -arm])[:n] / 3
        x = x + self.noise * torch.randn(x.shape, generator=generator, dtype=torch.float64)
        arm_label = torch.cat([torch.zeros(half, dtype=torch.long), torch.ones(half, dtype=torch.long)])[:n]
        return (self.scale * x).float(), arm_label


class Checkerboard(_Toy):
    """Uniform on the black squares of a 4x4 checkerboard over ``[-4, 4]^2`` (BNAF/DxMI)."""

    def __init__(self, scale: float = 1.0):
        self.scale = scale

    num_classes = 8  # a point's label is its square, numbered by column then row

    def sample_labelled(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        x1 = torch.rand(n, generator=generator, dtype=torch.float64) * 4 - 2
        row = torch.rand(n, generator=generator, dtype=torch.float64)
        row = row - 2 * torch.randint(0, 2, (n,), generator=generator)  # square 0 or -2 ...
        x2 = row + torch.floor(x1) % 2  # ... shifted up by one in odd columns
        square = 2 * (torch.floor(x1).long() + 2) + (torch.floor(x2).long() + 2) // 2
        return (2 * self.scale * torch.stack([x1, x2], dim=1)).float(), square


def _toy(cls: Callable, n: int = 10_000, seed: int = 0, labels: bool = False, **kw) -> ArrayDataset:
    """A fixed finite sample (the "training set") of a toy distribution, with its mode labels if ``labels``."""
    distribution = cls(**kw)
    x, y = distribution.sample_labelled(n, torch.Generator().manual_seed(seed))
    return ArrayDataset(x, y, distribution.num_classes) if labels else ArrayDataset(x)


def digits(split: str = "all", test_fraction: float = 0.2, seed: int = 0, labels: bool = False) -> ArrayDataset:
    """scikit-learn's 8x8 digits as (N, 1, 8, 8) floats in [-1, 1] (pixel values 0..16 -> -1..1).

    ``split``: ``"all"``, or ``"train"`` / ``"test"`` of a permutation fixed by ``seed``."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.as_tensor(bunch.images, dtype=torch.float32)[:, None] / 8 - 1
    y = torch.as_tensor(bunch.target, dtype=torch.long)
    if split != "all":
        if split not in ("train", "test"):
            raise InputError(f"digits split must be 'all', 'train' or 'test', got {split!r}")
        perm = torch.as_tensor(np.random.RandomState(seed).permutation(len(x)))
        n_test = int(round(test_fraction * len(x)))
        idx = perm[n_test:] if split == "train" else perm[:n_test]
        x, y = x[idx], y[idx]
    return ArrayDataset(x, y, 10) if labels else ArrayDataset(x)


class ImageFolderDataset(Dataset):
    """Every image under ``root`` (recursively, sorted), centre-cropped to a square, resized to ``image_size``
    and mapped to (C, H, W) in [-1, 1]. ``labels=True`` labels each image by its first-level subfolder
    (sorted class names, as torchvision's ``ImageFolder``). ``caption_column`` reads each image's caption from
    ``root/metadata.jsonl`` (the datasets ``imagefolder`` convention: one JSON object per line with the image's
    ``file_name``, relative to ``root``, and the caption under ``caption_column``, ``text`` in diffusers'
    scripts): ``prompts`` is then the sorted list of distinct captions and each item's label indexes it."""

    def __init__(self, root: str | os.PathLike, image_size: int, channels: int = 3, labels: bool = False,
                 caption_column: str | None = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise InputError(f"image folder {self.root} does not exist")
        self.files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in _IMAGE_SUFFIXES)
        if not self.files:
            raise InputError(f"no images ({', '.join(sorted(_IMAGE_SUFFIXES))}) found under {self.root}")
        self.image_size, self.mode = image_size, {1: "L", 3: "RGB"}[channels]
        self.classes, self.targets, self.num_classes = [], None, None
        if labels:
            parts = [p.relative_to(self.root).parts for p in self.files]
            self.classes = sorted({q[0] for q in parts})
            if any(len(q) == 1 for q in parts):
                raise InputError(f"labels=True needs every image inside a class subfolder of {self.root}")
            self.targets = [self.classes.index(q[0]) for q in parts]
            self.num_classes = len(self.classes)
        if caption_column is not None:
            if labels:
                raise InputError("data.caption_column: captions replace class labels; set data.labels=false")
            self.prompts, self.targets = _indexed(_read_captions(self.root, caption_column, self.files))

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i):
        from PIL import Image

        with Image.open(self.files[i]) as im:
            im = im.convert(self.mode)
            side = min(im.size)
            left, top = (im.width - side) // 2, (im.height - side) // 2
            im = im.crop((left, top, left + side, top + side))
            im = im.resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
            arr = np.asarray(im, dtype=np.uint8).reshape(self.image_size, self.image_size, -1)
        x = torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 127.5 - 1
        return x if self.targets is None else (x, torch.tensor(self.targets[i]))


def save_captioned_digits(root: str | os.PathLike, prompt: str = "the digit {name}") -> Path:
    """Write scikit-learn's digits as an image-caption folder (``NNNN.png``, 8x8 grayscale, and ``metadata.jsonl``
    whose ``text`` is ``prompt`` with the digit's name, "the digit seven"): the captioned data of the
    text-conditioned examples. Pixels round-trip to within 1/255 of :func:`digits`. Returns ``root``."""
    import json

    from PIL import Image

    data, root = digits(labels=True), Path(root)
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (x, y) in enumerate(zip(data.x, data.y.tolist())):
        pixels = ((x[0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(root / f"{i:04d}.png")
        lines.append(json.dumps({"file_name": f"{i:04d}.png", "text": prompt.format(name=DIGIT_NAMES[y])}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def _indexed(captions: list[str]) -> tuple[list[str], list[int]]:
    """The distinct captions, sorted, and each caption's index among them (the labels of a captioned data set)."""
    prompts = sorted(set(captions))
    index = {prompt: i for i, prompt in enumerate(prompts)}
    return prompts, [index[caption] for caption in captions]


def read_prompts(path: str | os.PathLike, key: str) -> list[str]:
    """The lines of a prompt file, in order, blank ones skipped; one line naming ``key`` if there are none."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{key}: prompt file {path} not found (one prompt per line)")
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        raise InputError(f"{key}: {path} holds no prompts")
    return lines


class PromptDataset(Dataset):
    """Prompts without images (one per line of the text file ``path``, blank lines skipped), for the loops that
    read none (SiD without its critic: SiD-LSG's data-free distillation). An item is ``(empty tensor, label)``
    with the label indexing ``prompts`` (the distinct prompts, sorted); ``image_shape`` is the shape of the images
    the teacher makes, ``(channels, image_size, image_size)``, which no item carries."""

    has_images = False

    def __init__(self, path: str | os.PathLike, image_size: int, channels: int = 3):
        self.prompts, targets = _indexed(read_prompts(path, "data.root"))
        self.targets = torch.tensor(targets)
        self.image_shape = (channels, image_size, image_size)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i):
        return torch.empty(0), self.targets[i]


def _read_captions(root: Path, column: str, files: list[Path]) -> list[str]:
    """Each file's caption from ``root/metadata.jsonl``; one line naming the file or line at fault otherwise."""
    import json

    metadata = root / "metadata.jsonl"
    if not metadata.is_file():
        raise InputError(f"data.caption_column: {metadata} not found (one JSON line per image: file_name and "
                         f"{column!r})")
    captions = {}
    for number, line in enumerate(metadata.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            name, caption = row["file_name"], row[column]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            what = f"no key {error}" if isinstance(error, KeyError) else "not a JSON object"
            raise InputError(f"data.caption_column: {metadata}, line {number}: {what}") from None
        if not isinstance(caption, str):
            raise InputError(f"data.caption_column: {metadata}, line {number}: {column!r} is not a string")
        captions[(root / name).resolve()] = caption
    missing = [f for f in files if f.resolve() not in captions]
    if missing:
        raise InputError(f"data.caption_column: {missing[0].relative_to(root)} has no line in {metadata} ({len(missing)} images without "
                         "captions)")
    return [captions[f.resolve()] for f in files]


def cifar10(root: str | os.PathLike, train: bool = True, download: bool = True, labels: bool = False) -> ArrayDataset:
    """CIFAR-10 through torchvision (downloads into ``root`` when ``download``), as uint8 kept in memory and
    served as (3, 32, 32) floats in [-1, 1]."""
    from torchvision.datasets import CIFAR10

    try:
        ds = CIFAR10(str(root), train=train, download=download)
    except RuntimeError as err:  # torchvision: "Dataset not found or corrupted"
        raise InputError(f"CIFAR-10 not found under {root} ({err}); pass download=True to fetch it") from err
    x = torch.as_tensor(np.asarray(ds.data)).permute(0, 3, 1, 2).contiguous()
    return ArrayDataset(x, torch.as_tensor(ds.targets, dtype=torch.long), 10) if labels else ArrayDataset(x)


# the 2-D toys by name; their datasets and the 2-D metrics of `n2ce-distill fid --ref NAME` both read this
TOY_DISTRIBUTIONS: dict[str, Callable[[], EightGaussians | TwoSpirals | Checkerboard]] = {
    "8gaussians": EightGaussians, "spirals": TwoSpirals, "checkerboard": Checkerboard,
}

DATASETS: dict[str, Callable[..., Dataset]] = {
    **{name: partial(_toy, cls) for name, cls in TOY_DISTRIBUTIONS.items()},
    "digits": digits,
    "image-folder": ImageFolderDataset,
    "prompts": PromptDataset,
    "cifar10": cifar10,
}


def build_dataset(name: str, **kwargs) -> Dataset:
    """Dataset by registry name (``DATASETS``); ``kwargs`` go to its builder (toys: ``n``, ``seed`` and the
    distribution's parameters; digits: ``split``; image-folder: ``root``, ``image_size``; cifar10: ``root``,
    ``train``, ``download``; every one: ``labels``)."""
    if name not in DATASETS:
        raise InputError(f"unknown dataset {name!r}; choose from {sorted(DATASETS)}")
    return DATASETS[name](**kwargs)


def dataset_from_config(cfg: DataConfig, seed: int):
    """The recipe's data set (images in [-1, 1] or 2-D points), with class labels when ``data.labels``."""
    kwargs = {
        "image-folder": {"root": cfg.root, "image_size": cfg.image_size or 32, "channels": cfg.channels,
                         "caption_column": cfg.caption_column},
        "prompts": {"path": cfg.root, "image_size": cfg.image_size, "channels": cfg.channels},
        "cifar10": {"root": cfg.root or "data/cifar10"},
        "digits": {},
    }.get(cfg.name, {"n": cfg.num_points, "seed": seed})
    if cfg.name == "prompts":
        return build_dataset(cfg.name, **kwargs)  # prompts are its labels
    return build_dataset(cfg.name, labels=cfg.labels, **kwargs)


def prompts(dataset: Dataset) -> list[str] | None:
    """A captioned data set's prompts, which its labels index; ``None`` when its items carry no captions."""
    return getattr(dataset, "prompts", None)


def num_classes(dataset: Dataset) -> int | None:
    """The number of classes of a labelled data set; ``None`` when its items carry no labels."""
    return getattr(dataset, "num_classes", None)


def has_images(dataset: Dataset) -> bool:
    """Whether a data set's items carry samples (a prompt-only set's do not)."""
    return getattr(dataset, "has_images", True)


def sample_shape(dataset: Dataset) -> tuple[int, ...]:
    """The shape of one sample (its label, if any, left out); a prompt-only set's is its images'."""
    if not has_images(dataset):
        return tuple(dataset.image_shape)
    item = dataset[0]
    return tuple((item[0] if isinstance(item, (tuple, list)) else item).shape)


def check_labels(labels: torch.Tensor, num_classes: int, key: str) -> torch.Tensor:
    """``labels`` (N,), N >= 1, each in ``[0, num_classes)``, else one line naming ``key``."""
    if len(labels) == 0 or labels.min() < 0 or labels.max() >= num_classes:
        raise InputError(f"{key}: each label must lie in [0, {num_classes}), got {labels.tolist()[:10]}")
    return labels


def balanced_labels(n: int, num_classes: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Labels ``0, 1, ..., K-1, 0, 1, ...`` for ``n`` samples: every class equally often (up to one)."""
    return torch.arange(n, device=device) % num_classes


class InfiniteLoader:
    """Shuffled batches forever with a resumable position.

    Epoch ``e`` visits ``randperm(N)`` seeded by ``SeedSequence([seed, e])`` (independent of history), batches
    of ``batch_size`` consecutive indices; ``drop_last`` skips an incomplete tail so every batch has the same
    size. ``state_dict() = {seed, epoch, index}`` with ``index`` = samples of the epoch already yielded.
    ``num_workers > 0`` loads through a ``DataLoader`` (the order is still ours)."""

    def __init__(self, dataset: Dataset, batch_size: int, seed: int = 0, drop_last: bool = True,
                 num_workers: int = 0, pin_memory: bool = False):
        n = len(dataset)
        if batch_size < 1 or (drop_last and batch_size > n) or n == 0:
            raise InputError(f"batch_size {batch_size} does not fit a dataset of {n} items (drop_last={drop_last})")
        self.dataset, self.batch_size, self.seed, self.drop_last = dataset, batch_size, int(seed), drop_last
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.epoch, self.index, self._it = 0, 0, None

    def _permutation(self, epoch: int) -> torch.Tensor:
        seed = int(np.random.SeedSequence([self.seed, epoch]).generate_state(1, dtype=np.uint64)[0] >> 1)
        return torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(seed))

    def _epoch_batches(self) -> list[torch.Tensor]:
        perm, n = self._permutation(self.epoch), len(self.dataset)
        stop = n - n % self.batch_size if self.drop_last else n
        return [perm[i : i + self.batch_size] for i in range(self.index, stop, self.batch_size)]

    def _start_epoch_iterator(self) -> Iterator:
        batches = self._epoch_batches()
        if self.num_workers > 0:
            batch_sampler = [b.tolist() for b in batches]
            return iter(DataLoader(self.dataset, batch_sampler=batch_sampler, num_workers=self.num_workers,
                                   pin_memory=self.pin_memory))
        if isinstance(self.dataset, ArrayDataset):
            return (self.dataset.batch(b) for b in batches)
        return (default_collate([self.dataset[i] for i in b.tolist()]) for b in batches)

    def __iter__(self) -> InfiniteLoader:
        return self

    def __next__(self):
        if self._it is None:
            self._it = self._start_epoch_iterator()
        batch = next(self._it, None)
        if batch is None:  # epoch exhausted (or resumed exactly at its end); __init__ ensures a new one is not
            self.epoch, self.index, self._it = self.epoch + 1, 0, None
            return next(self)
        self.index += len(batch[0] if isinstance(batch, (tuple, list)) else batch)
        return batch

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.epoch, self.index = int(state["seed"]), int(state["epoch"]), int(state["index"])
        self._it = None  # rebuild the iterator from the restored position


def infinite_loader(dataset: Dataset, batch_size: int, seed: int | torch.Generator = 0, **kwargs) -> InfiniteLoader:
    """:class:`InfiniteLoader` factory; a ``torch.Generator`` seed is turned into an int by one draw (the int is
    what ``state_dict`` stores, so resuming never depends on the generator again)."""
    if isinstance(seed, torch.Generator):
        seed = int(torch.randint(0, 2**62, (), generator=seed))
    return InfiniteLoader(dataset, batch_size, seed=seed, **kwargs)
