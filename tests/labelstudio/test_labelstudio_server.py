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
import re
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import httpx
import numpy as np
import pytest
from pycocotools import mask as mask_utils

from segkit.inference.predictor import Predictor
from segkit.data.readers import DataError, load_dataset
from tests.helpers import REPO, SAMPLE, chrome, free_port, missing
from tests.lsserver import LS_BIN, PASSWORD, TOKEN, USERNAME, start_server



@pytest.fixture(scope="module", autouse=True)
def label_studio_installed():
    if not LS_BIN.exists():
        missing(f"Label Studio is not installed at {LS_BIN}: make labelstudio")

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
             "--train-args", "--limit 2 --workers 0 --roi-batch-size 64", "--prelabel-after-training"],
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


def _connect(api, project_id: int, backend_url: str, interactive: bool = False) -> int:
    return _ok(api.post("/api/ml", json={"project": project_id, "url": backend_url, "title": "segkit",
                                         "is_interactive": interactive}))["id"]


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


def _logged_in(browser, server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.set_script_timeout(120)  # a loaded 2-core machine runs the labeling page's scripts slowly
    browser.get(f"{server.url}/user/login/")
    browser.find_element(By.NAME, "email").send_keys(USERNAME)
    browser.find_element(By.NAME, "password").send_keys(PASSWORD)
    browser.find_element(By.CSS_SELECTOR, "button[type=submit], input[type=submit]").click()
    WebDriverWait(browser, 60).until(lambda b: "/user/login" not in b.current_url)
    return browser


# Before any retraining: the page shows what the served (overfit) model predicts. The tests' retrainings are
# 1 epoch at 64 px, whose predictions may well be empty: what they show depends on the run, not on segkit.
def test_labeling_page_shows_segkits_preannotations(server, api, project, connected, tmp_path):
    pid = project[0]
    tasks = _ok(api.get("/api/tasks", params={"project": pid, "page_size": 100}))["tasks"]
    todo = next(t["id"] for t in tasks if not t.get("total_annotations"))
    browser = _logged_in(chrome(tmp_path / "chrome"), server)
    try:
        from selenium.webdriver.support.ui import WebDriverWait

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


SMART = ('<View><Image name="photo" value="$img"/>'
         '<RectangleLabels name="hint" toName="photo" smart="true">{labels}</RectangleLabels>'
         '<{mask} name="answer" toName="photo" smart="true">{labels}</{mask}></View>')


def _truth_masks(task: dict) -> list[tuple[str, dict, tuple[int, int]]]:
    """(label, RLE, (width, height)) of each annotated polygon of one of :func:`_sample_tasks`' tasks."""
    return [(r["value"]["polygonlabels"][0], _to_rle(r), (r["original_width"], r["original_height"]))
            for r in task["annotations"][0]["result"] if r["type"] == "polygonlabels"]


def _box_region(rle: dict, label: str, size: tuple[int, int]) -> dict:
    """The rectangle an annotator draws around an object, as Label Studio sends it in ``context.result``."""
    x, y, w, h = mask_utils.toBbox(rle)
    W, H = size
    return {"id": "drawn", "type": "rectanglelabels", "from_name": "hint", "to_name": "photo", "origin": "manual",
            "original_width": W, "original_height": H, "image_rotation": 0,
            "value": {"x": 100 * x / W, "y": 100 * y / H, "width": 100 * w / W, "height": 100 * h / H,
                      "rotation": 0, "rectanglelabels": [label]}}


def _answer_rle(region: dict) -> dict:
    if region["type"] == "polygonlabels":
        return _to_rle(region)
    from label_studio_converter.brush import decode_rle

    w, h = region["original_width"], region["original_height"]
    mask = decode_rle(region["value"]["rle"]).reshape(h, w, 4)[..., 3] > 127
    return mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))


