"""Embedding and prediction through Ray: a real local cluster on loopback, 2 workers, features
identical to the local path, a worker killed on a slide, and `--ray local` in one process.
Skipped when the `ray` extra is not installed."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import SAMPLE
from mil_cli.stores import FeatureSource

SAMPLE_SLIDES = SAMPLE / "slides"

pytest.importorskip("ray", reason="the ray extra is not installed (pip install 'milcli[ray]')")
pytestmark = pytest.mark.xdist_group("ray")  # one worker runs these one after another: `--ray local` joins a running Ray

ENV = os.environ | {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}  # a private test cluster


def ray_cli(*args: str, env: dict[str, str] = ENV) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ray.scripts.scripts", *args], env=env, capture_output=True,
                          text=True, timeout=180)


def milcli(*args: object) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mil_cli", *map(str, args)], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen) -> str:
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err
    return out


def assert_same_features(store: Path, reference: Path, only: list[str] | None = None) -> None:
    ours, theirs = FeatureSource(store), FeatureSource(reference)
    assert sorted(ours.slide_ids) == sorted(only or theirs.slide_ids)
    for slide_id in ours.slide_ids:
        a, b = ours.load(slide_id), theirs.load(slide_id)
        assert np.array_equal(a.coords, b.coords) and np.array_equal(a.features, b.features), slide_id


def processes_mentioning(text: str) -> list[int]:
    """Processes whose command line contains `text`."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and text.encode() in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def with_descendants(pids: list[int]) -> list[int]:
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError, ValueError, IndexError):
            if entry.name.isdigit():  # /proc/PID/stat: "pid (name) state ppid ..."; the name may hold spaces
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
    found = list(pids)
    for pid in found:  # grows while walking: children of children
        found.extend(child for child, parent in parents.items() if parent == pid and child not in found)
    return found


KILLED_SLIDE = "slide_03"


@dataclass(frozen=True)
class Cluster:
    address: str
    arm_kill: Path  # while this file exists, the next worker to start on KILLED_SLIDE is killed (once)


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[Cluster]:
    """A private Ray head on loopback with 2 CPUs, whose workers carry a fault point a test can
    arm. Torn down by killing the processes that name its own temp folder and their descendants
    (not `ray stop`, which would also stop a Ray the user runs on this machine)."""
    from mil_cli.stores import KILL_AT

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    temp = tempfile.mkdtemp(prefix="milcli-ray-")  # short: Ray puts unix sockets under it
    arm_kill = Path(temp) / "arm-kill"
    started = ray_cli("start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port), "--num-cpus", "2",
                      "--include-dashboard", "false", "--disable-usage-stats", "--temp-dir", temp,
                      env=ENV | {KILL_AT: f"ray-embed-{KILLED_SLIDE}:1:{arm_kill}"})  # workers inherit it
    assert started.returncode == 0, started.stderr
    try:
        yield Cluster(f"127.0.0.1:{port}", arm_kill)
    finally:
        cluster = with_descendants(processes_mentioning(temp))
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in cluster:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            time.sleep(1)
        shutil.rmtree(temp, ignore_errors=True)


