"""The default backbone really carries ImageNet weights, and embeds to its declared size."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from mil_cli.backbones import BACKBONES, DEFAULT_BACKBONE, get_backbone
from mil_cli.errors import MilcliError


def imagenet_input(image: np.ndarray, backbone) -> torch.Tensor:
    """Resize the short side to 256, centre-crop the input size, normalise as declared."""
    pil = Image.fromarray(image).convert("RGB")
    scale = 256 / min(pil.size)
    pil = pil.resize((round(pil.width * scale), round(pil.height * scale)), Image.BICUBIC)
    left, top = (pil.width - backbone.input_size) // 2, (pil.height - backbone.input_size) // 2
    pil = pil.crop((left, top, left + backbone.input_size, top + backbone.input_size))
    x = torch.from_numpy(np.array(pil)).permute(2, 0, 1).float() / 255
    mean, std = torch.tensor(backbone.mean)[:, None, None], torch.tensor(backbone.std)[:, None, None]
    return ((x - mean) / std)[None]


@pytest.fixture(scope="module")
def classifier():
    backbone = get_backbone(DEFAULT_BACKBONE)
    return backbone, backbone.create(with_classifier=True)


def test_default_backbone_calls_chelsea_a_cat(classifier) -> None:
    backbone, model = classifier
    with torch.inference_mode():
        probs = model(imagenet_input(data.chelsea(), backbone)).softmax(-1)[0]
    assert 281 <= int(probs.argmax()) <= 285  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    assert float(probs[281:286].sum()) > 0.8


def test_default_backbone_calls_coffee_an_espresso(classifier) -> None:
    backbone, model = classifier
    with torch.inference_mode():
        probs = model(imagenet_input(data.coffee(), backbone)).softmax(-1)[0]
    assert int(probs.argmax()) == 967
    assert float(probs[967]) > 0.8


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_every_registered_backbone_gives_its_declared_dim(name: str) -> None:
    backbone = get_backbone(name)
    with torch.inference_mode():
        features = backbone.create()(torch.zeros(2, 3, backbone.input_size, backbone.input_size))
    assert features.shape == (2, backbone.dim)
    assert torch.isfinite(features).all()


def test_unknown_backbone_is_a_clear_error() -> None:
    with pytest.raises(MilcliError, match="unknown backbone 'nope'"):
        get_backbone("nope")
