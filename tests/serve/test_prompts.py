"""Interactive prompts (segkit.serve.prompts): Label Studio geometry, box and click answers, the feature cache.

A random-init model answers: what is checked is that the engine runs the heads as documented (the same
numbers as a direct computation, or as the Predictor's own output), not that the masks are good.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from segkit.models.forward import mask_probs, paste_masks
from segkit.serve.prompts import (FALLBACK_SCALES, REFINE_IOU, FeatureCache, Prompt, PromptEngine, _near, keypoint_to_point,
                            prompt_prediction, prompts_from_context, rect_to_box)

HEIGHT, WIDTH = 144, 176  # not square: a swapped axis shows
CLASSES = ["leaf", "pebble", "shell"]


@pytest.fixture(scope="module")
def predictor(untrained_checkpoint):
    from segkit.inference.predictor import Predictor

    # 10 detections: the mask head runs once per detection, and the tests need only a few
    return fewer_proposals(Predictor.from_checkpoint(untrained_checkpoint, device="cpu", max_detections=10))


def fewer_proposals(predictor, n: int = 100):
    """The RPN keeping ``n`` proposals instead of 1000: the box head over them is most of a full pass here."""
    predictor.model.rpn._pre_nms_top_n["testing"] = n
    predictor.model.rpn._post_nms_top_n["testing"] = n
    return predictor


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    rng = np.random.default_rng(0)
    im = rng.integers(0, 60, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    im[30:90, 40:110] = (200, 180, 40)  # something object-like, for what it is worth to a random model
    return im


@pytest.fixture(scope="module")
def engine(predictor) -> PromptEngine:
    return PromptEngine(predictor, version="v1")


@pytest.fixture(scope="module")
def low_prediction(predictor, image):
    """The Predictor's own output at the engine's click threshold."""
    return predictor(image, score_threshold=0.05)


class BackboneCalls:
    """Counts forwards of the model's backbone while in a ``with`` block."""

    def __init__(self, predictor):
        self.backbone, self.count = predictor.model.backbone, 0

    def __enter__(self):
        self.handle = self.backbone.register_forward_hook(self._hook)
        return self

    def _hook(self, *_):
        self.count += 1

    def __exit__(self, *_):
        self.handle.remove()


def direct_features(predictor, image):
    """(features, model input size) of the image, straight from the model's transform and backbone."""
    from segkit.models.forward import image_tensors

    with torch.inference_mode():
        batch, _ = predictor.model.transform(image_tensors([image], predictor.device))
        return predictor.model.backbone(batch.tensors), tuple(batch.image_sizes[0])


def model_box(box, size):
    from torchvision.models.detection.transform import resize_boxes

    return resize_boxes(torch.tensor([box], dtype=torch.float32), (HEIGHT, WIDTH), size)


# --- geometry and the context parser ---------------------------------------------------------------------


def test_rectangles_in_percent_become_clamped_pixel_boxes():
    assert rect_to_box({"x": 10, "y": 20, "width": 50, "height": 25}, 200, 100) == (20, 20, 120, 45)
    assert rect_to_box({"x": -5, "y": 90, "width": 120, "height": 30}, 200, 100) == (0, 90, 200, 100)
    # rotated 90 degrees clockwise about its top-left corner: the enclosing box
    box = rect_to_box({"x": 50, "y": 0, "width": 10, "height": 20, "rotation": 90}, 100, 100)
    assert np.allclose(box, (30, 0, 50, 10))


def test_keypoints_in_percent_become_clamped_pixel_points():
    assert keypoint_to_point({"x": 25, "y": 50}, 200, 100) == (50, 50)
    assert keypoint_to_point({"x": 100.5, "y": -3}, 200, 100) == (200, 0)


def region(kind, value, **extra):
    return {"type": kind, "value": value, "original_width": 400, "original_height": 300, "from_name": "tag",
            "to_name": "image", **extra}


