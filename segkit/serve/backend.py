"""segkit as a Label Studio ML backend: ``GET /health``, ``POST /setup``, ``POST /predict``,
``POST /webhook`` and ``GET /versions`` (Label Studio's protocol, served with FastAPI).

``/predict`` answers one prediction per task, in order, with regions in the project's own tag
names and labels (see :mod:`segkit.labelstudio.config`), built by the same code as ``segkit
predict``'s ``labelstudio.json``. "Start training" (and, with ``train_every``, every N new or updated
annotations) fine-tunes the served checkpoint on the project in a background ``segkit train``
process; when it succeeds its best checkpoint is served under a new ``model_version``, which makes
Label Studio ask for fresh predictions; when it fails, the old model keeps serving and ``/versions``
says why.
"""
from __future__ import annotations

import base64
import contextlib
import ctypes
import json
import logging
import math
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FuturesTimeout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from segkit.data.images import ImageError
from segkit.data.readers.labelstudio import image_reference
from segkit.evaluation.coco import image_entry
from segkit.engine.runs import next_run_dir
from segkit.inference.predictor import Predictor
from segkit.inference.tiles import Tiling
from segkit.labelstudio.client import API_KEY_ENV, Client, LabelStudioError, canonical_origin, origin, redact
from segkit.labelstudio.config import LabelConfigError, RegionTarget, choose_target, match_labels
from segkit.labelstudio.egress import ALLOW_HOSTS_ENV, EgressPolicy
from segkit.labelstudio.preannotations import prediction_result
from segkit.labelstudio.project import ImageCache, TaskImage, cache_folder
from segkit.models.checkpoint import load_checkpoint, model_version
from segkit.serve.prelabel import labelling_prediction, max_image_side, prelabel_project
from segkit.serve.prompts import STEP_CACHE, FeatureCache, PromptEngine, prompts_from_context
from segkit.serve.settings import BackendConfig, check_settings, host_name, trusted_host_names
from segkit.tasks import get_task

log = logging.getLogger("segkit.labelstudio")


class ServedModel:
    """The predictor being served and its version; swapped whole when a retraining succeeds."""

    def __init__(self, cfg: BackendConfig, predictor=None):
        self.cfg = cfg
        self.lock = threading.Lock()  # one forward at a time: torch already uses every core
        self._swap = threading.Lock()  # predictor and version change together (not held during a forward)
        self.versions: list[str] = []
        self.load(cfg.checkpoint, predictor)

    def load(self, checkpoint: Path, predictor=None) -> None:
        """Serve the local file ``checkpoint`` (``predictor``: the same, already loaded, e.g. the demo's)."""
        predictor = predictor or Predictor.from_checkpoint(checkpoint, self.cfg.device, self.cfg.max_detections)
        if self.cfg.img_size and hasattr(predictor.model, "transform"):
            predictor.model.transform.min_size = (self.cfg.img_size,)
        elif self.cfg.img_size:  # a semantic model resizes itself
            predictor.model.img_size = self.cfg.img_size
        if self.cfg.score_threshold is not None:
            predictor.score_threshold = self.cfg.score_threshold
        if self.cfg.tile and predictor.task != "instance":
            log.warning("--tile is for instance models; %s is %s: predicting whole images", checkpoint, predictor.task)
        elif self.cfg.tile:
            predictor.tile(Tiling(self.cfg.tile, self.cfg.tile_overlap))
        version = model_version(checkpoint)
        with self._swap:
            self.predictor, self.checkpoint, self.version = predictor, checkpoint, version
        self.versions.append(version)
        log.info("serving %s as model_version %s", checkpoint, version)

    def current(self) -> tuple[Any, str]:
        """(predictor, version), read together: a retraining may swap both at any moment."""
        with self._swap:
            return self.predictor, self.version


NO_SERVER = "http://label-studio.invalid"  # the client's server when the backend knows no Label Studio


