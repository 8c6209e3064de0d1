"""The default backbone really carries ImageNet weights, and embeds to its declared size."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from mil_cli.backbones import DEFAULT_BACKBONE, efficientnet_lite0_classifier, get_backbone
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


def test_default_backbone_gives_its_declared_dim() -> None:
    embeds_to_declared_dim(get_backbone(DEFAULT_BACKBONE))


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

    save_file(preset.architecture().vit.state_dict(), str(path))
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
