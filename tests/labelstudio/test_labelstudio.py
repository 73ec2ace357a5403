"""Label Studio pieces that need no server: project URLs, keys, labeling configs, regions, the backend's routes.

The same pieces against a real Label Studio are in tests/labelstudio/test_labelstudio_server.py.
"""
from __future__ import annotations

import base64
import time
from pathlib import Path

import numpy as np
import pytest

from segkit.evaluation.coco import image_entry
from segkit.labelstudio.client import is_project_url, key_kind, parse_project_url
from segkit.labelstudio.config import LabelConfigError, choose_target, match_labels, region_targets
from segkit.labelstudio.preannotations import prediction_result
from segkit.structures.prediction import Prediction
from segkit.data.readers import DataError, load_dataset
from tests.helpers import REPO
from tests.lsserver import free_port

CONFIG = """<View>
  <Image name="photo" value="$img"/>
  <BrushLabels name="paint" toName="photo"><Label value="Leaf"/><Label value="PEBBLE"/></BrushLabels>
  <PolygonLabels name="outline" toName="photo"><Label value="leaf"/><Label value="Shell"/></PolygonLabels>
  <Choices name="quality" toName="photo"><Choice value="good"/></Choices>
</View>"""


@pytest.mark.parametrize("url, server, project", [
    ("http://localhost:8080/projects/3/data?tab=5", "http://localhost:8080", 3),
    ("http://host:8080/projects/3", "http://host:8080", 3),
    ("https://ls.example.org/label-studio/projects/12/", "https://ls.example.org/label-studio", 12),
])
def test_project_urls_as_copied_from_the_browser(url, server, project):
    assert is_project_url(url)
    assert parse_project_url(url) == (server, project)


def test_an_http_url_that_is_no_project_is_refused_by_name():
    with pytest.raises(DataError, match=r"http://example.org/data.json: not a Label Studio project URL"):
        load_dataset("http://example.org/data.json", api_key="x")


def test_unreachable_server_is_named():
    url = f"http://127.0.0.1:{free_port()}/projects/1"
    with pytest.raises(DataError, match=r"cannot reach Label Studio at http://127.0.0.1:\d+.*is it running"):
        load_dataset(url, api_key="0" * 40)


def test_missing_key_says_where_to_get_one(monkeypatch):
    monkeypatch.delenv("LABEL_STUDIO_API_KEY", raising=False)
    with pytest.raises(DataError, match="set LABEL_STUDIO_API_KEY or pass --ls-token-file"):
        load_dataset("http://127.0.0.1:1/projects/1")


def test_key_kinds():
    assert key_kind("0123456789abcdef0123456789abcdef01234567") == "legacy token"
    assert key_kind("eyJhbGciOiJIUzI1NiJ9.eyJ0b2tlbl90eXBlIjoicmVmcmVzaCJ9.c2ln") == "personal access token"


def test_config_targets_and_case_insensitive_labels(caplog):
    targets = region_targets(CONFIG)
    assert [(t.from_name, t.to_name, t.kind, t.labels) for t in targets] == [
        ("paint", "photo", "brush", ["Leaf", "PEBBLE"]), ("outline", "photo", "polygon", ["leaf", "Shell"])]
    assert choose_target(CONFIG).from_name == "outline"  # polygons preferred: editable
    brush = choose_target(CONFIG, prefer="brush")
    assert match_labels(["leaf", "pebble", "shell"], brush) == {"leaf": "Leaf", "pebble": "PEBBLE"}
    assert "['shell'] are not labels of <brush name='paint'>" in caplog.text
    with pytest.raises(LabelConfigError, match="no <PolygonLabels> or <BrushLabels>"):
        choose_target('<View><Image name="i" value="$image"/><RectangleLabels name="r" toName="i"/></View>')
    with pytest.raises(LabelConfigError, match="not valid XML"):
        choose_target("<View><Image")