@dataclass
class LabelStudioLink:
    """Where Label Studio is and which key to send there: each key only ever goes with the URL it came with.

    The user's settings (``LABEL_STUDIO_URL`` with ``LABEL_STUDIO_API_KEY`` or ``--ls-token-file``) come first
    and cannot be changed by a request. Without them, ``/setup`` brings a (hostname, access_token) pair per
    project, kept together: a later ``/setup`` naming another host cannot take a key sent by an earlier one.
    Once set up, a project keeps its server and key: changing them takes the backend's credentials
    (``authenticated``, i.e. basic auth), else a stranger could point the project's next predictions elsewhere.
    """

    url: str | None = None
    api_key: str | None = None
    allow_hosts: list[str] = field(default_factory=list)
    timeout: float = 60.0
    max_projects: int = 1000
    schemas: OrderedDict = field(default_factory=OrderedDict)  # project id -> labeling config, most recent last
    setups: dict[str, tuple[str, str]] = field(default_factory=dict)  # project id -> (hostname, key) from /setup

    def setup(self, project: str, hostname: Any, key: Any, authenticated: bool = False) -> None:
        """Take a ``/setup`` request's server and key, as a pair, unless the user's settings decide.
        Raises PermissionError when it would change a project's server or key without ``authenticated``,
        or set up one project more than ``max_projects``."""
        if not (isinstance(hostname, str) and isinstance(key, str) and key) or len(hostname) + len(key) > 8192:
            return
        try:
            where = origin(hostname)
        except (httpx.InvalidURL, ValueError, UnicodeError):
            return
        if where[0] not in ("http", "https") or not where[1]:
            return
        if self.url and (self.api_key or where != origin(self.url)):
            return  # the user named the server: a request names neither it nor the key sent there
        before = self.setups.get(project)
        if before and (origin(before[0]) != where or before[1] != key) and not authenticated:
            raise PermissionError(f"project {project} is set up with another Label Studio or key; changing them "
                                  f"needs the backend's basic auth (or a restart of the backend)")
        if before is None and len(self.setups) >= self.max_projects:
            raise PermissionError(f"{self.max_projects} projects are set up already, the most this backend keeps")
        self.setups[project] = (hostname.rstrip("/"), key)

    def remember_schema(self, project: str, schema: str) -> None:
        """Keep ``project``'s labeling config for a /predict without one; the least recent go past the cap."""
        _put_recent(self.schemas, project, schema, self.max_projects)

    def server(self, project: str | None) -> tuple[str, str] | None:
        """(URL, key) of Label Studio for ``project``, or None when the backend does not know both."""
        if self.url and self.api_key:
            return self.url.rstrip("/"), self.api_key
        return self.setups.get(str(project)) if project else None

    def client(self, project: str | None) -> Client:
        """A client of the project's Label Studio; raises saying what to set when it is unknown."""
        found = self.server(project)
        if found is None:
            raise LabelStudioError(f"the backend does not know Label Studio's URL and key: set LABEL_STUDIO_URL "
                                   f"and {API_KEY_ENV} where it runs")
        url, key = found
        policy = EgressPolicy.create(url, self.allow_hosts)
        return Client(url, key, timeout=self.timeout, request_hook=policy.hook, transport=policy.transport())

    def client_or_none(self, project: str | None) -> Client:
        """A client of Label Studio, or, when it is unknown, one for absolute image URLs only (no key sent)."""
        if self.server(project):
            return self.client(project)
        policy = EgressPolicy.create(None, self.allow_hosts)
        return Client(NO_SERVER, "-", timeout=self.timeout, request_hook=policy.hook, transport=policy.transport())


