"""Files on disk: reading annotation JSON with clear errors, and finding the images it names.

Exports rarely name images by a path that still works where the data ended up: Label Studio
writes server paths (``/data/upload/3/7f53b8b6-cat.jpg``), Windows tools write backslashes, and
detectron2-style files list bare ``0.jpg``. :class:`ImageFinder` tries the path as written, then
the file's name anywhere under the export's folder, then the name without Label Studio's
8-hex-digit upload prefix. It never looks outside that folder (or ``images_dir`` when given).
"""
from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

from segkit.data.images import ImageError, image_files, image_size
from segkit.data.records import Problem

_UPLOAD_PREFIX = re.compile(r"^[0-9a-f]{8}-(.+)$")  # Label Studio's per-upload hash prefix


class DataError(ValueError):
    """The input cannot be read at all (bad JSON, empty export, unknown format); names the file."""


def read_json(path: Path) -> Any:
    """Parse a JSON file; raise DataError naming the file and the position of a syntax error."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: tolerate a BOM written by Windows tools
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from e
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from e
    if not text.strip():
        raise DataError(f"{path}: empty file")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON (line {e.lineno} column {e.colno}): {e.msg}") from e


def strip_upload_prefix(name: str) -> str:
    """``7f53b8b6-5c7dd76e-250436438.jpeg`` -> ``5c7dd76e-250436438.jpeg`` (unchanged if no prefix)."""
    m = _UPLOAD_PREFIX.match(name)
    return m.group(1) if m else name


def _split_reference(ref: str) -> tuple[str | None, str]:
    """(relative path worth trying or None, file name) for a path or URL as written in an export."""
    ref = ref.strip().replace("\\", "/")
    if "?d=" in ref:  # Label Studio local storage: /data/local-files/?d=folder/img.jpg
        rel = unquote(parse_qs(urlparse(ref).query).get("d", [""])[0])
        return rel, PurePosixPath(rel).name
    if "://" in ref:  # http(s)/s3/gs: never downloaded, only matched by name
        return None, PurePosixPath(unquote(urlparse(ref).path)).name
    if ref.startswith("/data/"):  # a Label Studio server path, meaningless on this disk
        return None, PurePosixPath(ref).name
    return ref, PurePosixPath(ref).name


class ImageFinder:
    """Resolve image references of one export; the name index is built once, on first need."""

    def __init__(self, root: Path, images_dir: Path | None = None):
        self.roots = [Path(images_dir)] if images_dir else []
        self.roots.append(Path(root))
        self._indexes: dict[int, dict[str, list[Path]]] = {}

    def find(self, ref: str, relative_to: Path) -> Path | None:
        """The existing file ``ref`` names, or None; ``relative_to`` is the folder of the export file."""
        rel, name = _split_reference(ref)
        bases = self.roots[:-1] + [Path(relative_to)]  # images_dir first, then beside the export file
        for i, base in enumerate(bases):
            if rel and (base / rel).is_file() and self._inside(base / rel):
                return base / rel
            index = self._index_of(i)
            hits = index.get(name) or index.get(strip_upload_prefix(name)) if name else None
            if name and not hits and not PurePosixPath(name).suffix:  # "/image1" names "image1.jpg"
                hits = index.get("stem:" + name)
            if hits:
                return _best_match(hits, rel or name)
        return None

    def _inside(self, path: Path) -> bool:
        resolved = path.resolve()
        return any(resolved.is_relative_to(r.resolve()) for r in self.roots)

    def _index_of(self, i: int) -> dict[str, list[Path]]:
        if i not in self._indexes:
            self._indexes[i] = _build_index(self.roots[i])
        return self._indexes[i]


def _build_index(root: Path) -> dict[str, list[Path]]:
    """Image files under ``root`` by name, by name without upload prefix, and by stem."""
    index: dict[str, list[Path]] = defaultdict(list)
    for path in image_files(root):
        for key in {path.name, strip_upload_prefix(path.name), "stem:" + path.stem}:
            index[key].append(path)
    return index


def _best_match(hits: list[Path], ref: str) -> Path:
    """Among files with the same name, the one sharing the most trailing folders with ``ref``."""
    want = PurePosixPath(ref).parts[::-1]

    def shared(p: Path) -> int:
        n = 0
        for a, b in zip(p.parts[::-1], want):
            if a != b:
                break
            n += 1
        return n

    return max(hits, key=lambda p: (shared(p), -len(p.parts)))


def locate_image(
    finder: ImageFinder, ref: str, relative_to: Path, declared: tuple[int, int] | None,
    export_file: Path, what: str, problems: list[Problem], found: Path | None = None,
) -> tuple[Path, int, int] | None:
    """Find and open the header of one listed image -> (path, width, height), or None with a problem.

    ``found`` skips the search (an image the reader already has). ``declared`` is the (width, height)
    the export states; a difference is noted, and the actual size (after EXIF orientation) wins
    because that is the image the model will see.
    """
    path = found or (finder.find(ref, relative_to) if ref else None)
    if path is None:
        where = ", ".join(str(r) for r in finder.roots)
        detail = f"{what}: image {ref!r} not found (searched {where})"
        problems.append(Problem("missing_image", str(export_file), detail, True))
        return None
    try:
        width, height = image_size(path)
    except ImageError as e:
        problems.append(Problem("unreadable_image", str(path), f"{what}: {e}", True))
        return None
    try:
        declared = (int(declared[0]), int(declared[1])) if declared else None
    except (TypeError, ValueError):
        declared = None  # absent or unusable: nothing to compare
    if declared and all(declared) and declared != (width, height):
        hint = " (EXIF rotation?)" if declared == (height, width) else ""
        problems.append(Problem(
            "size_mismatch", str(path),
            f"{what}: export says {declared[0]}x{declared[1]}, image is {width}x{height}{hint}; using the image's size",
        ))
    return path, width, height
