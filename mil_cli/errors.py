"""Errors that milcli reports as one line (no traceback): the user's input is at fault."""

from __future__ import annotations

from pathlib import Path


def first_line(exc: BaseException) -> str:
    """An exception's message cut to its first line (its type name when it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class MilcliError(Exception):
    """An expected problem (bad input, missing file) with a message fit to show a user."""


class InputError(MilcliError):
    """A problem with one named input: the message starts with the input's name."""

    def __init__(self, source: str | Path, reason: str) -> None:
        self.source = str(source)
        self.reason = reason
        super().__init__(f"{source}: {reason}")

    def __reduce__(self) -> tuple:  # pickled with both fields (Ray sends errors between processes)
        return (type(self), (self.source, self.reason))
