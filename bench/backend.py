"""Memory and latency of ``segkit ml-backend``'s ``/predict``, against a plain baseline in the same run.

    python bench/backend.py [--img-size 800] [--runs 5] [--slow-seconds 10] [--report docs/benchmarks/backend.md]

One run makes a random-init checkpoint (score threshold 0.05: it fills every detection slot) and a
synthetic 50 MP JPEG (8660x5773, a gradient with noise and a few shapes, quality 90) in a temporary
folder, serves images from a loopback HTTP server of its own (one route hangs ``--slow-seconds``, then
fails), and starts a real backend process (``--max-detections 20``). Then:

* **50 MP photo.** One ``/predict`` with polygons, then one with brushes (Label Studio's brush RLE is
  at the original's size). Time is the HTTP round trip (download, decode, forward, regions). The
  backend's peak RSS (VmHWM) is reset to its current RSS (``/proc/PID/clear_refs``) just before each
  request, so "peak above idle" is what that request cost over the idle backend. A small image's
  ``/predict`` is measured the same way, for reference: what the forward at the model's size costs.
* **Baseline**, each case in a fresh process: what the backend did before it decoded at reduced size:
  ``load_image`` at full size, ``Predictor(image)``, ``image_entry``, ``prediction_result``. Idle is
  VmRSS once the model is loaded; peak is VmHWM (exec resets it; ``ru_maxrss`` is printed beside it
  and may keep the bench's own RSS from the fork). Its time is from the file on disk, no download.
* **Latency.** The median of ``--runs`` ``/predict`` calls of a small sample image alone, then the same
  while another ``/predict`` waits on the slow route (started 0.5 s before). That route hangs for
  ``--slow-seconds`` and then fails (503), and a new waiting request starts as soon as one is answered:
  a request is waiting through every timed call, however long the calls take on this machine, and none
  ever reaches the model (its forward would compete with the timed calls, which is not what is measured).

Goals (issue #18): the 50 MP photo under 0.8 GB (819 MiB) above the idle backend; a normal request
no slower while another waits on a slow image: its median within the spread of the calls alone (at
most the slowest of them). RSS is in MiB, as /proc reports it. The machine's load average is printed:
other work on the machine moves the times, not the memory.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.report import write_report  # noqa: E402 - after the path it needs
SMALL_IMAGE = next(iter(sorted((REPO / "data" / "sample" / "val" / "images").glob("*.jpg"))), None)
CLASSES = ["leaf", "pebble", "shell"]
PHOTO_SIZE = (8660, 5773)  # 50 MP, 3:2, a phone's full-resolution photo
MAX_DETECTIONS = 20
GOAL_MB = 0.8 * 1024  # issue #18: a 50 MP photo costs under 0.8 GB above the idle backend
LABEL_CONFIG = ('<View><Image name="photo" value="$img"/><{tag} name="outline" toName="photo">'
                '<Label value="leaf"/><Label value="pebble"/><Label value="shell"/></{tag}></View>')
REGION_TAGS = {"polygons": "PolygonLabels", "brushes": "BrushLabels"}
METHOD = """\
What a real `segkit ml-backend` process costs to answer Label Studio's `/predict` for a 50 MP photo, and whether
a normal request stays as fast while another one waits on a slow image server. The model is random init
(score threshold 0.05, at most 20 detections, so that it fills every slot); the photo is a synthetic 8660x5773
JPEG (a gradient with noise and a few shapes, about a phone photo's file size), served with the other images
from a loopback HTTP server of the benchmark's own.

**50 MP photo.** One `/predict` with polygons, then one with brushes (Label Studio's brush RLE is at the
original's size); time is the HTTP round trip (download, decode, forward, regions). The backend's peak RSS is
reset to its current RSS just before each request, so "peak above idle" is what that request cost over the
idle backend. A small sample image's `/predict` is measured the same way, for reference: what the forward at
the model's size costs. **Baseline**, in the same run, each case in a fresh process: what the backend did
before it decoded large photos at reduced size (`load_image` at full size, `Predictor`, then the same region
code), timed from the file on disk.

**Latency.** The median of several `/predict` calls of a small sample image alone, then the same while another
`/predict` waits on a route that hangs and then fails (503); a new waiting request starts as soon as one is
answered, so one is waiting through every timed call. Goals (issue #18): the 50 MP photo under 0.8 GB above the
idle backend; a normal request no slower while another waits on a slow image (its median at most the slowest
call alone). RSS is in MiB, as /proc reports it."""


# --- in fresh processes: the inputs, and the baseline ---------------------------------------------------

def prepare(folder: Path, img_size: int) -> dict:
    """A random-init checkpoint and the synthetic 50 MP JPEG in ``folder``."""
    import numpy as np
    import torch
    from PIL import Image, ImageDraw

    from segkit.models.checkpoint import save_checkpoint
    from segkit.tasks.checkpoint import make_checkpoint
    from segkit.models.mask_rcnn import build_model

    torch.manual_seed(0)
    model = build_model("maskrcnn_resnet50_fpn", len(CLASSES) + 1, weights=None, img_size=img_size)
    checkpoint = folder / "random_init.pt"
    save_checkpoint(make_checkpoint(model, "maskrcnn_resnet50_fpn", CLASSES, img_size=img_size,
                                    score_threshold=0.05), checkpoint)
    del model

    w, h = PHOTO_SIZE
    rng = np.random.default_rng(0)
    pixels = np.empty((h, w, 3), np.uint8)
    x, y = np.linspace(30, 220, w, dtype=np.float32), np.linspace(40, 200, h, dtype=np.float32)[:, None]
    pixels[..., 0] = x
    pixels[..., 1] = y
    pixels[..., 2] = (x + y) / 2
    for rows in range(0, h, 512):  # noise, so the file is about a phone photo's 15 MB, not 1 MB
        block = pixels[rows:rows + 512]
        block += rng.integers(0, 32, block.shape, dtype=np.uint8)  # at most 220 + 31: no wrap-around
    image = Image.fromarray(pixels)
    del pixels
    draw = ImageDraw.Draw(image)
    draw.ellipse((1200, 900, 3400, 2600), fill=(40, 140, 60))  # a leaf-ish blob
    draw.rectangle((5200, 1400, 7300, 3100), fill=(150, 150, 160))
    draw.polygon([(2600, 4200), (4300, 3300), (5600, 5200), (3000, 5500)], fill=(220, 200, 170))
    draw.ellipse((6600, 3900, 7900, 5100), fill=(90, 70, 50))
    photo = folder / "photo.jpg"
    image.save(photo, quality=90)
    return {"checkpoint": str(checkpoint), "photo": str(photo), "photo_mb": photo.stat().st_size / 2**20}


def baseline(checkpoint: str, photo: str, regions: str) -> dict:
    """The backend's steps before reduced decoding, in this (fresh) process: the 50 MP photo at full size."""
    import resource

    from segkit.evaluation.coco import image_entry
    from segkit.data.images import load_image
    from segkit.inference.predictor import Predictor
    from segkit.labelstudio.preannotations import prediction_result

    predictor = Predictor.from_checkpoint(checkpoint, max_detections=MAX_DETECTIONS)
    idle = rss_mb(os.getpid(), "VmRSS")
    start = time.perf_counter()
    image = load_image(photo)
    loaded = time.perf_counter()
    prediction = predictor(image)
    predicted = time.perf_counter()
    entry = image_entry(photo, image.width, image.height, prediction)
    result = prediction_result(entry, "baseline", "outline", "photo", regions == "brushes")
    end = time.perf_counter()
    return {"time_s": end - start, "decode_s": loaded - start, "forward_s": predicted - loaded,
            "regions_s": end - predicted, "idle_mb": idle, "peak_mb": rss_mb(os.getpid(), "VmHWM"),
            "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "regions": len(result["result"])}


def rss_mb(pid: int, field: str) -> float:
    """``field`` (VmRSS: now, VmHWM: peak) of process ``pid`` in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak(pid: int) -> bool:
    """Set ``pid``'s VmHWM to its current RSS (Linux >= 4.0); False when the kernel refuses."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def run_internal(args: list[str]) -> dict:
    """This file in a fresh process (its peak RSS is its own); its last line of output, as JSON."""
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:2])} failed ({proc.returncode}): {proc.stderr.strip()[-800:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- the bench's image server ----------------------------------------------------------------------------

class ImageServer:
    """Files on 127.0.0.1 (``/photo.jpg``, ``/small.jpg``), and ``/slow.jpg``, which hangs, then answers 503."""

    def __init__(self, files: dict[str, Path], slow_seconds: float):
        self.files, self.slow_seconds = files, slow_seconds
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                name = self.path.lstrip("/").split("?")[0]
                if name == "slow.jpg":
                    time.sleep(server.slow_seconds)
                    self.send_error(503, "slow, then unavailable")
                    return
                path = server.files.get(name)
                if path is None:
                    self.send_error(404)
                    return
                data = path.read_bytes()
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):  # quiet
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="bench-images", daemon=True)
        self.thread.start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


# --- the backend process ---------------------------------------------------------------------------------

class BackendProcess:
    """``segkit ml-backend`` on a free loopback port, allowed to fetch from the bench's image server."""

    def __init__(self, checkpoint: str, scratch: Path, image_port: int):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = scratch / "backend.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LABEL_STUDIO", "BASIC_AUTH"))}
        env["XDG_CACHE_HOME"] = str(scratch / "cache")
        cmd = [sys.executable, "-m", "segkit", "ml-backend", "--checkpoint", checkpoint, "--port", str(self.port),
               "--max-detections", str(MAX_DETECTIONS), "--fetch-timeout", "30", "--runs-dir", str(scratch / "runs"),
               "--allow-host", f"127.0.0.1:{image_port}"]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)

    def wait_healthy(self, timeout: float = 180) -> float:
        """Seconds until ``GET /health`` answers 200; raises with the log's tail when it never does."""
        start = time.perf_counter()
        while time.perf_counter() - start < timeout:
            if self.proc.poll() is not None:
                break
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return time.perf_counter() - start
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.3)
        raise RuntimeError(f"the backend did not become healthy (exit {self.proc.poll()}):\n{self.log_tail()}")

    def predict(self, image_url: str, regions: str = "polygons", task_id: int = 1) -> tuple[float, int]:
        """(seconds, regions answered) of one ``/predict`` of one task."""
        body = json.dumps({"tasks": [{"id": task_id, "data": {"img": image_url}}],
                           "label_config": LABEL_CONFIG.format(tag=REGION_TAGS[regions])}).encode()
        request = urllib.request.Request(f"{self.url}/predict", body, {"Content-Type": "application/json"})
        start = time.perf_counter()
        with urllib.request.urlopen(request, timeout=600) as response:
            answer = json.loads(response.read())
        return time.perf_counter() - start, len(answer["results"][0]["result"])

    def log_tail(self, lines: int = 15) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:]) if self.log.exists() else ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the run ---------------------------------------------------------------------------------------------

