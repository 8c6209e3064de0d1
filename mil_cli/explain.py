"""Show where the model looked: patch-probability or attention heatmap, evidence maps, the
per-patch table, top/bottom patches, regions as QuPath-ready GeoJSON and boxes, from the stored
features; pixels are read for the patch montage, the zoomable viewer (viewer.py) and, with
--refine, the re-tiled areas (refine.py)."""

from __future__ import annotations

import csv
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image
import torch
from scipy import ndimage
from scipy.stats import rankdata
import shapely
from shapely.geometry import Point, Polygon
from shapely.geometry.base import BaseGeometry
from shapely.geometry.polygon import orient
from shapely.validation import make_valid
from skimage import measure

from mil_cli.config import VIEWER_BUDGET_MB
from mil_cli.console import warn
from mil_cli.devices import available_cores
from mil_cli.errors import InputError, MilcliError
from mil_cli.inference import LoadedModel, bag_features, bag_slides, check_compatible, predict_bag
from mil_cli.labels import LabelTable
from mil_cli.metrics import shown_class
from mil_cli.prototypes import (FiredPrototype, PrototypeBank, build_bank, fired_prototypes, read_patch_of,
                                source_patches, write_fired_csv, write_prototypes)
from mil_cli.raster import cell_means, in_box, mass_box, on_tissue
from mil_cli.refine import PatchScorer, RefinedArea, area_picture, refine
from mil_cli.render import PNG, map_image, montage
from mil_cli.reports import StageReport
from mil_cli.slides import Slide, open_slide, safe_file_stem
from mil_cli.stores import FeatureSource, SlideData, SlideImages
from mil_cli.viewer import Overlay, PatchTable, copy_assets, write_viewer

COLOUR_MAP = "inferno"          # perceptually uniform, dark = low, bright = high
REGION_COLOUR = [230, 60, 30]   # QuPath's colour for the regions
REGION_OUTLINE = "#00e5ff"      # their outline on the heatmap: cyan, apart from every inferno colour
UPSAMPLE = 8                    # regions are traced on a grid up to 8x finer than the patch grid
MAX_REGION_PIXELS = 4_000_000   # ... but no more pixels than this


EVIDENCE_COLOUR_MAP = "RdBu_r"  # diverging: red argues for the class, blue against
MIN_REGION_SHARE = 0.25         # regions smaller than this share of a patch are interpolation slivers: left out
EXPLAIN_THREADS = 4             # slides explained at once (at most the cores this process may use)
BOX_MASS = 0.95                 # boxes.csv: the box holding this share of the attention
LEARNED_SHOWN = 4               # protomil: the learned prototypes drawn per slide, those that fire most


@dataclass(frozen=True)
class ExplainOptions:
    top_k: int = 8            # patches shown in each row of the montage
    prototypes: bool = False  # also prototypes.png / .csv: similar patches of the training slides
    map: str = "instance"     # heatmap and regions: the patch classifier's probability, or attention
    probability: float = 0.5  # instance map: regions where a patch is judged this likely the class
    threshold: float = 0.2    # attention map: regions above this fraction of the slide's highest
    top_pct: float | None = None  # ... or, when set, above this top percentile of the patches
    alpha: float = 0.6        # heatmap opacity over tissue
    scale: str = "rank"       # heatmap values: percentile ranks, or raw attention weights
    smooth: float = 0.0       # Gaussian smoothing of the maps, sigma in patches (0: none)
    width: int | None = None  # heatmap / evidence PNG width in px (None: the thumbnail's, at least 512)
    viewer: bool = True       # viewer.html: the slide zoomable with the maps over it (viewer.py)
    viewer_mb: float = VIEWER_BUDGET_MB  # its tiles' size budget per slide
    refine: bool = False      # refined_<k>.png / refined.csv: the patch map at a quarter-patch step (refine.py)

    def __post_init__(self) -> None:
        if self.scale not in ("rank", "raw"):
            raise MilcliError(f"--scale {self.scale}: expected rank or raw")
        if self.map not in ("instance", "attention"):
            raise MilcliError(f"--map {self.map}: expected instance or attention")
        if not 0 < self.probability < 1:
            raise MilcliError("--probability must be between 0 and 1")
        if self.refine and self.map != "instance":
            raise MilcliError("--refine refines the patch-probability map: use it with --map instance")
        if self.viewer_mb <= 0:
            raise MilcliError("--viewer-mb must be positive")
        if self.smooth < 0 or (self.width is not None and self.width < 64):
            raise MilcliError("--smooth must be >= 0 and --width at least 64 px")
        if not 0 < self.threshold < 1 or (self.top_pct is not None and not 0 < self.top_pct <= 100):
            raise MilcliError("--threshold must be between 0 and 1, --top-pct between 0 and 100")


