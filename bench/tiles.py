"""Sliced inference and tiled training against whole-image inference on large scenes: mask AP, time, memory.

The scenes are mosaics of a checkpoint's photos at their native size, each placed at a random offset so
that tile seams cut through objects; their annotations move with them. The test scenes come from its
held-out (test) photos; ``--write-scenes DIR`` also writes train and val scenes from its train and val
photos, to train on large photos whole or with ``--train-tiles``. Each way runs as ``segkit evaluate`` in a
fresh process (its peak RSS is that process's), side by side in one run:

    python bench/tiles.py --checkpoint bench-out/transfer/imagenet_128-rois-500-proposals/best.pt \\
        --write-scenes bench-out/scenes
    python train.py --data bench-out/scenes --train-tiles 512 ...   # and the same without --train-tiles
    python bench/tiles.py --checkpoint ... --scenes bench-out/scenes/test --model "tile-trained=runs/.../best.pt" \\
        --tiles 512 --tta --report docs/benchmarks/tiles.md
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


def checkpoint_photos(ckpt_path: Path, split: str) -> tuple[list, list[str]]:
    """The checkpoint's ``split`` photos (its saved split of its own data) and its classes."""
    from segkit.data.readers import load_dataset
    from segkit.data.splits import model_split
    from segkit.models.checkpoint import load_checkpoint

    ckpt = load_checkpoint(ckpt_path)
    data = Path(ckpt["config"]["data"])
    return model_split(load_dataset(data).images, ckpt, split, data)[0], list(ckpt["classes"])


def build_scenes(records: list, classes: list[str], out: Path, per_scene: int, seed: int,
                 count: int | None = None) -> tuple[Path, int]:
    """Mosaics of ``records``' photos as a COCO export in ``out``; (its json, the photos used): consecutive
    groups of ``per_scene`` photos, or ``count`` scenes of photos drawn at random (each at most once a scene)."""
    rng = np.random.default_rng(seed)
    images, annotations = [], []
    (out / "images").mkdir(parents=True, exist_ok=True)
    groups = ([records[i:i + per_scene] for i in range(0, len(records) - per_scene + 1, per_scene)] if count is None
              else [[records[k] for k in rng.choice(len(records), per_scene, replace=len(records) < per_scene)]
                    for _ in range(count)])
    for s, group in enumerate(groups):
        side = int(np.ceil(np.sqrt(per_scene)))
        cell = max(max(r.width, r.height) for r in group) + 64
        canvas = Image.new("RGB", (side * cell, side * cell), (114, 114, 114))
        for k, record in enumerate(group):
            x = (k % side) * cell + int(rng.integers(0, 64))
            y = (k // side) * cell + int(rng.integers(0, 64))
            canvas.paste(Image.open(record.path).convert("RGB"), (x, y))
            annotations += moved_annotations(record, x, y, s + 1, classes, len(annotations))
        name = f"images/scene{s}.jpg"
        canvas.save(out / name, quality=95)
        images.append({"id": s + 1, "file_name": name, "width": canvas.width, "height": canvas.height})
    categories = [{"id": i, "name": n} for i, n in enumerate(classes, 1)]
    (out / "result.json").write_text(json.dumps({"images": images, "annotations": annotations,
                                                 "categories": categories}))
    return out / "result.json", len(images) * per_scene


def moved_annotations(record, x: int, y: int, image_id: int, classes: list[str], first: int) -> list[dict]:
    """``record``'s polygons (the vehicles export has only those) moved with its photo to (x, y), as COCO."""
    moved = []
    for inst in record.instances:
        if not isinstance(inst.segmentation, list):
            continue
        polygons = [[v + (x if i % 2 == 0 else y) for i, v in enumerate(p)] for p in inst.segmentation]
        x0, y0, x1, y1 = inst.bbox
        moved.append({"id": first + len(moved) + 1, "image_id": image_id, "iscrowd": 0,
                      "category_id": classes.index(inst.label) + 1, "segmentation": polygons,
                      "bbox": [x0 + x, y0 + y, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0)})
    return moved


# runs a command and prints its peak RSS (KB): getrusage of this wrapper's one child, whatever ran before
PEAK = "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); " \
       "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"


def evaluate(ckpt: Path, data: Path | None, extra: list[str], out: Path) -> dict:
    """``segkit evaluate`` (``data`` None: the checkpoint's own data, ``extra`` naming a split) in a process
    of its own: its metrics, seconds and peak RSS (MB)."""
    report = out / f"report-{len(list(out.glob('report-*.json')))}.json"
    where = ["--data", str(data), "--split", "all"] if data else []  # else: --split in ``extra``
    cmd = [sys.executable, "-m", "segkit", "evaluate", "--checkpoint", str(ckpt), *where, "--json", str(report), *extra]
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", PEAK, *cmd], check=True, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    return {"metrics": json.loads(report.read_text()), "seconds": seconds,
            "peak_rss_mb": int(done.stdout.split()[-1]) / 1024}


