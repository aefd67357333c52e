"""Adapters from this package's sources and references to torch-fidelity inputs (used by ``fid.py``).

torch-fidelity feeds its extractors uint8 images (N, C, H, W) in [0, 255]; our images are floats in
[-1, 1], mapped by u = round((x + 1) * 127.5). A callable source becomes a ``GenerativeModelBase`` so
that torch-fidelity pulls it batch by batch (only features are kept, never all samples). Named
references are loaded lazily, so a reference whose statistics are cached is never loaded.
"""

import functools
import hashlib
import random
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torch_fidelity import GenerativeModelBase
from torch_fidelity.datasets import ImagesPathDataset
from torch_fidelity.utils import glob_samples_paths

from .errors import InputError
from .feature_extractors import digits_uint8

__all__ = [
    "NAMED_REFERENCES",
    "ClassReference",
    "Generate",
    "LazyReference",
    "StreamingSource",
    "check_path",
    "check_reference",
    "file_hash",
    "image_files",
    "image_shape",
    "load_named_labels",
    "load_named_reference",
    "preserved_rng",
    "reference_input",
    "source_input",
    "to_uint8",
]

Generate = Callable[[int, torch.Generator], torch.Tensor]
# name -> (image shape, number of images); loaded by load_named_reference
NAMED_REFERENCES = {"digits": ((1, 8, 8), 1797), "cifar10-train": ((3, 32, 32), 50000)}
IMAGE_EXTENSIONS = "png,jpg,jpeg"


# a per-class evaluation reads the reference and its labels once per class: read each set once per process
@functools.lru_cache(maxsize=1)
def _cifar10_train(name: str):
    from torchvision.datasets import CIFAR10

    root = Path(torch.hub.get_dir()).parent / "fidelity_datasets"  # torch-fidelity's own default root
    try:
        return CIFAR10(str(root), train=True, download=True)
    except OSError as error:  # offline: urllib's errors are OSErrors
        raise InputError(f"reference {name!r}: not under {root} and the download failed ({error}); put torchvision's "
                         "CIFAR-10 archive there, or pass an image folder or a .npz statistics file") from None


@functools.lru_cache(maxsize=1)
def load_named_reference(name: str) -> torch.Tensor:
    """uint8 (N, C, H, W) images of a named reference (CIFAR-10 train is downloaded by torchvision)."""
    if name == "digits":
        return digits_uint8()
    return torch.from_numpy(_cifar10_train(name).data).permute(0, 3, 1, 2).contiguous()


@functools.lru_cache(maxsize=2)
def load_named_labels(name: str) -> torch.Tensor:
    """The class label (N,) of each image of a named reference, in :func:`load_named_reference`'s order."""
    if name == "digits":
        from sklearn.datasets import load_digits

        return torch.as_tensor(load_digits().target, dtype=torch.long)
    return torch.as_tensor(_cifar10_train(name).targets, dtype=torch.long)


@dataclass(frozen=True)
class ClassReference:
    """The images of one class of a named reference: the reference of a per-class FID."""

    name: str
    label: int


class LazyReference(Dataset):
    """A named reference (or one class of it) that loads on first access; ``rgb`` repeats grey images to 3
    channels."""

    def __init__(self, name: str, rgb: bool, label: int | None = None):
        self.name, self.rgb, self.label, self.images = name, rgb, label, None

    def _data(self) -> torch.Tensor:
        if self.images is None:
            images = load_named_reference(self.name)
            self.images = images if self.label is None else images[load_named_labels(self.name) == self.label]
        return self.images

    def __len__(self):
        return len(self._data())

    def __getitem__(self, i):
        x = self._data()[i]
        return x.repeat(3, 1, 1) if self.rgb and x.shape[0] == 1 else x


def to_uint8(x: torch.Tensor, rgb: bool) -> torch.Tensor:
    """[-1, 1] float (B, 1|3, H, W) -> uint8 [0, 255]; ``rgb`` repeats grey to 3 channels."""
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise InputError(f"a source must return images (B, 1 or 3, H, W), got shape {tuple(x.shape)}")
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.repeat(1, 3, 1, 1) if rgb and x.shape[1] == 1 else x


class StreamingSource(GenerativeModelBase):
    """torch-fidelity generative model calling ``generate(n, generator)`` batch by batch.

    torch-fidelity's noise argument only tells the batch size; randomness comes from ``generator``.
    """

    def __init__(self, generate: Generate, generator: torch.Generator, rgb: bool):
        super().__init__()
        # a plain attribute, not a submodule: torch-fidelity's .cuda() must not move the caller's model
        object.__setattr__(self, "generate", generate)
        self.generator, self.rgb = generator, rgb

    z_size = property(lambda self: 1)
    z_type = property(lambda self: "normal")
    num_classes = property(lambda self: 0)

    def forward(self, noise: torch.Tensor) -> torch.Tensor:
        n = noise.shape[0]
        x = self.generate(n, self.generator)
        if x.shape[0] != n:
            raise ValueError(f"source returned {x.shape[0]} samples when asked for {n}")
        return to_uint8(x, self.rgb).to(noise.device)


