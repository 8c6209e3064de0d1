"""The default backbone really carries ImageNet weights, and embeds to its declared size."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from mil_cli.backbones import efficientnet_lite0_classifier, get_backbone
from mil_cli.config import DEFAULT_BACKBONE
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
    return backbone, efficientnet_lite0_classifier().eval()


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


def embeds_to_declared_dim(backbone, weights=None) -> None:
    with torch.inference_mode():
        features = backbone.create(weights)(torch.rand(2, 3, backbone.input_size, backbone.input_size))
    assert features.shape == (2, backbone.dim)
    assert torch.isfinite(features).all()


@pytest.mark.parametrize("name", ["efficientnet-lite0", "efficientnet-lite0-mid"])
def test_bundled_backbones_give_their_declared_dim(name: str) -> None:
    embeds_to_declared_dim(get_backbone(name))


def test_resnet50_trunc_loads_a_local_weight_file(tmp_path) -> None:
    from torchvision.models import resnet50

    weights = tmp_path / "resnet50.pth"
    torch.save(resnet50().state_dict(), weights)
    backbone = get_backbone("resnet50-trunc")
    assert backbone.dim == 1024
    embeds_to_declared_dim(backbone, weights)


def test_timm_model_loads_a_local_checkpoint(tmp_path) -> None:
    import timm

    source = timm.create_model("mobilenetv3_small_050", pretrained=False)
    weights = tmp_path / "mobilenet.pth"
    torch.save({"state_dict": source.state_dict()}, weights)  # wrapped, head included: both accepted
    backbone = get_backbone("timm:mobilenetv3_small_050")
    assert (backbone.input_size, backbone.mean) == (224, (0.485, 0.456, 0.406))
    model = backbone.create(weights)
    assert torch.equal(model.state_dict()["conv_stem.weight"], source.state_dict()["conv_stem.weight"])
    embeds_to_declared_dim(backbone, weights)


def test_missing_weights_name_the_file_and_the_flag(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(MilcliError, match=r"resnet50-0676ba61\.pth.*--weights FILE"):
        get_backbone("resnet50-trunc").create()
    with pytest.raises(MilcliError, match=r"nope\.pth: weight file not found \(check --weights\)"):
        get_backbone("resnet50-trunc").create(tmp_path / "nope.pth")


def test_weights_for_another_architecture_are_refused(tmp_path) -> None:
    import timm

    weights = tmp_path / "other.pth"
    torch.save(timm.create_model("mobilenetv3_small_050").state_dict(), weights)
    with pytest.raises(MilcliError, match="other.pth: .*another architecture|other.pth: does not fit"):
        get_backbone("resnet50-trunc").create(weights)


def test_pickled_code_in_a_weight_file_is_refused(tmp_path) -> None:
    weights = tmp_path / "evil.pth"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": object()}, weights)
    with pytest.raises(MilcliError, match="evil.pth: not a loadable weight file"):
        get_backbone("resnet50-trunc").create(weights)


def test_unknown_backbone_is_a_clear_error() -> None:
    with pytest.raises(MilcliError, match="unknown backbone 'nope'"):
        get_backbone("nope")
    with pytest.raises(MilcliError, match="timm:no_such_net"):
        get_backbone("timm:no_such_net")


def test_uni_without_cached_weights_says_how_to_get_them(tmp_path, monkeypatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(MilcliError, match=r"MahmoodLab/UNI/pytorch_model.bin is not in the Hugging Face cache.*--weights FILE"):
        get_backbone("uni").create()


def test_list_backbones_as_json_says_whose_weights_are_here(tmp_path, monkeypatch) -> None:
    import json

    from huggingface_hub import constants

    from conftest import invoke

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    result = invoke("embed", "--list-backbones", "--json")
    assert result.exit_code == 0
    listed = {b["name"]: b for b in json.loads(result.stdout)["backbones"]}
    assert listed["efficientnet-lite0"]["weights_present"] is True  # bundled with the package
    assert [name for name, b in listed.items() if b["default"]] == [DEFAULT_BACKBONE]
    assert listed[DEFAULT_BACKBONE]["weights_present"] is True  # the default works offline
    assert listed["resnet50-trunc"]["weights_present"] is False and listed["uni"]["weights_present"] is False
    assert listed["uni"]["dim"] == 1024 and listed["uni"]["input_size"] == 224
    cached = tmp_path / "torch" / "hub" / "checkpoints" / "resnet50-0676ba61.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"")
    assert json.loads(invoke("embed", "--list-backbones", "--json").stdout)["backbones"][1]["weights_present"] is True


@pytest.mark.parametrize("name", [p.name for p in __import__("mil_cli.backbones", fromlist=["PRESETS"]).PRESETS])
def test_every_preset_builds_with_its_declared_feature_size(name: str) -> None:
    """Built on the meta device (no memory, no weights): the kwargs from the model card give a
    network whose output is the declared dim (class token, or class token + mean patch token)."""
    from mil_cli.backbones import PRESETS

    preset = next(p for p in PRESETS if p.name == name)
    with torch.device("meta"):
        out = preset.architecture()(torch.empty(2, 3, preset.input_size, preset.input_size))
    assert tuple(out.shape) == (2, preset.dim) == (2, get_backbone(name).dim)
    assert preset.card.startswith("https://huggingface.co/") and preset.repo in preset.card


@pytest.fixture(scope="module")
def lunit_weights(tmp_path_factory: pytest.TempPathFactory):
    """Random weights for the small lunit-dino-vits8 preset, saved as its hub file would be."""
    from mil_cli.backbones import PRESETS

    preset = next(p for p in PRESETS if p.name == "lunit-dino-vits8")
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "lunit.safetensors"
    from safetensors.torch import save_file

    save_file(preset.architecture().encoder.state_dict(), str(path))
    return path


def test_a_preset_embeds_with_a_local_weight_file(lunit_weights, embedded_subset) -> None:
    from conftest import invoke
    from mil_cli.stores import FeatureSource

    result = invoke("embed", "--backbone", "lunit-dino-vits8", "--weights", lunit_weights, "--out", "lunit.h5",
                    "--device", "cpu", "-q", cwd=embedded_subset)
    assert result.exit_code == 0, result.stderr
    source = FeatureSource(embedded_subset / "lunit.h5")
    features = source.load(source.slide_ids[0]).features
    assert features.shape[1] == 384 and np.isfinite(features).all() and features.std() > 0
    assert source.attrs["backbone"] == "lunit-dino-vits8"


def test_a_weight_file_of_another_preset_is_one_clear_line(lunit_weights, embedded_subset) -> None:
    from conftest import invoke

    result = invoke("embed", "--backbone", "dinov2-vitl", "--weights", lunit_weights, "--out", "wrong.h5",
                    "--device", "cpu", cwd=embedded_subset)
    assert result.exit_code == 2 and "Traceback" not in result.stderr
    assert "lunit.safetensors" in result.stderr and ("does not fit" in result.stderr or "another architecture" in result.stderr)


def test_a_gated_preset_without_weights_says_what_to_do_and_downloads_nothing(embedded_subset, tmp_path,
                                                                              monkeypatch) -> None:
    from huggingface_hub import constants

    from conftest import invoke

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    result = invoke("embed", embedded_subset / "tiles.h5", "--backbone", "virchow2", "--out", tmp_path / "f.h5")
    message = " ".join(result.stderr.split())
    assert result.exit_code == 2 and "paige-ai/Virchow2" in message
    assert "request access at https://huggingface.co/paige-ai/Virchow2" in message and "--download" in message
    assert not (tmp_path / "hub").exists() and not (tmp_path / "f.h5").exists()


def transformers_4_layout(state: dict[str, torch.Tensor], vit: bool) -> dict[str, torch.Tensor]:
    """A transformers-5 state_dict in the layout transformers 4 saved on the hub (the files users
    have): split q/k/v under attention.attention, ViT's intermediate/output dense layers, DINOv2's
    packed SwiGLU weights_in (gate first) and weights_out."""
    import re

    out = {}
    for key, value in state.items():
        key = re.sub(r"^layers\.", "encoder.layer.", key)
        key = re.sub(r"attention\.([qkv])_proj", lambda m: "attention.attention." + dict(q="query", k="key", v="value")[m[1]],
                     key).replace("attention.o_proj", "attention.output.dense").replace("mlp.down_proj", "mlp.weights_out")
        if "mlp.up_proj" in key:
            continue
        if "mlp.gate_proj" in key:
            key, value = key.replace("gate_proj", "weights_in"), torch.cat([value, state[key.replace("gate", "up")]])
        if vit:
            key = key.replace("mlp.fc1", "intermediate.dense").replace("mlp.fc2", "output.dense")
        out[key] = value
    return out


def small_transformers_models():
    """Small random models of each transformers family a preset reads, with the timm
    architecture and kwargs that mirror them (as the presets' do at full size)."""
    transformers = pytest.importorskip("transformers")
    vit = transformers.ViTModel(transformers.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                       intermediate_size=256, image_size=32, patch_size=16),
                                add_pooling_layer=False)
    swiglu = transformers.Dinov2Model(transformers.Dinov2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                                image_size=28, patch_size=14, use_swiglu_ffn=True))
    registers = transformers.Dinov2WithRegistersModel(transformers.Dinov2WithRegistersConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=28, patch_size=14, num_register_tokens=4,
        use_swiglu_ffn=True))
    dinov2 = transformers.Dinov2Model(transformers.Dinov2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                                image_size=32, patch_size=16))
    small = {"embed_dim": 64, "depth": 2, "num_heads": 4}
    swiglu_mlp = {"mlp_ratio": 2 * 176 / 64, "mlp_layer": "SwiGLUPacked", "act_layer": "SiLU"}  # (int(256*2/3)+7)//8*8
    return [  # (name, model, timm arch, kwargs, pooling, input size): phikon, midnight, hibou, phikon-v2 in small
        ("vit", vit, "vit_base_patch16_224", {**small, "norm_layer": "LayerNorm(eps=1e-12)"}, "cls", 32),
        ("dinov2-swiglu", swiglu, "vit_giant_patch14_dinov2", {**small, **swiglu_mlp}, "cls+mean", 28),
        ("dinov2-registers", registers, "vit_base_patch14_reg4_dinov2", {**small, **swiglu_mlp}, "cls", 28),
        ("dinov2", dinov2, "vit_large_patch16_224", {**small, "init_values": 1e-5}, "cls", 32),
    ]