def split_store(store: Path, halves: tuple[Path, Path]) -> None:
    """Two feature stores holding the first and second half of `store`'s slides."""
    with h5py.File(store, "r") as source:
        ids = sorted(source["slides"])
        for path, part in zip(halves, (ids[: len(ids) // 2], ids[len(ids) // 2:])):
            with h5py.File(path, "w") as target:
                target.attrs.update(source.attrs)
                target.attrs["format_version"] = 1  # every slide inside the file, as version-1 stores were
                slides = target.create_group("slides")
                for slide_id in part:
                    source.copy(source["slides"][slide_id], slides, name=slide_id)


def test_predict_over_two_stores_with_ray_started_in_process(sample_run: Path, tmp_path: Path) -> None:
    halves = (tmp_path / "a.h5", tmp_path / "b.h5")
    split_store(sample_run / "feats.h5", halves)
    local = finish(milcli("predict", "--model", sample_run / "model.pt", "--features", sample_run / "feats.h5", "-q"))
    distributed = finish(milcli("predict", "--model", sample_run / "model.pt", "--features", halves[0],
                                "--features", halves[1], "--ray", "local", "-q"))
    assert distributed == local and len(local.splitlines()) == 21


def test_an_address_where_no_ray_runs_fails_at_once(sample_run: Path, tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # free once closed: nothing listens there
    start = time.monotonic()
    process = milcli("embed", sample_run / "tiles.h5", "--out", tmp_path / "feats.h5", "--ray", f"127.0.0.1:{port}")
    _, err = process.communicate(timeout=120)
    assert process.returncode == 2 and f"--ray 127.0.0.1:{port}: no Ray head answers there" in err
    assert time.monotonic() - start < 60 and not (tmp_path / "feats.h5").exists()


def test_embed_on_a_local_cluster_matches_the_local_path(sample_run: Path, tmp_path: Path,
                                                        ray_cluster: Cluster) -> None:
    out = tmp_path / "feats.h5"
    first = json.loads(finish(milcli("embed", sample_run / "tiles.h5", "--out", out, "--ray", ray_cluster.address,
                                     "--ray-workers", "2", "--json", "-q")))
    assert first["counts"]["written_by_workers"] == 20  # they share this filesystem: no features through Ray
    assert_same_features(out, sample_run / "feats.h5")
    rerun = json.loads(finish(milcli("embed", sample_run / "tiles.h5", "--out", out, "--ray", ray_cluster.address,
                                     "--json", "-q")))
    assert rerun["done"] == [] and len(rerun["skipped"]) == 20  # resumable like the local path


def test_workers_that_cannot_see_the_store_send_features_back(tmp_path: Path) -> None:
    from mil_cli.distributed import StoreTarget

    probe = tmp_path / ".probe-abc"
    target = StoreTarget(tmp_path, {}, tmp_path / "tiles.h5", probe, "abc")
    assert not target.shared()  # no probe where the worker looks: another filesystem
    probe.write_text("another run's token")
    assert not target.shared()
    probe.write_text("abc")
    assert target.shared()


def test_a_worker_killed_on_a_slide_is_replaced_and_the_run_completes(sample_run: Path, tmp_path: Path,
                                                                     ray_cluster: Cluster) -> None:
    """The worker that starts on KILLED_SLIDE dies there (an armed fault point, not timing);
    Ray restarts it, the slide is retried and every slide comes out as the local path's."""
    ray_cluster.arm_kill.touch()
    out = tmp_path / "feats.h5"
    report = json.loads(finish(milcli("embed", sample_run / "tiles.h5", "--out", out, "--ray", ray_cluster.address,
                                      "--ray-workers", "2", "--json", "-q")))
    assert not ray_cluster.arm_kill.exists(), "no worker reached the fault point: nothing was killed"
    assert report["failed"] == {} and len(report["done"]) == 20
    assert_same_features(out, sample_run / "feats.h5")


def test_a_worker_dead_for_good_fails_only_its_slide_and_the_others_take_the_rest(sample_run: Path,
                                                                                  tmp_path: Path) -> None:
    """Every worker that starts slide_00 dies on it (a fault point, not timing), so the worker
    that got it uses up its restarts and is dead for good. Only slide_00 may fail: the slide
    queued behind it on that worker (slide_01; slide_02 and 03 go to the other) and the slide
    handed out after (slide_04) must go to the worker still alive."""
    from mil_cli.stores import KILL_AT
    from mil_cli.tiling import TilingOptions, tile_slides

    tiles = tmp_path / "tiles.h5"
    assert tile_slides([SAMPLE_SLIDES / f"slide_0{i}.tif" for i in range(5)], tiles, TilingOptions()).ok
    process = subprocess.run([sys.executable, "-m", "mil_cli", "embed", str(tiles), "--out", str(tmp_path / "f.h5"),
                              "--ray", "local", "--ray-workers", "2", "--json", "-q"],
                             env=ENV | {KILL_AT: "ray-embed-slide_00:1"}, capture_output=True, text=True, timeout=600)
    report = json.loads(process.stdout)
    assert list(report["failed"]) == ["slide_00"] and "Ray worker lost" in report["failed"]["slide_00"]
    assert sorted(report["done"]) == [f"slide_0{i}" for i in range(1, 5)]
    assert_same_features(tmp_path / "f.h5", sample_run / "feats.h5", only=report["done"])
