"""The `milcli` command line: parse options, call the library, render results.

Exit codes: 0 every input processed; 1 some inputs failed (each named on stderr), the rest
processed; 2 nothing done (bad usage, a missing or unreadable file given as an option).
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mil_cli import __version__
from mil_cli.console import console, error, set_quiet, warn
from mil_cli.errors import InputError, MilcliError
from mil_cli.config import (DEFAULT_BACKBONE, VIEWER_BUDGET_MB, ModelConfig, QCThresholds, TrainOptions,
                             read_options_file)
from mil_cli.reports import StageReport

EXIT_PARTIAL = 1
EXIT_ERROR = 2
UsageError = typer.BadParameter.__mro__[1]  # click's UsageError, from the click that typer uses


def json_failure(command_name: str, message: str, source: str | None) -> None:
    """With --json, a command that exits 2 still says why on stdout, for pipelines."""
    print(json.dumps({"ok": False, "command": command_name, "error": message, "file": source}))


def fail(command_name: str, exc: MilcliError, as_json: bool) -> typer.Exit:
    """Report an expected error as one line (and as JSON with --json); the exit to raise."""
    error(str(exc))
    if as_json:
        json_failure(command_name, str(exc), exc.source if isinstance(exc, InputError) else None)
    return typer.Exit(EXIT_ERROR)


OPTIONS_FILE = "milcli.options_file"  # ctx.meta key: (path, parameter names it set)


def _from_options_file(ctx: typer.Context, exc: Exception, args: list[str]) -> InputError | None:
    """A bad value that came from --config FILE (not from the command line), as an error naming the file."""
    param = getattr(exc, "param", None)
    path, names = ctx.meta.get(OPTIONS_FILE, (None, set()))
    if param is None or param.name not in names or any(arg.split("=")[0] in param.opts for arg in args):
        return None
    return InputError(path, f"{param.opts[0].lstrip('-')}: {exc.format_message()}")


def _flags_without_placeholder(params: list) -> list:
    """Boolean flags take no value, so their help shows none (typer would print <bool>)."""
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    return params


class MilcliGroup(typer.core.TyperGroup):
    """The top level: flags without a value placeholder, as in the commands."""

    def get_params(self, ctx: typer.Context) -> list:
        return _flags_without_placeholder(super().get_params(ctx))


class MilcliCommand(typer.core.TyperCommand):
    """Usage lines as a user types them (`milcli tile [OPTIONS] SLIDES...`), flags without a
    value placeholder, and usage errors also reported as JSON on stdout when --json is given."""

    def get_params(self, ctx: typer.Context) -> list:
        return _flags_without_placeholder(super().get_params(ctx))

    def collect_usage_pieces(self, ctx: typer.Context) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if isinstance(param, typer.core.TyperArgument):
                name = (param.metavar or param.name or "").upper() + ("..." if param.nargs != 1 else "")
                pieces.append(name if param.required else f"[{name}]")
        return pieces

    def parse_args(self, ctx: typer.Context, args: list[str]) -> list[str]:
        as_json, given = "--json" in args, list(args)  # the parser consumes `args`
        try:
            return super().parse_args(ctx, args)
        except UsageError as exc:
            from_file = _from_options_file(ctx, exc, given)
            if from_file is not None:
                raise fail(self.name or "", from_file, as_json) from None
            if as_json:
                json_failure(self.name or "", exc.format_message(), None)
            raise
        except MilcliError as exc:  # from --config FILE, read while the options are parsed
            raise fail(self.name or "", exc, as_json) from None


app = typer.Typer(cls=MilcliGroup, no_args_is_help=True, rich_markup_mode="rich",
                  help="Whole-slide images in, an attention-MIL model and maps of where it looked out.\n\n"
                       "Stages: tile, embed, train, predict, explain; run does them all.")


def _options_file(ctx: typer.Context, param: typer.CallbackParam, value: Path | None) -> Path | None:
    """Load --config FILE as the command's defaults; options on the command line still win."""
    if value is None or ctx.resilient_parsing:
        return value
    names = {}  # option name without dashes -> (parameter, negated)
    for p in ctx.command.params:
        names |= {opt.lstrip("-"): (p, False) for opt in p.opts}
        names |= {opt.lstrip("-"): (p, True) for opt in getattr(p, "secondary_opts", [])}
    names.pop("config", None)
    defaults = {}
    for key, item in read_options_file(value).items():
        if key not in names:
            raise InputError(value, f"unknown option '{key}' for `milcli {ctx.command.name}` (see its --help)")
        option, negated = names[key]
        defaults[option.name] = (not item) if negated and isinstance(item, bool) else item
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    ctx.meta[OPTIONS_FILE] = (value, set(defaults))  # so a bad value is blamed on the file
    return value


ConfigFile = Annotated[Optional[Path], typer.Option(
    "--config", metavar="FILE", is_eager=True, callback=_options_file, show_default="none",
    help="TOML file of option values, named as the options without dashes (epochs = 30, patch-size = 512, "
         "no-explain = true); options on the command line win.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress or log output on stderr.")]
AsJson = Annotated[bool, typer.Option("--json", help="Print a machine-readable summary on stdout (also on failure: "
                                             '{"ok": false, "error": ..., "file": ...}).')]
