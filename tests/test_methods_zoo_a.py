"""NACLIP, ClearCLIP and ResCLIP against their official code (golden files under the tiny seeded CLIP)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from itaclip_core.attention import DENSE_METHODS, attention_maps, dense_tokens, last_block, run_trunk
from itaclip_core.attention.dense import last_variant
from itaclip_core.methods import get_readout
from itaclip_core.methods.resclip import first_pass_labels, sfr_matrix
from itaclip_core.presets import get_preset
from itaclip_core.segmentor import Segmentor

IMAGES = ("224", "240x320")


@pytest.fixture(scope="module")
def methods_dir(golden_dir):
    return golden_dir / "methods"


def _golden(methods_dir, name):
    return dict(np.load(methods_dir / f"{name}.npz"))


# --------------------------------------------------------------------------------------------- dense features
@pytest.mark.parametrize("explicit", [False, True], ids=["fused-kernels", "explicit-maps"])
@pytest.mark.parametrize("method", ["naclip", "clearclip"])
def test_dense_features_match_the_official_code(tiny_clip, golden_forward, methods_dir, method, explicit):
    golden = _golden(methods_dir, f"{method}_dense")
    for key in IMAGES:
        images = golden_forward[f"image_{key}"]
        with torch.no_grad():
            out = torch.cat([dense_tokens(tiny_clip.visual, images[i : i + 1], DENSE_METHODS[method], explicit)
                             for i in range(images.shape[0])])
        expected = torch.from_numpy(golden[f"dense_{key}"])
        if expected.shape[1] != out.shape[1]:  # ClearCLIP returns the patch tokens only
            out = out[:, 1:]
        assert out.shape == expected.shape
        assert (out - expected).abs().max().item() < 1e-4


def test_resclip_dense_features_and_intermediates_match_the_official_code(tiny_clip, golden_forward, methods_dir):
    golden = _golden(methods_dir, "resclip_dense")
    config = get_preset("resclip_voc21")
    readout = get_readout(config)
    text = torch.from_numpy(golden["query_features"])
    visual = tiny_clip.visual
    for key in IMAGES:
        images = golden_forward[f"image_{key}"]
        for i in range(images.shape[0]):
            image = images[i : i + 1]
            with torch.no_grad():
                tokens = readout.patch_tokens(visual, image, text)
                state = run_trunk(visual, image, readout.dense)
                first = F.normalize(last_block(visual, state, readout.dense, last_variant(readout.dense))[:, 1:],
                                    dim=-1)
                rows, cols = visual.grid_size(*image.shape[-2:])
                logits = (first @ text.T).permute(0, 2, 1).reshape(1, -1, rows, cols)
                _, labels = first_pass_labels(logits, image, visual.patch_size, config.logit_scale,
                                              config.sfr_temp_thd)
                maps = attention_maps(visual, image, readout.dense.__class__(
                    variant="qk", fuse_blocks=(6, 7, 8, 9), fuse_weight=0.0))
            assert (tokens - torch.from_numpy(golden[f"dense_{key}"][i : i + 1, 1:])).abs().max() < 1e-4
            assert torch.equal(labels[0], torch.from_numpy(golden[f"sfr_patch_labels_{key}"][i]))
            assert (sfr_matrix(labels[0]) - torch.from_numpy(golden[f"sfr_attn_{key}"][i])).abs().max() < 1e-6
            assert (maps["fused"] - torch.from_numpy(golden[f"rcs_attn_{key}"][i : i + 1])).abs().max() < 1e-6


# --------------------------------------------------------------------------------------------- whole pipelines
PIPELINES = [
    ("naclip_voc21", "naclip_voc21_synthetic", "naclip/cls_voc21.txt"),
    ("clearclip_voc21", "clearclip_voc21_synthetic", "clearclip/cls_voc21.txt"),
    ("resclip_voc21", "resclip_voc21_synthetic", "resclip/cls_voc21.txt"),
    ("resclip_voc20", "resclip_voc20_synthetic", "resclip/cls_voc20.txt"),
]


@pytest.fixture(scope="module")
def pipeline_runs(tiny_clip, golden_dir, methods_dir):
    runs = {}

    def run(preset, golden_name, classes):
        if preset not in runs:
            config = get_preset(preset).replace(classes=str(methods_dir / "class_names" / classes))
            segmentor = Segmentor(tiny_clip, config, cache_dir=None)
            prepared = segmentor.prepare(golden_dir / "synthetic_300x420.png")
            runs[preset] = (segmentor, prepared, segmentor.predict_prepared(prepared),
                            _golden(methods_dir, golden_name))
        return runs[preset]

    return run


@pytest.mark.parametrize("preset,golden_name,classes", PIPELINES, ids=[p[0] for p in PIPELINES])
def test_pipeline_matches_the_official_code(pipeline_runs, preset, golden_name, classes):
    segmentor, prepared, prediction, golden = pipeline_runs(preset, golden_name, classes)
    assert np.abs(segmentor.classifier.features.numpy() - golden["query_features"]).max() < 1e-4
    height, width = prepared.tensor.shape[-2:]
    boxes = [(w.y1, w.y2, w.x1, w.x2) for w in segmentor.engine.windows(height, width)]
    assert boxes == [tuple(b) for b in golden["crop_boxes"].tolist()]
    assert prediction.probs.shape == golden["logits"].shape
    assert np.abs(prediction.probs - golden["logits"]).max() < 1e-4
    assert (prediction.labels == golden["pred"]).mean() >= 0.9999
    # the dense output of every window
    crops = torch.stack([prepared.tensor[:, y1:y2, x1:x2] for y1, y2, x1, x2 in boxes])
    text = segmentor.classifier.features
    with torch.no_grad():
        tokens = segmentor.engine.readout.patch_tokens(segmentor.model.visual, crops, text)
    expected = torch.from_numpy(golden["enc_out"])[:, -tokens.shape[1]:]
    assert (tokens - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize("preset,golden_name,classes", PIPELINES[2:], ids=[p[0] for p in PIPELINES[2:]])
def test_resclip_first_pass_matches_the_official_code(pipeline_runs, preset, golden_name, classes):
    segmentor, prepared, _, golden = pipeline_runs(preset, golden_name, classes)
    readout = segmentor.engine.readout
    visual = segmentor.model.visual
    image = prepared.tensor[None]
    text = segmentor.classifier.features
    with torch.no_grad():
        state = run_trunk(visual, image, readout.dense)
        first = F.normalize(last_block(visual, state, readout.dense)[:, 1:], dim=-1)
        rows, cols = visual.grid_size(*image.shape[-2:])
        logits = (first @ text.T).permute(0, 2, 1).reshape(1, -1, rows, cols)
        pixels, patches = first_pass_labels(logits, image, visual.patch_size, readout.config.logit_scale,
                                            readout.config.sfr_temp_thd)
    assert (pixels.numpy() == golden["sfr_pixel_labels"]).mean() >= 0.9999
    assert np.array_equal(patches.numpy(), golden["sfr_patch_labels"])
    assert np.abs(sfr_matrix(patches[0]).numpy() - golden["sfr_attn"][0]).max() < 1e-6
