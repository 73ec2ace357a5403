"""Transfer learning, measured: the same Mask R-CNN from an ImageNet backbone and from random init.

Each run is ``segkit train`` in its own process, with the same data, split, recipe, epochs and seed; only
``--weights`` differs (plus any recipe variants asked for with ``--variant``). Prints held-out (val) mask
AP / AP50 after every epoch with the training time so far and the run's CPU time and peak RSS, then the
test split's AP of each best.pt; draws AP against training time for every run into a PNG, and with
``--report`` writes the same as a Markdown page (date, machine, command, table).

    python bench/transfer.py [--data ../shared/realdata/labelstudio_coco_vehicles] [--epochs 6] [--img-size 384]
        [--model maskrcnn_mobilenet_v2_fpn] [--imagenet ../shared/weights/mobilenet_v2_imagenet_features.pth]
        [--variant "lr0.02=--lr 0.02"] [--out bench-out/transfer] [--report docs/benchmarks/transfer.md]
"""
from __future__ import annotations

import argparse
import csv
import json
import platform
import resource
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(SHARED / "realdata" / "labelstudio_coco_vehicles"))
    p.add_argument("--model", default="maskrcnn_mobilenet_v2_fpn")
    p.add_argument("--imagenet", default=str(SHARED / "weights" / "mobilenet_v2_imagenet_features.pth"),
                   help="ImageNet start: a backbone file, or 'imagenet' (torchvision's download)")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--img-size", type=int, default=384)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variant", action="append", default=[],
                   help="NAME=EXTRA TRAIN FLAGS: one more run, from the ImageNet start unless the flags give "
                        "--weights (repeatable)")
    p.add_argument("--note", default="", help="a paragraph for the report (what differs between runs)")
    p.add_argument("--no-random", action="store_true", help="skip the random-init baseline")
    p.add_argument("--variants-only", action="store_true", help="only the --variant runs (the baselines ran before)")
    p.add_argument("--out", default="bench-out/transfer")
    p.add_argument("--report", help="also write the table as a Markdown page here")
    p.add_argument("--reuse", action="store_true", help="take runs finished by an earlier call from --out")
    return p.parse_args(argv)


def run_training(name: str, args: argparse.Namespace, extra: list[str]) -> dict:
    """One ``segkit train`` run in its own process: its metrics.csv rows, test AP, CPU seconds and peak RSS."""
    out = Path(args.out) / name
    saved = out.parent / f"{out.name}.json"  # not with_suffix: a name like lr-0.02 has a dot
    if args.reuse and saved.is_file():  # a finished run of an earlier call: its numbers, not a new training
        return json.loads(saved.read_text())
    cmd = [sys.executable, str(REPO / "train.py"), "--data", args.data, "--model", args.model,
           "--epochs", str(args.epochs), "--img-size", str(args.img_size), "--seed", str(args.seed),
           "--out", str(out), "--no-progress", "--save-interval", "0", *extra]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    log = out.parent / f"{out.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        code = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
    if code != 0:
        raise SystemExit(f"{name}: training failed (exit {code}), see {log}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    test = json.loads((out / "test_metrics.json").read_text()) if (out / "test_metrics.json").is_file() else {}
    result = {"name": name, "cmd": cmd, "rows": rows, "test": test, "wall": time.perf_counter() - start,
              "cpu": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
              "rss_mb": after.ru_maxrss / 1024}
    saved.write_text(json.dumps(result))
    return result


def shown(cmd: list[str]) -> str:
    """A command as the README shows it: paths under the repository's parent written from the repository."""
    return shlex.join(cmd).replace(str(REPO.parent) + "/", "../").replace(str(REPO) + "/", "")


def table(results: list[dict]) -> str:
    lines = ["| run | epoch | train time (s) | val mask AP | val mask AP50 | val box AP |",
             "|---|---|---|---|---|---|"]
    for r in results:
        elapsed = 0.0
        for row in r["rows"]:
            elapsed += float(row["seconds"])
            lines.append(f"| {r['name']} | {row['epoch']} | {elapsed:.0f} | {float(row['val_segm_map']):.3f} | "
                         f"{float(row['val_segm_map50']):.3f} | {float(row['val_bbox_map']):.3f} |")
    lines += ["", "| run | best epoch | test mask AP | test mask AP50 | CPU time (s) | wall (s) | peak RSS (MB) |",
              "|---|---|---|---|---|---|---|"]
    for r in results:
        t = r["test"]
        lines.append(f"| {r['name']} | {t.get('epoch', '-')} | {t.get('test_segm_map', float('nan')):.3f} | "
                     f"{t.get('test_segm_map50', float('nan')):.3f} | {r['cpu']:.0f} | {r['wall']:.0f} | "
                     f"{r['rss_mb']:.0f} |")
    return "\n".join(lines)


def plot(results: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Against epochs: every run does the same work per epoch (CPU time in the legend), while wall time per
    # epoch moves with whatever else the machine runs
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for r in results:
        epochs = [int(row["epoch"]) for row in r["rows"]]
        for ax, key in zip(axes, ("val_segm_map", "val_segm_map50")):
            ax.plot(epochs, [float(row[key]) for row in r["rows"]], marker="o",
                    label=f"{r['name']} ({r['cpu'] / 60:.0f} CPU-min)")
    for ax, what in zip(axes, ("val mask AP", "val mask AP50")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(what)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> None:
    args = parse_args(argv)
    runs = [] if args.variants_only else [("imagenet", ["--weights", args.imagenet])]
    if not (args.no_random or args.variants_only):
        runs.append(("random-init", ["--weights", "none"]))
    for spec in args.variant:
        name, _, flags = spec.partition("=")
        runs.append((name, ["--weights", args.imagenet, *shlex.split(flags)]))
    results = []
    for name, extra in runs:
        print(f"{name}: training ...", flush=True)
        results.append(run_training(name.replace(" ", "_"), args, extra))
        results[-1]["name"] = name
    for r in results:
        print(f"  {r['name']}: {shown(r['cmd'][1:])}")
    text = table(results)
    print(text)
    title = f"{args.model} on {Path(args.data).name}, {args.img_size} px"
    png = Path(args.out) / "transfer.png"
    plot(results, png, title)
    print(f"curves: {png}")
    if args.report:
        report = Path(args.report)
        report.parent.mkdir(parents=True, exist_ok=True)
        shutil_png = report.with_suffix(".png")
        shutil_png.write_bytes(png.read_bytes())
        report.write_text(
            f"# Transfer learning: {title}\n\n"
            f"Written by `bench/transfer.py` on {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, "
            f"{platform.machine()} CPU, {__import__('os').cpu_count()} cores, no GPU.\n\n"
            f"    python bench/transfer.py {shown(sys.argv[1:] if argv is None else argv)}\n\n"
            + "\n".join(f"- {r['name']}: `{shown(['train.py', *r['cmd'][2:]])}`" for r in results)
            + (f"\n\n{args.note}" if args.note else "")
            + "\n\nTrain time: the epochs' wall seconds as metrics.csv records them (they move with whatever else the "
              "machine runs); each run's CPU time is in the second table. Val: the run's held-out val split "
              "(scored every epoch); test: its test split, scored once with best.pt."
            + f"\n\n{text}\n\n![curves]({shutil_png.name})\n")
        print(f"report: {report}")


if __name__ == "__main__":
    main()
