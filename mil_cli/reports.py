"""What a stage did with its inputs, for the CLI to render and for run.json."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class StageReport:
    """Failures map an input's name to a one-line reason."""

    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)  # seconds spent in named parts of the stage
    counts: dict[str, int] = field(default_factory=dict)    # how the work was done, e.g. slides written by workers

    @property
    def ok(self) -> bool:
        return not self.failed

    def to_dict(self) -> dict:
        return asdict(self)
