"""The demo as users reach it: a server in a subprocess, the API through gradio_client, a real browser.

One server serves every test here. It runs with --share behind an unreachable proxy, so the share
attempt fails fast and offline on purpose, and every other test shows it kept serving. Model tests
use the random-init checkpoint: its scores reach ~0.9, so a 0.5 threshold still draws a few masks.
"""
from __future__ import annotations

import gc
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from segkit.data.images import load_image
from tests.helpers import REPO, chrome, free_port

pytestmark = pytest.mark.usefixtures("gradio_client_downloads")  # conftest: gradio_client's temp folders

ARTIFACTS = REPO / "test-artifacts"
THRESHOLD = 0.5
BOOT_TIMEOUT = 120  # seconds: importing gradio and torch on a busy 2-core machine



def _scene(size=(320, 240)) -> Image.Image:
    """A field with a few coloured blobs: something for a model to find."""
    image = Image.new("RGB", size, (70, 110, 60))
    draw = ImageDraw.Draw(image)
    for i, (x, y) in enumerate([(30, 40), (140, 30), (80, 120), (200, 130)]):
        draw.ellipse((x, y, x + 80, y + 60), fill=((230, 120, 140), (240, 230, 110), (200, 170, 220), (120, 200, 120))[i])
    return image


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    """A good image and every kind of bad or odd input, written as a user would upload them."""
    d = tmp_path_factory.mktemp("inputs")
    scene = _scene()
    files = {"good": d / "scene.png", "gray": d / "gray.png", "rgba": d / "rgba.png", "16bit": d / "deep.png",
             "cmyk": d / "print.jpg", "corrupt": d / "corrupt.png", "text": d / "notes.png", "huge": d / "huge.png",
             "bomb": d / "bomb.png"}
    scene.save(files["good"])
    scene.convert("L").save(files["gray"])
    rgba = scene.convert("RGBA")
    rgba.putalpha(200)
    rgba.save(files["rgba"])
    Image.fromarray(np.asarray(scene.convert("L")).astype(np.uint16) * 257).save(files["16bit"])
    scene.convert("CMYK").save(files["cmyk"], quality=95)
    files["corrupt"].write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8)
    files["text"].write_text("this is not an image\n")
    # 96 megapixels: over Pillow's warning limit, under segkit's (100 MP). Uniform, so the PNG is ~110 kB.
    Image.new("L", (12000, 8000), 128).save(files["huge"])
    # 144 megapixels in ~170 kB: refused from its header, as a decompression bomb would be
    Image.new("L", (12000, 12000), 128).save(files["bomb"])
    return files


