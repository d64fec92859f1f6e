"""Robust image reading and discovery for the runtime.

Real folders hold everything: EXIF-rotated phone photos, 16-bit PNGs from industrial cameras,
CMYK JPEGs, palette PNGs with transparency, half-copied files, text files named ``.jpg``.
Every reader here returns one thing — a contiguous ``(H, W, 3)`` uint8 RGB array in the
orientation a person sees — or raises ``ImageReadError`` (never anything else for a bad file),
so callers can skip the file and report it instead of crashing a long labeling run.

Conversion choices (kept identical in training and deployment so models see the same pixels):
    * alpha (RGBA, LA, PA, P with transparency) is composited onto gray 114, the letterbox pad
      colour, so transparent regions look like padding rather than arbitrary hidden RGB;
    * 16-bit integer images (I;16*) keep their top byte (``>> 8``): linear, identical for every
      image of a dataset, and what ``cv2.imread`` does (ultralytics-trained models saw that);
    * 32-bit ``I`` images: values within 0..255 are taken as 8-bit, within 0..65535 as 16-bit
      (``>> 8``), otherwise min-max normalised; ``F`` (float): [0, 1] data is scaled by 255,
      anything else min-max normalised (NaN/inf -> 0);
    * 1-bit, L, P, CMYK, YCbCr, LAB, HSV: Pillow's own conversion to RGB.

``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` is never touched: it must stay ``False`` so that a
half-written file raises instead of silently decoding gray.

Speed. Pillow reads every header (format, size, mode, EXIF, the pixel limit) and decodes
everything unusual; the pixels of a complete 8-bit RGB or gray JPEG (the bulk of any photo
folder) are decoded by simplejpeg (libjpeg-turbo's own API) from the same bytes instead: the
same libjpeg-turbo settings give bit-identical pixels (full and 1/2..1/8 draft scale, tested)
for a fraction of the CPU. Per 640x480 photo on one thread: 0.73 ms against 3.8 ms for Pillow
(it decodes block by block into a 4-byte-per-pixel buffer and copies that out) and 1.8 ms for
OpenCV's ``imdecode`` (BGR then swapped, and a fresh mapping for every image); 1.1 / 1.6 ms in
``ssod label``'s 2-thread pool; 0.55 / 0.63 ms at half scale (``benchmarks/jpeg_decode.py``,
docs/benchmarks.md Run G). "Complete" means the file ends with the JPEG end-of-image marker:
libjpeg pads a cut-off file with gray and only warns, so anything else goes to Pillow, which
raises on truncation; a file libjpeg warns about anywhere else goes to Pillow too.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import struct
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import simplejpeg
from PIL import Image, UnidentifiedImageError

# HEIC/HEIF (iPhone photos) through pillow-heif's Pillow plugin, registered on the first such file
# (it costs ~60 ms to import); without the package those files are counted and reported, not read.
HEIF_EXTENSIONS: frozenset[str] = frozenset({".heic", ".heif"})
HEIF_READABLE: bool = importlib.util.find_spec("pillow_heif") is not None
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".mpo"}
) | (HEIF_EXTENSIONS if HEIF_READABLE else frozenset())
DEFAULT_MAX_PIXELS = 178_956_970  # 2x Pillow's default warning limit
PAD_GRAY = 114

LOGGER = logging.getLogger("ssod")

_EXIF_ORIENTATION_TAG = 0x0112
# EXIF orientation -> Pillow transpose method (same table as ImageOps.exif_transpose).
_ORIENTATION_OPS: dict[int, Image.Transpose] = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


class ImageReadError(Exception):
    """A file that cannot be used as an image; ``str(e)`` is one line: ``"<path>: <reason>"``."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = " ".join(str(reason).split())  # one line, whatever the cause said
        super().__init__(f"{self.path}: {self.reason}")

    def __reduce__(self):  # picklable across process pools
        return (type(self), (self.path, self.reason))


def is_image_path(path: str | os.PathLike) -> bool:
    """True when the file name has one of ``IMAGE_EXTENSIONS`` (any case)."""
    return os.path.splitext(str(path))[1].lower() in IMAGE_EXTENSIONS


# ----------------------------------------------------------------------------------- reading


