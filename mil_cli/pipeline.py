"""`milcli run`: every stage into one output folder, resuming each, with run.json recording
the options and timings of every stage."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from mil_cli import __version__
from mil_cli.backbones import Backbone, get_backbone
from mil_cli.embedding import EmbedOptions, embed_store
from mil_cli.explain import ExplainOptions, explain_slides
from mil_cli.inference import bag_slides, load_models, predict_slides, write_predictions
from mil_cli.crossval import cross_validate
from mil_cli.errors import InputError
from mil_cli.labels import check_cohort, check_patients, read_labels
from mil_cli.reports import StageReport
from mil_cli.slides import find_slides, no_slides_found, slide_id_from_path
from mil_cli.stores import FeatureSource
from mil_cli.tasks import make_task
from mil_cli.tiling import TilingOptions, default_tiling_workers, tile_slides
from mil_cli.config import AUTO_ARCHITECTURE, DEFAULT_BACKBONE, TrainOptions
from mil_cli.console import warn
from mil_cli.training import save_checkpoint, train


@dataclass
class RunOptions:
    tiling: TilingOptions = field(default_factory=TilingOptions)
    training: TrainOptions = field(default_factory=TrainOptions)
    explain: ExplainOptions = field(default_factory=ExplainOptions)
    backbone: str = DEFAULT_BACKBONE
    embedding: EmbedOptions = field(default_factory=EmbedOptions)  # its workers read slides for tile too
    explain_all: bool = True
    previews: bool = False
    folds: int | None = None      # also cross-validate into cv/ (the final model still trains on all)
    repeats: int = 3
    overwrite: bool = False


def check_run(inputs: list[Path], labels_path: Path, options: RunOptions, backbone: Backbone) -> None:
    """Everything that can be checked before hours of tiling and embedding: the slides exist,
    the labels file reads for the task and names enough of them to train (classes, events, a
    spread of values), and the backbone's weights are at hand (and its scale, warned about)."""
    paths = find_slides(inputs)
    if not paths:
        raise InputError(", ".join(map(str, inputs)), no_slides_found())
    task = make_task(options.training.task, options.training.survival_loss)
    labels, ids = read_labels(labels_path, task), {slide_id_from_path(p) for p in paths}
    if options.training.bag_by == "patient":
        check_patients(labels, labels_path)
    check_cohort(labels, labels_path, task, ids, "the slides given")  # the model: split val and test held out
    if options.folds:  # cross-validation folds the val slides back in, and needs `folds` of each class
        check_cohort(labels, labels_path, task, ids, "the slides given", frozenset({"test"}), options.folds)
    backbone.check(options.embedding.weights)
    if advice := backbone.target_mpp_advice(options.tiling.target_mpp):
        warn(advice)


IN_SAMPLE_TITLE = "the final model on the labelled slides (mostly its own training slides: optimistic; --folds is honest)"


def _model_matches(path: Path, options: TrainOptions) -> bool:
    """True when `path` holds a model trained with these options (so a rerun may keep it)."""
    if not path.exists():
        return False
    try:
        config = torch.load(path, map_location="cpu", weights_only=True)["config"]
    except Exception:  # unreadable or foreign: retrain and replace it
        return False
    wanted = asdict(options)
    head = {k: v for k, v in wanted.pop("model").items() if k not in ("in_dim", "n_classes")}
    if head["architecture"] == AUTO_ARCHITECTURE:  # the file names the head chosen; auto's record is its choice
        if "architecture_choice" not in config.get("metrics", {}):
            return False
        head.pop("architecture")
    return config.get("training") == wanted and all(config["model"].get(k) == v for k, v in head.items())


def _cv_matches(path: Path, options: RunOptions) -> bool:
    """True when `path` holds the cross-validation these options ask for."""
    if not path.exists():
        return False
    summary = json.loads(path.read_text())
    return (summary.get("folds"), summary.get("repeats")) == (options.folds, options.repeats)


def run_pipeline(inputs: list[Path], labels_path: Path, out: Path, options: RunOptions,
                 device: torch.device) -> dict[str, StageReport]:
    """Tile, embed, train, predict and explain into `out`; returns each stage's report.
    Nothing is written when check_run finds a problem."""
    backbone = get_backbone(options.backbone)
    check_run(inputs, labels_path, options, backbone)
    out.mkdir(parents=True, exist_ok=True)
    tiles, feats, model_path = out / "tiles.h5", out / "feats.h5", out / "model.pt"
    reports: dict[str, StageReport] = {}
    workers = options.embedding.workers
    reports["tile"] = tile_slides(inputs, tiles, options.tiling, overwrite=options.overwrite,
                                  workers=default_tiling_workers() if workers is None else workers,
                                  previews=out / "previews" if options.previews else None)
    reports["embed"] = embed_store(tiles, feats, backbone, device, options.embedding,
                                   overwrite=options.overwrite)

    stale = options.overwrite or reports["embed"].done or not _model_matches(model_path, options.training)
    reports["train"] = StageReport()
    if stale:
        result = train(feats, labels_path, options.training, device)
        save_checkpoint(result.checkpoint, model_path)
        reports["train"] = StageReport(done=["model.pt"], failed={s: f"not in {feats}" for s in result.missing},
                                       seconds=result.seconds)
    else:
        reports["train"].skipped.append("model.pt")
    if options.folds and (stale or not _cv_matches(out / "cv" / "metrics.json", options)):
        result = cross_validate(feats, labels_path, options.training, device, out / "cv", options.folds,
                                options.repeats)
        reports["cross_validation"] = StageReport(done=["cv"], seconds=result.seconds)

    start = time.perf_counter()
    models = load_models(model_path, device)
    source, task = FeatureSource(feats), models[0].task
    labels = read_labels(labels_path, task)
    predictions = predict_slides(models, source, bag_slides(models, source.slide_ids, labels), device)
    with open(out / "predictions.csv", "w", newline="") as stream:
        write_predictions(predictions, models, labels, stream)
    rows = [labels.rows.get(p.slide_ids[0]) for p in predictions]
    known = [(p, row) for p, row in zip(predictions, rows) if row is not None and row.target is not None]
    if len(known) >= 2:
        task.plot(out / task.plot_name, [task.target(row) for _, row in known],
                  np.array([p.predictions for p, _ in known]), IN_SAMPLE_TITLE)
    reports["predict"] = StageReport(done=[p.bag_id for p in predictions], seconds=time.perf_counter() - start)

    if options.explain_all:
        reports["explain"] = explain_slides(models, source, source.slide_ids, out / "explain", options.explain, device,
                                            labels)

    record = {
        "milcli_version": __version__,
        "inputs": [str(p) for p in inputs],
        "labels": str(labels_path),
        "device": str(device),
        "task": task.name,
        "options": json.loads(json.dumps(asdict(options), default=str)),
        "stages": {name: report.to_dict() for name, report in reports.items()},
        "metrics": models[0].config["metrics"],
    }
    if options.folds:
        record["cross_validation"] = json.loads((out / "cv" / "metrics.json").read_text())["over_repeats"]
    (out / "run.json").write_text(json.dumps(record, indent=2, default=str))
    return reports