ATTENTION_MASS = 0.99  # --map attention --scale rank: ranks among the patches holding this share of the attention


def mass_ranks(attention: np.ndarray, mass: float = ATTENTION_MASS) -> np.ndarray:
    """Percentile ranks among the fewest patches that hold `mass` of the attention; 0 for the
    rest. Plain ranks paint a patch of attention 0.0000 orange when two patches hold it all."""
    order = np.argsort(-attention, kind="stable")
    cumulative = np.cumsum(attention[order]) / max(float(attention.sum()), 1e-30)
    carrying = order[:int(np.searchsorted(cumulative, mass)) + 1]
    ranks = np.zeros(len(attention))
    ranks[carrying] = rank_percent(attention[carrying])
    return ranks


def rank_percent(values: np.ndarray) -> np.ndarray:
    """Percentile rank in (0, 100]: raw attention is tiny everywhere, ranks spread it out."""
    return 100.0 * rankdata(values, method="average") / len(values)


def patch_step(data: SlideData) -> int:
    """Grid spacing of the patches in level-0 px."""
    for key in ("stride_level0", "patch_size_level0", "patch_size"):
        if key in data.attrs:
            return int(data.attrs[key])
    diffs = np.diff(np.unique(data.coords[:, 0]))
    return int(diffs[diffs > 0].min()) if (diffs > 0).any() else 256


def patch_size_level0(data: SlideData) -> int:
    return int(data.attrs.get("patch_size_level0", data.attrs.get("patch_size", patch_step(data))))


def paint(images: SlideImages, coords: np.ndarray, size: int, values: np.ndarray) -> np.ndarray:
    """Average the patch values onto the thumbnail grid (overlapping patches averaged); NaN
    where no patch or no tissue is."""
    h, w = images.tissue_mask.shape
    total, count = np.zeros((h, w)), np.zeros((h, w))
    ds = images.downsample
    for (x, y), value in zip(coords, values):
        c0, r0 = int(x / ds), int(y / ds)
        c1, r1 = max(c0 + 1, int(np.ceil((x + size) / ds))), max(r0 + 1, int(np.ceil((y + size) / ds)))
        total[r0:r1, c0:c1] += value
        count[r0:r1, c0:c1] += 1
    with np.errstate(invalid="ignore"):
        grid = total / count
    grid[~images.tissue_mask] = np.nan
    return grid


def smooth_map(grid: np.ndarray, sigma_px: float) -> np.ndarray:
    """Gaussian smoothing that ignores the NaN (no patch, no tissue) cells and keeps them NaN."""
    if sigma_px <= 0:
        return grid
    valid = np.isfinite(grid)
    with np.errstate(invalid="ignore"):
        smoothed = ndimage.gaussian_filter(np.where(valid, grid, 0.0), sigma_px) / ndimage.gaussian_filter(
            valid.astype(float), sigma_px)
    return np.where(valid, smoothed, np.nan)


def draw_map(path: Path, images: SlideImages, grid: np.ndarray, title: str, alpha: float, width: int | None,
             colour_map: str, limits: tuple[float, float], label: str, outlines: list | None = None,
             grey: bool = False) -> None:
    """`grid` painted over the thumbnail (in grey with `grey`; NaN cells transparent) with a
    colour bar, as a PNG whose image part is `width` px wide; `outlines` (polygons in level-0
    px) drawn on top."""
    base = images.thumbnail[..., :3]
    if grey:
        base = np.repeat(np.asarray(Image.fromarray(base).convert("L"))[..., None], 3, axis=2)
    map_image(base, grid, colour_map, limits, alpha, width, title, label, outlines,
              images.downsample, REGION_OUTLINE).save(path, **PNG)


def polygon_box(rings: list) -> list[int]:
    outer = np.array(rings[0])
    return [int(v) for v in (*outer.min(axis=0), *outer.max(axis=0))]


