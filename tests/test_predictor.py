"""The one Predictor shared by the CLI, the demo and training previews."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from segkit.checkpoint import CheckpointError
from segkit.predictor import Predictor


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

    from segkit.coco import encode_mask, prediction_to_coco

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
