"""Experiment tracking: TensorBoard event files in the run folder and/or an MLflow run, behind one interface.

``train.py --tracker tensorboard --tracker mlflow`` (or ``--tracker tensorboard,mlflow``) opens one
:class:`Tracker` per name; the trainer talks to them through :class:`Trackers`, which sends each call to
all of them. A tracker that fails (a server gone mid-run) is dropped with a warning: training, and
everything it writes to the run folder, goes on. Each backend is imported only when chosen.

Names logged: per step ``step/<loss>`` and ``step/lr`` at the global step; per epoch the metrics.csv
columns (``train_loss``, ``val_segm_map``, ``val_miou``, ...) at the epoch number, so the two can be
read side by side.
"""
from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Protocol

from segkit.atomic import write_json

TRACKERS = ("tensorboard", "mlflow")
STATE_FILE = "tracking.json"  # in the run folder: which MLflow run --resume continues
DEFAULT_EXPERIMENT = "segkit"  # MLflow experiment, unless $MLFLOW_EXPERIMENT_NAME names another


class TrackerError(RuntimeError):
    """A tracker that cannot be used at all (unknown name, package not installed); the message says what to do."""


class Tracker(Protocol):
    """What the trainer logs; every method is called on rank 0 only."""

    name: str

    def log_params(self, params: dict[str, Any]) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def log_image(self, name: str, image, step: int) -> None: ...  # a PIL image

    def log_artifact(self, path: Path) -> None: ...

    def close(self, status: str = "FINISHED") -> None: ...