@pytest.mark.parametrize("mask_tag", ["BrushLabels", "PolygonLabels"])
def test_a_drawn_box_comes_back_as_the_objects_mask_through_interactive_annotating(api, server, backend, tiny_data,
                                                                                  mask_tag):
    """Label Studio's auto-annotation: the labeling page posts the drawn box to interactive-annotating, which
    asks the backend; the answer is the object's mask in the config's own mask tag and label."""
    tasks = _sample_tasks(tiny_data)
    pid = _new_project(api, server, f"segkit smart {mask_tag}", SMART.format(
        mask=mask_tag, labels="".join(f'<Label value="{v}"/>' for v in LABELS.values())),
        sorted((tiny_data / "train" / "images").iterdir()))
    _ok(api.post(f"/api/projects/{pid}/import", json=[{"data": t["data"]} for t in tasks]))
    ml_id = _connect(api, pid, backend, interactive=True)
    stored = {t["data"]["img"]: t["id"] for t in _ok(api.get("/api/tasks", params={"project": pid}))["tasks"]}
    ious = []
    for task in tasks:
        for label, truth, size in _truth_masks(task):
            reply = _ok(api.post(f"/api/ml/{ml_id}/interactive-annotating", json={
                "task": stored[task["data"]["img"]], "context": {"result": [_box_region(truth, label, size)]}}))
            assert "errors" not in reply, reply
            regions = reply["data"]["result"]
            assert regions, f"{label} box: no answer"
            assert {(r["from_name"], r["to_name"], r["type"]) for r in regions} == {
                ("answer", "photo", mask_tag.lower())}
            assert {r["value"][mask_tag.lower()][0] for r in regions} == {label}  # the label the annotator picked
            assert {(r["original_width"], r["original_height"]) for r in regions} == {size}
            answer = mask_utils.merge([_answer_rle(r) for r in regions])
            ious.append(mask_utils.iou([answer], [truth], [0])[0][0])
    assert len(ious) >= 15
    # the overfit model's masks (mask AP50 >= 0.9) on its own objects, each prompted by its true box
    assert min(ious) >= 0.5 and float(np.mean(ious)) >= 0.75, sorted(ious)


