"""Every preset family on every supported backbone family (tiny random weights): it predicts, and its block
numbers, crop and stride are the ones the per-backbone table (published entry or rule) gives.

Backbones: `random-tiny` (ViT-B/16 geometry, 12 blocks), `random-tiny-l-14` (24 blocks, patch 14) and open_clip's
ViT-H-14 config shrunk to a tiny width (32 blocks, patch 14). The presets run with short side 112 and stride = crop
(one or two windows), two classes, the CI templates; mask-guided presets with superpixel masks and a random-tiny
proxy model (no download).
"""

from __future__ import annotations

import warnings
from functools import lru_cache

import numpy as np
import pytest

from _families import FAMILIES, family_config
from itaclip_core import backbones as bb
from itaclip_core.masks.attention import spatial_blocks
from itaclip_core.model import load_clip
from itaclip_core.presets import get_preset
from itaclip_core.segmentor import Segmentor

BACKBONES = {"random-tiny": "vit-b-16", "random-tiny-l-14": "vit-l-14", "random-open_clip:ViT-H-14": "vit-h-14"}
# SC-CLIP's published ViT-L/14 setting (SuleBai/SC-CLIP configs/base_config.py: pre 16, post 6, multi 8..19 as
# 0-based indices with an exclusive end, res_cls 0.1; crop 224 and stride 112 unchanged)
SCCLIP_L14 = {"scclip_blocks": (17, 7, 9, 19), "scclip_res_cls": 0.1, "crop": 224, "stride": 112}


def _half_up(x: float) -> int:
    return int(np.floor(x + 0.5))


def _depth(blocks, layers: int, merge: bool) -> tuple[int, ...]:
    """Independent statement of the relative-depth rule: round half up, 1 .. layers - 1."""
    out = [min(max(1, _half_up(b * layers / 12)), layers - 1) for b in blocks]
    return tuple(dict.fromkeys(out)) if merge else tuple(out)


@lru_cache(maxsize=None)
def _model(weights: str):
    if weights.startswith("random-open_clip"):
        pytest.importorskip("open_clip", reason="open_clip_torch (extra `openclip`) is not installed")
    return load_clip(weights, device="cpu")


def _expected(preset: str, key: str) -> dict:
    """The fitted values the table must give for `preset` on backbone `key`."""
    tuned = family_config(preset)
    target = bb.parse_backbone(key)
    ratio = target.patch_size / 16
    expected = {"crop": _half_up(tuned.crop * ratio) if tuned.crop else 0,
                "stride": _half_up(tuned.stride * ratio), "fuse_blocks": _depth(tuned.fuse_blocks, target.layers, True),
                "scclip_blocks": tuned.scclip_blocks, "scclip_res_cls": tuned.scclip_res_cls}
    if tuned.method == "scclip":  # its own field, fitted for SC-CLIP only
        expected["scclip_blocks"] = _depth(tuned.scclip_blocks, target.layers, False)
    if key == "vit-b-16":
        expected.update(crop=tuned.crop, stride=tuned.stride)
    if tuned.method == "scclip" and key == "vit-l-14":
        expected.update(SCCLIP_L14)
    if tuned.method == "resclip" and key == "vit-l-14":
        expected["fuse_blocks"] = (6, 7, 8, 9)  # the official code's blocks on every backbone
    return expected


@pytest.mark.parametrize("weights", list(BACKBONES))
@pytest.mark.parametrize("preset", list(FAMILIES))
def test_every_preset_family_runs_on_every_backbone(weights, preset):
    model = _model(weights)
    key = BACKBONES[weights]
    assert bb.backbone_of(model.config).key == key
    config = family_config(preset)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        seg = Segmentor(model, config, classes="cat, dog", cache_dir=False, notes=lambda note: None)
    fitted, expected = seg.config, _expected(preset, key)
    for name, value in expected.items():
        assert getattr(fitted, name) == value, name
    assert seg.engine.crop == fitted.crop and seg.engine.dense.fuse_blocks == fitted.fuse_blocks
    if fitted.readout == "scclip":
        blocks = seg.engine.readout.settings
        assert (blocks.affinity_block, blocks.post_block, *blocks.multi_blocks) == fitted.scclip_blocks
        assert blocks.res_cls == fitted.scclip_res_cls
    tuned_warnings = [str(w.message) for w in record if "tuned on" in str(w.message)]
    choices = {c.name: c for c in seg.backbone_fit.choices}
    if key == "vit-b-16":
        assert not tuned_warnings and not choices
    else:
        ruled = [name for name, c in choices.items() if not c.published]
        assert bool(tuned_warnings) == bool(ruled)  # a warning exactly when a rule (not a published entry) is used
        for name in ruled:
            assert name in tuned_warnings[0]
        published = {name for name, c in choices.items() if c.published}
        if config.method == "scclip" and key == "vit-l-14":
            assert published == {"scclip_blocks", "scclip_res_cls", "crop", "stride"} and not ruled
        elif config.method == "resclip" and key == "vit-l-14":
            assert published == {"fuse_blocks"}
        else:
            assert not published

    image = (np.random.default_rng(0).random((60, 84, 3)) * 255).astype(np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prediction = seg.predict(image)
    # CLIPtrase's centre-crop protocol predicts at its n x n crop (n = the fitted crop), the others at the image size
    size = (fitted.crop, fitted.crop) if fitted.protocol == "centre_crop" else (60, 84)
    assert prediction.labels.shape == size and prediction.probs.shape == (2, *size)
    assert np.isfinite(prediction.probs).all() and (prediction.probs >= 0).all()
    assert (prediction.probs <= 1 + 1e-5).all()
    assert set(np.unique(prediction.labels)) <= {0, 1}


@pytest.mark.parametrize("layers", [12, 24, 32])
def test_blocks_found_from_the_depth_stay_inside_the_tower(layers):
    """The mask attention's spatial branch is chosen from the depth (no setting to fit): blocks before L-2."""
    spatial = spatial_blocks(layers)
    assert len(spatial) > 0 and spatial.start >= 0 and spatial.stop == layers - 2


def test_whole_image_crop_stays_whole_image():
    tuned = get_preset("naclip_voc21")
    assert tuned.crop == 0
    assert bb.same_patches(0, bb.parse_backbone("vit-b-16"), bb.parse_backbone("vit-l-14")) == 0
    rows = bb.settings_table("naclip", tuned)
    assert [row["crop"] for row in rows] == [0, 0, 0]


def test_scclip_blocks_are_fitted_position_by_position():
    source, target = bb.parse_backbone("vit-b-16"), bb.parse_backbone("vit-h-14")
    # (9, 4, 4, 10): the post block and the first multi-level block coincide and must both stay
    assert bb.relative_block_each((9, 4, 4, 10), source, target) == _depth((9, 4, 4, 10), 32, False)
    assert len(bb.relative_block_each((9, 4, 4, 10), source, target)) == 4
    rows = {row["backbone"]: row for row in bb.settings_table("scclip", get_preset("scclip_voc21"))}
    assert rows["vit-l-14"]["origin"] == "published" and rows["vit-l-14"]["scclip_blocks"] == (17, 7, 9, 19)
    assert rows["vit-h-14"]["origin"] == "rule (not published)"