@contextmanager
def preserved_rng(device: torch.device):
    """Restore torch (CPU and the used GPU), numpy and ``random`` global RNG states on exit."""
    np_state, py_state = np.random.get_state(), random.getstate()
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if device.type == "cuda" else []):
        try:
            yield
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)


def check_path(x, what: str) -> Path:
    path = Path(x)
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {x}")
    return path


def image_files(folder) -> list[str]:
    """Sorted image files directly in ``folder`` (torch-fidelity's own listing). An ``n2ce-distill sample``
    output folder is read through its ``images/``: its ``grid.png`` is no sample."""
    if not check_path(folder, "image folder").is_dir():
        raise InputError(f"{folder}: not an image folder (2-D points: --ref 8gaussians | spirals | checkerboard)")
    if _is_sample_folder(folder):
        folder = Path(folder) / "images"
    files = glob_samples_paths(str(folder), False, IMAGE_EXTENSIONS, verbose=False)
    if not files:
        raise InputError(f"no images ({IMAGE_EXTENSIONS}) in folder {folder}")
    return files


def _is_sample_folder(folder) -> bool:
    """Whether ``folder`` is what ``n2ce-distill sample`` writes: ``grid.png`` beside an ``images/`` folder."""
    return (Path(folder) / "grid.png").is_file() and (Path(folder) / "images").is_dir()


def _sha(chunks) -> str:
    h = hashlib.sha256()
    for chunk in chunks:
        h.update(chunk)
    return h.hexdigest()[:12]


def file_hash(path: Path) -> str:
    with open(path, "rb") as f:
        return _sha(iter(lambda: f.read(1 << 20), b""))


def image_shape(data, seed: int, device: torch.device) -> tuple[int, ...]:
    """(C, H, W) of a source or reference; grey images stored as RGB count as one channel. A source that states
    its ``sample_shape`` (every pipeline and teacher source) is not sampled."""
    if callable(data):
        if hasattr(data, "sample_shape"):
            return tuple(data.sample_shape)
        return tuple(data(1, torch.Generator(device).manual_seed(seed)).shape[1:])
    if isinstance(data, ClassReference):
        data = data.name
    if isinstance(data, str) and data in NAMED_REFERENCES:
        return NAMED_REFERENCES[data][0]
    img = np.asarray(Image.open(image_files(data)[0]).convert("RGB"))
    return (1 if (img == img[..., :1]).all() else 3, *img.shape[:2])


def check_reference(ref) -> None:
    """Refuse a reference that is no named dataset and looks like one (a bare word that is not a path)."""
    if isinstance(ref, ClassReference):
        return
    path = Path(ref)
    if isinstance(ref, str) and ref not in NAMED_REFERENCES and not path.exists() and not path.suffix \
            and len(path.parts) == 1:
        raise InputError(
            f"unknown reference {ref!r}: not a named dataset ({', '.join(NAMED_REFERENCES)}), "
            "an existing image folder or a .npz statistics file (2-D toys: 8gaussians, spirals, checkerboard)"
        )


def reference_input(ref, rgb: bool, tag: str):
    """(torch-fidelity input or None, cache name or None, number of images, .npz statistics or None).

    The cache name holds the dataset name, or a hash of a folder's listing (names, sizes, mtimes),
    and ``tag`` (a hash of the extractor weights).
    """
    if isinstance(ref, str) and ref in NAMED_REFERENCES:
        return LazyReference(ref, rgb), f"{ref}-{tag}", NAMED_REFERENCES[ref][1], None
    if isinstance(ref, ClassReference):
        count = int((load_named_labels(ref.name) == ref.label).sum())  # the images load only if not cached
        return LazyReference(ref.name, rgb, ref.label), f"{ref.name}-class{ref.label}-{tag}", count, None
    check_reference(ref)
    path = Path(ref)
    if check_path(ref, "reference").suffix == ".npz":
        with np.load(path) as z:
            if not {"mu", "sigma"} <= set(z.files):
                raise InputError(f"statistics file {ref} lacks mu and sigma (has {', '.join(z.files)})")
            return None, None, None, {k: z[k] for k in z.files}
    files = image_files(path)
    listing = (f"{Path(f).name}:{Path(f).stat().st_size}:{Path(f).stat().st_mtime_ns}".encode() for f in files)
    return str(path), f"folder-{_sha(listing)}-{tag}", len(files), None


def source_input(source, num_samples: int | None, rgb: bool, seed: int, device: torch.device):
    """(torch-fidelity input1, number of samples) for a callable (seeded generator) or an image folder."""
    if callable(source):
        if not isinstance(num_samples, int) or num_samples < 1:
            raise InputError(f"num_samples must be a positive integer for a callable source, got {num_samples}")
        return StreamingSource(source, torch.Generator(device).manual_seed(seed), rgb), num_samples
    files = image_files(source)
    if num_samples is not None and num_samples > len(files):
        raise InputError(f"num_samples={num_samples} but folder {source} holds {len(files)} images")
    files = files[:num_samples]
    return ImagesPathDataset(files), len(files)
