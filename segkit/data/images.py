"""Open images the way annotators saw them: EXIF orientation applied, any mode converted to RGB.

Annotation tools (Label Studio in the browser, labelme) display photos with their EXIF rotation
applied, so coordinates are relative to the rotated image; reading pixels without applying it
would misalign every mask of a phone photo. Files are identified by content, not by extension.

Large images: ``max_pixels`` refuses an image from its header, before any pixel is decoded (a
20 KB PNG can hold 169 MP of zeros: a decompression bomb), and ``max_side`` decodes a JPEG at
1/2, 1/4 or 1/8 scale in libjpeg when that still covers the size asked for, so a 50 MP phone photo
never exists at full size in memory. Only the formats in :data:`FORMATS` are opened: containers such
as ICO or ICNS state one size in their header and may decode another image inside. Of a file with many
frames or pages only the first is decoded, and that is the size checked. A 16-bit or float image is
shrunk in its own mode before it becomes 8-bit RGB, never copied at full size as floats. Pillow's own guard (``PIL.Image.MAX_IMAGE_PIXELS``, which
warns above 89 MP and refuses above 179 MP) is process-wide state, so it is left alone.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".jfif", ".pgm", ".ppm"}
)
# What a service (the demo, the Label Studio backend) accepts by default: a 50 or 64 MP phone photo
# passes; a 108 MP one needs a higher limit. Readers of one's own datasets pass no limit.
DEFAULT_MAX_PIXELS = 100_000_000
# Pillow's names of the formats of IMAGE_EXTENSIONS (JPEG also opens MPO: a phone's JPEG with a second image)
FORMATS = ("JPEG", "PNG", "BMP", "GIF", "TIFF", "WEBP", "PPM")
MAX_PIXELS_OPTION = "--max-pixels"  # what the messages tell users to raise; the services' option
_ORIENTATION_TAG = 0x0112
_SWAPS_AXES = {5, 6, 7, 8}  # EXIF orientations that rotate by 90 degrees
_RESAMPLE = Image.Resampling.BILINEAR
_REDUCING_GAP = 2.0  # integer reduce() first, then bilinear: what Image.thumbnail does by default


class ImageError(ValueError):
    """An image file is missing, corrupt or not an image; the message names the file."""


class ImageTooLargeError(ImageError):
    """An image has more pixels than the caller's limit (or Pillow's); the message says how many and the limit."""


ImageInput = Image.Image | np.ndarray | str | os.PathLike


def load_image(path: str | os.PathLike, max_side: int | None = None,
               max_pixels: int | None = None) -> Image.Image:
    """Read an image as RGB with its EXIF orientation applied; raise ImageError naming the file.

    ``max_side`` downscales a larger image (keeping its aspect ratio) so that neither side exceeds it:
    the masks of a 50 MP phone photo would not fit in memory, and the model resizes it anyway. A JPEG
    is then decoded at reduced scale, never at full size. ``max_pixels`` refuses an image with more
    pixels than that, from its header alone (:class:`ImageTooLargeError`); None: Pillow's limit only.
    """
    return load_scaled(path, max_side, max_pixels)[0]


def load_scaled(path: str | os.PathLike, max_side: int | None = None,
                max_pixels: int | None = None) -> tuple[Image.Image, tuple[int, int]]:
    """:func:`load_image`'s image, and the original's (width, height) after EXIF orientation.

    What was found on the reduced image can then be stated at the original's size, e.g. with
    ``segkit.labelstudio.preannotations.prediction_result(..., original_size=...)``.
    """
    path = Path(path)
    try:
        with _open(path, max_pixels) as im:
            size = im.size
            target = _fit(size, max_side)
            if target != size:
                # JPEG: libjpeg decodes at the smallest 1/2^k scale that still covers target (other
                # formats ignore this). Sizes here are as stored, before EXIF; _fit treats both sides alike.
                im.draft(None, target)
            im.load()  # truncated data fails here
            if _orientation(im) in _SWAPS_AXES:  # read after load: a PNG's eXIf may follow its pixels
                size, target = size[::-1], target[::-1]
            im = ImageOps.exif_transpose(im)
            if (im.mode.startswith("I") or im.mode == "F") and im.size != target:
                im = im.resize(target, _RESAMPLE)  # 2-4 bytes a pixel: shrunk first (reduce() takes no I;16)
            im = to_rgb(im)
    except ImageError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError(f"{path}: corrupt or truncated image data ({e})") from e
    return _resize(im, target), size


def downscale(image: Image.Image, max_side: int | None) -> Image.Image:
    """``image`` shrunk (aspect ratio kept) so that neither side exceeds ``max_side``; None keeps it.

    The size is the one :func:`load_image` gives for the same ``max_side``.
    """
    return _resize(image, _fit(image.size, max_side))


def as_rgb(image: ImageInput, max_pixels: int | None = None) -> Image.Image:
    """Accept a PIL image, an (H, W[, C]) uint8 array or a path; return an RGB PIL image.

    ``max_pixels`` refuses a larger image (:class:`ImageTooLargeError`); in-memory input is
    called "the image" in the message.
    """
    if isinstance(image, (str, os.PathLike)):
        return load_image(image, max_pixels=max_pixels)
    size = (image.shape[1], image.shape[0]) if isinstance(image, np.ndarray) else image.size
    _check_pixels(size, max_pixels, "the image")
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    return to_rgb(image)


def image_files(folder: str | os.PathLike) -> list[Path]:
    """Every image file under ``folder`` (by extension), recursively, sorted; hidden folders are skipped."""
    files = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # .git, .segkit_cache
        files += [Path(root) / n for n in sorted(names) if Path(n).suffix.lower() in IMAGE_EXTENSIONS]
    return files


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) after EXIF orientation, reading only the file header."""
    with _open(Path(path)) as im:
        return _displayed_size(im)