Device = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N (auto takes CUDA when present).")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Redo finished slides instead of resuming.")]
Seed = Annotated[int, typer.Option(help="Random seed (same seed + device = same numbers).")]
PatchSize = Annotated[int, typer.Option(help="Patch side in px at the target resolution.")]
Stride = Annotated[Optional[int], typer.Option(help="Step between patches in target px.", show_default="patch size")]
LabelsFile = Annotated[Path, typer.Option(help="CSV with slide_id,label[,patient_id][,split].")]
TargetMpp = Annotated[float, typer.Option(help="Patch resolution in µm/px (0.5 = 20x, 1.0 = 10x).")]
Magnification = Annotated[Optional[float], typer.Option(help="Patch magnification, instead of --target-mpp (20 = 0.5 µm/px).")]
Mpp = Annotated[Optional[float], typer.Option(help="Override the slides' own µm/px (level 0).")]
MinTissue = Annotated[float, typer.Option(help="Fraction of a patch that must be tissue.")]
Stain = Annotated[str, typer.Option(help="Stain normalisation of every patch before the encoder, on the device: none, reinhard (CIELAB mean and spread of the tissue pixels) or macenko (stain vectors and concentrations in optical density). The store records it; adding slides with another setting is refused.")]
StainTargetImage = Annotated[Optional[Path], typer.Option(help="Image (PNG/JPEG/TIFF) of H&E tissue whose stain is the target for --stain.", show_default="a bundled H&E reference")]
Qc = Annotated[bool, typer.Option("--qc", help="Read every kept patch and leave out blurred ones, ones that are mostly glass and ones that are mostly near-black (folds, bubble rims); measures and counts go into the tile store (README: Quality control). Costs about one more read of each patch.")]
KeepPen = Annotated[bool, typer.Option("--keep-pen", help="Do not look for pen ink (blue, green, red, black marker on the glass); by default it is kept out of the tissue mask, and --previews hatch it in magenta.")]
BackboneName = Annotated[str, typer.Option("--backbone", help="Frozen encoder: a name from `milcli embed --list-backbones`, timm:<model> or hf-hub:<org/repo>.")]
Download = Annotated[bool, typer.Option("--download", help="Fetch backbone weights missing from the Hugging Face cache (needs internet, and accepted terms for gated models); without it nothing is downloaded.")]
Weights = Annotated[Optional[Path], typer.Option(help="Backbone weight file (.pth/.bin/.safetensors state_dict) instead of its default source.")]
BatchSize = Annotated[int, typer.Option(min=1, help="Patches per forward pass.")]
RayAddress = Annotated[Optional[str], typer.Option("--ray", metavar="ADDRESS", help="Spread the work over Ray workers (each on the GPU share Ray gives it, else CPUs; --device is then ignored): 'local' (this machine's Ray, started here if none runs), 'auto' (the cluster this node is in) or host:port. Needs `pip install 'milcli\\[ray]'`.", show_default="off")]
WorkersPerGpu = Annotated[int, typer.Option(min=1, help="With --ray: workers sharing each GPU.")]
WORKERS_HELP = "Processes that read slides (tile: one slide each; embed: they decode patches for the model); 0: read in this process."
TileWorkers = Annotated[Optional[int], typer.Option(min=0, help=WORKERS_HELP, show_default="cores, at most 4")]
EmbedWorkers = Annotated[Optional[int], typer.Option(min=0, help=WORKERS_HELP, show_default="CUDA: cores - 1, at most 8; CPU: 0")]
FLAG_WORDS = {"true", "false", "yes", "no", "on", "off"}


def _no_flag_values(paths: list[Path] | None) -> list[Path] | None:
    """`--previews true` leaves "true" among the slides: say what was meant, not just that it is missing."""
    for path in paths or []:
        if path.name.lower() in FLAG_WORDS and not path.exists():
            raise InputError(path, "no such file or folder (flags such as --previews take no value: write "
                                   "--previews, not --previews true)")
    return paths


Slides = Annotated[list[Path], typer.Argument(metavar="SLIDES", help="Slide files or folders of slides.", show_default=False,
                                              callback=_no_flag_values)]
TRAIN_DEFAULTS = TrainOptions()
MODEL_DEFAULTS = ModelConfig()
QC_DEFAULTS = QCThresholds()
ModelName = Annotated[str, typer.Option("--model", help="MIL head: abmil, abmil-plain, transformer-abmil, mean, max, noisy-and, clam-sb, clam-mb, dsmil, transmil, protomil or kme; heads joined by + (abmil+kme) train each family's heads, each family weighing half of the mean. auto (the default): a 3-fold cross-validation of the training slides (one head per recipe of abmil and kme) blends their out-of-fold probabilities with kme weighing 0, 0.25, 0.5 or 0.75 and takes the blend with the lowest Brier score (0: abmil, else abmil+kme so weighted); abmil alone where kme's own inner AUC is below 0.7 (classification on up to 300 slides; else abmil). About 40 % more training time. The choice, its Brier scores and AUCs go to metrics.json.")]
TaskName = Annotated[str, typer.Option("--task", help="classification (labels CSV column label: a class), regression (label: a number) or survival (columns time and event, 1 = event observed, 0 = censored).")]
SurvivalLoss = Annotated[str, typer.Option(help="--task survival: cox (partial likelihood over batches of at least 32 slides, each holding events) or nll (discrete-time hazards in 4 intervals).")]
Horizons = Annotated[Optional[str], typer.Option(help="--task survival: comma-separated times at which to measure the time-dependent AUC, in the labels' time unit (e.g. 12,36,60).", show_default="the quartiles of the event times")]
BagBy = Annotated[str, typer.Option(help="slide (one bag per slide) or patient (one bag per patient_id of the labels CSV: its slides' patches together; predictions and metrics per patient, maps per slide).")]
Ensemble = Annotated[int, typer.Option(min=1, help="Heads trained from different seeds and averaged (one model file); abmil heads left to milcli train this many per recipe (see --instance-loss).")]
MaxPatches = Annotated[Optional[int], typer.Option(min=1, help="Random patches per training bag and epoch (evaluation uses all).")]
Standardise = Annotated[Optional[str], typer.Option(show_default="the recipe ensemble", help="How heads scale the features, with the training patches' statistics (kept in the model file): z (each dimension to mean 0, sd 1, clipped to +-5), pooled (each dimension centred, all divided by one sd pooled over the dimensions, so their relative scales stay) or none (raw). Left out (with --instance-loss left out too), abmil heads train members of both recipes (see --instance-loss); other heads take z.")]
InstanceLoss = Annotated[Optional[float], typer.Option(min=0.0, max=1.0, show_default="the recipe ensemble", help="abmil heads: share of the max-pooled patch-classifier loss (its patch scores localise; at 0 the patch classifier is a probe that shapes nothing). Left unset (with --standardise unset too), on up to 300 training slides milcli trains --ensemble heads with each of two recipes and averages all of them: 0.5 on z-scored features, and 0 on raw features. Which recipe suits a cohort cannot be told from its shape, and choosing one by inner cross-validation on a few dozen slides picks by noise; the average matched or beat that choice on every benchmark row (README). Larger cohorts train the first recipe only. With --standardise set, the two shares on that scaling.")]
Repeats = Annotated[int, typer.Option(min=1, help="With --folds: repeat the cross-validation with other fold assignments and seeds; the pooled out-of-fold metrics are reported as mean ± sd over repeats with their standard error.")]
MICRONS_PER_PX_AT_1X = 10.0  # the usual convention: 10x = 1 µm/px, 20x = 0.5, 40x = 0.25


