"""Prototypes, "this looks like that" (ProtoPNet style), two kinds. Any model: for a slide's
most attended patches, the most similar highly attended patches of each class among the
slides that trained the model, by cosine similarity of the stored features. protomil models:
their learned prototypes (real training patches, models.ProtoMIL), which of them fire on a
slide, where, and where each came from. No pixels are needed to search; pixels are read only
to draw."""

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
from mil_cli.models import ProtoMIL
from mil_cli.raster import in_box, mass_box
from mil_cli.slides import open_slide
from mil_cli.stores import FeatureSource, SlideData

BANK_SHARE = 0.1     # of each training slide's patches, the most attended, enter the bank
QUERIES = 4          # top patches of the explained slide that get prototypes
ACTIVATION_MASS = 0.95  # a learned prototype's box holds this share of its activation on the slide


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


@dataclass
class FiredPrototype:
    """One learned prototype on one slide. Its activation is what it feeds the bag classifier:
    the attention-weighted sum of the patches' similarities to it."""

    model: int                 # which model file (fold) and which seed-ensemble member holds it
    member: int
    index: int                 # the prototype's number in its member
    class_name: str            # the class it was learned for
    origin: dict               # where the projection put it: slide, patch (index in that slide), bag
    similarity: np.ndarray     # (N,) each patch of the slide's similarity to it
    activation: float
    box: list[int]             # level-0 x0, y0, x1, y1: holds ACTIVATION_MASS of the activation
    box_share: float           # the share it actually holds

    @property
    def name(self) -> str:
        return f"model {self.model + 1} member {self.member + 1} prototype {self.index + 1}"


def fired_prototypes(models: list[LoadedModel], features: np.ndarray, coords: np.ndarray, step: int, size: int,
                     device: torch.device) -> list[FiredPrototype]:
    """Every learned prototype of protomil models on one slide (the slide's patches as the
    bag), the most activated first; empty for other heads."""
    if not all(isinstance(member, ProtoMIL) for model in models for member in model.module.members):
        return []
    fired = []
    x = torch.from_numpy(features).to(device)
    for m, model in enumerate(models):
        records = model.config.get("members") or []
        for j, member in enumerate(model.module.members):
            with torch.inference_mode():
                similarity, attention = (t.float().cpu().numpy() for t in member.similarities_and_attention(x))
            origins = records[j].get("prototypes", []) if j < len(records) else []
            for p, c in enumerate(member.prototype_class.tolist()):
                weighted = attention * similarity[:, p]
                box = mass_box(coords, step, size, weighted, ACTIVATION_MASS)
                share = float(weighted[in_box(coords, size, box)].sum() / max(weighted.sum(), 1e-30))
                fired.append(FiredPrototype(m, j, p, model.classes[c], origins[p] if p < len(origins) else {},
                                            similarity[:, p], float(weighted.sum()), box, share))
    return sorted(fired, key=lambda f: -f.activation)


def write_fired_csv(path: Path, data: SlideData, fired: list[FiredPrototype],
                    sources: list[tuple[SlideData, int] | None]) -> None:
    """learned_prototypes.csv: one row per learned prototype, the most activated first, with
    its `source_patches`."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["rank", "model", "member", "prototype", "class", "source_slide_id", "source_x", "source_y",
                         "activation", "max_similarity", "best_x", "best_y", "box_x0", "box_y0", "box_x1", "box_y1",
                         "box_activation_share"])
        for rank, (p, found) in enumerate(zip(fired, sources), start=1):
            best = int(np.argmax(p.similarity))
            xy = [int(v) for v in found[0].coords[found[1]]] if found else ["", ""]  # '': not in the store
            writer.writerow([rank, p.model + 1, p.member + 1, p.index + 1, p.class_name, p.origin.get("slide", ""),
                             *xy, f"{p.activation:.6g}", f"{p.similarity[best]:.6g}",
                             *(int(v) for v in data.coords[best]), *p.box, f"{p.box_share:.4f}"])


def source_patches(fired: list[FiredPrototype], source: FeatureSource) -> list[tuple[SlideData, int] | None]:
    """Per prototype the training slide (coordinates and attributes, each slide read once) and
    the patch it was projected onto; None where the store does not hold that slide."""
    slides = {sid: source.load(sid, with_features=False)
              for sid in {p.origin.get("slide") for p in fired} if sid is not None and sid in source}
    return [(slides[p.origin["slide"]], int(p.origin["patch"])) if p.origin.get("slide") in slides else None
            for p in fired]


def read_patch_of(data: SlideData, index: int) -> np.ndarray:
    """The pixels of patch `index` of a slide, read from the slide file its store names."""
    if "source_path" not in data.attrs:
        raise InputError(data.slide_id, "the store does not record the slide file the patches come from")
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
                ax.imshow(read_patch_of(slide, index))
            except InputError as exc:
                ax.text(0.5, 0.5, "unreadable", ha="center")
                warn(f"prototypes: {exc}")
            ax.set_title(title, fontsize=7)
            ax.set_axis_off()
    fig.suptitle("this looks like that: top patches and their closest highly attended training patches",
                 fontsize=8)
    fig.savefig(path, bbox_inches="tight", dpi=100)
