"""One rich console on stderr for progress, logs and warnings; `--quiet` silences it."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True, highlight=False)


def set_quiet(quiet: bool) -> None:
    console.quiet = quiet


def error(message: str, label: str = "error") -> None:
    """Errors are shown even under --quiet: the exit code alone would not say what failed.
    Messages are printed as plain text (a path or "milcli[ray]" is not rich markup)."""
    quiet, console.quiet = console.quiet, False
    console.print(f"[red]{label}:[/] {escape(message)}", soft_wrap=True)
    console.quiet = quiet


def warn(message: str) -> None:
    console.print(f"[yellow]warning:[/] {escape(message)}", soft_wrap=True)


def progress_bar() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False,
                    disable=console.quiet)
