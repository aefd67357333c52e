import json

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from n2ce_distill.feature_extractors import (
    DIGITS_EXTRACTOR_DIR,
    FeatureExtractorDigits,
    digits_uint8,
    load_digits_net,
    register_digits_extractor,
    uint8_to_digits_input,
)

CONFIG = json.loads((DIGITS_EXTRACTOR_DIR / "config.json").read_text())


@pytest.fixture(scope="module")
def extractor():
    return FeatureExtractorDigits("digits", ["digits-features", "logits"])


def test_shipped_weights_reach_the_card_test_accuracy():
    labels = load_digits().target
    _, idx_test = train_test_split(
        list(range(len(labels))), test_size=0.2, random_state=CONFIG["seed"], stratify=labels
    )
    net = load_digits_net()
    with torch.no_grad():
        pred = net(uint8_to_digits_input(digits_uint8()[idx_test]))[1].argmax(1)
    accuracy = (pred == torch.as_tensor(labels[idx_test])).float().mean().item()
    assert accuracy == pytest.approx(CONFIG["test_accuracy"], abs=1e-6)
    assert accuracy > 0.97  # 0.9917 on the 360 held-out images
    card = (DIGITS_EXTRACTOR_DIR / "README.md").read_text()
    assert f"{CONFIG['test_accuracy']:.4f}" in card and f"{CONFIG['feature_dim']}-d" in card


def test_features_and_logits_shapes(extractor):
    features, logits = extractor(digits_uint8()[:5])
    assert features.shape == (5, CONFIG["feature_dim"]) and logits.shape == (5, 10)
    only = FeatureExtractorDigits("digits", ["logits"])(digits_uint8()[:2])
    assert len(only) == 1 and only[0].shape == (2, 10)


def test_grey_rgb_and_resized_inputs(extractor):
    x = digits_uint8()[:64]
    features, logits = extractor(x)
    features_rgb, _ = extractor(x.repeat(1, 3, 1, 1))
    torch.testing.assert_close(features_rgb, features)
    big = F.interpolate(x.float(), scale_factor=4, mode="nearest").round().to(torch.uint8)  # 32x32 renders
    _, logits_big = extractor(big)
    assert (logits_big.argmax(1) == logits.argmax(1)).float().mean() > 0.9


def test_bad_inputs_raise(extractor):
    with pytest.raises(ValueError, match="uint8"):
        extractor(torch.zeros(2, 1, 8, 8))
    with pytest.raises(ValueError, match="1 or 3"):
        extractor(torch.zeros(2, 2, 8, 8, dtype=torch.uint8))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_digits_net("/nowhere/model.safetensors")


def test_register_is_idempotent():
    assert register_digits_extractor() == "digits"
    assert register_digits_extractor() == "digits"
    assert FEATURE_EXTRACTORS_REGISTRY["digits"] is FeatureExtractorDigits
    with pytest.raises(ValueError, match="already registered"):
        register_digits_extractor("inception-v3-compat")
