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
import hashlib
import logging
import os
import secrets
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse

from segkit.coco import image_entry
from segkit.images import load_image
from segkit.labelstudio.client import API_KEY_ENV, Client, LabelStudioError
from segkit.labelstudio.config import LabelConfigError, RegionTarget, choose_target, match_labels
from segkit.labelstudio.project import ImageCache, cache_folder, image_url
from segkit.preannotations import prediction_result
from segkit.readers.labelstudio import image_reference

log = logging.getLogger("segkit.labelstudio")


@dataclass
class BackendConfig:
    """How the backend predicts, reaches Label Studio and retrains (``segkit ml-backend --help``)."""

    checkpoint: Path
    score_threshold: float | None = None  # None: the checkpoint's
    max_detections: int = 100
    img_size: int | None = None  # None: the checkpoint's
    regions: str = "auto"  # auto (polygons when the config has both), polygon or brush
    device: str | None = None
    label_studio_url: str | None = None  # default $LABEL_STUDIO_URL, else what /setup says
    api_key: str | None = None  # default $LABEL_STUDIO_API_KEY, else what /setup says
    basic_auth: tuple[str, str] | None = None
    train_every: int = 0  # retrain after this many new/updated annotations (0: only on "Start training")
    train_epochs: int = 10
    train_img_size: int | None = None  # None: the checkpoint's
    train_args: list[str] = field(default_factory=list)  # more `segkit train` options
    runs_dir: Path = Path("runs/labelstudio")
    cache_dir: Path | None = None


def model_version(checkpoint: Path) -> str:
    """``<run>-<8 hex of the file>``: a retrained checkpoint always gets a new version."""
    digest = hashlib.sha256(checkpoint.read_bytes()).hexdigest()[:8]
    return f"segkit-{checkpoint.parent.name or checkpoint.stem}-{digest}"


class ServedModel:
    """The predictor being served and its version; swapped whole when a retraining succeeds."""

    def __init__(self, cfg: BackendConfig, predictor=None):
        self.cfg = cfg
        self.lock = threading.Lock()  # one forward at a time: torch already uses every core
        self.versions: list[str] = []
        self.load(cfg.checkpoint, predictor)

    def load(self, checkpoint: Path, predictor=None) -> None:
        """Serve ``checkpoint`` (``predictor``: the same, already loaded, e.g. the demo's)."""
        from segkit.predictor import Predictor  # torch: imported when a model is served

        predictor = predictor or Predictor.from_checkpoint(checkpoint, self.cfg.device, self.cfg.max_detections)
        if self.cfg.img_size and hasattr(predictor.model, "transform"):
            predictor.model.transform.min_size = (self.cfg.img_size,)
        elif self.cfg.img_size:  # a semantic model resizes itself
            predictor.model.img_size = self.cfg.img_size
        if self.cfg.score_threshold is not None:
            predictor.score_threshold = self.cfg.score_threshold
        version = model_version(checkpoint)
        with self.lock:
            self.predictor, self.checkpoint, self.version = predictor, checkpoint, version
        self.versions.append(version)
        log.info("serving %s as model_version %s", checkpoint, version)


@dataclass
class LabelStudioLink:
    """Where Label Studio is and the key to use: explicit settings first, then what ``/setup`` sent."""

    url: str | None = None
    api_key: str | None = None
    schemas: dict[str, str] = field(default_factory=dict)  # project id -> labeling config

    @property
    def usable(self) -> bool:
        return bool(self.url and self.api_key)

    def client(self) -> Client:
        if not self.usable:
            raise LabelStudioError(f"the backend does not know Label Studio's URL and key: set LABEL_STUDIO_URL "
                                   f"and {API_KEY_ENV} where it runs")
        return Client(self.url, self.api_key)

    def client_or_none(self) -> Client:
        """A client of Label Studio, or, when it is unknown, one for absolute image URLs only (no key sent)."""
        return self.client() if self.usable else Client("http://label-studio.invalid", "-")


