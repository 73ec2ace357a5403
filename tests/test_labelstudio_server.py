"""segkit against a real Label Studio 1.23.2 (``make labelstudio`` puts it in .venv-ls/; skipped without it).

One throwaway server per session (fresh SQLite, preset user and legacy token), a project whose
labeling config uses its own tag names (``outline`` polygons, ``paint`` brushes on ``photo``) and
capitalised labels, holding the 4 sample images the shared tiny model was overfit on, served from
local-files storage, with the sample's annotations (polygons and brushes) created through the API.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import httpx
import pytest
from pycocotools import mask as mask_utils

from segkit.predictor import Predictor
from segkit.readers import DataError, load_dataset
from tests.helpers import REPO, SAMPLE, chrome
from tests.lsserver import LS_BIN, PASSWORD, TOKEN, USERNAME, free_port, start_server

pytestmark = pytest.mark.skipif(not LS_BIN.exists(), reason="Label Studio is not installed: make labelstudio")

ARTIFACTS = REPO / "test-artifacts"
LABELS = {"leaf": "Leaf", "pebble": "Pebble", "shell": "Shell"}
CONFIG = ('<View><Image name="photo" value="$img"/>'
          '<PolygonLabels name="outline" toName="photo">{labels}</PolygonLabels>'
          '<BrushLabels name="paint" toName="photo">{labels}</BrushLabels></View>').format(
    labels="".join(f'<Label value="{v}"/>' for v in LABELS.values()))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("labelstudio")
    (root / "data").mkdir()
    (root / "files").mkdir()
    server = start_server(root / "data", root / "files")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def api(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Token {TOKEN}"}, timeout=120) as client:
        yield client


def _ok(response: httpx.Response) -> dict | list:
    assert response.status_code < 300, f"{response.request.url}: {response.status_code} {response.text[:500]}"
    return response.json() if response.content else {}


def _sample_tasks(tiny_data: Path) -> list[dict]:
    """The sample's Label Studio tasks of the tiny images, in this project's tag names and labels."""
    names = {p.name for p in (tiny_data / "train" / "images").iterdir()}
    tasks = [t for t in json.loads((SAMPLE / "train" / "tasks.json").read_text())
             if t["data"]["image"].rsplit("/", 1)[-1] in names]
    out = []
    for task in tasks:
        result = []
        for r in task["annotations"][0]["result"]:
            kind = r["type"]
            value = {**r["value"], kind: [LABELS[r["value"][kind][0]]]}
            result.append({**r, "from_name": "outline" if kind == "polygonlabels" else "paint", "to_name": "photo",
                           "value": value})
        name = task["data"]["image"].rsplit("/", 1)[-1]
        out.append({"data": {"img": f"/data/local-files/?d=photos/{name}"}, "annotations": [{"result": result}]})
    return out


def _new_project(api, server, title: str, config: str, images: list[Path]) -> int:
    project = _ok(api.post("/api/projects", json={"title": title, "label_config": config}))["id"]
    photos = server.document_root / "photos"
    photos.mkdir(exist_ok=True)
    for image in images:
        (photos / image.name).write_bytes(image.read_bytes())
    _ok(api.post("/api/storages/localfiles", json={"project": project, "path": str(photos), "use_blob_urls": True,
                                                   "regex_filter": r".*\.jpg", "title": "photos"}))
    return project


@pytest.fixture(scope="module")
def project(api, server, tiny_data):
    """(project id, URL as in the browser, the tasks as imported); plus one task left to annotate."""
    images = sorted((tiny_data / "train" / "images").iterdir())
    pid = _new_project(api, server, "segkit leaves", CONFIG, images)
    tasks = _sample_tasks(tiny_data)
    assert len(tasks) == 4
    _ok(api.post(f"/api/projects/{pid}/import", json=tasks))
    _ok(api.post(f"/api/projects/{pid}/import", json=[{"data": {"img": tasks[0]["data"]["img"]}}]))
    return pid, f"{server.url}/projects/{pid}/data?tab=1", tasks


def _env(tmp_path: Path, **extra) -> dict:
    env = {**os.environ, "LABEL_STUDIO_API_KEY": TOKEN, "XDG_CACHE_HOME": str(tmp_path / "cache"), **extra}
    return env


def _segkit(*args, env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "segkit", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def test_check_reads_the_live_project_and_caches_its_images(project, tmp_path):
    pid, url, tasks = project
    expected = sum(len(t["annotations"][0]["result"]) for t in tasks)
    first = _segkit("check", url, "--json", env=_env(tmp_path))
    assert first.returncode == 0, first.stderr
    result = json.loads(first.stdout)
    assert (result["format"], result["images"], result["instances"]) == ("labelstudio-project", 4, expected)
    assert set(result["classes"]) == set(LABELS.values())
    assert result["origin"]["project"] == pid and result["origin"]["images_downloaded"] == 4
    assert [p["kind"] for p in result["problems"]] == ["unlabeled_task"]  # the task left to annotate
    again = _segkit("check", url, env=_env(tmp_path))
    assert again.returncode == 0 and "0 images downloaded, 4 unchanged" in again.stdout  # ETag: nothing new


def test_personal_access_token_is_exchanged_for_access_tokens(api, project, tmp_path):
    pid, url, _ = project
    _ok(api.post("/api/jwt/settings", json={"api_tokens_enabled": True, "legacy_api_tokens_enabled": True}))
    pat = _ok(api.post("/api/token/"))["token"]
    records = load_dataset(url, api_key=pat)
    assert len(records.images) == 4
    with pytest.raises(DataError, match="tried as a personal access token"):
        load_dataset(url, api_key=pat[:-4] + "AAAA")


def test_wrong_key_is_refused_saying_which_kind_was_tried(project, tmp_path):
    out = _segkit("check", project[1], "--ls-token", "f" * 40, env=_env(tmp_path))
    assert out.returncode == 2
    assert "refused the API key (HTTP 401), tried as a legacy token" in out.stderr
    assert "personal access token" in out.stderr  # and how to use the other kind


def test_train_from_the_project_url_records_where_the_data_came_from(project, tmp_path):
    import torch

    pid, url, _ = project
    run = tmp_path / "run"
    out = _segkit("train", "--data", url, "--weights", "none", "--epochs", "1", "--img-size", "64", "--limit", "2",
                  "--workers", "0", "--roi-batch-size", "64", "--no-progress", "--out", str(run), env=_env(tmp_path))
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    ckpt = torch.load(run / "best.pt", map_location="cpu", weights_only=False)
    assert ckpt["data_source"]["project"] == pid and ckpt["data_source"]["label_studio"] in url
    assert ckpt["classes"] == sorted(LABELS.values())
    assert json.loads((run / "data_source.json").read_text())["project"] == pid
    for path in run.iterdir():  # the key is nowhere in the run folder
        assert TOKEN.encode() not in path.read_bytes(), path


def _start_backend(server, checkpoint: Path, tmp: Path):
    """``segkit ml-backend`` serving ``checkpoint``, retraining quickly (1 epoch at 64 px); (url, process)."""
    port = free_port()
    env = {**_env(tmp), "LABEL_STUDIO_URL": server.url}
    log = tmp / "backend.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "segkit", "ml-backend", "--checkpoint", str(checkpoint), "--port", str(port),
             "--train-epochs", "1", "--train-img-size", "64", "--runs-dir", str(tmp / "runs"),
             "--train-args", "--limit 2 --workers 0 --roi-batch-size 64"],
            env=env, stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, log.read_text()
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return url, proc
        except httpx.TransportError:
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.5)


@pytest.fixture(scope="module")
def backend(server, trained_checkpoint, tmp_path_factory):
    """The ML backend serving the tiny overfit model."""
    url, proc = _start_backend(server, trained_checkpoint, tmp_path_factory.mktemp("backend"))
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def _connect(api, project_id: int, backend_url: str) -> int:
    return _ok(api.post("/api/ml", json={"project": project_id, "url": backend_url, "title": "segkit",
                                         "is_interactive": False}))["id"]


def _predictions(api, project_id: int) -> dict[int, list[dict]]:
    """Ask Label Studio to retrieve predictions for every task; each task's predictions, by task id."""
    _ok(api.post("/api/dm/actions", params={"id": "retrieve_tasks_predictions", "project": project_id},
                 json={"selectedItems": {"all": True, "excluded": []}}))
    tasks = _ok(api.get("/api/tasks", params={"project": project_id, "page_size": 100}))["tasks"]
    return {t["id"]: _ok(api.get(f"/api/tasks/{t['id']}"))["predictions"] for t in tasks}


