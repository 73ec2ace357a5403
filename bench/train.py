"""Training throughput: segkit's step against a plain loop written like torchvision's fine-tuning tutorial.

Same model (Mask R-CNN R50-FPN, random init), same images, image size, batch, workers and warm-up;
each pipeline runs in its own process so that peak memory is its own. By default both time one whole
epoch of the sample, so that both do the same work whatever order their samplers draw the images in
(10 random steps of one can hold many more instances than 10 of the other). Prints a table with the ratio.

    python bench/train.py [--steps 0] [--repeat 2] [--img-size 512] [--batch-size 2] [--workers 2] [--device cpu] \
        [--report docs/benchmarks/train.md]
"""
from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.report import write_report  # noqa: E402 - after the path it needs

METHOD = """\
One epoch of the sample's training images (those with objects), Mask R-CNN R50-FPN from random init, through
segkit's `engine.train_one_epoch` (its `light` augmentation, gradient clipping, loss logging, the non-finite
check) and through a loop written like torchvision's fine-tuning tutorial (its dataset reading the same COCO
file, horizontal flips, its `train_one_epoch` with a linear warm-up): the same model, images, image size,
batch, DataLoader workers and SGD settings, one untimed warm-up step each. A whole epoch, so that both do the
same work whatever order their samplers draw the images in.

Each run is a process of its own, so its peak memory (RSS on a CPU, allocated memory on a GPU) is that
pipeline's. The runs alternate (tutorial, segkit, segkit, tutorial, ...) and the best of each pipeline is
kept, so that a slow drift of the machine hits both alike. On a GPU segkit trains in mixed precision, which
the tutorial loop does not."""


class TutorialDataset(torch.utils.data.Dataset):
    """The tutorial's PennFudan dataset, reading the same COCO json: decode, masks_to_boxes, v2 transforms."""

    def __init__(self, root: Path, transforms):
        from pycocotools.coco import COCO

        self.root, self.transforms = root, transforms
        self.coco = COCO(str(root / "result.json"))
        self.ids = sorted(i for i in self.coco.imgs if self.coco.getAnnIds(imgIds=i))

    def __getitem__(self, idx):
        from torchvision import tv_tensors
        from torchvision.io import read_image
        from torchvision.ops import masks_to_boxes

        info = self.coco.imgs[self.ids[idx]]
        img = read_image(str(self.root / info["file_name"]))
        anns = self.coco.loadAnns(self.coco.getAnnIds(imgIds=info["id"]))
        masks = torch.stack([torch.from_numpy(self.coco.annToMask(a)) for a in anns])
        target = {"boxes": tv_tensors.BoundingBoxes(masks_to_boxes(masks), format="XYXY", canvas_size=img.shape[-2:]),
                  "masks": tv_tensors.Mask(masks), "labels": torch.tensor([a["category_id"] + 1 for a in anns]),
                  "image_id": idx}
        return self.transforms(tv_tensors.Image(img), target)

    def __len__(self):
        return len(self.ids)


def tutorial_loader(root, batch_size, workers):
    from torchvision.transforms import v2 as T

    transforms = T.Compose([T.RandomHorizontalFlip(0.5), T.ToDtype(torch.float, scale=True), T.ToPureTensor()])
    return torch.utils.data.DataLoader(TutorialDataset(root, transforms), batch_size=batch_size, shuffle=True,
                                       num_workers=workers, collate_fn=lambda b: tuple(zip(*b)))


def tutorial_epoch(model, optimizer, loader, device, steps):
    """The tutorial's train_one_epoch for epoch 0 (with its linear warm-up), minus logging."""
    model.train()
    warmup = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.001, total_iters=min(1000, len(loader) - 1))
    for i, (images, targets) in enumerate(loader):
        if i == steps:
            break
        images = list(image.to(device) for image in images)
        targets = [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in t.items()} for t in targets]
        loss_dict = model(images, targets)
        losses = sum(loss for loss in loss_dict.values())
        if not math.isfinite(losses.item()):
            sys.exit(f"tutorial loop: loss is {losses.item()}, stopping training")
        optimizer.zero_grad()
        losses.backward()
        optimizer.step()
        warmup.step()