def test_the_context_parser_reads_rectangles_and_positive_and_negative_keypoints():
    context = {"result": [
        region("rectanglelabels", {"x": 10, "y": 20, "width": 30, "height": 40, "rotation": 0,
                                   "rectanglelabels": ["Pebble"]}),
        region("keypointlabels", {"x": 50, "y": 60, "width": 0.5, "keypointlabels": ["Leaf"]}, is_positive=True),
        region("keypointlabels", {"x": 70, "y": 80, "keypointlabels": ["Leaf"]}, is_positive=False),
        region("keypoint", {"x": 1, "y": 2}),  # no flag: a positive click
        region("choices", {"choices": ["blurry"]}),  # not a prompt: ignored
        region("polygonlabels", {"points": [[1, 2]], "polygonlabels": ["Leaf"]}),
    ]}
    box, positive, negative, plain = prompts_from_context(context)
    assert (box.kind, box.label, box.box(400, 300)) == ("box", "Pebble", (40, 60, 160, 180))
    assert (positive.kind, positive.label, positive.positive, positive.point(400, 300)) == ("point", "Leaf", True,
                                                                                             (200, 180))
    assert (negative.positive, negative.point(400, 300)) == (False, (280, 240))
    assert (plain.label, plain.positive) == (None, True)
    assert prompts_from_context(None) == [] and prompts_from_context({}) == []


@pytest.mark.parametrize("bad, match", [
    (region("keypointlabels", {"x": "12", "y": 3}), r"result\[0\] \(keypointlabels\): value.x must be a finite number"),
    (region("rectanglelabels", {"x": 1, "y": 2, "height": 3}), r"value.width is missing"),
    (region("rectanglelabels", {"x": 1, "y": 2, "width": 0, "height": 3}), r"value.width must be positive"),
    (region("rectanglelabels", {"x": 1, "y": float("nan"), "width": 2, "height": 3}), r"value.y must be a finite"),
    (region("keypointlabels", None), r"value must be an object"),
    (region("keypointlabels", {"x": 1, "y": 2}, is_positive="yes"), r"is_positive must be true or false"),
    (region("keypointlabels", {"x": 1, "y": 2, "keypointlabels": "Leaf"}), r"value.keypointlabels must be a list"),
])
def test_a_malformed_region_raises_naming_its_field(bad, match):
    with pytest.raises(ValueError, match=match):
        prompts_from_context({"result": [bad]})


def test_a_malformed_context_raises():
    with pytest.raises(ValueError, match="context.result must be a list"):
        prompts_from_context({"result": {"type": "keypointlabels"}})
    with pytest.raises(ValueError, match=r"context.result\[1\] must be an object"):
        prompts_from_context({"result": [region("keypoint", {"x": 1, "y": 2}), "oops"]})


# --- box prompts -----------------------------------------------------------------------------------------


def test_a_box_prompt_gives_a_full_size_mask_inside_the_box_with_the_given_label(engine, image):
    box = (40.3, 30.6, 110.2, 90.5)
    for label in (1, 2, 3):
        mask, cls, score = engine.box("img", image, box, label=label)
        assert mask.shape == (HEIGHT, WIDTH) and mask.dtype == bool
        assert mask.any()
        ys, xs = np.nonzero(mask)
        # the pixels the box touches, give or take the paste's one-pixel margin
        assert xs.min() >= int(box[0]) - 1 and xs.max() <= int(box[2]) + 1
        assert ys.min() >= int(box[1]) - 1 and ys.max() <= int(box[3]) + 1
        assert cls == label and 0 <= score <= 1


def test_without_a_label_the_class_is_the_box_heads_argmax(engine, predictor, image):
    box = (40.0, 30.0, 110.0, 90.0)
    features, size = direct_features(predictor, image)
    heads = predictor.model.roi_heads
    with torch.inference_mode():
        pooled = heads.box_roi_pool(features, [model_box(box, size)], [size])
        probs = heads.box_predictor(heads.box_head(pooled))[0].softmax(-1)[0]
    expected = int(probs[1:].argmax()) + 1
    _, cls, score = engine.box("img", image, box)
    assert cls == expected and score == pytest.approx(float(probs[expected]), abs=1e-5)


