"""Large photos and decompression bombs: a pixel limit read from the header, reduced decoding, and
Label Studio regions at the original size of an image predicted on a reduced copy."""
from __future__ import annotations

import contextlib
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from segkit.evaluation.coco import image_entry
from segkit.data.images import (DEFAULT_MAX_PIXELS, ImageError, ImageTooLargeError, as_rgb, downscale, image_size,
                           load_image, load_scaled)
from segkit.structures.masks import InstanceMasks
from segkit.labelstudio.preannotations import mask_to_ls_rle, prediction_result
from segkit.structures.prediction import Prediction


def write_png_bomb(path: Path, width: int, height: int) -> Path:
    """A black 1-bit PNG of ``width`` x ``height`` written row block by row block: a few KB on disk,
    and little memory here (Pillow would hold one byte per pixel while saving)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\0" * (1 + (width + 7) // 8)  # filter byte 0, then the packed bits
    deflate, idat = zlib.compressobj(9), []
    for start in range(0, height, 1000):
        idat.append(deflate.compress(row * min(1000, height - start)))
    idat.append(deflate.flush())
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1 bit, greyscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(idat))
                     + chunk(b"IEND", b""))
    return path


@pytest.fixture
def no_decoding(monkeypatch):
    """Fails a test that decodes pixels: a refusal must come from the header alone."""
    def load(self):
        raise AssertionError(f"decoded a {self.size} image")

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)


# 13000^2 = 169 MP: over Pillow's warning threshold only, so Pillow alone would decode it;
# 20000^2 = 400 MP: Pillow refuses it itself, and the message must still be ours.
@pytest.mark.parametrize("side", [13000, 20000])
def test_a_decompression_bomb_is_refused_from_its_header(tmp_path, side, no_decoding):
    bomb = write_png_bomb(tmp_path / "bomb.png", side, side)
    assert bomb.stat().st_size < 200_000
    start = time.perf_counter()
    with pytest.warns(Image.DecompressionBombWarning) if side == 13000 else contextlib.nullcontext():
        with pytest.raises(ImageTooLargeError) as info:  # an ImageError, which callers already handle
            load_image(bomb, max_side=1333, max_pixels=DEFAULT_MAX_PIXELS)
    message = str(info.value)
    assert str(bomb) in message and "100 MP" in message and "--max-pixels" in message
    assert (f"{side}x{side}" if side == 13000 else f"{side * side / 1e6:g} MP") in message
    assert time.perf_counter() - start < 1.0


def test_the_limit_is_the_callers_and_in_memory_images_are_called_the_image(tmp_path):
    small = tmp_path / "small.png"
    Image.new("RGB", (30, 20)).save(small)
    assert load_image(small, max_pixels=600).size == (30, 20)  # at the limit: allowed
    with pytest.raises(ImageError, match=r"small.png: 30x20 pixels .* over the limit"):
        load_image(small, max_pixels=599)
    with pytest.raises(ImageError, match=r"small.png: 30x20 pixels"):
        as_rgb(str(small), max_pixels=599)
    with pytest.raises(ImageError, match=r"^the image: 30x20 pixels"):
        as_rgb(np.zeros((20, 30, 3), np.uint8), max_pixels=599)
    assert as_rgb(Image.new("L", (30, 20)), max_pixels=600).mode == "RGB"


def test_without_a_limit_only_pillows_own_refuses(tmp_path, no_decoding):
    bomb = write_png_bomb(tmp_path / "huge.png", 20000, 20000)
    for read in (load_image, image_size):  # Pillow refuses to open it at all
        with pytest.raises(ImageError, match=r"huge.png: 400 MP is over Pillow's limit of 179 MP"):
            read(bomb)


@pytest.fixture(scope="module")
def phone_photo(tmp_path_factory) -> Path:
    """A smooth 6000x4000 JPEG stored sideways (EXIF orientation 6), with a red block at its stored top-left."""
    y, x = np.mgrid[0:4000, 0:6000].astype(np.float32)
    a = np.empty((4000, 6000, 3), np.uint8)
    a[..., 0] = 40 + 150 * x / 6000
    a[..., 1] = 40 + 150 * y / 4000
    a[..., 2] = 128 + 60 * np.sin(x / 300) * np.cos(y / 200)
    a[:800, :1200] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path_factory.mktemp("phone") / "phone.jpg"
    Image.fromarray(a).save(path, quality=92, exif=exif.tobytes())
    return path


def test_a_large_jpeg_is_decoded_at_reduced_size_and_matches_the_full_decode(phone_photo, monkeypatch):
    decoded = []
    load = ImageFile.ImageFile.load

    def spy(self):
        decoded.append(self.size)
        return load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    image, original = load_scaled(phone_photo, max_side=1000)
    assert original == (4000, 6000) == image_size(phone_photo)  # displayed size, after the 90° turn
    assert image.size == (667, 1000) and image.mode == "RGB"
    assert decoded and max(w * h for w, h in decoded) <= 6000 * 4000 // 16  # libjpeg at 1/4 scale at most
    assert load_image(phone_photo, max_side=1000).size == image.size

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    full = downscale(load_image(phone_photo), 1000)
    assert full.size == image.size
    diff = np.abs(np.asarray(image, np.int16) - np.asarray(full, np.int16))
    assert diff.mean() < 1.5 and np.percentile(diff, 99) < 12
    a = np.asarray(image).astype(int)
    assert a[50, 620, 0] > 200 and a[50, 620, 1] < 60  # stored top-left is displayed top-right
    assert a[50, 50, 0] < 200 and a[950, 620, 0] < 200


def test_other_formats_are_reduced_to_the_same_size(tmp_path):
    path = tmp_path / "scan.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (200, 301, 3), dtype=np.uint8)).save(path)
    image, original = load_scaled(path, max_side=100)
    assert original == (301, 200) and image.size == (100, 66)
    assert np.array_equal(np.asarray(image), np.asarray(downscale(load_image(path), 100)))
    assert load_scaled(path)[1] == (301, 200) and load_scaled(path)[0].size == (301, 200)


def _prediction(width: int, height: int) -> Prediction:
    """A disc and a ring-shaped mask (with a hole) on a ``width`` x ``height`` image."""
    y, x = np.mgrid[0:height, 0:width]
    disc = (x - 30) ** 2 + (y - 20) ** 2 < 12 ** 2
    ring = ((x - 70) ** 2 + (y - 45) ** 2 < 20 ** 2) & ((x - 70) ** 2 + (y - 45) ** 2 >= 8 ** 2)
    masks = np.stack([disc, ring])
    return Prediction(np.array([[18, 8, 42, 32], [50, 25, 90, 65]], np.float32), np.array([1, 2]),
                      ["leaf", "shell"], np.array([0.9, 0.8], np.float32), InstanceMasks.from_dense(masks))


def _nearest(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``mask`` resized to ``size`` (width, height) by nearest neighbour, sampled at pixel centres."""
    return np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.Resampling.NEAREST)) > 0