def segkit_loader(root, batch_size, workers):
    from segkit.data.dataset import SegmentationDataset, collate_fn
    from segkit.data.readers import load_dataset
    from segkit.engine.seeding import EpochSampler
    from segkit.data.transforms import build_transform

    records = load_dataset(root)
    images = [im for im in records.images if im.instances]
    dataset = SegmentationDataset(images, records.classes, build_transform("light"))
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=EpochSampler(len(dataset), 0),
                                       num_workers=workers, collate_fn=collate_fn,
                                       pin_memory=torch.cuda.is_available())


def run_one(args) -> dict:
    """Time ``args.steps`` steps (0: one epoch, after one warm-up step) of one pipeline in this process."""
    from itertools import islice

    from segkit.engine import loops as engine
    from segkit.models.mask_rcnn import build_model

    torch.manual_seed(0)
    device = torch.device(args.device)
    root = REPO / "data" / "sample" / "train"
    model = build_model("maskrcnn_resnet50_fpn", 4, weights=None, img_size=args.img_size).to(device)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.005, momentum=0.9,
                                weight_decay=1e-4)
    if args.variant == "tutorial":
        loader = tutorial_loader(root, args.batch_size, args.workers)
        step = lambda n: tutorial_epoch(model, optimizer, loader, device, n)  # noqa: E731
    else:
        loader = segkit_loader(root, args.batch_size, args.workers)
        scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" else None
        warmup = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.001, total_iters=len(loader) - 1)
        step = lambda n: engine.train_one_epoch(model, optimizer, islice(loader, n), device, scheduler=warmup,  # noqa: E731
                                                scaler=scaler, clip_grad=10.0, show_progress=False)
    step(1)  # warm-up: allocator, cudnn autotune, worker start
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    steps = args.steps or len(loader)
    step(steps)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"variant": args.variant, "images_per_s": steps * args.batch_size / seconds, "steps": steps, "peak_mb": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=0, help="steps to time; 0 = one epoch")
    parser.add_argument("--img-size", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each pipeline, alternating")
    parser.add_argument("--report", default=None, help="also write the page (markdown) here")
    parser.add_argument("--variant", choices=["segkit", "tutorial"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_one(args)))
        return
    # A-B-B-A... order, best run of each: a slow drift of the machine hits both pipelines alike.
    order = [("tutorial", "segkit"), ("segkit", "tutorial")]
    runs = []
    for i in range(args.repeat):
        for variant in order[i % 2]:
            cmd = [sys.executable, __file__, "--variant", variant] + [
                f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                if k not in ("variant", "repeat", "report")]
            out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
            runs.append(json.loads(out.splitlines()[-1]))
    rows = [max((r for r in runs if r["variant"] == v), key=lambda r: r["images_per_s"]) for v in ("tutorial", "segkit")]
    text = results_markdown(rows, args)
    print(text)
    if args.report:
        write_report(args.report, "Training: segkit against torchvision's tutorial loop", "bench/train.py",
                     sys.argv[1:], f"{METHOD}\n\n{text}")


def results_markdown(rows: list[dict], args: argparse.Namespace) -> str:
    """This run's settings and its table (markdown): the best run of each pipeline, speed against the tutorial's."""
    base = rows[0]["images_per_s"]
    peak = "peak GPU memory (MB)" if args.device.startswith("cuda") else "peak RSS (MB)"
    lines = [f"Mask R-CNN R50-FPN training, {args.img_size} px, batch {args.batch_size}, {args.workers} workers, "
             f"{rows[0]['steps']} steps, {args.device}, best of {args.repeat} runs each.", "",
             f"| pipeline | images/s | {peak} | speed vs tutorial |", "|---|---|---|---|"]
    for row in rows:
        name = "torchvision tutorial loop" if row["variant"] == "tutorial" else "segkit (`engine.train_one_epoch`)"
        lines.append(f"| {name} | {row['images_per_s']:.2f} | {row['peak_mb']:.0f} | "
                     f"{row['images_per_s'] / base:.2f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