class Predictions:
    """Tasks -> Label Studio predictions with the served model, in the config's tag names and labels.

    A request's images are downloaded concurrently and outside the model's lock, within a deadline, so a
    slow image server delays only its own request; any failure of one task (its image, its decoding, its
    prediction) gives that task an empty result, logged with the reason, and the others are answered.
    """

    def __init__(self, model: ServedModel, link: LabelStudioLink, cfg: BackendConfig):
        self.model, self.link, self.cfg = model, link, cfg
        self._targets: OrderedDict = OrderedDict()  # (config, classes, region) -> (target, labels), bounded
        self._caches: dict[Path, ImageCache] = {}  # one per Label Studio origin: bounded by cfg.max_projects
        # all requests together: a decode may take hundreds of MB, and each request's downloads add up
        self._decodes = threading.BoundedSemaphore(cfg.decode_workers)
        self._downloads = threading.BoundedSemaphore(cfg.download_workers)
        self._features = None  # segkit.serve.prompts.FeatureCache, made on the first prompt (keyed by model version)
        self._steps = None  # the same for refinement steps (keyed by task, image, clicks so far and model version)
        self._lock = threading.Lock()

    def target(self, label_config: str, classes: list[str],
               region: str = "polygon") -> tuple[RegionTarget, dict[str, str]]:
        """The tag to fill and class -> label, worked out (and logged) once per config and class list.

        ``region`` is the kind the model's task prefers (a semantic model: brushes, as a class's area is one
        region, often in many pieces); ``--regions brush`` asks brushes of any model.
        """
        key = (label_config, tuple(classes), region)
        with self._lock:
            found = self._targets.get(key)
        if found is None:
            prefer = "brush" if self.cfg.regions == "brush" else region
            target = choose_target(label_config, prefer)
            if self.cfg.regions != "auto" and target.kind != self.cfg.regions:
                log.warning("the labeling config has no %s labels; sending %s regions", self.cfg.regions, target.kind)
            found = target, match_labels(classes, target)
            with self._lock:
                _put_recent(self._targets, key, found, TARGETS_KEPT)
        return found

    def __call__(self, tasks: list, label_config: str, project: str | None, prompts: list | None = None) -> list[dict]:
        """One prediction per task; with ``prompts`` (Label Studio's auto-annotation: boxes and clicks the
        annotator drew, :func:`segkit.serve.prompts.prompts_from_context`) the objects they point at instead."""
        predictor, version = self.model.current()
        target, labels = self.target(label_config, predictor.classes, get_task(predictor.task).region)
        cache = self._cache(project)
        try:
            with self.link.client_or_none(project) as client:
                fetched = self._fetch_all(tasks, client, cache)
                return [self._one(task, found, client, cache, predictor, version, target, labels, prompts)
                        for task, found in zip(tasks, fetched)]
        finally:
            cache.save()

    def _fetch_all(self, tasks: list, client: Client, cache: ImageCache) -> list:
        """Each task's image in the cache (a :class:`TaskImage`), or the exception that kept it; all within
        ``cfg.fetch_timeout``. Only files are held: each image is decoded just before its forward, one at a time."""
        deadline = time.monotonic() + self.cfg.fetch_timeout
        pool = ThreadPoolExecutor(max_workers=max(1, min(self.cfg.fetch_workers, len(tasks))),
                                  thread_name_prefix="segkit-fetch")
        futures = [pool.submit(self._download, task, client, cache) for task in tasks]
        found = []
        for future in futures:
            try:
                found.append(future.result(timeout=max(0.0, deadline - time.monotonic())))
            except FuturesTimeout:
                found.append(TimeoutError(f"no image within {self.cfg.fetch_timeout:.0f} s"))
            except Exception as e:  # noqa: BLE001 - one task's image, whatever broke, is that task's failure
                found.append(e)
        pool.shutdown(wait=False, cancel_futures=True)  # a download past the deadline ends at its own timeout
        return found

    def _download(self, task: Any, client: Client, cache: ImageCache) -> TaskImage:
        ref = image_reference(task.get("data")) if isinstance(task, dict) else None
        if client.server == NO_SERVER and ref and not ref.startswith(("http://", "https://")):
            raise LabelStudioError(f"{redact(ref)}: served by Label Studio, and the backend does not know its URL "
                                   f"and key (set LABEL_STUDIO_URL and {API_KEY_ENV} where the backend runs)")
        with self._downloads:
            return TaskImage.download(client, cache, task)

    def _one(self, task, found, client, cache, predictor, version, target, labels, prompts=None) -> dict:
        task_id = task.get("id") if isinstance(task, dict) else None
        try:
            if isinstance(found, BaseException):
                raise found
            with self._decodes:
                image, original_size = found.load(client, cache, max_image_side(predictor), self.cfg.max_pixels)
            score = None  # a prompt's answer: the mean of its masks' scores
            with self.model.lock:  # one forward at a time: torch already uses every core
                if prompts:
                    prediction = self._prompted(predictor, version, (task_id, found.url), image, prompts, labels)
                else:  # scored as segkit prelabel scores it, so Label Studio orders tasks least-sure first
                    prediction, score = labelling_prediction(predictor, image)
            # a semantic model's class map: one region per class
            entry = image_entry(found.ref, image.width, image.height, prediction.as_instances())
            return prediction_result(entry, version, target.from_name, target.to_name, target.brush, labels,
                                     original_size=original_size, score=score)
        except Exception as e:  # noqa: BLE001 - the other tasks of the batch still get their predictions
            log.warning("task %s: no prediction: %s", task_id, _loggable(e))
            return {"model_version": version, "score": 0.0, "result": []}

    def _prompted(self, predictor, version: str, key, image, prompts: list, labels: dict[str, str]):
        """The objects the prompts point at, answered by the served model's heads on cached features."""
        with self._lock:
            if self._features is None:
                self._features = FeatureCache(self.cfg.prompt_cache)
                self._steps = FeatureCache(STEP_CACHE)
        label_classes = {label: i for i, name in enumerate(predictor.classes, 1) if (label := labels.get(name))}
        engine = PromptEngine(predictor, version, cache=self._features, steps=self._steps)
        return engine.predict(key, image, prompts, label_classes)

    def _cache(self, project: str | None) -> ImageCache:
        # One folder per Label Studio server for every project's predictions, so --cache-mb bounds them all;
        # a training's own cache (per project) is another process's, which this one must not evict from.
        # keyed by the origin, not its spelling: "http://LS:80/" and "http://ls" share one folder and one cap
        server = self.link.server(project)
        folder = cache_folder(canonical_origin(server[0]) if server else "external", "predictions", self.cfg.cache_dir)
        with self._lock:
            if folder not in self._caches:
                self._caches[folder] = ImageCache(folder, self.cfg.cache_bytes, self.cfg.max_download)
            return self._caches[folder]


