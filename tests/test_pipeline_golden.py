"""The whole ITACLIP pipeline against the output of the published code (VOC settings, tiny reference CLIP)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from itaclip_core import reference
from itaclip_core.presets import get_preset
from itaclip_core.segmentor import Segmentor


@pytest.fixture(scope="module")
def golden_config(golden_dir):
    return get_preset("itaclip_voc21").replace(aux_file=str(golden_dir / "voc20_definitions_sample.txt"))


@pytest.fixture(scope="module")
def golden_output(golden_dir):
    return np.load(golden_dir / "itaclip_voc21_synthetic.npz")


@pytest.fixture(scope="module")
def segmentor(tiny_clip, golden_config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the sample file says "tvmonitor" for "television monitor"
        return Segmentor(tiny_clip, golden_config, cache_dir=None)


def test_probabilities_and_labels_match_the_published_pipeline(segmentor, golden_dir, golden_output):
    prediction = segmentor.predict(golden_dir / "synthetic_300x420.png")
    assert prediction.probs.shape == golden_output["logits"].shape == (21, 300, 420)
    assert np.abs(prediction.probs - golden_output["logits"]).max() < 1e-4
    assert (prediction.labels == golden_output["pred"]).mean() >= 0.9999
    assert prediction.class_names[0] == "background" and len(prediction.class_names) == 21  # not "sky"


def test_the_straightforward_route_gives_the_same_numbers(segmentor, golden_dir, golden_output, tiny_clip,
                                                          golden_config):
    prepared = segmentor.prepare(golden_dir / "synthetic_300x420.png")
    probs, labels = reference.predict(tiny_clip, prepared.tensor, prepared.original_size, segmentor.classifier,
                                      golden_config)
    assert np.abs(probs.numpy() - golden_output["logits"]).max() < 1e-4
    assert (labels == golden_output["pred"]).mean() >= 0.9999


def test_the_name_mismatch_of_the_sample_file_is_reported(tiny_clip, golden_config):
    with pytest.warns(UserWarning, match="names 'tvmonitor' but class 20 is 'television monitor'"):
        Segmentor(tiny_clip, golden_config, cache_dir=None)
