"""Load trained models safely and predict slides (or patients): one model file, or a folder of
fold models (`fold_*/model.pt`) whose predictions are averaged as an ensemble."""

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
from mil_cli.stores import FeatureSource
from mil_cli.tasks import Task, task_from_config
from mil_cli.training import MODEL_FORMAT, READABLE_FORMAT_VERSIONS, build_ensemble


ZIP_MAGIC = b"PK\x03\x04"


@dataclass
class LoadedModel:
    path: Path
    module: nn.Module
    config: dict

    @property
    def classes(self) -> list[str]:
        """The names of the predicted quantities: classes, or 'prediction' or 'risk'."""
        return list(self.config["classes"])

    @property
    def task(self) -> Task:
        return task_from_config(self.config)

    @property
    def bag_by(self) -> str:
        return str(self.config.get("bag_by", "slide"))


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
    if checkpoint.get("format_version") not in READABLE_FORMAT_VERSIONS:
        raise InputError(path, f"model format {checkpoint.get('format_version')} is from another milcli version "
                               f"(this one reads {', '.join(map(str, READABLE_FORMAT_VERSIONS))}); train it again")
    config = checkpoint["config"]
    module = build_ensemble(config)
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
        if any((m.classes, m.task.name, m.bag_by) != (models[0].classes, models[0].task.name, models[0].bag_by)
               for m in models):
            raise InputError(path, "fold models disagree on the task, the classes or the bagging")
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
    """Mean predictions (class probabilities, value or risk) and mean attention over the models."""
    x = torch.from_numpy(features).to(device)
    predictions, attention = [], []
    for model in models:
        logits, weights = model.module.bag(x)
        predictions.append(model.task.predict(logits[None].float()).cpu().numpy()[0])
        attention.append(weights.cpu().numpy())
    return np.mean(predictions, axis=0), np.mean(attention, axis=0)


@dataclass
class Prediction:
    bag_id: str              # the slide's id, or the patient's for patient-level models
    predictions: np.ndarray  # class probabilities, or the value or risk
    slide_ids: list[str]


def bag_slides(models: list[LoadedModel], slide_ids: list[str], labels: LabelTable | None) -> dict[str, list[str]]:
    """The bags to predict: one per slide, or for a model trained on patient bags one per
    patient of the labels' patient_id column (a slide it does not list is its own patient)."""
    if models[0].bag_by != "patient":
        return {sid: [sid] for sid in slide_ids}
    if labels is None:
        raise InputError(models[0].path, "was trained on patient bags (--bag-by patient); give --labels with "
                                         "slide_id and patient_id columns")
    bags: dict[str, list[str]] = {}
    for sid in slide_ids:
        row = labels.rows.get(sid)
        bags.setdefault(row.patient_id or sid if row else sid, []).append(sid)
    return bags


def bag_features(source: FeatureSource, slide_ids: list[str]) -> tuple[np.ndarray, list[tuple[str, int]]]:
    """The slides' patches one after the other, and (slide id, patches) per slide with any."""
    arrays, parts = [], []
    for slide_id in slide_ids:
        features = source.load(slide_id).features
        assert features is not None
        if len(features):
            arrays.append(features)
            parts.append((slide_id, len(features)))
    return (np.concatenate(arrays) if arrays else np.zeros((0, 0), np.float32)), parts


def predict_slides(models: list[LoadedModel], source: FeatureSource, bags: dict[str, list[str]],
                   device: torch.device) -> list[Prediction]:
    """Each bag (id -> its slides in the store) with patches."""
    check_compatible(models, source)
    results = []
    for bag_id, slide_ids in bags.items():
        features, parts = bag_features(source, slide_ids)
        if parts:
            results.append(Prediction(bag_id, predict_bag(models, features, device)[0], [sid for sid, _ in parts]))
    return results


def check_unique_slides(sources: list[FeatureSource]) -> None:
    """Several stores can be predicted together only if no slide id is in two of them."""
    owners: dict[str, Path] = {}
    for source in sources:
        for slide_id in source.slide_ids:
            if slide_id in owners:
                raise InputError(source.path, f"slide '{slide_id}' is also in {owners[slide_id]}; give each slide once")
            owners[slide_id] = source.path


def predict_stores(models: list[LoadedModel], sources: list[FeatureSource], device: torch.device,
                   labels: LabelTable | None = None) -> list[Prediction]:
    """Every slide (or patient) of every store, in store order."""
    check_unique_slides(sources)
    return [p for source in sources
            for p in predict_slides(models, source, bag_slides(models, source.slide_ids, labels), device)]


def training_role(models: list[LoadedModel], bag_id: str) -> str:
    """'train', 'val' or 'test' when the (single) model's training used or held out this
    slide (patient); '' when it never saw it or an ensemble is used."""
    if len(models) != 1:
        return ""
    roles = models[0].config.get("slides", {})
    return next((role for role, ids in roles.items() if bag_id in ids), "")


def write_predictions(predictions: list[Prediction], models: list[LoadedModel], labels: LabelTable | None,
                      stream: TextIO = sys.stdout) -> None:
    """The predictions CSV: slide_id (patient_id, for patient-level models), the task's
    prediction columns (prediction and prob_<class>...; prediction; risk), then the known
    target's columns (label and correct; label; time and event) when labels are given, split
    (the bag's role in the model's training, see training_role), and for patient-level models
    the slides each patient's bag held."""
    task, by_patient = models[0].task, models[0].bag_by == "patient"
    writer = csv.writer(stream, lineterminator="\n")
    header = ["patient_id" if by_patient else "slide_id"] + task.prediction_columns()
    if labels is not None:
        header += task.known_columns()
    writer.writerow(header + ["split"] + ["slides"] * by_patient)
    for p in predictions:
        row = [p.bag_id] + task.prediction_values(p.predictions)
        if labels is not None:
            known = labels.rows.get(p.slide_ids[0])
            row += task.known_values(known.target if known else None, p.predictions)
        writer.writerow(row + [training_role(models, p.bag_id)] + [";".join(p.slide_ids)] * by_patient)
