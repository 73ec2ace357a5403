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


def evaluate(ckpt: Path, data: Path, tile: int | None, out: Path) -> dict:
    """``segkit evaluate`` in a process of its own: its metrics, seconds and peak RSS (MB)."""
    report = out / f"tile-{tile or 'none'}.json"
    cmd = [sys.executable, "-m", "segkit", "evaluate", "--checkpoint", str(ckpt), "--data", str(data),
           "--split", "all", "--json", str(report), *(["--tile", str(tile)] if tile else [])]
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", PEAK, *cmd], check=True, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    return {"metrics": json.loads(report.read_text()), "seconds": seconds,
            "peak_rss_mb": int(done.stdout.split()[-1]) / 1024}


def row(name: str, result: dict, scenes: int) -> str:
    segm, bbox = result["metrics"]["segm"], result["metrics"]["bbox"]
    return (f"| {name} | {segm['AP']:.3f} | {segm['AP50']:.3f} | {segm['AP75']:.3f} | {bbox['AP']:.3f} | "
            f"{result['seconds'] / scenes:.1f} | {result['peak_rss_mb']:.0f} |")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="an instance checkpoint whose run has a test split")
    p.add_argument("--tiles", type=int, nargs="+", default=[512], help="tile sizes to compare (pixels)")
    p.add_argument("--per-scene", type=int, default=4, help="photos per mosaic")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--report", default=None, help="write the table (markdown) here")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        data, photos = build_scenes(Path(args.checkpoint), Path(tmp) / "scenes", args.per_scene, args.seed)
        scenes = len(json.loads(data.read_text())["images"])
        size = json.loads(data.read_text())["images"][0]
        results = {"whole image": evaluate(Path(args.checkpoint), data, None, Path(tmp))}
        for tile in args.tiles:
            results[f"tiles of {tile} px, overlap 0.25, + whole"] = evaluate(Path(args.checkpoint), data, tile,
                                                                              Path(tmp))
    head = ("| inference | mask AP | mask AP50 | mask AP75 | box AP | s / scene | peak RSS (MB) |\n"
            "|---|---|---|---|---|---|---|")
    table = "\n".join([head, *(row(name, r, scenes) for name, r in results.items())])
    text = (f"{scenes} scenes of {args.per_scene} held-out photos each at native size ({size['width']} x "
            f"{size['height']} px the first), {photos} photos; `{args.checkpoint}`.\n\n{table}")
    print(text)
    if args.report:
        write_report(args.report, "Sliced inference on large scenes", "bench/tiles.py",
                     sys.argv[1:] if argv is None else argv, text)

if __name__ == "__main__":
    main()