def measured(backend: BackendProcess, image_url: str, regions: str, task_id: int) -> dict:
    """One ``/predict``, with the backend's RSS before it and its peak during it."""
    pid = backend.proc.pid
    idle = rss_mb(pid, "VmRSS")
    reset = reset_peak(pid)
    seconds, count = backend.predict(image_url, regions, task_id)
    return {"time_s": seconds, "idle_mb": idle, "peak_mb": rss_mb(pid, "VmHWM"), "regions": count,
            "peak_reset": reset}


def latency(backend: BackendProcess, images: ImageServer, runs: int) -> dict:
    """Medians of a small image's ``/predict`` alone and while another request waits on the slow route."""
    alone = [backend.predict(images.url("small.jpg"), task_id=10 + i)[0] for i in range(runs)]
    done, slow = threading.Event(), {"answers": [], "errors": []}

    def keep_one_waiting():  # one /predict on the slow route at all times, until the timed calls end
        while not done.is_set():
            try:
                slow["answers"].append(backend.predict(images.url("slow.jpg"), task_id=99))
            except Exception as e:  # noqa: BLE001 - reported with the table
                slow["errors"].append(repr(e))
                return

    waiting = threading.Thread(target=keep_one_waiting, name="bench-slow", daemon=True)
    waiting.start()
    time.sleep(0.5)
    during = [backend.predict(images.url("small.jpg"), task_id=20 + i)[0] for i in range(runs)]
    done.set()
    waiting.join(images.slow_seconds + 60)
    return {"alone": alone, "during": during, "slow": slow}


