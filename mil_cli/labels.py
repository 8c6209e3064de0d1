"""Read the labels CSV: `slide_id`, the task's target columns (`label`, or `time` and
`event`), and optional `patient_id` and `split` columns. What the target columns must hold is
the task's business (tasks.py); this module reads the file and checks what is common."""

from __future__ import annotations

import csv
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from mil_cli.errors import InputError

SPLITS = {"train", "val", "test"}
MIN_SLIDES_PER_CLASS = 2  # fewer training slides of a class than this and there is nothing to learn from


class TargetReader(Protocol):
    """What read_labels needs of a task (tasks.Task)."""
    name: str
    columns: tuple[str, ...]

    def parse(self, values: dict[str, str]) -> Any: ...

    def check_cohort(self, labels: LabelTable, labels_path: Path, found: list[str], where: str,
                     held_out: frozenset[str], folds: int | None) -> None: ...


@dataclass(frozen=True)
class LabelRow:
    target: Any                    # the task's parsed target (a class name, a number, (time, event)); None if absent
    patient_id: str | None = None
    split: str | None = None


@dataclass
class LabelTable:
    rows: dict[str, LabelRow]   # slide_id -> row

    @property
    def classes(self) -> list[str]:
        """Sorted class labels; numerically when every label is an integer (so 2 < 10)."""
        labels = {row.target for row in self.rows.values() if row.target is not None}
        if all(_is_int(label) for label in labels):
            return sorted(labels, key=int)
        return sorted(labels)

    def patients(self) -> dict[str, list[str]]:
        """patient id -> its slide ids, in file order (a slide without one is its own patient)."""
        grouped: dict[str, list[str]] = {}
        for slide_id, row in self.rows.items():
            grouped.setdefault(row.patient_id or slide_id, []).append(slide_id)
        return grouped


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


OTHER_TASK_HINT = {("time", "event"): "--task survival", ("label",): "--task classification or --task regression"}


def read_labels(path: Path, task: TargetReader, targets_required: bool = True) -> LabelTable:
    """Parse and check the labels CSV for `task`; InputError naming the file (and line) when it
    is wrong. Without `targets_required` (predict), the target columns may be absent or empty."""
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
    missing = ({"slide_id"} | set(task.columns)) - set(header)
    with_targets = not missing & set(task.columns)
    hint = next((f"; its columns suit {flag}" for columns, flag in OTHER_TASK_HINT.items()
                 if set(columns) <= set(header)), "")
    # predict may go without the target columns, not with another task's in their place
    if "slide_id" in missing or (missing and (targets_required or hint)):
        raise InputError(path, f"missing column(s) {', '.join(sorted(missing))} that {task.name} labels need "
                               f"(header is {header}){hint}")
    rows: dict[str, LabelRow] = {}
    for line_no, raw in enumerate(reader, start=2):
        record = {(k or "").strip(): (v or "").strip() for k, v in raw.items() if k is not None}
        slide_id = record.get("slide_id", "")
        values = {column: record.get(column, "") for column in task.columns}
        if not slide_id or (targets_required and not all(values.values())):
            raise InputError(path, f"line {line_no}: empty slide_id or {' or '.join(task.columns)}")
        target = None
        if with_targets and all(values.values()):
            try:
                target = task.parse(values)
            except ValueError as exc:
                raise InputError(path, f"line {line_no}: {exc}") from None
        split = record.get("split") or None
        if split is not None and split.lower() not in SPLITS:
            raise InputError(path, f"line {line_no}: split '{split}' is not one of train, val, test")
        row = LabelRow(target=target, patient_id=record.get("patient_id") or None,
                       split=split.lower() if split else None)
        if slide_id in rows and rows[slide_id] != row:
            raise InputError(path, f"line {line_no}: slide '{slide_id}' appears twice with different values")
        rows[slide_id] = row
    if not rows:
        raise InputError(path, "has a header but no rows")
    return LabelTable(rows)


def examples(ids: Iterable[str], n: int = 3) -> str:
    chosen = sorted(ids)[:n]
    return ", ".join(repr(i) for i in chosen) + (", ..." if len(chosen) == n else "")


def check_cohort(labels: LabelTable, labels_path: Path, task: TargetReader, available: Iterable[str], where: str,
                 held_out: frozenset[str] = frozenset({"val", "test"}), folds: int | None = None) -> list[str]:
    """Check, before any work, that the labelled slides found in `where` (a store or the slide
    inputs) can train a model for `task`; returns the labelled slide ids missing there.

    Training slides are those whose split is not in `held_out`; what they must hold (classes
    with enough slides, events, a spread of values) is the task's check, with `folds` when
    cross-validating."""
    available = set(available)
    found = [sid for sid in labels.rows if sid in available]
    missing = [sid for sid in labels.rows if sid not in available]
    if not found:
        raise InputError(labels_path, f"none of its {len(labels.rows)} slides is in {where} (its ids: "
                                      f"{examples(labels.rows)}; in {where}: {examples(available) or 'none'})")
    task.check_cohort(labels, labels_path, found, where, held_out, folds)
    return missing


def check_patients(labels: LabelTable, labels_path: Path) -> None:
    """With one bag per patient, a patient's slides must agree on the target and the split."""
    for patient, slide_ids in labels.patients().items():
        rows = {(labels.rows[sid].target, labels.rows[sid].split) for sid in slide_ids}
        if len(rows) > 1:
            shown = ", ".join(f"{sid}: {labels.rows[sid].target} ({labels.rows[sid].split or 'no split'})"
                              for sid in slide_ids)
            raise InputError(labels_path, f"patient '{patient}' has slides with different labels or splits ({shown}); "
                                          f"--bag-by patient needs one label per patient")
