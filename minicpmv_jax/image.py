"""Image loading, validation and the official MiniCPM-V slicing / normalisation (numpy + PIL).

Everything here reproduces ``image_processing_minicpmv.py`` of the official checkpoints bit for
bit: PIL bicubic resizes of the RGB uint8 image, ``(x / 255 - 0.5) / 0.5`` in float32 and the
``reshape_by_patch`` strip layout. Sizes are ``(width, height)`` as in PIL unless said otherwise.
"""

from __future__ import annotations

import concurrent.futures
import functools
import io
import math
import os
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from minicpmv_jax.errors import ImageError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "ImageInput",
    "PixelStrips",
    "SlicedImage",
    "aligned_zeros",
    "ensure_divide",
    "find_best_resize",
    "get_refine_size",
    "get_sliced_grid",
    "grow_rows",
    "load_image",
    "normalize_u8",
    "patchify",
    "slice_image",
    "strip_layout",
]

# Decompression-bomb guard: images with more pixels than this are refused before decoding.
# 64 megapixels covers every phone/DSLR photo; pass max_pixels=None to disable.
DEFAULT_MAX_PIXELS = 64_000_000

# Modes whose .convert("RGB") clips values > 255 to white (16/32-bit integer and float images):
# the official code would silently feed a saturated picture, so they are rejected instead.
_HIGH_BIT_DEPTH_MODES = ("I", "F", "I;16", "I;16L", "I;16B", "I;16N")

ImageInput = Image.Image | str | os.PathLike | bytes | bytearray | memoryview | io.IOBase


def _check_size(width: int, height: int, max_pixels: int | None, what: str) -> None:
    if width <= 0 or height <= 0:
        raise ImageError(
            f"{what} has zero size ({width}x{height}); an image needs at least 1x1 pixels"
        )
    if max_pixels is not None and width * height > max_pixels:
        raise ImageError(
            f"{what} is {width}x{height} = {width * height} pixels, above the limit of "
            f"{max_pixels} (decompression-bomb guard; raise max_pixels to allow it)"
        )


def load_image(
    src: ImageInput, *, max_pixels: int | None = DEFAULT_MAX_PIXELS, what: str = "image"
) -> Image.Image:
    """Open and validate an image and return it as a fully decoded RGB PIL image.

    Args:
      src: a PIL image, a file path, the encoded file bytes, or a binary file object.
      max_pixels: refuse images with more than this many pixels (checked from the header, before
        decoding); ``None`` disables the check.
      what: how to name the image in error messages (e.g. ``"image 2 of message 0"``).

    Returns:
      A loaded ``PIL.Image.Image`` in mode ``"RGB"``. Non-RGB modes are converted with
      ``.convert("RGB")`` as the official processor does (alpha is dropped, not composited;
      palette, CMYK, grey and 1-bit images are expanded). EXIF orientation is NOT applied
      (the official processor does not apply it either).

    Raises:
      ImageError: unreadable / truncated / unknown files, zero-sized or oversized images,
        16-bit or float images (their RGB conversion would clip to white), failed conversions.
    """
    if isinstance(src, Image.Image):
        img = src
        _check_size(img.width, img.height, max_pixels, what)
    else:
        if isinstance(src, (bytes, bytearray, memoryview)):
            if len(src) == 0:
                raise ImageError(f"{what}: empty byte string")
            fp, name = io.BytesIO(bytes(src)), f"{what} ({len(src)} bytes)"
        elif isinstance(src, (str, os.PathLike)):
            path = os.fspath(src)
            if not os.path.isfile(path):
                raise ImageError(f"{what}: no such file {path!r}")
            fp, name = path, f"{what} {path!r}"
        elif hasattr(src, "read"):
            fp, name = src, f"{what} (file object)"
        else:
            raise ImageError(
                f"{what}: expected a PIL image, a path, bytes or a binary file object, "
                f"got {type(src).__name__}"
            )
        try:
            # Image.open reads only the header: the size check below runs before any decoding.
            img = Image.open(fp)
        except Image.DecompressionBombError as e:
            raise ImageError(f"{name}: refused by PIL's decompression-bomb guard ({e})") from None
        except (OSError, SyntaxError, ValueError) as e:
            raise ImageError(f"{name}: not a readable image file ({e})") from None
        _check_size(img.width, img.height, max_pixels, name)
        what = name
    if img.mode in _HIGH_BIT_DEPTH_MODES:
        raise ImageError(
            f"{what}: mode {img.mode!r} (16-bit / 32-bit / float pixels) is not supported: "
            "converting it to RGB would clip every value above 255; scale it to 8-bit first"
        )
    try:
        img.load()  # decode now so truncated files fail here, not inside the resize
        rgb = img if img.mode == "RGB" else img.convert("RGB")
    except Image.DecompressionBombError as e:
        raise ImageError(f"{what}: refused by PIL's decompression-bomb guard ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{what}: could not decode / convert to RGB ({e})") from None
    return rgb


