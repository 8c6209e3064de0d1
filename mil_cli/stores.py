"""The HDF5 tile and feature stores (layout in DESIGN.md), and readers for feature folders
written by CLAM or TRIDENT (one `<slide_id>.h5` with `features` and `coords` per slide).

Writers go through StoreWriter (one process at a time, crash-safe part files merged by an
atomic rename). A slide group without `complete` is treated as absent and redone.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import re
import shutil
from collections.abc import Iterable
from itertools import chain
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from mil_cli import __version__
from mil_cli.console import warn
from mil_cli.errors import InputError, first_line

TILES_FORMAT = "milcli-tiles"
FEATURES_FORMAT = "milcli-features"
FORMAT_VERSION = 1
IMAGE_DATASETS = ("thumbnail", "tissue_mask")


LOCKS_UNSUPPORTED = {errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP}  # what NFS and Lustre mounts without locking say
NO_LOCKS_ADVICE = ("this filesystem does not support file locks (common on NFS and Lustre); set "
                   "HDF5_USE_FILE_LOCKING=FALSE and let one milcli command write a store at a time")


def lock_failure(message: str) -> str | None:
    """What an HDF5 locking error means for the user, from h5py's message (None: not a lock error)."""
    if "lock" not in message.lower():
        return None
    found = re.search(r"errno = (\d+)", message)
    if found and int(found.group(1)) in LOCKS_UNSUPPORTED:
        return NO_LOCKS_ADVICE
    return "in use by another process that holds its HDF5 lock (a milcli command writing it?); wait for it to finish"


def open_h5(path: Path, mode: str) -> h5py.File:
    """Open an HDF5 file, turning the usual failures into one-line errors."""
    try:
        return h5py.File(path, mode)
    except FileNotFoundError:
        raise InputError(path, "no such file") from None
    except (OSError, BlockingIOError) as exc:
        text = str(exc)
        raise InputError(path, lock_failure(text) or f"not a readable HDF5 file ({text})") from None


def _check_format(f: h5py.File, path: Path, expected: str) -> None:
    found = f.attrs.get("format")
    if found != expected:
        raise InputError(path, f"not a {expected} store (format attribute is {found!r})")
    version = int(f.attrs.get("format_version", 0))
    if version > FORMAT_VERSION:
        raise InputError(path, f"store format version {version} is newer than this milcli "
                               f"understands ({FORMAT_VERSION}); upgrade milcli")


def check_store(path: Path, kind: str, attrs: dict) -> None:
    """Fail unless the existing store `path` is a `kind` store whose fixed attributes (e.g. the
    backbone of a feature store) agree with `attrs`."""
    with open_h5(path, "r") as f:
        _check_format(f, path, kind)
        _check_attrs(path, dict(f.attrs), attrs)


def _check_attrs(where: Path, stored: dict, expected: dict) -> None:
    for key, value in expected.items():
        if key in stored and stored[key] != value:
            raise InputError(where, f"was made with {key}={stored[key]!r}, not {value!r}; "
                                    f"choose another --out or pass --overwrite")


def _write_group(group: h5py.Group, attrs: dict, arrays: dict[str, np.ndarray],
                 dataset_attrs: dict[str, dict]) -> None:
    for name, array in arrays.items():
        compress = name in IMAGE_DATASETS or name == "coords"
        dataset = group.create_dataset(name, data=array, compression="gzip" if compress else None)
        dataset.attrs.update(dataset_attrs.get(name, {}))
    group.attrs.update({k: v for k, v in attrs.items() if v is not None})
    group.attrs["complete"] = True


