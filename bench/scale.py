"""Does prediction scale? One single-thread process against N single-thread torchrun ranks and a local Ray pool
of N single-thread actors, on the same images, in one run.

    python bench/scale.py [--n 2] [--checkpoint best.pt] [--images 4 12] [--report docs/benchmarks/scale.md]

Each way runs ``segkit predict`` as a user would (a fresh output folder each time) on the first SMALL and
then the first LARGE of the sample's images; images/s is the marginal rate (LARGE - SMALL) / (seconds of
the large run - seconds of the small one), so start-up (importing torch, loading the model, starting
torchrun's agent or a local Ray) cancels out; the end-to-end time of the large run is shown beside it.
Peak RSS is the kernel's high-water mark (VmHWM) of every process of the run, read while it runs: the
largest worker (rank or actor), and all processes together (the launcher, Ray's own daemons included).
The goal on a CPU machine: N ranks >= 0.8 x N x one process. Without --checkpoint: a random-init model
(10 detection slots at threshold 0.05: they cost what a trained model's detections cost).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.report import write_report  # noqa: E402 - after the path it needs
SAMPLE = REPO / "data" / "sample"
ARGS = ["--max-detections", "10", "--score-threshold", "0.05", "--batch-size", "1", "--threads", "1"]
METHOD = """\
Does prediction scale? `segkit predict` run as a user would, in three ways on the same images: one
single-thread process, N single-thread torchrun ranks, and a local Ray pool of N single-thread actors (a fresh
output folder each time). Each way runs on the first SMALL and then the first LARGE of the sample's training
images; images/s is the marginal rate, (LARGE - SMALL) / (seconds of the large run - seconds of the small
one), so that start-up (importing torch, loading the model, starting torchrun's agent or a local Ray) cancels
out, and the end-to-end time of the large run is shown beside it. Peak RSS is the kernel's high-water mark
(VmHWM) of every process of the run, read while it runs: the largest worker (rank or actor), and all the
processes together (the launcher and Ray's own daemons included). The goal on a CPU machine: N ranks at least
0.8 x N x one process. Without `--checkpoint` the model is random init (10 detection slots at score threshold
0.05, which it fills, so they cost what a trained model's detections cost)."""


def random_init_checkpoint(folder: Path) -> Path:
    import torch  # the benchmark's parent process needs no torch until here

    from segkit.models.checkpoint import save_checkpoint
    from segkit.tasks.checkpoint import make_checkpoint
    from segkit.models.mask_rcnn import build_model

    torch.manual_seed(0)
    classes = ["leaf", "pebble", "shell"]
    model = build_model("maskrcnn_resnet50_fpn", len(classes) + 1, weights=None, img_size=128)
    path = folder / "random-init.pt"
    save_checkpoint(make_checkpoint(model, "maskrcnn_resnet50_fpn", classes, img_size=128), path)
    return path


def command(way: str, n: int, checkpoint: Path, images: Path, out: Path) -> list[str]:
    predict = ["predict", *ARGS, "--checkpoint", str(checkpoint), "--out", str(out)]
    if way == "one process":
        return [sys.executable, "-m", "segkit", *predict, str(images)]
    if way == "torchrun":
        torchrun = str(Path(sys.executable).with_name("torchrun"))
        return [torchrun, "--standalone", f"--nproc-per-node={n}", "-m", "segkit", *predict, str(images)]
    return [sys.executable, "-m", "segkit", *predict, "--ray", "--workers", str(n), "--cpus-per-worker", "1",
            str(images)]


def descendants(pid: int) -> list[int]:
    """``pid`` and every process under it, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo += children.get(p, [])
    return found


def peak_rss_mb(pid: int) -> tuple[float, str]:
    """(VmHWM in MB, command line) of a live process; (0, "") once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return 0.0, ""
    kb = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")), 0)
    return kb / 1024, cmdline


def timed_run(cmd: list[str]) -> dict:
    """Seconds, the largest worker's and the whole tree's peak RSS (MB) of one command."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peaks: dict[int, tuple[float, str]] = {}
    while proc.poll() is None:
        for pid in descendants(proc.pid):
            mb, line = peak_rss_mb(pid)
            if mb:
                peaks[pid] = max(peaks.get(pid, (0.0, line)), (mb, line))
        time.sleep(0.2)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr.read()[-3000:]}")
    workers = [mb for mb, line in peaks.values() if "ray::MapWorker" in line or " -m segkit" in line]
    return {"seconds": seconds, "worker_mb": max(workers, default=0.0), "total_mb": sum(mb for mb, _ in peaks.values())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2, help="ranks and Ray actors (default 2)")
    parser.add_argument("--checkpoint", type=Path, help="a segkit checkpoint (default: random init)")
    parser.add_argument("--images", type=int, nargs=2, default=[4, 12], metavar=("SMALL", "LARGE"),
                        help="image counts of the two runs of each way (default 4 12)")
    parser.add_argument("--ways", nargs="+", default=["one process", "torchrun", "ray"])
    parser.add_argument("--report", default=None, help="also write the page (markdown) here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="segkit-scale-") as tmp:
        tmp = Path(tmp)
        checkpoint = args.checkpoint or random_init_checkpoint(tmp)
        sources = sorted((SAMPLE / "train" / "images").glob("*.jpg"))
        folders = {}
        for count in args.images:
            folders[count] = tmp / f"images{count}"
            folders[count].mkdir()
            for src in sources[:count]:
                shutil.copy(src, folders[count])
        rows = []
        for way in args.ways:
            n = 1 if way == "one process" else args.n
            runs = {count: timed_run(command(way, n, checkpoint, folders[count], tmp / f"out-{way}-{count}"))
                    for count in args.images}
            small, large = args.images
            rate = (large - small) / max(runs[large]["seconds"] - runs[small]["seconds"], 1e-9)
            rows.append({"way": way, "n": n, "rate": rate, **runs[large]})
    print(f"\n{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end\n")
    text = results_markdown(rows, args)
    print(text)
    if args.report:
        write_report(args.report, "Scaling prediction: one process, torchrun ranks, a Ray pool", "bench/scale.py",
                     sys.argv[1:], f"{METHOD}\n\n{text}")


def results_markdown(rows: list[dict], args: argparse.Namespace) -> str:
    """This run's settings and its table (markdown): one row per way, its rate against one process's."""
    base = rows[0]["rate"] if rows and rows[0]["way"] == "one process" else None
    model = f"`{args.checkpoint}`" if args.checkpoint else "random init"
    lines = [f"Images {args.images[0]} and {args.images[1]}; 1 thread per process; {model}.", "",
             "| way | processes | images/s (marginal) | x one process | end to end, s | peak RSS per worker, MB | "
             "peak RSS all, MB |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['rate'] / base:.2f}" if base else "-"
        lines.append(f"| {r['way']} | {r['n']} | {r['rate']:.2f} | {ratio} | {r['seconds']:.1f} | "
                     f"{r['worker_mb']:.0f} | {r['total_mb']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