def seam_splits(ckpt: Path, data: Path, tile: int | str, tta: bool, threshold: float = 0.5) -> tuple[int, int]:
    """(objects cut by a tile's edge that come back as two or more detections, objects cut by a tile's edge
    that are found): a detection is a piece of an object when most of its mask lies on it."""
    from segkit.data.readers import load_dataset
    from segkit.inference.predictor import Predictor
    from segkit.inference.tiles import Tiling, paint
    from segkit.inference.tta import TTA

    predictor = Predictor.from_checkpoint(ckpt, "cpu", max_detections=100)
    predictor.tile(Tiling(tile)).augment(TTA() if tta else None)
    split = found = 0
    for record in load_dataset(data).images:
        windows = predictor.tiling.windows(record.width, record.height)
        prediction = predictor(record.path, threshold)
        found_masks = list(zip(prediction.instance_masks.crops, prediction.class_names))
        for inst in record.instances:
            x0, y0, x1, y1 = inst.bbox
            if not any(x0 < wx1 and wx0 < x1 and y0 < wy1 and wy0 < y1  # a tile that sees part of it only
                       and not (wx0 <= x0 and wy0 <= y0 and x1 <= wx1 and y1 <= wy1) for wx0, wy0, wx1, wy1 in windows):
                continue  # no tile edge cuts it: nothing to stitch
            box = (int(x0), int(y0), min(record.width, int(x1) + 1), min(record.height, int(y1) + 1))
            truth = inst.mask_in(box, record.height, record.width).astype(bool)
            pieces = [crop for crop, name in found_masks
                      if name == inst.label and np.count_nonzero(paint(crop, box) & truth) > 0.5 * crop.mask.sum()]
            found += bool(pieces)
            split += len(pieces) > 1
    return split, found


def row(name: str, result: dict, count: int, seams: tuple[int, int] | None) -> str:
    segm, bbox = result["metrics"]["segm"], result["metrics"]["bbox"]
    split = f"{seams[0]} of {seams[1]}" if seams else "-"
    small = "-" if segm["AP_small"] is None else f"{segm['AP_small']:.3f}"  # none under 32 px in the images
    return (f"| {name} | {segm['AP']:.3f} | {segm['AP50']:.3f} | {small} | {bbox['AP']:.3f} | "
            f"{split} | {result['seconds'] / count:.1f} | {result['peak_rss_mb']:.0f} |")


HEAD = ("| inference | mask AP | mask AP50 | mask AP small | box AP | objects cut by a tile edge, found in pieces | "
        "s / image | peak RSS (MB) |\n|---|---|---|---|---|---|---|---|")


def scene_rows(args: argparse.Namespace, data: Path, scenes: int, tmp: Path) -> list[str]:
    """Each way of predicting the scenes: the first model whole, in ``--tiles`` and with TTA when asked; the
    others (trained on tiles) whole and with ``--tile auto``."""
    rows = []
    for k, (label, ckpt) in enumerate(models(args)):
        rows.append(row(f"{label}: whole image", evaluate(ckpt, data, [], tmp), scenes, None))
        tiles = args.tiles if k == 0 else ["auto"]
        ways = [([], "")] + ([(["--tta"], " + TTA (mirror)")] if args.tta and k == 0 else [])
        for tile in tiles:
            for extra, what in ways:
                result = evaluate(ckpt, data, ["--tile", str(tile), *extra], tmp)
                name = f"tiles of {tile} px" if tile != "auto" else "--tile auto"
                seams = seam_splits(ckpt, data, int(tile) if tile != "auto" else "auto", bool(extra))
                rows.append(row(f"{label}: {name}, overlap 0.25, + whole{what}", result, scenes, seams))
    return rows