TARGETS_KEPT = 64  # label configs x class lists worked out; a stranger's endless variants must not pile up


def _put_recent(recent: OrderedDict, key: Any, value: Any, most: int) -> None:
    """``recent[key] = value`` as the most recent entry, dropping the least recent past ``most`` entries."""
    recent.pop(key, None)
    recent[key] = value
    while len(recent) > most:
        recent.popitem(last=False)


def _loggable(error: BaseException) -> str:
    """An error as one log line, any URL in it cut before its query (signed links are credentials)."""
    import re

    text = f"{type(error).__name__}: {error}" if not isinstance(error, (LabelStudioError, ImageError)) else str(error)
    return re.sub(r"https?://[^\s'\"]+", lambda m: redact(m.group()), text)


class Retrainer:
    """One background ``segkit train`` at a time; each project asking meanwhile keeps its place in the queue.

    The training runs in a process group of its own, which :meth:`stop` ends (the backend calls it when it
    shuts down): a training left running would hold the GPU and later write into a run nobody serves.
    """

    def __init__(self, model: ServedModel, link: LabelStudioLink, cfg: BackendConfig):
        self.model, self.link, self.cfg = model, link, cfg
        self.status: dict[str, Any] = {"state": "idle", "trainings": 0, "queued": []}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._pending: list[str] = []  # projects waiting, in the order they asked, each once
        self._changes: OrderedDict = OrderedDict()  # project -> annotations new/updated since its last training
        self._process: subprocess.Popen | None = None
        self._stopped = False

    def request(self, project: str) -> str:
        """Start a training on ``project`` now, or once those before it end; returns "started" or "queued"."""
        with self._lock:
            self._changes.pop(project, None)
            if self._thread is not None:  # running, until _loop finds the queue empty (under this lock)
                if project not in self._pending and len(self._pending) >= self.cfg.max_projects:
                    return "refused: the queue is full"
                if project not in self._pending:
                    self._pending.append(project)
                self.status["queued"] = list(self._pending)
                return "queued"
            self._thread = threading.Thread(target=self._loop, args=(project,), name="segkit-train", daemon=True)
            self._thread.start()
            return "started"

    def annotation_changed(self, project: str) -> str | None:
        """Count an annotation event; with ``train_every`` set, start a training every N of them."""
        if not self.cfg.train_every:
            return None
        with self._lock:
            _put_recent(self._changes, project, self._changes.get(project, 0) + 1, self.cfg.max_projects)
            due = self._changes[project] >= self.cfg.train_every
        return self.request(project) if due else None

    def stop(self, timeout: float = 10.0) -> None:
        """End the running training's whole process group (SIGTERM, then SIGKILL) and drop the queue."""
        with self._lock:
            self._stopped, self._pending, process = True, [], self._process
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.info("stopped the training of project %s", self.status.get("project"))

    def _loop(self, project: str | None) -> None:
        while project and not self._stopped:
            self._train(project)
            with self._lock:
                project = self._pending.pop(0) if self._pending and not self._stopped else None
                self.status["queued"] = list(self._pending)
                if project is None:
                    self._thread = None  # a request from now on starts a new thread

    def _train(self, project: str) -> None:
        started = time.time()
        self.status.update(state="running", project=project, started=_iso(started), error=None)
        try:
            out = self._next_run(project)
            self.status["run"] = str(out)
            checkpoint = self._run_training(project, out)
            self.model.load(checkpoint)
        except Exception as e:  # noqa: BLE001 - whatever went wrong, the old model keeps serving
            log.error("training on project %s failed; still serving %s: %s", project, self.model.version,
                      _loggable(e))
            self.status.update(state="failed", error=_loggable(e), finished=_iso(time.time()))
            return
        self.status.update(state="done", finished=_iso(time.time()), model_version=self.model.version,
                           trainings=self.status["trainings"] + 1, seconds=round(time.time() - started, 1),
                           **({"prelabel": "running"} if self.cfg.prelabel_after_training else {}))
        if self.cfg.prelabel_after_training:
            self._prelabel(project)

    def _prelabel(self, project: str) -> None:
        """Post the new model's prediction of each task, scored least-sure first, so the Data Manager's order
        follows the new model without anyone pressing "Retrieve predictions" (and its 100 s limit)."""
        predictor, version = self.model.current()
        try:
            with self.link.client(project) as client:
                done = prelabel_project(client, int(project), predictor, version, cache_dir=self.cfg.cache_dir,
                                        max_pixels=self.cfg.max_pixels, progress=False, lock=self.model.lock)
        except Exception as e:  # noqa: BLE001 - the new model serves whether or not the tasks were re-scored
            log.error("pre-labelling project %s with %s failed: %s", project, version, _loggable(e))
            self.status.update(prelabel="failed", prelabel_error=_loggable(e))
            return
        log.info("pre-labelled project %s with %s: %d tasks posted, %d already done, %d failed", project, version,
                 len(done.posted), done.skipped, len(done.failed))
        self.status.update(prelabel="done", prelabelled=len(done.posted), prelabel_version=version)

    def _next_run(self, project: str) -> Path:
        return next_run_dir(self.cfg.runs_dir, f"project-{project}", main=True, world=1)

    def _run_training(self, project: str, out: Path) -> Path:
        """``segkit train`` from the served checkpoint on the project; the key goes by environment, not argv."""
        server = self.link.server(project)
        if server is None:
            self.link.client(project)  # raises, saying what to set
        url, key = server
        cmd = retrain_command(load_checkpoint(self.model.checkpoint), self.model.checkpoint,
                              f"{url}/projects/{project}", self.cfg, out)
        out.mkdir(parents=True, exist_ok=True)
        log.info("training on project %s -> %s", project, out)
        with open(out / "train.log", "wb") as log_file:
            with self._lock:
                if self._stopped:
                    raise RuntimeError("the backend is shutting down")
                env = {**os.environ, API_KEY_ENV: key, ALLOW_HOSTS_ENV: ",".join(self.cfg.allow_hosts)}
                self._process = subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                                 start_new_session=True, preexec_fn=_die_with_parent())
                self.status["pid"] = self._process.pid
            rc = self._process.wait()
        if rc != 0:
            tail = (out / "train.log").read_text(errors="replace").strip().splitlines()[-3:]
            raise RuntimeError(f"segkit train exited with {rc}: {' | '.join(tail)} (log: {out / 'train.log'})")
        best = out / "best.pt"
        return best if best.is_file() else out / "last.pt"