def test_a_box_drawn_in_the_labeling_page_becomes_the_objects_brush(api, server, backend, tiny_data, tmp_path):
    """What an annotator does: switch on Auto-Annotation, pick the smart rectangle and a label, drag a box
    around an object; the page asks the backend and adds the object's mask as a brush of that label."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    task = next(t for t in _sample_tasks(tiny_data) if any(lab == "Shell" for lab, _, _ in _truth_masks(t)))
    label, truth, size = next(m for m in _truth_masks(task) if m[0] == "Shell")
    pid, tid = _prompt_project(api, server, tiny_data, "segkit smart page", SMART.format(
        mask="BrushLabels", labels="".join(f'<Label value="{v}"/>' for v in LABELS.values())), task)
    _connect(api, pid, backend, interactive=True)
    browser = _logged_in(chrome(tmp_path / "chrome"), server)
    try:
        _open_task(browser, server, pid, tid)
        for toggle in ("bottombar-auto-annotation-toggle", "bottombar-auto-accept-toggle"):
            WebDriverWait(browser, 30).until(lambda b: b.execute_script(
                f"return !!document.querySelector('[data-testid={toggle}]')"))
            browser.execute_script(f"document.querySelector('[data-testid={toggle}]').click()")
        browser.execute_script("document.querySelector('.lsf-tool_smart[aria-label=rectangle-tool]').click()")
        browser.execute_script("[...document.querySelectorAll('.lsf-label')].find(e => "
                               "e.querySelector('.lsf-label__text').innerText == arguments[0]).click()", label)
        _drag_box(browser, ActionChains, browser.find_element(By.CSS_SELECTOR, ".konvajs-content"),
                  _box_region(truth, label, size)["value"])

        def brushes(b) -> list[dict]:  # the annotation's results, as Label Studio would save them
            return b.execute_script("return Htx.annotationStore.selected.serializeAnnotation()"
                                    ".filter(r => r.type == 'brushlabels')")

        WebDriverWait(browser, 120).until(brushes)
        # two animation frames: the canvas has drawn the new region for the screenshot
        browser.execute_async_script("requestAnimationFrame(() => requestAnimationFrame(arguments[0]))")
        found = brushes(browser)
        assert {(r["from_name"], r["value"]["brushlabels"][0]) for r in found} == {("answer", label)}
        iou = mask_utils.iou([mask_utils.merge([_answer_rle({**r, "original_width": size[0],
                                                              "original_height": size[1]}) for r in found])],
                             [truth], [0])[0][0]
        assert iou >= 0.5, iou
    finally:
        ARTIFACTS.mkdir(exist_ok=True)
        browser.save_screenshot(str(ARTIFACTS / "labelstudio_prompt.png"))
        browser.quit()


CLICKS = ('<View><Image name="photo" value="$img"/>'
          '<KeyPointLabels name="click" toName="photo" smart="true">{labels}</KeyPointLabels>'
          '<BrushLabels name="answer" toName="photo" smart="true">{labels}</BrushLabels></View>')


def test_a_negative_click_in_the_labeling_page_corrects_the_objects_mask(api, server, refined_checkpoint, tiny_data,
                                                                         tmp_path):
    """With a refinement head: Auto-Annotation on (suggestions shown, not accepted), the smart keypoint and a label
    picked, a click on an object brings its mask; an Alt-click on a part of that mask outside the object sends
    both clicks (the second negative), and the suggested mask changes, that part gone."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    from segkit.engine.refiner import next_click

    task = next(t for t in _sample_tasks(tiny_data) if any(lab == "Shell" for lab, _, _ in _truth_masks(t)))
    label, truth, size = next(m for m in _truth_masks(task) if m[0] == "Shell")
    truth_mask = mask_utils.decode(truth).astype(bool)
    pid, tid = _prompt_project(api, server, tiny_data, "segkit clicks page", CLICKS.format(
        labels="".join(f'<Label value="{v}"/>' for v in LABELS.values())), task)
    url, proc = _start_backend(server, Path(refined_checkpoint["path"]), tmp_path)
    _connect(api, pid, url, interactive=True)
    browser = _logged_in(chrome(tmp_path / "chrome"), server)
    try:
        _open_task(browser, server, pid, tid)
        browser.execute_script("document.querySelector('[data-testid=bottombar-auto-annotation-toggle]').click()")
        WebDriverWait(browser, 30).until(lambda b: b.execute_script(
            "return !!document.querySelector('.lsf-tool_smart[aria-label=key-point-tool]')"))
        browser.execute_script("document.querySelector('.lsf-tool_smart[aria-label=key-point-tool]').click()")
        stage = browser.find_element(By.CSS_SELECTOR, ".konvajs-content")

        def suggested(b) -> list[np.ndarray]:  # the suggestions shown (not accepted), as masks
            found = b.execute_script("return [...Htx.annotationStore.selected.suggestions.values()]"
                                     ".map(r => r.serialize()).filter(r => r.value.rle)")
            return [mask_utils.decode(_answer_rle({**r, "type": "brushlabels", "original_width": size[0],
                                                   "original_height": size[1]})).astype(bool) for r in found]

        def click(point: tuple[float, float], negative: bool, before: list) -> list[np.ndarray]:
            browser.execute_script("const l = [...document.querySelectorAll('.lsf-label')].find(e => "
                                   "e.querySelector('.lsf-label__text').innerText == arguments[0]); "
                                   "if (!l.className.includes('selected')) l.click()", label)
            _click_at(browser, ActionChains, Keys, stage, point, size, negative)
            WebDriverWait(browser, 120).until(lambda b: (m := suggested(b)) and not (
                before and len(m) == len(before) and all(np.array_equal(x, y) for x, y in zip(m, before))))
            return suggested(browser)

        (x, y), _ = next_click(np.zeros_like(truth_mask), truth_mask)  # the object's deepest point
        first = click((x, y), False, [])
        assert len(first) == 1 and first[0][int(y), int(x)]
        wrong = first[0] & ~truth_mask
        target = next_click(first[0] & ~wrong, first[0])  # deepest inside the false part (else the mask's own)
        (nx, ny), _ = target if target is not None else next_click(np.zeros_like(first[0]), first[0])
        second = click((nx, ny), True, first)
        keypoints = browser.execute_script("return Htx.annotationStore.selected.serializeAnnotation()"
                                           ".filter(r => r.type == 'keypointlabels').map(r => r.is_positive)")
        assert keypoints == [True, False]  # both clicks went, the second negative (Alt)
        assert len(second) == 1 and not second[0][int(ny), int(nx)]
        assert not np.array_equal(second[0], first[0])
        browser.execute_async_script("requestAnimationFrame(() => requestAnimationFrame(arguments[0]))")
    finally:
        ARTIFACTS.mkdir(exist_ok=True)
        browser.save_screenshot(str(ARTIFACTS / "labelstudio_clicks.png"))
        browser.quit()
        proc.terminate()
        proc.wait(timeout=30)


