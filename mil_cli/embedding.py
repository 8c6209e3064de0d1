"""Embed every patch of a tile store with a frozen backbone into a feature store.

Reading: patches are read in blocks (up to 4 x 4 neighbours in one region read, which is
several times cheaper than a read each) by DataLoader workers that keep their recent slide
handles open; one loader runs over all pending slides, so batches span slide boundaries and
small slides do not leave the model idle. The main process regroups blocks into batches of
exactly `batch_size`, moves uint8 pixels to the device (through pinned buffers, non_blocking,
on CUDA), normalises there, and runs the model under inference mode with channels_last (and
AMP in the backbone's preferred type on CUDA). On CUDA the next batch is launched before the
previous one's features are collected, so the GPU never waits on Python. Finished slides
are written by a background thread.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator
from itertools import chain
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from mil_cli import stores
from mil_cli.backbones import Backbone
from mil_cli.console import progress_bar, warn
from mil_cli.devices import autocast, keep_freed_memory
from mil_cli.errors import InputError, MilcliError
from mil_cli.reports import StageReport
from mil_cli.slides import Slide, group_into_blocks, open_slide
from mil_cli.stain import BUNDLED_TARGET, METHODS, StainTarget, load_target
from mil_cli.stain import normalise as stain_normalise

FEATURE_DTYPES = {"float16": np.float16, "float32": np.float32}
BLOCK_SPAN = 4  # patches per side of a block read at once


@dataclass
class SlideJob:
    slide_id: str
    source_path: Path
    coords: np.ndarray
    patch_size_level0: int
    attrs: dict


class PatchBlocks(Dataset):
    """Item i -> one block of neighbouring patches of one slide: (uint8 (k, 3, S, S) pixels,
    slide index, row indices into the slide's coords (k,), decoded flags (k,))."""

    def __init__(self, jobs: list[SlideJob], input_size: int, span: int = BLOCK_SPAN, open_handles: int = 2) -> None:
        self.jobs = jobs
        self.input_size = input_size
        self.blocks = [(j, rows) for j, job in enumerate(jobs)
                       for rows in group_into_blocks(job.coords, job.patch_size_level0 * span)]
        self.open_handles = open_handles
        self._slides: OrderedDict[Path, Slide] = OrderedDict()
        self._unreadable: set[Path] = set()

    def __len__(self) -> int:
        return len(self.blocks)

    def _slide(self, path: Path) -> Slide:
        if path in self._slides:
            self._slides.move_to_end(path)
        else:
            self._slides[path] = open_slide(path)
            while len(self._slides) > self.open_handles:
                self._slides.popitem(last=False)[1].close()
        return self._slides[path]

    def _read(self, job: SlideJob, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Pixels and decoded flags. A slide that cannot be opened gives no decoded patch (not an
        exception: raised in a decode worker it would end the run, and lose its name)."""
        try:
            slide = self._slide(job.source_path) if job.source_path not in self._unreadable else None
        except InputError:
            self._unreadable.add(job.source_path)
            slide = None
        if slide is None:
            return np.zeros((len(rows), self.input_size, self.input_size, 3), np.uint8), np.zeros(len(rows), bool)
        try:
            return slide.read_patches_unscaled(job.coords[rows], job.patch_size_level0, self.input_size), \
                np.ones(len(rows), dtype=bool)
        except InputError:  # a corrupt tile somewhere in the block: read its patches one by one
            pass
        patches, ok = [], np.ones(len(rows), dtype=bool)
        for i, row in enumerate(rows):
            try:
                patches.append(slide.read_patches_unscaled(job.coords[row:row + 1], job.patch_size_level0,
                                                           self.input_size)[0])
            except InputError:  # this patch is skipped and counted; the slide keeps the rest
                patches.append(None)
                ok[i] = False
        shape = next((p.shape for p in patches if p is not None), (self.input_size, self.input_size, 3))
        return np.stack([np.zeros(shape, np.uint8) if p is None else p for p in patches]), ok

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, torch.Tensor, torch.Tensor]:
        j, rows = self.blocks[index]
        pixels, ok = self._read(self.jobs[j], rows)
        patches = torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2)
        if patches.shape[-1] != self.input_size:  # torch's uint8 antialiased resize: 3x faster than PIL's
            patches = F.interpolate(patches, size=(self.input_size, self.input_size), mode="bilinear",
                                    antialias=True)
        return patches.contiguous(), j, torch.from_numpy(rows), torch.from_numpy(ok)


@dataclass
class Batch:
    images: torch.Tensor       # (n, 3, S, S) uint8
    slide_index: torch.Tensor  # (n,)
    rows: torch.Tensor         # (n,) row of each patch in its slide's coords
    ok: torch.Tensor           # (n,) bool, False where the patch could not be decoded


class Rebatcher:
    """Regroups blocks of varying size into batches of exactly `size` patches (the last may be
    smaller). With `pinned`, pixels are gathered into two alternating pinned buffers so the copy
    to the GPU can be non_blocking; the caller must collect a batch's results before taking the
    batch after next (it does: one batch in flight)."""

    def __init__(self, size: int, pinned: bool = False) -> None:
        self.size = size
        self.pinned = pinned
        self._parts: list[Batch] = []
        self._count = 0
        self._buffers: list[torch.Tensor] = []
        self._turn = 0

    def add(self, images: torch.Tensor, slide_index: int, rows: torch.Tensor, ok: torch.Tensor) -> Iterator[Batch]:
        self._parts.append(Batch(images, torch.full((len(images),), slide_index), rows, ok))
        self._count += len(images)
        while self._count >= self.size:
            yield self._take(self.size)

    def flush(self) -> Iterator[Batch]:
        if self._count:
            yield self._take(self._count)

    def _take(self, n: int) -> Batch:
        names = [f.name for f in fields(Batch)]
        whole = Batch(*(torch.cat([getattr(part, name) for part in self._parts]) for name in names))
        self._count -= n
        self._parts = [Batch(*(getattr(whole, name)[n:] for name in names))] if self._count else []
        return Batch(self._stage(whole.images[:n]), whole.slide_index[:n], whole.rows[:n], whole.ok[:n])

    def _stage(self, images: torch.Tensor) -> torch.Tensor:
        if not self.pinned:
            return images
        if len(self._buffers) < 2:
            self._buffers.append(torch.empty((self.size, *images.shape[1:]), dtype=images.dtype).pin_memory())
        buffer = self._buffers[self._turn][: len(images)]
        self._turn = (self._turn + 1) % 2
        return buffer.copy_(images)


@dataclass(frozen=True)
class EmbedOptions:
    batch_size: int = 64
    workers: int | None = None       # patch-decoding processes; None: default_workers()
    dtype: str = "float16"           # stored feature type
    weights: Path | None = None      # the backbone's weight file, instead of its default source
    compile: bool = False            # torch.compile the backbone
    stain: str = "none"              # stain normalisation on the device: none, reinhard or macenko (stain.py)
    stain_target: Path | None = None  # image whose stain is the target; None: the bundled H&E reference

    def __post_init__(self) -> None:
        if self.stain not in METHODS:
            raise MilcliError(f"--stain {self.stain}: expected one of {', '.join(METHODS)}")
        if self.dtype not in FEATURE_DTYPES:
            raise MilcliError(f"--dtype {self.dtype}: expected one of {', '.join(FEATURE_DTYPES)}")
        if self.batch_size < 1:
            raise MilcliError(f"--batch-size {self.batch_size}: must be at least 1")


class Embedder:
    """The backbone on a device, fed uint8 batches: normalised on the device, channels_last
    (faster on CUDA and on CPU oneDNN alike), AMP in the backbone's preferred type on CUDA."""

    def __init__(self, backbone: Backbone, device: torch.device, weights: Path | None = None,
                 compile: bool = False, stain: str = "none", stain_target: StainTarget = BUNDLED_TARGET) -> None:
        keep_freed_memory()
        torch.set_flush_denormal(True)  # denormal activations cost ~15 % of CPU time, and nothing in accuracy
        self.device = device
        self.precision = backbone.precision
        self.model = backbone.create(weights).to(device).to(memory_format=torch.channels_last)
        if compile:
            self.model = torch.compile(self.model)
        self.mean = torch.tensor(backbone.mean, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(backbone.std, device=device).view(1, 3, 1, 1) * 255
        self.stain, self.stain_target = stain, stain_target

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        x = stain_normalise(x.float(), self.stain, self.stain_target)
        x = (x - self.mean) / self.std  # element-wise ops keep channels_last
        with autocast(self.device, self.precision):
            return self.model(x)  # on the device; reading it back is the caller's sync point


def default_workers(device: torch.device) -> int:
    """Decode processes: on CUDA, cores - 1 (at most 8) to feed the GPU. On the CPU none: the
    model's threads already fill every core, and block reads make decoding a small share of
    the work, so decoding inline beat 1 or 2 decode processes or threads on 2 cores
    (they cost more in contention and transfers than they overlap; benchmarks/embed.py)."""
    if device.type != "cuda":
        return 0
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def pending_jobs(tiles: stores.FeatureSource, finished: set[str], report: StageReport) -> list[SlideJob]:
    """The tile store's slides not in `finished`; finished ones go to report.skipped, and
    slides whose file is gone to report.failed."""
    report.skipped = [s for s in tiles.slide_ids if s in finished]
    jobs = []
    for slide_id in (s for s in tiles.slide_ids if s not in finished):
        data = tiles.load(slide_id, with_features=False)
        source = Path(str(data.attrs.get("source_path", "")))
        if not source.is_file():
            report.failed[slide_id] = f"slide file {source} is gone (tile store {tiles.path})"
            continue
        jobs.append(SlideJob(slide_id, source, data.coords, int(data.attrs["patch_size_level0"]), data.attrs))
    return jobs


MPP_TOLERANCE = 1.5  # patches this many times finer or coarser than the encoder's training data get a warning


def warn_on_resolution(backbone: Backbone, jobs: list[SlideJob]) -> None:
    """Pathology encoders see tissue at one scale; patches at another give silently worse features."""
    if backbone.mpp is None:
        return
    off = [job for job in jobs if not (backbone.mpp / MPP_TOLERANCE <= float(job.attrs.get("target_mpp", float("nan")))
                                       <= backbone.mpp * MPP_TOLERANCE)]
    if off:
        found = sorted({f"{float(job.attrs.get('target_mpp', float('nan'))):g}" for job in off})
        warn(f"{backbone.name} was trained on patches at {backbone.mpp:g} µm/px; {len(off)} slide(s) were tiled at "
             f"{', '.join(found)} µm/px (nan: no mpp in the file); its features there may be worse: tile again with "
             f"--target-mpp {backbone.mpp:g}")


def feature_store_attrs(backbone: Backbone, options: EmbedOptions) -> dict:
    """What every slide of a feature store must share; a resumed run must match them."""
    return {"backbone": backbone.name, "dim": backbone.dim, "dtype": options.dtype,
            "weights": str(options.weights.resolve()) if options.weights else "default",
            "stain": options.stain if options.stain == "none" else
            f"{options.stain} ({options.stain_target.resolve() if options.stain_target else 'bundled H&E target'})"}


def stain_target_of(options: EmbedOptions) -> StainTarget:
    """The --stain-target image's statistics (a one-line error when it is unreadable), else the bundled target."""
    return load_target(options.stain_target) if options.stain_target else BUNDLED_TARGET


def build_embedder(backbone: Backbone, device: torch.device, options: EmbedOptions,
                   target: StainTarget | None = None) -> Embedder:
    target = target or stain_target_of(options)
    return Embedder(backbone, device, options.weights, options.compile, options.stain, target)


def decode_blocks(jobs: list[SlideJob], input_size: int, workers: int) -> Iterator:
    """Blocks of decoded patches of `jobs`, read by `workers` processes (0: in this one)."""
    loader = DataLoader(PatchBlocks(jobs, input_size), batch_size=None, num_workers=workers,
                        prefetch_factor=4 if workers else None)
    return iter(loader)


def embed_store(tiles_path: Path, out: Path, backbone: Backbone, device: torch.device,
                options: EmbedOptions = EmbedOptions(), overwrite: bool = False) -> StageReport:
    """Embed the tile store's slides into the feature store `out`, resuming unless `overwrite`."""
    start = time.perf_counter()
    report = StageReport()
    tiles = stores.FeatureSource(tiles_path, kind=stores.TILES_FORMAT)
    backbone.check(options.weights)  # missing or unreadable weights: one line, before the store is touched
    target = stain_target_of(options)  # likewise an unreadable --stain-target
    with stores.StoreWriter(out, stores.FEATURES_FORMAT, feature_store_attrs(backbone, options), overwrite) as writer:
        jobs = pending_jobs(tiles, writer.completed(), report)
        warn_on_resolution(backbone, jobs)
        if jobs:
            workers = default_workers(device) if options.workers is None else options.workers
            blocks = decode_blocks(jobs, backbone.input_size, workers)  # workers decode while the model loads
            embedder = build_embedder(backbone, device, options, target)
            report.phases["model_load"] = time.perf_counter() - start
            _embed_jobs(embedder, blocks, jobs, tiles, writer, backbone.name, options, report)
            report.phases["embedding"] = time.perf_counter() - start - report.phases["model_load"]
        index_start = time.perf_counter()
    report.phases["store_index"] = time.perf_counter() - index_start
    report.seconds = time.perf_counter() - start
    return report


class SlideAssembly:
    """Features arriving in any order, put in each slide's coords order; tells when a slide is whole."""

    def __init__(self, jobs: list[SlideJob], dtype: type) -> None:
        self.jobs = jobs
        self.dtype = dtype
        self.remaining = [len(job.coords) for job in jobs]
        self.features: dict[int, np.ndarray] = {}
        self.ok: dict[int, np.ndarray] = {}

    def add(self, batch: Batch, features: np.ndarray) -> list[int]:
        """Place a batch's features; returns the slides it completed."""
        finished = []
        slide_index, rows, ok = batch.slide_index.numpy(), batch.rows.numpy(), batch.ok.numpy()
        for j in np.unique(slide_index).tolist():
            here = slide_index == j
            if j not in self.features:
                n = len(self.jobs[j].coords)
                self.features[j] = np.empty((n, features.shape[1]), dtype=self.dtype)
                self.ok[j] = np.zeros(n, dtype=bool)
            self.features[j][rows[here]] = features[here]
            self.ok[j][rows[here]] = ok[here]
            self.remaining[j] -= int(here.sum())
            if self.remaining[j] == 0:
                finished.append(j)
        return finished

    def pop(self, j: int) -> tuple[np.ndarray, np.ndarray]:
        return self.features.pop(j), self.ok.pop(j)


def embed_blocks(embedder: Embedder, blocks: Iterable, jobs: list[SlideJob], options: EmbedOptions,
                 on_slide: Callable[[int, np.ndarray, np.ndarray], None],
                 on_batch: Callable[[int], None] = lambda n: None) -> None:
    """Run the model over `blocks` (from PatchBlocks(jobs)) in batches of exactly the batch size;
    calls on_slide(job index, features, decoded flags) as each slide completes."""
    rebatcher = Rebatcher(options.batch_size, pinned=embedder.device.type == "cuda")
    assembly = SlideAssembly(jobs, FEATURE_DTYPES[options.dtype])

    def collect(batch: Batch, features: torch.Tensor) -> None:
        for j in assembly.add(batch, features.float().cpu().numpy()):
            on_slide(j, *assembly.pop(j))
        on_batch(len(batch.rows))

    in_flight = None  # one batch on the device while the next one is launched
    batches = chain(chain.from_iterable(rebatcher.add(*block) for block in blocks), rebatcher.flush())
    for batch in batches:
        launched = (batch, embedder(batch.images))
        if in_flight is not None:
            collect(*in_flight)
        in_flight = launched
    if in_flight is not None:
        collect(*in_flight)


WRITES_AHEAD = 2  # finished slides waiting for the writer thread; more would only hold memory


def _embed_jobs(embedder: Embedder, blocks: Iterator, jobs: list[SlideJob], tiles: stores.FeatureSource,
                writer: stores.StoreWriter, backbone_name: str, options: EmbedOptions, report: StageReport) -> None:
    pending: deque[Future] = deque()  # slide writes in the background thread, oldest first

    def settle(limit: int) -> None:
        """Wait until fewer than `limit` writes are pending; a failed write ends the run here,
        not after all the embedding (its InputError names the slide; earlier slides are kept)."""
        while pending and (pending[0].done() or len(pending) >= limit):
            pending.popleft().result()

    def store(j: int, features: np.ndarray, ok: np.ndarray) -> None:
        record_slide(report, jobs[j], ok, write_slide(tiles, writer.write_slide, jobs[j], features, ok))

    with ThreadPoolExecutor(max_workers=1) as background, progress_bar() as bar:
        task = bar.add_task(f"embedding ({backbone_name}, {embedder.device})", total=sum(len(j.coords) for j in jobs))

        def write(j: int, features: np.ndarray, ok: np.ndarray) -> None:
            settle(WRITES_AHEAD)
            pending.append(background.submit(store, j, features, ok))

        def advance(n: int) -> None:
            settle(WRITES_AHEAD + 1)  # only raises a failure already there
            bar.advance(task, n)

        embed_blocks(embedder, blocks, jobs, options, write, advance)
        settle(1)


def why_undecodable(path: Path) -> str:
    """The reason a slide gave no patch: why it cannot be opened, when it cannot."""
    try:
        open_slide(path).close()
    except InputError as exc:
        return f"{path}: {exc.reason}"
    return f"no patch of {path} could be decoded"


SlideWrite = Callable[..., object]  # StoreWriter.write_slide, or stores.write_slide_file bound to a folder


def write_slide(tiles: stores.FeatureSource, write: SlideWrite, job: SlideJob, features: np.ndarray,
                ok: np.ndarray) -> str | None:
    """Store one embedded slide's decodable patches (with the tile store's thumbnail and mask)
    through `write`; returns why the slide failed when none of its patches decoded."""
    if not ok.any():
        return why_undecodable(job.source_path)
    attrs = {k: v for k, v in job.attrs.items() if k not in stores.STORE_ATTRS} | {"skipped_patches": int((~ok).sum())}
    write(job.slide_id, attrs, {"coords": job.coords[ok], "features": features[ok]}, None, tiles)
    return None


def record_slide(report: StageReport, job: SlideJob, ok: np.ndarray, failure: str | None) -> None:
    if failure is not None:
        report.failed[job.slide_id] = failure
        return
    if not ok.all():
        warn(f"{job.slide_id}: skipped {int((~ok).sum())} of {len(ok)} patches that could not be decoded")
    report.done.append(job.slide_id)
