"""Open any slide behind one small interface: size, pyramid levels, mpp, regions, thumbnails.

Pyramidal and tiled TIFF (Aperio .svs, generic .tif) go through tiffslide, which decodes only
the tiles a region touches; Hamamatsu, MIRAX and other vendor formats through OpenSlide.
Plain PNG/JPEG/BMP images go through Pillow; a JPEG thumbnail is decoded at reduced scale
(DCT scaling) instead of in full. A DICOM whole-slide image, a folder of `.dcm` instances, goes
through wsidicom (the `dicom` extra); its path and id are the folder's.
"""

from __future__ import annotations

import logging
import math
import re
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image, UnidentifiedImageError

from mil_cli.errors import InputError, first_line
from mil_cli.tiff_tiles import TiledTiff

TIFF_SUFFIXES = {".svs", ".tif", ".tiff"}
PLAIN_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp"}
OPENSLIDE_SUFFIXES = {".ndpi", ".mrxs", ".vms", ".vmu", ".scn", ".bif", ".svslide"}
SLIDE_SUFFIXES = TIFF_SUFFIXES | PLAIN_SUFFIXES | OPENSLIDE_SUFFIXES
DICOM_SUFFIX = ".dcm"  # a folder holding files of this suffix is one DICOM slide

# Plain images are decoded whole, so their size is capped by memory (3 GB as RGB).
MAX_PLAIN_PIXELS = 1_000_000_000
# tifffile logs each broken page on its own; the failure reaches the user as one InputError.
logging.getLogger("tifffile").setLevel(logging.ERROR)
Image.MAX_IMAGE_PIXELS = MAX_PLAIN_PIXELS  # Pillow's own bomb guard, at our limit
# Tiled TIFFs decode tile by tile; beyond this the header is nonsense or hostile.
MAX_TILED_PIXELS = 10**12
# mpp outside this range is not a microscope's (e.g. a 72 dpi screen resolution tag).
PLAUSIBLE_MPP = (0.05, 20.0)


def plausible_mpp(value: float | None) -> float | None:
    """Return `value` if it looks like a microscope resolution in µm/px, else None."""
    if value is None or not np.isfinite(value):
        return None
    return float(value) if PLAUSIBLE_MPP[0] <= value <= PLAUSIBLE_MPP[1] else None


def slide_id_from_path(path: Path) -> str:
    """The slide id: the file name without its extension (DESIGN.md); a DICOM slide's folder name."""
    if path.is_dir():
        return path.name
    return path.name[: -len(path.suffix)] if path.suffix else path.name


def is_dicom_folder(path: Path) -> bool:
    return path.is_dir() and any(p.suffix.lower() == DICOM_SUFFIX and p.is_file() for p in path.iterdir())


def safe_file_stem(slide_id: str) -> str:
    """A version of a slide id that is safe as one path component on any OS."""
    cleaned = re.sub(r"[^A-Za-z0-9._+-]", "_", slide_id).lstrip(".")
    return cleaned or "_"


def group_into_blocks(coords: np.ndarray, cell: int) -> list[np.ndarray]:
    """Row indices of `coords`, grouped by the `cell` x `cell` square their top-left falls in."""
    keys = coords // cell
    order = np.lexsort((keys[:, 0], keys[:, 1]))
    starts = np.flatnonzero(np.any(np.diff(keys[order], axis=0) != 0, axis=1)) + 1
    return np.split(order, starts)


