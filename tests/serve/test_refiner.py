"""Clicks that correct a mask: the refinement head (segkit.models.refiner), its training (segkit.engine.refiner),
``segkit refiner`` and the prompt engine's click sequences (segkit.serve.prompts.PromptEngine.refine).

The head is trained once per session on the overfit fixture's model (its 4 images); the clicks are then put
where a simulated annotator puts them on those images' objects, and what must change changes."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from segkit.data.dataset import SegmentationDataset
from segkit.data.readers import load_dataset
from segkit.engine.refiner import next_click
from segkit.models.checkpoint import load_checkpoint
from segkit.models.refiner import click_maps, mask_in_grid, to_grid
from segkit.serve.prompts import FeatureCache, Prompt, PromptEngine, RefineState
from segkit.structures.masks import Crop

from tests.helpers import REFINER_STEPS as STEPS


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


# --- the clicker and the frames (no model) ----------------------------------------------------------------


def test_next_click_goes_deepest_into_the_larger_error():
    truth = np.zeros((40, 60), bool)
    truth[5:35, 5:35] = True
    mask = truth.copy()
    mask[5:35, 25:35] = False  # missed: a 30 x 10 band
    mask[30:34, 40:44] = True  # false: a 4 x 4 square
    (x, y), positive = next_click(mask, truth)
    assert positive and 28 <= x <= 32 and 5 <= y <= 35  # the band's middle, not the small false square
    mask[5:35, 25:35] = True
    mask[10:30, 40:58] = True  # now the false area is the larger one
    (x, y), positive = next_click(mask, truth)
    assert not positive and 40 <= x <= 58 and 10 <= y <= 30
    assert next_click(truth, truth) is None


def test_clicks_and_masks_land_in_the_roi_frame():
    box = (100.0, 50.0, 212.0, 106.0)  # 112 x 56 pixels: 2 x 1 pixels a cell of a 56 grid
    np.testing.assert_allclose(to_grid([(100, 50), (212, 106), (156, 78)], box, 56), [[0, 0], [56, 56], [28, 28]])
    maps = click_maps([(10.5, 20.5, True)], 56, radius=3)
    assert maps[0, 20, 10] == 1 and maps[0, 20, 13] == 1 and maps[0, 20, 14] == 0 and maps[1].sum() == 0
    mask = torch.zeros(200, 300)
    mask[50:106, 100:156] = 1  # the left half of the box
    grid = mask_in_grid(mask[40:120, 90:230], (90, 40), box, 56)  # a crop, offset back to image pixels
    # bilinear samples: the first and last rows of cells straddle the mask's edge by a quarter of a pixel
    assert grid[1:-1, :27].min() > 0.99 and grid[:, 29:].max() < 0.01 and 0.8 < grid[0, 0] < 1


# --- the trained head ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def predictor(refined_checkpoint):
    from segkit.inference.predictor import Predictor

    return Predictor.from_checkpoint(refined_checkpoint["path"], device="cpu", max_detections=20)


@pytest.fixture(scope="module")
def objects(refined_checkpoint, predictor):
    """(image key, image, truth mask, class index) of each object of the fixture's images."""
    records = load_dataset(refined_checkpoint["data"]).images
    dataset = SegmentationDataset(records, predictor.classes)
    found = []
    for i, record in enumerate(records):
        image, masks, labels = dataset.load(i)
        found += [(str(record.path), image, m.astype(bool), int(c)) for m, c in zip(masks, labels)]
    return found


