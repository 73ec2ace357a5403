"""``segkit predict``: segment images, folders or globs and write everything a person or a tool needs.

Output folder::

    overlays/<name>.png   the image with masks, boxes and labels drawn
    masks/<name>.png      one instance id per pixel (0 background, 1..N in score order)
    predictions.json      COCO: images, categories (the checkpoint's classes, ids 1..N), annotations
                          with RLE masks, xywh boxes, areas and scores
    labelstudio.json      tasks to import into Label Studio as pre-annotations
    records/<name>.json   one per finished image; a re-run skips images whose record is there

``<name>`` is the image's file stem; images with the same stem get as many parent folders as
needed to tell them apart (``a__img``, ``b__img``; ``img_jpg``, ``img_png`` within one folder).
A record counts only for the same image file, checkpoint file and score threshold; anything else
is predicted again. The two json files always describe every image of the current sources,
whether predicted now or by an earlier run.

Label Studio tasks name their image by ``--image-root-url`` + the image's path relative to the
folder given on the command line (or the fixed part of a glob, or just its file name). With
local-files storage rooted at ``/srv`` and images in ``/srv/photos``::

    segkit predict photos/ --image-root-url '/data/local-files/?d=photos/' ...  # -> ?d=photos/sub/a.jpg

Without it, tasks carry the image path as given.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from segkit.export import DEFAULT_FROM_NAME, DEFAULT_TO_NAME, image_entry, to_coco, to_labelstudio
from segkit.images import IMAGE_EXTENSIONS, ImageError, load_image

if TYPE_CHECKING:
    from segkit.predict import Predictor


class SourceError(ValueError):
    """A source names nothing that exists; the message says which."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("sources", nargs="+", metavar="SOURCE", help="images, folders (searched recursively) or globs")
    p.add_argument("--checkpoint", required=True, help="a segkit checkpoint (best.pt)")
    p.add_argument("--out", required=True, help="output folder; a re-run into it skips images already done")
    p.add_argument("--score-threshold", type=float, default=None,
                   help="keep instances scoring at least this (default: the checkpoint's)")
    p.add_argument("--batch-size", type=int, default=4, help="images per forward pass")
    p.add_argument("--max-detections", type=int, default=100, help="most instances per image")
    p.add_argument("--from-name", default=DEFAULT_FROM_NAME,
                   help="Label Studio: name of the PolygonLabels/BrushLabels tag in the labeling config")
    p.add_argument("--to-name", default=DEFAULT_TO_NAME, help="Label Studio: name of the Image tag")
    p.add_argument("--ls-brush", action="store_true",
                   help="Label Studio: write lossless brush masks instead of editable polygons")
    p.add_argument("--image-root-url", default=None, metavar="PREFIX",
                   help="Label Studio: task image = PREFIX + the image's path relative to its source folder, "
                        "e.g. '/data/local-files/?d=photos/' for local-files storage (default: the image path)")


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    from segkit.checkpoint import CheckpointError, load_checkpoint

    try:
        images = find_images(args.sources, exclude=out)
        if not images:
            raise SourceError(f"no images in {' '.join(args.sources)} "
                              f"(extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})")
        ckpt = load_checkpoint(args.checkpoint)
    except (SourceError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    classes = list(ckpt["classes"])
    threshold = ckpt.get("score_threshold", 0.5) if args.score_threshold is None else args.score_threshold
    run_key = {"checkpoint": _file_identity(Path(args.checkpoint)), "score_threshold": threshold}
    names = unique_names([path for path, _ in images])
    for sub in ("overlays", "masks", "records"):
        (out / sub).mkdir(parents=True, exist_ok=True)

    todo = [(path, name) for (path, _), name in zip(images, names) if _load_record(out, name, path, run_key) is None]
    if len(todo) < len(images):
        print(f"{len(images) - len(todo)} of {len(images)} images already done in {out}; skipping them")
    failed = []
    if todo:  # building the model takes seconds; a finished folder only needs its json rewritten
        from segkit.predict import Predictor

        predictor = Predictor.from_loaded_checkpoint(ckpt, args.checkpoint, max_detections=args.max_detections)
        failed = predict_images(predictor, todo, out, threshold, run_key, max(1, args.batch_size))

    entries = _finished_entries(out, images, names, run_key)
    write_outputs(out, entries, classes, _model_version(Path(args.checkpoint), ckpt.get("epoch")), args)
    n_instances = sum(len(e["annotations"]) for e in entries)
    print(f"{len(entries)} images, {n_instances} instances (score >= {threshold:g}); "
          f"wrote {out}/predictions.json, labelstudio.json, overlays/, masks/")
    for path, error in failed:
        print(f"failed: {path}: {error}", file=sys.stderr)
    return 1 if failed else 0


def write_outputs(out: Path, entries: list[dict[str, Any]], classes: list[str], model_version: str,
                  args: argparse.Namespace) -> None:
    """predictions.json and labelstudio.json of ``entries``, written atomically."""
    _write_json(out / "predictions.json", to_coco(entries, classes))
    tasks = to_labelstudio(entries, model_version, args.from_name, args.to_name, args.ls_brush, args.image_root_url)
    _write_json(out / "labelstudio.json", tasks)


def _finished_entries(out: Path, images: list[tuple[Path, str]], names: list[str],
                      run_key: dict[str, Any]) -> list[dict[str, Any]]:
    """The entries of every image of this run that has a record, in source order."""
    entries = []
    for (path, ref), name in zip(images, names):
        record = _load_record(out, name, path, run_key)
        if record is not None:
            # Paths as given now, not as in the run that made the record (it may have run elsewhere).
            entries.append({**record["entry"], "file_name": str(path), "image_ref": ref})
    return entries


def predict_images(predictor: Predictor, todo: list[tuple[Path, str]], out: Path, threshold: float,
                   run_key: dict[str, Any], batch_size: int) -> list[tuple[Path, str]]:
    """Predict ``(path, name)`` pairs in batches, writing overlay, mask and record per image.

    The record is written last, so an interrupted run redoes exactly the unfinished images.
    Returns ``(path, error)`` for images that could not be read.
    """
    from segkit.visualize import instance_mask_png, overlay

    failed: list[tuple[Path, str]] = []
    batches = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
    # Decoding the next batch's JPEGs in a thread overlaps it with the forward pass.
    with ThreadPoolExecutor(max_workers=1) as pool, \
            tqdm(total=len(todo), desc="predict", unit="img", dynamic_ncols=True) as bar:
        pending = pool.submit(_load_batch, batches[0]) if batches else None
        for i, batch in enumerate(batches):
            loaded = pending.result()
            pending = pool.submit(_load_batch, batches[i + 1]) if i + 1 < len(batches) else None
            ok = [(path, name, image) for (path, name), image in zip(batch, loaded) if not isinstance(image, str)]
            failed += [(path, image) for (path, _), image in zip(batch, loaded) if isinstance(image, str)]
            predictions = predictor.predict_batch([image for _, _, image in ok], threshold) if ok else []
            for (path, name, image), prediction in zip(ok, predictions):
                overlay(image, prediction).save(out / "overlays" / f"{name}.png")
                instance_mask_png(prediction).save(out / "masks" / f"{name}.png")
                entry = image_entry(str(path), image.width, image.height, prediction)
                _write_json(out / "records" / f"{name}.json",
                            {"source": str(path.resolve()), "run": run_key, "entry": entry})
            bar.update(len(batch))
    return failed


def _load_batch(batch: list[tuple[Path, str]]) -> list:
    """Images of a batch; an unreadable one becomes its error message instead of stopping the run."""
    loaded = []
    for path, _ in batch:
        try:
            loaded.append(load_image(path))
        except ImageError as e:
            loaded.append(str(e))
    return loaded


def find_images(sources: list[str], exclude: Path | None = None) -> list[tuple[Path, str]]:
    """``(path, reference)`` for every image the sources name, each file once, in a stable order.

    The reference is the path relative to the folder given (or to the fixed part of a glob), or
    the file name for a file given by name; it is what ``--image-root-url`` is prefixed to.
    Folders and globs keep only files with image extensions; files named one by one are taken as
    they are. Anything under ``exclude`` (the output folder) is skipped.
    """
    found: list[tuple[Path, str]] = []
    for source in sources:
        path = Path(source)
        if path.is_file():
            found.append((path, path.name))
        elif path.is_dir():
            found += [(f, f.relative_to(path).as_posix()) for f in _images_under(path)]
        elif glob.has_magic(source):
            base = _glob_base(source)
            for match in sorted(glob.glob(source, recursive=True)):
                m = Path(match)
                if m.is_dir():
                    found += [(f, Path(os.path.relpath(f, base)).as_posix()) for f in _images_under(m)]
                elif m.suffix.lower() in IMAGE_EXTENSIONS:
                    found.append((m, Path(os.path.relpath(m, base)).as_posix()))
        else:
            raise SourceError(f"{source}: no such file or folder, and no glob pattern")
    skip = exclude.resolve() if exclude is not None else None
    seen, unique = set(), []
    for path, ref in found:
        key = path.resolve()
        if key in seen or (skip is not None and key.is_relative_to(skip)):
            continue
        seen.add(key)
        unique.append((path, ref))
    return unique


def _images_under(folder: Path) -> list[Path]:
    files = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        files += [Path(root) / n for n in sorted(names) if Path(n).suffix.lower() in IMAGE_EXTENSIONS]
    return files


def _glob_base(pattern: str) -> str:
    """The folder part of a glob before its first wildcard: ``data/*/img.jpg`` -> ``data``."""
    parts = Path(pattern).parts
    fixed = []
    for part in parts[:-1]:
        if glob.has_magic(part):
            break
        fixed.append(part)
    return str(Path(*fixed)) if fixed else "."


def unique_names(paths: list[Path]) -> list[str]:
    """Output names: the file stem, with parent folders prepended (``a__img``) only where stems clash.

    ``img.jpg`` and ``img.png`` in one folder become ``img_jpg`` and ``img_png``.
    """
    parents = [p.resolve().parent.parts for p in paths]
    in_folder = Counter((parent, p.stem) for parent, p in zip(parents, paths))
    stems = [f"{p.stem}_{p.suffix.lstrip('.')}" if in_folder[(parent, p.stem)] > 1 else p.stem
             for parent, p in zip(parents, paths)]
    depth = [0] * len(paths)
    while True:  # ends: clashing names now come from different folders, which differ at some depth
        names = ["__".join([*parents[i][len(parents[i]) - depth[i]:], stems[i]]) for i in range(len(paths))]
        counts = Counter(names)
        clashing = [i for i, n in enumerate(names) if counts[n] > 1 and depth[i] < len(parents[i])]
        if not clashing:
            return names
        for i in clashing:
            depth[i] += 1


def _model_version(checkpoint: Path, epoch: int | None) -> str:
    """``run/best-epoch12``: what Label Studio shows to tell predictions of different models apart."""
    version = f"{checkpoint.parent.name}/{checkpoint.stem}" if checkpoint.parent.name else checkpoint.stem
    return version + (f"-epoch{epoch}" if epoch is not None else "")


def _file_identity(path: Path) -> str:
    # Path, size and modification time: a retrained best.pt at the same path is a different model.
    st = path.stat()
    return f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"


def _load_record(out: Path, name: str, path: Path, run_key: dict[str, Any]) -> dict | None:
    """The record of a finished image, or None when missing, unreadable or made from another image or model."""
    try:
        record = json.loads((out / "records" / f"{name}.json").read_text())
    except (OSError, ValueError):
        return None
    if record.get("source") != str(path.resolve()) or record.get("run") != run_key:
        return None
    return record


def _write_json(path: Path, data: Any) -> None:
    # Write then rename: an interrupted run never leaves a half-written file that looks finished.
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, separators=(",", ":")))
    os.replace(tmp, path)
