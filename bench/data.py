"""Data pipeline throughput: segkit's loading + augmentation beside torchvision's detection reference.

    python bench/data.py [--data data/sample] [--n 200] [--preset default] [--workers 0 2] \
        [--report docs/benchmarks/data.md]

Both pipelines read the same copy of the sample, resized once (untimed) so the longest side is
512 px, skip its empty images (torchvision's reference drops them for training, and RandomIoUCrop
needs boxes), and visit the same image order:
  segkit       segkit.data.readers -> SegmentationDataset (load_image, pycocotools masks) -> preset
  torchvision  CocoDetection + wrap_dataset_for_transforms_v2 (per-polygon frPyObjects/decode) ->
               v2 on PIL, the reference's default backend: RandomHorizontalFlip, RandomIoUCrop,
               ColorJitter, then ToImage, ToDtype, SanitizeBoundingBoxes, ToPureTensor
Images/s counts images after the first batch, so worker start-up is not timed.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import cv2
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.report import write_report  # noqa: E402 - after the path it needs
from segkit.data.dataset import SegmentationDataset, collate_fn
from segkit.data.readers import load_dataset
from segkit.data.transforms import build_transform

METHOD = """\
Loading plus a segkit augmentation preset, against torchvision's detection reference pipeline
(`CocoDetection` + transforms v2: random horizontal flip, random IoU crop, colour jitter, on PIL images as the
reference does by default) on the same images. Both read one copy of the data, resized once (untimed) so
that the longest side is 512 px, skip its images without objects (the reference drops them for training) and
visit the same image order, in batches of 2.

segkit decodes each instance's polygons with one pycocotools call into a mask of the image's size and
augments with albumentations on numpy arrays (OpenCV); the reference converts every polygon separately
and runs its transforms on PIL images and tensors. Images/s counts the images after the first batch, so
that worker start-up is not timed; every loading process runs one thread. The ratio is against the
reference with the same number of DataLoader workers."""


def resized_copy(src: Path, dst: Path, longest: int = 512) -> list[Path]:
    """Copy each split's result.json and images to ``dst`` with the longest side scaled to ``longest``."""
    splits = []
    for coco_file in sorted(src.glob("*/result.json")):
        split = dst / coco_file.parent.name
        (split / "images").mkdir(parents=True)
        coco = json.loads(coco_file.read_text())
        scales = {}
        for im in coco["images"]:
            s = longest / max(im["width"], im["height"])
            with Image.open(coco_file.parent / im["file_name"]) as pil:
                size = (round(im["width"] * s), round(im["height"] * s))
                pil.convert("RGB").resize(size, Image.BILINEAR).save(split / im["file_name"], quality=90)
            im["width"], im["height"] = size
            scales[im["id"]] = s
        for a in coco["annotations"]:
            s = scales[a["image_id"]]
            a["segmentation"] = [[v * s for v in poly] for poly in a["segmentation"]]
            a["bbox"] = [v * s for v in a["bbox"]]
            a["area"] *= s * s
        (split / "result.json").write_text(json.dumps(coco))
        splits.append(split)
    return splits


def segkit_dataset(root: Path, preset: str) -> SegmentationDataset:
    records = load_dataset(root)
    images = [im for im in records.images if im.instances]
    return SegmentationDataset(images, records.classes, build_transform(preset, seed=0))


def torchvision_dataset(splits: list[Path]) -> torch.utils.data.Dataset:
    from torchvision import datasets
    from torchvision.transforms import v2

    # references/detection/presets.py with backend="pil": augment the PIL image, convert at the end
    # (its colour ops on PIL are several times faster than on float tensors, hue above all)
    transforms = v2.Compose([
        v2.RandomHorizontalFlip(p=0.5),
        v2.RandomIoUCrop(),
        v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02),
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.SanitizeBoundingBoxes(),
        v2.ToPureTensor(),
    ])
    parts = []
    for split in splits:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
            ds = datasets.CocoDetection(str(split), str(split / "result.json"), transforms=transforms)
        ds.ids = [i for i in ds.ids if ds.coco.getAnnIds(imgIds=i)]  # as the reference's train set
        parts.append(datasets.wrap_dataset_for_transforms_v2(ds, target_keys=("boxes", "labels", "masks", "image_id")))
    return torch.utils.data.ConcatDataset(parts)


def throughput(dataset: torch.utils.data.Dataset, n: int, workers: int, batch_size: int = 2) -> float:
    """Images per second over ``n`` images (the same index order for every pipeline), after a warm-up batch."""
    order = [i % len(dataset) for i in range(n + batch_size)]
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=order, num_workers=workers,
                                         collate_fn=collate_fn)
    batches = iter(loader)
    next(batches)  # worker start-up and first-file effects stay out of the timing
    count, start = 0, time.perf_counter()
    for images, _ in batches:
        count += len(images)
    return count / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO / "data" / "sample", help="folder with <split>/result.json")
    parser.add_argument("--n", type=int, default=200, help="images timed per row")
    parser.add_argument("--preset", default="default", help="segkit augmentation preset")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader worker counts")
    parser.add_argument("--report", default=None, help="also write the page (markdown) here")
    args = parser.parse_args(argv)
    # one thread per loading process, as DataLoader workers get: on a shared machine, intra-op threads
    # of the main process only add contention and noise
    torch.set_num_threads(1)
    cv2.setNumThreads(1)

    with tempfile.TemporaryDirectory() as tmp:
        splits = resized_copy(args.data, Path(tmp))
        pipelines = {f"segkit {args.preset}": segkit_dataset(Path(tmp), args.preset),
                     "torchvision v2 reference": torchvision_dataset(splits)}
        rows = [(name, w, throughput(ds, args.n, w)) for w in args.workers for name, ds in pipelines.items()]
    text = results_markdown(rows, args.n, args.data)
    print(text)
    if args.report:
        write_report(args.report, "Data pipeline: segkit against torchvision's reference", "bench/data.py",
                     sys.argv[1:] if argv is None else argv, f"{METHOD}\n\n{text}")


def results_markdown(rows: list[tuple[str, int, float]], n: int, data: Path) -> str:
    """This run's settings and its table (markdown): one row per (pipeline, workers), ratio to the reference."""
    reference = {w: ips for name, w, ips in rows if name.startswith("torchvision")}
    shown = data.resolve().relative_to(REPO) if data.resolve().is_relative_to(REPO) else data
    lines = [f"`{shown}`, {n} images per row, 512 px longest side, torch {torch.__version__}.", "",
             "| pipeline | workers | images/s | ratio |", "|---|---|---|---|"]
    lines += [f"| {name} | {w} | {ips:.1f} | {ips / reference[w]:.2f} |" for name, w, ips in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
