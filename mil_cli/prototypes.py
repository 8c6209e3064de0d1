"""Prototypes, "this looks like that" (ProtoPNet style): for a slide's most attended patches,
the most similar highly attended patches of each class among the slides that trained the
model, by cosine similarity of the stored features. No pixels are needed to search; pixels
are read only to draw the matches."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

from mil_cli.console import warn
from mil_cli.errors import InputError
from mil_cli.inference import LoadedModel, predict_bag
from mil_cli.slides import open_slide
from mil_cli.stores import FeatureSource, SlideData

BANK_SHARE = 0.1     # of each training slide's patches, the most attended, enter the bank
QUERIES = 4          # top patches of the explained slide that get prototypes


@dataclass
class PrototypeBank:
    """Highly attended patches of the training slides, per class: unit feature vectors and
    where each came from."""

    classes: list[str]
    features: dict[str, np.ndarray]                     # class -> (M, D) unit vectors
    origins: dict[str, list[tuple[SlideData, int]]]     # class -> (slide, patch index) per row


def build_bank(models: list[LoadedModel], source: FeatureSource, device: torch.device) -> PrototypeBank | None:
    """The bank from the training slides the model file names, as far as `source` holds them."""
    labels = models[0].config.get("slide_labels", {})
    classes = models[0].classes
    features: dict[str, list[np.ndarray]] = {c: [] for c in classes}
    origins: dict[str, list[tuple[SlideData, int]]] = {c: [] for c in classes}
    missing = [sid for sid in labels if sid not in source]
    if missing:
        warn(f"{len(missing)} training slide(s) are not in {source.path}; prototypes come from the others")
    for slide_id, label in labels.items():
        if slide_id in missing or label not in features:
            continue
        data = source.load(slide_id)
        assert data.features is not None
        _, attention = predict_bag(models, data.features, device)
        top = np.argsort(-attention)[: max(1, int(round(BANK_SHARE * len(attention))))]
        features[label].append(data.features[top])
        origins[label] += [(data, int(i)) for i in top]
    if not any(origins.values()):
        return None
    unit = {c: _unit(np.concatenate(f)) for c, f in features.items() if f}
    return PrototypeBank(classes, unit, {c: o for c, o in origins.items() if o})


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def write_prototypes(folder: Path, data: SlideData, attention: np.ndarray, bank: PrototypeBank) -> None:
    """prototypes.csv and prototypes.png: each top patch, then its closest match per class."""
    assert data.features is not None
    queries = np.argsort(-attention)[:QUERIES]
    sims = {}
    for c in bank.features:  # a slide is never its own prototype
        own = np.array([origin.slide_id == data.slide_id for origin, _ in bank.origins[c]])
        sims[c] = np.where(own, -np.inf, _unit(data.features[queries]) @ bank.features[c].T)
    rows = []
    for qi, query in enumerate(queries):
        for c in bank.features:
            if np.isneginf(sims[c][qi]).all():
                continue
            best = int(np.argmax(sims[c][qi]))
            match, index = bank.origins[c][best]
            rows.append((int(query), c, match, index, float(sims[c][qi, best])))
    with open(folder / "prototypes.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["query_x", "query_y", "class", "match_slide_id", "match_x", "match_y", "cosine"])
        for query, c, match, index, sim in rows:
            writer.writerow([*data.coords[query], c, match.slide_id, *match.coords[index], f"{sim:.4f}"])
    _draw(folder / "prototypes.png", data, queries, rows, list(bank.features))


def _read(data: SlideData, index: int) -> np.ndarray:
    x, y = (int(v) for v in data.coords[index])
    size = int(data.attrs.get("patch_size_level0", 256))
    with open_slide(Path(str(data.attrs["source_path"]))) as slide:
        return slide.read_patch((x, y), size, int(data.attrs.get("patch_size", 224)))


def _draw(path: Path, data: SlideData, queries: np.ndarray, rows: list, classes: list[str]) -> None:
    columns = 1 + len(classes)
    fig = Figure(figsize=(2.1 * columns, 2.3 * len(queries)))
    axes = fig.subplots(len(queries), columns, squeeze=False)
    for qi, query in enumerate(queries):
        panels = [(data, int(query), f"{data.slide_id}\ntop patch #{qi + 1}")]
        panels += [(match, index, f"like '{c}': {match.slide_id}\ncosine {sim:.2f}")
                   for q, c, match, index, sim in rows if q == int(query)]
        for ax, (slide, index, title) in zip(axes[qi], panels):
            try:
                ax.imshow(_read(slide, index))
            except InputError as exc:
                ax.text(0.5, 0.5, "unreadable", ha="center")
                warn(f"prototypes: {exc}")
            ax.set_title(title, fontsize=7)
            ax.set_axis_off()
    fig.suptitle("this looks like that: top patches and their closest highly attended training patches",
                 fontsize=8)
    fig.savefig(path, bbox_inches="tight", dpi=100)
