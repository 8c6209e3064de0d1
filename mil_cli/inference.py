"""Load trained models safely and predict slides: one model file, or a folder of fold models
(`fold_*/model.pt`) whose probabilities are averaged as an ensemble."""

from __future__ import annotations

import csv
import pickle
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np
import torch
from torch import nn

from mil_cli.errors import InputError, first_line
from mil_cli.labels import LabelTable
from mil_cli.config import ModelConfig
from mil_cli.models import SeedEnsemble, build_model
from mil_cli.stores import FeatureSource
from mil_cli.training import MODEL_FORMAT, MODEL_FORMAT_VERSION


ZIP_MAGIC = b"PK\x03\x04"


@dataclass
class LoadedModel:
    path: Path
    module: nn.Module
    config: dict

    @property
    def classes(self) -> list[str]:
        return list(self.config["classes"])


def load_model(path: Path, device: torch.device) -> LoadedModel:
    """Load a model file with `weights_only=True`: plain tensors and data, never pickled code."""
    if not path.is_file():
        raise InputError(path, "no such model file (pass --model)")
    with open(path, "rb") as f:
        is_archive = f.read(4) == ZIP_MAGIC
    if not is_archive:  # torch.save writes a zip archive; anything else is another kind of file
        raise InputError(path, "not a model file (`milcli train` writes model.pt files; is this the right path?)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # weights_only refused an object: code or classes, not plain data
        raise InputError(path, "not a loadable milcli model: it holds Python objects besides tensors and plain "
                               "data, which are never loaded (weights_only)") from None
    except Exception:  # a damaged archive surfaces as many types
        raise InputError(path, "not a loadable milcli model: the file is damaged or truncated; copy it again "
                               "or retrain") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != MODEL_FORMAT:
        raise InputError(path, "not a milcli model file (format key missing)")
    if checkpoint.get("format_version") != MODEL_FORMAT_VERSION:
        raise InputError(path, f"model format {checkpoint.get('format_version')} is from another milcli version "
                               f"(this one reads {MODEL_FORMAT_VERSION}); train it again")
    config = checkpoint["config"]
    module = SeedEnsemble([build_model(ModelConfig(**config["model"])) for _ in range(int(config["ensemble"]))])
    try:
        module.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as exc:
        raise InputError(path, f"weights do not fit the recorded architecture: {first_line(exc)}") from None
    return LoadedModel(path, module.to(device).eval(), config)


def load_models(path: Path, device: torch.device) -> list[LoadedModel]:
    """One model file, or every `fold_*/model.pt` under a folder (an ensemble)."""
    if path.is_dir():
        files = sorted(path.glob("fold_*/model.pt")) or sorted(path.glob("*/model.pt"))
        if not files:
            raise InputError(path, "folder holds no fold_*/model.pt files")
        models = [load_model(f, device) for f in files]
        if any(m.classes != models[0].classes for m in models):
            raise InputError(path, "fold models disagree on the classes")
        return models
    return [load_model(path, device)]


def check_compatible(models: list[LoadedModel], source: FeatureSource) -> None:
    """The store's backbone and feature size must be the ones the model was trained on."""
    model = models[0]
    store_backbone = source.attrs.get("backbone")
    if store_backbone and model.config.get("backbone") not in (None, "unknown", store_backbone):
        raise InputError(source.path, f"features come from backbone '{store_backbone}', but {model.path} "
                                      f"was trained on '{model.config['backbone']}'")
    dim = source.feature_dim()
    if dim != model.config["feature_dim"]:
        raise InputError(source.path, f"features have {dim} dims, {model.path} expects {model.config['feature_dim']}")


@torch.inference_mode()
def predict_bag(models: list[LoadedModel], features: np.ndarray, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """Mean class probabilities and mean attention over the models."""
    x = torch.from_numpy(features).to(device)
    probs, attention = [], []
    for model in models:
        logits, weights = model.module.bag(x)
        probs.append(torch.softmax(logits, -1).cpu().numpy())
        attention.append(weights.cpu().numpy())
    return np.mean(probs, axis=0), np.mean(attention, axis=0)


@dataclass
class Prediction:
    slide_id: str
    probs: np.ndarray


def predict_slides(models: list[LoadedModel], source: FeatureSource, slide_ids: list[str],
                   device: torch.device) -> list[Prediction]:
    check_compatible(models, source)
    results = []
    for slide_id in slide_ids:
        data = source.load(slide_id)
        assert data.features is not None
        if len(data.features) == 0:
            continue
        probs, _ = predict_bag(models, data.features, device)
        results.append(Prediction(slide_id, probs))
    return results


def check_unique_slides(sources: list[FeatureSource]) -> None:
    """Several stores can be predicted together only if no slide id is in two of them."""
    owners: dict[str, Path] = {}
    for source in sources:
        for slide_id in source.slide_ids:
            if slide_id in owners:
                raise InputError(source.path, f"slide '{slide_id}' is also in {owners[slide_id]}; give each slide once")
            owners[slide_id] = source.path


def predict_stores(models: list[LoadedModel], sources: list[FeatureSource], device: torch.device) -> list[Prediction]:
    """Every slide of every store, in store order."""
    check_unique_slides(sources)
    return [p for source in sources for p in predict_slides(models, source, source.slide_ids, device)]


def training_role(models: list[LoadedModel], slide_id: str) -> str:
    """'train', 'val' or 'test' when the (single) model's training used or held out this
    slide; '' when it never saw it or an ensemble is used."""
    if len(models) != 1:
        return ""
    roles = models[0].config.get("slides", {})
    return next((role for role, ids in roles.items() if slide_id in ids), "")


def write_predictions(predictions: list[Prediction], models: list[LoadedModel], labels: LabelTable | None,
                      stream: TextIO = sys.stdout) -> None:
    """The predictions CSV: slide_id, prediction, prob_<class>..., then label and correct when
    labels are given, and split: the slide's role in the model's training (see training_role)."""
    classes = models[0].classes
    writer = csv.writer(stream, lineterminator="\n")
    header = ["slide_id", "prediction"] + [f"prob_{c}" for c in classes]
    if labels is not None:
        header += ["label", "correct"]
    header.append("split")
    writer.writerow(header)
    for p in predictions:
        predicted = classes[int(np.argmax(p.probs))]
        row = [p.slide_id, predicted] + [f"{v:.6f}" for v in p.probs]
        if labels is not None:
            known = labels.rows.get(p.slide_id)
            row += [known.label, str(known.label == predicted).lower()] if known else ["", ""]
        writer.writerow(row + [training_role(models, p.slide_id)])
