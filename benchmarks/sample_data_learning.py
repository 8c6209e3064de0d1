"""Does the pipeline learn on sample_data, and does attention find the tumour?

Cross-validated so that every figure is on slides the model did not train on: for each of
R repeats, the 20 slides are split into K stratified folds; each fold is predicted by a model
trained (with its own validation split for early stopping) on the other folds. Prints the
out-of-fold slide AUC per repeat, the attention localisation AUC (patches inside the
ground-truth tumour mask vs outside, within each positive slide, attention from the model
that did not see that slide), and how well explain's boxes overlap the true tumour's box
(IoU of the largest region's box, and of the 95 % attention box).

    python benchmarks/sample_data_learning.py [--features runs/demo/feats.h5] [--folds 5] [--repeats 3]

Without --features it tiles and embeds sample_data into a temporary folder first (~1 min).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold

from mil_cli.backbones import get_backbone
from mil_cli.embedding import embed_store
from mil_cli.evaluation import box_iou, localisation_auc, mask_box, patch_mask_fraction
from mil_cli.explain import (BOX_MASS, ExplainOptions, attention_box, patch_step, polygon_box, region_grid,
                             region_polygons)
from mil_cli.inference import load_model, predict_bag
from mil_cli.labels import read_labels
from mil_cli.tasks import Classification
from mil_cli.stores import FeatureSource
from mil_cli.tiling import TilingOptions, tile_slides
from mil_cli.config import TrainOptions
from mil_cli.training import save_checkpoint, train

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", type=Path)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device("cpu")
    work = Path(tempfile.mkdtemp(prefix="milcli-bench-"))
    features = args.features
    if features is None:
        tile_slides([SAMPLE / "slides"], work / "tiles.h5", TilingOptions())
        embed_store(work / "tiles.h5", work / "feats.h5", get_backbone("efficientnet-lite0"), device)
        features = work / "feats.h5"
    labels = read_labels(SAMPLE / "labels.csv", Classification())
    classes = labels.classes
    ids = sorted(labels.rows)
    y = np.array([classes.index(labels.rows[s].target) for s in ids])
    source = FeatureSource(features)
    masks = {p.stem: np.array(Image.open(p)).astype(bool) for p in (SAMPLE / "masks").glob("*.png")}

    region_rules = {"default (--threshold 0.2)": ExplainOptions(), "--top-pct 20": ExplainOptions(top_pct=20.0)}
    slide_aucs, loc_aucs = [], []
    ious: dict[str, list[float]] = {name: [] for name in [*region_rules, "95 % attention box"]}
    start = time.perf_counter()
    for repeat in range(args.repeats):
        oof = np.zeros(len(ids))
        folds = StratifiedKFold(args.folds, shuffle=True, random_state=repeat).split(ids, y)
        for fold, (_, test_index) in enumerate(folds):
            test_ids = {ids[i] for i in test_index}
            csv = work / f"labels_r{repeat}_f{fold}.csv"
            csv.write_text("slide_id,label,split\n" + "".join(
                f"{s},{labels.rows[s].target},{'test' if s in test_ids else 'train'}\n" for s in ids))
            result = train(features, csv, TrainOptions(seed=repeat), device)
            save_checkpoint(result.checkpoint, work / "model.pt")
            model = load_model(work / "model.pt", device)
            for i in test_index:
                data = source.load(ids[i])
                probs, attention = predict_bag([model], data.features, device)
                oof[i] = probs[1]
                if ids[i] in masks:
                    size = int(data.attrs["patch_size_level0"])
                    inside = patch_mask_fraction(masks[ids[i]], data.coords, size) >= 0.5
                    loc_aucs.append(localisation_auc(attention, inside))
                    truth, step = mask_box(masks[ids[i]]), patch_step(data)
                    for name, rule in region_rules.items():
                        regions = region_grid(data.coords, step, size, attention, rule.threshold, rule.top_pct)
                        largest = region_polygons(regions)[0]
                        ious[name].append(box_iou(polygon_box(largest), truth))
                    ious["95 % attention box"].append(
                        box_iou(attention_box(data.coords, step, size, attention, BOX_MASS), truth))
        slide_aucs.append(roc_auc_score(y, oof))
        print(f"repeat {repeat}: out-of-fold slide AUC {slide_aucs[-1]:.3f}")
    loc = np.array([a for a in loc_aucs if not np.isnan(a)])
    print(f"slide AUC over {args.repeats} x {args.folds}-fold CV: {np.mean(slide_aucs):.3f} ± {np.std(slide_aucs):.3f}")
    print(f"attention localisation AUC (tumour patches vs others, {len(loc)} held-out positive slides): "
          f"mean {loc.mean():.3f}, median {np.median(loc):.3f}, min {loc.min():.3f}")
    for name, values in ious.items():
        values = np.array(values)
        print(f"IoU with the true tumour box, {name}: mean {values.mean():.2f}, >= 0.5 on "
              f"{(values >= 0.5).sum()} of {len(values)} ({(values >= 0.5).mean():.0%})")
    print(f"({time.perf_counter() - start:.0f} s of training and prediction on {device})")


if __name__ == "__main__":
    main()