def test_the_box_mask_is_the_mask_heads_over_the_refined_box(engine, predictor, image):
    """The prompt box, or the detection's box when IoU >= REFINE_IOU; either way cut to the prompt box."""
    from torchvision.ops import box_iou

    from segkit.models.forward import mask_probs, paste_masks

    entry = engine.features("img", image)
    detection = entry.boxes[0].tolist()
    far = (120.0, 100.0, 170.0, 140.0)
    near = tuple(v + 1.5 for v in detection)  # a shifted copy of the best detection
    features, size = direct_features(predictor, image)
    for box in (far, near):
        ious = box_iou(torch.tensor([box]), entry.boxes)[0]
        used = entry.boxes[int(ious.argmax())].tolist() if ious.max() >= REFINE_IOU else list(box)
        with torch.inference_mode():
            probs = mask_probs(predictor.model.roi_heads, features, [model_box(used, size)],
                               [torch.tensor([2])], [size])[0]
        expected = paste_masks(probs, torch.tensor([used]), HEIGHT, WIDTH).dense(0)
        cut = np.zeros_like(expected)
        cut[int(box[1]):int(np.ceil(min(box[3], HEIGHT))), int(box[0]):int(np.ceil(min(box[2], WIDTH)))] = True
        np.testing.assert_array_equal(engine.box("img", image, box, label=2).mask, expected & cut)


def test_a_box_outside_the_image_or_a_bad_label_raises(engine, image):
    with pytest.raises(ValueError, match="less than a pixel"):
        engine.box("img", image, (300, 300, 400, 400))
    with pytest.raises(ValueError, match="class index 4"):
        engine.box("img", image, (10, 10, 50, 50), label=4)


def test_a_pointrend_model_answers_box_prompts(image):
    from segkit.models.mask_rcnn import build_model
    from segkit.models.pointrend import PointRendRoIHeads
    from segkit.inference.predictor import Predictor

    torch.manual_seed(0)
    model = build_model("maskrcnn_resnet50_fpn", len(CLASSES) + 1, weights=None, img_size=128,
                        mask_head="pointrend", mask_resolution=112)
    predictor = fewer_proposals(Predictor(model, CLASSES, 0.05, "cpu", max_detections=5))
    assert isinstance(predictor.model.roi_heads, PointRendRoIHeads)
    box = (40.0, 30.0, 110.0, 90.0)
    mask, cls, _ = PromptEngine(predictor).box("img", image, box, label=3)
    ys, xs = np.nonzero(mask)
    assert mask.shape == (HEIGHT, WIDTH) and cls == 3
    assert len(xs) == 0 or (xs.min() >= 39 and xs.max() <= 111 and ys.min() >= 29 and ys.max() <= 91)


def test_models_without_separate_heads_are_refused():
    from types import SimpleNamespace

    from segkit.inference.predictor import Predictor

    exported = Predictor(None, CLASSES, runner=lambda image: None, info={"checkpoint": "model.onnx"})
    with pytest.raises(ValueError, match="exported model"):
        PromptEngine(exported)
    with pytest.raises(ValueError, match="semantic model"):
        PromptEngine(SimpleNamespace(task="semantic"))


# --- the feature cache -----------------------------------------------------------------------------------