def _to_rle(region: dict) -> dict:
    w, h = region["original_width"], region["original_height"]
    flat = [c for x, y in region["value"]["points"] for c in (x * w / 100, y * h / 100)]
    return mask_utils.merge(mask_utils.frPyObjects([flat], h, w))


@pytest.fixture(scope="module")
def connected(api, project, backend):
    return _connect(api, project[0], backend)


def test_predictions_carry_the_projects_tag_names_in_percent_and_match_the_annotations(api, project, connected):
    pid, _, tasks = project
    by_task = _predictions(api, pid)
    matched = total = 0
    for task_id, predictions in by_task.items():
        assert len(predictions) == 1
        regions = predictions[0]["result"]
        assert regions, f"task {task_id}: no regions"
        task = _ok(api.get(f"/api/tasks/{task_id}"))
        truth = [r for a in task["annotations"] for r in a["result"] if r["type"] == "polygonlabels"]
        for r in regions:
            assert (r["from_name"], r["to_name"], r["type"]) == ("outline", "photo", "polygonlabels")
            assert r["value"]["polygonlabels"][0] in LABELS.values()
            assert all(0 <= c <= 100 for point in r["value"]["points"] for c in point)
        for gt in truth:  # each annotated polygon is found, same label, IoU >= 0.5
            assert (gt["original_width"], gt["original_height"]) == (regions[0]["original_width"],
                                                                      regions[0]["original_height"])
            same = [r for r in regions if r["value"]["polygonlabels"] == gt["value"]["polygonlabels"]]
            ious = [mask_utils.iou([_to_rle(r)], [_to_rle(gt)], [0])[0][0] for r in same]
            matched += max(ious, default=0) >= 0.5
            total += 1
    assert total >= 10 and matched >= total - 2, f"{matched} of {total} annotated polygons predicted"