def write_boxes_csv(path: Path, polygons: list, coords: np.ndarray, step: int, size: int,
                    attention: np.ndarray) -> None:
    """The largest high-attention region's bounding box and the box holding 95 % of the
    attention, in level-0 px, with the attention mass inside each."""
    rows = []
    if polygons:
        rows.append(("largest_region", polygon_box(polygons[0])))
    rows.append((f"attention_{round(BOX_MASS * 100)}pct", mass_box(coords, step, size, attention, BOX_MASS)))
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["box", "x0", "y0", "x1", "y1", "attention_mass"])
        for name, box in rows:
            writer.writerow([name, *box, f"{attention[in_box(coords, size, box)].sum():.4f}"])


def slide_file(data: SlideData) -> Path:
    if "source_path" not in data.attrs:  # a store written by another tool, or synthetic features
        raise InputError(data.slide_id, "the store does not record the slide file the patches come from")
    return Path(str(data.attrs["source_path"]))


def draw_top_patches(path: Path, slide: Slide, data: SlideData, attention: np.ndarray, ranks: np.ndarray,
                     k: int) -> None:
    """Montage: the k highest-attention patches on top, the k lowest below, scores under each."""
    k = min(k, len(attention))
    order = np.argsort(-attention)
    rows = [("highest", order[:k]), ("lowest", order[::-1][:k])]
    size = patch_size_level0(data)
    out_size = int(data.attrs.get("patch_size", 224))
    cells = [[(slide.read_patch((int(data.coords[i][0]), int(data.coords[i][1])), size, out_size),
               f"{name} #{col + 1}\na={attention[i]:.3g} ({ranks[i]:.0f}%)") for col, i in enumerate(indices)]
             for name, indices in rows]
    montage(cells, f"{data.slide_id}: top and bottom attention patches (a: attention weight, its percentile "
                   f"rank)").save(path, **PNG)