def test_a_warm_cache_gives_the_same_answers_without_the_backbone(predictor, image):
    box, clicks = (40.0, 30.0, 110.0, 90.0), [(60.0, 50.0), (5.0, 140.0)]
    cold_engine = PromptEngine(predictor)
    cold = cold_engine.box("a", image, box)
    warm_engine = PromptEngine(predictor)
    warm_engine.features("a", image)
    with BackboneCalls(predictor) as calls:
        warm = warm_engine.box("a", image, box)
        answers = warm_engine.clicks("a", image, clicks)
        warm_engine.box("a", image, (10.0, 10.0, 60.0, 60.0), label=1)
    assert calls.count == 0
    np.testing.assert_array_equal(cold.mask, warm.mask)
    assert (cold.label, cold.score) == (warm.label, warm.score)
    for ours, theirs in zip(answers, cold_engine.clicks("a", image, clicks)):
        np.testing.assert_array_equal(ours.mask, theirs.mask)


def test_a_box_prompt_pastes_no_detection_masks_and_a_click_only_those_under_it(predictor, image):
    """A first box on an image costs a plain prediction at most: the full pass's detection masks (up to 100 at
    the click threshold) are made only for the detections a click may pick, once each."""
    engine = PromptEngine(predictor, "v")
    engine.box("a", image, (10.0, 10.0, 60.0, 60.0))
    entry = engine.features("a", image)
    assert entry.crops == {} and len(entry.scores) > 0
    x0, y0, x1, y1 = entry.boxes[0].tolist()
    click = ((x0 + x1) / 2, (y0 + y1) / 2)  # inside the best detection's box
    first = engine.clicks("a", image, [click])
    made = dict(entry.crops)
    pixel = (int(click[0]), int(click[1]))
    assert 0 < len(made) and sorted(made) == [i for i, b in enumerate(entry.boxes.tolist()) if _near(b, pixel)]
    again = engine.clicks("a", image, [click])
    assert entry.crops == made and all(entry.crops[i] is made[i] for i in made)  # none made twice
    for ours, theirs in zip(first, again):
        np.testing.assert_array_equal(ours.mask, theirs.mask)
    # the same answer as a full paste of every detection gives
    everything = paste_masks(mask_probs(predictor.model.roi_heads, entry.features, [entry.model_boxes],
                                        [entry.labels], [entry.image_size])[0], entry.boxes, *entry.original_size)
    for i, crop in made.items():
        np.testing.assert_array_equal(crop.mask, everything.crops[i].mask)


def test_cache_entries_are_per_model_version_and_image(predictor, image):
    shared = FeatureCache(8)
    with BackboneCalls(predictor) as calls:
        PromptEngine(predictor, "v1", shared).box("a", image, (10, 10, 60, 60))
        PromptEngine(predictor, "v1", shared).box("a", image, (20, 20, 60, 60))  # same version: reused
        assert calls.count == 1
        PromptEngine(predictor, "v2", shared).box("a", image, (10, 10, 60, 60))  # a new model: its own pass
        assert calls.count == 2
        PromptEngine(predictor, "v2", shared).box("a", image[:100, :120], (10, 10, 60, 60))  # another size: again
        assert calls.count == 3
    assert sorted(shared.keys()) == [("a", "v1"), ("a", "v2")]
    shared.clear()
    assert len(shared) == 0


def test_the_cache_forgets_the_least_recently_used_image(predictor, image):
    small = image[:64, :80]  # cheap full passes
    engine = PromptEngine(predictor, "v", cache_size=2)
    with BackboneCalls(predictor) as calls:
        for key in ("a", "b", "a", "c"):  # "a" used again before "c": "b" goes
            engine.features(key, small)
        assert calls.count == 3
        assert engine.cache.keys() == [("a", "v"), ("c", "v")]
        engine.features("b", small)
        assert calls.count == 4 and ("a", "v") not in engine.cache


def test_a_cache_needs_room_for_one():
    with pytest.raises(ValueError, match="at least 1"):
        FeatureCache(0)


# --- clicks ----------------------------------------------------------------------------------------------