def retrain_command(ckpt: dict, checkpoint: Path, data: str, cfg: BackendConfig, out: Path) -> list[str]:
    """``segkit train`` of a new model from the served ``checkpoint`` (loaded: ``ckpt``) on ``data``, made as the
    served one was (architecture, task, size, threshold, training tiles, refinement head), plus the backend's own
    settings."""
    tiles = (ckpt.get("config") or {}).get("train_tiles")
    refiner = ["--interactive-head"] if ckpt.get("refiner") is not None else []  # clicks keep correcting masks
    return [sys.executable, "-m", "segkit", "train", "--data", data, "--weights", str(checkpoint),
            "--model", ckpt["arch"], "--task", ckpt.get("task") or "instance",
            "--img-size", str(cfg.train_img_size or ckpt["img_size"]),
            "--score-threshold", str(ckpt.get("score_threshold", 0.5)), *(["--train-tiles", str(tiles)] if tiles else []),
            "--epochs", str(cfg.train_epochs), "--out", str(out), "--no-progress", *refiner, *cfg.train_args]


def _die_with_parent() -> Callable[[], None] | None:
    """For Popen's ``preexec_fn`` on Linux: the child gets SIGTERM (and saves, as on Ctrl-C) when the backend
    dies, even by SIGKILL, which gives :meth:`Retrainer.stop` no chance to run (``PR_SET_PDEATHSIG``). None
    elsewhere. prctl is looked up here, before the fork: the child runs as little as possible."""
    prctl = getattr(ctypes.CDLL(None, use_errno=True), "prctl", None) if sys.platform.startswith("linux") else None
    if prctl is None:
        return None
    parent = os.getpid()

    def die_with_parent() -> None:
        prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG, for the thread that started it (which waits on it)
        if os.getppid() != parent:  # the backend died before the line above took effect
            os._exit(1)

    return die_with_parent


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


