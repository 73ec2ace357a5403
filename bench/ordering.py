"""Which images to label next: least-sure first (the order ``segkit prelabel`` gives) against random order.

From a labelled Label Studio COCO export and a checkpoint trained on it (whose saved split says which images
are the pool and which are held out), a simulated project is labelled in rounds: it starts with
``--seed-images`` of the pool labelled; each round labels ``--step`` more and trains a fresh model from the
same start (``--weights``) on what is labelled so far. *Least-sure first* labels the images the latest model
scores lowest (``segkit.serve.prelabel.labelling_prediction``'s task score, as the Data Manager sorts them);
*random* labels them in a random order (``--seeds``). Each model's mask AP on the held-out images (the
checkpoint's val and test splits) is reported, and how many labels least-sure first needs to reach random
order's final AP (interpolated between rounds; more than the last round when it never does).

    python bench/ordering.py --checkpoint CKPT [--seed-images 10] [--step 10] [--rounds 2] [--seeds 0 1]
        [--weights ../shared/weights/mobilenet_v2_imagenet_features.pth] [--report docs/benchmarks/ordering.md]
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.report import write_report  # noqa: E402 - after the path it needs
from segkit.inference.predictor import Predictor  # noqa: E402
from segkit.models.checkpoint import load_checkpoint  # noqa: E402
from segkit.serve.prelabel import labelling_prediction  # noqa: E402

SHARED = REPO.parent / "shared"


def write_subset(coco: dict, root: Path, names: list[str], dst: Path) -> None:
    """A COCO export (result.json + images/ of links) holding ``names`` (``file_name`` s of ``coco``)."""
    chosen = set(names)
    images = [dict(im, file_name=f"images/{_base(im['file_name'])}") for im in coco["images"]
              if im["file_name"] in chosen]
    ids = {im["id"] for im in images}
    (dst / "images").mkdir(parents=True)
    for im in coco["images"]:
        if im["file_name"] in chosen:
            (dst / "images" / _base(im["file_name"])).symlink_to((root / "images" / _base(im["file_name"])).resolve())
    subset = {**coco, "images": images, "annotations": [a for a in coco["annotations"] if a["image_id"] in ids]}
    (dst / "result.json").write_text(json.dumps(subset))


def _base(file_name: str) -> str:
    return file_name.replace("\\", "/").rsplit("/", 1)[-1]


def train_on(names: list[str], held_out: list[str], folder: Path, args, coco: dict, root: Path) -> dict:
    """A fresh model trained on ``names``, scored on ``held_out`` after its last epoch: (AP, AP50, best.pt)."""
    write_subset(coco, root, names, folder / "data" / "train")
    write_subset(coco, root, held_out, folder / "data" / "val")
    cmd = [sys.executable, str(REPO / "train.py"), "--data", str(folder / "data"), "--model", args.model,
           "--weights", args.weights, "--img-size", str(args.img_size), "--epochs", str(args.epochs),
           "--seed", "0", "--out", str(folder / "run"), "--no-progress", "--save-interval", "0",
           "--eval-every", str(args.epochs)]  # scored once, after the last epoch: no epoch chosen on the held-out
    started = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    best = load_checkpoint(folder / "run" / "best.pt")
    metrics = best.get("metrics") or {}
    print(f"  {len(names)} labelled -> mask AP {metrics.get('val_segm_map', 0):.3f} "
          f"({time.perf_counter() - started:.0f} s)", flush=True)
    return {"ap": metrics.get("val_segm_map", 0.0), "ap50": metrics.get("val_segm_map50", 0.0),
            "best": str(folder / "run" / "best.pt")}


def least_sure(checkpoint: str, pool: list[str], root: Path, k: int) -> list[str]:
    """The ``k`` images of ``pool`` the model is least sure of (lowest task score, ties by name)."""
    predictor = Predictor.from_checkpoint(checkpoint, device="cpu")
    scores = {n: labelling_prediction(predictor, np.asarray(Image.open(root / "images" / _base(n)).convert("RGB")))[1]
              for n in pool}
    return sorted(pool, key=lambda n: (scores[n], n))[:k]


def labels_to_reach(curve: list[tuple[int, float]], target: float) -> float | None:
    """Labels at which ``curve`` ((labels, AP), rising labels) first reaches ``target``, linearly interpolated."""
    for (n0, a0), (n1, a1) in zip(curve, curve[1:]):
        if a0 >= target:
            return float(n0)
        if a1 >= target:
            return n0 + (n1 - n0) * (target - a0) / (a1 - a0)
    return float(curve[0][0]) if curve and curve[0][1] >= target else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a checkpoint trained on --data: its split gives pool and held-out")
    p.add_argument("--data", help="the export (default: the checkpoint's)")
    p.add_argument("--model", default="maskrcnn_mobilenet_v2_fpn")
    p.add_argument("--weights", default=str(SHARED / "weights" / "mobilenet_v2_imagenet_features.pth"))
    p.add_argument("--img-size", type=int, default=384)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--seed-images", type=int, default=10)
    p.add_argument("--step", type=int, default=10)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--out", default="bench-out/ordering")
    p.add_argument("--report")
    args = p.parse_args()
    ckpt = load_checkpoint(args.checkpoint)
    root = Path(args.data or ckpt["config"]["data"])
    coco = json.loads((root / "result.json").read_text())
    by_base = {_base(im["file_name"]): im["file_name"] for im in coco["images"]}
    split = {k: [by_base[_base(p)] for p in v] for k, v in ckpt["split"].items()}
    pool, held_out = sorted(split["train"]), sorted(split["val"] + split["test"])
    out = Path(args.out)
    seed = random.Random(0).sample(pool, args.seed_images)
    print(f"pool {len(pool)}, held out {len(held_out)}, seed {len(seed)}", flush=True)
    first = train_on(seed, held_out, out / "seed", args, coco, root)
    curves = {"least-sure first": [(len(seed), first["ap"])]}
    labelled, latest = list(seed), first["best"]
    for r in range(1, args.rounds + 1):
        labelled += least_sure(latest, [n for n in pool if n not in labelled], root, args.step)
        result = train_on(labelled, held_out, out / f"least-sure-{r}", args, coco, root)
        curves["least-sure first"].append((len(labelled), result["ap"]))
        latest = result["best"]
    for s in args.seeds:
        order = random.Random(s).sample([n for n in pool if n not in seed], args.step * args.rounds)
        name = f"random (seed {s})"
        curves[name] = [(len(seed), first["ap"])]
        for r in range(1, args.rounds + 1):
            chosen = seed + order[:args.step * r]
            curves[name].append((len(chosen), train_on(chosen, held_out, out / f"random-{s}-{r}", args, coco, root)["ap"]))
    randoms = [c for n, c in curves.items() if n.startswith("random")]
    mean_random = [(randoms[0][i][0], statistics.mean(c[i][1] for c in randoms)) for i in range(len(randoms[0]))]
    target = mean_random[-1][1]
    needed = labels_to_reach(curves["least-sure first"], target)
    lines = [f"Pool: the checkpoint's train split ({len(pool)} images); held out: its val and test splits "
             f"({len(held_out)} images), on which every model is scored once, after its last epoch. Each model: "
             f"`{args.model}` from `{Path(args.weights).name}`, {args.epochs} epochs at {args.img_size} px.", "",
             "| labelled images | " + " | ".join(curves) + " | random, mean |",
             "|---|" + "---|" * (len(curves) + 1)]
    for i, (n, _) in enumerate(mean_random):
        lines.append(f"| {n} | " + " | ".join(f"{c[i][1]:.3f}" for c in curves.values()) + f" | {mean_random[i][1]:.3f} |")
    final = mean_random[-1][0]
    lines += ["", f"Random order's final mask AP: {target:.3f} with {final} labelled images. Least-sure first reaches "
              + (f"it with **{needed:.0f}** ({needed / final:.0%} of the labels; goal <= 80%)." if needed is not None
                 else f"it with none of the labels tried (its final AP {curves['least-sure first'][-1][1]:.3f}): "
                      f"goal (<= 80% of the labels) not met."),
              "Differences within the spread between the random seeds are not findings."]
    print("\n".join(lines))
    if args.report:
        write_report(args.report, "Least-sure first against random order", "bench/ordering.py", sys.argv[1:],
                     __doc__.split("\n\n")[1].replace("``", "`") + "\n\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