def _prediction() -> Prediction:
    masks = np.zeros((2, 40, 60), dtype=bool)
    masks[0, 5:20, 10:30] = True
    masks[1, 25:35, 40:55] = True
    return Prediction(boxes=np.array([[10, 5, 30, 20], [40, 25, 55, 35]], np.float32), labels=np.array([1, 3]),
                      class_names=["leaf", "shell"], scores=np.array([0.9, 0.7], np.float32), masks=masks)


def test_regions_use_the_configs_labels_and_leave_out_the_rest():
    entry = image_entry("a.jpg", 60, 40, _prediction())
    brush = choose_target(CONFIG, prefer="brush")
    out = prediction_result(entry, "v1", brush.from_name, brush.to_name, True, match_labels(["leaf", "shell"], brush))
    assert out["model_version"] == "v1" and out["score"] == pytest.approx(0.9)
    [region] = out["result"]  # shell is not a label of the brush tag
    assert (region["from_name"], region["to_name"], region["type"]) == ("paint", "photo", "brushlabels")
    assert region["value"]["brushlabels"] == ["Leaf"]
    assert (region["original_width"], region["original_height"]) == (60, 40)
    from label_studio_converter.brush import decode_rle

    decoded = decode_rle(region["value"]["rle"]).reshape(40, 60, 4)[:, :, 3] > 0
    assert np.array_equal(decoded, _prediction().masks[0])

    polygons = prediction_result(entry, "v1", "outline", "photo", False, {"leaf": "leaf", "shell": "Shell"})
    assert [r["value"]["polygonlabels"] for r in polygons["result"]] == [["leaf"], ["Shell"]]
    xs = [x for r in polygons["result"] for x, _ in r["value"]["points"]]
    half_pixel = 100 * 0.5 / 60
    assert min(xs) == pytest.approx(100 * 10 / 60, abs=half_pixel)  # percent of the width, not pixels
    assert max(xs) == pytest.approx(100 * 55 / 60, abs=half_pixel)


@pytest.fixture()
def backend_client(untrained_checkpoint, tmp_path):
    from fastapi.testclient import TestClient

    from segkit.serve.backend import BackendConfig, create_app

    cfg = BackendConfig(checkpoint=untrained_checkpoint, basic_auth=("ann", "s3cret"), runs_dir=tmp_path / "runs",
                        cache_dir=tmp_path / "cache", label_studio_url=None, api_key=None)
    with TestClient(create_app(cfg), base_url="http://127.0.0.1") as client:
        yield client


def _basic(user: str, password: str) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_backend_basic_auth(backend_client):
    assert backend_client.get("/health").status_code == 401
    assert backend_client.get("/health", headers=_basic("ann", "wrong")).status_code == 401
    answer = backend_client.get("/health", headers=_basic("ann", "s3cret"))
    assert answer.status_code == 200 and answer.json()["status"] == "UP"


def test_backend_refuses_a_config_it_cannot_fill(backend_client):
    config = '<View><Image name="i" value="$image"/><RectangleLabels name="r" toName="i"/></View>'
    answer = backend_client.post("/predict", headers=_basic("ann", "s3cret"),
                                 json={"tasks": [{"id": 1, "data": {"image": "/data/upload/1/a.jpg"}}],
                                       "label_config": config})
    assert answer.status_code == 400 and "no <PolygonLabels> or <BrushLabels>" in answer.json()["detail"]


def test_task_without_reachable_image_gets_an_empty_prediction_in_place(backend_client):
    answer = backend_client.post("/predict", headers=_basic("ann", "s3cret"), json={
        "tasks": [{"id": 7, "data": {"img": "/data/upload/1/a.jpg"}}], "label_config": CONFIG})
    assert answer.status_code == 200
    [result] = answer.json()["results"]
    assert result["result"] == [] and result["model_version"].startswith("segkit-")


def test_failed_training_keeps_the_model_and_says_why(backend_client):
    auth = _basic("ann", "s3cret")
    before = backend_client.get("/versions", headers=auth).json()["model_version"]
    answer = backend_client.post("/webhook", headers=auth, json={"action": "START_TRAINING", "project": {"id": 4}})
    assert answer.status_code == 200 and answer.json()["status"] in ("started", "queued")
    deadline = time.monotonic() + 30
    while (status := backend_client.get("/versions", headers=auth).json())["training"]["state"] in ("idle", "running"):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert status["training"]["state"] == "failed"
    assert "LABEL_STUDIO_URL" in status["training"]["error"]  # it cannot read the project without them
    assert status["model_version"] == before
    assert backend_client.get("/health", headers=auth).json()["model_version"] == before