# ---------------------------------------------------------------------------------------------
# Slicing geometry (official image_processing_minicpmv.py; Python round = half-to-even)
# ---------------------------------------------------------------------------------------------


def ensure_divide(length: float, patch_size: int) -> int:
    """Nearest multiple of ``patch_size`` to ``length``, at least ``patch_size``."""
    return max(round(length / patch_size) * patch_size, patch_size)


def find_best_resize(
    original_size: tuple[float, float],
    scale_resolution: int,
    patch_size: int,
    allow_upscale: bool = False,
) -> tuple[int, int]:
    """(width, height) with area ~scale_resolution**2, aspect kept, sides multiples of patch_size."""
    width, height = original_size
    if (width * height > scale_resolution * scale_resolution) or allow_upscale:
        r = width / height
        height = int(scale_resolution / math.sqrt(r))
        width = int(height * r)
    best_width = ensure_divide(width, patch_size)
    best_height = ensure_divide(height, patch_size)
    return (best_width, best_height)


def get_refine_size(
    original_size: tuple[int, int],
    grid: tuple[int, int],
    scale_resolution: int,
    patch_size: int,
    allow_upscale: bool = False,
) -> tuple[int, int]:
    """Size of the image that is cut into the ``grid = (cols, rows)`` slices."""
    width, height = original_size
    grid_x, grid_y = grid
    refine_width = ensure_divide(width, grid_x)
    refine_height = ensure_divide(height, grid_y)
    # Float cell size on purpose: the official code passes refine / grid (true division).
    grid_width = refine_width / grid_x
    grid_height = refine_height / grid_y
    best_grid_size = find_best_resize(
        (grid_width, grid_height), scale_resolution, patch_size, allow_upscale=allow_upscale
    )
    return (best_grid_size[0] * grid_x, best_grid_size[1] * grid_y)