def models(args: argparse.Namespace) -> list[tuple[str, Path]]:
    """(label, checkpoint) of ``--checkpoint`` and each ``--model LABEL=PATH``."""
    return [("photo-trained", Path(args.checkpoint)),
            *((label, Path(path)) for label, path in (m.split("=", 1) for m in args.model))]


def tta_rows(args: argparse.Namespace, tmp: Path) -> tuple[list[str], int, str]:
    """Test-time augmentation on the checkpoint's held-out photos (test, else val), whole."""
    split = "test" if checkpoint_photos(Path(args.checkpoint), "test")[0] else "val"
    photos = len(checkpoint_photos(Path(args.checkpoint), split)[0])
    ways = [("no TTA", []), ("TTA: mirror", ["--tta"]), ("TTA: mirror, scales 0.8 and 1.25",
                                                          ["--tta", "--tta-scales", "0.8", "1.25"])]
    return [row(name, evaluate(Path(args.checkpoint), None, [*extra, "--split", split], tmp), photos, None)
            for name, extra in ways], photos, split


def write_scenes(args: argparse.Namespace) -> None:
    """Train, val and test scenes from the checkpoint's own splits (test from val where it has none), as a
    folder of split folders: ``--scene-counts`` scenes of random photos each, or consecutive groups."""
    for k, split in enumerate(("train", "val", "test")):
        records, classes = checkpoint_photos(Path(args.checkpoint), split)
        if not records:
            print(f"{split}: the checkpoint has no {split} photos; its scenes are made of val photos")
            records, classes = checkpoint_photos(Path(args.checkpoint), "val")
        count = args.scene_counts[k] if args.scene_counts else None
        json_path, photos = build_scenes(records, classes, Path(args.write_scenes) / split, args.per_scene,
                                         args.seed + k, count)
        print(f"{json_path}: {len(json.loads(json_path.read_text())['images'])} scenes of {photos} photos")


