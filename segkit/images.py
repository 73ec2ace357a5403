"""Open images the way annotators saw them: EXIF orientation applied, any mode converted to RGB.

Annotation tools (Label Studio in the browser, labelme) display photos with their EXIF rotation
applied, so coordinates are relative to the rotated image; reading pixels without applying it
would misalign every mask of a phone photo. Files are identified by content, not by extension.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".jfif", ".pgm", ".ppm"}
)
_ORIENTATION_TAG = 0x0112
_SWAPS_AXES = {5, 6, 7, 8}  # EXIF orientations that rotate by 90 degrees


class ImageError(ValueError):
    """An image file is missing, corrupt or not an image; the message names the file."""


ImageInput = Image.Image | np.ndarray | str | os.PathLike


def load_image(path: str | os.PathLike, max_side: int | None = None) -> Image.Image:
    """Read an image as RGB with its EXIF orientation applied; raise ImageError naming the file.

    ``max_side`` downscales a larger image (keeping its aspect ratio) so that neither side exceeds it:
    the masks of a 50 MP phone photo would not fit in memory, and the model resizes it anyway.
    """
    path = Path(path)
    try:
        with _open(path) as im:
            im = ImageOps.exif_transpose(im)  # also forces a full decode: truncated data fails here
            im = to_rgb(im)
    except ImageError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError(f"{path}: corrupt or truncated image data ({e})") from e
    return downscale(im, max_side, copy=False)  # the decoded image is ours: shrink it in place


def downscale(image: Image.Image, max_side: int | None, copy: bool = True) -> Image.Image:
    """``image`` shrunk (aspect ratio kept) so that neither side exceeds ``max_side``; None keeps it.

    ``copy=False`` shrinks ``image`` itself, sparing a copy of a large image that is about to be dropped.
    """
    if max_side is not None and max(image.size) > max_side:
        image = image.copy() if copy else image
        image.thumbnail((max_side, max_side), Image.Resampling.BILINEAR)
    return image


def as_rgb(image: ImageInput) -> Image.Image:
    """Accept a PIL image, an (H, W[, C]) uint8 array or a path; return an RGB PIL image."""
    if isinstance(image, (str, os.PathLike)):
        return load_image(image)
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
    path = Path(path)
    with _open(path) as im:
        width, height = im.size
        return (height, width) if _orientation(im) in _SWAPS_AXES else (width, height)


def _open(path: Path) -> Image.Image:
    if not path.exists():
        raise ImageError(f"{path}: file not found")
    if not path.is_file():
        raise ImageError(f"{path}: not a file")
    try:
        return Image.open(path)
    except UnidentifiedImageError as e:
        raise ImageError(f"{path}: not an image, or a format Pillow cannot read") from e
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError(f"{path}: cannot read the image header ({e})") from e


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
        # Pillow's convert() clips 16-bit values at 255 (a white image); scale the range instead.
        a = np.asarray(im).astype(np.float64)
        if im.mode == "F" and a.size and a.max() <= 1.0:
            a = a * 255.0
        elif a.size and a.max() > 255:
            a = a / 257.0  # 0..65535 -> 0..255
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8)).convert("RGB")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")  # avoids Pillow's warning about palette transparency
    return im.convert("RGB")
