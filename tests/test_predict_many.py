"""Several images at once (`predict_many`, a list to `predict`), torch tensors as images, the Prediction repr."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from itaclip_core.presets import get_preset
from itaclip_core.segmentor import Segmentor

TEMPLATES = Path(__file__).resolve().parents[1] / "notebooks" / "ci_templates.txt"


@pytest.fixture(scope="module")
def segmentor(tiny_clip):
    config = get_preset("open_vocab").replace(short_side=224, stride=112, pamr_steps=1, batch_size=7,
                                              templates=str(TEMPLATES))
    return Segmentor(tiny_clip, config, classes="cat, dog|puppy, sky", cache_dir=None)


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(1)
    # sizes whose windows differ after the resize (a short side below the crop size too)
    sizes = [(120, 150), (90, 300), (50, 60), (200, 200)]
    return [rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for h, w in sizes]


def test_predict_many_equals_one_by_one(segmentor, images):
    alone = [segmentor.predict(image) for image in images]
    for batch_size in (2, 4):
        together = segmentor.predict_many(images, batch_size=batch_size)
        assert len(together) == len(images)
        for a, b in zip(alone, together):
            assert a.labels.shape == b.labels.shape
            assert np.abs(a.probs - b.probs).max() < 1e-5
            assert (a.labels == b.labels).mean() > 0.999


def test_windows_of_several_images_share_forward_passes(segmentor, images, monkeypatch):
    calls: list[int] = []
    original = segmentor.engine.readout.window_logits

    def counting(engine, crops, text, refinements=()):
        calls.append(crops.shape[0])
        return original(engine, crops, text, refinements)

    monkeypatch.setattr(segmentor.engine.readout, "window_logits", counting)
    same_size = [images[3], images[3][::-1].copy(), images[3][:, ::-1].copy()]
    segmentor.predict_many(same_size, batch_size=3)
    windows = len(segmentor.engine.windows(*segmentor.prepare(same_size[0]).tensor.shape[-2:]))
    assert calls == [3 * windows]


def test_a_list_to_predict_and_names(segmentor, images, tmp_path):
    path = tmp_path / "scene.png"
    Image.fromarray(images[0]).save(path)
    predictions = segmentor.predict([path, images[1]])
    assert [p.name for p in predictions] == ["scene.png", ""]
    named = segmentor.predict_many(images[:2], names=["a", "b"])
    assert [p.name for p in named] == ["a", "b"]


def test_torch_tensors_are_images(segmentor, images):
    rgb = images[0]
    expected = segmentor.predict(rgb).labels
    chw = torch.from_numpy(rgb).permute(2, 0, 1)
    assert np.array_equal(segmentor.predict(chw).labels, expected)
    assert np.array_equal(segmentor.predict(chw[None]).labels, expected)
    assert np.array_equal(segmentor.predict(chw.float() / 255).labels, expected)
    gray = torch.from_numpy(rgb[:, :, 0].copy())
    assert np.array_equal(segmentor.predict(gray).labels, segmentor.predict(rgb[:, :, 0]).labels)


def test_prediction_repr_is_short(segmentor, images):
    prediction = segmentor.predict(images[0], name="cat.jpg")
    text = repr(prediction)
    assert text.startswith("Prediction('cat.jpg', 120x150, 3 classes; ") and len(text) < 120
    top = max(prediction.areas(), key=prediction.areas().get)
    assert f"{top} {prediction.areas()[top]:.0%}" in text
    assert (prediction.height, prediction.width) == (120, 150)


def test_a_class_file_with_any_suffix(segmentor, tmp_path, images):
    path = tmp_path / "classes.lst"
    path.write_text("cat\nsky\n")
    segmentor.set_classes(str(path))
    assert segmentor.class_names == ["cat", "sky"]
    segmentor.set_classes("cat, dog|puppy, sky")