# 4x exactly, and 4.08x by 3.97x (sizes where no pixel centre falls on an edge, where nearest is a tie)
@pytest.mark.parametrize("original", [(400, 300), (408, 298)])
def test_brush_regions_of_a_reduced_prediction_are_at_the_original_size(original):
    from label_studio_converter.brush import decode_rle

    prediction = _prediction(100, 75)
    entry = image_entry("photo.jpg", 100, 75, prediction)
    result = prediction_result(entry, "v1", brush=True, original_size=original)["result"]
    assert len(result) == 2
    width, height = original
    for region, mask in zip(result, prediction.masks):
        assert (region["original_width"], region["original_height"]) == original
        decoded = decode_rle(region["value"]["rle"]).reshape(height, width, 4)
        assert np.array_equal(decoded[..., 3] > 0, _nearest(mask, original))


def test_polygons_of_a_reduced_prediction_keep_their_percent_and_carry_the_original_size():
    entry = image_entry("photo.jpg", 100, 75, _prediction(100, 75))
    reduced = prediction_result(entry, "v1")
    scaled = prediction_result(entry, "v1", original_size=(400, 300))
    assert scaled["score"] == reduced["score"] and len(scaled["result"]) == len(reduced["result"]) >= 2
    for a, b in zip(reduced["result"], scaled["result"]):
        assert (a["original_width"], a["original_height"]) == (100, 75)
        assert (b["original_width"], b["original_height"]) == (400, 300)
        assert a["value"] == b["value"]


@pytest.mark.parametrize("shape", [(7, 5), (300, 301), (40, 1)])
def test_brush_rle_is_label_studios_own_encoding(shape):
    """The encoder works from runs (no 4-channel copy of the image); Label Studio's reads it identically."""
    from label_studio_converter.brush import mask2rle

    rng = np.random.default_rng(1)
    masks = [np.zeros(shape, bool), np.ones(shape, bool), rng.random(shape) < 0.5, rng.random(shape) < 0.001]
    masks[3][-1, -1] = masks[3][0, 0] = True  # runs that start and end at the image's edges
    for mask in masks:
        assert mask_to_ls_rle(mask) == mask2rle(mask.astype(np.uint8) * 255)
