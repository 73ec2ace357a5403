"""Sliced inference against whole-image inference on large scenes: mask AP, time and peak memory.

The scenes are mosaics of a checkpoint's held-out (test) photos at their native size, each placed at a
random offset so that tile seams cut through objects; their annotations move with them. Each way runs as
``segkit evaluate`` in a fresh process (its peak RSS is that process's), side by side in one run:

    python bench/tiles.py --checkpoint bench-out/transfer/imagenet_128-rois-500-proposals/best.pt \\
        --tiles 512 768 --report docs/benchmarks/tiles.md
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.report import write_report  # noqa: E402 - after the path it needs


def build_scenes(ckpt_path: Path, out: Path, per_scene: int, seed: int) -> tuple[Path, int]:
    """Mosaics of the checkpoint's test photos as a COCO export in ``out``; (its json, the photos used)."""
    from segkit.data.readers import load_dataset
    from segkit.data.splits import model_split
    from segkit.models.checkpoint import load_checkpoint

    ckpt = load_checkpoint(ckpt_path)
    data = Path(ckpt["config"]["data"])
    records, which, _ = model_split(load_dataset(data).images, ckpt, "test", data)
    rng = np.random.default_rng(seed)
    images, annotations = [], []
    (out / "images").mkdir(parents=True, exist_ok=True)
    for s, start in enumerate(range(0, len(records) - per_scene + 1, per_scene)):
        group = records[start:start + per_scene]
        side = int(np.ceil(np.sqrt(per_scene)))
        cell = max(max(r.width, r.height) for r in group) + 64
        canvas = Image.new("RGB", (side * cell, side * cell), (114, 114, 114))
        for k, record in enumerate(group):
            x = (k % side) * cell + int(rng.integers(0, 64))
            y = (k // side) * cell + int(rng.integers(0, 64))
            canvas.paste(Image.open(record.path).convert("RGB"), (x, y))
            for inst in record.instances:  # polygons move with their photo (the vehicles export has only those)
                if not isinstance(inst.segmentation, list):
                    continue
                polygons = [[v + (x if i % 2 == 0 else y) for i, v in enumerate(p)] for p in inst.segmentation]
                x0, y0, x1, y1 = inst.bbox
                annotations.append({"id": len(annotations) + 1, "image_id": s + 1, "iscrowd": 0,
                                    "category_id": ckpt["classes"].index(inst.label) + 1, "segmentation": polygons,
                                    "bbox": [x0 + x, y0 + y, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0)})
        name = f"images/scene{s}.jpg"
        canvas.save(out / name, quality=95)
        images.append({"id": s + 1, "file_name": name, "width": canvas.width, "height": canvas.height})
    categories = [{"id": i, "name": n} for i, n in enumerate(ckpt["classes"], 1)]
    (out / "result.json").write_text(json.dumps({"images": images, "annotations": annotations,
                                                 "categories": categories}))
    return out / "result.json", len(images) * per_scene


# runs a command and prints its peak RSS (KB): getrusage of this wrapper's one child, whatever ran before
PEAK = "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); " \
       "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"


def evaluate(ckpt: Path, data: Path | None, extra: list[str], out: Path) -> dict:
    """``segkit evaluate`` (``data`` None: the checkpoint's own test split) with ``extra`` options in a process
    of its own: its metrics, seconds and peak RSS (MB)."""
    report = out / f"report-{len(list(out.glob('report-*.json')))}.json"
    where = ["--data", str(data), "--split", "all"] if data else ["--split", "test"]
    cmd = [sys.executable, "-m", "segkit", "evaluate", "--checkpoint", str(ckpt), *where, "--json", str(report), *extra]
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", PEAK, *cmd], check=True, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    return {"metrics": json.loads(report.read_text()), "seconds": seconds,
            "peak_rss_mb": int(done.stdout.split()[-1]) / 1024}


def seam_splits(ckpt: Path, data: Path, tile: int | str, tta: bool, threshold: float = 0.5) -> tuple[int, int]:
    """(objects that cross a tile seam and come back as two or more detections, objects that cross a seam and
    are found): a detection is a piece of an object when most of its mask lies on it."""
    from segkit.data.readers import load_dataset
    from segkit.inference.predictor import Predictor
    from segkit.inference.tta import TTA

    predictor = Predictor.from_checkpoint(ckpt, "cpu", max_detections=100).tile(tile).augment(TTA() if tta else None)
    split = found = 0
    for record in load_dataset(data).images:
        windows = predictor.tiling.windows(record.width, record.height)
        prediction = predictor(record.path, threshold)
        masks = prediction.instance_masks.dense()
        for inst in record.instances:
            x0, y0, x1, y1 = inst.bbox
            if any(wx0 <= x0 and wy0 <= y0 and x1 <= wx1 and y1 <= wy1 for wx0, wy0, wx1, wy1 in windows):
                continue  # inside one tile: no seam to stitch
            truth = inst.mask(record.height, record.width).astype(bool)
            pieces = [m for m, name in zip(masks, prediction.class_names)
                      if name == inst.label and np.count_nonzero(m & truth) > 0.5 * max(1, np.count_nonzero(m))]
            found += bool(pieces)
            split += len(pieces) > 1
    return split, found


