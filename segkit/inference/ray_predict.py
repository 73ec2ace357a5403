"""``segkit predict --ray``: a Ray Data actor pool, one model per actor, over a folder or an object-store prefix.

The command lists the image files with pyarrow's file systems (a local folder, ``file://``, ``s3://``,
``gs://``); Ray Data reads them on the workers (``ray.data.read_binary_files``) and streams them to
``--workers`` actors that each load the checkpoint once (``map_batches`` with a callable class); their
answers stream back here, where the output folder is written as they come, as :mod:`segkit.inference.predict_files`
describes: ``predictions.json``, ``labelstudio.json``, ``masks/`` and (unless ``--no-overlays``)
``overlays/``. A bucket is never copied to this machine: only each image's masks and overlay come back.

On a cluster (``--ray auto`` on a node of it, or ``--ray ray://head:10001``), every worker must be able
to read ``--checkpoint`` at the same path (shared storage, or the same file put on every node) and have
segkit installed; cloud credentials come from each node's environment, as for any pyarrow reader.
Unlike the torchrun path, a run keeps no per-image records: Ray retries failed tasks and restarts dead
actors within a run, and a new run predicts every image again.
"""
from __future__ import annotations

import argparse
import io
import json
import posixpath
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segkit.atomic import atomic_write
from segkit.data.images import IMAGE_EXTENSIONS, ImageError, load_image
from segkit.evaluation.coco import image_entry
from segkit.inference.predictor import Predictor
from segkit.inference.tiles import Tiling
from segkit.inference.tta import TTA
from segkit.inference.visualize import mask_png, overlay
from segkit.models.checkpoint import load_checkpoint, model_version, task_of
from segkit.tasks import get_task
from segkit.inference.predict_files import (LabelStudioOptions, SourceError, find_images, unique_names,
                                  write_outputs)


def predict_with_ray(args: argparse.Namespace, ls: LabelStudioOptions, tiling: Tiling | None = None,
                     tta: TTA | None = None) -> int:
    """``segkit predict --ray``: 0 when every image was predicted, 1 when some could not be read, 2 on bad input.
    ``tiling`` and ``tta``: as :meth:`~segkit.inference.predictor.Predictor.tile` and ``.augment`` take them."""
    import dataclasses

    import ray  # optional: segkit[ray]

    if len(args.sources) != 1:
        raise SourceError("--ray takes one SOURCE: a folder or a URI prefix (s3://bucket/photos/)")
    out = Path(args.out)
    ckpt = load_checkpoint(args.checkpoint)  # refused here, before a cluster is started, if unusable
    if get_task(task_of(ckpt)).region == "brush":
        ls = dataclasses.replace(ls, brush=True)
    threshold = ckpt.get("score_threshold", 0.5) if args.score_threshold is None else args.score_threshold
    started = not ray.is_initialized()
    if started:  # no ADDRESS: a Ray of this machine's own, gone when the command ends
        ray.init(address=None if args.ray == "local" else args.ray, include_dashboard=False,
                 log_to_driver=False)
    try:
        entries, failed = _predict_rows(args, threshold, out, tiling, tta)
    finally:
        if started:
            ray.shutdown()
    write_outputs(out, entries, list(ckpt["classes"]), model_version(args.checkpoint), ls)
    n = sum(len(e["annotations"]) for e in entries)
    print(f"{len(entries)} images, {n} instances or class regions (score >= {threshold:g}) on {args.workers} Ray "
          f"worker(s); wrote {out}/predictions.json, labelstudio.json, masks/"
          + ("" if args.no_overlays else ", overlays/"))
    for path, error in failed:
        print(f"failed: {path}: {error}", file=sys.stderr)
    return 1 if failed else 0


def _predict_rows(args: argparse.Namespace, threshold: float, out: Path, tiling: Tiling | None,
                  tta: TTA | None) -> tuple[list[dict], list[tuple[str, str]]]:
    """Every predicted image's entry, in the order one process lists them, and ``(image, error)`` of the others;
    masks and overlays are written as answers stream in, so the driver never holds more than the entries."""
    import ray.data

    files, refs, filesystem, shown = _list_source(args.sources[0], out)
    names = dict(zip(files, unique_names([Path("/", f.lstrip("/")) for f in files])))
    # Reading is waiting on storage, not computing: readers that asked for a CPU would wait behind actors
    # holding every CPU (a local Ray of N cores with N workers never starts reading).
    ds = ray.data.read_binary_files(files, filesystem=filesystem, include_paths=True, num_cpus=0)
    ds = ds.map_batches(PredictActor, batch_size=max(1, args.batch_size), concurrency=args.workers,
                        num_cpus=args.cpus_per_worker, num_gpus=args.gpus_per_worker or None,
                        fn_constructor_kwargs={"checkpoint": str(Path(args.checkpoint).resolve()),
                                               "threshold": threshold, "max_detections": args.max_detections,
                                               "threads": max(1, int(args.cpus_per_worker)),
                                               "cuda": args.gpus_per_worker > 0, "overlays": not args.no_overlays,
                                               "tiling": tiling, "tta": tta})
    for sub in ("masks", *(() if args.no_overlays else ("overlays",))):
        (out / sub).mkdir(parents=True, exist_ok=True)
    entries, errors = {}, {}
    for row in ds.iter_rows():
        path = str(row["path"])
        if row["error"]:
            errors[path] = row["error"]
            continue
        atomic_write(out / "masks" / f"{names[path]}.png", bytes(row["mask"]))
        if not args.no_overlays:
            atomic_write(out / "overlays" / f"{names[path]}.png", bytes(row["overlay"]))
        entries[path] = json.loads(row["entry"])
    done = [{**entries[f], "file_name": shown(ref), "image_ref": ref} for f, ref in zip(files, refs) if f in entries]
    return done, [(shown(ref), errors[f]) for f, ref in zip(files, refs) if f in errors]