def _click_at(browser, ActionChains, Keys, stage, point: tuple[float, float], size: tuple[int, int],
              negative: bool) -> None:
    """Click the image's pixel ``point`` (x, y) on the canvas; with Alt held for a negative click."""
    _, _, w, h = browser.execute_script("const r = arguments[0].getBoundingClientRect(); "
                                        "return [r.x, r.y, r.width, r.height]", stage)
    offset = int(w * point[0] / size[0] - w / 2), int(h * point[1] / size[1] - h / 2)
    chain = ActionChains(browser, duration=50).move_to_element_with_offset(stage, *offset)
    (chain.key_down(Keys.ALT).click().key_up(Keys.ALT) if negative else chain.click()).perform()


def _prompt_project(api, server, tiny_data: Path, title: str, config: str, task: dict) -> tuple[int, int]:
    """(project id, task id) of a new project of ``config`` holding ``task`` alone, with no pre-annotations on
    opening: the page shows only what the prompts bring."""
    pid = _new_project(api, server, title, config, sorted((tiny_data / "train" / "images").iterdir()))
    _ok(api.patch(f"/api/projects/{pid}", json={"evaluate_predictions_automatically": False,
                                                 "show_collab_predictions": False}))
    _ok(api.post(f"/api/projects/{pid}/import", json=[{"data": task["data"]}]))
    return pid, _ok(api.get("/api/tasks", params={"project": pid}))["tasks"][0]["id"]


def _open_task(browser, server, pid: int, tid: int) -> None:
    """The task's labeling page, loaded: its bottom bar, canvas and image."""
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(f"{server.url}/projects/{pid}/data?task={tid}")
    WebDriverWait(browser, 120).until(lambda b: b.execute_script(
        "return !!document.querySelector('[data-testid=bottombar-auto-annotation-toggle]') && "
        "!!document.querySelector('.konvajs-content') && [...document.images].every(i => i.complete)"))


def _drag_box(browser, ActionChains, stage, box: dict) -> None:
    """Drag from the box's top-left to its bottom-right corner (percent of the image) in small steps, as a
    hand does: the canvas starts a rectangle on the first move after the press."""
    x, y, w, h = browser.execute_script("const r = arguments[0].getBoundingClientRect(); "
                                        "return [r.x, r.y, r.width, r.height]", stage)
    def at(fx: float, fy: float) -> tuple[int, int]:  # offsets from the stage's centre
        return int(w * fx / 100 - w / 2), int(h * fy / 100 - h / 2)

    chain = ActionChains(browser, duration=50).move_to_element_with_offset(stage, *at(box["x"], box["y"]))
    chain.click_and_hold()
    for k in range(1, 11):
        chain.move_to_element_with_offset(stage, *at(box["x"] + box["width"] * k / 10,
                                                    box["y"] + box["height"] * k / 10))
    chain.release().perform()


def _stored_predictions(api, project_id: int) -> list[dict]:
    return _ok(api.get("/api/predictions", params={"project": project_id}))


