"""Which model for which machine: R50-FPN against the mobile Mask R-CNNs, eager and OpenVINO f32, side by side.

For each architecture, in a fresh process per measurement (so that peak RSS is that measurement's own):
latency per photo at 512 px (shorter side; a 683 x 512 photo) in eager PyTorch and exported to OpenVINO f32,
with every model filling the same 20 detection slots (score threshold 0: the heads do the same work whatever
the weights), and training images/s (batch 2, SGD, the architecture's trainable layers from a pretrained
start). R50-FPN eager is the baseline every ratio is against. Random-init weights: speed does not depend
on them.

With ``--checkpoint`` (a trained mobile best.pt) it also measures the inference proposals kept after the
RPN (torchvision keeps 1000): latency and val mask AP for each of ``--proposals``.

    python bench/speed.py [--runs 5] [--threads 2] [--report docs/benchmarks/speed.md]
    python bench/speed.py --skip-speed --checkpoint runs/vehicles/best.pt --proposals 1000 150 --sizes 320 384 512
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.report import write_report  # noqa: E402 - after the path it needs
ARCHS = ("maskrcnn_resnet50_fpn", "maskrcnn_mobilenet_v2_fpn", "maskrcnn_mobilenet_v3_large_fpn")
BASELINE = "maskrcnn_resnet50_fpn"
DETECTIONS = 20
CLASSES = ["leaf", "pebble", "shell"]


def photo():
    """A 683 x 512 photo of the sample (its objects, as a user's photo has some), and its training target."""
    import numpy as np
    import torch
    from PIL import Image

    from segkit.data.readers import load_dataset

    record = next(r for r in load_dataset(REPO / "data" / "sample" / "val").images if r.instances)
    image = Image.open(record.path).convert("RGB")
    masks = np.stack([inst.mask(record.height, record.width) for inst in record.instances])
    masks = torch.nn.functional.interpolate(torch.as_tensor(masks, dtype=torch.float32)[None], size=(512, 683))[0] > 0.5
    ys, xs = [m.nonzero()[:, 0] for m in masks], [m.nonzero()[:, 1] for m in masks]
    boxes = torch.tensor([[x.min(), y.min(), x.max() + 1, y.max() + 1] for x, y in zip(xs, ys)], dtype=torch.float32)
    labels = torch.tensor([CLASSES.index(i.label) + 1 for i in record.instances])
    return image.resize((683, 512)), {"boxes": boxes, "labels": labels, "masks": masks.to(torch.uint8)}


def checkpoint_for(arch: str, folder: Path) -> Path:
    import torch

    from segkit.models.checkpoint import save_checkpoint
    from segkit.tasks.checkpoint import make_checkpoint
    from segkit.models.mask_rcnn import build_model

    path = folder / f"{arch}.pt"
    if not path.exists():
        torch.manual_seed(0)
        model = build_model(arch, len(CLASSES) + 1, weights=None, img_size=512)
        save_checkpoint(make_checkpoint(model, arch, CLASSES, img_size=512, score_threshold=0.0), path)
    return path


def measure_one(arch: str, what: str, runs: int, folder: Path) -> dict:
    """One measurement in this process: {"seconds": median per photo (or per image trained), "rss_mb": peak}."""
    import torch

    from segkit.inference.predictor import Predictor

    image, target = photo()
    checkpoint = checkpoint_for(arch, folder)
    if what == "train":
        from segkit.models.mask_rcnn import DEFAULT_TRAINABLE_LAYERS, build_model, freeze_backbone
        from torchvision.ops import misc as misc_nn_ops

        # as a fine-tuning run trains it: frozen batch norm, the default trainable stages
        model = build_model(arch, len(CLASSES) + 1, weights=None, img_size=512, frozen_bn=True)
        freeze_backbone(model, DEFAULT_TRAINABLE_LAYERS)
        assert any(isinstance(m, misc_nn_ops.FrozenBatchNorm2d) for m in model.modules())
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
        from torchvision.transforms.functional import to_tensor

        images, targets = [to_tensor(image)] * 2, [target] * 2
        times = []
        for i in range(runs + 1):
            start = time.perf_counter()
            loss = sum(model(images, targets).values())
            opt.zero_grad()
            loss.backward()
            opt.step()
            if i:  # the first step warms up the allocator and oneDNN
                times.append((time.perf_counter() - start) / len(images))
    else:
        if what == "openvino":
            from segkit.inference.export import export

            artifact = folder / f"{arch}.xml"
            if not artifact.exists():
                export(checkpoint, "openvino", artifact, max_detections=DETECTIONS)
            predictor = Predictor.from_checkpoint(artifact)
        else:
            predictor = Predictor.from_checkpoint(checkpoint, device="cpu", max_detections=DETECTIONS)
        predictor(image, score_threshold=0.0)
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            predictor(image, score_threshold=0.0)
            times.append(time.perf_counter() - start)
    return {"seconds": statistics.median(times), "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_child(arch: str, what: str, args, folder: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", arch, what, "--runs", str(args.runs), "--folder", str(folder),
           "--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if out.returncode != 0:
        raise SystemExit(f"{arch} {what} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def speed_table(args) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        results = {}
        for arch in ARCHS:
            for what in ("eager", "openvino", "train"):
                results[arch, what] = run_child(arch, what, args, folder)
                print(f"  {arch} {what}: {results[arch, what]}", flush=True)
    base_eager, base_train = results[BASELINE, "eager"]["seconds"], results[BASELINE, "train"]["seconds"]
    lines = ["| model | eager (s/photo) | OpenVINO f32 (s/photo) | OpenVINO vs R50 eager | train (images/s) | "
             "train step vs R50 | peak RSS eager / OpenVINO / train (MB) |", "|---|---|---|---|---|---|---|"]
    for arch in ARCHS:
        e, o, t = (results[arch, w] for w in ("eager", "openvino", "train"))
        lines.append(f"| {arch} | {e['seconds']:.3f} | {o['seconds']:.3f} | {o['seconds'] / base_eager:.2f}x | "
                     f"{1 / t['seconds']:.2f} | {t['seconds'] / base_train:.2f}x | "
                     f"{e['rss_mb']:.0f} / {o['rss_mb']:.0f} / {t['rss_mb']:.0f} |")
    return "\n".join(lines)


def proposals_table(args) -> str:
    """Val mask AP and latency of a trained checkpoint for each number of inference proposals and image size."""
    from segkit.commands.evaluate import _load
    from segkit.data.images import load_image
    from segkit.evaluation.evaluate import evaluate_predictor
    from segkit.inference.predictor import Predictor
    from segkit.models.mask_rcnn import image_size_kwargs
    from segkit.tasks import get_task

    ckpt, records, _ = _load(argparse.Namespace(checkpoint=args.checkpoint, data=args.data, format=None, images=None,
                                                ls_token=None, split="val"))
    images = [load_image(r.path) for r in records]
    lines = [f"| image size | proposals | val mask AP | val mask AP50 | s/photo ({len(records)} val photos, "
             f"{ckpt['arch']} trained at {ckpt['img_size']} px) |", "|---|---|---|---|---|"]
    for size in args.sizes or [ckpt["img_size"]]:
        for n in args.proposals:
            predictor = Predictor.from_loaded_checkpoint(ckpt, args.checkpoint, device="cpu")
            predictor.model.rpn._pre_nms_top_n["testing"] = n  # torchvision keeps these per mode
            predictor.model.rpn._post_nms_top_n["testing"] = n
            resize = image_size_kwargs(size)
            predictor.model.transform.min_size, predictor.model.transform.max_size = (resize["min_size"],), \
                resize["max_size"]
            evaluator = get_task("instance").evaluator(records, list(ckpt["classes"]), 0.5)
            report = evaluate_predictor(predictor, records, evaluator, show_progress=False)
            start = time.perf_counter()
            for image in images:
                predictor(image)
            per_photo = (time.perf_counter() - start) / len(images)
            lines.append(f"| {size} | {n} | {report['segm']['AP']:.3f} | {report['segm']['AP50']:.3f} | "
                         f"{per_photo:.3f} |")
            print(lines[-1], flush=True)
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--checkpoint", help="a trained checkpoint: measure inference proposals on its val split")
    p.add_argument("--data", default=None, help="with --checkpoint: its data (default: the one it was trained on)")
    p.add_argument("--proposals", type=int, nargs="+", default=[1000, 300, 100])
    p.add_argument("--sizes", type=int, nargs="+", help="with --checkpoint: image sizes to try (default: its own)")
    p.add_argument("--skip-speed", action="store_true", help="only the proposals table")
    p.add_argument("--report", help="also write the tables as a Markdown page here")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(measure_one(*args.child, args.runs, Path(args.folder))))
        return
    sections = []
    if not args.skip_speed:
        text = speed_table(args)
        sections.append(f"## Speed, 683 x 512 photo, {DETECTIONS} detections, {args.threads} threads\n\n{text}")
        print(text)
    if args.checkpoint:
        text = proposals_table(args)
        sections.append(f"## Inference proposals and image size: `{args.checkpoint}`\n\n{text}")
        print(text)
    if args.report:
        write_report(args.report, "Speed: which model for which machine", "bench/speed.py",
                     sys.argv[1:] if argv is None else argv, "\n\n".join(sections))


if __name__ == "__main__":
    main()