@pytest.mark.parametrize("family", ["vit", "dinov2-swiglu", "dinov2-registers", "dinov2"])
@pytest.mark.parametrize("version", [4, 5])
def test_transformers_layout_weights_give_transformers_features(family: str, version: int, tmp_path) -> None:
    """Phikon, Phikon-v2, Hibou and Midnight publish transformers-layout weights; renamed into
    timm's, the preset's feature must equal what transformers itself computes from the same file
    (class token of the last hidden state, or with the mean patch token beside it)."""
    from safetensors.torch import save_file

    from mil_cli.backbones import IMAGENET_MEAN, IMAGENET_STD, Preset

    name, model, arch, kwargs, pooling, size = next(m for m in small_transformers_models() if m[0] == family)
    torch.manual_seed(0)
    for parameter in model.parameters():
        parameter.data.normal_(0, 0.2)
    model.eval()
    state = model.state_dict()
    if version == 4:  # the layout really on the hub: transformers must read it back to the same model
        state = transformers_4_layout(state, vit=family == "vit")
        model.config.save_pretrained(tmp_path)
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
        model = type(model).from_pretrained(tmp_path).eval()
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        tokens = model(pixel_values=x).last_hidden_state
    patches = tokens[:, 1 + getattr(model.config, "num_register_tokens", 0):]
    expected = tokens[:, 0] if pooling == "cls" else torch.cat([tokens[:, 0], patches.mean(dim=1)], dim=-1)
    preset = Preset("small", "org/small", arch, {"img_size": size, **kwargs}, dim=expected.shape[1], pooling=pooling,
                    mean=IMAGENET_MEAN, std=IMAGENET_STD, mpp=None, licence="", gated=False, card="", description="",
                    layout="transformers")
    encoder = preset.backbone().create(path)
    with torch.no_grad():
        features = encoder(x)
    assert expected.std() > 0.05
    torch.testing.assert_close(features, expected, rtol=1e-4, atol=1e-5)