@dataclass(frozen=True)
class RegionGrid:
    """High-attention regions on a fine level-0 grid: `labels` numbers the connected regions
    from the largest (1) down (0 outside); pixel (row, col) covers level-0 x in
    origin_x + [col, col + 1) * pixel."""
    labels: np.ndarray
    origin: np.ndarray
    pixel: float

    def pixel_of(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        cells = np.floor((points - self.origin) / self.pixel).astype(int)
        return (np.clip(cells[:, 1], 0, self.labels.shape[0] - 1), np.clip(cells[:, 0], 0, self.labels.shape[1] - 1))


def percentile_level(values: np.ndarray, top_pct: float) -> float:
    """Midway between the last value inside the top `top_pct` percent and the next one."""
    ordered = np.sort(values)[::-1]
    k = min(len(ordered), max(1, int(round(len(ordered) * top_pct / 100))))
    return float(ordered[k - 1] + (ordered[k] if k < len(ordered) else 0.0)) / 2


def region_grid(coords: np.ndarray, step: int, size: int, values: np.ndarray, threshold: float,
                top_pct: float | None = None, level: float | None = None,
                tissue: SlideImages | None = None) -> RegionGrid:
    """Regions where the patch values, averaged where patches overlap and interpolated
    bilinearly between cell centres as CAM upsamples its map, exceed `threshold` times their
    highest (or, with `top_pct`, the level of that top percentile of the patches; or the
    absolute `level`), within the area the patches cover. Interpolating puts a region's edge
    between patches where the evidence changes, not on the patch grid, so its boxes are not
    quantised to whole patches.
    Cells without a patch take their nearest cell's value. Given the slide's tissue mask,
    regions stay on tissue (a patch that is one quarter tissue must not carry a region out
    onto the glass)."""
    grid, origin = cell_means(coords, step, size, values)
    covered = np.isfinite(grid)
    if level is None:
        level = threshold * float(np.nanmax(grid)) if top_pct is None else percentile_level(values, top_pct)
    nearest = ndimage.distance_transform_edt(~covered, return_distances=False, return_indices=True)
    grid = grid[tuple(nearest)]
    upsample = int(np.clip(np.sqrt(MAX_REGION_PIXELS / grid.size), 1, UPSAMPLE))
    rows = (np.arange(grid.shape[0] * upsample) + 0.5) / upsample - 0.5  # cell c's centre sits at c
    cols = (np.arange(grid.shape[1] * upsample) + 0.5) / upsample - 0.5
    fine = ndimage.map_coordinates(grid, np.meshgrid(rows, cols, indexing="ij"), order=1, mode="nearest")
    inside = np.kron(covered, np.ones((upsample, upsample), dtype=bool))
    if tissue is not None:
        inside &= on_tissue(tissue, origin, step / upsample, inside.shape)
    labels = measure.label((fine > level) & inside, connectivity=1)
    by_size = np.zeros(labels.max() + 1, dtype=labels.dtype)  # renumbered: 1 = the largest region
    by_size[np.argsort(-np.bincount(labels.ravel())[1:], kind="stable") + 1] = np.arange(1, labels.max() + 1)
    return RegionGrid(by_size[labels], origin, step / upsample)


SIMPLIFY_PX = 0.75     # map pixels: how far a simplified outline may stray from the traced one
COORDINATE_GRID = 0.1  # level-0 px: the precision of exported coordinates


def region_polygons(regions: RegionGrid) -> list[list[list[list[float]]]]:
    """One polygon (outer ring, then holes) in level-0 px per region, largest region first:
    traced between pixel centres, made valid, simplified without changing its topology and
    snapped to a 0.1 px grid by shapely, so every ring has at least 4 positions and none
    crosses itself (RFC 7946, QuPath). Outer rings wind counter-clockwise in x-right,
    y-up axes, holes the other way. Should repair split a region, its largest part is kept."""
    polygons = []
    for component, (rows, cols) in enumerate(ndimage.find_objects(regions.labels), start=1):
        crop = np.pad(regions.labels[rows, cols] == component, 1).astype(float)
        offset = np.array([cols.start, rows.start]) - 0.5  # padded crop index -> pixel centre
        rings = sorted((regions.origin + (contour[:, ::-1] + offset) * regions.pixel
                        for contour in measure.find_contours(crop, 0.5)), key=lambda r: -Polygon(r).area)
        shell = Polygon(rings[0])
        holes = [ring for ring in rings[1:] if shell.contains(Point(ring[0]))]
        polygon = _largest_part(make_valid(Polygon(rings[0], holes)))
        polygon = _largest_part(polygon.simplify(SIMPLIFY_PX * regions.pixel, preserve_topology=True))
        polygon = orient(_largest_part(shapely.set_precision(polygon, COORDINATE_GRID)), sign=1.0)
        polygons.append([[list(xy) for xy in ring.coords] for ring in (polygon.exterior, *polygon.interiors)])
    return polygons


def _largest_part(geometry: BaseGeometry) -> Polygon:
    parts = [g for g in getattr(geometry, "geoms", [geometry]) if isinstance(g, Polygon) and not g.is_empty]
    return max(parts, key=lambda g: g.area)


def region_scores(regions: RegionGrid, coords: np.ndarray, size: int, attention: np.ndarray) -> list[float]:
    """Attention mass of the patches whose centres fall in each region, largest region first."""
    at_centres = regions.labels[regions.pixel_of(coords + size / 2)]
    return np.bincount(at_centres, weights=attention, minlength=regions.labels.max() + 1)[1:].tolist()


def regions_geojson(polygons: list, scores: list[float], slide_id: str, classification: str) -> dict:
    """A FeatureCollection QuPath imports as annotations of `classification`."""
    features = []
    for i, (rings, score) in enumerate(zip(polygons, scores), start=1):
        features.append({
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": rings},
            "properties": {"objectType": "annotation", "name": f"{slide_id} region {i}",
                           "classification": {"name": classification, "color": REGION_COLOUR},
                           "score": score, "isLocked": False},
        })
    return {"type": "FeatureCollection", "features": features}


def write_attention_csv(path: Path, data: SlideData, size: int, attention: np.ndarray, ranks: np.ndarray,
                        patch_scores: np.ndarray, instance_scores: np.ndarray, classes: list[str],
                        additive: bool) -> None:
    """One row per patch. `contribution_<class>` columns (additive heads) sum to the class logit
    minus its bias; `score_<class>` columns (max, noisy-and) are the pooled per-patch scores;
    `instance_<class>` columns are the patch's own class probabilities (the patch score that
    localises best in benchmarks/panel.py)."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        prefix = "contribution" if additive else "score"
        writer.writerow(["x", "y", "size", "attention", "rank_pct"] + [f"{prefix}_{c}" for c in classes]
                        + [f"instance_{c}" for c in classes])
        for i, (x, y) in enumerate(data.coords):
            writer.writerow([int(x), int(y), size, f"{attention[i]:.6g}", f"{ranks[i]:.2f}"]
                            + [f"{v:.6g}" for v in patch_scores[i]] + [f"{v:.6g}" for v in instance_scores[i]])


@dataclass
class BagEvidence:
    """What the models say about one bag (a slide, or a patient's slides one after the other),
    per patch: attention, contributions (N, outputs) and instance scores (N, outputs)."""
    bag_id: str
    predictions: np.ndarray
    attention: np.ndarray
    contributions: np.ndarray
    instance: np.ndarray
    parts: list[tuple[str, int]]  # (slide id, patches) in the bag's order

    def slide(self, slide_id: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The slide's rows of attention, contributions and instance scores."""
        start = 0
        for sid, count in self.parts:
            if sid == slide_id:
                rows = slice(start, start + count)
                return self.attention[rows], self.contributions[rows], self.instance[rows]
            start += count
        raise KeyError(slide_id)


def bag_evidence(models: list[LoadedModel], bag_id: str, features: np.ndarray, parts: list[tuple[str, int]],
                 device: torch.device) -> BagEvidence:
    """The models' predictions and per-patch evidence, averaged over an ensemble's models."""
    predictions, attention = predict_bag(models, features, device)
    task = models[0].task
    with torch.inference_mode():
        x = torch.from_numpy(features).to(device)
        contributions = np.mean([m.module.patch_scores(x).cpu().numpy() for m in models], axis=0)
        instance = np.mean([m.module.instance_scores(x).cpu().numpy() for m in models], axis=0)
    if contributions.shape[1] != len(models[0].classes):  # discrete-time hazards: their logits' parts summed
        contributions = contributions.sum(1, keepdims=True)
    return BagEvidence(bag_id, predictions, attention, contributions * task.contribution_scale,
                       task.patch_values(instance), parts)


def explain_slide(models: list[LoadedModel], source: FeatureSource, slide_id: str, out: Path,
                  options: ExplainOptions, device: torch.device, bank: PrototypeBank | None = None,
                  evidence: BagEvidence | None = None, evidence_scale: EvidenceScale | None = None,
                  scorer: PatchScorer | None = None) -> Path:
    """Write every explanation file for one slide into out/<safe slide id>/ and return it.
    `evidence` is its patient's bag, for patient-level models (default: the slide alone);
    `evidence_scale` the evidence maps' colour limit shared with other slides (default: this
    slide's own); `scorer` embeds and scores new patches for --refine."""
    data = source.load(slide_id)
    assert data.features is not None
    if len(data.features) == 0:
        raise InputError(slide_id, "slide has no patches to explain")
    folder = out / safe_file_stem(slide_id)
    folder.mkdir(parents=True, exist_ok=True)
    if evidence is None:
        evidence = bag_evidence(models, slide_id, data.features, [(slide_id, len(data.features))], device)
    attention, contributions, instance = evidence.slide(slide_id)
    ranks = rank_percent(attention)
    classes, task = models[0].classes, models[0].task
    size = patch_size_level0(data)
    write_attention_csv(folder / "attention.csv", data, size, attention, ranks, contributions, instance, classes,
                        models[0].module.additive)

    of_patient = f" (patient {evidence.bag_id})" if evidence.bag_id != slide_id else ""
    title = (f"{slide_id}{of_patient} | model {models[0].config['model']['architecture']}"
             f"{f' x{len(models)}' if len(models) > 1 else ''} | {task.describe(evidence.predictions)}")
    step = patch_step(data)
    shown = shown_map(options, attention, ranks, instance, contributions, evidence.predictions, classes,
                      task.name == "classification")
    images = source.images(slide_id)
    regions = region_grid(data.coords, step, size, shown.values, options.threshold, options.top_pct, shown.level,
                          images)
    polygons = region_polygons(regions)
    scores = region_scores(regions, data.coords, size, attention)
    # a region no patch's attention falls in, or an interpolation sliver, says nothing
    kept = [i for i, (rings, score) in enumerate(zip(polygons, scores))
            if score > 0 and Polygon(rings[0], rings[1:]).area >= MIN_REGION_SHARE * size ** 2]
    polygons, scores = [polygons[i] for i in kept], [scores[i] for i in kept]
    (folder / "regions.geojson").write_text(json.dumps(regions_geojson(polygons, scores, slide_id,
                                                                       shown.region_class)))
    write_boxes_csv(folder / "boxes.csv", polygons, data.coords, step, size, attention)

    overlays = None
    fired = fired_prototypes(models, data.features, data.coords, step, size, device)  # protomil only
    sources = source_patches(fired, source)
    if fired:
        write_fired_csv(folder / "learned_prototypes.csv", data, fired, sources)
    if images is not None:
        overlays = draw_slide_maps(folder, images, data, size, step, shown, contributions, classes,
                                   models[0].module.additive, title, options, polygons, evidence_scale)
        overlays += draw_fired_maps(folder, images, data, size, fired[:LEARNED_SHOWN], options)
    else:
        warn(f"{slide_id}: the store has no thumbnail; heatmap.png, evidence maps and viewer.html not drawn")
    viewer = overlays is not None and options.viewer
    try:  # what reads pixels: the slide file the tile store names
        with open_slide(slide_file(data)) as slide:
            draw_top_patches(folder / "top_patches.png", slide, data, attention, ranks, options.top_k)
            if viewer and images is not None and overlays is not None:
                prefix = "contribution" if models[0].module.additive else "score"
                columns = {f"{prefix} to '{c}'": contributions[:, i] for i, c in enumerate(classes)}
                columns |= {f"P({c}) of the patch": instance[:, i] for i, c in enumerate(classes)}
                tiling_scale = float(data.attrs.get("patch_size", 224)) / size
                write_viewer(folder, slide, tiling_scale, images, overlays, polygons,
                             PatchTable(data.coords, size, attention, ranks, columns), title, options.viewer_mb)
            if scorer is not None and images is not None:
                c = shown_class(classes, int(np.argmax(evidence.predictions)))
                try:
                    areas = refine(slide, scorer, lambda features: patch_probability(models, features, c, device),
                                   polygons, data.coords, size, int(data.attrs.get("patch_size", 224)),
                                   shown.values, images)
                    write_refined(folder, slide, areas, images, polygons, f"{title} | refined", shown.label, options)
                except InputError as exc:
                    warn(f"{slide_id}: refined maps not drawn ({exc})")
    except InputError as exc:
        warn(f"{slide_id}: top_patches.png{' and viewer.html' if viewer else ''}"
             f"{' and the refined maps' if scorer else ''} not drawn ({exc})")
    if bank is not None:
        write_prototypes(folder, data, attention, bank)
    if fired:
        draw_fired_patches(folder / "learned_prototypes.png", data, fired[:LEARNED_SHOWN], sources)
    return folder


def draw_fired_maps(folder: Path, images: SlideImages, data: SlideData, size: int, fired: list[FiredPrototype],
                    options: ExplainOptions) -> list[Overlay]:
    """learned_prototype_<k>.png: where the k-th most activated prototype fires on the slide
    (each patch's similarity to it) and the box holding most of its activation; the same
    maps as viewer overlays."""
    overlays = []
    for k, p in enumerate(fired, start=1):
        grid = paint(images, data.coords, size, p.similarity)
        limits = (float(np.nanmin(grid)), max(float(np.nanmax(grid)), float(np.nanmin(grid)) + 1e-6))
        x0, y0, x1, y1 = p.box
        box = [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]
        label = (f"similarity log((d+1)/(d+1e-4)); box: {p.box_share:.0%} of its activation "
                 f"(attention x similarity)")
        draw_map(folder / f"learned_prototype_{k}.png", images, grid,
                 f"{data.slide_id} | learned prototype #{k} of '{p.class_name}' ({p.name}), activation "
                 f"{p.activation:.3g}", options.alpha, options.width, COLOUR_MAP, limits, label, [box], grey=True)
        overlays.append(Overlay(f"learned_prototype_{k}", f"learned prototype #{k} of '{p.class_name}': similarity",
                                grid, COLOUR_MAP, limits, False))
    return overlays


def draw_fired_patches(path: Path, data: SlideData, fired: list[FiredPrototype],
                       sources: list[tuple[SlideData, int] | None]) -> None:
    """learned_prototypes.png: per prototype (most activated first) the training patch it is
    and the patch of this slide most like it."""
    blank = np.full((8, 8, 3), 235, np.uint8)

    def pixels(slide: SlideData, index: int) -> np.ndarray:
        try:
            return read_patch_of(slide, index)
        except InputError as exc:
            warn(f"{data.slide_id}: learned_prototypes.png: {exc}")
            return blank

    rows = []
    for k, (p, found) in enumerate(zip(fired, sources), start=1):
        origin = (pixels(*found), f"#{k} '{p.class_name}': is a patch\nof {p.origin.get('slide')}") if found else \
            (blank, f"#{k} '{p.class_name}': its slide\n({p.origin.get('slide', '?')}) is not in the store")
        best = int(np.argmax(p.similarity))
        rows.append([origin, (pixels(data, best), f"most like it here\nsimilarity {p.similarity[best]:.3g}")])
    montage(rows, f"{data.slide_id}: prototypes firing most").save(path, **PNG)


def patch_probability(models: list[LoadedModel], features: np.ndarray, c: int, device: torch.device) -> np.ndarray:
    """(n,) the models' mean probability of class `c` for each patch judged alone."""
    with torch.inference_mode():
        x = torch.from_numpy(features).to(device)
        return np.mean([m.module.instance_scores(x)[:, c].cpu().numpy() for m in models], axis=0)


def write_refined(folder: Path, slide: Slide, areas: list[RefinedArea], images: SlideImages, regions: list,
                  title: str, label: str, options: ExplainOptions) -> None:
    """refined.csv (every refined patch) and refined_<k>.png (area k: the slide's pixels with
    the refined map over them and the regions outlined)."""
    with open(folder / "refined.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["area", "x", "y", "size", "stride", "probability"])
        for k, area in enumerate(areas, start=1):
            for (x, y), value in zip(area.coords, area.values):
                writer.writerow([k, int(x), int(y), area.size, area.stride, f"{value:.6g}"])
    for k, area in enumerate(areas, start=1):
        base, painted, pixel = area_picture(slide, area, images)
        shifted = [[(np.asarray(ring) - area.origin).tolist() for ring in rings] for rings in regions]
        map_image(base, painted, COLOUR_MAP, (0.0, 1.0), options.alpha, None,
                  f"{title}: area {k}, patches every {area.stride} px ({area.size}-px patches)", label, shifted,
                  pixel, REGION_OUTLINE).save(folder / f"refined_{k}.png", **PNG)


class EvidenceScale(NamedTuple):
    """The evidence maps' colour limit (±bound) and where it comes from, for their legend."""
    bound: float
    source: str


EVIDENCE_PERCENTILE = 99.5  # the shared evidence scale: this percentile of |contribution| over the slides


def shared_evidence_scale(evidences: list[BagEvidence]) -> EvidenceScale | None:
    """One colour limit for every evidence map explained together, so that a colour means the
    same contribution on every slide: a high percentile of the contributions' magnitude (the
    few patches beyond it saturate)."""
    values = [np.abs(e.contributions).ravel() for e in evidences if e.contributions.size]
    if not values:
        return None
    bound = float(np.percentile(np.concatenate(values), EVIDENCE_PERCENTILE)) or 1.0
    return EvidenceScale(bound, f"{EVIDENCE_PERCENTILE:g}th percentile over the {len(values)} bags explained together")


def slide_evidence(models: list[LoadedModel], source: FeatureSource, slide_id: str,
                   device: torch.device) -> BagEvidence | None:
    """The slide alone as a bag; None when it cannot be read or has no patches (explain_slide
    then reports why)."""
    try:
        features = source.load(slide_id).features
    except InputError:
        return None
    if features is None or len(features) == 0:
        return None
    return bag_evidence(models, slide_id, features, [(slide_id, len(features))], device)


@dataclass(frozen=True)
class ShownMap:
    """The per-patch values heatmap.png paints and the regions are traced on."""
    values: np.ndarray
    limits: tuple[float, float] | None  # colour scale; None: 0 to the map's highest
    label: str
    level: float | None                 # absolute region level; None: ExplainOptions' relative rule
    region_class: str                   # the regions' classification in QuPath


def shown_map(options: ExplainOptions, attention: np.ndarray, ranks: np.ndarray, instance: np.ndarray,
              contributions: np.ndarray, probs: np.ndarray, classes: list[str], classifier: bool) -> ShownMap:
    """--map instance: a classifier's patch probability of the shown class; for a value or a
    risk, each patch's contribution to it (regions where it is high: CAM's relative rule).
    --map attention: attention, ranked or raw."""
    if options.map == "instance" and not classifier:
        values = contributions[:, 0]
        level = None if options.top_pct else options.threshold * max(float(values.max()), 0.0)
        return ShownMap(values, None, f"contribution to the {classes[0]}", level, f"High {classes[0]}")
    if options.map == "instance":
        c = shown_class(classes, int(np.argmax(probs)))
        return ShownMap(instance[:, c], (0.0, 1.0), f"P({classes[c]}) of each patch", options.probability,
                        classes[c])
    if options.scale == "rank":
        return ShownMap(mass_ranks(attention), (0.0, 100.0),
                        f"attention: percentile rank among the patches holding {ATTENTION_MASS:.0%} of it (others 0)",
                        None, "High attention")
    return ShownMap(attention, None, "attention weight", None, "High attention")


def draw_slide_maps(folder: Path, images: SlideImages, data: SlideData, size: int, step: int, shown: ShownMap,
                    patch_scores: np.ndarray, classes: list[str], additive: bool, title: str,
                    options: ExplainOptions, regions: list, scale: EvidenceScale | None = None) -> list[Overlay]:
    """heatmap.png (with the regions outlined) and heatmap.npy (the float map drawn, NaN off
    tissue), then one evidence_<class>.png per class: signed per-patch evidence on a diverging
    colour map over the thumbnail in grey (pink H&E would read as weak evidence for), on
    `scale` (default: this slide's largest magnitude). Returns the maps drawn, for the viewer."""
    sigma = options.smooth * step / images.downsample
    grid = smooth_map(paint(images, data.coords, size, shown.values), sigma)
    np.save(folder / "heatmap.npy", grid.astype(np.float32))
    limits = shown.limits or (0.0, max(float(np.nanmax(grid)), 1e-12))
    draw_map(folder / "heatmap.png", images, grid, title, options.alpha, options.width, COLOUR_MAP, limits,
             shown.label, regions)
    overlays = [Overlay("heatmap", f"heatmap: {shown.label}", grid, COLOUR_MAP, limits, True)]
    kind = "contribution to the logit" if additive else "patch score"
    for c, name in enumerate(classes):
        evidence = smooth_map(paint(images, data.coords, size, patch_scores[:, c]), sigma)
        own = EvidenceScale(float(np.nanmax(np.abs(evidence))) or 1.0, "this slide's largest")
        bound, source = scale or own
        stem = safe_file_stem(name)
        label = f"{kind}; colour scale ±{bound:.3g}: {source}"
        draw_map(folder / f"evidence_{stem}.png", images, evidence,
                 f"{data.slide_id} | evidence for '{name}' (red for, blue against)", options.alpha, options.width,
                 EVIDENCE_COLOUR_MAP, (-bound, bound), label, grey=True)
        overlays.append(Overlay(f"evidence_{stem}", f"evidence for '{name}' ({kind}; red for, blue against)",
                                evidence, EVIDENCE_COLOUR_MAP, (-bound, bound), False))
    return overlays


def explain_slides(models: list[LoadedModel], source: FeatureSource, slide_ids: list[str], out: Path,
                   options: ExplainOptions, device: torch.device, labels: LabelTable | None = None) -> StageReport:
    """Explain each slide into out/<slide id>/. For a model trained on patient bags, each
    slide's maps come from its patient's whole bag (its slides in the store, as `labels`
    groups them), computed once per patient."""
    start = time.perf_counter()
    check_compatible(models, source)
    report = StageReport()
    bank = build_bank(models, source, device) if options.prototypes else None
    if options.prototypes and bank is None:
        warn("no training slide of the model is in the store (or the model file predates prototypes); "
             "prototypes not drawn")
    present = [sid for sid in slide_ids if sid in source]
    report.failed |= {sid: f"not in {source.path}" for sid in slide_ids if sid not in source}
    if options.viewer:
        copy_assets(out)
    if options.refine and models[0].task.name != "classification":
        raise MilcliError("--refine refines the patch-probability map of classification models")
    scorer = PatchScorer(source, device) if options.refine else None
    wanted, jobs = set(present), []
    # slides in parallel: encoding images and decoding slide tiles release the GIL
    with ThreadPoolExecutor(max_workers=min(EXPLAIN_THREADS, available_cores())) as pool:
        if models[0].bag_by == "patient":
            for bag_id, ids in bag_slides(models, source.slide_ids, labels).items():
                chosen = [sid for sid in ids if sid in wanted]
                if chosen:
                    features, parts = bag_features(source, ids)
                    evidence = bag_evidence(models, bag_id, features, parts, device) if parts else None
                    jobs += [(slide_id, evidence) for slide_id in chosen]
        else:
            bags = bag_slides(models, source.slide_ids, labels).values()
            chosen = [sid for ids in bags for sid in ids if sid in wanted]
            jobs = list(zip(chosen, pool.map(lambda sid: slide_evidence(models, source, sid, device), chosen)))
        scale = shared_evidence_scale(list({id(e): e for _, e in jobs if e is not None}.values()))
        futures = [pool.submit(explain_slide, models, source, slide_id, out, options, device, bank, evidence, scale,
                               scorer) for slide_id, evidence in jobs]
        for (slide_id, _), future in zip(jobs, futures):
            try:
                future.result()
                report.done.append(slide_id)
            except InputError as exc:
                report.failed[slide_id] = str(exc)
    report.seconds = time.perf_counter() - start
    return report