class Server:
    def __init__(self, checkpoint: Path, examples: Path, log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log = log
        # Any https request (Gradio's share server) goes to a closed local port: offline, on purpose.
        env = {**os.environ, "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9",
               "NO_PROXY": "127.0.0.1,localhost", "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
        env.pop("SEGKIT_CHECKPOINT", None)
        # Kept quick on a CPU: the random model fills every detection slot, and each one costs a
        # mask-head pass (--max-detections) and a full-size mask (--max-side, for the 12000 px image).
        cmd = [sys.executable, "demo.py", "--checkpoint", str(checkpoint), "--port", str(self.port),
               "--examples", str(examples), "--max-side", "512", "--max-detections", "8", "--share"]
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)

    def ready(self) -> str:
        deadline = time.monotonic() + BOOT_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"demo.py exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                with urllib.request.urlopen(self.url, timeout=2) as r:
                    if r.status == 200:
                        return self.url
            except OSError:
                time.sleep(0.5)
        pytest.fail(f"demo.py did not answer within {BOOT_TIMEOUT} s:\n{self.log.read_text()}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="module", autouse=True)
def server(untrained_checkpoint, images, tmp_path_factory):
    """Started first (autouse) and waited for lazily, so it boots while the in-process tests run."""
    examples = tmp_path_factory.mktemp("examples")
    shutil.copy(images["good"], examples / "scene.png")
    srv = Server(untrained_checkpoint, examples, tmp_path_factory.mktemp("log") / "demo.log")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    from gradio_client import Client

    return Client(server.ready(), verbose=False)


def segment(client, path: Path, threshold: float = THRESHOLD):
    from gradio_client import handle_file

    return client.predict(handle_file(str(path)), threshold, api_name="/segment")


def assert_correct_overlay(result, source: Path) -> None:
    """Same size as the input; pixels change inside the drawn masks; most of the background does not."""
    overlay_path, table, files = result
    expected = load_image(source)  # what the image means, however it is stored
    drawn = Image.open(overlay_path)
    assert drawn.format == "PNG" and drawn.size == expected.size
    ids = np.asarray(Image.open(files[1]))
    assert ids.shape == (expected.height, expected.width)
    assert 0 < ids.max() <= len(table["data"]), "no instance drawn: the test needs masks"
    diff = (np.asarray(drawn, dtype=np.int16) != np.asarray(expected, dtype=np.int16)).any(axis=2)
    assert diff[ids > 0].mean() > 0.9
    assert diff[ids == 0].mean() < 0.5  # only boxes, labels and contours outside the masks


# In-process tests first: they run while the server boots.

@pytest.fixture(scope="module")
def demo_module(untrained_checkpoint):
    """demo.py imported as Spaces does, with the checkpoint from SEGKIT_CHECKPOINT."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SEGKIT_CHECKPOINT", str(untrained_checkpoint))
        spec = importlib.util.spec_from_file_location("segkit_demo_app", REPO / "demo.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module


def test_import_loads_nothing_and_the_module_level_demo_serves_the_env_checkpoint(demo_module, untrained_checkpoint,
                                                                                 images, monkeypatch):
    from gradio_client import Client, handle_file

    # Importing the file built no app and loaded no model (an hf:// checkpoint would have been downloaded).
    assert demo_module._module_demo.cache_info().currsize == 0
    assert demo_module.default_predictor.cache_info().currsize == 0
    monkeypatch.setenv("SEGKIT_CHECKPOINT", str(untrained_checkpoint))

    # The typed function a script uses: the env checkpoint's classes, only instances over the threshold.
    image = load_image(images["good"])
    drawn, prediction = demo_module.predict(image, 0.1)
    assert drawn.size == image.size and len(prediction) > 0 and (prediction.scores >= 0.1).all()
    assert set(prediction.class_names) <= {"leaf", "pebble", "shell"}

    # The module-level app, as a Space serves it, answers with that model.
    app = demo_module.demo
    assert app is demo_module.demo  # built once
    _, url, _ = app.launch(prevent_thread_lock=True, server_port=free_port(), quiet=True)
    try:
        result = Client(url, verbose=False).predict(handle_file(str(images["good"])), 0.1, api_name="/segment")
    finally:
        app.close()
    assert_correct_overlay(result, images["good"])
    coco = json.loads(Path(result[2][2]).read_text())
    assert [c["name"] for c in coco["categories"]] == ["leaf", "pebble", "shell"]
    assert len(coco["annotations"]) == len(prediction)  # the same model, image and threshold


def test_hf_checkpoint_is_downloaded_from_the_hub(demo_module, hub_downloads):
    predictor, note = demo_module.load_predictor("hf://someone/leaves/runs/exp/best.pt")
    assert hub_downloads == [("someone/leaves", "runs/exp/best.pt")]
    assert predictor is not None and predictor.classes == ["leaf", "pebble", "shell"] and note == ""
    predictor, note = demo_module.load_predictor("hf://someone/leaves")
    assert predictor is None and "hf://owner/repo/path" in note


def test_a_redraw_reuses_the_model_run_and_answers_as_a_fresh_prediction(demo_module, untrained_checkpoint, images):
    from segkit.inference.predictor import Predictor

    predictor = Predictor.from_checkpoint(untrained_checkpoint, max_detections=8)
    calls = []

    class Counting:  # the predictor, counting its model runs
        task, score_threshold = predictor.task, predictor.score_threshold

        def __call__(self, image, score_threshold=None):
            calls.append(score_threshold)
            return predictor(image, score_threshold)

    reused = demo_module.ReusedPredictions(Counting())
    image = load_image(images["good"])
    for threshold in (0.3, 0.6, 0.3):  # the app's slider: one model run, then filters of it
        _, shown = demo_module.predict(image, threshold, reused)
        _, fresh = demo_module.predict(image, threshold, predictor)
        np.testing.assert_allclose(shown.scores, fresh.scores, atol=1e-5)
        np.testing.assert_allclose(shown.boxes, fresh.boxes, atol=1e-3)
    assert calls == [0.0]
    demo_module.predict(load_image(images["gray"]), 0.5, reused)  # another image: the model runs again
    assert calls == [0.0, 0.0]


def test_newest_run_is_found(demo_module, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SEGKIT_CHECKPOINT", raising=False)
    assert demo_module.find_checkpoint() is None
    for i, name in enumerate(["b_newest", "a_old", "c_middle"]):
        path = tmp_path / "runs" / name / "best.pt"
        path.parent.mkdir(parents=True)
        path.write_bytes(b"")
        os.utime(path, (1e9 + [300, 100, 200][i],) * 2)
    assert demo_module.find_checkpoint() == str(Path("runs/b_newest/best.pt"))
    monkeypatch.setenv("SEGKIT_CHECKPOINT", "env.pt")
    assert demo_module.find_checkpoint() == "env.pt"
    assert demo_module.find_checkpoint("flag.pt") == "flag.pt"


def test_without_any_model_the_page_says_how_to_train(demo_module, tmp_path, monkeypatch):
    from segkit.models.mask_rcnn import WeightsError
    from segkit.inference.predictor import Predictor

    def no_weights(*args, **kwargs):
        raise WeightsError("offline")

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SEGKIT_CHECKPOINT", raising=False)
    monkeypatch.setattr(Predictor, "from_torchvision_coco", classmethod(no_weights))
    app = demo_module.create_demo(demo_module.parse_args([]))
    _, url, _ = app.launch(prevent_thread_lock=True, server_port=free_port(), quiet=True)
    try:
        with urllib.request.urlopen(url + "config", timeout=10) as r:
            config = r.read().decode()
    finally:
        app.close()
    assert "make train" in config and "python train.py --data" in config
    assert "COCO weights are unavailable" in config


# Through the server.

def test_only_segment_is_public(client):
    assert set(client.view_api(print_info=False, return_format="dict")["named_endpoints"]) == {"/segment"}


def test_segment_returns_an_overlay_with_masks_drawn(client, images):
    result = segment(client, images["good"])
    assert_correct_overlay(result, images["good"])
    _, table, files = result
    assert table["headers"][:3] == ["id", "class", "score"]
    assert all(row[2] >= THRESHOLD for row in table["data"])
    assert [Path(f).name for f in files] == ["scene_overlay.png", "scene_instances.png", "scene_coco.json"]

    coco = json.loads(Path(files[2]).read_text())
    assert len(coco["annotations"]) == len(table["data"])
    assert [c["name"] for c in coco["categories"]] == ["leaf", "pebble", "shell"]
    assert coco["annotations"][0]["category_name"] in {"leaf", "pebble", "shell"}


@pytest.mark.parametrize("kind", ["gray", "rgba", "16bit", "cmyk"])
def test_odd_but_valid_images_get_a_correct_overlay(client, images, kind):
    assert_correct_overlay(segment(client, images[kind]), images[kind])


@pytest.mark.parametrize("kind, message", [("corrupt", "Could not read corrupt.png"),
                                           ("text", "Could not read notes.png: not an image"),
                                           ("bomb", "bomb.png is too large: 12000x12000 pixels"),
                                           (None, "No image")])
def test_bad_input_gets_a_clear_error_and_the_server_keeps_serving(client, images, kind, message):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match=message):
        client.predict(handle_file(str(images[kind])) if kind else None, THRESHOLD, api_name="/segment")
    with pytest.raises(AppError, match="between 0 and 1"):
        segment(client, images["good"], threshold=1.5)
    assert_correct_overlay(segment(client, images["good"]), images["good"])


def test_huge_image_is_downscaled_for_inference(client, images):
    overlay_path, table, files = segment(client, images["huge"], threshold=0.99)
    assert Image.open(overlay_path).size == (512, 341)  # --max-side 512
    if not table["data"]:  # the usual case at 0.99: the image itself, downscaled
        assert (np.asarray(Image.open(overlay_path)) == 128).all()
    assert_correct_overlay(segment(client, images["good"]), images["good"])


def test_failed_share_link_is_explained_and_the_app_keeps_serving(server, client):
    deadline = time.monotonic() + 60
    while "no public link" not in server.log.read_text() and time.monotonic() < deadline:
        time.sleep(0.5)
    log = server.log.read_text()
    assert "Could not create share link" in log  # Gradio's own words
    assert "no public link: https://api.gradio.app" in log and "unreachable" in log and "Still serving" in log
    assert server.proc.poll() is None
    with urllib.request.urlopen(server.url, timeout=10) as r:
        assert r.status == 200


def test_browser_example_then_segment_shows_the_overlay(server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url = server.ready()
    browser = chrome(tmp_path / "chrome")
    try:
        browser.get(url)
        wait = WebDriverWait(browser, 60)
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "button.gallery-item"))[0].click()
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#image img"))
        browser.find_element(By.CSS_SELECTOR, "#run").click()
        img = wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#overlay img"))[0]
        wait.until(lambda b: b.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img))
        assert img.get_attribute("src").endswith(".png")
        assert browser.execute_script("return arguments[0].naturalWidth", img) == 320
        # Download links for all three files (Gradio shows name and extension in separate elements).
        links = wait.until(lambda b: [a.get_attribute("href") for a in b.find_elements(By.CSS_SELECTOR, "a[download]")
                                      if (a.get_attribute("href") or "").endswith("scene_coco.json")])
        with urllib.request.urlopen(links[0], timeout=10) as r:
            assert [c["name"] for c in json.loads(r.read())["categories"]] == ["leaf", "pebble", "shell"]
    finally:
        ARTIFACTS.mkdir(exist_ok=True)
        browser.save_screenshot(str(ARTIFACTS / "demo.png"))  # also kept when the test fails: shows why
        browser.quit()


def test_download_folders_keep_the_newest_and_leave_nothing_behind_when_the_app_goes():
    from segkit.serve.demo import OutputFiles

    files = OutputFiles(keep=2)
    folders = [files.new_folder() for _ in range(3)]
    (folders[-1] / "x_overlay.png").write_bytes(b"png")
    assert [f.is_dir() for f in folders] == [False, True, True]
    root = files.root
    del files
    gc.collect()
    assert not root.exists()  # each demo run used to leave a segkit-demo-* folder in /tmp