def _target_mpp(target_mpp: float, magnification: float | None) -> float:
    if magnification is None:
        return target_mpp
    if magnification <= 0:
        raise MilcliError(f"--magnification {magnification}: must be positive")
    return MICRONS_PER_PX_AT_1X / magnification


def command(func: Callable[..., Any]) -> Callable[..., Any]:
    """Register a command whose expected errors become one line on stderr and exit code 2."""
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        set_quiet(bool(kwargs.get("quiet", False)))
        try:
            return func(*args, **kwargs)
        except MilcliError as exc:
            raise fail(func.__name__, exc, bool(kwargs.get("as_json"))) from None
        except KeyboardInterrupt:
            console.print("[red]interrupted[/]; finished slides are kept, rerun to resume")
            raise typer.Exit(130) from None
    return app.command(cls=MilcliCommand)(wrapper)


def finish(name: str, report: StageReport, as_json: bool, extra: dict | None = None) -> None:
    """Report failures by name, print the summary, and exit 1 when any input failed."""
    for source, reason in report.failed.items():
        error(f"{source}: {reason}", "failed")
    console.print(f"{name}: {len(report.done)} done, {len(report.skipped)} already done, "
                  f"{len(report.failed)} failed in {report.seconds:.1f} s")
    if as_json:
        print(json.dumps({"ok": report.ok, "command": name, **report.to_dict(), **(extra or {})}, default=str))
    if not report.ok:
        raise typer.Exit(EXIT_PARTIAL)


def _check_model(name: str, task: str) -> None:
    from mil_cli.models import check_architecture

    check_architecture(name, task)


def _device(spec: str):
    from mil_cli.devices import resolve_device
    return resolve_device(spec)


@command
def tile(
    inputs: Slides,
    out: Annotated[Path, typer.Option(help="Tile store to write (HDF5).")] = Path("tiles.h5"),
    patch_size: PatchSize = 256,
    stride: Stride = None,
    target_mpp: TargetMpp = 0.5,
    magnification: Magnification = None,
    mpp: Mpp = None,
    min_tissue: MinTissue = 0.25,
    keep_pen: KeepPen = False,
    qc: Qc = False,
    min_sharpness: Annotated[float, typer.Option(help="--qc: least variance of the Laplacian over the variance of the grey levels, over the tissue pixels (sharp tissue 0.02-3; a sigma-4 px blur 0.003-0.02).")] = QC_DEFAULTS.min_sharpness,
    max_background: Annotated[float, typer.Option(help="--qc: largest share of near-white pixels.")] = QC_DEFAULTS.max_background,
    max_dark: Annotated[float, typer.Option(help="--qc: largest share of near-black pixels.")] = QC_DEFAULTS.max_dark,
    thumbnail_size: Annotated[int, typer.Option(help="Longer side of the stored thumbnail / mask in px.")] = 1024,
    workers: TileWorkers = None,
    previews: Annotated[bool, typer.Option("--previews", help="Write <out>_previews/<slide>.png: thumbnail, tissue outline, patch grid, pen ink left out.")] = False,
    backbone: Annotated[Optional[str], typer.Option("--backbone", help="The encoder these tiles are for: a warning now when --target-mpp is far from the scale it was trained at (embed checks again).")] = None,
    overwrite: Overwrite = False,
    config: ConfigFile = None,
    quiet: Quiet = False,
    as_json: AsJson = False,
) -> None:
    """Find tissue and lay a patch grid on each slide; write the tile store."""
    from mil_cli.backbones import get_backbone
    from mil_cli.tiling import TilingOptions, default_tiling_workers, tile_slides

    options = TilingOptions(patch_size=patch_size, stride=stride, target_mpp=_target_mpp(target_mpp, magnification),
                            mpp_override=mpp, min_tissue=min_tissue, keep_pen=keep_pen, thumbnail_size=thumbnail_size,
                            qc=QCThresholds(min_sharpness, max_background, max_dark) if qc else None)
    encoder = get_backbone(backbone) if backbone else None
    if encoder and (advice := encoder.target_mpp_advice(options.target_mpp)):
        warn(advice)
    preview_dir = out.with_name(f"{out.stem}_previews") if previews else None
    report = tile_slides(inputs, out, options, overwrite=overwrite, workers=default_tiling_workers() if workers is None else workers,
                         previews=preview_dir)
    finish("tile", report, as_json, {"out": str(out)})