def get_sliced_grid(
    image_size: tuple[int, int],
    max_slice_nums: int,
    scale_resolution: int = 448,
    never_split: bool = False,
) -> tuple[int, int] | None:
    """Best ``(cols, rows)`` slice grid for an image, or ``None`` when it is not sliced."""
    original_width, original_height = image_size
    log_ratio = math.log(original_width / original_height)
    ratio = original_width * original_height / (scale_resolution * scale_resolution)
    multiple = min(math.ceil(ratio), max_slice_nums)
    if multiple <= 1 or never_split:
        return None
    candidate_split_grids_nums = [
        i for i in (multiple - 1, multiple, multiple + 1) if i != 1 and i <= max_slice_nums
    ]
    candidate_grids = []
    for split_grids_nums in candidate_split_grids_nums:
        m = 1
        while m <= split_grids_nums:
            if split_grids_nums % m == 0:
                candidate_grids.append((m, split_grids_nums // m))
            m += 1
    best_grid = (1, 1)
    min_error = float("inf")
    for grid in candidate_grids:
        error = abs(log_ratio - math.log(grid[0] / grid[1]))
        if error < min_error:  # strict '<': the first of equal errors wins, as officially
            best_grid = grid
            min_error = error
    return best_grid


@functools.lru_cache(maxsize=1)
def _pool() -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(
        max_workers=1, thread_name_prefix="minicpmv-resize"
    )


# A forked child inherits the executor but not its thread: give the child a fresh one.
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_pool.cache_clear)


@dataclass(frozen=True)
class SlicedImage:
    """One image cut into the pieces the vision tower sees.

    Attributes:
      pieces: uint8 arrays [h*14, w*14, 3] (HWC): the source (overview) first, then the slices
        row by row.
      grid: ``(cols, rows)`` or ``None`` when the image is not sliced.
    """

    pieces: list[np.ndarray]
    grid: tuple[int, int] | None


def slice_image(
    image: Image.Image,
    max_slice_nums: int,
    scale_resolution: int = 448,
    patch_size: int = 14,
) -> SlicedImage:
    """Resize and slice one RGB image as the official ``get_sliced_images`` does.

    Args:
      image: an RGB PIL image (see ``load_image``).
      max_slice_nums: upper bound on the number of slices (the source image is not counted).

    Returns:
      ``SlicedImage`` whose pieces are [H, W, 3] uint8 arrays with H, W multiples of patch_size.
    """
    grid = get_sliced_grid(image.size, max_slice_nums, scale_resolution)
    if grid is None:
        # Not sliced: the single image is resized to ~scale_resolution**2, upscaling allowed.
        size = find_best_resize(image.size, scale_resolution, patch_size, allow_upscale=True)
        return SlicedImage(
            [np.asarray(image.resize(size, resample=Image.Resampling.BICUBIC))], None
        )
    # Sliced: the overview is only ever downscaled; each slice cell is resized to ~448**2.
    source_size = find_best_resize(image.size, scale_resolution, patch_size)
    refine_size = get_refine_size(
        image.size, grid, scale_resolution, patch_size, allow_upscale=True
    )
    # The two resizes dominate the processor's time on large photos. PIL releases the GIL while
    # resampling, so the overview is resized on a worker thread while this thread does the
    # refine image (same PIL calls, identical pixels).
    image.load()
    pending = _pool().submit(image.resize, source_size, Image.Resampling.BICUBIC)
    refine = np.asarray(image.resize(refine_size, resample=Image.Resampling.BICUBIC))
    source = np.asarray(pending.result())
    cols, rows = grid
    # Official split_to_patches: int(width / cols) wide crops, row-major. The refine size is an
    # exact multiple of the grid, so numpy views replace PIL crops.
    cw, ch = int(refine_size[0] / cols), int(refine_size[1] / rows)
    pieces = [source]
    for top in range(0, refine_size[1], ch):
        for left in range(0, refine_size[0], cw):
            pieces.append(refine[top : top + ch, left : left + cw])
    return SlicedImage(pieces, grid)


# ---------------------------------------------------------------------------------------------
# Normalisation and patch layouts
# ---------------------------------------------------------------------------------------------


def _normalize_lut() -> np.ndarray:
    # Exactly the official float32 arithmetic: u8.astype(float32) / 255, then (x - 0.5) / 0.5
    # with float32 mean/std (transformers' normalize casts them to the image dtype).
    x = np.arange(256, dtype=np.float32) / np.float32(255)
    return ((x - np.float32(0.5)) / np.float32(0.5)).astype(np.float32)


_LUT = _normalize_lut()


def normalize_u8(x: np.ndarray) -> np.ndarray:
    """uint8 array -> float32 in [-1, 1], bit-identical to the official normalisation."""
    return _LUT[x]


def strip_layout(piece: np.ndarray, patch_size: int = 14) -> np.ndarray:
    """Official ``reshape_by_patch`` strip of one piece.

    Args:
      piece: uint8 [H, W, 3] with H = h*p, W = w*p.

    Returns:
      float32 [3, p, h*w*p]: patch k = r*w + c (row-major) occupies columns [k*p, (k+1)*p);
      pixel (kh, kw) of it sits at row kh, column k*p + kw.
    """
    p = patch_size
    hh, ww = piece.shape[0] // p, piece.shape[1] // p
    x = piece.reshape(hh, p, ww, p, 3)  # [h, kh, w, kw, c]
    x = x.transpose(4, 1, 0, 2, 3)  # [c, kh, h, w, kw]: transpose the uint8 data (4x less memory)
    return normalize_u8(x.reshape(3, p, hh * ww * p))


# buffers allocated with spare rows by `aligned_zeros` (only those may be grown in place)
_RESERVED: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def aligned_zeros(
    shape: Sequence[int], dtype=np.float32, *, capacity: int | None = None, align: int = 64
) -> np.ndarray:
    """Zeros whose data starts on an ``align``-byte boundary.

    XLA:CPU takes a 64-byte aligned numpy argument without copying it (the device buffer aliases
    the host memory), so the pixel arrays of a long video exist once, not twice, while the vision
    program runs. Such arrays are never donated or written after they are handed to a program.

    capacity: rows (axis 0) to reserve beyond ``shape[0]``, so that ``grow_rows`` can later
    extend the array to a slice bucket without a copy. The reserve costs address space only: the
    pages stay untouched (zero-mapped) until written.
    """
    dtype = np.dtype(dtype)
    shape = tuple(int(d) for d in shape)
    rows = max(shape[0], int(capacity or 0)) if shape else 1
    n = rows * int(np.prod(shape[1:])) * dtype.itemsize
    raw = np.zeros(n + align, np.uint8)
    if rows > (shape[0] if shape else 1):
        _RESERVED[id(raw)] = raw
    start = (-raw.ctypes.data) % align
    size = int(np.prod(shape)) * dtype.itemsize
    return raw[start : start + size].view(dtype).reshape(shape)


def grow_rows(x: np.ndarray, rows: int) -> np.ndarray | None:
    """``x`` extended to ``rows`` rows of zeros in place, when ``aligned_zeros`` reserved room for
    them (the reserved rows are never written, so they still hold zeros); None otherwise."""
    raw = x.base
    if raw is None or _RESERVED.get(id(raw)) is not raw or not x.flags.c_contiguous:
        return None
    offset = x.ctypes.data - raw.ctypes.data
    row_bytes = x.nbytes // max(x.shape[0], 1) if x.shape[0] else 0
    need = rows * row_bytes
    if not row_bytes or offset < 0 or offset + need > raw.nbytes:
        return None
    return raw[offset : offset + need].view(x.dtype).reshape((rows, *x.shape[1:]))


class PixelStrips(Sequence):
    """The official ``pixel_values`` (one float32 [3, p, h*w*p] strip per slice, see
    ``strip_layout``) as a read-only view of ``pixel_patches``: each strip is rebuilt on access
    (bit-identical: the same normalised values, moved), so a processor output does not hold every
    pixel twice (1.2 GB for a 10-minute video)."""

    def __init__(self, patches: np.ndarray, tgt_sizes: np.ndarray, patch_size: int = 14):
        self._patches = patches
        self._lengths = [int(h) * int(w) for h, w in np.asarray(tgt_sizes).reshape(-1, 2)]
        self._p = int(patch_size)

    def __len__(self) -> int:
        return len(self._lengths)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(len(self))[i]]
        n, p = self._lengths[i], self._p  # IndexError past the end, as a list
        x = self._patches[i if i >= 0 else len(self) + i, :n].reshape(n, 3, p, p)  # [k, c, kh, kw]
        return np.ascontiguousarray(x.transpose(1, 2, 0, 3)).reshape(3, p, n * p)

    def __eq__(self, other) -> bool:
        if not isinstance(other, Sequence) or len(other) != len(self):
            return False
        return all(np.array_equal(a, b) for a, b in zip(self, other, strict=True))

    __hash__ = None

    def __repr__(self) -> str:
        return f"PixelStrips({len(self)} slices)"


def patchify(piece: np.ndarray, patch_size: int = 14, out: np.ndarray | None = None) -> np.ndarray:
    """Patch vectors of one piece, inner order (channel, kh, kw) as the conv kernel flattens.

    Args:
      piece: uint8 [H, W, 3] with H = h*p, W = w*p.
      out: optional float32 [>= h*w, 3*p*p] buffer whose first h*w rows receive the result.

    Returns:
      float32 [h*w, 3*p*p].
    """
    p = patch_size
    hh, ww = piece.shape[0] // p, piece.shape[1] // p
    x = piece.reshape(hh, p, ww, p, 3).transpose(0, 2, 4, 1, 3)  # [h, w, c, kh, kw]
    x = x.reshape(hh * ww, 3 * p * p)
    if out is None:
        return normalize_u8(x)
    np.take(_LUT, x, out=out[: hh * ww])
    return out[: hh * ww]