def _reason(exc: BaseException) -> str:
    """The system's words for a failed write: h5py wraps them as "error message = '...'"."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    found = re.search(r"error message = '([^']+)'", str(exc))
    return found.group(1) if found else first_line(exc)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class StoreWriter:
    """The single writer of a tile or feature store during one command.

    Crash safety: each finished slide is written to its own part file in `<store>.parts/`
    under a temporary name, then renamed into place, so a kill -9 loses at most the slide
    being written. Closing the writer merges the store and the parts into a new file that
    replaces the store by an atomic rename; the store on disk is therefore always a complete,
    closed HDF5 file. Parts left by a killed run count as finished and are merged by the next
    run. A lock on `<store>.lock` keeps a second process from writing the same store.
    """

    def __init__(self, path: Path, kind: str, attrs: dict, overwrite: bool = False) -> None:
        self.path = path
        self.kind = kind
        self.attrs = attrs
        self.overwrite = overwrite
        self.parts = parts_dir(path)
        self._fresh_marker = self.parts / FRESH_MARKER
        self._merging = path.with_name(path.name + ".merging")  # the next store, until renamed
        self._lock: int | None = None

    def __enter__(self) -> StoreWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.path.with_name(self.path.name + ".lock")
        try:
            self._lock = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise InputError(self.path.parent, f"cannot write here ({exc.strerror})") from None
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock)
            self._lock = None
            raise InputError(self.path, f"in use by another milcli process (it holds {lock_path}); "
                                        f"wait for it to finish or choose another --out") from None
        except OSError as exc:
            if exc.errno not in LOCKS_UNSUPPORTED:
                self._unlock()
                raise InputError(self.path, f"cannot lock {lock_path} ({exc.strerror})") from None
            warn(f"{self.path}: {NO_LOCKS_ADVICE}")  # no lock to take: go on, trusting the user
        try:
            self._prepare()
        except BaseException:
            self._unlock()
            raise
        return self

    def _prepare(self) -> None:
        if self.path.exists() and not self.overwrite and not self._fresh_marker.exists():
            check_store(self.path, self.kind, self.attrs)
        self.parts.mkdir(exist_ok=True)
        for leftover in [*self.parts.glob("*.tmp"), self._merging]:
            leftover.unlink(missing_ok=True)
        if self.overwrite:
            for part in self.parts.glob("*.h5"):
                part.unlink()
            self._fresh_marker.touch()
        for part in _part_ids(self.parts):
            with open_h5(part, "r") as f:
                _check_attrs(part, dict(f.attrs), self.attrs)

    def completed(self) -> set[str]:
        """Slides already finished: in the store (unless starting afresh) or in a part file."""
        done = set(_part_ids(self.parts).values())
        if self.path.exists() and not self._fresh_marker.exists():
            done |= completed_slides(self.path)
        return done

    def write_slide(self, slide_id: str, attrs: dict, arrays: dict[str, np.ndarray],
                    dataset_attrs: dict[str, dict] | None = None, copy_images_from: Path | None = None) -> None:
        """Write one finished slide durably (replacing an earlier part of the same slide).
        `copy_images_from`: a store whose thumbnail and tissue mask for this slide are copied
        as stored, still compressed (recompressing them cost more CPU than a slide's I/O)."""
        part = self.parts / f"{hashlib.sha1(slide_id.encode()).hexdigest()[:20]}.h5"
        tmp = part.with_suffix(".tmp")
        try:
            with open_h5(tmp, "w") as f:
                f.attrs.update(self.attrs | {"slide_id": slide_id})
                group = f.create_group("slide")
                if copy_images_from is not None:
                    with open_h5(copy_images_from, "r") as source:
                        for name in IMAGE_DATASETS:
                            if name in source["slides"][slide_id]:
                                source.copy(source["slides"][slide_id][name], group, name=name)
                _write_group(group, attrs, arrays, dataset_attrs or {})
            _fsync(tmp)
            os.replace(tmp, part)
        except (OSError, RuntimeError) as exc:  # disk full, size limit, read-only (h5py raises either)
            tmp.unlink(missing_ok=True)
            raise InputError(self.path, f"cannot write slide '{slide_id}' ({_reason(exc)}); the slides "
                                        f"finished before it are kept, rerun to resume") from None

    def __exit__(self, exc_type: type | None, *exc_info: object) -> None:
        try:
            self.merge()
        except (OSError, RuntimeError, InputError) as exc:
            if exc_type is None:  # else the error already under way is the one to report
                raise InputError(self.path, f"cannot update the store ({_reason(exc)}); it is unchanged and "
                                            f"the finished slides wait in {self.parts} for the next run") from None
        finally:
            self._unlock()

    def merge(self) -> None:
        """Fold the part files into the store: build a new file, then rename it over the old."""
        parts = _part_ids(self.parts)
        fresh = self._fresh_marker.exists()
        if not parts and self.path.exists() and not fresh:
            shutil.rmtree(self.parts, ignore_errors=True)
            return
        merged = self._merging
        replaced = set(parts.values())
        try:
            base = self.path if self.path.exists() and not fresh else None
            with open_h5(merged, "w") as new:
                root = {"format": self.kind, "format_version": FORMAT_VERSION,
                        "milcli_version": __version__} | self.attrs
                if base is not None:
                    with open_h5(base, "r") as old:
                        root = dict(old.attrs)
                        slides = new.create_group("slides")
                        for slide_id, group in old.get("slides", {}).items():
                            if slide_id not in replaced and group.attrs.get("complete", False):
                                old.copy(group, slides, name=slide_id)
                new.attrs.update(root)
                slides = new.require_group("slides")
                for part, slide_id in parts.items():
                    with open_h5(part, "r") as f:
                        f.copy(f["slide"], slides, name=slide_id)
            _fsync(merged)
            os.replace(merged, self.path)  # the only moment the store changes, and it is atomic
            _fsync(self.path.parent)
        except BaseException:
            merged.unlink(missing_ok=True)  # the store and the parts are untouched
            raise
        shutil.rmtree(self.parts, ignore_errors=True)

    def _unlock(self) -> None:
        if self._lock is not None:
            os.close(self._lock)  # closing the descriptor releases its flock (and works where locks do not)
            self._lock = None


FRESH_MARKER = "overwrite"  # in the parts folder: the parts replace the whole store


def parts_dir(path: Path) -> Path:
    return path.with_name(path.name + ".parts")


def _part_ids(folder: Path) -> dict[Path, str]:
    """Part file -> slide id, for the finished part files in `folder`."""
    ids = {}
    for part in sorted(folder.glob("*.h5")) if folder.is_dir() else []:
        try:
            with h5py.File(part, "r") as f:
                ids[part] = str(f.attrs["slide_id"])
        except (OSError, KeyError):  # not a finished part: its slide will be redone
            part.unlink(missing_ok=True)
    return ids


def write_feature_store(path: Path, bags: Iterable[tuple[str, np.ndarray, np.ndarray]], backbone: str) -> None:
    """A feature store from (slide_id, coords, features) triples: features that come from
    elsewhere than `milcli embed` (benchmarks, tests, other tools)."""
    bags = iter(bags)
    first = next(bags, None)
    attrs = {"backbone": backbone}
    if first is not None:
        attrs |= {"dim": int(first[2].shape[1]), "dtype": str(first[2].dtype)}
    with StoreWriter(path, FEATURES_FORMAT, attrs, overwrite=True) as writer:
        for slide_id, coords, features in chain([first] if first is not None else [], bags):
            writer.write_slide(slide_id, {"patch_size_level0": 1}, {"coords": coords, "features": features})


def completed_slides(path: Path) -> set[str]:
    """Ids of the slides whose writing finished."""
    if not path.exists():
        return set()
    with open_h5(path, "r") as f:
        slides = f.get("slides", {})
        return {sid for sid, group in slides.items() if group.attrs.get("complete", False)}


@dataclass
class SlideData:
    """One slide's patches as read back from a store."""

    slide_id: str
    coords: np.ndarray            # (N, 2) int64
    attrs: dict
    features: np.ndarray | None = None   # (N, D) float32


@dataclass
class SlideImages:
    thumbnail: np.ndarray
    tissue_mask: np.ndarray
    downsample: float


def _validated(path: Path, slide_id: str, group: h5py.Group, with_features: bool) -> SlideData:
    where = f"{path} [{slide_id}]"
    if "coords" not in group:
        raise InputError(where, "has no 'coords' dataset")
    coords = group["coords"]
    if coords.ndim != 2 or coords.shape[1] != 2 or not np.issubdtype(coords.dtype, np.number):
        raise InputError(where, f"'coords' must be an (N, 2) numeric array, not {coords.shape} {coords.dtype}")
    attrs = dict(group.attrs) | dict(coords.attrs)
    data = SlideData(slide_id=slide_id, coords=coords[()].astype(np.int64), attrs=attrs)
    if with_features:
        if "features" not in group:
            raise InputError(where, "has no 'features' dataset")
        feats = group["features"]
        if feats.ndim == 3 and feats.shape[0] == 1:  # some tools keep a leading batch axis
            array = feats[0]
        elif feats.ndim == 2:
            array = feats[()]
        else:
            raise InputError(where, f"'features' must be (N, D), not {feats.shape}")
        if not np.issubdtype(array.dtype, np.floating):
            raise InputError(where, f"'features' must be floating point, not {array.dtype}")
        if len(array) != len(data.coords):
            raise InputError(where, f"{len(array)} feature rows but {len(data.coords)} coords")
        if not np.isfinite(array).all():
            raise InputError(where, "features contain NaN or Inf")
        data.features = array.astype(np.float32)
    return data


class FeatureSource:
    """Read slides from a milcli store (`.h5`) or a folder of per-slide `.h5` files."""

    def __init__(self, path: Path, kind: str = FEATURES_FORMAT) -> None:
        self.path = path
        self.kind = kind
        self.is_folder = path.is_dir()
        if self.is_folder:
            self._files = {p.stem: p for p in sorted(path.glob("*.h5"))}
            if not self._files:
                raise InputError(path, "folder holds no .h5 feature files")
            self.attrs: dict = {}
            self.slide_ids = sorted(self._files)
        else:
            with open_h5(path, "r") as f:
                _check_format(f, path, kind)
                self.attrs = dict(f.attrs)
                slides = f.get("slides", {})
                self.slide_ids = sorted(sid for sid, g in slides.items() if g.attrs.get("complete", False))
            waiting = len(list(parts_dir(path).glob("*.h5")))
            if waiting:
                warn(f"{path}: {waiting} finished slide(s) of an interrupted run wait in {parts_dir(path)}; "
                     f"rerun that command to merge them")

    def load(self, slide_id: str, with_features: bool = True) -> SlideData:
        if slide_id not in self.slide_ids:
            raise InputError(self.path, f"has no slide '{slide_id}'")
        if self.is_folder:
            file = self._files[slide_id]
            with open_h5(file, "r") as f:
                return _validated(file, slide_id, f, with_features)
        with open_h5(self.path, "r") as f:
            return _validated(self.path, slide_id, f["slides"][slide_id], with_features)

    def images(self, slide_id: str) -> SlideImages | None:
        """The stored thumbnail and tissue mask, when the store has them."""
        if self.is_folder:
            return None
        with open_h5(self.path, "r") as f:
            group = f["slides"][slide_id]
            if "thumbnail" not in group or "tissue_mask" not in group:
                return None
            thumb = group["thumbnail"]
            return SlideImages(thumbnail=thumb[()], tissue_mask=group["tissue_mask"][()].astype(bool),
                               downsample=float(thumb.attrs["downsample"]))

    def feature_dim(self) -> int:
        """The store's `dim` attribute, else the width of its first slide's features."""
        if "dim" in self.attrs:
            try:
                return int(self.attrs["dim"])
            except (TypeError, ValueError):
                raise InputError(self.path, f"its 'dim' attribute {self.attrs['dim']!r} is not a number") from None
        if not self.slide_ids:
            raise InputError(self.path, "holds no finished slides")
        first = self.load(self.slide_ids[0]).features
        assert first is not None
        return int(first.shape[1])


def require_file(path: Path, option: str) -> Path:
    """Fail with a one-line error naming the option to pass when a default input is absent."""
    if not path.exists():
        raise InputError(path, f"no such file (pass {option} to name it)")
    return path
