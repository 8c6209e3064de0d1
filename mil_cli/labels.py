"""Read the labels CSV: `slide_id,label` plus optional `patient_id` and `split` columns."""

from __future__ import annotations

import csv
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from mil_cli.errors import InputError

SPLITS = {"train", "val", "test"}
MIN_SLIDES_PER_CLASS = 2  # fewer training slides of a class than this and there is nothing to learn from


@dataclass(frozen=True)
class LabelRow:
    label: str
    patient_id: str | None = None
    split: str | None = None


@dataclass
class LabelTable:
    rows: dict[str, LabelRow]   # slide_id -> row

    @property
    def classes(self) -> list[str]:
        """Sorted labels; numerically when every label is an integer (so 2 < 10)."""
        labels = {row.label for row in self.rows.values()}
        if all(_is_int(label) for label in labels):
            return sorted(labels, key=int)
        return sorted(labels)


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def read_labels(path: Path) -> LabelTable:
    """Parse and check the labels CSV; InputError naming the file (and line) when it is wrong."""
    if not path.is_file():
        raise InputError(path, "no such labels file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        try:
            text = path.read_text(encoding="cp1252")
        except UnicodeDecodeError:
            raise InputError(path, "not a text file in UTF-8 or Windows-1252 encoding") from None
    reader = csv.DictReader(line for line in text.splitlines() if line.strip())
    header = [name.strip() for name in (reader.fieldnames or [])]
    missing = {"slide_id", "label"} - set(header)
    if missing:
        raise InputError(path, f"missing column(s) {', '.join(sorted(missing))} (header is {header})")
    rows: dict[str, LabelRow] = {}
    for line_no, raw in enumerate(reader, start=2):
        record = {(k or "").strip(): (v or "").strip() for k, v in raw.items() if k is not None}
        slide_id, label = record.get("slide_id", ""), record.get("label", "")
        if not slide_id or not label:
            raise InputError(path, f"line {line_no}: empty slide_id or label")
        split = record.get("split") or None
        if split is not None and split.lower() not in SPLITS:
            raise InputError(path, f"line {line_no}: split '{split}' is not one of train, val, test")
        row = LabelRow(label=label, patient_id=record.get("patient_id") or None,
                       split=split.lower() if split else None)
        if slide_id in rows and rows[slide_id] != row:
            raise InputError(path, f"line {line_no}: slide '{slide_id}' appears twice with different values")
        rows[slide_id] = row
    if not rows:
        raise InputError(path, "has a header but no rows")
    return LabelTable(rows)


def _examples(ids: Iterable[str], n: int = 3) -> str:
    chosen = sorted(ids)[:n]
    return ", ".join(repr(i) for i in chosen) + (", ..." if len(chosen) == n else "")


def check_cohort(labels: LabelTable, labels_path: Path, available: Iterable[str], where: str,
                 held_out: frozenset[str] = frozenset({"val", "test"}), folds: int | None = None) -> list[str]:
    """Check, before any work, that the labelled slides found in `where` (a store or the slide
    inputs) can train a model; returns the labelled slide ids missing there.

    Training slides are those whose split is not in `held_out`; each class needs at least
    MIN_SLIDES_PER_CLASS of them (and `folds` of them with cross-validation)."""
    classes = labels.classes
    if len(classes) < 2:
        raise InputError(labels_path, f"only one class ({classes[0]!r}); training needs at least two")
    available = set(available)
    found = [sid for sid in labels.rows if sid in available]
    missing = [sid for sid in labels.rows if sid not in available]
    if not found:
        raise InputError(labels_path, f"none of its {len(labels.rows)} slides is in {where} (its ids: "
                                      f"{_examples(labels.rows)}; in {where}: {_examples(available) or 'none'})")
    counts = Counter(labels.rows[sid].label for sid in found if labels.rows[sid].split not in held_out)
    needed = max(MIN_SLIDES_PER_CLASS, folds or 0)
    short = [c for c in classes if counts[c] < needed]
    if short:
        per_class = ", ".join(f"{c}: {counts[c]}" for c in classes)
        purpose = f"{folds}-fold cross-validation" if folds and folds > MIN_SLIDES_PER_CLASS else "training"
        raise InputError(labels_path, f"{purpose} needs at least {needed} training slides of every class; found in "
                                      f"{where}: {per_class} ({len(found)} of its {len(labels.rows)} slides)")
    return missing


def check_label_classes(labels: LabelTable, labels_path: Path, classes: list[str], slide_ids: Iterable[str]) -> None:
    """The labels of the slides to predict must be classes the model knows; otherwise every
    such slide would silently count as wrong."""
    unknown = Counter(labels.rows[sid].label for sid in slide_ids if sid in labels.rows
                      and labels.rows[sid].label not in classes)
    if unknown:
        listed = ", ".join(f"{label!r} ({n} slide{'s' * (n > 1)})" for label, n in sorted(unknown.items()))
        raise InputError(labels_path, f"label(s) {listed} are not classes of the model ({', '.join(classes)}); "
                                      f"give the labels it was trained with, or predict without --labels")
