"""Embed every patch of a tile store with a frozen backbone into a feature store.

One DataLoader runs over the patches of all pending slides, so batches span slide boundaries
and small slides do not leave the model idle. Workers decode patches (each keeps its recent
slide handles open); the main process moves uint8 batches to the device (pinned memory,
non_blocking on CUDA), normalises there, and runs the model under inference mode (AMP and
channels_last on CUDA). Finished slides are written by a background thread while the model
goes on with the next batch.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from mil_cli import stores
from mil_cli.backbones import Backbone
from mil_cli.console import progress_bar, warn
from mil_cli.devices import autocast
from mil_cli.errors import InputError
from mil_cli.reports import StageReport
from mil_cli.slides import Slide, open_slide

FEATURE_DTYPES = {"float16": np.float16, "float32": np.float32}


@dataclass
class SlideJob:
    slide_id: str
    source_path: Path
    coords: np.ndarray
    patch_size_level0: int
    attrs: dict


class PatchDataset(Dataset):
    """Item i -> (uint8 CHW patch, slide index, 1 if decoded else 0), over all jobs' patches."""

    def __init__(self, jobs: list[SlideJob], input_size: int, open_handles: int = 2) -> None:
        self.jobs = jobs
        self.input_size = input_size
        self.offsets = np.cumsum([0] + [len(job.coords) for job in jobs])
        self.open_handles = open_handles
        self._slides: OrderedDict[Path, Slide] = OrderedDict()

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _slide(self, path: Path) -> Slide:
        if path in self._slides:
            self._slides.move_to_end(path)
        else:
            self._slides[path] = open_slide(path)
            while len(self._slides) > self.open_handles:
                self._slides.popitem(last=False)[1].close()
        return self._slides[path]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        slide_index = int(np.searchsorted(self.offsets, index, side="right") - 1)
        job = self.jobs[slide_index]
        x, y = job.coords[index - self.offsets[slide_index]]
        try:
            patch = self._slide(job.source_path).read_patch((int(x), int(y)), job.patch_size_level0,
                                                            self.input_size)
            ok = 1
        except InputError:  # a corrupt tile: skip this patch, keep the slide
            patch = np.zeros((self.input_size, self.input_size, 3), dtype=np.uint8)
            ok = 0
        return torch.from_numpy(np.require(patch, requirements=["C", "W"])).permute(2, 0, 1), slide_index, ok


class Embedder:
    """The backbone on a device, fed uint8 batches."""

    def __init__(self, backbone: Backbone, device: torch.device) -> None:
        self.device = device
        self.model = backbone.create().to(device)
        if device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.mean = torch.tensor(backbone.mean, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(backbone.std, device=device).view(1, 3, 1, 1) * 255

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device, non_blocking=True).float()
        x = (x - self.mean) / self.std
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(self.device):
            return self.model(x).float()


def default_workers() -> int:
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def _pending_jobs(tiles: stores.FeatureSource, slide_ids: list[str], report: StageReport) -> list[SlideJob]:
    jobs = []
    for slide_id in slide_ids:
        data = tiles.load(slide_id, with_features=False)
        source = Path(str(data.attrs.get("source_path", "")))
        if not source.is_file():
            report.failed[slide_id] = f"slide file {source} is gone (tile store {tiles.path})"
            continue
        jobs.append(SlideJob(slide_id, source, data.coords, int(data.attrs["patch_size_level0"]), data.attrs))
    return jobs


def embed_store(tiles_path: Path, out: Path, backbone: Backbone, device: torch.device, batch_size: int = 64,
                workers: int | None = None, dtype: str = "float16", overwrite: bool = False) -> StageReport:
    """Embed the tile store's slides into the feature store `out`, resuming unless `overwrite`."""
    start = time.perf_counter()
    report = StageReport()
    tiles = stores.FeatureSource(tiles_path, kind=stores.TILES_FORMAT)
    stores.init_store(out, stores.FEATURES_FORMAT, {"backbone": backbone.name, "dim": backbone.dim, "dtype": dtype})
    finished = set() if overwrite else stores.completed_slides(out)
    report.skipped = [s for s in tiles.slide_ids if s in finished]
    jobs = _pending_jobs(tiles, [s for s in tiles.slide_ids if s not in finished], report)
    if not jobs:
        report.seconds = time.perf_counter() - start
        return report

    embedder = Embedder(backbone, device)
    workers = default_workers() if workers is None else workers
    dataset = PatchDataset(jobs, backbone.input_size)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, pin_memory=device.type == "cuda",
                        prefetch_factor=4 if workers else None)
    pending: dict[int, list[torch.Tensor]] = {}
    decoded: dict[int, list[torch.Tensor]] = {}
    seen = np.zeros(len(jobs), dtype=np.int64)
    writes: list[Future] = []
    with ThreadPoolExecutor(max_workers=1) as writer, progress_bar() as bar:
        task = bar.add_task(f"embedding ({backbone.name}, {device})", total=len(dataset))
        for images, slide_index, ok in loader:
            features = embedder(images).cpu()
            for j in torch.unique(slide_index).tolist():
                rows = slide_index == j
                pending.setdefault(j, []).append(features[rows])
                decoded.setdefault(j, []).append(ok[rows].bool())
                seen[j] += int(rows.sum())
                if seen[j] == len(jobs[j].coords):
                    writes.append(writer.submit(_write_slide, tiles, out, jobs[j], torch.cat(pending.pop(j)).numpy(),
                                                torch.cat(decoded.pop(j)).numpy(), FEATURE_DTYPES[dtype], report))
            bar.advance(task, len(images))
        for write in writes:
            write.result()
    report.seconds = time.perf_counter() - start
    return report


def _write_slide(tiles: stores.FeatureSource, out: Path, job: SlideJob, features: np.ndarray, ok: np.ndarray,
                 dtype: type, report: StageReport) -> None:
    if not ok.any():
        report.failed[job.slide_id] = f"no patch of {job.source_path} could be decoded"
        return
    if not ok.all():
        warn(f"{job.slide_id}: skipped {int((~ok).sum())} of {len(ok)} patches that could not be decoded")
    images = tiles.images(job.slide_id)
    arrays = {"coords": job.coords[ok], "features": features[ok].astype(dtype)}
    dataset_attrs = {}
    if images is not None:
        arrays |= {"thumbnail": images.thumbnail, "tissue_mask": images.tissue_mask}
        dataset_attrs = {name: {"downsample": images.downsample} for name in ("thumbnail", "tissue_mask")}
    attrs = {k: v for k, v in job.attrs.items() if k != "complete"} | {"skipped_patches": int((~ok).sum())}
    stores.write_slide(out, job.slide_id, attrs, arrays, dataset_attrs)
    report.done.append(job.slide_id)
