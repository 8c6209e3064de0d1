"""Embed and predict on a Ray cluster (`--ray ADDRESS`; the `milcli[ray]` extra).

Slides go to long-lived worker actors, each holding one backbone on the GPU share Ray gave it
(`num_gpus = 1 / workers_per_gpu`) or on its CPUs. A worker reads its slide's pixels itself,
from the path the tile store records, so every node must see the slides and the stores at the
same paths (a shared filesystem). Where a worker also sees the feature store's slide folder
(checked with a probe file the driver writes there), it writes each slide's file itself
(temporary name, then rename, as a local run does) and only the slide's id travels back; the
driver records it and keeps the index. Where it does not, the features travel back through
Ray's object store (10,000 patches x 1280 dims in float16 is 25 MB) and the driver writes them
through the same StoreWriter as a local run. A worker killed mid-slide is restarted by Ray and
the slide retried (actor restarts and task retries).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import secrets
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from mil_cli import stores
from mil_cli.backbones import get_backbone
from mil_cli.console import progress_bar
from mil_cli.embedding import (EmbedOptions, SlideJob, build_embedder, decoder_for, embed_blocks, feature_store_attrs,
                               pending_jobs, record_slide, write_slide)
from mil_cli.errors import InputError, MilcliError, first_line
from mil_cli.inference import (LoadedModel, Prediction, bag_slides, check_compatible, check_unique_slides,
                               load_models, predict_slides)
from mil_cli.reports import StageReport

LOCAL = "local"      # --ray local: start a private Ray instance inside this process
RETRIES = 3          # restarts of a dead worker, and retries of the slide it was on
QUEUED_PER_WORKER = 2  # slides handed to a worker ahead, so it never waits on the driver


@dataclass(frozen=True)
class RayOptions:
    address: str = LOCAL           # "local" (this machine's Ray, started here if none runs), "auto" or host:port
    workers: int | None = None     # None: GPUs x workers_per_gpu, or one per 4 CPUs on a CPU-only cluster
    workers_per_gpu: int = 1


def import_ray() -> Any:
    """The ray module, or a one-line error saying how to install it."""
    if "RAY_AUTH_MODE" not in os.environ and _auth_token_available():
        # as `ray start` does, and before Ray reads its config: token clusters need it, others ignore it
        os.environ["RAY_AUTH_MODE"] = "token"
    try:
        import ray
    except ImportError:
        raise MilcliError("--ray needs Ray, an optional extra: pip install 'milcli[ray]'") from None
    return ray


def connect(address: str) -> Any:
    """Join the Ray cluster at `address` (or start a local one); returns the ray module."""
    ray = import_ray()
    if not ray.is_initialized():
        check_reachable(address)
        try:
            # log_to_driver off: Ray would echo every worker's output on this process's stdout;
            # failures come back as exceptions (Ray's own messages: see joined)
            ray.init(address=None if address == LOCAL else address, include_dashboard=False,
                     logging_level=logging.WARNING, configure_logging=False, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise MilcliError(f"--ray {address}: cannot join the Ray cluster ({first_line(exc)}); a cluster with "
                              "token authentication also needs its token in RAY_AUTH_TOKEN or ~/.ray/auth_token") from None
    return ray


@contextlib.contextmanager
def joined(address: str) -> Iterator[Any]:
    """Ray for the length of one command: joined (or started) here, and left at the end unless
    it already ran in this process. Ray prints its own messages (a task retried, a worker died)
    on stdout from a thread of this process: meanwhile they go to stderr, so that they never mix
    into `--json` output."""
    ray = import_ray()
    started_here = not ray.is_initialized()
    with contextlib.redirect_stdout(sys.stderr):
        connect(address)
        try:
            yield ray
        finally:
            if started_here:
                ray.shutdown()


def check_reachable(address: str) -> None:
    """Fail at once when nothing listens at host:port: Ray itself retries for minutes."""
    if address in (LOCAL, "auto"):
        return
    host, _, port = address.rpartition("://")[2].rpartition(":")
    if not host or not port.isdigit():
        return  # not host:port; Ray will say what is wrong with it
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as exc:
        raise MilcliError(f"--ray {address}: no Ray head answers there ({exc.strerror or first_line(exc)})") from None


def _auth_token_available() -> bool:
    return bool(os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")
                or (Path.home() / ".ray" / "auth_token").is_file())


def worker_resources(ray: Any, options: RayOptions) -> tuple[int, dict]:
    """How many workers to start and the resources each asks Ray for."""
    if options.workers_per_gpu < 1 or (options.workers is not None and options.workers < 1):
        raise MilcliError("--ray-workers and --workers-per-gpu must be at least 1")
    cluster = ray.cluster_resources()
    gpus, cpus = int(cluster.get("GPU", 0)), max(1, int(cluster.get("CPU", 1)))
    if gpus:  # a GPU worker's CPUs are its decode processes (and itself): they are what feeds the GPU
        count = options.workers or gpus * options.workers_per_gpu
        return count, {"num_gpus": 1.0 / options.workers_per_gpu, "num_cpus": max(1, cpus // count)}
    count = options.workers or max(1, cpus // 4)
    return count, {"num_cpus": max(1, cpus // count)}


def assigned_device() -> torch.device:
    """Inside a Ray worker: the GPU Ray assigned it (it sets CUDA_VISIBLE_DEVICES), else the CPU."""
    import ray

    return torch.device("cuda") if ray.get_gpu_ids() else torch.device("cpu")


@dataclass(frozen=True)
class StoreTarget:
    """The feature store as workers see it: they write slide files into `folder` themselves
    when they can read the driver's probe file there (a shared filesystem)."""

    folder: Path
    root_attrs: dict
    tiles: Path
    probe: Path
    token: str

    def shared(self) -> bool:
        try:
            return self.probe.read_text() == self.token
        except OSError:
            return False


