"""Read the labels CSV: `slide_id,label` plus optional `patient_id` and `split` columns."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from mil_cli.errors import InputError

SPLITS = {"train", "val", "test"}


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