def _list_source(source: str, out: Path):
    """The image files of a folder or URI prefix in the order one process lists a folder (paths as Ray reads
    them), their paths under the source, the pyarrow file system, and how an image is named in the json files.

    The files are listed here, once, so that their output names are known before any answer comes back;
    a local folder exactly as one process lists it (hidden folders and the output folder left out).
    """
    from pyarrow import fs

    if "://" in source:
        filesystem, base = fs.FileSystem.from_uri(source)
        base = base.rstrip("/")
        infos = filesystem.get_file_info(fs.FileSelector(base, recursive=True, allow_not_found=True))
        refs = sorted((posixpath.relpath(i.path, base) for i in infos if i.type == fs.FileType.File
                       and posixpath.splitext(i.path)[1].lower() in IMAGE_EXTENSIONS), key=walk_order)
        refs = [r for r in refs if not any(part.startswith(".") for part in r.split("/")[:-1])]
        prefix = source.rstrip("/")
        files, shown = [f"{base}/{r}" for r in refs], (lambda ref: f"{prefix}/{ref}")
    else:
        folder = Path(source)
        if not folder.is_dir():
            raise SourceError(f"{source}: --ray reads a folder or a URI prefix, and this is neither")
        found = find_images([source], exclude=out)
        files, refs = [str(p.resolve()) for p, _ in found], [ref for _, ref in found]
        filesystem, shown = fs.LocalFileSystem(), (lambda ref: str(folder / ref))
    if not files:
        raise SourceError(f"no images in {source} (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})")
    return files, refs, filesystem, shown


def walk_order(ref: str) -> list[tuple[int, str]]:
    """Sort key of a relative path in :func:`segkit.data.images.image_files`' order: a folder's files by name,
    then its sub-folders by name."""
    *folders, name = ref.split("/")
    return [(1, f) for f in folders] + [(0, name)]


class PredictActor:
    """One Ray actor's model: ``map_batches`` builds it once per actor and calls it on batches of files."""

    def __init__(self, checkpoint: str, threshold: float, max_detections: int | None, threads: int,
                 cuda: bool, overlays: bool, tiling: Tiling | None = None, tta: TTA | None = None):
        torch.set_num_threads(threads)
        # Ray gives a GPU actor its own device as CUDA_VISIBLE_DEVICES: "cuda" is that one.
        self.predictor = Predictor.from_checkpoint(checkpoint, "cuda" if cuda else "cpu", max_detections)
        self.predictor.tile(tiling).augment(tta)
        self.threshold = threshold
        self.overlays = overlays

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        """Each file's entry (COCO json), mask and overlay PNG bytes, or its error; the batch in one forward pass."""
        paths = [str(p) for p in batch["path"]]
        images = [_decode(bytes(data), path) for path, data in zip(paths, batch["bytes"])]
        ok = [image for image in images if not isinstance(image, str)]
        predictions = iter(self.predictor.predict_batch(ok, self.threshold) if ok else [])
        answer: dict[str, list] = {"path": paths, "entry": [], "mask": [], "overlay": [], "error": []}
        for path, image in zip(paths, images):
            if isinstance(image, str):
                for key, empty in (("error", image), ("entry", ""), ("mask", b""), ("overlay", b"")):
                    answer[key].append(empty)
                continue
            prediction = next(predictions)
            answer["entry"].append(json.dumps(image_entry(path, image.width, image.height, prediction.as_instances())))
            answer["mask"].append(_png(mask_png(prediction)))
            answer["overlay"].append(_png(overlay(image, prediction)) if self.overlays else b"")
            answer["error"].append("")
        return answer


def _decode(data: bytes, name: str) -> Any:
    """The image as :func:`segkit.data.images.load_image` reads it from disk (EXIF turn, modes, checks), or the error."""
    with tempfile.NamedTemporaryFile(suffix=Path(name).suffix) as f:
        f.write(data)
        f.flush()
        try:
            return load_image(f.name)
        except ImageError as e:
            return str(e).replace(f.name, name)


def _png(image) -> bytes:
    """PNG bytes, as :func:`segkit.inference.visualize.save_png` writes them."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