def read_image(
    path: str | os.PathLike,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    target_size: int | None = None,
) -> np.ndarray:
    """Decode ``path`` to a contiguous (H, W, 3) uint8 RGB array, EXIF orientation applied.

    With ``target_size`` a JPEG may be decoded at 1/2, 1/4 or 1/8 scale while its longest side
    stays >= ``target_size`` (use ``read_image_with_size`` to also get the original size).
    """
    return read_image_with_size(path, max_pixels, target_size)[0]


def read_image_with_size(
    path: str | os.PathLike,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    target_size: int | None = None,
) -> tuple[np.ndarray, tuple[int, int]]:
    """Like ``read_image``; also returns the original (h, w) after EXIF orientation.

    The original size is what boxes must be mapped back to when the JPEG draft path returned
    a smaller array.
    """
    path_s = str(path)
    try:
        with _open_file(path_s) as fh:
            with _open_image(path_s, fh) as img:
                w, h = img.size
                _check_pixels(path_s, w, h, max_pixels)
                arr = _decode_plain_jpeg(img, fh, w, h, target_size)
                if arr is not None:
                    orientation = _orientation(img)
                    arr = _orient_array(arr, orientation)
                    return arr, ((w, h) if orientation in (5, 6, 7, 8) else (h, w))
                if target_size and img.format == "JPEG":
                    _draft(img, w, h, int(target_size))
                img.load()  # decode now, before anything else touches pixels: truncation raises
                orientation = _orientation(img)
                if orientation in _ORIENTATION_OPS:
                    img = img.transpose(_ORIENTATION_OPS[orientation])
                arr = _to_rgb_array(img)
                orig_hw = (w, h) if orientation in (5, 6, 7, 8) else (h, w)
    except ImageReadError:
        raise
    except Exception as e:  # noqa: BLE001 -- every decode failure becomes one clear error
        raise _wrap(path_s, e) from e
    return arr, orig_hw


