"""Embed every patch of a tile store with a frozen backbone into a feature store.

Reading: patches are read in blocks (up to 4 x 4 neighbours in one region read, which is
several times cheaper than a read each) by decode processes that keep their recent slide
handles open; one pass runs over all pending slides, so batches span slide boundaries and
small slides do not leave the model idle. The main process regroups blocks into batches of
exactly `batch_size` and hands uint8 channels-last pixels to the device, which resizes (on
CUDA) and normalises them and runs the model under inference mode with channels_last (and
AMP in the backbone's preferred type on GPUs that run it natively). On CUDA the copies in and
out are asynchronous through fenced pinned buffers and IN_FLIGHT batches stay queued, so the
GPU never waits on Python (embed_blocks). Finished slides are written by a background thread.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator
from itertools import chain
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from mil_cli import stores
from mil_cli.backbones import Backbone
from mil_cli.console import progress_bar, warn
from mil_cli.devices import FLOAT16_MAX, autocast, available_cores, keep_freed_memory
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


@dataclass(frozen=True)
class BlockSpec:
    """One block of neighbouring patches of one slide, as a decode worker needs it (small:
    it travels to the worker with each request)."""

    job: int                # index of the slide's job in the run
    path: Path
    coords: np.ndarray      # (k, 2) level-0 top-lefts
    rows: np.ndarray        # (k,) rows of these patches in the slide's coords
    size_level0: int


def block_specs(jobs: list[SlideJob], span: int = BLOCK_SPAN) -> list[BlockSpec]:
    return [BlockSpec(j, job.source_path, job.coords[rows], rows, job.patch_size_level0)
            for j, job in enumerate(jobs) for rows in group_into_blocks(job.coords, job.patch_size_level0 * span)]


class BlockReader(Dataset):
    """reader[spec] -> (uint8 (k, S, S, 3) pixels, job index, rows (k,), decoded flags (k,)).
    Keyed by the spec itself rather than a position, so one set of decode processes serves any
    slides handed to it later (a Ray worker's, slide after slide). With `resize`, pixels come at
    `input_size` (torch's uint8 antialiased resize, 3x faster than PIL's: the CPU path); without,
    at the read level's own size, for the GPU to resize. Pixels stay channels-last (HWC), as
    decoded: the device takes them as they are."""

    def __init__(self, input_size: int, resize: bool, open_handles: int = 2) -> None:
        self.input_size = input_size
        self.resize = resize
        self.open_handles = open_handles
        self._slides: OrderedDict[Path, Slide] = OrderedDict()
        self._unreadable: set[Path] = set()

    def _slide(self, path: Path) -> Slide:
        if path in self._slides:
            self._slides.move_to_end(path)
        else:
            self._slides[path] = open_slide(path)
            while len(self._slides) > self.open_handles:
                self._slides.popitem(last=False)[1].close()
        return self._slides[path]

    def _read(self, spec: BlockSpec) -> tuple[np.ndarray, np.ndarray]:
        """Pixels and decoded flags. A slide that cannot be opened gives no decoded patch (not an
        exception: raised in a decode worker it would end the run, and lose its name)."""
        try:
            slide = self._slide(spec.path) if spec.path not in self._unreadable else None
        except InputError:
            self._unreadable.add(spec.path)
            slide = None
        if slide is None:
            return np.zeros((len(spec.rows), self.input_size, self.input_size, 3), np.uint8), \
                np.zeros(len(spec.rows), bool)
        try:
            return slide.read_patches_unscaled(spec.coords, spec.size_level0, self.input_size), \
                np.ones(len(spec.rows), dtype=bool)
        except InputError:  # a corrupt tile somewhere in the block: read its patches one by one
            pass
        patches, ok = [], np.ones(len(spec.rows), dtype=bool)
        for i in range(len(spec.rows)):
            try:
                patches.append(slide.read_patches_unscaled(spec.coords[i:i + 1], spec.size_level0, self.input_size)[0])
            except InputError:  # this patch is skipped and counted; the slide keeps the rest
                patches.append(None)
                ok[i] = False
        shape = next((p.shape for p in patches if p is not None), (self.input_size, self.input_size, 3))
        return np.stack([np.zeros(shape, np.uint8) if p is None else p for p in patches]), ok

    def __getitem__(self, spec: BlockSpec) -> tuple[torch.Tensor, int, torch.Tensor, torch.Tensor]:
        pixels, ok = self._read(spec)
        patches = torch.from_numpy(np.ascontiguousarray(pixels))
        if self.resize and patches.shape[1] != self.input_size:  # NCHW view of HWC memory in, HWC memory out
            patches = F.interpolate(patches.permute(0, 3, 1, 2), size=(self.input_size, self.input_size),
                                    mode="bilinear", antialias=True).permute(0, 2, 3, 1)
        return patches, spec.job, torch.from_numpy(spec.rows), torch.from_numpy(ok)


class SpecSampler(Sampler):
    """The blocks a decode loader runs over on its next pass; set anew for every pass."""

    def __init__(self) -> None:
        self.specs: list[BlockSpec] = []

    def __iter__(self) -> Iterator[BlockSpec]:
        return iter(self.specs)

    def __len__(self) -> int:
        return len(self.specs)


SHM_SHARE = 0.5        # of /dev/shm's free space that blocks waiting for the main process may take
MAX_PREFETCH = 4       # blocks each decode process works ahead


def shm_free_bytes() -> int | None:
    """Free bytes in /dev/shm, through which decode processes hand over their blocks (Docker
    gives containers 64 MB unless told otherwise); None where there is no /dev/shm."""
    try:
        stat = os.statvfs("/dev/shm")
    except OSError:
        return None
    return stat.f_bavail * stat.f_frsize


def loader_plan(workers: int, block_bytes: int, shm_free: int | None) -> tuple[int, int]:
    """(decode processes, blocks each works ahead) so the blocks in flight, workers x prefetch,
    fit in SHM_SHARE of /dev/shm: a worker that cannot allocate there dies with a bus error.
    Prefetch drops first, then workers."""
    if workers == 0 or shm_free is None:
        return workers, MAX_PREFETCH
    blocks = max(1, int(shm_free * SHM_SHARE) // max(1, block_bytes))
    workers = min(workers, blocks)
    return workers, max(1, min(MAX_PREFETCH, blocks // workers))


def default_workers(device: torch.device, cores: int | None = None) -> int:
    """Decode processes: on CUDA every core but the main process's (decoding JPEG tiles is what
    limits a GPU run). On the CPU none: the model's threads already fill every core, and block
    reads make decoding a small share of the work, so decoding inline beat 1 or 2 decode
    processes or threads on 2 cores (they cost more in contention and transfers than they
    overlap; benchmarks/embed.py)."""
    if device.type != "cuda":
        return 0
    return max(1, (cores or available_cores()) - 1)


class BlockDecoder:
    """Decodes blocks in `workers` processes (0: in this one). With `persistent`, the processes
    outlive each pass and serve slides handed over later: start() forks them at once, so a
    caller can do it before CUDA is initialised (a Ray worker, which embeds slide after slide)."""

    def __init__(self, input_size: int, resize: bool, workers: int, persistent: bool = False) -> None:
        patch_bytes = input_size * input_size * 3 * (1 if resize else 2)  # unresized reads: up to ~1.4x a side
        workers, prefetch = loader_plan(workers, BLOCK_SPAN * BLOCK_SPAN * patch_bytes, shm_free_bytes())
        self.sampler = SpecSampler()
        self.loader = DataLoader(BlockReader(input_size, resize), sampler=self.sampler, batch_size=None,
                                 num_workers=workers, prefetch_factor=prefetch if workers else None,
                                 persistent_workers=persistent and workers > 0)

    def start(self) -> None:
        """Start the decode processes now rather than at the first pass."""
        self.sampler.specs = []
        for _ in self.loader:
            pass

    def blocks(self, jobs: list[SlideJob]) -> Iterator:
        """Blocks of decoded patches of `jobs`, in no promised order."""
        self.sampler.specs = block_specs(jobs)
        return iter(self.loader)


@dataclass
class Batch:
    images: torch.Tensor       # (n, S, S, 3) uint8, channels last
    slide_index: torch.Tensor  # (n,)
    rows: torch.Tensor         # (n,) row of each patch in its slide's coords
    ok: torch.Tensor           # (n,) bool, False where the patch could not be decoded
    slot: int | None = None    # the staging buffer holding images, when a FencedRing gave it


class Fence:
    """Where a stream has got to: a CUDA event, or, on the CPU, always passed."""

    def __init__(self, device: torch.device) -> None:
        self.event = torch.cuda.Event() if device.type == "cuda" else None
        if self.event is not None:
            self.event.record(torch.cuda.current_stream(device))

    def wait(self) -> None:
        if self.event is not None:
            self.event.synchronize()


class FencedRing:
    """`count` host buffers taken in turn for copies to or from the GPU. A buffer is handed out
    again only after the fence set at its last use has passed, that is once the copy that read
    or wrote it has finished: a non_blocking copy from pinned memory returns at once, and
    refilling its buffer early would change what the GPU receives. Buffers are pinned (page-
    locked, so the copies run asynchronously) where `pinned`, and grow to the largest request."""

    def __init__(self, count: int, pinned: bool, make_fence: Callable[[], object]) -> None:
        self.pinned = pinned
        self.make_fence = make_fence
        self.buffers: list[torch.Tensor | None] = [None] * count
        self.fences: list[object | None] = [None] * count
        self.turn = 0

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[int, torch.Tensor]:
        slot = self.turn
        self.turn = (slot + 1) % len(self.buffers)
        fence, self.fences[slot] = self.fences[slot], None
        if fence is not None:
            fence.wait()
        size = int(np.prod(shape))
        buffer = self.buffers[slot]
        if buffer is None or buffer.dtype != dtype or buffer.numel() < size:
            buffer = self.buffers[slot] = torch.empty(size, dtype=dtype, pin_memory=self.pinned)
        return slot, buffer[:size].view(shape)

    def fence(self, slot: int) -> object:
        """Mark buffer `slot` busy until everything the device has queued so far is done."""
        self.fences[slot] = fence = self.make_fence()
        return fence


class Rebatcher:
    """Regroups blocks of varying size into batches of exactly `size` patches: the last may be
    smaller, and so may the batch before a block whose patches have another pixel size (slides
    read at different levels; a batch holds one size). Each batch is gathered straight into a
    buffer from `allocate(shape, dtype) -> (slot, tensor)`: a FencedRing's pinned buffers on CUDA."""

    def __init__(self, size: int, allocate: Callable[[tuple, torch.dtype], tuple[int | None, torch.Tensor]]
                 = lambda shape, dtype: (None, torch.empty(shape, dtype=dtype))) -> None:
        self.size = size
        self.allocate = allocate
        self._parts: deque[Batch] = deque()
        self._count = 0

    def add(self, images: torch.Tensor, slide_index: int, rows: torch.Tensor, ok: torch.Tensor) -> Iterator[Batch]:
        if self._parts and images.shape[1:] != self._parts[0].images.shape[1:]:
            yield from self.flush()
        self._parts.append(Batch(images, torch.full((len(images),), slide_index), rows, ok))
        self._count += len(images)
        while self._count >= self.size:
            yield self._take(self.size)

    def flush(self) -> Iterator[Batch]:
        if self._count:
            yield self._take(self._count)

    def _take(self, n: int) -> Batch:
        first = self._parts[0].images
        slot, images = self.allocate((n, *first.shape[1:]), first.dtype)
        taken: list[Batch] = []
        filled = 0
        while filled < n:
            part = self._parts[0]
            k = min(n - filled, len(part.rows))
            images[filled:filled + k].copy_(part.images[:k])
            taken.append(Batch(part.images[:k], part.slide_index[:k], part.rows[:k], part.ok[:k]))
            if k == len(part.rows):
                self._parts.popleft()
            else:
                self._parts[0] = Batch(part.images[k:], part.slide_index[k:], part.rows[k:], part.ok[k:])
            filled += k
        self._count -= n
        return Batch(images, torch.cat([t.slide_index for t in taken]), torch.cat([t.rows for t in taken]),
                     torch.cat([t.ok for t in taken]), slot)


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
    """The backbone on a device, fed uint8 channels-last batches at any pixel size: resized (on
    the GPU; the CPU path gets them resized by its reader), stain- and mean/std-normalised on
    the device, channels_last (faster on CUDA and on CPU oneDNN alike), AMP in the backbone's
    preferred type on GPUs that run it natively. With `pad_to` (under torch.compile) every batch
    is padded to that many patches, so the compiled model sees one shape and compiles once."""

    def __init__(self, backbone: Backbone, device: torch.device, weights: Path | None = None,
                 compile: bool = False, stain: str = "none", stain_target: StainTarget = BUNDLED_TARGET,
                 pad_to: int | None = None) -> None:
        keep_freed_memory()
        torch.set_flush_denormal(True)  # denormal activations cost ~15 % of CPU time, and nothing in accuracy
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # batches keep one shape: the fastest kernels are found once
        self.device = device
        self.input_size = backbone.input_size
        self.precision = backbone.precision
        self.model = backbone.create(weights).to(device).to(memory_format=torch.channels_last)
        if compile:
            self.model = torch.compile(self.model, dynamic=False)
        self.pad_to = pad_to if compile else None
        self.mean = torch.tensor(backbone.mean, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(backbone.std, device=device).view(1, 3, 1, 1) * 255
        self.stain, self.stain_target = stain, stain_target

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """(n, S, S, 3) uint8 -> (n, dim) features, on the device (reading them back is the caller's)."""
        x = images.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()  # NCHW view, channels_last memory
        if x.shape[-1] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", antialias=True)
        x = stain_normalise(x, self.stain, self.stain_target)
        x = (x - self.mean) / self.std  # element-wise ops keep channels_last
        n = len(x)
        if self.pad_to is not None and n < self.pad_to:
            x = torch.cat([x, x.new_zeros(self.pad_to - n, *x.shape[1:])]).contiguous(memory_format=torch.channels_last)
        with autocast(self.device, self.precision):
            return self.model(x)[:n]


def pending_jobs(tiles: stores.FeatureSource, finished: set[str], report: StageReport) -> list[SlideJob]:
    """The tile store's slides not in `finished`; finished ones go to report.skipped, and
    slides whose file is gone to report.failed."""
    report.skipped = [s for s in tiles.slide_ids if s in finished]
    jobs = []
    for slide_id in (s for s in tiles.slide_ids if s not in finished):
        data = tiles.load(slide_id, with_features=False)
        source = Path(str(data.attrs.get("source_path", "")))
        if not source.exists():  # a file, or a DICOM slide's folder
            report.failed[slide_id] = f"slide file {source} is gone (tile store {tiles.path})"
            continue
        jobs.append(SlideJob(slide_id, source, data.coords, int(data.attrs["patch_size_level0"]), data.attrs))
    return jobs


def warn_on_resolution(backbone: Backbone, jobs: list[SlideJob]) -> None:
    """Pathology encoders see tissue at one scale; patches at another give silently worse features."""
    off = [job for job in jobs if not backbone.fits_resolution(float(job.attrs.get("target_mpp", float("nan"))))]
    if off:
        found = sorted({f"{float(job.attrs.get('target_mpp', float('nan'))):g}" for job in off})
        warn(backbone.resolution_advice(f"{len(off)} slide(s) were tiled at {', '.join(found)} µm/px "
                                        f"(nan: no mpp in the file)"))


BUNDLED_TARGET_NAME = "bundled H&E target"  # the stain attribute's name for the default target


def feature_store_attrs(backbone: Backbone, options: EmbedOptions) -> dict:
    """What every slide of a feature store must share; a resumed run must match them."""
    return {"backbone": backbone.name, "dim": backbone.dim, "dtype": options.dtype,
            "weights": str(options.weights.resolve()) if options.weights else "default",
            "stain": options.stain if options.stain == "none" else
            f"{options.stain} ({options.stain_target.resolve() if options.stain_target else BUNDLED_TARGET_NAME})"}


def embed_options_of(attrs: dict) -> EmbedOptions:
    """The weights and stain normalisation a feature store was embedded with, read back from
    its attributes (feature_store_attrs), to embed new patches of it the same way."""
    weights = str(attrs.get("weights", "default"))
    stain, _, target = str(attrs.get("stain", "none")).partition(" (")
    target = target.removesuffix(")")
    return EmbedOptions(weights=None if weights == "default" else Path(weights), stain=stain,
                        stain_target=Path(target) if target and target != BUNDLED_TARGET_NAME else None)


def stain_target_of(options: EmbedOptions) -> StainTarget:
    """The --stain-target image's statistics (a one-line error when it is unreadable), else the bundled target."""
    return load_target(options.stain_target) if options.stain_target else BUNDLED_TARGET


def build_embedder(backbone: Backbone, device: torch.device, options: EmbedOptions,
                   target: StainTarget | None = None) -> Embedder:
    target = target or stain_target_of(options)
    return Embedder(backbone, device, options.weights, options.compile, options.stain, target,
                    pad_to=options.batch_size)


def decoder_for(device: torch.device, input_size: int, workers: int | None, persistent: bool = False,
                cores: int | None = None) -> BlockDecoder:
    """Decoding for embedding on `device`: resized by the reader on the CPU, on the GPU otherwise."""
    workers = default_workers(device, cores) if workers is None else workers
    return BlockDecoder(input_size, resize=device.type != "cuda", workers=workers, persistent=persistent)


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
            # the decode processes start here and decode while the model loads
            blocks = decoder_for(device, backbone.input_size, options.workers).blocks(jobs)
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
        """Place a batch's (float32) features; returns the slides it completed. Features that
        are not finite, or that the store's float16 cannot hold, end the run here with the
        reason, rather than as infinities found much later in training."""
        finished = []
        slide_index, rows, ok = batch.slide_index.numpy(), batch.rows.numpy(), batch.ok.numpy()
        self.check_range(features[ok], sorted({self.jobs[j].slide_id for j in slide_index[ok].tolist()}))
        for j in np.unique(slide_index).tolist():
            here = slide_index == j
            if j not in self.features:
                n = len(self.jobs[j].coords)
                self.features[j] = np.empty((n, features.shape[1]), dtype=self.dtype)
                self.ok[j] = np.zeros(n, dtype=bool)
            with np.errstate(over="ignore"):  # only undecoded patches, dropped later, can overflow here
                self.features[j][rows[here]] = features[here]
            self.ok[j][rows[here]] = ok[here]
            self.remaining[j] -= int(here.sum())
            if self.remaining[j] == 0:
                finished.append(j)
        return finished

    def pop(self, j: int) -> tuple[np.ndarray, np.ndarray]:
        return self.features.pop(j), self.ok.pop(j)

    def check_range(self, features: np.ndarray, slide_ids: list[str]) -> None:
        largest = float(np.abs(features).max(initial=0.0))
        where = ", ".join(slide_ids)
        if not np.isfinite(largest):
            raise MilcliError(f"the encoder gave NaN or infinite features on {where}; slides already written are kept")
        if self.dtype == np.float16 and largest > FLOAT16_MAX:
            raise MilcliError(f"the encoder's features reach {largest:.3g} on {where}, beyond float16's range "
                              f"({FLOAT16_MAX:g}): embed again with --dtype float32 (slides already written are kept)")


IN_FLIGHT = 2  # batches queued on the GPU while the oldest one's features are collected


def embed_blocks(embedder: Embedder, blocks: Iterable, jobs: list[SlideJob], options: EmbedOptions,
                 on_slide: Callable[[int, np.ndarray, np.ndarray], None],
                 on_batch: Callable[[int], None] = lambda n: None) -> None:
    """Run the model over `blocks` (from a BlockDecoder over `jobs`) in batches of exactly the
    batch size; calls on_slide(job index, features, decoded flags) as each slide completes.

    On CUDA nothing waits on the GPU but the collection of the oldest batch: pixels are gathered
    into pinned buffers and copied in without blocking, features are copied out without
    blocking into pinned buffers, and each copy-out sets a fence; a batch is collected, once
    IN_FLIGHT newer ones are queued, by waiting on its own fence alone, and a buffer is refilled
    only after the fence of its last use (FencedRing)."""
    cuda = embedder.device.type == "cuda"
    depth = IN_FLIGHT if cuda else 0
    inputs = FencedRing(depth + 1, cuda, lambda: Fence(embedder.device))
    outputs = FencedRing(depth + 1, cuda, lambda: Fence(embedder.device))
    rebatcher = Rebatcher(options.batch_size, inputs.take)
    assembly = SlideAssembly(jobs, FEATURE_DTYPES[options.dtype])
    in_flight: deque[tuple[Batch, torch.Tensor, Fence | None]] = deque()

    def collect() -> None:
        batch, features, copied = in_flight.popleft()
        if copied is not None:
            copied.wait()
        for j in assembly.add(batch, features.numpy()):
            on_slide(j, *assembly.pop(j))
        on_batch(len(batch.rows))

    batches = chain(chain.from_iterable(rebatcher.add(*block) for block in blocks), rebatcher.flush())
    for batch in batches:
        features = embedder(batch.images).float()
        inputs.fence(batch.slot)  # the pixels' buffer is free again once the GPU has read them
        if cuda:
            slot, host = outputs.take(tuple(features.shape), torch.float32)
            host.copy_(features, non_blocking=True)
            in_flight.append((batch, host, outputs.fence(slot)))
        else:
            in_flight.append((batch, features, None))
        while len(in_flight) > depth:
            collect()
    while in_flight:
        collect()


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