class Predictions:
    """Tasks -> Label Studio predictions with the served model, in the config's tag names and labels."""

    def __init__(self, model: ServedModel, link: LabelStudioLink, cfg: BackendConfig):
        self.model, self.link, self.cfg = model, link, cfg
        self._targets: dict[tuple[str, tuple[str, ...]], tuple[RegionTarget, dict[str, str]]] = {}

    def target(self, label_config: str, classes: list[str],
               semantic: bool = False) -> tuple[RegionTarget, dict[str, str]]:
        """The tag to fill and class -> label, worked out (and logged) once per config and class list.

        A semantic model prefers brushes: a class's area is one region, often in many pieces.
        """
        key = (label_config, tuple(classes), semantic)
        if key not in self._targets:
            prefer = "brush" if self.cfg.regions == "brush" or semantic else "polygon"
            target = choose_target(label_config, prefer)
            if self.cfg.regions != "auto" and target.kind != self.cfg.regions:
                log.warning("the labeling config has no %s labels; sending %s regions", self.cfg.regions, target.kind)
            self._targets[key] = target, match_labels(classes, target)
        return self._targets[key]

    def __call__(self, tasks: list[dict], label_config: str, project: str | None) -> list[dict]:
        with self.model.lock:
            predictor, version = self.model.predictor, self.model.version
            target, labels = self.target(label_config, predictor.classes, predictor.task == "semantic")
            cache = ImageCache(self._cache_folder(project))
            with self.link.client_or_none() as client:
                try:
                    return [self._one(task, predictor, version, target, labels, client, cache) for task in tasks]
                finally:
                    cache.save()

    def _one(self, task, predictor, version, target, labels, client, cache) -> dict:
        ref = image_reference(task.get("data"))
        try:
            path = cache.folder / cache.fetch(client, self._url(ref, task.get("id"), client), ref)
            image = load_image(path)
        except (LabelStudioError, ValueError, OSError) as e:
            log.warning("task %s: no prediction: %s", task.get("id"), e)
            return {"model_version": version, "score": 0.0, "result": []}
        prediction = predictor(image)
        if hasattr(prediction, "as_instances"):  # a semantic model: one region per class
            prediction = prediction.as_instances()
        entry = image_entry(ref, image.width, image.height, prediction)
        return prediction_result(entry, version, target.from_name, target.to_name, target.brush, labels)

    def _url(self, ref: str | None, task_id: Any, client: Client) -> str:
        if not ref:
            raise LabelStudioError("the task's data names no image")
        if ref.startswith(("http://", "https://")):
            return ref
        if not self.link.usable:
            raise LabelStudioError(f"{ref}: served by Label Studio, and the backend does not know its URL and "
                                   f"key (set LABEL_STUDIO_URL and {API_KEY_ENV} where the backend runs)")
        return image_url(client, ref, task_id)

    def _cache_folder(self, project: str | None) -> Path:
        # The same folder as the project's training data: an image fetched once serves both.
        return cache_folder(self.link.url or "external", str(project or "unknown").split(".")[0], self.cfg.cache_dir)


class Retrainer:
    """One background ``segkit train`` at a time; requests that come during one are merged into one more."""

    def __init__(self, model: ServedModel, link: LabelStudioLink, cfg: BackendConfig):
        self.model, self.link, self.cfg = model, link, cfg
        self.status: dict[str, Any] = {"state": "idle", "trainings": 0}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._pending: str | None = None
        self._changes: dict[str, int] = {}  # new/updated annotations per project since its last training

    def request(self, project: str) -> str:
        """Start a training on ``project`` now, or once the running one ends; returns "started" or "queued"."""
        with self._lock:
            if self._thread and self._thread.is_alive():
                self._pending = project
                self.status["queued"] = True
                return "queued"
            self._changes[project] = 0
            self._thread = threading.Thread(target=self._loop, args=(project,), name="segkit-train", daemon=True)
            self._thread.start()
            return "started"

    def annotation_changed(self, project: str) -> str | None:
        """Count an annotation event; with ``train_every`` set, start a training every N of them."""
        if not self.cfg.train_every:
            return None
        with self._lock:
            self._changes[project] = self._changes.get(project, 0) + 1
            due = self._changes[project] >= self.cfg.train_every
        return self.request(project) if due else None

    def _loop(self, project: str | None) -> None:
        while project:
            self._train(project)
            with self._lock:
                project, self._pending = self._pending, None
                self.status["queued"] = False

    def _train(self, project: str) -> None:
        started = time.time()
        self.status.update(state="running", project=project, started=_iso(started), error=None)
        try:
            out = self._next_run(project)
            self.status["run"] = str(out)
            checkpoint = self._run_training(project, out)
            self.model.load(checkpoint)
        except Exception as e:  # noqa: BLE001 - whatever went wrong, the old model keeps serving
            log.error("training on project %s failed; still serving %s: %s", project, self.model.version, e)
            self.status.update(state="failed", error=str(e), finished=_iso(time.time()))
            return
        self.status.update(state="done", finished=_iso(time.time()), model_version=self.model.version,
                           trainings=self.status["trainings"] + 1, seconds=round(time.time() - started, 1))

    def _next_run(self, project: str) -> Path:
        from segkit.runs import next_run_dir

        return next_run_dir(self.cfg.runs_dir, f"project-{project}", main=True, world=1)

    def _run_training(self, project: str, out: Path) -> Path:
        """``segkit train`` from the served checkpoint on the project; the key goes by environment, not argv."""
        from segkit.checkpoint import load_checkpoint

        link = self.link
        if not link.usable:
            link.client()  # raises, saying what to set
        ckpt = load_checkpoint(self.model.checkpoint)
        cmd = [sys.executable, "-m", "segkit", "train", "--data", f"{link.url.rstrip('/')}/projects/{project}",
               "--weights", str(self.model.checkpoint), "--model", ckpt["arch"],
               "--task", ckpt.get("task") or "instance",
               "--img-size", str(self.cfg.train_img_size or ckpt["img_size"]),
               "--score-threshold", str(ckpt.get("score_threshold", 0.5)),
               "--epochs", str(self.cfg.train_epochs), "--out", str(out), "--no-progress", *self.cfg.train_args]
        out.mkdir(parents=True, exist_ok=True)
        log.info("training on project %s -> %s", project, out)
        with open(out / "train.log", "wb") as log_file:
            rc = subprocess.run(cmd, env={**os.environ, API_KEY_ENV: link.api_key}, stdout=log_file,
                                stderr=subprocess.STDOUT).returncode
        if rc != 0:
            tail = (out / "train.log").read_text(errors="replace").strip().splitlines()[-3:]
            raise RuntimeError(f"segkit train exited with {rc}: {' | '.join(tail)} (log: {out / 'train.log'})")
        best = out / "best.pt"
        return best if best.is_file() else out / "last.pt"


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