def row(name: str, result: dict, count: int, seams: tuple[int, int] | None) -> str:
    segm, bbox = result["metrics"]["segm"], result["metrics"]["bbox"]
    split = f"{seams[0]} of {seams[1]}" if seams else "-"
    return (f"| {name} | {segm['AP']:.3f} | {segm['AP50']:.3f} | {segm['AP_small']:.3f} | {bbox['AP']:.3f} | "
            f"{split} | {result['seconds'] / count:.1f} | {result['peak_rss_mb']:.0f} |")


HEAD = ("| inference | mask AP | mask AP50 | mask AP small | box AP | seam-crossing objects found in pieces | "
        "s / image | peak RSS (MB) |\n|---|---|---|---|---|---|---|---|")


def scene_rows(args: argparse.Namespace, data: Path, scenes: int, tmp: Path) -> list[str]:
    """Each way of predicting the scenes, for the checkpoint and the tile-trained one if given."""
    rows = []
    for label, ckpt in [("", Path(args.checkpoint)),
                        *([("tile-trained model, ", Path(args.tiled_checkpoint))] if args.tiled_checkpoint else [])]:
        rows.append(row(f"{label}whole image", evaluate(ckpt, data, [], tmp), scenes, None))
        for tile in [*args.tiles, *(["auto"] if label else [])]:
            ways = [([], "")] + ([(["--tta"], " + TTA (mirror)")] if args.tta and not label else [])
            for extra, what in ways:
                result = evaluate(ckpt, data, ["--tile", str(tile), *extra], tmp)
                name = f"{label}tiles of {tile} px" if tile != "auto" else f"{label}--tile auto"
                rows.append(row(f"{name}, overlap 0.25, + whole{what}", result, scenes,
                                seam_splits(ckpt, data, int(tile) if tile != "auto" else "auto", bool(extra))))
    return rows


def tta_rows(args: argparse.Namespace, tmp: Path) -> tuple[list[str], int]:
    """Test-time augmentation on the checkpoint's held-out photos, whole."""
    from segkit.data.readers import load_dataset
    from segkit.data.splits import model_split
    from segkit.models.checkpoint import load_checkpoint

    ckpt = load_checkpoint(args.checkpoint)
    data = Path(ckpt["config"]["data"])
    photos = len(model_split(load_dataset(data).images, ckpt, "test", data)[0])
    ways = [("no TTA", []), ("TTA: mirror", ["--tta"]), ("TTA: mirror, scales 0.8 and 1.25",
                                                          ["--tta", "--tta-scales", "0.8", "1.25"])]
    return [row(name, evaluate(Path(args.checkpoint), None, extra, tmp), photos, None) for name, extra in ways], photos


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="an instance checkpoint whose run has a test split")
    p.add_argument("--tiled-checkpoint", default=None,
                   help="a model trained with --train-tiles on the same data: its rows too (with --tile auto)")
    p.add_argument("--tiles", type=int, nargs="+", default=[512], help="tile sizes to compare (pixels)")
    p.add_argument("--tta", action="store_true", help="also test-time augmentation: on the scenes and on the "
                                                     "held-out photos whole")
    p.add_argument("--per-scene", type=int, default=4, help="photos per mosaic")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--report", default=None, help="write the table (markdown) here")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        data, photos = build_scenes(Path(args.checkpoint), Path(tmp) / "scenes", args.per_scene, args.seed)
        scenes = json.loads(data.read_text())["images"]
        rows = scene_rows(args, data, len(scenes), Path(tmp))
        held_out = tta_rows(args, Path(tmp)) if args.tta else None
    text = (f"{len(scenes)} scenes of {args.per_scene} held-out photos each at native size ({scenes[0]['width']} x "
            f"{scenes[0]['height']} px the first), {photos} photos; `{args.checkpoint}`"
            + (f" and the tile-trained `{args.tiled_checkpoint}`" if args.tiled_checkpoint else "") + ". "
            "Seam-crossing objects: those no single tile holds; in pieces: found as two or more detections "
            "(score >= 0.5, most of each on the object).\n\n" + "\n".join([HEAD, *rows]))
    if held_out:
        text += (f"\n\nTest-time augmentation on the {held_out[1]} held-out photos, whole:\n\n"
                 + "\n".join([HEAD, *held_out[0]]))
    print(text)
    if args.report:
        write_report(args.report, "Sliced inference on large scenes", "bench/tiles.py",
                     sys.argv[1:] if argv is None else argv, text)


if __name__ == "__main__":
    main()