def _list_backbones(as_json: bool) -> None:
    from mil_cli.backbones import BACKBONES

    rows = [{"name": b.name, "dim": b.dim, "input_size": b.input_size, "mean": b.mean, "std": b.std, "mpp": b.mpp,
             "precision": b.precision, "licence": b.licence, "gated": b.gated, "weights_present": b.weights_present(),
             "description": b.description, "default": b.name == DEFAULT_BACKBONE} for b in BACKBONES.values()]
    if as_json:
        print(json.dumps({"ok": True, "command": "embed --list-backbones", "backbones": rows}))
        return
    table = Table(title="backbones")
    for column in ("name", "dim", "input", "µm/px", "CUDA precision", "licence", "gated", "weights here", "description"):
        table.add_column(column)
    for r in rows:
        table.add_row(r["name"] + (" (default)" if r["default"] else ""), str(r["dim"]), f"{r['input_size']} px",
                      str(r["mpp"] or "-"), r["precision"], r["licence"], "yes" if r["gated"] else "no",
                      "yes" if r["weights_present"] else "no", r["description"])
    table.add_row("timm:<model>", "model's", "model's", "-", "bf16", "model's", "", "",
                  "any timm model; HF cache, --download or --weights FILE")
    table.add_row("hf-hub:<org/repo>", "model's", "model's", "-", "bf16", "model's", "", "",
                  "a timm model on the Hugging Face hub; HF cache, --download or --weights")
    Console(width=None if sys.stdout.isatty() else 200).print(table)  # a listing is the output: stdout


@command
def embed(
    tiles: Annotated[Path, typer.Argument(help="Tile store written by `milcli tile`.")] = Path("tiles.h5"),
    out: Annotated[Path, typer.Option(help="Feature store to write (HDF5).")] = Path("feats.h5"),
    backbone: BackboneName = DEFAULT_BACKBONE,
    weights: Weights = None,
    download: Download = False,
    batch_size: BatchSize = 64,
    workers: EmbedWorkers = None,
    dtype: Annotated[str, typer.Option(help="Stored feature type: float16 or float32.")] = "float16",
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the backbone (worth it for long GPU runs).")] = False,
    stain: Stain = "none",
    stain_target: StainTargetImage = None,
    device: Device = "auto",
    ray: RayAddress = None,
    ray_workers: Annotated[Optional[int], typer.Option(min=1, help="With --ray: worker processes, each holding one model.", show_default="GPUs x --workers-per-gpu; CPU-only: one per 4 CPUs")] = None,
    workers_per_gpu: WorkersPerGpu = 1,
    list_backbones: Annotated[bool, typer.Option("--list-backbones", help="List the backbones (with --json as JSON), whether their weights are on this machine, and exit.")] = False,
    overwrite: Overwrite = False,
    config: ConfigFile = None,
    quiet: Quiet = False,
    as_json: AsJson = False,
) -> None:
    """Embed every patch with a frozen CNN; write the feature store (GPU when present)."""
    if list_backbones:
        _list_backbones(as_json)
        return
    from mil_cli.backbones import allow_downloads, get_backbone
    from mil_cli.embedding import EmbedOptions, embed_store
    from mil_cli.stores import require_file

    allow_downloads(download)
    options = EmbedOptions(batch_size=batch_size, workers=workers, dtype=dtype, weights=weights, compile=compile,
                           stain=stain, stain_target=stain_target)
    require_file(tiles, "the TILES argument")
    if ray is not None:
        from mil_cli.distributed import RayOptions, ray_embed_store

        report = ray_embed_store(tiles, out, backbone, options, RayOptions(ray, ray_workers, workers_per_gpu), overwrite)
    else:
        report = embed_store(tiles, out, get_backbone(backbone), _device(device), options, overwrite)
    finish("embed", report, as_json, {"out": str(out)})


METRIC_NAMES = {"auc": "AUC", "balanced_accuracy": "balanced acc.", "accuracy": "accuracy", "f1": "F1",
                "mae": "MAE", "rmse": "RMSE", "r2": "R²", "pearson": "Pearson", "spearman": "Spearman",
                "c_index": "C-index", "c_index_uno": "Uno's C"}


def metric_keys(task: str) -> tuple[str, ...]:
    from mil_cli.metrics import TASK_KEYS

    return TASK_KEYS[task]


def _horizons(text: str | None) -> tuple[float, ...]:
    try:
        times = tuple(float(t) for t in text.split(",")) if text else ()
    except ValueError:
        raise MilcliError(f"--horizons {text}: expected comma-separated numbers, e.g. 12,36,60") from None
    if any(t <= 0 for t in times):
        raise MilcliError(f"--horizons {text}: times must be positive")
    return times


def _plot_name(task: str) -> str:
    from mil_cli.metrics import TASK_PLOTS

    return TASK_PLOTS[task]


def _metrics_table(metrics: dict, task: str) -> Table:
    from mil_cli.metrics import epochs_note

    keys = metric_keys(task)
    table = Table(title=f"metrics ({epochs_note(metrics)})")
    for column in ("split", "n", *(METRIC_NAMES[k] for k in keys)):
        table.add_column(column, justify="right")
    for split in ("train", "val", "test"):
        if split in metrics:
            m = metrics[split]
            table.add_row(split, str(m["n"]), *(f"{m.get(k, float('nan')):.3f}" for k in keys))
    return table


