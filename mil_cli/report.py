"""`milcli report RUN_DIR`: one static HTML page over a `milcli run` folder, viewable offline.

The page links the run's own images by relative path (they sit beside it), so it stays small
and opens from a copied folder: metrics, the task's figure (ROC, predicted-vs-true scatter,
Kaplan-Meier curves) for the final model and for cross-validation when it ran, the
predictions table, and per slide its prediction, heatmap, evidence maps, top patches and its
zoomable viewer (explain's viewer.html, in a frame).
"""

from __future__ import annotations

import csv
import json
from html import escape
from pathlib import Path
from urllib.parse import quote

from mil_cli import __version__
from mil_cli.errors import InputError
from mil_cli.metrics import TASK_KEYS, TASK_PLOTS, epochs_note, shown_class
from mil_cli.slides import safe_file_stem

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
tr.wrong td { background: #fde8e8; }
section { border-top: 2px solid #ddd; margin-top: 2em; padding-top: 1em; }
.maps { display: flex; flex-wrap: wrap; gap: 1em; align-items: flex-start; }
.maps figure { margin: 0; max-width: 48%; }
.maps img, img.wide { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: 0.8em; color: #555; }
iframe.viewer { width: 100%; height: 560px; border: 1px solid #ccc; }
"""


def _table(header: list[str], rows: list[list[str]], row_classes: list[str] | None = None) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join(f'<tr class="{cls}">' + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>"
                   for row, cls in zip(rows, row_classes or [""] * len(rows)))
    return f"<table><tr>{head}</tr>{body}</table>"


def _image(path: Path, root: Path, caption: str) -> str:
    if not path.exists():
        return ""
    src = quote(path.relative_to(root).as_posix())
    return (f'<figure><img src="{src}" alt="{escape(caption)}" loading="lazy">'
            f"<figcaption>{escape(caption)}</figcaption></figure>")


PLOT_CAPTIONS = {"classification": "ROC with bootstrap 95 % band",
                 "regression": "predicted against true values",
                 "survival": "Kaplan-Meier curves of the risk groups (median split, tertiles) with log-rank p"}


def _metrics_section(record: dict, run_dir: Path) -> str:
    metrics, task = record.get("metrics", {}), record.get("task", "classification")
    keys = TASK_KEYS[task]
    rows = [[split, str(m["n"]), *(f"{m.get(k, float('nan')):.3f}" for k in keys)]
            for split, m in metrics.items() if isinstance(m, dict) and "n" in m]
    note = epochs_note(metrics)
    return ("<h2>Metrics</h2>" + _table(["split", "n", *keys], rows) + f"<p>{escape(note)}</p>"
            + _image(run_dir / TASK_PLOTS[task], run_dir,
                     f"final model, labelled slides (mostly its training slides, so optimistic): {PLOT_CAPTIONS[task]}"))


def _cv_section(run_dir: Path, task: str) -> str:
    cv = run_dir / "cv"
    if not (cv / "metrics.json").exists():
        return ""
    summary = json.loads((cv / "metrics.json").read_text())
    rows = [[key, f"{v['mean']:.3f} ± {v['std']:.3f}"] for key, v in summary["mean_std"].items()]
    return ("<h2>Cross-validation</h2>" + _table(["metric", "mean ± sd over folds"], rows)
            + _image(cv / TASK_PLOTS[task], run_dir, f"out-of-fold: {PLOT_CAPTIONS[task]}"))


def _slide_section(run_dir: Path, slide_id: str, heading: str, shown_name: str | None) -> str:
    """A slide's maps, montage and files from explain/, or nothing when it was not explained.
    Beside the heatmap, the evidence map of `shown_name` (the heatmap's class: a binary
    model's positive class, else the predicted one; the others are linked), so the maps fill
    one row at a legible size."""
    folder = run_dir / "explain" / safe_file_stem(slide_id)
    if not folder.is_dir():
        return ""
    evidence = sorted(folder.glob("evidence_*.png"))
    shown = [e for e in evidence if shown_name is None or e.stem == f"evidence_{safe_file_stem(shown_name)}"]
    shown = shown or evidence[:1]
    maps = [_image(folder / "heatmap.png", run_dir, "heatmap (what it paints: see its colour bar)")]
    maps += [_image(e, run_dir, f"evidence for '{e.stem.removeprefix('evidence_')}' (red for, blue against)")
             for e in shown]
    others = " · ".join(f'<a href="{quote(e.relative_to(run_dir).as_posix())}">{escape(e.name)}</a>'
                        for e in evidence if e not in shown)
    links = " · ".join(f'<a href="{quote((folder / name).relative_to(run_dir).as_posix())}">{name}</a>'
                       for name in ("attention.csv", "regions.geojson", "boxes.csv", "learned_prototypes.csv",
                                    *(p.name for p in sorted(folder.glob("learned_prototype_*.png"))))
                       if (folder / name).exists())
    wide = "".join(f'<img class="wide" src="{quote(image.relative_to(run_dir).as_posix())}" alt="{alt}" '
                   f'loading="lazy">' for image, alt in ((folder / "top_patches.png", "top and bottom patches"),
                                                         (folder / "prototypes.png", "prototypes"),
                                                         (folder / "learned_prototypes.png", "learned prototypes"))
                   if image.exists())
    viewer = ""
    if (folder / "viewer.html").exists():
        src = quote((folder / "viewer.html").relative_to(run_dir).as_posix())
        viewer = (f'<p><a href="{src}">open the zoomable viewer</a> (slide, maps as overlays, regions, '
                  f'a click on a patch shows its values)</p><iframe class="viewer" src="{src}" loading="lazy" '
                  f'title="{escape(slide_id)} viewer"></iframe>')
    return (f'<section id="{escape(slide_id)}"><h3>{escape(heading)}</h3><div class="maps">{"".join(maps)}</div>'
            f"{wide}{viewer}<p>{links}{' · ' + others if others else ''}</p></section>")


def build_report(run_dir: Path) -> Path:
    """Write RUN_DIR/report.html and return its path."""
    if not (run_dir / "run.json").exists() or not (run_dir / "predictions.csv").exists():
        raise InputError(run_dir, "not a milcli run folder (run.json and predictions.csv are missing)")
    record = json.loads((run_dir / "run.json").read_text())
    with open(run_dir / "predictions.csv", newline="") as f:
        predictions = list(csv.DictReader(f))
    header = [c for c in (predictions[0] if predictions else {}) if c not in ("correct", "slides")]
    id_column = header[0] if header else "slide_id"
    rows = [[p.get(c, "") for c in header] for p in predictions]
    wrong = ["wrong" if p.get("correct") == "false" else "" for p in predictions]
    task = record.get("task", "classification")

    options = record.get("options", {})
    parts = [f"<h1>milcli run: {escape(run_dir.name)}</h1>",
             f"<p>{len(predictions)} slides; backbone {escape(str(options.get('backbone', '?')))}; "
             f"model {escape(str(options.get('training', {}).get('model', {}).get('architecture', '?')))}; "
             f"device {escape(str(record.get('device', '?')))}; milcli {escape(__version__)}</p>",
             _metrics_section(record, run_dir), _cv_section(run_dir, task),
             "<h2>Predictions</h2>", _table(header, rows, wrong)]
    classes = [c.removeprefix("prob_") for c in header if c.startswith("prob_")]
    for p in predictions:
        said = f"predicted {p['prediction']}" if "prediction" in p else f"risk {p.get('risk', '?')}"
        shown = classes[shown_class(classes, classes.index(p["prediction"]))] if p.get("prediction") in classes else None
        known = (f"label {p['label']}" if p.get("label") else
                 f"time {p['time']}, event {p['event']}" if p.get("time") else "")
        of_patient = f" (patient {p[id_column]})" if id_column == "patient_id" else ""
        for slide_id in (p["slides"].split(";") if p.get("slides") else [p[id_column]]):
            parts.append(_slide_section(run_dir, slide_id, f"{slide_id}{of_patient}: {said}"
                                        + (f" ({known})" if known else ""), shown))
    page = ('<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f"<title>milcli report: {escape(run_dir.name)}</title><style>{STYLE}</style></head>"
            f"<body>{''.join(parts)}</body></html>")
    out = run_dir / "report.html"
    out.write_text(page, encoding="utf-8")
    return out