def test_h0_mini_reads_its_mlp_width_off_the_file_and_averages_patch_tokens_without_registers(tmp_path) -> None:
    """H0-mini's card passes timm only the SwiGLU layers (the MLP width is in its hub config):
    the preset reads the width off the weight file, and its feature is the class token beside
    the mean of the patch tokens, the 4 register tokens left out. Checked on a small model of
    the same family whose MLP width differs from the one the preset declares."""
    import timm
    from safetensors.torch import save_file

    from mil_cli.backbones import HOPTIMUS_MEAN, HOPTIMUS_STD, PRESETS, SWIGLU, Preset
    from mil_cli.errors import InputError

    h0_mini = next(p for p in PRESETS if p.name == "h0-mini")
    assert h0_mini.mlp_from_weights and h0_mini.pooling == "cls+mean" and h0_mini.dim == 2 * 768
    small = {"img_size": 28, "embed_dim": 64, "depth": 2, "num_heads": 4}
    torch.manual_seed(0)
    saved = timm.create_model(h0_mini.arch, pretrained=False, num_classes=0, mlp_ratio=3.0, **small,
                              mlp_layer=timm.layers.SwiGLUPacked, act_layer=torch.nn.SiLU).eval()
    for parameter in saved.parameters():
        parameter.data.normal_(0, 0.2)
    path = tmp_path / "model.safetensors"
    save_file(saved.state_dict(), str(path))
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        tokens = saved.forward_features(x)
    assert saved.num_prefix_tokens == 5 and tokens.shape[1] == 5 + 4
    expected = torch.cat([tokens[:, 0], tokens[:, 5:].mean(dim=1)], dim=-1)

    def preset(mlp_from_weights: bool) -> Preset:
        return Preset("small-h0", "org/small", h0_mini.arch, {**small, "mlp_ratio": 4.0, **SWIGLU}, dim=128,
                      pooling="cls+mean", mean=HOPTIMUS_MEAN, std=HOPTIMUS_STD, mpp=0.5, licence="", gated=True,
                      card="", description="", mlp_from_weights=mlp_from_weights)

    with torch.no_grad():
        features = preset(mlp_from_weights=True).backbone().create(path)(x)
    torch.testing.assert_close(features, expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(InputError, match="does not fit"):  # the declared width alone would not load it
        preset(mlp_from_weights=False).backbone().create(path)


def test_ctranspath_loads_the_original_checkpoint_layout(tmp_path) -> None:
    """CTransPath's original ctranspath.pth (a "model" wrapper, each stage's downsampling at the
    end of the stage before timm's) gives the network whose timm-layout weights it holds (the
    hub port's layout)."""
    import re

    from mil_cli.backbones import PRESETS

    preset = next(p for p in PRESETS if p.name == "ctranspath")
    torch.manual_seed(0)
    reference = preset.architecture().eval()
    original = {re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m[1]) - 1}.downsample", k): v
                for k, v in reference.encoder.state_dict().items()}
    torch.save({"model": original}, tmp_path / "ctranspath.pth")
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        features = get_backbone("ctranspath").create(tmp_path / "ctranspath.pth")(x)
        assert features.shape == (1, 768)
        torch.testing.assert_close(features, reference(x))


