"""A small digits classifier as a torch-fidelity feature extractor.

The FID protocol (SPEC section 7) needs an Inception network whose weights no package ships. For
the data that does exist offline (scikit-learn's 1797 8x8 digits) we use the same recipe at toy
scale: a small CNN classifier, trained by ``scripts/train_digits_extractor.py`` and shipped in
``assets/digits-extractor/``; FID is the Frechet distance between Gaussians fitted to its
penultimate activations ("digits-features"),

    FID = |mu_1 - mu_2|^2 + tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2)).

The extractor follows torch-fidelity's contract: uint8 images (N, C, H, W) in, a tuple of the
requested features out. It accepts 1 or 3 channels (3 are averaged to grey) and any size (resized
to 8x8), and maps [0, 255] to [-1, 1], the package-wide image range.
"""

import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file
from torch_fidelity import FeatureExtractorBase, register_feature_extractor
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from .shipped import shipped

__all__ = [
    "DIGITS_EXTRACTOR_DIR",
    "DigitsNet",
    "FeatureExtractorDigits",
    "digits_uint8",
    "load_digits_net",
    "register_digits_extractor",
    "uint8_to_digits_input",
]

DIGITS_EXTRACTOR_DIR = shipped("assets", "digits-extractor")
DIGITS_FEATURES = "digits-features"


def digits_uint8() -> torch.Tensor:
    """All 1797 scikit-learn digits as uint8 images (1797, 1, 8, 8); ink levels 0..16 -> 0..255."""
    from sklearn.datasets import load_digits

    images = torch.from_numpy(load_digits().images).float()
    return (images * (255.0 / 16.0)).round().to(torch.uint8).unsqueeze(1)


def uint8_to_digits_input(x: torch.Tensor, size: int = 8) -> torch.Tensor:
    """uint8 (N, 1|3, H, W) -> float grey (N, 1, size, size) in [-1, 1], the network's input."""
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"digits extractor expects images (N, 1 or 3, H, W), got shape {tuple(x.shape)}")
    x = x.float().div(127.5).sub(1.0).mean(dim=1, keepdim=True)
    if x.shape[-2:] != (size, size):
        # antialias so that large renders of digits are averaged down, not aliased
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x


class DigitsNet(nn.Module):
    """Conv(w) -> Conv(2w) -> pool -> Conv(2w) -> pool -> Linear(feature_dim) -> Linear(10), ReLUs.

    ``forward`` returns (features, logits); features are the post-ReLU penultimate activations,
    the analogue of Inception's pool3 features.
    """

    def __init__(self, width: int = 16, feature_dim: int = 64, num_classes: int = 10, dropout: float = 0.3):
        super().__init__()
        self.config = {"width": width, "feature_dim": feature_dim, "num_classes": num_classes, "dropout": dropout}
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(2 * width * 2 * 2, feature_dim), nn.ReLU(),
        )  # fmt: skip
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.body(x)
        return features, self.head(self.dropout(features))


def load_digits_net(path: str | Path | None = None) -> DigitsNet:
    """Load the shipped (or another) digits network; ``path`` is its directory or .safetensors file."""
    path = Path(path) if path is not None else DIGITS_EXTRACTOR_DIR
    weights = path / "model.safetensors" if path.is_dir() else path
    if not weights.is_file():
        raise FileNotFoundError(
            f"digits extractor weights not found at {weights}; run scripts/train_digits_extractor.py"
        )
    config = json.loads((weights.parent / "config.json").read_text())
    net = DigitsNet(width=config["width"], feature_dim=config["feature_dim"], num_classes=config["num_classes"])
    net.load_state_dict(load_file(str(weights)))
    return net.eval().requires_grad_(False)


class FeatureExtractorDigits(FeatureExtractorBase):
    """torch-fidelity extractor "digits": features "digits-features" (FID/KID/PRC) and "logits" (ISC).

    ``feature_extractor_weights_path`` (torch-fidelity's keyword) overrides the shipped weights.
    """

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        self.net = load_digits_net(feature_extractor_weights_path)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if x.dtype != torch.uint8:
            raise ValueError(f"digits extractor expects uint8 images, got {x.dtype}")
        features, logits = self.net(uint8_to_digits_input(x))
        out = {DIGITS_FEATURES: features, "logits": logits}
        return tuple(out[name] for name in self.features_list)

    @staticmethod
    def get_provided_features_list():
        return DIGITS_FEATURES, "logits"

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"isc": "logits", "fid": DIGITS_FEATURES, "kid": DIGITS_FEATURES, "prc": DIGITS_FEATURES}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 1, 8, 8, dtype=torch.uint8)


def register_digits_extractor(name: str = "digits") -> str:
    """Register :class:`FeatureExtractorDigits` with torch-fidelity under ``name`` (idempotent)."""
    registered = FEATURE_EXTRACTORS_REGISTRY.get(name)
    if registered is None:
        register_feature_extractor(name, FeatureExtractorDigits)
    elif registered is not FeatureExtractorDigits:
        raise ValueError(f"torch-fidelity feature extractor {name!r} is already registered as {registered.__name__}")
    return name
