"""`milcli report RUN_DIR`: one static HTML page over a `milcli run` folder, viewable offline.

The page links the run's own images by relative path (they sit beside it), so it stays small
and opens from a copied folder: metrics, the ROC plot when cross-validation made one, the
predictions table, and per slide its prediction, heatmap, evidence maps and top patches.
"""

from __future__ import annotations

import csv
import json
from html import escape
from pathlib import Path
from urllib.parse import quote

from mil_cli import __version__
from mil_cli.errors import InputError
from mil_cli.metrics import SUMMARY_KEYS, epochs_note
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


def _metrics_section(record: dict) -> str:
    metrics = record.get("metrics", {})
    rows = [[split, str(m["n"]), *(f"{m.get(k, float('nan')):.3f}" for k in SUMMARY_KEYS)]
            for split, m in metrics.items() if isinstance(m, dict) and "n" in m]
    note = epochs_note(metrics)
    return "<h2>Metrics</h2>" + _table(["split", "slides", *SUMMARY_KEYS], rows) + f"<p>{escape(note)}</p>"


def _cv_section(run_dir: Path) -> str:
    cv = run_dir / "cv"
    if not (cv / "metrics.json").exists():
        return ""
    summary = json.loads((cv / "metrics.json").read_text())
    rows = [[key, f"{v['mean']:.3f} ± {v['std']:.3f}"] for key, v in summary["mean_std"].items()]
    return ("<h2>Cross-validation</h2>" + _table(["metric", "mean ± sd over folds"], rows)
            + _image(cv / "roc.png", run_dir, "out-of-fold ROC with bootstrap 95 % band"))


def build_report(run_dir: Path) -> Path:
    """Write RUN_DIR/report.html and return its path."""
    if not (run_dir / "run.json").exists() or not (run_dir / "predictions.csv").exists():
        raise InputError(run_dir, "not a milcli run folder (run.json and predictions.csv are missing)")
    record = json.loads((run_dir / "run.json").read_text())
    with open(run_dir / "predictions.csv", newline="") as f:
        predictions = list(csv.DictReader(f))
    prob_columns = [c for c in (predictions[0] if predictions else {}) if c.startswith("prob_")]
    header = ["slide_id", "prediction", *prob_columns, "label", "split"]
    rows = [[p.get(c, "") for c in header] for p in predictions]
    wrong = ["wrong" if p.get("correct") == "false" else "" for p in predictions]

    options = record.get("options", {})
    parts = [f"<h1>milcli run: {escape(run_dir.name)}</h1>",
             f"<p>{len(predictions)} slides; backbone {escape(str(options.get('backbone', '?')))}; "
             f"model {escape(str(options.get('training', {}).get('model', {}).get('architecture', '?')))}; "
             f"device {escape(str(record.get('device', '?')))}; milcli {escape(__version__)}</p>",
             _metrics_section(record), _cv_section(run_dir),
             "<h2>Predictions</h2>", _table(header, rows, wrong)]
    for p in predictions:
        folder = run_dir / "explain" / safe_file_stem(p["slide_id"])
        if not folder.is_dir():
            continue
        maps = [_image(folder / "heatmap.png", run_dir, "attention heatmap (percentile ranks)")]
        maps += [_image(e, run_dir, f"evidence for '{e.stem.removeprefix('evidence_')}' (red for, blue against)")
                 for e in sorted(folder.glob("evidence_*.png"))]
        links = " · ".join(f'<a href="{quote((folder / name).relative_to(run_dir).as_posix())}">{name}</a>'
                           for name in ("attention.csv", "regions.geojson", "boxes.csv") if (folder / name).exists())
        top = folder / "top_patches.png"
        wide = "".join(f'<img class="wide" src="{quote(image.relative_to(run_dir).as_posix())}" alt="{alt}" '
                       f'loading="lazy">' for image, alt in ((top, "top and bottom patches"),
                                                             (folder / "prototypes.png", "prototypes"))
                       if image.exists())
        parts.append(f'<section id="{escape(p["slide_id"])}"><h3>{escape(p["slide_id"])}: predicted '
                     f"{escape(p['prediction'])}" + (f" (label {escape(p['label'])})" if p.get("label") else "")
                     + f'</h3><div class="maps">{"".join(maps)}</div>{wide}<p>{links}</p></section>')
    page = ('<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f"<title>milcli report: {escape(run_dir.name)}</title><style>{STYLE}</style></head>"
            f"<body>{''.join(parts)}</body></html>")
    out = run_dir / "report.html"
    out.write_text(page, encoding="utf-8")
    return out