def test_brush_only_project_gets_brushes_and_only_the_configs_labels(api, server, project, backend, tiny_data,
                                                                      trained_checkpoint):
    config = ('<View><Image name="picture" value="$image"/><BrushLabels name="mask" toName="picture">'
              '<Label value="leaf"/><Label value="PEBBLE"/></BrushLabels></View>')  # no shell
    images = sorted((tiny_data / "train" / "images").iterdir())
    pid = _new_project(api, server, "segkit brushes", config, images)
    _ok(api.post(f"/api/projects/{pid}/import",
                 json=[{"data": {"image": f"/data/local-files/?d=photos/{im.name}"}} for im in images]))
    _connect(api, pid, backend)
    from label_studio_converter.brush import decode_rle

    labels = set()
    for predictions in _predictions(api, pid).values():
        for r in predictions[0]["result"]:
            assert (r["from_name"], r["to_name"], r["type"]) == ("mask", "picture", "brushlabels")
            w, h = r["original_width"], r["original_height"]
            assert decode_rle(r["value"]["rle"]).size == w * h * 4
            labels.update(r["value"]["brushlabels"])
    # what the served model finds on these images, in the config's spelling (matched ignoring case); shell,
    # which the config lacks, left out
    predictor = Predictor.from_checkpoint(trained_checkpoint)
    found = {name for image in images for name in predictor(image).class_names}
    assert "shell" in found  # else leaving it out would prove nothing
    assert labels == {{"leaf": "leaf", "pebble": "PEBBLE"}[name] for name in found - {"shell"}}


def _train_and_wait(api, ml_id: int, backend: str) -> dict:
    """Press "Start training" (through Label Studio) and wait for the backend to finish; its /versions."""
    _ok(api.post(f"/api/ml/{ml_id}/train"))
    deadline = time.monotonic() + 300
    while (status := httpx.get(f"{backend}/versions").json())["training"]["state"] in ("idle", "running"):
        assert time.monotonic() < deadline, status
        time.sleep(2)
    assert status["training"]["state"] == "done", status["training"]
    return status