class SlideWorker:
    """A Ray actor: one backbone on the device Ray assigned, embedding whole slides. Its decode
    processes (on a GPU: one per CPU Ray gave it, but its own) are forked once, before CUDA is
    initialised in it, and serve every slide it is given."""

    def __init__(self, backbone_name: str, options: EmbedOptions, cpus: int, target: StoreTarget) -> None:
        self.device = assigned_device()
        if self.device.type == "cpu":
            torch.set_num_threads(cpus)
        self.backbone = get_backbone(backbone_name)
        self.options = options
        self.decoder = decoder_for(self.device, self.backbone.input_size, options.workers, persistent=True, cores=cpus)
        self.decoder.start()
        self.embedder = build_embedder(self.backbone, self.device, options)
        self.write = None
        if target.shared():
            self.tiles = stores.FeatureSource(target.tiles, kind=stores.TILES_FORMAT)
            self.write = partial(stores.write_slide_file, target.folder, target.root_attrs)

    def embed(self, job: SlideJob) -> tuple[np.ndarray | None, np.ndarray, str | None]:
        """(features in coords order, which patches decoded, None) for the driver to store; or,
        writing to a shared store, (None, which patches decoded, why it failed or None)."""
        stores.fault_point(f"ray-embed-{job.slide_id}")
        result: list[tuple[np.ndarray, np.ndarray]] = []
        embed_blocks(self.embedder, self.decoder.blocks([job]), [job], self.options,
                     lambda _, features, ok: result.append((features, ok)))
        features, ok = result[0]
        if self.write is None:
            return features, ok, None
        return None, ok, write_slide(self.tiles, self.write, job, features, ok)


def ray_embed_store(tiles_path: Path, out: Path, backbone_name: str, options: EmbedOptions, cluster: RayOptions,
                    overwrite: bool = False) -> StageReport:
    """embed_store's work spread over Ray workers; the same store."""
    start = time.perf_counter()
    report = StageReport()
    import_ray()  # before any work: a missing extra or a wrong address is a one-line error
    check_reachable(cluster.address)
    tiles = stores.FeatureSource(tiles_path, kind=stores.TILES_FORMAT)
    backbone = get_backbone(backbone_name)
    with stores.StoreWriter(out, stores.FEATURES_FORMAT, feature_store_attrs(backbone, options), overwrite) as writer:
        jobs = pending_jobs(tiles, writer.completed(), report)
        if jobs:
            with joined(cluster.address) as ray:
                _embed_on_workers(ray, jobs, tiles, tiles_path, writer, backbone_name, options, cluster, report)
    report.seconds = time.perf_counter() - start
    return report


def _embed_on_workers(ray: Any, jobs: list[SlideJob], tiles: stores.FeatureSource, tiles_path: Path,
                      writer: stores.StoreWriter, backbone_name: str, options: EmbedOptions, cluster: RayOptions,
                      report: StageReport) -> None:
    """Start the workers, hand them the slides, and kill them whatever happens."""
    count, resources = worker_resources(ray, cluster)
    actor = ray.remote(SlideWorker).options(**resources, max_restarts=RETRIES, max_task_retries=RETRIES)
    # workers do not share this process's working folder
    options = replace(options, weights=options.weights and options.weights.resolve(),
                      stain_target=options.stain_target and options.stain_target.resolve())
    token = secrets.token_hex(8)
    target = StoreTarget(writer.folder.resolve(), writer.root_attrs, tiles_path.resolve(),
                         writer.folder.resolve() / f".probe-{token}", token)
    target.probe.write_text(token)
    workers = []
    try:
        workers = [actor.remote(backbone_name, options, int(resources["num_cpus"]), target)
                   for _ in range(min(count, len(jobs)))]
        _dispatch(ray, workers, jobs, tiles, writer, report, f"embedding ({backbone_name}, Ray x{len(workers)})")
    finally:
        target.probe.unlink(missing_ok=True)
        for worker in workers:
            ray.kill(worker)


