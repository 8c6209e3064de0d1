"""The HDF5 tile and feature stores (layout in DESIGN.md), and readers for feature folders
written by CLAM or TRIDENT (one `<slide_id>.h5` with `features` and `coords` per slide).

A store is two things side by side: `feats.h5`, a small index (the store's attributes and,
under `/slides/<slide_id>`, an HDF5 external link to each slide's file), and the folder
`feats.slides/` holding one file per finished slide (`features`, `coords`, thumbnail and
tissue mask at its root, the slide's attributes on it: the CLAM/TRIDENT per-slide layout).
Why: writing a slide costs that slide only (a temporary file, fsync, rename), whatever the
store holds; a kill -9 loses at most the slide being written; readers list the folder, so
every finished slide is readable at every instant, also while another process is still
adding slides. The index is rewritten (atomically) when a writer opens and closes and every
INDEX_REFRESH_S seconds between, so that h5py users following its links see progress too.
Stores of format version 1 (every slide inside the one file) are read as they are, and moved
to this layout by the first command that adds slides to them.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
import signal
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import h5py
import numpy as np

from mil_cli import __version__
from mil_cli.console import warn
from mil_cli.errors import InputError, first_line

TILES_FORMAT = "milcli-tiles"
FEATURES_FORMAT = "milcli-features"
FORMAT_VERSION = 2        # 2: an index of external links plus one file per slide; 1: one file
IMAGE_DATASETS = ("thumbnail", "tissue_mask")  # copied from the tile store into the feature store
COMPRESSED = ("coords", "thumbnail", "tissue_mask", "ink_mask")
STORE_ATTRS = ("format", "format_version", "milcli_version", "slide_id", "complete")  # on every slide file
INDEX_REFRESH_S = 30.0    # while a writer runs, the index is brought up to date this often


LOCKS_UNSUPPORTED = {errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP}  # what NFS and Lustre mounts without locking say
NO_LOCKS_ADVICE = ("this filesystem does not support file locks (common on NFS and Lustre); set "
                   "HDF5_USE_FILE_LOCKING=FALSE and let one milcli command write a store at a time")


KILL_AT = "MILCLI_KILL_AT"  # tests of crash safety: "<point>:<n>[:<arming file>]", see fault_point
_reached: Counter[str] = Counter()


def fault_point(point: str) -> None:
    """With MILCLI_KILL_AT=<point>:<n> in the environment, SIGKILL this process the n-th time
    it reaches `point`, so that tests kill a writer at a known moment (mid-write, between
    slides) instead of by timing luck. With a third field, an arming file's path, the kill
    fires only in the process that removes that file first: one kill per arming, however
    many processes (restarted Ray workers) reach the point. Points: slide-writing (a slide's
    temporary file half written), slide-written (just renamed into place), index-writing (the
    temporary index half written), ray-embed-<slide id> (a Ray worker starting on that slide)."""
    name, _, rest = os.environ.get(KILL_AT, "").partition(":")
    if name != point:
        return
    count, _, arming = rest.partition(":")
    _reached[point] += 1
    if _reached[point] != int(count or 1):
        return
    if arming:
        try:
            os.remove(arming)
        except FileNotFoundError:
            return  # not armed, or another process took the kill
    os.kill(os.getpid(), signal.SIGKILL)


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


def slides_dir(path: Path) -> Path:
    """The folder of per-slide files beside the index `path` (feats.h5 -> feats.slides)."""
    return path.with_name(path.stem + ".slides")


def slide_file_name(slide_id: str) -> str:
    """`<slide_id>.h5` where the id is a safe file name (the CLAM/TRIDENT convention); other ids
    get a cleaned name plus their UTF-8 bytes in hex after '~', so the name alone gives the id
    back (listing the folder is all a resume needs)."""
    cleaned = re.sub(r"[^A-Za-z0-9._+-]", "_", slide_id).lstrip(".")
    if cleaned == slide_id and slide_id:
        return f"{slide_id}.h5"
    return f"{cleaned[:60]}~{slide_id.encode().hex()}.h5"


def slide_id_of(file: Path) -> str:
    """The inverse of slide_file_name (a name it did not make: the file's stem)."""
    stem = file.stem
    if "~" in stem:
        try:
            return bytes.fromhex(stem.rsplit("~", 1)[1]).decode()
        except ValueError:
            pass
    return stem


def _finished_files(folder: Path) -> dict[str, Path]:
    """slide id -> file, for the finished slide files in `folder` (temporary files end in .tmp)."""
    if not folder.is_dir():
        return {}
    return {slide_id_of(folder / name): folder / name for name in os.listdir(folder) if name.endswith(".h5")}


def _check_format(f: h5py.File, path: Path, expected: str) -> int:
    found = f.attrs.get("format")
    if found != expected:
        raise InputError(path, f"not a {expected} store (format attribute is {found!r})")
    version = int(f.attrs.get("format_version", 0))
    if version > FORMAT_VERSION:
        raise InputError(path, f"store format version {version} is newer than this milcli "
                               f"understands ({FORMAT_VERSION}); upgrade milcli")
    return version


IMPLIED_ATTRS = {"stain": "none"}  # what stores written before an attribute existed hold without saying


def _check_attrs(where: Path, stored: dict, expected: dict) -> None:
    stored = IMPLIED_ATTRS | stored
    for key, value in expected.items():
        if key in stored and stored[key] != value:
            keep = f"pass --backbone {stored[key]} to add to it, " if key == "backbone" else ""
            raise InputError(where, f"was made with {key}={stored[key]!r}, not {value!r}; "
                                    f"{keep}choose another --out or pass --overwrite")


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


def _replace_durably(tmp: Path, final: Path) -> None:
    _fsync(tmp)
    os.replace(tmp, final)  # readers see the old file or the new one, never a part of one


def write_slide_file(folder: Path, store_attrs: dict, slide_id: str, attrs: dict, arrays: dict[str, np.ndarray],
                     dataset_attrs: dict[str, dict] | None = None, images_from: FeatureSource | None = None) -> Path:
    """Write one finished slide as its own file in `folder` (temporary name, fsync, rename).
    `images_from`: a store whose thumbnail and tissue mask for this slide are copied as stored,
    still compressed (recompressing them cost more CPU than a slide's I/O). Safe to call from
    several processes at once for different slides (Ray workers on a shared filesystem)."""
    final = folder / slide_file_name(slide_id)
    tmp = final.with_name(f"{final.name}.{os.getpid()}.tmp")
    try:
        with open_h5(tmp, "w") as f:
            if images_from is not None:
                with images_from.slide_group(slide_id) as source:
                    for name in IMAGE_DATASETS:
                        if name in source:
                            source.file.copy(source[name], f, name=name)
            for name, array in arrays.items():
                dataset = f.create_dataset(name, data=array, compression="gzip" if name in COMPRESSED else None)
                dataset.attrs.update((dataset_attrs or {}).get(name, {}))
                fault_point("slide-writing")
            f.attrs.update({k: v for k, v in attrs.items() if v is not None})
            f.attrs.update(store_attrs | {"slide_id": slide_id, "complete": True})
        _replace_durably(tmp, final)
        fault_point("slide-written")
    except (OSError, RuntimeError) as exc:  # disk full, size limit, read-only (h5py raises either)
        tmp.unlink(missing_ok=True)
        raise InputError(folder, f"cannot write slide '{slide_id}' ({_reason(exc)}); the slides "
                                 f"finished before it are kept, rerun to resume") from None
    return final


def write_index(path: Path, root_attrs: dict, folder: Path) -> None:
    """(Re)write the index `path`: the store's attributes and a link to each finished slide's
    file. It holds no data, so this costs O(slides) in metadata, never O(bytes stored)."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open_h5(tmp, "w") as f:
            f.attrs.update(root_attrs | {"slides_folder": folder.name})
            slides = f.create_group("slides")
            for slide_id, file in sorted(_finished_files(folder).items()):
                slides[slide_id] = h5py.ExternalLink(f"{folder.name}/{file.name}", "/")
            fault_point("index-writing")
        _replace_durably(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class StoreWriter:
    """The single writer of a tile or feature store during one command (the layout is in the
    module docstring). A lock on `<store>.lock` keeps a second writer out."""

    def __init__(self, path: Path, kind: str, attrs: dict, overwrite: bool = False) -> None:
        self.path = path
        self.kind = kind
        self.attrs = attrs
        self.overwrite = overwrite
        self.folder = slides_dir(path)
        self.root_attrs = {"format": kind, "format_version": FORMAT_VERSION, "milcli_version": __version__} | attrs
        self._lock: int | None = None
        self._indexed_at = 0.0

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
            self._unlock()
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
        if self.overwrite:
            shutil.rmtree(self.folder, ignore_errors=True)
        elif self.path.exists():
            self._check_existing()
        self.folder.mkdir(exist_ok=True)
        for leftover in chain(self.folder.glob("*.tmp"), self.path.parent.glob(f"{self.path.name}.*.tmp")):
            leftover.unlink(missing_ok=True)  # a killed writer's unfinished slide or index
        self._refresh_index()  # the store exists (and opens) from now on

    def _check_existing(self) -> None:
        """Refuse a store made otherwise (unless it holds no slide yet: a run that wrote
        nothing must not block the next); move a version-1 store to the per-slide layout."""
        with open_h5(self.path, "r") as f:
            version = _check_format(f, self.path, self.kind)
            embedded = {sid: g for sid, g in f.get("slides", {}).items()
                        if g.attrs.get("complete", False)} if version < 2 else {}  # v2: links, not followed
            if embedded or _finished_files(self.folder):
                _check_attrs(self.path, dict(f.attrs), self.attrs)
            if embedded:
                self.folder.mkdir(exist_ok=True)
                for slide_id, group in embedded.items():
                    self._adopt(slide_id, group)

    def _adopt(self, slide_id: str, group: h5py.Group) -> None:
        final = self.folder / slide_file_name(slide_id)
        tmp = final.with_name(final.name + ".tmp")
        with open_h5(tmp, "w") as f:
            for name, item in group.items():
                group.file.copy(item, f, name=name)
            f.attrs.update(self.root_attrs | dict(group.attrs) | {"slide_id": slide_id})
        _replace_durably(tmp, final)

    def completed(self) -> set[str]:
        """Slides already finished: a listing of the slide folder."""
        return set(_finished_files(self.folder))

    def write_slide(self, slide_id: str, attrs: dict, arrays: dict[str, np.ndarray],
                    dataset_attrs: dict[str, dict] | None = None, images_from: FeatureSource | None = None) -> None:
        """Write one finished slide durably (replacing an earlier file of the same slide)."""
        write_slide_file(self.folder, self.root_attrs, slide_id, attrs, arrays, dataset_attrs, images_from)
        self.recorded()

    def recorded(self) -> None:
        """A slide file was added (here or by a worker sharing the filesystem): refresh the
        index when it is older than INDEX_REFRESH_S."""
        if time.monotonic() - self._indexed_at > INDEX_REFRESH_S:
            self._refresh_index()

    def _refresh_index(self) -> None:
        write_index(self.path, self.root_attrs, self.folder)
        self._indexed_at = time.monotonic()

    def __exit__(self, exc_type: type | None, *exc_info: object) -> None:
        try:
            self._refresh_index()
        except (OSError, RuntimeError, InputError) as exc:
            if exc_type is None:  # else the error already under way is the one to report
                raise InputError(self.path, f"cannot update the index ({_reason(exc)}); every finished slide "
                                            f"is kept in {self.folder} and read from there") from None
        finally:
            self._unlock()

    def _unlock(self) -> None:
        if self._lock is not None:
            os.close(self._lock)  # closing the descriptor releases its flock (and works where locks do not)
            self._lock = None


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


def _validated(where: str, slide_id: str, group: h5py.Group, with_features: bool) -> SlideData:
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
    """Read slides from a milcli store (the `.h5` index and its slide folder, or a version-1
    single file) or from a folder of per-slide `.h5` files (CLAM, TRIDENT). The slides are
    those finished when it was opened."""

    def __init__(self, path: Path, kind: str = FEATURES_FORMAT) -> None:
        self.path = path
        self.kind = kind
        self.attrs: dict = {}
        self._files: dict[str, Path] = {}  # slide id -> its own file (empty for a version-1 store)
        if path.is_dir():
            self._files = _finished_files(path)
            if not self._files:
                raise InputError(path, "folder holds no .h5 feature files")
            ids: Iterable[str] = self._files
        else:
            with open_h5(path, "r") as f:
                version = _check_format(f, path, kind)
                self.attrs = dict(f.attrs)
                ids = [sid for sid, g in f.get("slides", {}).items() if g.attrs.get("complete", False)] \
                    if version < 2 else []
            if version >= 2:
                folder = slides_dir(path)
                if not folder.is_dir():
                    raise InputError(path, f"its slide folder {folder} is missing (a store is the .h5 index "
                                           f"and that folder: copy or move them together)")
                self._files = _finished_files(folder)
                ids = self._files
        self.slide_ids = sorted(ids)
        self._known = set(self.slide_ids)

    def __contains__(self, slide_id: str) -> bool:
        return slide_id in self._known

    @contextmanager
    def slide_group(self, slide_id: str) -> Iterator[h5py.Group]:
        """The open HDF5 group holding one slide's datasets and attributes."""
        if slide_id not in self._known:
            raise InputError(self.path, f"has no slide '{slide_id}'")
        file = self._files.get(slide_id, self.path)
        with open_h5(file, "r") as f:
            yield f if slide_id in self._files else f["slides"][slide_id]

    def load(self, slide_id: str, with_features: bool = True) -> SlideData:
        with self.slide_group(slide_id) as group:
            return _validated(f"{self._files.get(slide_id, self.path)} [{slide_id}]", slide_id, group, with_features)

    def images(self, slide_id: str) -> SlideImages | None:
        """The stored thumbnail and tissue mask, when the store has them."""
        with self.slide_group(slide_id) as group:
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