@dataclass
class Backend:
    """The parts behind the routes, for tests and for the demo that serves both."""

    model: ServedModel
    link: LabelStudioLink
    predictions: Predictions
    retrainer: Retrainer


def create_backend(cfg: BackendConfig, predictor=None) -> Backend:
    """Load the checkpoint (unless its ``predictor`` is given) and wire the parts; no server is started."""
    model = ServedModel(cfg, predictor)
    link = LabelStudioLink(cfg.label_studio_url, cfg.api_key)
    return Backend(model, link, Predictions(model, link, cfg), Retrainer(model, link, cfg))


def create_app(cfg: BackendConfig) -> FastAPI:
    """A FastAPI app serving only the ML-backend routes (``segkit ml-backend``)."""
    app = FastAPI(title="segkit ML backend")
    add_routes(app, create_backend(cfg), cfg.basic_auth)
    return app


def add_routes(app: FastAPI, backend: Backend, basic_auth: tuple[str, str] | None = None) -> None:
    """Label Studio's ML-backend routes on ``app`` (also the demo's app: one Space, both roles)."""
    def authorized(request: Request) -> None:
        if basic_auth and not _basic_auth_ok(request.headers.get("authorization", ""), basic_auth):
            raise HTTPException(401, "basic auth required", headers={"WWW-Authenticate": "Basic"})

    @app.get("/health")
    async def health(request: Request) -> dict:  # async: never queued behind a long /predict
        authorized(request)
        return {"status": "UP", "model_class": "segkit", "model_version": backend.model.version}

    @app.post("/setup")
    async def setup(request: Request) -> dict:
        authorized(request)
        body = await _json_body(request)
        project = str(body.get("project") or "").split(".")[0]
        if body.get("schema"):
            backend.link.schemas[project] = body["schema"]
        backend.link.url = backend.link.url or body.get("hostname") or None
        backend.link.api_key = backend.link.api_key or body.get("access_token") or None
        return {"model_version": backend.model.version}

    @app.post("/predict")
    def predict(request: Request, body: dict) -> JSONResponse:  # sync: runs in the thread pool
        authorized(request)
        project = str(body.get("project") or "").split(".")[0]
        label_config = body.get("label_config") or backend.link.schemas.get(project)
        if not label_config:
            raise HTTPException(400, "no label_config in the request and no /setup for this project")
        try:
            results = backend.predictions(body.get("tasks") or [], label_config, project)
        except LabelConfigError as e:
            raise HTTPException(400, str(e)) from None
        return JSONResponse({"results": results, "model_version": backend.model.version})

    @app.post("/webhook")
    async def webhook(request: Request) -> dict:
        authorized(request)
        body = await _json_body(request)
        action, project = body.get("action"), _project_id(body.get("project"))
        if project is None:
            return {"status": "ignored", "reason": "no project in the event"}
        if action == "START_TRAINING":
            return {"status": backend.retrainer.request(project)}
        if action in ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_CREATED"):
            return {"status": backend.retrainer.annotation_changed(project) or "counted"}
        return {"status": "ignored", "action": action}

    @app.get("/versions")
    async def versions(request: Request) -> dict:
        authorized(request)
        return {"versions": backend.model.versions, "model_version": backend.model.version,
                "checkpoint": str(backend.model.checkpoint), "training": dict(backend.retrainer.status)}


async def _json_body(request: Request) -> dict:
    try:
        body = await request.json()
    except ValueError:
        raise HTTPException(400, "the body is not JSON") from None
    return body if isinstance(body, dict) else {}


def _project_id(project: Any) -> str | None:
    if isinstance(project, dict):
        project = project.get("id")
    return str(project).split(".")[0] if project not in (None, "") else None


def _basic_auth_ok(header: str, expected: tuple[str, str]) -> bool:
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        user, _, password = base64.b64decode(encoded).decode().partition(":")
    except ValueError:
        return False
    return secrets.compare_digest(user, expected[0]) & secrets.compare_digest(password, expected[1])