class Call(NamedTuple):
    order: int      # when it was handed out
    job: SlideJob
    worker: Any


def _dispatch(ray: Any, workers: list, jobs: list[SlideJob], tiles: stores.FeatureSource, writer: stores.StoreWriter,
              report: StageReport, label: str) -> None:
    """Keep every live worker QUEUED_PER_WORKER slides ahead; store or record each slide as it
    comes back. A worker that died more often than Ray restarts it is dropped: the slide it was
    on (its oldest: an actor runs its calls in order) fails, and the slides queued behind it go
    to the workers still alive."""
    queue = list(reversed(jobs))
    running: dict[Any, Call] = {}  # Ray's reference to each call -> the call
    alive = list(workers)
    order = itertools.count()

    def hand_out(worker: Any) -> None:
        if queue and worker in alive:
            job = queue.pop()
            running[worker.embed.remote(job)] = Call(next(order), job, worker)

    def drop(worker: Any, why: str) -> None:
        """The worker is gone: fail its oldest slide, requeue the rest, keep the others busy."""
        alive.remove(worker)
        lost = sorted((call for call in running.values() if call.worker is worker), key=lambda call: call.order)
        for ref in [ref for ref, call in running.items() if call.worker is worker]:
            del running[ref]
        report.failed[lost[0].job.slide_id] = why
        queue.extend(call.job for call in reversed(lost[1:]))
        if not alive:
            for job in reversed(queue):
                report.failed[job.slide_id] = f"every Ray worker was lost ({why})"
            queue.clear()
        for other in alive:
            while queue and sum(call.worker is other for call in running.values()) < QUEUED_PER_WORKER:
                hand_out(other)

    for worker in workers:
        for _ in range(QUEUED_PER_WORKER):
            hand_out(worker)
    with progress_bar() as bar:
        task = bar.add_task(label, total=len(jobs))
        while running:
            [done], _ = ray.wait(list(running), num_returns=1)
            job, worker = running[done].job, running[done].worker
            try:
                features, ok, failure = ray.get(done)
            except ray.exceptions.RayActorError as exc:  # the worker died more often than it may restart
                drop(worker, f"Ray worker lost after {RETRIES} restarts ({first_line(exc)})")
                bar.update(task, completed=len(report.done) + len(report.failed))
                continue  # its calls are out of `running` already
            except ray.exceptions.RayTaskError as exc:  # the slide itself failed inside the worker
                report.failed[job.slide_id] = first_line(exc.cause or exc)
            except ray.exceptions.RayError as exc:  # anything else Ray could not deliver (a lost object, say)
                report.failed[job.slide_id] = f"Ray: {first_line(exc)}"
            else:
                if features is not None:
                    failure = write_slide(tiles, writer.write_slide, job, features, ok)
                elif failure is None:
                    writer.recorded()
                    report.counts["written_by_workers"] = report.counts.get("written_by_workers", 0) + 1
                record_slide(report, job, ok, failure)
            del running[done]
            hand_out(worker)
            bar.update(task, completed=len(report.done) + len(report.failed))


def ray_predict_stores(model: Path, models: list[LoadedModel], sources: list[stores.FeatureSource],
                       cluster: RayOptions) -> list[Prediction]:
    """predict_stores with one Ray task per store (each loads `model` itself); `models`, loaded
    here, vets the model and the stores before any task starts. Predictions in store order."""
    check_unique_slides(sources)
    bag_slides(models, [], None)  # patient-level models need the labels' patients: refused here, before Ray
    for source in sources:
        check_compatible(models, source)
    results = []
    with joined(cluster.address) as ray:
        _, resources = worker_resources(ray, cluster)
        task = ray.remote(_predict_store).options(**resources, max_retries=RETRIES)
        refs = [task.remote(model.resolve(), source.path.resolve()) for source in sources]
        for source, ref in zip(sources, refs):
            try:
                results.extend(ray.get(ref))
            except ray.exceptions.RayTaskError as exc:
                if isinstance(exc.cause, MilcliError):
                    raise exc.cause from None
                raise InputError(source.path, first_line(exc.cause or exc)) from None
            except ray.exceptions.RayError as exc:  # a worker or node lost for good
                raise InputError(source.path, f"Ray: {first_line(exc)}") from None
    return results


def _predict_store(model: Path, path: Path) -> list[Prediction]:
    device = assigned_device()
    models = load_models(model, device)
    source = stores.FeatureSource(path)
    return predict_slides(models, source, bag_slides(models, source.slide_ids, None), device)
