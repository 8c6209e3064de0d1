"""The options of a MIL head and of its training, as plain data: the model file records them,
and the command line shows their defaults without importing torch. Also the options file
(`--config FILE`, TOML) that holds a command's option values."""

from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mil_cli.errors import InputError, MilcliError


def read_options_file(path: Path) -> dict[str, Any]:
    """A flat TOML table of option values, keys as on the command line without the dashes
    (`patch-size = 512`; `patch_size` is accepted too)."""
    if not path.is_file():
        raise InputError(path, "no such options file (check --config)")
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InputError(path, f"not a TOML file ({exc})") from None
    nested = [key for key, value in table.items() if isinstance(value, dict)]
    if nested:
        raise InputError(path, f"[{nested[0]}]: sections are not used; write the options at the top level")
    return {key.replace("_", "-"): value for key, value in table.items()}


TASK_NAMES = ("classification", "regression", "survival")  # tasks.TASKS, named here for the CLI without torch
DEFAULT_BACKBONE = "efficientnet-lite0-mid"  # a key of backbones.BACKBONES, named here for the CLI without torch
VIEWER_BUDGET_MB = 100.0    # explain's viewer tiles per slide (viewer.py; the CLI shows it without importing it)
DEFAULT_INSTANCE_LOSS = 0.5  # abmil heads' patch-classifier share in the first recipe (training.RECIPES)
# how a head scales its input features, with statistics of the training patches (training.feature_statistics):
# z: each dimension to mean 0, sd 1 (clipped to +-clip); pooled: each dimension to mean 0, all divided by one
# sd pooled over the dimensions (their relative scales kept); none: raw features
SCALINGS = ("z", "pooled", "none")
AUTO_ARCHITECTURE = "auto"  # --model auto: the head family chosen per cohort by inner cross-validation (training.py)
FAMILY_JOIN = "+"  # --model abmil+kme: an ensemble of both families' heads, each family weighing half


@dataclass(frozen=True)
class ModelConfig:
    architecture: str = AUTO_ARCHITECTURE  # resolved by training.fit; or a head of models.MODELS, or heads joined
                                           # by FAMILY_JOIN (a mix)
    in_dim: int = 1280
    n_classes: int = 2            # outputs: the classes, 1 for regression and Cox survival, hazard bins for nll
    task: str = "classification"  # what the outputs mean (tasks.py)
    hidden_dim: int = 256
    attention_dim: int = 128
    dropout: float = 0.25
    instance_loss: float | None = None  # abmil heads: share of the max-pooled patch-classifier loss;
                                        # None: the recipe ensemble's (training.ensemble_recipes)
    instance_k: int = 8           # clam-sb/-mb: patches taken from each end of the attention ranking
    instance_weight: float = 0.3  # clam-sb/-mb: share of the instance loss in the total loss
    prototypes: int = 5           # protomil: learned prototypes per class

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class TrainOptions:
    epochs: int = 50              # exactly this many without validation bags; at most, with them
    lr: float = 1e-3
    weight_decay: float = 1e-4
    lr_schedule: str = "cosine"   # cosine decay to 1 % over the epochs, or constant
    patience: int = 10            # epochs without a better validation loss before stopping
    val_fraction: float = 0.0     # of the training slides (or patients) for early stopping, when no split column
    standardise: str | None = None  # one of SCALINGS; None: the recipe ensemble's (training.ensemble_recipes)
    clip: float = 5.0             # z scaling: clip the z-scores to +-clip
    ensemble: int = 5             # heads trained from different seeds, averaged
    seed: int = 0
    batch_size: int = 1           # bags per optimiser step
    balance_classes: bool = True  # classification: weight each bag's loss by 1 / its class's share of the training bags
    max_patches: int | None = 4096  # random patches per training bag and epoch; None: whole bags
    precision: str = "auto"       # training steps: auto = bf16 on GPUs with native bf16, else fp32
    task: str = "classification"  # classification, regression or survival (tasks.py)
    survival_loss: str = "cox"    # survival: cox (partial likelihood per batch) or nll (discrete-time hazards)
    horizons: tuple[float, ...] = ()  # survival: times of the time-dependent AUC (none: the event-time quartiles)
    bag_by: str = "slide"         # one bag per slide, or per patient (its slides' patches together)
    model: ModelConfig = field(default_factory=ModelConfig)

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.ensemble < 1 or (self.max_patches is not None and self.max_patches < 1):
            raise MilcliError("--batch-size, --ensemble and --max-patches must be at least 1")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise MilcliError(f"--precision {self.precision}: expected auto, fp32 or bf16")
        if self.standardise is not None and self.standardise not in SCALINGS:
            raise MilcliError(f"--standardise {self.standardise}: expected one of {', '.join(SCALINGS)}")
        if self.lr_schedule not in ("cosine", "constant"):
            raise MilcliError(f"--lr-schedule {self.lr_schedule}: expected cosine or constant")
        if self.task not in TASK_NAMES:
            raise MilcliError(f"--task {self.task}: expected one of {', '.join(TASK_NAMES)}")
        if self.survival_loss not in ("cox", "nll"):
            raise MilcliError(f"--survival-loss {self.survival_loss}: expected cox or nll")
        if self.bag_by not in ("slide", "patient"):
            raise MilcliError(f"--bag-by {self.bag_by}: expected slide or patient")


@dataclass(frozen=True)
class QCThresholds:
    """`tile --qc`: patches outside these are left out (measures in quality.py)."""

    min_sharpness: float = 0.015  # sharp tissue measured 0.018-2.7 on the real test slides; a sigma-4 px blur 0.003-0.02
    max_background: float = 0.9   # nearly all glass although the thumbnail's mask saw tissue
    max_dark: float = 0.5         # half the patch near-black