def first_pixel(mask: np.ndarray, avoid: tuple[int, int] | None = None) -> tuple[int, int]:
    """(x, y) of a pixel of ``mask``: the middle one of its pixels, or the first other than ``avoid``."""
    ys, xs = np.nonzero(mask)
    pixels = [(int(x), int(y)) for x, y in zip(xs, ys) if (x, y) != avoid]
    return pixels[len(pixels) // 2] if avoid is None else pixels[0]


def best_holding(prediction, pixel, negative=None) -> int | None:
    """Index of the Predictor's most confident detection whose mask holds ``pixel`` (and not ``negative``)."""
    masks = prediction.masks
    for i in np.argsort(-prediction.scores, kind="stable"):
        if masks[i][pixel[1], pixel[0]] and (negative is None or not masks[i][negative[1], negative[0]]):
            return int(i)
    return None


def test_a_click_on_a_detection_returns_its_mask(engine, image, low_prediction):
    assert len(low_prediction) > 0
    pixel = first_pixel(low_prediction.masks[0])
    expected = best_holding(low_prediction, pixel)
    (answer,) = engine.clicks("img", image, [(pixel[0] + 0.5, pixel[1] + 0.5)])
    np.testing.assert_array_equal(answer.mask, low_prediction.masks[expected])
    assert answer.label == low_prediction.labels[expected]
    assert answer.score == pytest.approx(float(low_prediction.scores[expected]))
    # two clicks on one detection give it once
    assert len(engine.clicks("img", image, [pixel, (pixel[0] + 0.4, pixel[1] + 0.4)])) == 1


def test_a_negative_click_moves_to_another_candidate_or_the_fallback(engine, image, low_prediction):
    pixel = first_pixel(low_prediction.masks[0])
    first = best_holding(low_prediction, pixel)
    negative = first_pixel(low_prediction.masks[first], avoid=pixel)
    answers = engine.clicks("img", image, [pixel], [negative])
    assert all(not np.array_equal(a.mask, low_prediction.masks[first]) for a in answers)
    assert all(a.mask[pixel[1], pixel[0]] and not a.mask[negative[1], negative[0]] for a in answers)
    second = best_holding(low_prediction, pixel, negative)
    if second is not None:
        np.testing.assert_array_equal(answers[0].mask, low_prediction.masks[second])
    # a negative click on the clicked pixel itself leaves nothing that may answer
    assert engine.clicks("img", image, [pixel], [pixel]) == []


def test_a_click_on_nothing_falls_back_to_squares_around_it(predictor, image):
    nothing = PromptEngine(predictor, click_threshold=1.01)  # no detection passes: every click falls back
    assert len(nothing.features("img", image).scores) == 0
    answered = 0
    for point in [(20.5, 20.5), (75.0, 60.0), (150.0, 120.0)]:
        for answer in nothing.clicks("img", image, [point]):
            answered += 1
            x, y = int(point[0]), int(point[1])
            assert answer.mask[y, x], "the answer holds the click"
            ys, xs = np.nonzero(answer.mask)
            half = max(FALLBACK_SCALES) * min(HEIGHT, WIDTH) / 2 + 1  # within the largest square
            assert np.abs(xs - point[0]).max() <= half and np.abs(ys - point[1]).max() <= half
            assert 0.5 < answer.score <= 1 and 1 <= answer.label <= len(CLASSES)
    assert answered > 0  # this model, seeded, answers some: the check above is not vacuous


# --- all prompts of a request ----------------------------------------------------------------------------


def test_a_context_becomes_one_prediction(engine, image, low_prediction):
    pixel = first_pixel(low_prediction.masks[0])
    context = {"result": [
        region("rectanglelabels", {"x": 100 * 40 / WIDTH, "y": 100 * 30 / HEIGHT, "width": 100 * 70 / WIDTH,
                                   "height": 100 * 60 / HEIGHT, "rectanglelabels": ["Pebble"]}),
        region("keypointlabels", {"x": 100 * (pixel[0] + 0.5) / WIDTH, "y": 100 * (pixel[1] + 0.5) / HEIGHT,
                                  "keypointlabels": ["SHELL"]}, is_positive=True),
    ]}
    prediction = engine.predict("img", image, prompts_from_context(context))
    assert prediction.image_size == (WIDTH, HEIGHT)
    assert sorted(prediction.class_names) == ["pebble", "shell"]  # labels matched ignoring case
    assert np.all(np.diff(prediction.scores) <= 0)


def test_prompt_prediction_leaves_out_empty_masks():
    from segkit.serve.prompts import PromptMask

    full = np.zeros((4, 5), dtype=bool)
    full[1:3, 2:4] = True
    prediction = prompt_prediction([PromptMask(np.zeros((4, 5), bool), 1, 0.9), PromptMask(full, 2, 0.5)],
                                   CLASSES, (4, 5))
    assert len(prediction) == 1 and prediction.class_names == ["pebble"]
    np.testing.assert_array_equal(prediction.boxes[0], [2, 1, 4, 3])
    np.testing.assert_array_equal(prediction.masks[0], full)
    assert isinstance(Prompt("box", {"x": 0, "y": 0, "width": 1, "height": 1}).box(10, 10), tuple)


def test_the_backend_answers_a_box_around_an_object_with_its_outline(trained_checkpoint, tiny_data, tmp_path):
    """Label Studio's auto-annotation: a rectangle drawn around an annotated object, sent in
    ``params.context``, comes back as that object's polygon in the config's names (the overfit model)."""
    import functools
    import http.server
    import threading

    from fastapi.testclient import TestClient
    from pycocotools import mask as mask_utils

    from segkit.serve.backend import BackendConfig, create_app
    from segkit.data.readers import load_dataset

    record = load_dataset(tiny_data / "val").images[0]
    shell = max((i for i in record.instances if i.label == "shell"), key=lambda i: i.mask(record.height,
                                                                                           record.width).sum())
    truth = shell.mask(record.height, record.width).astype(bool)
    ys, xs = np.nonzero(truth)
    w, h = record.width, record.height
    rect = {"x": 100 * xs.min() / w, "y": 100 * ys.min() / h, "width": 100 * (xs.max() + 1 - xs.min()) / w,
            "height": 100 * (ys.max() + 1 - ys.min()) / h, "rectanglelabels": ["Shell"]}
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(record.path.parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    config = ('<View><Image name="photo" value="$img"/><RectangleLabels name="box" toName="photo" smart="true">'
              '<Label value="Shell"/></RectangleLabels><PolygonLabels name="outline" toName="photo">'
              '<Label value="Leaf"/><Label value="Pebble"/><Label value="Shell"/></PolygonLabels></View>')
    cfg = BackendConfig(checkpoint=trained_checkpoint, runs_dir=tmp_path / "runs", cache_dir=tmp_path / "cache",
                        allow_hosts=["127.0.0.1"])
    task = {"id": 1, "data": {"img": f"http://127.0.0.1:{server.server_address[1]}/{record.path.name}"}}
    context = {"result": [{"type": "rectanglelabels", "value": rect, "original_width": w, "original_height": h}]}
    try:
        with TestClient(create_app(cfg), base_url="http://127.0.0.1") as client:
            answer = client.post("/predict", json={"tasks": [task], "label_config": config,
                                                   "params": {"context": context}})
            bad = client.post("/predict", json={"tasks": [task], "label_config": config,
                                                "params": {"context": {"result": [{"type": "rectanglelabels"}]}}})
    finally:
        server.shutdown()
    assert bad.status_code == 400 and "context.result[0]" in bad.json()["detail"]
    [result] = answer.json()["results"]
    assert [(r["from_name"], r["value"]["polygonlabels"]) for r in result["result"]] == [("outline", ["Shell"])]
    flat = [c for x, y in result["result"][0]["value"]["points"] for c in (x * w / 100, y * h / 100)]
    drawn = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([flat], h, w))).astype(bool)
    assert (drawn & truth).sum() / (drawn | truth).sum() >= 0.6  # the object, not the box