class Slide(ABC):
    """A read-only slide. Coordinates are level-0 pixels, (x, y) order, as in OpenSlide."""

    reader: str

    def __init__(self, path: Path) -> None:
        self.path = path

    @property
    @abstractmethod
    def dimensions(self) -> tuple[int, int]:
        """Level-0 (width, height)."""

    @property
    @abstractmethod
    def level_dimensions(self) -> list[tuple[int, int]]: ...

    @property
    @abstractmethod
    def level_downsamples(self) -> list[float]: ...

    @property
    @abstractmethod
    def mpp(self) -> float | None:
        """Level-0 microns per pixel from the file's metadata, or None when unknown."""

    @property
    def vendor(self) -> str | None:
        return None

    @abstractmethod
    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """RGB uint8 array (h, w, 3) of `size` at `level`, top-left at level-0 `location`."""

    @abstractmethod
    def thumbnail(self, max_size: int) -> np.ndarray:
        """RGB uint8 image whose longer side is at most `max_size` (never upsampled)."""

    def best_level(self, downsample: float) -> int:
        """The highest-resolution level no coarser than `downsample` (read, then shrink)."""
        best = 0
        for level, ds in enumerate(self.level_downsamples):
            if ds <= downsample * 1.01:
                best = level
        return best

    def read_area(self, x0: float, y0: float, width0: float, height0: float, size: tuple[int, int]) -> np.ndarray:
        """The level-0 rectangle resized to `size` (w, h), read from the pyramid level nearest above it."""
        level = self.best_level(width0 / size[0])
        ds = self.level_downsamples[level]
        region = self.read_region((int(x0), int(y0)), level, (max(1, math.ceil(width0 / ds)),
                                                              max(1, math.ceil(height0 / ds))))
        if region.shape[1::-1] != size:
            region = np.asarray(Image.fromarray(region).resize(size, Image.BILINEAR))
        return region

    def read_patch(self, location: tuple[int, int], size_level0: int, out_size: int) -> np.ndarray:
        """A square patch covering `size_level0` level-0 px, resized to `out_size` px."""
        region = self.read_patches_unscaled(np.array([location]), size_level0, out_size)[0]
        if region.shape[0] != out_size:
            region = np.array(Image.fromarray(region).resize((out_size, out_size), Image.BILINEAR))
        return region

    def read_patches_unscaled(self, locations: np.ndarray, size_level0: int, out_size: int) -> np.ndarray:
        """(k, s, s, 3) patches at level-0 top-lefts `locations` (k, 2), from the pyramid level
        nearest to `out_size` and not yet resized. They come from one read of their bounding
        box: for nearby patches that is several times faster than a read each, because every
        read pays the reader's fixed cost and re-decodes the tiles it shares with its neighbours."""
        level = self.best_level(size_level0 / out_size)
        ds = self.level_downsamples[level]
        size = max(1, round(size_level0 / ds))
        origin = locations.min(axis=0)
        offsets = np.round((locations - origin) / ds).astype(np.int64)
        width, height = offsets.max(axis=0) + size
        region = self.read_region((int(origin[0]), int(origin[1])), level, (int(width), int(height)))
        return np.stack([region[y:y + size, x:x + size] for x, y in offsets])

    def close(self) -> None:
        """Release file handles."""

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _thumbnail_size(width: int, height: int, max_size: int) -> tuple[int, int]:
    scale = min(1.0, max_size / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


class PillowSlide(Slide):
    """A plain image file, decoded on first region read and kept in memory."""

    reader = "pillow"

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(path) as probe:  # reads the header only
                    self._size = probe.size
                    self._format = probe.format
                    dpi = probe.info.get("dpi")
        except Image.DecompressionBombError:
            raise InputError(path, f"image is too large to decode whole (limit {MAX_PLAIN_PIXELS:,} px); "
                                   f"convert it to a tiled pyramidal TIFF") from None
        except UnidentifiedImageError:
            raise InputError(path, "not a readable image (Pillow cannot identify it)") from None
        except OSError as exc:
            raise InputError(path, f"cannot read image: {exc}") from None
        width, height = self._size
        if width * height > MAX_PLAIN_PIXELS:
            raise InputError(
                path,
                f"image of {width} x {height} px is too large to decode whole "
                f"(limit {MAX_PLAIN_PIXELS:,} px); convert it to a tiled pyramidal TIFF",
            )
        self._mpp = plausible_mpp(25400.0 / float(dpi[0])) if dpi and dpi[0] else None
        self._pixels: np.ndarray | None = None

    def _load(self) -> np.ndarray:
        if self._pixels is None:
            try:
                with Image.open(self.path) as image:
                    image.load()
                    self._pixels = np.asarray(image.convert("RGB"))
            except (OSError, ValueError, Image.DecompressionBombError) as exc:
                raise InputError(self.path, f"cannot decode image: {exc}") from None
        return self._pixels

    @property
    def dimensions(self) -> tuple[int, int]:
        return self._size

    @property
    def level_dimensions(self) -> list[tuple[int, int]]:
        return [self._size]

    @property
    def level_downsamples(self) -> list[float]:
        return [1.0]

    @property
    def mpp(self) -> float | None:
        return self._mpp

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        pixels = self._load()
        return _read_within(location, size, (pixels.shape[1], pixels.shape[0]),
                            lambda x, y, w, h: pixels[y:y + h, x:x + w])

    def thumbnail(self, max_size: int) -> np.ndarray:
        target = _thumbnail_size(*self._size, max_size)
        try:
            with Image.open(self.path) as image:
                if self._format == "JPEG":
                    image.draft("RGB", target)  # decode at 1/2, 1/4 or 1/8 scale when enough
                image = image.convert("RGB")
                return np.asarray(image.resize(target, Image.BILINEAR, reducing_gap=3.0))
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise InputError(self.path, f"cannot decode image: {exc}") from None


TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF, both byte orders


def unreadable_reason(path: Path, backend: str, exc: Exception) -> str:
    """Why a slide library could not open `path`, in the user's terms where the file says it."""
    if path.suffix.lower() in TIFF_SUFFIXES:
        with open(path, "rb") as f:
            if f.read(4) not in TIFF_MAGIC:
                return "not a TIFF file (it does not start with a TIFF header); is it named right?"
        try:
            with tifffile.TiffFile(path) as tif:
                readable = len(tif.pages) > 0 and tif.pages[0].shape is not None
        except Exception:
            readable = False
        if not readable:
            return (f"a TIFF file whose image directory cannot be read: it is truncated or damaged "
                    f"({path.stat().st_size:,} bytes); copy it again")
    return f"not a readable slide ({backend}: {first_line(exc)})"


class WholeSlideReader(Slide):
    """Pyramidal slides through an OpenSlide-style library: tiffslide (TIFF, SVS; pure
    Python) or OpenSlide itself (NDPI, MIRAX, SCN, ...; the `openslide` extra)."""

    def __init__(self, path: Path, backend: str) -> None:
        super().__init__(path)
        self.reader = backend
        if backend == "openslide":
            try:
                import openslide as library
            except ImportError:
                raise InputError(path, f"reading {path.suffix} files needs OpenSlide: "
                                       f"pip install 'milcli[openslide]'") from None
            opener = library.OpenSlide
        else:
            import tiffslide as library
            opener = library.TiffSlide
        try:
            self._slide = opener(str(path))
            width, height = self._slide.dimensions
        except Exception as exc:  # each library raises its own types for corrupt files
            raise InputError(path, unreadable_reason(path, backend, exc)) from None
        if width * height > MAX_TILED_PIXELS:
            raise InputError(path, f"claims {width} x {height} px, beyond any real slide; refusing it")
        props = self._slide.properties
        mpp = props.get(f"{backend}.mpp-x")
        self._mpp = plausible_mpp(float(mpp)) if mpp not in (None, "") else None
        self._vendor = props.get(f"{backend}.vendor")
        self._tiles = TiledTiff.open(path, self.level_dimensions) if backend == "tiffslide" else None

    @property
    def dimensions(self) -> tuple[int, int]:
        return tuple(self._slide.dimensions)

    @property
    def level_dimensions(self) -> list[tuple[int, int]]:
        return [tuple(d) for d in self._slide.level_dimensions]

    @property
    def level_downsamples(self) -> list[float]:
        return [float(d) for d in self._slide.level_downsamples]

    @property
    def mpp(self) -> float | None:
        return self._mpp

    @property
    def vendor(self) -> str | None:
        return self._vendor

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        if self._tiles is not None:
            ds = self.level_downsamples[level]
            x, y = int(location[0] / ds), int(location[1] / ds)  # tiffslide's level coordinates
            return _rgb_on_white(self._tiles.read_region(level, x, y, *size))
        try:
            if self.reader == "tiffslide":  # straight to an array, no PIL image in between
                region = self._slide.read_region(location, level, size, as_array=True)
            else:
                region = np.asarray(self._slide.read_region(location, level, size))
        except Exception as exc:
            raise InputError(self.path, f"cannot decode region at {location}: {exc}") from None
        return _rgb_on_white(region)

    def thumbnail(self, max_size: int) -> np.ndarray:
        target = _thumbnail_size(*self.dimensions, max_size)
        try:
            image = self._slide.get_thumbnail(target)
        except Exception as exc:
            raise InputError(self.path, f"cannot decode thumbnail: {exc}") from None
        image = _rgb_on_white(np.asarray(image if image.mode in ("RGB", "RGBA") else image.convert("RGBA")))
        if image.shape[1::-1] != target:
            image = np.array(Image.fromarray(image).resize(target, Image.BILINEAR))
        return image

    def close(self) -> None:
        self._slide.close()
        if self._tiles is not None:
            self._tiles.close()


class DicomSlide(Slide):
    """A DICOM whole-slide image (VL Whole Slide Microscopy, a folder of .dcm instances) through
    wsidicom, the `dicom` extra. wsidicom addresses a pyramid level by its power of two and a
    region in that level's pixels; regions reaching past the image read as white glass."""

    reader = "wsidicom"

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        try:
            from wsidicom import WsiDicom
        except ImportError:
            raise InputError(path, "reading DICOM slides needs wsidicom: pip install 'milcli[dicom]'") from None
        try:
            self._slide = WsiDicom.open(path)
            self._levels = sorted(self._slide.levels, key=lambda level: level.level)
            width, height = self._slide.size.width, self._slide.size.height
        except Exception as exc:  # wsidicom raises its own and pydicom's types for broken folders
            raise InputError(path, f"not a readable DICOM whole-slide image (wsidicom: {first_line(exc)})") from None
        if width * height > MAX_TILED_PIXELS:
            raise InputError(path, f"claims {width} x {height} px, beyond any real slide; refusing it")
        try:
            self._mpp = plausible_mpp(float(self._slide.mpp.width))  # wsidicom's mpp is in µm/px
        except Exception:  # no pixel spacing in the file
            self._mpp = None

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.level_dimensions[0]

    @property
    def level_dimensions(self) -> list[tuple[int, int]]:
        return [(level.size.width, level.size.height) for level in self._levels]

    @property
    def level_downsamples(self) -> list[float]:
        return [float(2 ** level.level) for level in self._levels]

    @property
    def mpp(self) -> float | None:
        return self._mpp

    @property
    def vendor(self) -> str | None:
        equipment = getattr(self._slide.metadata, "equipment", None)
        return getattr(equipment, "manufacturer", None) or None

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        ds = self.level_downsamples[level]

        def read(x: int, y: int, w: int, h: int) -> np.ndarray:
            try:
                region = self._slide.read_region((x, y), self._levels[level].level, (w, h), as_array=True)
            except Exception as exc:
                raise InputError(self.path, f"cannot decode region at {location}: {first_line(exc)}") from None
            return _rgb_on_white(np.asarray(region))

        return _read_within((int(location[0] / ds), int(location[1] / ds)), size, self.level_dimensions[level], read)

    def thumbnail(self, max_size: int) -> np.ndarray:
        target = _thumbnail_size(*self.dimensions, max_size)
        try:
            image = _rgb_on_white(np.asarray(self._slide.read_thumbnail(target, as_array=True)))
        except Exception as exc:
            raise InputError(self.path, f"cannot decode thumbnail: {first_line(exc)}") from None
        if image.shape[1::-1] != target:
            image = np.array(Image.fromarray(image).resize(target, Image.BILINEAR))
        return image

    def close(self) -> None:
        self._slide.close()


def _read_within(location: tuple[int, int], size: tuple[int, int], bounds: tuple[int, int],
                 read: Callable[[int, int, int, int], np.ndarray]) -> np.ndarray:
    """A (h, w, 3) region at `location` of an image `bounds` (width, height) px large: the part
    inside it from read(x, y, w, h), the rest white glass."""
    x, y = location
    w, h = size
    out = np.full((h, w, 3), 255, dtype=np.uint8)
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, bounds[0]), min(y + h, bounds[1])
    if x1 > x0 and y1 > y0:
        out[y0 - y: y1 - y, x0 - x: x1 - x] = read(x0, y0, x1 - x0, y1 - y0)
    return out


