"""Which images to label next: least-sure first (the order ``segkit prelabel`` gives), with or without a
diversity term, against random order.

From a labelled Label Studio COCO export and a checkpoint trained on it (whose saved split says which images
are the pool and which are held out), a simulated project is labelled in rounds: it starts with
``--seed-images`` of the pool labelled; each round labels ``--step`` more and trains a fresh model from the
same start (``--weights``) on what is labelled so far. *Least-sure first* labels the images the latest model
scores lowest (``segkit.serve.prelabel.labelling_prediction``'s task score, as the Data Manager sorts them);
*least-sure + k-center* takes, of the 3 x ``--step`` least-sure, those farthest from everything labelled (greedy
k-center on the model's pooled backbone features: unsure and unlike each other); *random* labels them in a
random order (``--seeds``). Each model's mask AP on the held-out images (the checkpoint's val and test splits)
is reported, and how many labels each active order needs to reach random order's final AP (interpolated
between rounds).

    python bench/ordering.py --checkpoint CKPT [--seed-images 10] [--step 10] [--rounds 2] [--seeds 0 1]
        [--weights ../shared/weights/mobilenet_v2_imagenet_features.pth] [--reuse] [--report docs/benchmarks/ordering.md]
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
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.report import write_report  # noqa: E402 - after the path it needs
from segkit.inference.predictor import Predictor  # noqa: E402
from segkit.models.forward import image_tensors  # noqa: E402
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
    if args.reuse and (folder / "run" / "best.pt").is_file():  # trained by an earlier call on the same picks
        metrics = load_checkpoint(folder / "run" / "best.pt").get("metrics") or {}
        return {"ap": metrics.get("val_segm_map", 0.0), "ap50": metrics.get("val_segm_map50", 0.0),
                "best": str(folder / "run" / "best.pt")}
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


def least_sure(predictor: Predictor, pool: list[str], labelled: list[str], root: Path, k: int) -> list[str]:
    """The ``k`` images of ``pool`` the model is least sure of (lowest task score, ties by name)."""
    scores = {n: labelling_prediction(predictor, _image(root, n))[1] for n in pool}
    return sorted(pool, key=lambda n: (scores[n], n))[:k]


def least_sure_k_center(predictor: Predictor, pool: list[str], labelled: list[str], root: Path, k: int) -> list[str]:
    """Of the ``3 k`` least-sure images, ``k`` picked greedily farthest from everything labelled or picked
    (k-center on the model's pooled backbone features): unsure, and unlike each other."""
    candidates = least_sure(predictor, pool, labelled, root, 3 * k)
    found, known = embeddings(predictor, candidates, root), embeddings(predictor, labelled, root)
    distance = np.linalg.norm(found[:, None] - known[None], axis=-1).min(1)
    chosen = []
    for _ in range(min(k, len(candidates))):
        i = int(distance.argmax())
        chosen.append(candidates[i])
        distance = np.minimum(distance, np.linalg.norm(found - found[i], axis=-1))
        distance[i] = -1.0
    return chosen


@torch.inference_mode()
def embeddings(predictor: Predictor, names: list[str], root: Path) -> np.ndarray:
    """(n, C) unit vectors: each image's coarsest FPN map, averaged over its pixels."""
    model, rows = predictor.model, []
    for n in names:
        batch, _ = model.transform(image_tensors([_image(root, n)], predictor.device))
        features = model.backbone(batch.tensors)
        rows.append(list(features.values())[-1].mean((2, 3))[0].cpu().numpy())
    rows = np.stack(rows)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True).clip(1e-8)


def _image(root: Path, name: str) -> np.ndarray:
    return np.asarray(Image.open(root / "images" / _base(name)).convert("RGB"))


STRATEGIES = {"least-sure first": least_sure, "least-sure + k-center": least_sure_k_center}