def huge_photo(records: list, side: int, objects: int, out: Path, seed: int) -> tuple[Path, int]:
    """A ``side`` x ``side`` photo holding about ``objects`` objects: ``records``' photos in random cells of a
    grid; (its path, the objects in it)."""
    rng = np.random.default_rng(seed)
    cell = max(max(r.width, r.height) for r in records) + 64
    cells = rng.permutation((side // cell) ** 2)
    canvas, placed, k = Image.new("RGB", (side, side), (114, 114, 114)), 0, 0
    while placed < objects and k < len(cells):
        record = records[int(rng.integers(len(records)))]
        x, y = (cells[k] % (side // cell)) * cell, (cells[k] // (side // cell)) * cell
        canvas.paste(Image.open(record.path).convert("RGB"), (int(x), int(y)))
        placed, k = placed + len(record.instances), k + 1
    canvas.save(out / "huge.jpg", quality=90)
    return out / "huge.jpg", placed


def huge_row(args: argparse.Namespace, tmp: Path) -> str:
    """``segkit predict`` of one huge photo in tiles by the last model: time, peak RSS, objects found."""
    label, ckpt = models(args)[-1]
    records, _ = checkpoint_photos(Path(args.checkpoint), "test")
    records = records or checkpoint_photos(Path(args.checkpoint), "val")[0]
    photo, placed = huge_photo(records, args.huge, args.huge_objects, tmp, args.seed)
    tile = "auto" if len(models(args)) > 1 else str(args.tiles[0])
    cmd = [sys.executable, "-m", "segkit", "predict", str(photo), "--checkpoint", str(ckpt), "--out",
           str(tmp / "huge-out"), "--tile", tile]
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", PEAK, *cmd], check=True, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    found = len(json.loads((tmp / "huge-out" / "predictions.json").read_text())["annotations"])
    return ("| photo | objects in it | found (score >= the model's threshold) | model | --tile | s | peak RSS (MB) |\n"
            "|---|---|---|---|---|---|---|\n"
            f"| {args.huge} x {args.huge} px | {placed} | {found} | {label} | {tile} | {seconds:.0f} | "
            f"{int(done.stdout.split()[-1]) / 1024:.0f} |")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="an instance checkpoint whose run has a test split")
    p.add_argument("--model", action="append", default=[], metavar="LABEL=PATH",
                   help="another checkpoint to compare on the same scenes (e.g. trained on scenes with --train-tiles)")
    p.add_argument("--scenes", default=None, help="evaluate on this export of scenes (default: mosaics of the "
                                                  "checkpoint's test photos, made here)")
    p.add_argument("--write-scenes", default=None, metavar="DIR",
                   help="only write train/, val/ and test/ scenes from the checkpoint's splits into DIR")
    p.add_argument("--scene-counts", type=int, nargs=3, default=None, metavar=("TRAIN", "VAL", "TEST"),
                   help="--write-scenes: this many scenes per split, of photos drawn at random (default: each photo "
                        "once, in consecutive groups)")
    p.add_argument("--tiles", type=int, nargs="+", default=[512], help="tile sizes to compare (pixels)")
    p.add_argument("--tta", action="store_true", help="also test-time augmentation: on the scenes and on the "
                                                     "held-out photos whole")
    p.add_argument("--per-scene", type=int, default=4, help="photos per mosaic")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--huge", type=int, default=0, metavar="SIDE",
                   help="also predict one SIDE x SIDE photo in tiles (the last model): time and peak RSS")
    p.add_argument("--huge-objects", type=int, default=300, help="--huge: about this many objects in it")
    p.add_argument("--note", default="", help="a paragraph for the page, e.g. how the models were trained")
    p.add_argument("--report", default=None, help="write the table (markdown) here")
    args = p.parse_args(argv)
    if args.write_scenes:
        return write_scenes(args)
    with tempfile.TemporaryDirectory() as tmp:
        if args.scenes:
            data = Path(args.scenes) / "result.json"
        else:
            data = build_scenes(*checkpoint_photos(Path(args.checkpoint), "test"), Path(tmp) / "scenes",
                                args.per_scene, args.seed)[0]
        scenes = json.loads(data.read_text())["images"]
        rows = scene_rows(args, data, len(scenes), Path(tmp))
        held_out = tta_rows(args, Path(tmp)) if args.tta else None
        huge = huge_row(args, Path(tmp)) if args.huge else ""
    text = report_text(args, scenes, rows, held_out) + (f"\n\nOne huge photo, predicted by `segkit predict`:\n\n{huge}"
                                                        if huge else "")
    print(text)
    if args.report:
        write_report(args.report, "Sliced inference and tiled training on large scenes", "bench/tiles.py",
                     sys.argv[1:] if argv is None else argv, text)


def report_text(args: argparse.Namespace, scenes: list[dict], rows: list[str],
                held_out: tuple[list[str], int, str] | None) -> str:
    """The page's text: what was compared, the scenes' table, and TTA on the held-out photos."""
    text = (f"{len(scenes)} test scenes, each a mosaic of {args.per_scene} held-out photos at native size "
            f"({scenes[0]['width']} x {scenes[0]['height']} px the first). Models: "
            + ", ".join(f"{label} `{path}`" for label, path in models(args)) + ". "
            "Objects cut by a tile's edge: those some tile sees only part of; in pieces: found as two or more "
            "detections (score >= 0.5, most of each on the object). s / image: the whole `segkit evaluate` process "
            "(loading included) over the number of scenes." + (f"\n\n{args.note}" if args.note else "")
            + "\n\n" + "\n".join([HEAD, *rows]))
    if held_out:
        text += (f"\n\nTest-time augmentation on the model's {held_out[1]} {held_out[2]} photos, whole, photo-trained "
                 "model:"
                 "\n\n" + "\n".join([HEAD, *held_out[0]]))
    return text


if __name__ == "__main__":
    main()
