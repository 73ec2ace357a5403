"""The one Predictor shared by the CLI, the demo and training previews."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from segkit.models.checkpoint import CheckpointError
from segkit.inference.predictor import Predictor


@pytest.fixture(scope="module")
def predictor(untrained_checkpoint):
    # A random model fills every detection slot; 10 keep the mask head cheap.
    return Predictor.from_checkpoint(untrained_checkpoint, device="cpu", max_detections=10)


def test_path_pil_and_array_inputs_give_the_same_prediction(predictor, sample_dir):
    path = next((sample_dir / "val" / "images").glob("*.jpg"))
    image = Image.open(path).convert("RGB")
    by_path, by_pil, by_array = predictor(path, 0.0), predictor(image, 0.0), predictor(np.asarray(image), 0.0)
    assert len(by_path) > 0
    for other in (by_pil, by_array):
        np.testing.assert_array_equal(by_path.masks, other.masks)
        np.testing.assert_array_equal(by_path.scores, other.scores)
    assert by_path.masks.shape[1:] == (image.height, image.width)  # masks at the image's own size
    assert by_path.masks.dtype == bool and by_path.boxes.shape == (len(by_path), 4)
    assert set(by_path.class_names) <= set(predictor.classes)


def test_threshold_filters_by_score(predictor, sample_dir):
    path = next((sample_dir / "val" / "images").glob("*.jpg"))
    everything = predictor(path, 0.0)
    cut = float(np.median(everything.scores))
    kept = predictor(path, cut)
    # The same instances as filtering afterwards, though the model skipped the masks below the cut.
    same = everything.filter(everything.scores >= cut)
    assert 0 < len(kept) < len(everything)
    np.testing.assert_array_equal(kept.scores, same.scores)
    np.testing.assert_array_equal(kept.masks, same.masks)
    assert kept.class_names == same.class_names
    assert predictor.model.roi_heads.score_thresh == 0.05  # torchvision's floor is left as it was


def test_grey_and_rgba_images_are_accepted(predictor):
    grey = Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 128), dtype=np.uint8), "L")
    assert predictor(grey, 0.0).masks.shape[1:] == (96, 128)
    assert predictor(grey.convert("RGBA"), 0.0).masks.shape[1:] == (96, 128)


def test_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="nope.pt"):
        Predictor.from_checkpoint(tmp_path / "nope.pt")


def test_compact_masks_equal_torchvisions_full_size_paste(predictor, sample_dir):
    """Same boxes, scores, pixels and COCO RLEs as torchvision's own forward, which pastes every mask
    into a full-size image: the compact path changes memory and time, not results."""
    import torch
    from torchvision.transforms.functional import pil_to_tensor

    from segkit.evaluation.coco import encode_mask, prediction_to_coco

    image = Image.open(next((sample_dir / "val" / "images").glob("*.jpg"))).convert("RGB")
    prediction = predictor(image, 0.0)
    with torch.inference_mode():
        reference = predictor.model([pil_to_tensor(image).float().div_(255)])[0]
    assert len(prediction) == len(reference["scores"]) > 0
    np.testing.assert_array_equal(prediction.scores, reference["scores"].numpy())
    np.testing.assert_array_equal(prediction.boxes, reference["boxes"].numpy())
    full = (reference["masks"][:, 0] > 0.5).numpy()
    assert full.any(axis=(1, 2)).sum() > len(full) // 2  # real masks, not empty ones
    np.testing.assert_array_equal(prediction.masks, full)
    assert [r["segmentation"] for r in prediction_to_coco(0, prediction)] == [encode_mask(m) for m in full]
    np.testing.assert_array_equal(prediction.areas(), full.sum(axis=(1, 2)))


def test_channels_last_is_the_cpu_default_and_finds_the_same_instances(untrained_checkpoint, predictor, sample_dir):
    import torch

    plain = Predictor.from_checkpoint(untrained_checkpoint, device="cpu", max_detections=10, channels_last=False)
    conv = predictor.model.backbone.body.conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and predictor.info["channels_last"]
    path = next((sample_dir / "val" / "images").glob("*.jpg"))
    want, got = plain(path, 0.0), predictor(path, 0.0)
    assert len(want) == len(got) > 0
    np.testing.assert_array_equal(want.labels, got.labels)
    np.testing.assert_allclose(want.boxes, got.boxes, atol=0.05)
    assert (want.masks != got.masks).mean() < 1e-4


# --- Thresholds are per call (issue #18, rule 7): the demo and the Label Studio backend share one Predictor.

def _small_predictor(mask_head: str = "standard") -> Predictor:
    """A random-init model at 64 px, its scores spread above torchvision's 0.05 floor; cheap on a CPU."""
    import torch

    from segkit.models.mask_rcnn import build_model

    torch.manual_seed(0)
    model = build_model("maskrcnn_resnet50_fpn", 4, weights=None, img_size=64, mask_head=mask_head,
                        mask_resolution=112)
    model.rpn._post_nms_top_n["testing"] = 100  # the box head's cost is per proposal: 1000 take seconds
    return Predictor(model, ["leaf", "pebble", "shell"], 0.5, device="cpu", max_detections=10)