def _rgb_on_white(pixels: np.ndarray) -> np.ndarray:
    """RGB from an RGB, RGBA or grey array; transparent pixels (outside the scanned area)
    become white glass."""
    if pixels.ndim == 2:
        return np.repeat(pixels[..., None], 3, axis=2)
    if pixels.shape[2] == 4:
        alpha = pixels[..., 3:].astype(np.uint16)
        return ((pixels[..., :3] * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)
    return pixels


def open_slide(path: str | Path) -> Slide:
    """Open a slide with the reader its file type needs; InputError when it cannot be read."""
    path = Path(path)
    if is_dicom_folder(path):
        return DicomSlide(path)
    if path.is_dir():
        raise InputError(path, f"a folder, not a slide (a DICOM slide is a folder of {DICOM_SUFFIX} files)")
    if not path.is_file():
        raise InputError(path, "no such file")
    suffix = path.suffix.lower()
    if suffix in TIFF_SUFFIXES:
        try:
            return WholeSlideReader(path, "tiffslide")
        except InputError as first:  # OpenSlide knows some TIFF variants tiffslide does not
            try:
                return WholeSlideReader(path, "openslide")
            except InputError:
                raise first from None
    if suffix in OPENSLIDE_SUFFIXES:
        return WholeSlideReader(path, "openslide")
    if suffix in PLAIN_SUFFIXES:
        return PillowSlide(path)
    supported = ", ".join(sorted(SLIDE_SUFFIXES))
    raise InputError(path, f"unsupported file type '{suffix or '(none)'}' (supported: {supported})")


def no_slides_found() -> str:
    return f"no slide files found (looked for {' '.join(sorted(SLIDE_SUFFIXES))} and folders of {DICOM_SUFFIX} files)"


def find_slides(inputs: list[Path]) -> list[Path]:
    """Expand files and folders into slides. Folders contribute files with slide suffixes and
    DICOM slides, folders of .dcm files (recursively, hidden entries skipped); a DICOM folder
    named directly is that slide, and files named directly are always kept, so that a wrong one
    gets a clear error instead of being ignored."""
    found: list[Path] = []
    for item in inputs:
        if is_dicom_folder(item):
            found.append(item)
        elif item.is_dir():
            entries = [p for p in sorted(item.rglob("*"))
                       if not any(part.startswith(".") for part in p.relative_to(item).parts)]
            dicom = {p for p in entries if is_dicom_folder(p)}
            found.extend(p for p in entries if p in dicom or (p.is_file() and p.suffix.lower() in SLIDE_SUFFIXES))
        elif item.exists():
            found.append(item)
        else:
            raise InputError(item, "no such file or folder")
    return found