def parse_names(values: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """``["tensorboard,mlflow"]`` or ``["tensorboard", "mlflow"]`` -> ``("tensorboard", "mlflow")``; an unknown
    name raises TrackerError listing the known ones."""
    if isinstance(values, str):
        values = [values]
    names = [n.strip().lower() for v in values or () for n in v.split(",") if n.strip()]
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise TrackerError(f"unknown tracker {', '.join(unknown)}; choose from: {', '.join(TRACKERS)}")
    return tuple(dict.fromkeys(names))  # in order, once each


class TensorBoardTracker:
    """Event files written into the run folder itself: ``tensorboard --logdir runs`` shows every run."""

    name = "tensorboard"

    def __init__(self, out: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise TrackerError("--tracker tensorboard needs the tensorboard package: "
                               "pip install 'segkit[tensorboard]'") from None
        self.writer = SummaryWriter(log_dir=str(out))

    def log_params(self, params: dict[str, Any]) -> None:
        rows = "\n".join(f"| {k} | {v} |" for k, v in params.items())
        self.writer.add_text("config", f"| setting | value |\n|---|---|\n{rows}")

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def log_image(self, name: str, image, step: int) -> None:
        import numpy as np

        self.writer.add_image(name, np.asarray(image.convert("RGB")), step, dataformats="HWC")

    def log_artifact(self, path: Path) -> None:
        pass  # the files are in the run folder already, beside the event files

    def close(self, status: str = "FINISHED") -> None:
        self.writer.close()


class MLflowTracker:
    """One MLflow run per run folder, named after it; ``--resume`` continues it (its id is in tracking.json).

    Step metrics are sent in batches (one request per ``FLUSH_EVERY`` values or seconds), not one per step.
    """

    name = "mlflow"
    FLUSH_EVERY = 200

    def __init__(self, uri: str | None, out: Path, resumed: bool):
        try:
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise TrackerError("--tracker mlflow needs the mlflow package: pip install 'segkit[mlflow]'") from None
        uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
        check_reachable(uri)
        self.client, self.out = MlflowClient(uri), out
        self.run_id = _previous_run(self.client, out) if resumed else None
        if self.run_id:
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME", DEFAULT_EXPERIMENT)
            found = self.client.get_experiment_by_name(experiment)
            experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
            self.run_id = self.client.create_run(experiment_id, run_name=out.name,
                                                 tags={"segkit.run_folder": str(out.resolve())}).info.run_id
            _save_state(out, {"mlflow": {"run_id": self.run_id, "experiment_id": experiment_id}})
        self.pending: list = []
        self.flushed = time.monotonic()
        print(f"mlflow: run {out.name} ({self.run_id}) at {redact(self.client.tracking_uri)}")

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param, RunTag

        logged = self.client.get_run(self.run_id).data.params
        values = {k: str(v) for k, v in params.items()}
        # MLflow's params cannot change: a resume's new values (more --epochs) are recorded as tags
        new = [Param(k, v) for k, v in values.items() if k not in logged]
        changed = [RunTag(f"resumed.{k}", v) for k, v in values.items() if k in logged and logged[k] != v]
        self.client.log_batch(self.run_id, params=new, tags=changed)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.pending += [Metric(_metric_key(k), float(v), now, step) for k, v in metrics.items()]
        if len(self.pending) >= self.FLUSH_EVERY or time.monotonic() - self.flushed > self.FLUSH_EVERY / 10:
            self.flush()

    def flush(self) -> None:
        """Send the metrics held back so far."""
        while self.pending:  # MLflow takes at most 1000 metrics per request
            batch, self.pending = self.pending[:1000], self.pending[1000:]
            self.client.log_batch(self.run_id, metrics=batch)
        self.flushed = time.monotonic()

    def log_image(self, name: str, image, step: int) -> None:
        self.client.log_image(self.run_id, image, key=_metric_key(name), step=step)

    def log_artifact(self, path: Path) -> None:
        self.flush()
        self.client.log_artifact(self.run_id, str(path))

    def close(self, status: str = "FINISHED") -> None:
        try:
            self.flush()
        finally:
            self.client.set_terminated(self.run_id, status)


class Trackers:
    """Several trackers as one; a tracker that raises is dropped with a warning, training goes on.

    As a context manager it closes them with ``FINISHED``, ``KILLED`` (Ctrl-C) or ``FAILED``.
    """

    def __init__(self, trackers: list[Tracker] | None = None):
        self.trackers = list(trackers or [])

    def __bool__(self) -> bool:
        return bool(self.trackers)

    def log_params(self, params: dict[str, Any]) -> None:
        self._each("log_params", params)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Log the numbers of ``metrics`` (others, such as the epoch, are left out)."""
        numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and k != "epoch"}
        self._each("log_metrics", numbers, step)

    def log_image(self, name: str, image, step: int) -> None:
        self._each("log_image", name, image, step)

    def log_artifact(self, path: Path) -> None:
        if Path(path).is_file():
            self._each("log_artifact", Path(path))

    def close(self, status: str = "FINISHED") -> None:
        self._each("close", status)
        self.trackers = []

    def __enter__(self) -> "Trackers":
        return self

    def __exit__(self, kind, error, tb) -> None:
        # Ctrl-C reaches here as KeyboardInterrupt, or as the trainer's TrainingStopped with exit code 130
        interrupted = kind is KeyboardInterrupt or getattr(error, "exit_code", None) == 130
        self.close("FINISHED" if kind is None else "KILLED" if interrupted else "FAILED")

    def _each(self, method: str, *args) -> None:
        for tracker in list(self.trackers):
            try:
                getattr(tracker, method)(*args)
            except Exception as e:  # noqa: BLE001 - a tracker's failure must never stop training
                warn(f"{tracker.name} failed ({type(e).__name__}: {_first_line(e)}); it is dropped, training "
                     "goes on and the run folder keeps everything")
                self.trackers.remove(tracker)


def open_trackers(names: tuple[str, ...] | list[str], out: Path, mlflow_uri: str | None = None,
                  resumed: bool = False) -> Trackers:
    """The trackers ``names`` for the run folder ``out``; with ``resumed``, MLflow continues the run it
    started there. An MLflow server that cannot be reached is a warning and no tracker, never an error;
    a tracker whose package is missing raises TrackerError."""
    trackers: list[Tracker] = []
    for name in parse_names(list(names)):
        if name == "tensorboard":
            trackers.append(TensorBoardTracker(out))
            continue
        try:
            trackers.append(MLflowTracker(mlflow_uri, out, resumed))
        except TrackerError:
            raise
        except Exception as e:  # noqa: BLE001 - unreachable, refused, bad credentials: all the same to training
            warn(f"MLflow is not usable ({type(e).__name__}: {_first_line(e)}); training goes on without it, "
                 f"everything is in {out}")
    return Trackers(trackers)


def check_reachable(uri: str | None, timeout: float = 5.0) -> None:
    """Raise ConnectionError when ``uri`` is an http(s) server that does not answer; other stores (a
    folder, a database file) are not checked. MLflow's client would retry for minutes before failing."""
    if not uri or not uri.lower().startswith(("http://", "https://")):
        return
    import httpx

    try:
        httpx.get(uri.rstrip("/") + "/health", timeout=timeout)  # any answer, even 401, is a live server
    except httpx.HTTPError as e:
        raise ConnectionError(f"{redact(uri)} does not answer ({type(e).__name__})") from None


def redact(uri: str) -> str:
    """``uri`` without a user:password part, for messages."""
    return re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/?#@]*@", r"\1", str(uri))


def warn(message: str) -> None:
    """A warning on stderr that reads as one."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


def read_state(out: Path) -> dict[str, Any]:
    """tracking.json of the run folder ``out`` ({} when there is none)."""
    path = Path(out) / STATE_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def _save_state(out: Path, update: dict[str, Any]) -> None:
    Path(out).mkdir(parents=True, exist_ok=True)
    write_json(Path(out) / STATE_FILE, {**read_state(out), **update}, indent=2)


def _previous_run(client, out: Path) -> str | None:
    """The MLflow run this folder started, when this server still has it (None: a new run is made)."""
    run_id = read_state(out).get("mlflow", {}).get("run_id")
    if not run_id:
        return None
    try:
        client.get_run(run_id)
    except Exception:  # noqa: BLE001 - deleted, or another server now
        warn(f"MLflow run {run_id} of {out} is not on this server; a new run is made")
        return None
    return run_id


def _metric_key(name: str) -> str:
    # MLflow takes letters, digits, _ - . / and spaces: a class called "cat (big)" must not end the logging
    return re.sub(r"[^\w\-./ ]", "_", name)


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0][:300] if text else ""