def _cv_table(summary: dict) -> Table:
    from mil_cli.metrics import choice_label

    keys = metric_keys(summary.get("task", "classification"))
    chosen = [choice_label(m["architecture_choice"]) for m in summary["per_fold"] if "architecture_choice" in m]
    counts = ", ".join(f"{name} in {chosen.count(name)}" for name in sorted(set(chosen)))
    auto = f"; --model auto chose {counts} of {len(chosen)} folds" if chosen else ""
    table = Table(title=f"{summary['folds']}-fold cross-validation x {summary['repeats']} (held-out folds{auto})")
    for column in ("repeat", "fold", "n", *(METRIC_NAMES[k] for k in keys)):
        table.add_column(column, justify="right")
    for m in summary["per_fold"]:
        table.add_row(str(m["repeat"]), str(m["fold"]), str(m["n"]), *(f"{m[k]:.3f}" for k in keys))
    spread = summary["mean_std"]
    table.add_row("", "folds: mean ± sd", "", *(f"{spread[k]['mean']:.3f} ± {spread[k]['std']:.3f}" for k in keys))
    pooled = summary["over_repeats"]
    table.add_row("", "pooled out-of-fold: mean ± sd over repeats (± s.e.)", "",
                  *(f"{pooled[k]['mean']:.3f} ± {pooled[k]['std']:.3f} (± {pooled[k]['sem']:.3f})" for k in keys),
                  style="bold")
    return table


@command
def train(
    features: Annotated[Path, typer.Option(help="Feature store (or folder of per-slide .h5 files).")] = Path("feats.h5"),
    labels: LabelsFile = Path("labels.csv"),
    out: Annotated[Optional[Path], typer.Option(help="Model file to write; with --folds, a folder.", show_default="model.pt, or cv/ with --folds")] = None,
    model: ModelName = MODEL_DEFAULTS.architecture,
    task: TaskName = TRAIN_DEFAULTS.task,
    survival_loss: SurvivalLoss = TRAIN_DEFAULTS.survival_loss,
    horizons: Horizons = None,
    bag_by: BagBy = TRAIN_DEFAULTS.bag_by,
    folds: Annotated[Optional[int], typer.Option(min=2, help="K-fold cross-validation: writes fold models, oof_predictions.csv, splits.csv, metrics.json and roc.png (scatter.png for regression, km.png for survival).")] = None,
    repeats: Repeats = 3,
    epochs: Annotated[int, typer.Option(min=1, help="Epochs per head: exactly this many, or at most with validation slides (early stopping).")] = TRAIN_DEFAULTS.epochs,
    ensemble: Ensemble = TRAIN_DEFAULTS.ensemble,
    lr: Annotated[float, typer.Option(help="Adam learning rate.")] = TRAIN_DEFAULTS.lr,
    lr_schedule: Annotated[str, typer.Option(help="cosine (decay to 1 % by the last epoch) or constant.")] = TRAIN_DEFAULTS.lr_schedule,
    weight_decay: Annotated[float, typer.Option(help="Adam weight decay.")] = TRAIN_DEFAULTS.weight_decay,
    patience: Annotated[int, typer.Option(min=1, help="With validation slides: epochs without a better validation loss before stopping.")] = TRAIN_DEFAULTS.patience,
    val_fraction: Annotated[float, typer.Option(min=0.0, max=0.9, help="Share of training slides (patients) held out for early stopping when the labels have no 'val' split; 0: none.")] = TRAIN_DEFAULTS.val_fraction,
    standardise: Standardise = TRAIN_DEFAULTS.standardise,
    batch_size: Annotated[int, typer.Option(min=1, help="Bags per step (padded to the largest, masked).")] = TRAIN_DEFAULTS.batch_size,
    unbalanced: Annotated[bool, typer.Option("--unbalanced", help="Classification: no class weights (by default each bag weighs 1 / its class's share of the training slides).")] = not TRAIN_DEFAULTS.balance_classes,
    max_patches: MaxPatches = TRAIN_DEFAULTS.max_patches,
    precision: Annotated[str, typer.Option(help="Training steps: auto (bf16 on GPUs with native bf16, else fp32), fp32 or bf16. Evaluation and prediction always run fp32.")] = TRAIN_DEFAULTS.precision,
    hidden_dim: Annotated[int, typer.Option(min=1, help="Patch embedding size.")] = MODEL_DEFAULTS.hidden_dim,
    attention_dim: Annotated[int, typer.Option(min=1, help="Attention branch size.")] = MODEL_DEFAULTS.attention_dim,
    dropout: Annotated[float, typer.Option(min=0.0, max=0.95, help="Dropout after the patch embedding.")] = MODEL_DEFAULTS.dropout,
    instance_loss: InstanceLoss = MODEL_DEFAULTS.instance_loss,
    instance_k: Annotated[int, typer.Option(min=1, help="clam-sb, clam-mb: top/bottom patches per bag for the instance loss.")] = MODEL_DEFAULTS.instance_k,
    prototypes: Annotated[int, typer.Option(min=1, help="protomil: learned prototypes per class.")] = MODEL_DEFAULTS.prototypes,
    seed: Seed = 0,
    device: Device = "auto",
    config: ConfigFile = None,
    quiet: Quiet = False,
    as_json: AsJson = False,
) -> None:
    """Train a MIL head on a feature store and a labels CSV: by default (--model auto) gated attention, or a blend of it with kme where a 3-fold inner cross-validation shows it better.

    The rule for small cohorts: every training slide trains (no inner validation split unless the labels' split column names 'val' slides or --val-fraction is set) for exactly --epochs epochs with a cosine learning-rate decay, and --ensemble heads from different seeds (per recipe, see --instance-loss) are averaged. Early stopping on 10-20 validation slides is noise and costs a fifth of the data; benchmarks/panel.py has the evidence.
    """
    from mil_cli.stores import require_file
    from mil_cli.training import save_checkpoint
    from mil_cli.training import train as train_model

    _check_model(model, task)
    options = TrainOptions(epochs=epochs, ensemble=ensemble, lr=lr, lr_schedule=lr_schedule, weight_decay=weight_decay,
                           patience=patience, val_fraction=val_fraction, standardise=standardise, seed=seed,
                           batch_size=batch_size, balance_classes=not unbalanced, max_patches=max_patches,
                           precision=precision, task=task,
                           survival_loss=survival_loss, horizons=_horizons(horizons), bag_by=bag_by,
                           model=ModelConfig(architecture=model, hidden_dim=hidden_dim, attention_dim=attention_dim,
                                             dropout=dropout, instance_loss=instance_loss, instance_k=instance_k,
                                             prototypes=prototypes))
    features, labels = require_file(features, "--features"), require_file(labels, "--labels")
    if folds is not None:
        from mil_cli.crossval import cross_validate

        out = out or Path("cv")
        result = cross_validate(features, labels, options, _device(device), out, folds, repeats)
        console.print(_cv_table(result.metrics))
        missing, seconds, metrics = result.missing, result.seconds, result.metrics
        console.print(f"fold models, oof_predictions.csv, splits.csv, metrics.json and {_plot_name(task)} in "
                      f"{escape(str(out))}/")
    else:
        out = out or Path("model.pt")
        single = train_model(features, labels, options, _device(device))
        save_checkpoint(single.checkpoint, out)
        console.print(_metrics_table(single.metrics, task))
        missing, seconds, metrics = single.missing, single.seconds, single.metrics
    report = StageReport(done=[str(out)], failed={s: f"in {labels} but not in {features}" for s in missing},
                         seconds=seconds)
    finish("train", report, as_json, {"out": str(out), "metrics": metrics})