def active_curve(pick, slug: str, seed: list[str], first: dict, pool: list[str], held_out: list[str], args,
                 coco: dict, root: Path) -> list[tuple[int, float]]:
    """(labelled images, AP) after each round of labelling what ``pick`` chooses with the latest model."""
    curve, labelled, latest = [(len(seed), first["ap"])], list(seed), first["best"]
    for r in range(1, args.rounds + 1):
        predictor = Predictor.from_checkpoint(latest, device="cpu")
        labelled += pick(predictor, [n for n in pool if n not in labelled], labelled, root, args.step)
        result = train_on(labelled, held_out, Path(args.out) / f"{slug}-{r}", args, coco, root)
        curve.append((len(labelled), result["ap"]))
        latest = result["best"]
    return curve


def labels_to_reach(curve: list[tuple[int, float]], target: float) -> float | None:
    """Labels at which ``curve`` ((labels, AP), rising labels) first reaches ``target``, linearly interpolated."""
    for (n0, a0), (n1, a1) in zip(curve, curve[1:]):
        if a0 >= target:
            return float(n0)
        if a1 >= target:
            return n0 + (n1 - n0) * (target - a0) / (a1 - a0)
    return float(curve[0][0]) if curve and curve[0][1] >= target else None


def report_lines(curves: dict, pool: int, held_out: int, args) -> list[str]:
    """The table of AP per labelled images and strategy, and how many labels each active order needs to reach
    random order's final AP (markdown lines)."""
    randoms = [c for n, c in curves.items() if n.startswith("random")]
    mean_random = [(randoms[0][i][0], statistics.mean(c[i][1] for c in randoms)) for i in range(len(randoms[0]))]
    (final, target) = mean_random[-1]
    lines = [f"Pool: the checkpoint's train split ({pool} images); held out: its val and test splits "
             f"({held_out} images), on which every model is scored once, after its last epoch. Each model: "
             f"`{args.model}` from `{Path(args.weights).name}`, {args.epochs} epochs at {args.img_size} px.", "",
             "| labelled images | " + " | ".join(curves) + " | random, mean |", "|---|" + "---|" * (len(curves) + 1)]
    for i, (n, mean) in enumerate(mean_random):
        lines.append(f"| {n} | " + " | ".join(f"{c[i][1]:.3f}" for c in curves.values()) + f" | {mean:.3f} |")
    lines += ["", f"Random order's final mask AP: {target:.3f} with {final} labelled images (goal: an active order "
                  f"reaches it with <= 80% of the labels)."]
    for name in STRATEGIES:
        needed = labels_to_reach(curves[name], target)
        lines.append(f"- {name}: " + (f"reaches it with **{needed:.0f}** labels ({needed / final:.0%})." if needed
                                      is not None else f"does not reach it with the labels tried (final AP "
                                                       f"{curves[name][-1][1]:.3f}): goal not met."))
    return lines + ["", "Differences within the spread between the random seeds are not findings."]


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
    p.add_argument("--reuse", action="store_true", help="take trainings finished by an earlier call from --out")
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
    curves = {name: active_curve(pick, slug, seed, first, pool, held_out, args, coco, root)
              for (name, pick), slug in zip(STRATEGIES.items(), ("least-sure", "k-center"))}
    for s in args.seeds:
        order = random.Random(s).sample([n for n in pool if n not in seed], args.step * args.rounds)
        curves[f"random (seed {s})"] = [(len(seed), first["ap"])] + [
            (len(seed) + args.step * r, train_on(seed + order[:args.step * r], held_out, out / f"random-{s}-{r}", args,
                                                 coco, root)["ap"]) for r in range(1, args.rounds + 1)]
    lines = report_lines(curves, len(pool), len(held_out), args)
    print("\n".join(lines))
    if args.report:
        write_report(args.report, "Least-sure first against random order", "bench/ordering.py", sys.argv[1:],
                     __doc__.split("\n\n")[1].replace("``", "`") + "\n\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
