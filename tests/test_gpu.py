"""GPU checks, run only where CUDA is available (skipped elsewhere): the golden pipeline on the GPU in float32, and
the agreement of float16 (the published code's GPU precision) and bfloat16 with it."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from itaclip_core import load_clip
from itaclip_core.presets import get_preset
from itaclip_core.segmentor import Segmentor

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def golden(golden_dir):
    config = get_preset("itaclip_voc21").replace(aux_file=str(golden_dir / "voc20_definitions_sample.txt"))
    return config, np.load(golden_dir / "itaclip_voc21_synthetic.npz")


def _predict(golden_dir, config, dtype):
    model = load_clip(golden_dir / "tiny_clip_openai_fp16.pt", device="cuda", dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        segmentor = Segmentor(model, config, cache_dir=None)
    return segmentor.predict(golden_dir / "synthetic_300x420.png")


def test_float32_on_the_gpu_matches_the_published_pipeline(golden_dir, golden):
    config, expected = golden
    prediction = _predict(golden_dir, config, torch.float32)
    assert np.abs(prediction.probs - expected["logits"]).max() < 1e-4
    assert (prediction.labels == expected["pred"]).mean() >= 0.9999


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_agrees_with_float32(golden_dir, golden, dtype):
    config, expected = golden
    prediction = _predict(golden_dir, config, dtype)
    difference = np.abs(prediction.probs - expected["logits"]).max()
    agreement = (prediction.labels == expected["pred"]).mean()
    print(f"{dtype}: max |prob diff| {difference:.2e}, labels equal on {100 * agreement:.3f}%")
    assert difference < 0.05 and agreement > 0.98
