"""Peak memory and time of one large photo through the Predictor, its overlay and its COCO RLEs.

Each case runs in a fresh process (peak RSS is per process):

    python bench/large_image.py [--checkpoint best.pt] [--image photo.jpg] [--sizes 4096x2731 8484x5656] \
        [--report docs/benchmarks/large_image.md]

The image is resized to each size (a large real photo, upscaled when smaller). ``forward`` is the
model up to its mask head; ``post`` is everything after it: pasting the kept masks, the overlay, the
instance-id PNG's map and the COCO RLEs. Run it with PYTHONPATH pointing at another checkout (for
example the commit before compact masks) to measure that one: there only the total is split out.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.append(str(REPO))  # last: a checkout named in PYTHONPATH keeps its own segkit
from bench.report import write_report  # noqa: E402 - after the path it needs
DEFAULT_IMAGE = REPO.parent / "shared" / "realdata" / "labelstudio_coco_desks" / "images" / "7f53b8b6-5c7dd76e-250436438.jpeg"


def run_case(checkpoint: str, image_path: str, size: tuple[int, int], detections: int) -> dict:
    """One image through predictor -> overlay -> id map -> COCO RLEs, in this process."""
    import torch
    from PIL import Image

    from segkit.evaluation.coco import prediction_to_coco
    from segkit.inference.predictor import Predictor
    from segkit.inference.visualize import instance_id_map, overlay

    image = Image.open(image_path).convert("RGB").resize(size, Image.Resampling.BILINEAR)
    predictor = Predictor.from_checkpoint(checkpoint, device="cpu", max_detections=detections)
    base = peak_rss_of_self()
    start = time.perf_counter()
    timing = {}
    try:  # the compact path: time the forward apart from what follows it
        from segkit.models.forward import detect, to_prediction
        from torchvision.transforms.functional import pil_to_tensor

        with torch.inference_mode():
            tensor = pil_to_tensor(image).float().div_(255)
            out = detect(predictor.model, [tensor])[0]
            timing["forward_s"] = time.perf_counter() - start
            t = time.perf_counter()
            prediction = to_prediction(out, predictor.classes, 0.0, tensor.shape[-2:])
    except ImportError:  # an older checkout: the whole predictor call
        prediction = predictor(image, 0.0)
        t = time.perf_counter()
    overlay(image, prediction)
    instance_id_map(prediction)
    rles = prediction_to_coco(0, prediction)
    end = time.perf_counter()
    if "forward_s" in timing:
        timing["post_s"] = end - t
    return {"size": f"{size[0]}x{size[1]}", "detections": len(prediction), "rles": len(rles),
            "total_s": end - start, **timing, "peak_rss_mb": peak_rss_of_self(),
            "rss_before_mb": base}


def random_init_checkpoint(folder: Path, img_size: int) -> str:
    import torch

    from segkit.models.checkpoint import save_checkpoint
    from segkit.tasks.checkpoint import make_checkpoint
    from segkit.models.mask_rcnn import build_model

    torch.manual_seed(0)
    model = build_model("maskrcnn_resnet50_fpn", 4, weights=None, img_size=img_size)
    path = folder / "random_init.pt"
    save_checkpoint(make_checkpoint(model, "maskrcnn_resnet50_fpn", ["leaf", "pebble", "shell"], img_size=img_size), path)
    return str(path)


def peak_rss_of_self() -> float:
    """This process's peak RSS in MB: VmHWM, which exec resets (ru_maxrss would keep the parent's at fork)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


METHOD = """\
One photo, resized to each size (a large real photo, upscaled when smaller), through the `Predictor` with up to
`--detections` detections, then what a user does with the result: the overlay, the instance-id map and the
COCO RLEs. Each size runs in a fresh process, so peak RSS (the process's VmHWM) is that case's own; "before the
forward" is the peak once the model and the resized photo are loaded. "forward" is the model up to its mask
head; "post-processing" is everything after it: pasting the kept masks, the overlay, the id map and the RLEs.
Without `--checkpoint` the model is random init at 800 px, which fills all 100 detection slots. Run with
`PYTHONPATH` pointing at another checkout to measure that one; an older checkout without
`segkit.models.forward` gives only the total."""


def results_markdown(cases: list[dict], checkpoint: str | None, image: str) -> str:
    """This run's settings and its table (markdown): one row per size, failed cases with their exit status."""
    other = f" segkit from `PYTHONPATH={os.environ['PYTHONPATH']}`." if os.environ.get("PYTHONPATH") else ""
    lines = [f"Photo `{Path(image).name}`, model `{checkpoint or 'random init at 800 px'}`.{other}", "",
             "| image | detections | total (s) | forward (s) | post-processing (s) | peak RSS (MB) | "
             "peak RSS before the forward (MB) |", "|---|---|---|---|---|---|---|"]
    for c in cases:
        w, h = map(int, c["size"].split("x"))
        name = f"{c['size']} ({w * h / 1e6:.0f} MP)"
        if "failed" in c:
            lines.append(f"| {name} | failed (exit {c['failed']}) | | | | | |")
            continue
        forward, post = (f"{c[k]:.2f}" if k in c else "-" for k in ("forward_s", "post_s"))
        lines.append(f"| {name} | {c['detections']} | {c['total_s']:.1f} | {forward} | {post} | "
                     f"{c['peak_rss_mb']:.0f} | {c['rss_before_mb']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="segkit checkpoint (default: random init at 800 px: it fills all 100 slots)")
    parser.add_argument("--image", default=str(DEFAULT_IMAGE))
    parser.add_argument("--sizes", nargs="+", default=["4096x2731", "8484x5656"], help="WxH")
    parser.add_argument("--detections", type=int, default=100)
    parser.add_argument("--report", default=None, help="also write the page (markdown) here")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case, print json
    args = parser.parse_args()
    if args.case:
        w, h = map(int, args.case.split("x"))
        print(json.dumps(run_case(args.checkpoint, args.image, (w, h), args.detections)))
        return
    cases = []
    with tempfile.TemporaryDirectory() as scratch:
        checkpoint = args.checkpoint or random_init_checkpoint(Path(scratch), 800)
        for size in args.sizes:
            proc = subprocess.run([sys.executable, __file__, "--case", size, "--checkpoint", checkpoint,
                                   "--image", args.image, "--detections", str(args.detections)],
                                  capture_output=True, text=True)
            cases.append(json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else
                         {"size": size, "failed": proc.returncode, "stderr": proc.stderr[-300:]})
            print(json.dumps(cases[-1]), flush=True)
    text = results_markdown(cases, args.checkpoint, args.image)
    print(text)
    if args.report:
        write_report(args.report, "Large images: peak memory and time", "bench/large_image.py", sys.argv[1:],
                     f"{METHOD}\n\n{text}")


if __name__ == "__main__":
    main()