@command
def predict(
    model: Annotated[Path, typer.Option(help="Model file, or a folder of fold_*/model.pt (averaged).")] = Path("model.pt"),
    features: Annotated[list[Path], typer.Option(help="Feature store (or folder of per-slide .h5 files); repeat for several.")] = [Path("feats.h5")],
    labels: Annotated[Optional[Path], typer.Option(help="Labels CSV: adds the known target's columns (label and correct; label; time and event). Needed for patient-level models: its patient_id column makes the bags.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="CSV to write.", show_default="stdout")] = None,
    device: Device = "auto",
    ray: RayAddress = None,
    workers_per_gpu: WorkersPerGpu = 1,
    quiet: Quiet = False,
) -> None:
    """Per-slide (or per-patient) predictions as CSV: class probabilities, the predicted value, or the risk."""
    from mil_cli.inference import load_models, predict_stores, write_predictions
    from mil_cli.labels import read_labels
    from mil_cli.stores import FeatureSource, require_file

    torch_device = _device(device if ray is None else "cpu")
    models = load_models(require_file(model, "--model"), torch_device)
    sources = [FeatureSource(require_file(path, "--features")) for path in features]
    task = models[0].task
    table = read_labels(require_file(labels, "--labels"), task, targets_required=False) if labels else None
    if table is not None:
        task.check_known(table, labels, {sid for source in sources for sid in source.slide_ids})
    if ray is not None:
        from mil_cli.distributed import RayOptions, ray_predict_stores

        predictions = ray_predict_stores(model, models, sources, RayOptions(ray, workers_per_gpu=workers_per_gpu))
    else:
        predictions = predict_stores(models, sources, torch_device, table)
    if out is None:
        write_predictions(predictions, models, table, sys.stdout)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "w", newline="") as stream:
            write_predictions(predictions, models, table, stream)
    console.print(f"predict: {len(predictions)} {models[0].bag_by}s")


@command
def explain(
    slide_ids: Annotated[Optional[list[str]], typer.Argument(metavar="SLIDE_ID", help="Slide ids to explain.", show_default=False)] = None,
    all_slides: Annotated[bool, typer.Option("--all", help="Explain every slide in the store.")] = False,
    model: Annotated[Path, typer.Option(help="Model file, or a folder of fold_*/model.pt.")] = Path("model.pt"),
    features: Annotated[Path, typer.Option(help="Feature store.")] = Path("feats.h5"),
    out: Annotated[Path, typer.Option(help="Folder for <slide_id>/ outputs.")] = Path("explain"),
    k: Annotated[int, typer.Option(min=1, help="Top and bottom patches in the montage.")] = 8,
    shown_map: Annotated[str, typer.Option("--map", help="What heatmap.png paints and regions trace: instance (each patch's probability of the positive class, or of the predicted one with 3+ classes, from the patch classifier; it localises best in benchmarks/panel.py) or attention.")] = "instance",
    probability: Annotated[float, typer.Option(min=0.01, max=0.99, help="--map instance: regions where the patch probability, interpolated between patch centres, exceeds this.")] = 0.5,
    threshold: Annotated[float, typer.Option(min=0.01, max=0.99, help="--map attention: regions where attention, interpolated between patch centres, exceeds this fraction of the slide's highest (CAM's rule).")] = 0.2,
    top_pct: Annotated[Optional[float], typer.Option(min=0.1, max=100.0, help="--map attention: regions instead at the level of this top attention percentile of the patches.", show_default="off")] = None,
    scale: Annotated[str, typer.Option(help="--map attention: rank (percentile ranks among the fewest patches holding 99 % of the attention; the rest 0) or raw (attention weights).")] = "rank",
    smooth: Annotated[float, typer.Option(min=0.0, help="Gaussian smoothing of the maps, sigma in patches (0: none).")] = 0.0,
    width: Annotated[Optional[int], typer.Option(min=64, help="Width of the map PNGs in px.", show_default="thumbnail width, at least 512")] = None,
    prototypes: Annotated[bool, typer.Option("--prototypes", help="Also prototypes.png/.csv: the closest highly attended patches of each class in the training slides.")] = False,
    viewer: Annotated[bool, typer.Option("--viewer/--no-viewer", help="Also viewer.html: the slide zoomable (offline, OpenSeadragon) down to the tiling resolution with the heatmap and evidence maps as overlays, the regions outlined, and a patch's values on click. Reads the slide file again.")] = True,
    viewer_mb: Annotated[float, typer.Option(min=1.0, help="The viewer's size budget per slide, in MB: 256-px JPEG tiles (about 20 kB each) only where there is tissue. 100 MB hold about 60 mm² of tissue at 0.5 µm/px (240 mm² at 1 µm/px); a slide with more tissue is shown down to half (a quarter...) of the tiling resolution instead.")] = VIEWER_BUDGET_MB,
    refine: Annotated[bool, typer.Option("--refine", help="Also refined_<k>.png and refined.csv: the largest 3 regions (or the most convincing patch's neighbourhood) tiled again with patches every quarter patch, embedded with the feature store's backbone and scored by the patch classifier, so the map is 4x finer than the patch grid. Cost: 16 patches per patch of refined area, at most 2,048 per slide (sample_data: about 135 patches, 3 s a slide on 2 CPU cores with efficientnet-lite0; 2,048 patches take about 40 s there). Classification models, --map instance.")] = False,
    labels: Annotated[Optional[Path], typer.Option(help="Labels CSV whose patient_id column makes the bags of a patient-level model (each slide is then explained within its patient's bag).")] = None,
    device: Device = "auto",
    config: ConfigFile = None,
    quiet: Quiet = False,
    as_json: AsJson = False,
) -> None:
    """Heatmap (+ .npy), per-class evidence maps, attention.csv, top/bottom patches, QuPath regions and boxes per slide.

    For regression and survival models the heatmap paints each patch's contribution to the predicted value or risk, and the regions trace where it is high."""
    from mil_cli.explain import ExplainOptions, explain_slides
    from mil_cli.inference import load_models
    from mil_cli.labels import read_labels
    from mil_cli.stores import FeatureSource, require_file

    if not slide_ids and not all_slides:
        raise MilcliError("name one or more SLIDE_IDs, or pass --all")
    torch_device = _device(device)
    models = load_models(require_file(model, "--model"), torch_device)
    source = FeatureSource(require_file(features, "--features"))
    ids = source.slide_ids if all_slides else list(slide_ids or [])
    options = ExplainOptions(top_k=k, map=shown_map, probability=probability, threshold=threshold, top_pct=top_pct,
                             scale=scale, smooth=smooth, width=width, prototypes=prototypes, viewer=viewer,
                             viewer_mb=viewer_mb, refine=refine)
    table = read_labels(require_file(labels, "--labels"), models[0].task, targets_required=False) if labels else None
    report = explain_slides(models, source, ids, out, options, torch_device, table)
    finish("explain", report, as_json, {"out": str(out)})


@command
def run(
    inputs: Slides,
    labels: LabelsFile = Path("labels.csv"),
    out: Annotated[Path, typer.Option(help="Output folder (resumed when it exists).")] = Path("run"),
    target_mpp: TargetMpp = 0.5,
    magnification: Magnification = None,
    mpp: Mpp = None,
    patch_size: PatchSize = 256,
    stride: Stride = None,
    min_tissue: MinTissue = 0.25,
    keep_pen: KeepPen = False,
    qc: Qc = False,
    previews: Annotated[bool, typer.Option("--previews", help="Write previews/<slide>.png: thumbnail, tissue outline, patch grid, pen ink left out.")] = False,
    backbone: BackboneName = DEFAULT_BACKBONE,
    weights: Weights = None,
    download: Download = False,
    stain: Stain = "none",
    stain_target: StainTargetImage = None,
    batch_size: BatchSize = 64,
    workers: Annotated[Optional[int], typer.Option(min=0, help=WORKERS_HELP, show_default="tile: cores, at most 4; embed: CUDA cores - 1, at most 8, CPU 0")] = None,
    model: ModelName = MODEL_DEFAULTS.architecture,
    task: TaskName = TRAIN_DEFAULTS.task,
    survival_loss: SurvivalLoss = TRAIN_DEFAULTS.survival_loss,
    horizons: Horizons = None,
    bag_by: BagBy = TRAIN_DEFAULTS.bag_by,
    epochs: Annotated[int, typer.Option(min=1, help="Training epochs per head (see `milcli train --help`).")] = TRAIN_DEFAULTS.epochs,
    ensemble: Ensemble = TRAIN_DEFAULTS.ensemble,
    lr: Annotated[float, typer.Option(help="Adam learning rate.")] = TRAIN_DEFAULTS.lr,
    max_patches: MaxPatches = TRAIN_DEFAULTS.max_patches,
    standardise: Standardise = TRAIN_DEFAULTS.standardise,
    instance_loss: InstanceLoss = MODEL_DEFAULTS.instance_loss,
    folds: Annotated[Optional[int], typer.Option(min=2, help="Also K-fold cross-validation into cv/ (the model still trains on every slide); its metrics go into run.json and the report.", show_default="off")] = None,
    repeats: Repeats = 3,
    seed: Seed = 0,
    explain_all: Annotated[bool, typer.Option("--explain/--no-explain", help="Explain every slide into explain/.")] = True,
    device: Device = "auto",
    overwrite: Overwrite = False,
    config: ConfigFile = None,
    quiet: Quiet = False,
    as_json: AsJson = False,
) -> None:
    """All stages in one go: tiles.h5, feats.h5, model.pt, predictions.csv, explain/, run.json.

    The slides, the labels (two or more classes, enough slides of each among those given) and the backbone's weights are checked first: a mistake costs seconds and writes nothing."""
    from mil_cli.backbones import allow_downloads
    from mil_cli.embedding import EmbedOptions
    from mil_cli.pipeline import RunOptions, run_pipeline
    from mil_cli.stores import require_file
    from mil_cli.tiling import TilingOptions

    _check_model(model, task)
    allow_downloads(download)
    options = RunOptions(
        tiling=TilingOptions(patch_size=patch_size, stride=stride, target_mpp=_target_mpp(target_mpp, magnification),
                             mpp_override=mpp, min_tissue=min_tissue, keep_pen=keep_pen,
                             qc=QCThresholds() if qc else None),
        training=TrainOptions(epochs=epochs, ensemble=ensemble, lr=lr, max_patches=max_patches, seed=seed, task=task,
                              survival_loss=survival_loss, horizons=_horizons(horizons), bag_by=bag_by,
                              standardise=standardise,
                              model=ModelConfig(architecture=model, instance_loss=instance_loss)),
        backbone=backbone, embedding=EmbedOptions(batch_size=batch_size, workers=workers, weights=weights, stain=stain,
                                                  stain_target=stain_target),
        explain_all=explain_all, previews=previews, folds=folds, repeats=repeats, overwrite=overwrite)
    reports = run_pipeline(inputs, require_file(labels, "--labels"), out, options, _device(device))
    record = json.loads((out / "run.json").read_text())
    metrics = record["metrics"]
    console.print(_metrics_table(metrics, task))
    if "cross_validation" in record:
        cv = record["cross_validation"]
        console.print(f"cross-validation ({folds} folds x {repeats}), pooled out-of-fold: "
                      + ", ".join(f"{METRIC_NAMES[key]} {cv[key]['mean']:.3f} ± {cv[key]['std']:.3f}"
                                  for key in metric_keys(task)))
    failed = {f"{stage}: {source}": reason for stage, report in reports.items()
              for source, reason in report.failed.items()}
    total = StageReport(done=reports["predict"].done, failed=failed, seconds=sum(r.seconds for r in reports.values()))
    written = ["predictions.csv", "model.pt", "run.json", _plot_name(task)] + ["explain/"] * explain_all + ["cv/"] * bool(folds)
    console.print(f"outputs in {escape(str(out))}/ ({', '.join(written)})")
    finish("run", total, as_json, {"out": str(out), "metrics": metrics,
                                   "stages": {k: v.to_dict() for k, v in reports.items()}})


@command
def report(
    run_dir: Annotated[Path, typer.Argument(help="Output folder of `milcli run`.")],
    quiet: Quiet = False,
) -> None:
    """One static HTML page over a run: metrics, ROC, predictions, heatmaps, evidence, top patches."""
    from mil_cli.report import build_report

    page = build_report(run_dir)
    console.print(f"report: {escape(str(page))} (open it in a browser; images are linked beside it)")


@command
def info(
    slides: Slides,
    quiet: Quiet = False,
    as_json: AsJson = False,
) -> None:
    """Reader, size, pyramid levels, downsamples, mpp and vendor of each slide."""
    from mil_cli.slides import find_slides, open_slide

    table = Table(title="slides")
    for column in ("slide", "reader", "width x height", "levels", "downsamples", "mpp", "vendor"):
        table.add_column(column, overflow="fold")
    rows, report = [], StageReport()
    for path in find_slides(slides):
        try:
            with open_slide(path) as slide:
                row = {"path": str(path), "reader": slide.reader, "dimensions": list(slide.dimensions),
                       "level_dimensions": [list(d) for d in slide.level_dimensions],
                       "level_downsamples": slide.level_downsamples, "mpp": slide.mpp, "vendor": slide.vendor}
        except MilcliError as exc:
            report.failed[str(path)] = getattr(exc, "reason", str(exc))
            continue
        rows.append(row)
        report.done.append(str(path))
        table.add_row(path.name, row["reader"], "{} x {}".format(*row["dimensions"]), str(len(row["level_dimensions"])),
                      ", ".join(f"{d:g}" for d in row["level_downsamples"]),
                      f"{row['mpp']:.4g}" if row["mpp"] else "unknown", row["vendor"] or "")
    if rows and not as_json:
        console.quiet = quiet
        console.print(table)
    for source, reason in report.failed.items():
        error(f"{source}: {reason}", "failed")
    if as_json:
        print(json.dumps({"command": "info", "slides": rows, "failed": report.failed}))
    if not report.ok:
        raise typer.Exit(EXIT_PARTIAL)


def version_callback(value: bool) -> None:
    if value:
        print(f"milcli {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: Annotated[bool, typer.Option("--version", callback=version_callback, is_eager=True,
                                               help="Print the version and exit.")] = False) -> None:
    """milcli: attention MIL for whole-slide images."""


if __name__ == "__main__":
    app()