def _prelabel(url: str, checkpoint: Path, tmp: Path, ranks: int = 1) -> subprocess.Popen:
    """``segkit prelabel`` in one process, or under torchrun in ``ranks`` CPU processes."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-port",
              str(free_port()), "-m"] if ranks > 1 else [sys.executable, "-m"]
    return subprocess.Popen([*launch, "segkit", "prelabel", url, "--checkpoint", str(checkpoint), "--no-progress"],
                            env=_env(tmp), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)


def test_prelabel_scores_every_task_once_resumes_and_orders_the_least_sure_first(api, server, tiny_data,
                                                                               trained_checkpoint, tmp_path):
    from PIL import Image

    from segkit.models.checkpoint import model_version

    images = sorted((tiny_data / "train" / "images").iterdir())
    blank = tmp_path / "blank.jpg"  # nothing the model knows: it must come first
    Image.new("RGB", Image.open(images[0]).size, (128, 128, 128)).save(blank)
    pid = _new_project(api, server, "segkit prelabel", CONFIG, [*images, blank])
    data = [{"data": {"img": f"/data/local-files/?d=photos/{im.name}"}} for im in [*images * 3, blank]]
    _ok(api.post(f"/api/projects/{pid}/import", json=data))
    url = f"{server.url}/projects/{pid}"

    first = _prelabel(url, trained_checkpoint, tmp_path)  # killed once it has posted a prediction
    deadline = time.monotonic() + 300
    while not _stored_predictions(api, pid):
        assert first.poll() is None and time.monotonic() < deadline, first.stdout.read() if first.stdout else ""
        time.sleep(0.1)
    first.kill()
    first.wait()
    posted_before = len(_stored_predictions(api, pid))
    assert posted_before < len(data), "the first run ended before it could be interrupted"

    # The first re-run finishes the work, split between two torchrun processes; the second finds nothing to do
    for rerun, ranks in enumerate((2, 1)):
        proc = _prelabel(url, trained_checkpoint, tmp_path, ranks)
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out
        posted = [int(n) for n in re.findall(r"(\d+) tasks pre-labelled", out)]
        assert len(posted) == ranks and sum(posted) == (len(data) - posted_before if rerun == 0 else 0), out
        assert "Prediction score" in out  # how to order the Data Manager
    predictions = _stored_predictions(api, pid)
    assert sorted(p["task"] for p in predictions) == sorted(t["id"] for t in _ok(
        api.get("/api/tasks", params={"project": pid, "page_size": 100}))["tasks"])  # one per task, none twice
    assert {p["model_version"] for p in predictions} == {model_version(trained_checkpoint)}
    assert all(0 <= p["score"] <= 1 for p in predictions)
    assert {r["from_name"] for p in predictions for r in p["result"]} == {"outline"}

    # The Data Manager's order by prediction score (what a user clicks), lowest first: the blank image
    query = json.dumps({"ordering": ["tasks:predictions_score"]})
    ordered = _ok(api.get("/api/tasks", params={"project": pid, "page_size": 100, "query": query}))["tasks"]
    score = {p["task"]: p["score"] for p in predictions}
    assert [score[t["id"]] for t in ordered] == sorted(score.values())
    blank_task = next(t["id"] for t in ordered if t["data"]["img"].endswith(blank.name))
    assert score[blank_task] == 0.0 < max(score.values())  # first, or tied first with another image seen as empty


def test_a_mobile_model_prelabels_a_project_and_serves_another_as_its_ml_backend(api, server, tiny_data,
                                                                                 untrained_mobile_checkpoint,
                                                                                 tmp_path):
    """MobileNetV3-FPN, random init (score threshold 0.05: it fills its detection slots) through both paths."""
    from segkit.models.checkpoint import model_version

    images = sorted((tiny_data / "train" / "images").iterdir())[:2]
    tasks = [{"data": {"img": f"/data/local-files/?d=photos/{im.name}"}} for im in images]
    version = model_version(untrained_mobile_checkpoint)
    batch = _new_project(api, server, "mobile prelabel", CONFIG, images)
    _ok(api.post(f"/api/projects/{batch}/import", json=tasks))
    proc = _prelabel(f"{server.url}/projects/{batch}", untrained_mobile_checkpoint, tmp_path)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0 and "2 tasks pre-labelled" in out, out
    stored = _stored_predictions(api, batch)
    assert len(stored) == 2 and {p["model_version"] for p in stored} == {version}

    live = _new_project(api, server, "mobile backend", CONFIG, images)
    _ok(api.post(f"/api/projects/{live}/import", json=tasks))
    url, backend = _start_backend(server, untrained_mobile_checkpoint, tmp_path)
    try:
        _connect(api, live, url)
        served = _predictions(api, live)
    finally:
        backend.terminate()
        backend.wait(timeout=30)
    assert len(served) == 2 and all(len(ps) == 1 for ps in served.values())
    for prediction in [*stored, *(ps[0] for ps in served.values())]:
        regions = prediction["result"]
        assert regions and prediction["model_version"] == version
        assert {(r["from_name"], r["to_name"], r["type"]) for r in regions} == {("outline", "photo", "polygonlabels")}
        assert {r["value"]["polygonlabels"][0] for r in regions} <= set(LABELS.values())


def test_start_training_serves_a_new_model_version(api, project, backend, connected):
    pid = project[0]
    before = httpx.get(f"{backend}/versions").json()["model_version"]
    status = _train_and_wait(api, connected, backend)
    assert status["model_version"] != before and status["versions"] == [before, status["model_version"]]
    # --prelabel-after-training: the new model's scored predictions are in, before anyone asks for them
    deadline = time.monotonic() + 300
    while (training := httpx.get(f"{backend}/versions").json()["training"]).get("prelabel") == "running":
        assert time.monotonic() < deadline, training
        time.sleep(1)
    assert training["prelabel"] == "done", training
    new = [p for p in _stored_predictions(api, pid) if p["model_version"] == status["model_version"]]
    tasks = _ok(api.get("/api/tasks", params={"project": pid, "page_size": 100}))["tasks"]
    assert sorted(p["task"] for p in new) == sorted(t["id"] for t in tasks)
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
