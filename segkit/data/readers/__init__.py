"""Read any supported export into one validated :class:`DatasetRecords`.

``load_dataset`` finds the format from what is on disk (``fmt`` forces it), reads it, and returns
only usable images and instances; everything that was dropped or fixed is in ``records.problems``.
A folder with ``train/`` (and ``val/``, ``test/``) subfolders is read split by split.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from segkit.data.readers.coco import is_label_studio, read_coco
from segkit.data.readers.files import DataError, read_json
from segkit.data.readers.labelme import read_labelme
from segkit.data.readers.labelstudio import read_labelstudio
from segkit.data.records import DatasetRecords
from segkit.data.splits import SPLITS

__all__ = ["FORMATS", "DataError", "load_dataset"]

FORMATS = ("labelstudio-coco", "labelstudio-json", "labelme", "coco")
_READERS = {
    "labelstudio-coco": read_coco, "coco": read_coco, "labelstudio-json": read_labelstudio, "labelme": read_labelme,
}


def load_dataset(path: str | Path, fmt: str | None = None, images_dir: str | Path | None = None,
                 api_key: str | None = None) -> DatasetRecords:
    """Read an export (file or folder); ``images_dir`` is searched for images before the export's folder.

    A Label Studio project URL (``http://host:8080/projects/3``) is read live through its API with
    ``api_key`` (default ``$LABEL_STUDIO_API_KEY``), images cached: see :mod:`segkit.labelstudio.project`.
    Raises DataError, naming the file, when the input cannot be read at all (bad JSON, empty
    export, unknown format). Problems with single images or annotations are collected instead.
    """
    if str(path).startswith(("http://", "https://")):
        from segkit.labelstudio.project import load_project  # imports httpx: only when asked

        return load_project(str(path), api_key)
    path = Path(path)
    if fmt is not None and fmt not in FORMATS:
        raise DataError(f"unknown format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if images_dir is not None and not Path(images_dir).is_dir():
        raise DataError(f"{images_dir}: images folder not found")
    images_dir = Path(images_dir) if images_dir is not None else None
    if path.is_dir() and (path / "train").is_dir():
        return _load_splits(path, fmt, images_dir)
    file, data, found_fmt = _detect(path, fmt)
    return _READERS[found_fmt](file, data, images_dir)


def _load_splits(path: Path, fmt: str | None, images_dir: Path | None) -> DatasetRecords:
    """Each split folder is its own export; classes are the union, sorted, so labels agree across splits."""
    parts = []
    for split in SPLITS:
        if (path / split).is_dir():
            records = load_dataset(path / split, fmt, images_dir)
            for image in records.images:
                image.split = split
            parts.append(records)
    formats = sorted({r.format for r in parts})
    return DatasetRecords(
        format=formats[0] if len(formats) == 1 else "+".join(formats),
        source=path,
        images=[im for r in parts for im in r.images],
        classes=sorted(set().union(*(r.classes for r in parts))),
        problems=[p for r in parts for p in r.problems],
    )


def _detect(path: Path, fmt: str | None) -> tuple[Path, Any, str]:
    """(annotation file or labelme folder, its parsed JSON if already read, format name)."""
    if path.is_file():
        data = read_json(path)
        kind = _kind(data)
        if kind is None:
            raise DataError(f"{path}: not a known export format ({', '.join(FORMATS)})")
        if fmt and not _compatible(kind, fmt):
            raise DataError(f"{path}: looks like {kind}, not {fmt}")
        return path, data, fmt or kind
    if fmt == "labelme":
        return path, None, "labelme"
    # result.json first (Label Studio's COCO export beats a tasks JSON beside it), then the largest
    # files: an export of many images is bigger than the per-image labelme files it may sit with.
    others = [p for p in path.glob("*.json") if p.name != "result.json"] + list(path.glob("annotations/*.json"))
    candidates = [path / "result.json"] if (path / "result.json").is_file() else []
    candidates += sorted(others, key=lambda p: (-p.stat().st_size, p.name))
    first_error = None
    for candidate in candidates:
        try:
            data = read_json(candidate)
        except DataError as e:
            if candidate.name == "result.json":
                raise
            first_error = first_error or e
            continue
        kind = _kind(data)
        if kind == "labelme" and fmt is None:
            return path, None, "labelme"
        if kind and (fmt is None or _compatible(kind, fmt)):
            return candidate, data, fmt or kind
    if first_error:
        raise first_error
    if fmt is None and any(path.rglob("*.json")):
        return path, None, "labelme"  # labelme files in subfolders; the reader says if there are none
    raise DataError(
        f"{path}: no annotation export found (looked for result.json, a Label Studio or COCO JSON, "
        f"or labelme JSON files; formats: {', '.join(FORMATS)})"
    )


def _kind(data: Any) -> str | None:
    if isinstance(data, list):
        return "labelstudio-json"  # an empty list is an empty Label Studio export
    if not isinstance(data, dict):
        return None
    if isinstance(data.get("images"), list):
        return "labelstudio-coco" if is_label_studio(data) else "coco"
    if "shapes" in data:
        return "labelme"
    if "data" in data and "annotations" in data:
        return "labelstudio-json"
    return None


def _compatible(kind: str, fmt: str) -> bool:
    coco = {"coco", "labelstudio-coco"}
    return kind == fmt or (kind in coco and fmt in coco)