def read_image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(h, w) from the header only, EXIF orientation applied (no pixel decoding)."""
    path_s = str(path)
    try:
        with _open_file(path_s) as fh:
            with _open_image(path_s, fh) as img:
                w, h = img.size
                if w <= 0 or h <= 0:
                    raise ImageReadError(path_s, f"invalid image size {w}x{h}")
                return (w, h) if _orientation(img, header_only=True) in (5, 6, 7, 8) else (h, w)
    except ImageReadError:
        raise
    except Exception as e:  # noqa: BLE001
        raise _wrap(path_s, e) from e


def _open_file(path: str):
    """Open for reading with a precise reason for missing/empty/unreadable files."""
    try:
        fh = open(path, "rb")  # noqa: SIM115 -- returned as a context manager
    except FileNotFoundError as e:
        raise ImageReadError(path, "file not found") from e
    except IsADirectoryError as e:
        raise ImageReadError(path, "is a directory, not an image file") from e
    except PermissionError as e:
        raise ImageReadError(path, "permission denied") from e
    except OSError as e:
        raise ImageReadError(path, f"cannot open file ({e.strerror or e})") from e
    try:
        size = os.fstat(fh.fileno()).st_size
    except OSError:
        size = -1
    if size == 0:
        fh.close()
        raise ImageReadError(path, "empty file (0 bytes)")
    return fh


@functools.cache
def _register_heif() -> None:
    """pillow-heif's opener: libheif applies the file's rotation and resets its EXIF orientation to 1,
    so the EXIF step here leaves those pictures as they are (tested)."""
    from pillow_heif import register_heif_opener

    register_heif_opener()


def _open_image(path: str, fh) -> Image.Image:
    # Pillow's own bomb check (error above 2 * Image.MAX_IMAGE_PIXELS) runs inside open; our
    # max_pixels check runs right after, so the effective limit is the smaller of the two.
    if HEIF_READABLE and os.path.splitext(path)[1].lower() in HEIF_EXTENSIONS:
        _register_heif()
    try:
        return Image.open(fh)
    except UnidentifiedImageError as e:
        raise ImageReadError(path, "not an image (unrecognised format)") from e
    except Image.DecompressionBombError as e:
        raise ImageReadError(path, f"image too large: {e}") from e


def _check_pixels(path: str, w: int, h: int, max_pixels: int) -> None:
    if w <= 0 or h <= 0:
        raise ImageReadError(path, f"invalid image size {w}x{h}")
    if max_pixels and w * h > max_pixels:
        raise ImageReadError(
            path, f"image too large: {w}x{h} pixels exceeds limit {max_pixels}"
        )


def _orientation(img: Image.Image, header_only: bool = False) -> int:
    """EXIF orientation (1 when absent or unreadable: bad EXIF must not lose the picture).

    ``header_only`` avoids Pillow's PNG fallback of decoding the whole file to look for an
    eXIf chunk after the pixel data (rare; such a chunk is then ignored by the size query).
    """
    if header_only and img.format == "PNG" and "exif" not in img.info:
        return 1
    try:
        value = img.getexif().get(_EXIF_ORIENTATION_TAG, 1)
        return int(value) if int(value) in range(1, 9) else 1
    except Exception:  # noqa: BLE001
        return 1


def _draft_request(w: int, h: int, target_size: int) -> tuple[int, int] | None:
    """The (w, h) a JPEG may be reduced to while its longest side stays >= target (None: full)."""
    longest = max(w, h)
    if longest <= target_size:
        return None
    ratio = target_size / longest
    return max(1, int(np.ceil(w * ratio))), max(1, int(np.ceil(h * ratio)))


def _draft(img: Image.Image, w: int, h: int, target_size: int) -> None:
    """Let the JPEG decoder downscale (1/2..1/8) while the longest side stays >= target."""
    req = _draft_request(w, h, target_size)
    if req is None:
        return
    # draft keeps both sides >= the request, so the longest side stays >= target_size.
    mode = "RGB" if img.mode in ("RGB", "YCbCr") else img.mode
    img.draft(mode, req)


def _draft_scale(w: int, h: int, target_size: int | None) -> int:
    """The 1, 2, 4 or 8 Pillow's ``draft`` picks for ``_draft_request`` (its own rule)."""
    req = _draft_request(w, h, int(target_size)) if target_size else None
    if req is None:
        return 1
    fit = min(w // req[0], h // req[1])
    return next(sc for sc in (8, 4, 2, 1) if fit >= sc)


_JPEG_EOI = b"\xff\xd9"


def _decode_plain_jpeg(img: Image.Image, fh, w: int, h: int, target_size: int | None) -> np.ndarray | None:
    """Pixels of a complete 8-bit RGB/gray JPEG by simplejpeg (module docstring), else None
    (Pillow decodes it). Orientation is not applied here."""
    if img.format != "JPEG" or img.mode not in ("RGB", "L"):
        return None
    fh.seek(0)
    data = fh.read()
    if not data.endswith(_JPEG_EOI):
        return None
    sc = _draft_scale(w, h, target_size)
    hw = (-(-h // sc), -(-w // sc))
    try:
        # libjpeg-turbo scales by M/8 and picks the smallest M whose output covers min_height x
        # min_width: asking for ceil(side / sc) gives exactly Pillow's 8/sc (tested for 1, 2, 4, 8)
        arr = simplejpeg.decode_jpeg(data, "RGB" if img.mode == "RGB" else "GRAY",
                                     min_height=hw[0] if sc > 1 else 0, min_width=hw[1] if sc > 1 else 0)
    except Exception:  # noqa: BLE001 -- libjpeg's errors and warnings (ValueError), anything else alike
        return None  # Pillow decides (and raises a clear error if it must)
    if arr.shape[:2] != hw:
        return None
    return _gray_to_rgb(arr[..., 0]) if arr.shape[2] == 1 else arr


def _orient_array(arr: np.ndarray, orientation: int) -> np.ndarray:
    """EXIF orientation on an (H, W, 3) array, as ``_ORIENTATION_OPS`` does on a Pillow image."""
    if orientation == 2:
        arr = arr[:, ::-1]
    elif orientation == 3:
        arr = arr[::-1, ::-1]
    elif orientation == 4:
        arr = arr[::-1]
    elif orientation == 5:
        arr = arr.transpose(1, 0, 2)
    elif orientation == 6:
        arr = np.rot90(arr, -1)
    elif orientation == 7:
        arr = arr[::-1, ::-1].transpose(1, 0, 2)
    elif orientation == 8:
        arr = np.rot90(arr, 1)
    else:
        return arr
    return np.ascontiguousarray(arr)


def _wrap(path: str, e: BaseException) -> ImageReadError:
    if isinstance(e, PermissionError):
        return ImageReadError(path, "permission denied")
    if isinstance(e, MemoryError):
        return ImageReadError(path, "out of memory while decoding")
    msg = str(e) or type(e).__name__
    if isinstance(e, Image.DecompressionBombError):
        return ImageReadError(path, f"image too large: {msg}")
    if isinstance(e, (OSError, SyntaxError, EOFError, ValueError, struct.error)):
        # Pillow reports truncation and bad streams with these types from load()
        return ImageReadError(path, f"truncated or corrupt image data ({msg})")
    return ImageReadError(path, f"cannot decode image ({type(e).__name__}: {msg})")


# -------------------------------------------------------------------------------- conversion


def _to_rgb_array(img: Image.Image) -> np.ndarray:
    """Any Pillow mode -> contiguous (H, W, 3) uint8 RGB (choices in the module docstring)."""
    mode = img.mode
    if mode == "RGB":
        out = np.asarray(img)
    elif (mode == "P" and "transparency" in img.info) or mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        out = _composite(img.convert("RGBA"))
    elif mode.startswith("I;16"):
        out = _gray_to_rgb(np.asarray(img).astype(np.uint16) >> 8)
    elif mode == "I":
        out = _gray_to_rgb(_int_to_u8(np.asarray(img)))
    elif mode == "F":
        out = _gray_to_rgb(_float_to_u8(np.asarray(img)))
    elif mode == "L":
        out = _gray_to_rgb(np.asarray(img))
    else:  # 1, P, CMYK, YCbCr, LAB, HSV, RGBX, ...
        out = np.asarray(img.convert("RGB"))
    out = np.ascontiguousarray(out, dtype=np.uint8)
    if out.ndim != 3 or out.shape[2] != 3:
        raise ValueError(f"unexpected decoded shape {out.shape} from mode {mode}")
    if not out.flags.writeable:
        out = out.copy()
    return out


def _composite(rgba: Image.Image) -> np.ndarray:
    a = np.asarray(rgba)
    alpha = a[..., 3:4].astype(np.uint16)
    rgb = a[..., :3].astype(np.uint16)
    # round(rgb * alpha/255 + 114 * (1 - alpha/255)) in integer arithmetic
    out = (rgb * alpha + PAD_GRAY * (255 - alpha) + 127) // 255
    return out.astype(np.uint8)


def _gray_to_rgb(g: np.ndarray) -> np.ndarray:
    g = g.astype(np.uint8, copy=False)
    return np.repeat(g[..., None], 3, axis=2)


def _int_to_u8(x: np.ndarray) -> np.ndarray:
    lo, hi = (int(x.min()), int(x.max())) if x.size else (0, 0)
    if lo >= 0 and hi <= 255:
        return x.astype(np.uint8)
    if lo >= 0 and hi <= 65535:
        return (x >> 8).astype(np.uint8)
    return _minmax_u8(x.astype(np.float64))


def _float_to_u8(x: np.ndarray) -> np.ndarray:
    x = np.where(np.isfinite(x), x, 0.0).astype(np.float64)
    if x.size and x.min() >= 0.0 and x.max() <= 1.0:
        return np.rint(x * 255.0).astype(np.uint8)
    return _minmax_u8(x)


def _minmax_u8(x: np.ndarray) -> np.ndarray:
    lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
    if hi <= lo:
        return np.zeros(x.shape, np.uint8)
    return np.rint((x - lo) * (255.0 / (hi - lo))).astype(np.uint8)


# --------------------------------------------------------------------------------- discovery


PathSource = str | os.PathLike | Sequence[str | os.PathLike]


def discover_images(root: PathSource, recursive: bool = True) -> list[Path]:
    """Image files under ``root`` in a deterministic order.

    ``root`` may be a directory (walked in sorted relative-posix-path order, hidden files and
    directories skipped, symlinked directories followed but each real directory visited once),
    a single image file, a ``.txt`` list (one path per line, relative to the list's folder or
    absolute; blank lines and ``#`` comments ignored; listed order kept, listed directories
    expanded; listed paths are returned even if missing so reading reports them), or a list of
    any of these (results concatenated in the given order, duplicates dropped).
    """
    if isinstance(root, (str, os.PathLike)):
        roots: list[str | os.PathLike] = [root]
    else:
        roots = list(root)
    out: list[Path] = []
    seen: set[str] = set()
    for r in roots:
        for p in _discover_one(Path(r), recursive):
            key = os.path.normpath(str(p))
            if key not in seen:
                seen.add(key)
                out.append(p)
    return out


def _discover_one(root: Path, recursive: bool) -> list[Path]:
    if root.is_dir():
        return _walk(root, recursive)
    if root.is_file():
        if root.suffix.lower() == ".txt":
            return _read_list(root, recursive)
        if is_image_path(root):
            return [root]
        raise ValueError(
            f"{root}: not a folder, image or .txt list (extensions: "
            f"{' '.join(sorted(IMAGE_EXTENSIONS))})"
        )
    raise FileNotFoundError(f"{root}: no such file or folder")


def _walk(root: Path, recursive: bool) -> list[Path]:
    found: list[tuple[str, Path]] = []
    visited: set[tuple[int, int]] = set()
    unreadable_heif = 0

    def walk(d: Path, rel: str) -> None:
        nonlocal unreadable_heif
        try:
            st = d.stat()
        except OSError:
            return
        key = (st.st_dev, st.st_ino)
        if key in visited:  # symlink cycle or second link to the same folder
            return
        visited.add(key)
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError as e:
            LOGGER.warning("cannot list folder %s: %s", d, e.strerror or e)
            return
        for entry in entries:
            if entry.name.startswith("."):  # hidden dirs, and macOS '._x.jpg' resource forks
                continue
            sub_rel = f"{rel}/{entry.name}" if rel else entry.name
            try:
                is_dir = entry.is_dir(follow_symlinks=True)
            except OSError:
                is_dir = False
            if is_dir:
                if recursive:
                    walk(Path(entry.path), sub_rel)
            elif is_image_path(entry.name):
                found.append((sub_rel, Path(entry.path)))
            elif os.path.splitext(entry.name)[1].lower() in HEIF_EXTENSIONS:
                unreadable_heif += 1

    walk(root, "")
    if unreadable_heif:
        LOGGER.warning("%s: %d HEIC/HEIF images left out: `pip install pillow-heif` reads them", root, unreadable_heif)
    found.sort(key=lambda t: t[0])
    return [p for _, p in found]


def _read_list(list_file: Path, recursive: bool) -> list[Path]:
    base = list_file.parent
    out: list[Path] = []
    try:
        lines = list_file.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{list_file}: cannot read image list ({e})") from e
    for line in lines:
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        p = Path(s).expanduser()
        if not p.is_absolute():
            p = base / p
        if p.is_dir():
            out.extend(_walk(p, recursive))
        else:
            out.append(p)
    return out


# ----------------------------------------------------------------------------- skip report


class SkipReport:
    """Unreadable files met during a run: warn once per file, summarise at the end.

    Thread-safe, because decode pools add from worker threads.
    """

    def __init__(self, log_path: str | os.PathLike | None = None, logger: logging.Logger | None = None):
        self.log_path = str(log_path) if log_path is not None else None
        self._logger = logger or LOGGER
        self._items: dict[str, str] = {}
        self._lock = threading.Lock()

    def add(self, path: str | os.PathLike, reason: str) -> bool:
        """Record a skipped file; returns False (and stays quiet) if it was already recorded."""
        key = str(path)
        reason = " ".join(str(reason).split())
        with self._lock:
            if key in self._items:
                return False
            self._items[key] = reason
        self._logger.warning("skipping %s: %s", key, reason)
        return True

    def add_error(self, err: ImageReadError) -> bool:
        return self.add(err.path, err.reason)

    def extend(self, items: Iterable[tuple[str, str]]) -> None:
        for path, reason in items:
            self.add(path, reason)

    @property
    def items(self) -> list[tuple[str, str]]:
        with self._lock:
            return list(self._items.items())

    def __len__(self) -> int:
        return len(self._items)

    def save(self, path: str | os.PathLike | None = None) -> str | None:
        """Write ``path<TAB>reason`` lines (to ``log_path`` by default); returns the file."""
        target = str(path) if path is not None else self.log_path
        if target is None:
            return None
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        with open(target, "w", encoding="utf-8") as f:
            for p, r in self.items:
                f.write(f"{p}\t{r}\n")
        self.log_path = target
        return target

    def summary_line(self) -> str:
        n = len(self)
        noun = "image" if n == 1 else "images"
        if n == 0:
            return "skipped 0 unreadable images"
        if self.log_path:
            return f"skipped {n} unreadable {noun} (see {self.log_path})"
        first_path, first_reason = self.items[0]
        more = f", and {n - 1} more" if n > 1 else ""
        return f"skipped {n} unreadable {noun} (first: {first_path}: {first_reason}{more})"