def test_ml_backend_and_demo_settings_are_built_in_one_place(tmp_path):
    """segkit.serve.settings.config_from_args reads either command line: every option segkit ml-backend has, and
    the few the demo has, with Label Studio's variables from the environment; both refuse the same exposure."""
    import argparse
    import importlib.util

    from segkit.commands import key_from_args, ml_backend
    from segkit.serve.settings import BackendConfig, ExposureError, config_from_args

    parser = argparse.ArgumentParser()
    ml_backend.add_arguments(parser)
    (tmp_path / "key").write_text("k\n")
    args = parser.parse_args(["--ls-token-file", str(tmp_path / "key"), "--max-download-mb", "2", "--cache-mb", "1",
                              "--train-args", "--lr 0.01 --batch-size 2", "--allow-host", "nas:8000", "--runs-dir", "r"])
    env = {"LABEL_STUDIO_URL": "http://ls:8080", "BASIC_AUTH_USER": "ann", "BASIC_AUTH_PASS": "pw"}
    cfg = config_from_args(tmp_path / "best.pt", args, env, api_key=key_from_args(args))
    assert (cfg.api_key, cfg.label_studio_url, cfg.basic_auth) == ("k", "http://ls:8080", ("ann", "pw"))
    assert (cfg.max_download, cfg.cache_bytes, cfg.allow_hosts) == (2 * 2**20, 2**20, ["nas:8000"])
    assert cfg.train_args == ["--lr", "0.01", "--batch-size", "2"] and cfg.runs_dir == Path("r")

    spec = importlib.util.spec_from_file_location("segkit_demo_settings", REPO / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    demo_args = demo.parse_args(["--max-detections", "7", "--max-pixels", "1000"])
    cfg = config_from_args(tmp_path / "best.pt", demo_args, {})
    assert cfg == BackendConfig(tmp_path / "best.pt", max_detections=7, max_pixels=1000)
    with pytest.raises(ExposureError, match="--no-auth"):
        config_from_args(tmp_path / "best.pt", demo_args, {}, host="0.0.0.0")


def test_ml_backend_serves_an_hf_checkpoint_downloaded_from_the_hub(hub_downloads, untrained_checkpoint, tmp_path,
                                                                   monkeypatch, capsys):
    """``segkit ml-backend --checkpoint hf://owner/repo/path.pt`` serves the downloaded file under that file's
    model_version; a spec without a path stops before serving, saying what is expected."""
    import uvicorn
    from fastapi.testclient import TestClient

    from segkit.cli import main
    from segkit.models.checkpoint import model_version

    served = []

    def fake_run(app, **kwargs):  # instead of listening: ask the app what it serves, as Label Studio would
        # the Host header of a browser on this machine: off loopback names the app answers 400
        with TestClient(app, base_url=f"http://127.0.0.1:{kwargs['port']}") as client:
            served.append(client.get("/health").json())

    monkeypatch.setattr(uvicorn, "run", fake_run)
    monkeypatch.chdir(tmp_path)
    for name in ("LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY", "BASIC_AUTH_USER", "BASIC_AUTH_PASS"):
        monkeypatch.delenv(name, raising=False)
    assert main(["ml-backend", "--checkpoint", "hf://someone/leaves/runs/exp/best.pt"]) == 0
    assert hub_downloads == [("someone/leaves", "runs/exp/best.pt")]
    assert [s["model_version"] for s in served] == [model_version(untrained_checkpoint)]
    capsys.readouterr()
    assert main(["ml-backend", "--checkpoint", "hf://someone/leaves"]) == 2 and len(served) == 1
    assert "expected hf://owner/repo/path/to/file.pt" in capsys.readouterr().err