def _open(path: Path, max_pixels: int | None = None) -> Image.Image:
    """The image, opened lazily: only its header is read, and checked against ``max_pixels``."""
    if not path.exists():
        raise ImageError(f"{path}: file not found")
    if not path.is_file():
        raise ImageError(f"{path}: not a file")
    try:
        im = Image.open(path, formats=FORMATS)
    except UnidentifiedImageError as e:
        raise ImageError(f"{path}: not an image in a format segkit reads ({', '.join(FORMATS)})") from e
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:  # the warning: under -W error
        raise _refused_by_pillow(path, e, max_pixels) from e
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{path}: cannot read the image header ({e})") from e
    try:
        _check_pixels(_displayed_size(im), max_pixels, str(path))
    except ImageError:
        im.close()
        raise
    return im


def _fit(size: tuple[int, int], max_side: int | None) -> tuple[int, int]:
    """``size`` scaled so that neither side exceeds ``max_side`` (None or already small: unchanged).

    Both sides are treated alike, so the size of a turned image is this size turned.
    """
    if max_side is None or max(size) <= max_side:
        return size
    scale = max_side / max(size)
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def _resize(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    return image if image.size == size else image.resize(size, _RESAMPLE, reducing_gap=_REDUCING_GAP)


def _check_pixels(size: tuple[int, int], max_pixels: int | None, name: str) -> None:
    width, height = size
    if max_pixels is not None and width * height > max_pixels:
        raise ImageTooLargeError(f"{name}: {width}x{height} pixels ({_megapixels(width * height)}) is over the "
                                 f"limit of {_megapixels(max_pixels)}, a guard against decompression bombs; "
                                 f"raise it with {MAX_PIXELS_OPTION} if the image is genuine")


def _refused_by_pillow(path: Path, error: Exception, max_pixels: int | None) -> ImageError:
    """Pillow refused to open an image over its own limit, before we could read the size: say it our way."""
    found = re.search(r"\((\d+) pixels\) exceeds limit of (\d+)", str(error))
    if not found:
        return ImageError(f"{path}: cannot read the image header ({error})")
    pixels, pillow_limit = int(found[1]), int(found[2])
    if max_pixels is not None and max_pixels < pillow_limit:  # the caller's limit is the one that matters
        return ImageTooLargeError(f"{path}: {_megapixels(pixels)} is over the limit of {_megapixels(max_pixels)}, a "
                                  f"guard against decompression bombs; raise it with {MAX_PIXELS_OPTION} "
                                  f"if the image is genuine")
    return ImageTooLargeError(f"{path}: {_megapixels(pixels)} is over Pillow's limit of {_megapixels(pillow_limit)}, "
                              f"a guard against decompression bombs (PIL.Image.MAX_IMAGE_PIXELS sets it for "
                              f"the whole process)")


def _megapixels(pixels: int) -> str:
    return f"{round(pixels / 1e6, 1):g} MP"


def _displayed_size(im: Image.Image) -> tuple[int, int]:
    width, height = im.size
    return (height, width) if _orientation(im) in _SWAPS_AXES else (width, height)


def _orientation(im: Image.Image) -> int:
    # Pillow reads a PNG's whole pixel data to look for an eXIf chunk stored after it; writers put
    # eXIf before the pixels in practice, so only a header-level chunk is honoured (keeps this fast).
    if im.format == "PNG" and "exif" not in im.info:
        return 1
    try:
        return int(im.getexif().get(_ORIENTATION_TAG, 1))
    except Exception:  # a malformed EXIF block should not make the image unusable
        return 1


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode as RGB; 16-bit and float images are scaled to 0..255, not clipped."""
    if im.mode == "RGB":
        return im
    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        # Pillow's convert() clips 16-bit values at 255 (a white image); scale the range instead. float32,
        # in place: one copy of 4 bytes a pixel, where float64 and temporaries took 8 bytes several times over
        a = np.asarray(im, dtype=np.float32)
        top = float(a.max()) if a.size else 0.0
        if im.mode == "F" and top <= 1.0:
            a *= 255.0
        elif top > 255:
            a /= 257.0  # 0..65535 -> 0..255
        np.rint(a, out=a)
        np.clip(a, 0, 255, out=a)
        return Image.fromarray(a.astype(np.uint8)).convert("RGB")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")  # avoids Pillow's warning about palette transparency
    return im.convert("RGB")
