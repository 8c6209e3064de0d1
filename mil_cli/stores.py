"""The HDF5 tile and feature stores (layout in DESIGN.md), and readers for feature folders
written by CLAM or TRIDENT (one `<slide_id>.h5` with `features` and `coords` per slide).

Writes go one slide at a time: the slide's group is written, then its `complete` attribute
is set, then the file is closed. A slide without `complete` is treated as absent and redone,
so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from mil_cli import __version__
from mil_cli.errors import InputError, MilcliError

TILES_FORMAT = "milcli-tiles"
FEATURES_FORMAT = "milcli-features"
FORMAT_VERSION = 1
IMAGE_DATASETS = ("thumbnail", "tissue_mask")


def open_h5(path: Path, mode: str) -> h5py.File:
    """Open an HDF5 file, turning the usual failures into one-line errors."""
    try:
        return h5py.File(path, mode)
    except FileNotFoundError:
        raise InputError(path, "no such file") from None
    except (OSError, BlockingIOError) as exc:
        text = str(exc)
        if "lock" in text.lower():
            raise InputError(path, "in use by another milcli process (HDF5 file lock)") from None
        raise InputError(path, f"not a readable HDF5 file ({text})") from None


def _check_format(f: h5py.File, path: Path, expected: str) -> None:
    found = f.attrs.get("format")
    if found != expected:
        raise InputError(path, f"not a {expected} store (format attribute is {found!r})")
    version = int(f.attrs.get("format_version", 0))
    if version > FORMAT_VERSION:
        raise InputError(path, f"store format version {version} is newer than this milcli "
                               f"understands ({FORMAT_VERSION}); upgrade milcli")


def init_store(path: Path, kind: str, attrs: dict) -> None:
    """Create the store if needed; else check it is a `kind` store whose fixed attributes
    (e.g. the backbone of a feature store) agree with `attrs`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        with open_h5(path, "r") as f:
            _check_format(f, path, kind)
            for key, value in attrs.items():
                stored = f.attrs.get(key)
                if stored is not None and stored != value:
                    raise InputError(path, f"was made with {key}={stored!r}, not {value!r}; "
                                           f"choose another --out or pass --overwrite")
        return
    with open_h5(path, "w") as f:
        f.attrs.update({"format": kind, "format_version": FORMAT_VERSION,
                        "milcli_version": __version__, **attrs})
        f.create_group("slides")


def completed_slides(path: Path) -> set[str]:
    """Ids of the slides whose writing finished."""
    if not path.exists():
        return set()
    with open_h5(path, "r") as f:
        slides = f.get("slides", {})
        return {sid for sid, group in slides.items() if group.attrs.get("complete", False)}


def write_slide(path: Path, slide_id: str, attrs: dict, arrays: dict[str, np.ndarray],
                dataset_attrs: dict[str, dict] | None = None) -> None:
    """Write (or replace) one slide's group; `complete` is set last."""
    with open_h5(path, "a") as f:
        slides = f.require_group("slides")
        if slide_id in slides:
            del slides[slide_id]
        group = slides.create_group(slide_id)
        for name, array in arrays.items():
            compress = name in IMAGE_DATASETS or name == "coords"
            dataset = group.create_dataset(name, data=array, compression="gzip" if compress else None)
            dataset.attrs.update((dataset_attrs or {}).get(name, {}))
        group.attrs.update({k: v for k, v in attrs.items() if v is not None})
        group.attrs["complete"] = True


def root_attrs(path: Path) -> dict:
    with open_h5(path, "r") as f:
        return dict(f.attrs)


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
        first = self.load(self.slide_ids[0]).features
        assert first is not None
        return int(first.shape[1])


def require_file(path: Path, option: str) -> Path:
    """Fail with a one-line error naming the option to pass when a default input is absent."""
    if not path.exists():
        raise MilcliError(f"{path}: no such file (pass {option} to name it)")
    return path