@dataclass
class Backend:
    """The parts behind the routes, for tests and for the demo that serves both."""

    cfg: BackendConfig
    model: ServedModel
    link: LabelStudioLink
    predictions: Predictions
    retrainer: Retrainer


def create_backend(cfg: BackendConfig, predictor=None) -> Backend:
    """Load the checkpoint (unless its ``predictor`` is given) and wire the parts; no server is started."""
    if cfg.api_key and not cfg.label_studio_url:
        check_settings(cfg, "127.0.0.1")  # raises: a key with nowhere it may go
    model = ServedModel(cfg, predictor)
    link = LabelStudioLink(cfg.label_studio_url, cfg.api_key, list(cfg.allow_hosts), cfg.fetch_timeout,
                           cfg.max_projects)
    return Backend(cfg, model, link, Predictions(model, link, cfg), Retrainer(model, link, cfg))


def create_app(cfg: BackendConfig) -> FastAPI:
    """A FastAPI app serving only the ML-backend routes (``segkit ml-backend``); its shutdown ends a training."""
    backend = create_backend(cfg)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        backend.retrainer.stop()

    app = FastAPI(title="segkit ML backend", lifespan=lifespan)
    add_routes(app, backend)
    return app


def add_routes(app: FastAPI, backend: Backend) -> None:
    """Label Studio's ML-backend routes on ``app`` (also the demo's app: one Space, both roles), each behind
    the same rules (:func:`_guard`), whichever app serves them: the Host check, basic auth when it is set."""
    import atexit

    atexit.register(backend.retrainer.stop)  # the demo's app has a lifespan of Gradio's: end a training anyway
    routes = Routes(backend)
    auth = [Depends(_guard(trusted_host_names(backend.cfg), backend.cfg.basic_auth))]
    for method, path, handler in [("GET", "/health", routes.health), ("POST", "/setup", routes.setup),
                                  ("POST", "/predict", routes.predict), ("POST", "/webhook", routes.webhook),
                                  ("GET", "/versions", routes.versions)]:
        app.add_api_route(path, handler, methods=[method], dependencies=auth)