def _small_image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (64, 80, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def small_predictor() -> Predictor:
    return _small_predictor()


def test_a_call_never_changes_the_floor_another_call_sees(small_predictor):
    """What a second thread would read mid-forward: the model's own floor, whatever this call's threshold."""
    heads = small_predictor.model.roi_heads
    seen = []
    hook = heads.box_predictor.register_forward_hook(lambda *_: seen.append(heads.score_thresh))
    try:
        small_predictor(_small_image(), 0.9)
        small_predictor(_small_image(), 0.0)
    finally:
        hook.remove()
    assert seen == [0.05, 0.05]
    assert heads.score_thresh == 0.05


def test_threads_with_different_thresholds_get_what_each_would_get_alone(small_predictor):
    """The demo's slider and the ML backend calling one predictor at once: no call sees the other's threshold."""
    from concurrent.futures import ThreadPoolExecutor

    image = _small_image()
    everything = small_predictor(image, 0.0)
    cut = float(np.median(everything.scores))
    alone = {0.0: everything, cut: small_predictor(image, cut)}
    assert len(alone[0.0]) > len(alone[cut]) > 0
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda t: (t, len(small_predictor(image, t))), [0.0, cut] * 4))
    assert small_predictor.model.roi_heads.score_thresh == 0.05
    assert results == [(t, len(alone[t])) for t, _ in results]
    np.testing.assert_array_equal(small_predictor(image, 0.0).scores, alone[0.0].scores)


@pytest.mark.parametrize("mask_head", ["standard", "pointrend"])
def test_a_threshold_gives_what_the_model_gives_with_that_floor(mask_head):
    """Boxes, scores and masks of ``predictor(image, t)`` are torchvision's own with ``score_thresh = t``:
    the detections under ``t`` are dropped before the mask head, and the ones kept are unchanged."""
    import copy

    import torch

    predictor = _small_predictor(mask_head)
    image = _small_image(1)
    cut = float(np.median(predictor(image, 0.0).scores))
    reference_model = copy.deepcopy(predictor.model)
    reference_model.roi_heads.score_thresh = cut
    with torch.inference_mode():
        reference = reference_model([torch.from_numpy(image).permute(2, 0, 1).float().div_(255)])[0]
    prediction = predictor(image, cut)
    assert 0 < len(prediction) == len(reference["scores"]) < 10
    np.testing.assert_array_equal(prediction.scores, reference["scores"].numpy())
    np.testing.assert_array_equal(prediction.boxes, reference["boxes"].numpy())
    np.testing.assert_array_equal(prediction.labels, reference["labels"].numpy())
    np.testing.assert_array_equal(prediction.masks, (reference["masks"][:, 0] > 0.5).numpy())