def test_training_lowers_the_heads_loss(refined_checkpoint, predictor):
    losses = refined_checkpoint["losses"]
    assert len(losses) == STEPS
    first, last = np.mean(losses[:STEPS // 10]), np.mean(losses[-STEPS // 10:])
    assert last < 0.6 * first, (first, last)
    info = predictor.info["refiner"]  # the checkpoint says how its head was trained
    assert info["steps"] == STEPS and info["objects"] > 0 and info["loss_last"] < info["loss_first"]


def _roi(mask: np.ndarray, margin: float = 0.15) -> tuple[float, float, float, float]:
    ys, xs = np.nonzero(mask)
    x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
    dx, dy = margin * (x1 - x0), margin * (y1 - y0)
    h, w = mask.shape
    return (max(x0 - dx, 0.0), max(y0 - dy, 0.0), min(x1 + dx, w), min(y1 + dy, h))


def _largest(objects, n=6):
    return sorted(objects, key=lambda o: -o[2].sum())[:n]


def test_a_negative_click_removes_a_false_part(predictor, objects):
    engine = PromptEngine(predictor, version="t")
    for key, image, truth, label in _largest(objects):
        roi = _roi(truth)
        wrong = truth.copy()
        x0, y0, x1, y1 = (int(v) for v in roi)
        # a false part: the roi's band beyond the object on the side with most room, wherever truth is not
        band = np.zeros_like(truth)
        band[y0:y1, x0:x0 + max((x1 - x0) // 4, 3)] = True
        false = band & ~truth
        wrong |= false
        (x, y), positive = next_click(wrong, truth)
        assert not positive
        state = engine.correct(key, image, RefineState(roi, Crop.from_dense(wrong), label, 1.0), [(x, y, False)])
        fixed = np.zeros_like(truth)
        fixed[state.crop.window] = state.crop.mask
        assert not fixed[int(y), int(x)], key  # the clicked pixel is gone
        assert (fixed & false).sum() < 0.5 * false.sum(), key  # and most of the false part with it
        assert iou(fixed, truth) > iou(wrong, truth), key


def test_a_positive_click_adds_a_missed_part(predictor, objects):
    engine = PromptEngine(predictor, version="t")
    for key, image, truth, label in _largest(objects):
        roi = _roi(truth)
        ys, xs = np.nonzero(truth)
        missed = truth & (np.arange(truth.shape[1])[None, :] >= np.percentile(xs, 65))  # its right third
        wrong = truth & ~missed
        (x, y), positive = next_click(wrong, truth)
        assert positive
        state = engine.correct(key, image, RefineState(roi, Crop.from_dense(wrong), label, 1.0), [(x, y, True)])
        fixed = np.zeros_like(truth)
        fixed[state.crop.window] = state.crop.mask
        assert fixed[int(y), int(x)], key
        assert (fixed & missed).sum() > 0.5 * missed.sum(), key
        assert iou(fixed, truth) > iou(wrong, truth), key


def _clicked(engine: PromptEngine, key, image, truth, label, n: int) -> list[float]:
    """IoU after each of ``n`` simulated clicks (the first at the object's deepest point)."""
    mask, clicks, ious = np.zeros_like(truth), [], []
    for _ in range(n):
        click = next_click(mask, truth)
        if click is None:
            break
        (x, y), positive = click
        clicks.append((x, y, positive))
        answer = engine.refine(key, image, clicks, label=label)
        mask = answer.mask if answer is not None else np.zeros_like(truth)
        ious.append(iou(mask, truth))
    return ious


def test_clicks_bring_the_mask_closer(predictor, objects):
    engine = PromptEngine(predictor, version="t")
    runs = [_clicked(engine, key, image, truth, label, 5) for key, image, truth, label in _largest(objects)]
    assert np.mean([r[-1] for r in runs]) >= np.mean([r[0] for r in runs]) - 0.01
    assert np.mean([r[-1] for r in runs]) > 0.6


def test_sequences_never_mix_and_memoized_steps_match_a_cold_engine(predictor, objects):
    """Two annotators clicking on the same task at once (one shared memo, interleaved) get what each would
    alone, and a sequence continued from the memo equals the whole sequence replayed on a fresh engine."""
    key, image, truth, label = _largest(objects, 1)[0]
    ys, xs = np.nonzero(truth)
    inside = (float(np.median(xs)) + 0.5, float(np.median(ys)) + 0.5)
    a = [(*inside, True), (float(xs.min()) + 1.5, float(ys.min()) + 1.5, False),
         (float(xs.max()) - 1.0, inside[1], True)]
    b = [(*inside, True), (float(xs.max()) - 1.0, float(ys.max()) - 1.0, False)]
    shared = PromptEngine(predictor, version="t", steps=FeatureCache(64))
    together = []
    for k in range(1, 4):
        together.append(shared.refine(key, image, a[:k], label=label).mask)
        if k <= len(b):
            together.append(shared.refine(key, image, b[:k], label=label).mask)
    alone_a = PromptEngine(predictor, version="t").refine(key, image, a, label=label).mask
    alone_b = PromptEngine(predictor, version="t").refine(key, image, b, label=label).mask
    np.testing.assert_array_equal(together[-1], alone_a)
    np.testing.assert_array_equal(together[-2], alone_b)
    assert not np.array_equal(alone_a, alone_b)  # the two sequences do differ


def test_label_studio_clicks_on_one_object_correct_it(predictor, objects):
    """Label Studio sends every click so far: a positive then a negative click on one object give one region,
    changed by the negative click, as :meth:`PromptEngine.refine` gives it."""
    key, image, truth, label = _largest(objects, 1)[0]
    h, w = truth.shape
    ys, xs = np.nonzero(truth)
    first = (float(np.median(xs)) + 0.5, float(np.median(ys)) + 0.5)
    engine = PromptEngine(predictor, version="t")
    start = engine.refine(key, image, [(*first, True)], label=label).mask
    outside = np.argwhere(start & ~truth)
    target = outside[len(outside) // 2] if len(outside) else np.argwhere(start)[0]
    second = (float(target[1]) + 0.5, float(target[0]) + 0.5)

    def point(x, y, positive):
        return Prompt("point", {"x": 100 * x / w, "y": 100 * y / h}, predictor.classes[label - 1], positive)

    once = engine.predict(key, image, [point(*first, True)])
    twice = engine.predict(key, image, [point(*first, True), point(*second, False)])
    assert len(once) == 1 and len(twice) == 1
    np.testing.assert_array_equal(once.instance_masks.dense(0), start)
    expected = PromptEngine(predictor, version="t").refine(key, image, [(*first, True), (*second, False)],
                                                            label=label).mask
    np.testing.assert_array_equal(twice.instance_masks.dense(0), expected)
    assert not twice.instance_masks.dense(0)[int(second[1]), int(second[0])]
    assert not np.array_equal(twice.instance_masks.dense(0), start)


def test_no_head_says_how_to_get_one(trained_checkpoint):
    from segkit.inference.predictor import Predictor

    engine = PromptEngine(Predictor.from_checkpoint(trained_checkpoint, device="cpu", max_detections=5))
    with pytest.raises(ValueError, match="segkit refiner"):
        engine.refine("k", np.zeros((64, 64, 3), np.uint8), [(10, 10, True)])


def test_refiner_command_adds_the_head_in_place(trained_checkpoint, tmp_path, capsys):
    from segkit.cli import main

    out = tmp_path / "with-head.pt"
    assert main(["refiner", str(trained_checkpoint), "--steps", "3", "--out", str(out)]) == 0
    assert "refinement head: 3 steps" in capsys.readouterr().out
    ckpt = load_checkpoint(out)
    before = load_checkpoint(trained_checkpoint)
    assert ckpt["refiner"]["steps"] == 3 and "refiner" not in before
    for k, v in before["model"].items():  # the detector is untouched
        assert torch.equal(ckpt["model"][k], v), k


def test_refiner_command_refuses_what_it_cannot_use(semantic_checkpoint, tmp_path, capsys):
    from segkit.cli import main

    assert main(["refiner", str(tmp_path / "missing.pt")]) == 2
    assert "missing.pt" in capsys.readouterr().err
    assert main(["refiner", str(semantic_checkpoint), "--steps", "1", "--out", str(tmp_path / "x.pt")]) == 2
    assert "semantic" in capsys.readouterr().err


def test_a_click_outside_every_objects_region_starts_another(predictor, objects):
    """Label Studio sends all clicks of a label together: one on each of two objects far apart gives two regions,
    each what a sequence of its own click gives."""
    by_image: dict[str, list] = {}
    for obj in objects:
        by_image.setdefault(obj[0], []).append(obj)
    key, image, first, second = next((k, objs[0][1], a, b) for k, objs in by_image.items() for a in objs for b in objs
                                     if _apart(a[2], b[2]))
    h, w = first[2].shape
    points = [next_click(np.zeros_like(t), t)[0] for t in (first[2], second[2])]
    engine = PromptEngine(predictor, version="t")
    found = engine.predict(key, image, [Prompt("point", {"x": 100 * x / w, "y": 100 * y / h}) for x, y in points])
    alone = [PromptEngine(predictor, version="t").refine(key, image, [(x, y, True)]).mask for x, y in points]
    assert len(found) == 2
    masks = found.instance_masks.dense()
    assert any(np.array_equal(masks[0], a) and np.array_equal(masks[1], b) for a, b in (alone, alone[::-1]))


def _apart(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether the boxes of two masks, each grown by a third, do not meet."""
    boxes = [_roi(m, margin=0.34) for m in (a, b)]
    (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = boxes
    return ax1 < bx0 or bx1 < ax0 or ay1 < by0 or by1 < ay0


def test_training_with_interactive_head_puts_the_head_in_best_pt(tiny_data, tmp_path, capsys):
    from segkit.engine.trainer import train
    from segkit.inference.predictor import Predictor
    from tests.helpers import tiny_config

    summary = train(tiny_config(tiny_data, tmp_path / "run", epochs=1, img_size=64, limit=2, interactive_head=True,
                                interactive_head_steps=4))
    assert "refinement head: 4 steps" in capsys.readouterr().out
    best = load_checkpoint(summary["best"])
    assert best["refiner"]["steps"] == 4 and best["config"]["interactive_head"]
    assert Predictor.from_checkpoint(summary["best"], device="cpu").refiner is not None
    assert "refiner" not in load_checkpoint(summary["last"])  # last.pt resumes the detector's training


def test_clicks_inside_a_box_correct_the_boxs_object(predictor, objects):
    key, image, truth, label = _largest(objects, 1)[0]
    h, w = truth.shape
    x0, y0, x1, y1 = _roi(truth, margin=0.05)
    boxed = PromptEngine(predictor, version="t").box(key, image, (x0, y0, x1, y1), label).mask
    spot = next_click(boxed, truth)
    if spot is None:  # the box alone is exact: click inside the object, on its edge
        spot = next_click(np.zeros_like(truth), truth)
    (x, y), positive = spot
    engine = PromptEngine(predictor, version="t")
    region = {"x": 100 * x0 / w, "y": 100 * y0 / h, "width": 100 * (x1 - x0) / w, "height": 100 * (y1 - y0) / h}
    found = engine.predict(key, image, [Prompt("box", region, predictor.classes[label - 1]),
                                        Prompt("point", {"x": 100 * x / w, "y": 100 * y / h}, None, positive)])
    # the box as Label Studio's percent gives it back, and the click corrects that box's object
    box = Prompt("box", region).box(w, h)
    expected = PromptEngine(predictor, version="t").refine(key, image, [(x, y, positive)], box=box, label=label).mask
    assert len(found) == 1
    np.testing.assert_array_equal(found.instance_masks.dense(0), expected)
    assert found.instance_masks.dense(0)[int(y), int(x)] == positive
    assert not found.instance_masks.dense(0)[:, :int(x0)].any()  # cut to the box


def test_first_clicks_nothing_answers_are_two_objects_not_one_memo(predictor, objects, monkeypatch):
    """Where no detection or square answers a first click, the head starts from no mask around it; two such
    clicks far apart on one image (same label) are two objects, each what a fresh engine gives."""
    key, image, truth, label = _largest(objects, 1)[0]
    h, w = truth.shape
    points = [(0.15 * w, 0.15 * h), (0.85 * w, 0.85 * h)]

    def unanswered(engine):
        monkeypatch.setattr(engine, "_clicks", lambda *args, **kwargs: [])
        return engine

    shared = unanswered(PromptEngine(predictor, version="t"))
    states = [shared.refine(key, image, [(x, y, True)], label=label) for x, y in points]
    fresh = [unanswered(PromptEngine(predictor, version="t")).refine(key, image, [(x, y, True)], label=label)
             for x, y in points]
    for got, want, (x, y) in zip(states, fresh, points):
        np.testing.assert_array_equal(got.mask, want.mask)
        assert got.mask[int(y), int(x)]  # around its own click
    assert not np.array_equal(states[0].mask, states[1].mask)


def test_a_head_made_for_another_detector_is_refused_naming_the_file(refined_checkpoint, tmp_path):
    from segkit.inference.predictor import Predictor
    from segkit.models.checkpoint import CheckpointError, save_checkpoint

    ckpt = load_checkpoint(refined_checkpoint["path"])
    for change in ({"in_channels": 128}, {"featmap_names": ["p7"]}):
        broken = {**ckpt, "refiner": {**ckpt["refiner"], "config": {**ckpt["refiner"]["config"], **change}}}
        path = save_checkpoint({k: v for k, v in broken.items() if k != "segkit_version"}, tmp_path / "broken.pt")
        with pytest.raises(CheckpointError, match=r"broken\.pt: its refinement head was made for"):
            Predictor.from_checkpoint(path, device="cpu")