class Routes:
    """The handlers of :func:`add_routes`: each reads its request and hands the work to the :class:`Backend`."""

    def __init__(self, backend: Backend):
        self.backend = backend

    async def health(self) -> dict:  # async: never queued behind a long /predict
        return {"status": "UP", "model_class": "segkit", "model_version": self.backend.model.version}

    async def setup(self, request: Request) -> dict:
        body, project = await self._body(request)
        if isinstance(body.get("schema"), str):
            self.backend.link.remember_schema(project or "", body["schema"])
        try:
            self.backend.link.setup(project or "", body.get("hostname"), body.get("access_token"),
                                    authenticated=self.backend.cfg.basic_auth is not None)
        except PermissionError as e:
            raise HTTPException(403, str(e)) from None
        return {"model_version": self.backend.model.version}

    async def predict(self, request: Request) -> JSONResponse:
        body, project = await self._body(request)
        tasks = body.get("tasks") or []
        if not isinstance(tasks, list):
            raise HTTPException(400, "'tasks' must be a list of Label Studio tasks")
        label_config = body.get("label_config") or self.backend.link.schemas.get(project or "")
        if not isinstance(label_config, str) or not label_config:
            raise HTTPException(400, "no label_config in the request and no /setup for this project")
        try:  # in a worker thread: downloads and the forward must not block the event loop
            prompts = _prompts(body.get("params"))
            results = await run_in_threadpool(self.backend.predictions, tasks, label_config, project, prompts)
        except (LabelConfigError, ValueError, TypeError, OverflowError) as e:  # the request's fields, not ours
            raise HTTPException(400, f"{type(e).__name__}: {e}"[:500]) from None
        return JSONResponse({"results": results, "model_version": self.backend.model.version})

    async def webhook(self, request: Request) -> dict:
        body, project = await self._body(request)
        action = body.get("action")
        if project is None:
            return {"status": "ignored", "reason": "no project in the event"}
        if action == "START_TRAINING":
            return {"status": self.backend.retrainer.request(project)}
        if action in ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_CREATED"):
            return {"status": self.backend.retrainer.annotation_changed(project) or "counted"}
        return {"status": "ignored", "action": action}

    async def _body(self, request: Request) -> tuple[dict, str | None]:
        """The request's JSON object and the project it names (:func:`_project_id`), or None."""
        body = await _json_body(request, self.backend.cfg.max_request_bytes)
        return body, _project_id(body.get("project"))

    async def versions(self) -> dict:
        backend = self.backend
        return {"versions": backend.model.versions, "model_version": backend.model.version,
                "checkpoint": str(backend.model.checkpoint), "training": dict(backend.retrainer.status)}