def test_conch_v15_pooler_follows_its_published_formula_and_loads_its_file_layout(tmp_path) -> None:
    """CONCH v1.5's feature: one learnt query, layer-normed, attends (8 heads, no biases) over the
    layer-normed trunk tokens; the result, layer-normed, is the feature. Checked on a small trunk
    against that formula written out step by step, from a file in its own layout (trunk.*,
    attn_pool_contrast.*, ln_contrast.*) whose position grid is for 224 px, resampled to 448."""
    import timm
    from torch.nn import functional as F

    from mil_cli.backbones import ContrastPooling

    def small(img_size: int) -> ContrastPooling:
        trunk = timm.create_model("vit_large_patch16_224", pretrained=False, num_classes=0, img_size=img_size,
                                  embed_dim=64, depth=2, num_heads=4, init_values=1e-6)
        return ContrastPooling(trunk, dim=48)

    torch.manual_seed(0)
    saved = small(224)
    for parameter in saved.parameters():
        parameter.data.normal_(0, 0.3)
    path = tmp_path / "pytorch_model_vision.bin"
    torch.save(saved.state_dict(), path)
    model = small(448)
    model.load_weights(torch.load(path, weights_only=True), path, "conch-v1.5")
    assert model.trunk.pos_embed.shape[1] == 1 + 28 * 28

    x = torch.randn(2, 3, 448, 448)
    with torch.no_grad():
        tokens = model.trunk.forward_features(x)  # (2, 785, 64), after the trunk's final norm
        pooler = model.attn_pool_contrast
        q = pooler.to_q(F.layer_norm(pooler.query, (48,), pooler.ln_q.weight, pooler.ln_q.bias))  # (1, 48)
        k, v = pooler.to_kv(F.layer_norm(tokens, (64,), pooler.ln_k.weight, pooler.ln_k.bias)).chunk(2, dim=-1)
        heads = 8
        qh = q.reshape(1, heads, 6)
        kh, vh = k.reshape(2, -1, heads, 6), v.reshape(2, -1, heads, 6)
        sim = torch.einsum("qhd,bnhd->bhqn", qh, kh) * 6 ** -0.5
        attention = (sim - sim.amax(-1, keepdim=True)).softmax(-1)
        pooled = torch.einsum("bhqn,bnhd->bqhd", attention, vh).reshape(2, 1, 48)
        expected = F.layer_norm(pooler.to_out(pooled)[:, 0], (48,), model.ln_contrast.weight, model.ln_contrast.bias)
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)


def test_a_broken_transformers_layout_file_is_one_clear_line(tmp_path) -> None:
    from safetensors.torch import save_file

    from mil_cli.errors import InputError

    path = tmp_path / "model.safetensors"
    save_file({"embeddings.patch_embeddings.projection.weight": torch.zeros(4, 3, 16, 16),
               "encoder.layer.0.attention.attention.query.weight": torch.zeros(4, 4)}, str(path))
    with pytest.raises(InputError, match=r"model\.safetensors: does not fit --backbone phikon"):
        get_backbone("phikon").create(path)
