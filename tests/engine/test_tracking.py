"""``--tracker tensorboard`` and ``--tracker mlflow`` on a tiny training, read back with each tool's own reader,
against a real ``mlflow server`` on 127.0.0.1 (SQLite store and artifacts in tmp)."""
from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from segkit.cli import main
from tests.helpers import free_port, require_module, tiny_train_args

require_module("tensorboard")
require_module("mlflow")

RUN_FILES = ("best.pt", "last.pt", "metrics.csv", "config.json", "MODEL_CARD.md", "val_predictions.png")
ARTIFACTS = {"best.pt", "MODEL_CARD.md", "config.json", "metrics.csv", "loss_curves.png", "metrics.png",
             "val_predictions.png"}



def csv_rows(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def same(a: float, b: float) -> bool:
    """Equal as TensorBoard's float32 keeps them; NaN equals NaN (an AP with no detections to rank)."""
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-7)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server: SQLite backend store and artifacts under tmp; its URI."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    log = open(root / "server.log", "w")
    server = subprocess.Popen([str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1",
                               "--port", str(port), "--workers", "1",
                               "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                               "--artifacts-destination", str(root / "artifacts")],
                              stdout=log, stderr=subprocess.STDOUT, cwd=root)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"{uri}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield uri
    finally:
        server.terminate()
        server.wait(30)
        log.close()


@pytest.fixture(scope="module")
def tracked_run(tiny_data, mlflow_server, tmp_path_factory) -> Path:
    """One tiny training logged to TensorBoard and MLflow at once (the flag given twice)."""
    out = tmp_path_factory.mktemp("tracked") / "tiny-run"
    args = tiny_train_args(tiny_data, out, 2, "--tracker", "tensorboard", "--tracker", "mlflow",
                           "--mlflow-uri", mlflow_server)
    assert main(args) == 0
    return out


def mlflow_run_id(out: Path) -> str:
    return json.loads((out / "tracking.json").read_text())["mlflow"]["run_id"]


def test_tensorboard_scalars_match_metrics_csv(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tracked_run), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    rows = csv_rows(tracked_run / "metrics.csv")
    columns = [c for c in rows[0] if c != "epoch"]
    assert {"train_loss", "val_segm_map", "val_bbox_map", "lr", "val_segm_ap_leaf"} <= set(columns)
    for column in columns:
        logged = events.Scalars(column)
        assert [e.step for e in logged] == [int(r["epoch"]) for r in rows if r[column] != ""], column
        assert all(same(e.value, float(r[column])) for e, r in zip(logged, rows)), column
    # per step (one step an epoch here): the losses whose epoch means metrics.csv holds, and the learning rate
    steps = events.Scalars("step/loss")
    assert [e.step for e in steps] == [1, 2]
    assert all(same(e.value, float(r["train_loss"])) for e, r in zip(steps, rows))
    assert [e.step for e in events.Scalars("step/lr")] == [1, 2]
    assert [e.step for e in events.Images("val_predictions")] == [1, 2]  # the preview, each evaluated epoch


def test_mlflow_run_has_the_config_metrics_and_artifacts(tracked_run, mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server)
    run = client.get_run(mlflow_run_id(tracked_run))
    assert run.info.run_name == "tiny-run" and run.info.status == "FINISHED"
    config = json.loads((tracked_run / "config.json").read_text())
    assert set(run.data.params) == set(config) - {"start"}  # the whole TrainConfig (config.json adds the start)
    assert run.data.params["epochs"] == "2" and run.data.params["weights"] == "none"
    rows = csv_rows(tracked_run / "metrics.csv")
    for key in ("train_loss", "val_loss", "val_segm_map", "val_segm_ap_shell", "lr"):
        history = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)
        assert [m.step for m in history] == [1, 2], key
        assert all(same(m.value, float(r[key])) for m, r in zip(history, rows)), key
    assert [m.step for m in client.get_metric_history(run.info.run_id, "step/loss")] == [1, 2]
    assert ARTIFACTS <= {a.path for a in client.list_artifacts(run.info.run_id)}
    card = client.download_artifacts(run.info.run_id, "MODEL_CARD.md", str(tmp_path))
    assert Path(card).read_text() == (tracked_run / "MODEL_CARD.md").read_text()


def test_resume_continues_the_same_mlflow_run(tracked_run, mlflow_server):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server)
    run_id = mlflow_run_id(tracked_run)
    # the trackers and the server are in the saved config: --resume alone carries on logging there
    assert main(["train", "--resume", str(tracked_run / "last.pt"), "--epochs", "3", "--no-progress"]) == 0
    assert mlflow_run_id(tracked_run) == run_id
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["resumed.epochs"] == "3"
    assert len(client.search_runs([run.info.experiment_id])) == 1
    history = sorted(client.get_metric_history(run_id, "val_segm_map"), key=lambda m: m.step)
    assert [m.step for m in history] == [1, 2, 3]
    assert [m.step for m in client.get_metric_history(run_id, "step/loss")] == [1, 2, 3]


def test_mlflow_server_down_at_start_warns_and_training_goes_on(tiny_data, tmp_path, capsys):
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    out = tmp_path / "run"
    assert main(tiny_train_args(tiny_data, out, 1, "--tracker", "mlflow", "--mlflow-uri", closed)) == 0
    err = capsys.readouterr().err
    assert "warning: MLflow is not usable" in err and closed in err and "training goes on" in err
    for name in RUN_FILES:
        assert (out / name).stat().st_size > 0, name
    assert not (out / "tracking.json").exists()


def test_an_unknown_tracker_is_refused_with_the_known_ones(capsys):
    assert main(["train", "--tracker", "tensorboard,wandb"]) == 2
    assert "unknown tracker wandb; choose from: tensorboard, mlflow" in capsys.readouterr().err