def _guard(hosts: list[str] | None, basic_auth: tuple[str, str] | None) -> Callable[[Request], Awaitable[None]]:
    """A FastAPI dependency run before every route reads anything: 400 to a Host not in ``hosts`` (None: any),
    401 to a request without ``basic_auth``'s credentials (None: none asked)."""
    async def check(request: Request) -> None:  # async: on the event loop, as the routes, not in a worker thread
        if hosts is not None and host_name(request.headers.get("host", "")) not in hosts:
            raise HTTPException(400, "Invalid host header: this backend answers only on loopback names")
        if basic_auth and not _basic_auth_ok(request.headers.get("authorization", ""), basic_auth):
            raise HTTPException(401, "basic auth required", headers={"WWW-Authenticate": "Basic"})

    return check


def _prompts(params: Any) -> list:
    """The boxes and clicks of an auto-annotation request (``params.context``); none for a plain one."""
    context = params.get("context") if isinstance(params, dict) else None
    if not context:
        return []
    return prompts_from_context(context)


async def _json_body(request: Request, max_bytes: int) -> dict:
    """The body as a JSON object, read no further than ``max_bytes`` (413), or 400/415 saying what is wrong.

    Strict where Python's json is lenient, so that nothing odd reaches the routes: numbers past a float's
    range (``1e400``), NaN and Infinity, and strings that cannot be written back (lone surrogates, ``"\\ud800"``).
    """
    # JSON only, as Label Studio sends: a web page can post text/plain across sites without asking first
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
        raise HTTPException(415, "the body must be JSON (Content-Type: application/json)")
    too_large = HTTPException(413, f"the body is over {max_bytes / 2**20:g} MB (--max-request-mb)")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise too_large
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > max_bytes:
            raise too_large
    try:
        body = json.loads(data, parse_float=_finite, parse_constant=_no_constant)
        json.dumps(body, ensure_ascii=False).encode()  # a lone surrogate fails here, not in the answer
    except (ValueError, RecursionError):  # also bytes that are not UTF-8, and nesting past Python's stack
        raise HTTPException(400, "the body is not JSON (or holds a number or string that JSON cannot carry)") \
            from None
    if not isinstance(body, dict):
        raise HTTPException(400, "the body must be a JSON object")
    return body


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:20]} is out of a float's range")
    return value


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


def _project_id(project: Any) -> str | None:
    """Label Studio's project field (``3``, ``"3.1712345"`` or ``{"id": 3}``) as ``"3"``; None when absent.
    Anything else is refused (400): it names folders and picks the server a key goes to, so ``"../.."`` must
    not pass, and ``"03"`` is ``"3"``, one project under two spellings never two."""
    if isinstance(project, dict):
        project = project.get("id")
    if project is None:
        return None
    head = str(project).split(".")[0] if isinstance(project, (int, str)) and not isinstance(project, bool) else ""
    tail = str(project)[len(head) + 1:] if isinstance(project, str) and "." in project else ""
    if not (head.isascii() and head.isdigit() and len(head) <= 18 and (tail.isascii() and tail.isdigit() or not tail)):
        raise HTTPException(400, "'project' must be a project id (3, \"3.1712345\" or {\"id\": 3})")
    return str(int(head))


def _basic_auth_ok(header: str, expected: tuple[str, str]) -> bool:
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        user, _, password = base64.b64decode(encoded).decode().partition(":")
    except (ValueError, UnicodeError):
        return False
    # bytes: compare_digest refuses non-ASCII str, which would turn a stranger's header into a 500
    return secrets.compare_digest(user.encode(), expected[0].encode()) & \
        secrets.compare_digest(password.encode(), expected[1].encode())
