"""The Segmentor API on awkward inputs: image formats, sizes, class lists."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from itaclip_core.inference.preprocess import ImageReadError, prepare_image, rescale_size
from itaclip_core.segmentor import Segmentor
from itaclip_core.text.classes import TextFileError
from itaclip_core.text.tokenizer import TokenizerError

FAST = ["stride=112", "pamr_steps=2", "batch_size=64"]


@pytest.fixture(scope="module")
def segmentor(tiny_clip):
    from itaclip_core.presets import apply_overrides, get_preset

    return Segmentor(tiny_clip, apply_overrides(get_preset("open_vocab"), FAST), classes="cat, dog|puppy, sky",
                     cache_dir=None)


@pytest.fixture(scope="module")
def rgb_image():
    rng = np.random.default_rng(0)
    image = np.zeros((120, 150, 3), dtype=np.uint8)
    image[:60] = (90, 140, 230)
    image[60:] = (60, 160, 60)
    return np.clip(image + rng.integers(0, 20, image.shape), 0, 255).astype(np.uint8)


def _check(prediction, height, width, classes=3):
    assert prediction.labels.shape == (height, width) and prediction.labels.dtype == np.int64
    assert prediction.probs.shape == (classes, height, width) and prediction.probs.dtype == np.float32
    assert prediction.labels.min() >= 0 and prediction.labels.max() < classes
    assert np.isfinite(prediction.probs).all()


def test_array_pil_and_path_inputs_agree(segmentor, rgb_image, tmp_path):
    path = tmp_path / "scene.png"
    Image.fromarray(rgb_image).save(path)
    from_array = segmentor.predict(rgb_image)
    from_pil = segmentor.predict(Image.fromarray(rgb_image))
    from_path = segmentor.predict(path)
    _check(from_array, 120, 150)
    assert np.array_equal(from_array.labels, from_pil.labels) and np.array_equal(from_array.labels, from_path.labels)
    assert from_path.name == "scene.png"
    assert abs(sum(from_array.areas().values()) - 1.0) < 1e-9


def test_grayscale_rgba_palette_and_16_bit_files(segmentor, rgb_image, tmp_path):
    gray = Image.fromarray(rgb_image).convert("L")
    rgba = Image.fromarray(rgb_image).convert("RGBA")
    palette = Image.fromarray(rgb_image).convert("P", palette=Image.ADAPTIVE, colors=16)
    deep = Image.fromarray((np.asarray(gray).astype(np.uint16) * 257))
    for name, image in {"gray.png": gray, "rgba.png": rgba, "palette.png": palette, "deep.png": deep}.items():
        image.save(tmp_path / name)
        _check(segmentor.predict(tmp_path / name), 120, 150)
    # A 16-bit file decodes to the same 8-bit image as its 8-bit version (OpenCV's conversion).
    a = prepare_image(tmp_path / "deep.png", 336).tensor
    b = prepare_image(tmp_path / "gray.png", 336).tensor
    assert (a - b).abs().max().item() < 1e-5


def test_small_and_extreme_aspect_images(segmentor):
    small = np.full((80, 100, 3), 128, np.uint8)  # upscaled to short side 336 by the protocol
    _check(segmentor.predict(small), 80, 100)
    tiny = segmentor.prepare(np.full((20, 30, 3), 50, np.uint8))
    assert tiny.tensor.shape[-2:] == (336, 504)
    strip = np.full((40, 1200, 3), 200, np.uint8)  # long side capped at 2048: short side < crop
    assert rescale_size(40, 1200, 336) == (68, 2048)
    _check(segmentor.predict(strip), 40, 1200)


def test_unreadable_and_missing_files(segmentor, tmp_path):
    with pytest.raises(ImageReadError, match="image file not found"):
        segmentor.predict(tmp_path / "missing.jpg")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg at all")
    with pytest.raises(ImageReadError, match="bad.jpg is not an image OpenCV can read"):
        segmentor.predict(bad)
    with pytest.raises(ImageReadError, match="float image array"):
        segmentor.predict(np.full((10, 10, 3), 3.0))


def test_class_list_errors(segmentor):
    with pytest.raises(TextFileError, match="class list is empty"):
        segmentor.set_classes("")
    with pytest.raises(TextFileError, match="'Cat' is given for class 1 and class 3"):
        segmentor.set_classes("cat, dog, Cat")
    with pytest.raises(TextFileError, match="class 2 has an empty name"):
        segmentor.set_classes("cat, , dog")
    with pytest.raises(TokenizerError, match="the class text 'striped"):
        segmentor.set_classes(["cat", "striped " * 80])
    assert segmentor.class_names == ["cat", "dog", "sky"]  # a refused list leaves the classes as they were


def test_classes_can_be_changed_and_variants_count(segmentor, rgb_image):
    segmentor.set_classes([["water", "sea", "lake"], ["grass"]])
    try:
        prediction = segmentor.predict(rgb_image)
        _check(prediction, 120, 150, classes=2)
        assert segmentor.classifier.features.shape[0] == 4
    finally:
        segmentor.set_classes("cat, dog|puppy, sky")


def test_from_preset_with_random_weights_and_overrides():
    segmentor = Segmentor.from_preset("sclip_voc20", weights="random-tiny", overrides=["stride=224"],
                                      cache_dir=False)
    assert segmentor.config.stride == 224 and segmentor.num_classes == 20
    assert segmentor.weights_id == "random-tiny:0"
    _check(segmentor.predict(np.full((64, 96, 3), 90, np.uint8)), 64, 96, classes=20)