# Before any retraining: the page shows what the served (overfit) model predicts. The tests' retrainings are
# 1 epoch at 64 px, whose predictions may well be empty: what they show depends on the run, not on segkit.
def test_labeling_page_shows_segkits_preannotations(server, api, project, connected, tmp_path):
    pid = project[0]
    tasks = _ok(api.get("/api/tasks", params={"project": pid, "page_size": 100}))["tasks"]
    todo = next(t["id"] for t in tasks if not t.get("total_annotations"))
    browser = chrome(tmp_path / "chrome")
    try:
        browser.get(f"{server.url}/user/login/")
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        browser.find_element(By.NAME, "email").send_keys(USERNAME)
        browser.find_element(By.NAME, "password").send_keys(PASSWORD)
        browser.find_element(By.CSS_SELECTOR, "button[type=submit], input[type=submit]").click()
        WebDriverWait(browser, 60).until(lambda b: "/user/login" not in b.current_url)
        browser.get(f"{server.url}/projects/{pid}/data?task={todo}")
        def regions(b) -> str:  # read in one script: the outliner re-renders as predictions arrive
            return b.execute_script("return [...document.querySelectorAll('.lsf-outliner-item')]"
                                    ".map(e => e.innerText).join(' ')")

        WebDriverWait(browser, 120).until(lambda b: any(label in regions(b) for label in LABELS.values()))
        WebDriverWait(browser, 30).until(
            lambda b: b.execute_script("return [...document.images].every(i => i.complete)"))
        assert any(label in regions(browser) for label in LABELS.values()), regions(browser)
    finally:
        ARTIFACTS.mkdir(exist_ok=True)
        browser.save_screenshot(str(ARTIFACTS / "labelstudio.png"))
        browser.quit()


def test_start_training_serves_a_new_model_version(api, project, backend, connected):
    pid = project[0]
    before = httpx.get(f"{backend}/versions").json()["model_version"]
    status = _train_and_wait(api, connected, backend)
    assert status["model_version"] != before and status["versions"] == [before, status["model_version"]]
    versions = {p["model_version"] for ps in _predictions(api, pid).values() for p in ps}
    assert status["model_version"] in versions  # Label Studio asked the new model


def test_a_semantic_model_retrains_as_a_semantic_model(api, server, semantic_checkpoint, tiny_data, tmp_path):
    import torch

    pid = _new_project(api, server, "segkit semantic", CONFIG, sorted((tiny_data / "train" / "images").iterdir()))
    _ok(api.post(f"/api/projects/{pid}/import", json=_sample_tasks(tiny_data)))
    url, proc = _start_backend(server, semantic_checkpoint, tmp_path)
    try:
        status = _train_and_wait(api, _connect(api, pid, url), url)
        ckpt = torch.load(Path(status["training"]["run"]) / "best.pt", map_location="cpu", weights_only=False)
        assert (ckpt["task"], ckpt["arch"]) == ("semantic", torch.load(semantic_checkpoint, map_location="cpu",
                                                                      weights_only=False)["arch"])
        by_task = _predictions(api, pid)  # the new model answers with brushes (one per class)
        latest = [max(ps, key=lambda p: p["id"]) for ps in by_task.values() if ps]
        assert latest and all(p["model_version"] == status["model_version"] for p in latest)
        assert {(r["type"], r["from_name"]) for p in latest for r in p["result"]} == {("brushlabels", "paint")}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_label_studios_own_exports_read_back_with_the_same_counts(api, project, tmp_path):
    pid, url, tasks = project
    polygons = sum(r["type"] == "polygonlabels" for t in tasks for r in t["annotations"][0]["result"])
    export = api.get(f"/api/projects/{pid}/export", params={"exportType": "JSON", "download_all_tasks": "true"})
    (tmp_path / "json").mkdir()
    (tmp_path / "json" / "export.json").write_bytes(export.content)
    records = load_dataset(tmp_path / "json" / "export.json", images_dir=Path(project_files(api, pid)))
    live = load_dataset(url, api_key=TOKEN)
    assert sum(len(im.instances) for im in records.images) == sum(len(im.instances) for im in live.images)
    coco = api.get(f"/api/projects/{pid}/export", params={"exportType": "COCO", "download_all_tasks": "true"})
    zipfile.ZipFile(io.BytesIO(coco.content)).extractall(tmp_path / "coco")
    records = load_dataset(tmp_path / "coco", images_dir=Path(project_files(api, pid)))
    assert sum(len(im.instances) for im in records.images) == polygons  # Label Studio's COCO export drops brushes


def project_files(api, project_id: int) -> str:
    storages = _ok(api.get("/api/storages/localfiles", params={"project": project_id}))
    return storages[0]["path"]
