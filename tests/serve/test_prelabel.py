"""The least-sure-first score of ``segkit prelabel`` and the ML backend, and the model version they share.

The whole command against a real Label Studio is in tests/labelstudio/test_labelstudio_server.py.
"""
from __future__ import annotations

import contextlib
import io

import httpx
import numpy as np
import pytest
from PIL import Image

from segkit.structures.masks import InstanceMasks
from segkit.structures.prediction import Prediction
from segkit.inference.predictor import Predictor
from segkit.labelstudio.client import Client
from segkit.labelstudio.project import ImageCache
from segkit.models.checkpoint import model_version
from segkit.serve.prelabel import _predict_task, labelling_prediction, task_score
from tests.helpers import TINY_IMAGES


def test_the_least_sure_image_scores_lowest():
    sure = task_score([0.98, 0.93], threshold=0.5)
    near_miss = task_score([0.98, 0.93, 0.35], threshold=0.5)  # one candidate just under the line
    weak_only = task_score([0.3, 0.26], threshold=0.5)
    nothing = task_score([], threshold=0.5)
    noise = task_score([0.1, 0.06], threshold=0.5)  # under half the threshold: not a candidate
    assert sure > near_miss > weak_only > nothing
    assert (sure, near_miss, weak_only, nothing, noise) == pytest.approx((0.93, 0.35, 0.26, 0.0, 0.0))


def test_the_score_follows_the_threshold():
    scores = [0.9, 0.2]
    assert task_score(scores, threshold=0.5) == pytest.approx(0.9)  # 0.2 is below 0.25: noise
    assert task_score(scores, threshold=0.3) == pytest.approx(0.2)  # now a near miss


@pytest.fixture(scope="module")
def predictor(trained_checkpoint):
    return Predictor.from_checkpoint(trained_checkpoint, device="cpu")


def test_labelling_prediction_shows_what_predict_shows_and_scores_its_candidates(predictor, tiny_data):
    image = Image.open(tiny_data / "train" / "images" / TINY_IMAGES[0].split("/")[-1])
    shown, score = labelling_prediction(predictor, image)
    plain = predictor(image)
    assert len(shown) == len(plain) > 0
    np.testing.assert_allclose(shown.scores, plain.scores, atol=1e-5)
    np.testing.assert_allclose(shown.boxes, plain.boxes, atol=1e-3)
    candidates = predictor(image, score_threshold=predictor.score_threshold / 2)
    assert score == pytest.approx(float(candidates.scores.min()))
    assert 0 < score <= float(plain.scores.min())


def test_an_image_without_objects_comes_first(predictor, tiny_data):
    image = Image.open(tiny_data / "train" / "images" / TINY_IMAGES[0].split("/")[-1])
    _, score = labelling_prediction(predictor, image)
    _, blank = labelling_prediction(predictor, Image.new("RGB", image.size, (128, 128, 128)))
    assert blank == 0.0 < score


def test_a_model_version_names_the_run_and_changes_with_the_file(tmp_path):
    run = tmp_path / "leaves-3"
    run.mkdir()
    ckpt = run / "best.pt"
    ckpt.write_bytes(b"weights one")
    first = model_version(ckpt)
    assert first.startswith("segkit-leaves-3-") and len(first.rsplit("-", 1)[1]) == 8
    assert model_version(ckpt) == first
    ckpt.write_bytes(b"weights two")  # retrained in place: Label Studio must ask again
    assert model_version(ckpt) != first


class _SeesNothing:
    """A stand-in predictor that finds nothing: enough for the image path of a pre-labelling."""

    task, classes, score_threshold, score_floor = "instance", ["leaf"], 0.5, 0.05

    def __call__(self, image: Image.Image, score_threshold: float | None = None) -> Prediction:
        return Prediction(np.zeros((0, 4), np.float32), np.zeros(0, np.int64), [], np.zeros(0, np.float32),
                          InstanceMasks([], image.height, image.width))


def test_a_broken_cached_image_is_fetched_again_as_the_ml_backend_does(tmp_path):
    """prelabel gets a task's image as the ML backend does (segkit.labelstudio.project.TaskImage): a copy that
    does not decode, because the server's file was broken when it was fetched, is downloaded again, whole."""
    good = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(good, "PNG")
    served = [b"\x89PNG\r\n\x1a\n but broken", good.getvalue()]
    asked = []

    def serve(request: httpx.Request) -> httpx.Response:
        asked.append(request)
        body = served[min(len(asked), 2) - 1]  # a stream, as a server's answer: Client.download reads it raw
        return httpx.Response(200, stream=httpx.ByteStream(body), headers={"etag": f'"v{len(asked)}"'})

    client = Client("http://ls.test", "0" * 40, transport=httpx.MockTransport(serve))
    task = {"id": 7, "data": {"image": "/data/upload/1/leaf.png"}}
    entry, original_size, score = _predict_task(client, ImageCache(tmp_path / "cache"), task, _SeesNothing(), None,
                                                None, None, contextlib.nullcontext())
    assert len(asked) == 2 and "if-none-match" not in asked[1].headers  # the second time unconditionally
    assert original_size == (40, 30) and (entry["file_name"], entry["width"], entry["annotations"]) == \
        ("/data/upload/1/leaf.png", 40, [])
    assert score == 0.0