def table(rows: list[list[str]]) -> str:
    header, *body = rows
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in body])


def load_line() -> str:
    loads = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"load average (1/5/15 min): {loads} on {os.cpu_count()} CPUs"


def results_markdown(photo: dict, idle_at_start: float, backend_cases: dict, baseline_cases: dict, small: dict,
                     lat: dict, args: argparse.Namespace) -> str:
    """This run's settings, its two tables and whether the goals were met (markdown)."""
    from PIL import Image

    rows = [["case", "time (s)", "idle RSS (MB)", "peak RSS (MB)", "peak above idle (MB)", "regions"]]
    cases = [(f"{name}, {regions}", by_regions[regions]) for regions in REGION_TAGS
             for name, by_regions in (("backend", backend_cases), ("baseline: full-size decode", baseline_cases))]
    with Image.open(SMALL_IMAGE) as im:
        small_size = "x".join(map(str, im.size))
    for name, c in cases + [(f"backend, polygons, small image ({small_size}), for reference", small)]:
        rows.append([name, f"{c['time_s']:.1f}", f"{c['idle_mb']:.0f}", f"{c['peak_mb']:.0f}",
                     f"{c['peak_mb'] - c['idle_mb']:.0f}", str(c["regions"])])
    out = [f"## 50 MP photo\n\n{PHOTO_SIZE[0]}x{PHOTO_SIZE[1]}, {photo['photo_mb']:.1f} MB JPEG, "
           f"model at {args.img_size} px, max {MAX_DETECTIONS} detections.\n", table(rows), ""]
    for regions, c in baseline_cases.items():
        out.append(f"- baseline {regions}: decode {c['decode_s']:.1f} s, forward {c['forward_s']:.1f} s, "
                   f"regions {c['regions_s']:.1f} s; ru_maxrss {c['ru_maxrss_mb']:.0f} MB")
    if not all(c["peak_reset"] for c in [*backend_cases.values(), small]):
        out.append("- the kernel refused to reset the backend's VmHWM: its peak includes its start-up")

    alone, during = statistics.median(lat["alone"]), statistics.median(lat["during"])
    out += [f"\n## Latency\n\n`/predict` of a small image ({SMALL_IMAGE.name}), {args.runs} runs each; the slow "
            f"route hangs {args.slow_seconds:g} s, then fails.\n",
            table([["case", "median (s)", "min-max (s)"],
                   ["alone", f"{alone:.2f}", f"{min(lat['alone']):.2f}-{max(lat['alone']):.2f}"],
                   ["while another request waits on a slow image", f"{during:.2f}",
                    f"{min(lat['during']):.2f}-{max(lat['during']):.2f}"]]), "",
            f"- ratio (while waiting / alone): {during / alone:.2f}"]
    slow = lat["slow"]
    answers = ", ".join(f"{s:.1f} s ({n} regions)" for s, n in slow["answers"])
    out.append(f"- the waiting requests: {len(slow['answers'])} answered: {answers}"
               + (f"; failed: {slow['errors']}" if slow["errors"] else ""))

    worst = max(c["peak_mb"] - c["idle_mb"] for c in backend_cases.values())
    above_start = max(c["peak_mb"] for c in backend_cases.values()) - idle_at_start
    out.append(f"\n## Goals\n\n- 50 MP photo under 0.8 GB ({GOAL_MB:.0f} MB) above the idle backend: "
               f"{'met' if max(worst, above_start) < GOAL_MB else 'MISSED'} (worst {worst:.0f} MB above the RSS "
               f"before the request, {above_start:.0f} MB above the backend's RSS when it started)")
    ok = not slow["errors"] and during <= max(lat["alone"])
    out.append(f"- a normal `/predict` no slower while another waits on a slow image: {'met' if ok else 'MISSED'} "
               f"(median {during:.2f} s against {alone:.2f} s alone, whose slowest was {max(lat['alone']):.2f} s)")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--img-size", type=int, default=800, help="the random-init model's image size")
    parser.add_argument("--runs", type=int, default=5, help="timed /predict calls of the small image, per case")
    parser.add_argument("--slow-seconds", type=float, default=10, help="how long the slow route waits")
    parser.add_argument("--report", default=None, help="also write the page (markdown) here")
    parser.add_argument("--internal", nargs="+", help=argparse.SUPPRESS)  # prepare DIR | baseline CKPT PHOTO REGIONS
    args = parser.parse_args()
    if args.internal:
        kind, *rest = args.internal
        out = prepare(Path(rest[0]), args.img_size) if kind == "prepare" else baseline(*rest)
        print(json.dumps(out))
        return

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # killed, too, the backend and temp files go
    print(load_line(), flush=True)
    started = time.perf_counter()
    scratch = Path(tempfile.mkdtemp(prefix="segkit-bench-backend-"))
    images = backend = None
    try:
        photo = run_internal(["--internal", "prepare", str(scratch), "--img-size", str(args.img_size)])
        print(f"prepared the checkpoint and the photo in {time.perf_counter() - started:.0f} s", flush=True)
        images = ImageServer({"photo.jpg": Path(photo["photo"]), "small.jpg": SMALL_IMAGE}, args.slow_seconds)
        backend = BackendProcess(photo["checkpoint"], scratch, images.port)
        healthy_after = backend.wait_healthy()
        idle_at_start = rss_mb(backend.proc.pid, "VmRSS")
        print(f"backend healthy after {healthy_after:.0f} s, idle RSS {idle_at_start:.0f} MB "
              f"(start-up peak {rss_mb(backend.proc.pid, 'VmHWM'):.0f} MB)", flush=True)
        backend_cases = {regions: measured(backend, images.url("photo.jpg"), regions, task_id)
                         for task_id, regions in enumerate(REGION_TAGS, 1)}
        small = measured(backend, images.url("small.jpg"), "polygons", 3)  # also warms the latency's calls
        print("50 MP /predict done", flush=True)
        lat = latency(backend, images, args.runs)
        print("latency done", flush=True)
        backend.stop()  # the baselines get the machine to themselves, as the backend had it
        baseline_cases = {regions: run_internal(["--internal", "baseline", photo["checkpoint"], photo["photo"],
                                                 regions]) for regions in REGION_TAGS}
        text = results_markdown(photo, idle_at_start, backend_cases, baseline_cases, small, lat, args)
        print(text)
        if args.report:
            write_report(args.report, "The ML backend on a large photo and beside a slow image", "bench/backend.py",
                         sys.argv[1:], f"{METHOD}\n\n{text}")
    except Exception:
        if backend is not None:
            print(f"backend log (tail):\n{backend.log_tail()}", file=sys.stderr)
        raise
    finally:
        if backend is not None:
            backend.stop()
        if images is not None:
            images.close()
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"\n{load_line()}; the whole run took {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
