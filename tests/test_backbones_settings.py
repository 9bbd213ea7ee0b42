"""Settings per backbone: geometry names, the rules, published entries, the warning, and every method on every
supported backbone (random weights)."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
import torch

from itaclip_core import backbones as bb
from itaclip_core.attention.dense import DENSE_METHODS, DenseConfig, dense_tokens
from itaclip_core.attention.variants import ATTENTION_VARIANTS
from itaclip_core.model import load_clip
from itaclip_core.model.random import RANDOM_SIZES
from itaclip_core.presets import get_preset
from itaclip_core.segmentor import Segmentor

TEMPLATES = "notebooks/ci_templates.txt"


def _half_up(x: float) -> int:
    return int(np.floor(x + 0.5))


@pytest.mark.parametrize("size,key", [("tiny", "vit-b-16"), ("vit-b-16", "vit-b-16"), ("vit-b-32", "vit-b-32"),
                                      ("tiny-l-14", "vit-l-14"), ("vit-l-14", "vit-l-14"), ("vit-h-14", "vit-h-14")])
def test_backbone_of_random_sizes(size, key):
    backbone = bb.backbone_of(RANDOM_SIZES[size])
    assert backbone.key == key
    parsed = bb.parse_backbone(key)
    assert (parsed.patch_size, parsed.layers) == (RANDOM_SIZES[size].patch_size, RANDOM_SIZES[size].vision_layers)


def test_backbone_keys_with_resolution_and_unknown_geometry():
    l336 = dataclasses.replace(RANDOM_SIZES["vit-l-14"], image_size=336)
    assert bb.backbone_of(l336).key == "vit-l-14-336" and bb.backbone_of(l336).base_key == "vit-l-14"
    odd = dataclasses.replace(RANDOM_SIZES["tiny"], vision_layers=20)
    assert bb.backbone_of(odd).key == "vit-20x16"
    assert (bb.parse_backbone("vit-20x16").layers, bb.parse_backbone("vit-20x16").patch_size) == (20, 16)
    with pytest.raises(ValueError, match="vit-l-14"):
        bb.parse_backbone("resnet-50")


@pytest.mark.parametrize("target", ["vit-l-14", "vit-h-14", "vit-bigg-14"])
def test_rules_relative_depth_and_same_patches(target):
    source, dest = bb.parse_backbone("vit-b-16"), bb.parse_backbone(target)
    blocks = bb.relative_blocks((7, 8, 10), source, dest)
    assert blocks == tuple(dict.fromkeys(_half_up(b * dest.layers / 12) for b in (7, 8, 10)))
    assert all(1 <= b < dest.layers for b in blocks)
    assert bb.same_patches(224, source, dest) == 224 // 16 * 14  # the same 14-patch crop
    assert bb.same_patches(112, source, dest) == 7 * 14
    assert bb.same_patches(28, source, dest) == _half_up(28 * 14 / 16)
    assert bb.relative_block(12, source, dest) == dest.layers - 1  # kept before the last block
    assert bb.relative_block_range((4, 10), source, dest) == (_half_up(4 * dest.layers / 12),
                                                              _half_up(10 * dest.layers / 12))


def _segmentor(weights: str, preset: str = "open_vocab", overrides=(), **kwargs) -> Segmentor:
    overrides = [f"templates={TEMPLATES}", *overrides]
    return Segmentor.from_preset(preset, weights=weights, device="cpu", overrides=overrides,
                                 classes="cat, dog", cache_dir=False, **kwargs)


def _backbone_warnings(record) -> list[str]:
    return [str(w.message) for w in record if "tuned on" in str(w.message)]


def test_itaclip_preset_on_l14_follows_the_rules_and_warns():
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        seg = _segmentor("random-tiny-l-14")
    messages = _backbone_warnings(record)
    assert len(messages) == 1
    for word in ("open_vocab", "vit-b-16", "vit-l-14", "fuse_blocks", "crop", "stride", "not published"):
        assert word in messages[0]
    tuned = get_preset("open_vocab")
    dest, source = bb.parse_backbone("vit-l-14"), bb.parse_backbone("vit-b-16")
    assert seg.config.fuse_blocks == bb.relative_blocks(tuned.fuse_blocks, source, dest)
    assert seg.config.crop == 196 and seg.config.stride == bb.same_patches(tuned.stride, source, dest)
    assert seg.config.tuned_on == "vit-l-14"
    assert seg.engine.crop == 196 and seg.engine.dense.fuse_blocks == seg.config.fuse_blocks
    assert {c.name for c in seg.backbone_fit.choices} == {"crop", "stride", "fuse_blocks"}
    assert all(not c.published for c in seg.backbone_fit.choices)


def test_explicit_overrides_are_kept():
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        seg = _segmentor("random-tiny-l-14", overrides=["crop=224", "fuse_blocks=3,4"])
    assert seg.config.crop == 224 and seg.config.fuse_blocks == (3, 4)
    assert seg.config.stride != get_preset("open_vocab").stride
    message = _backbone_warnings(record)[0]
    assert "stride" in message and "fuse_blocks" not in message


def test_no_adaptation_on_the_tuned_backbone_and_when_switched_off():
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        seg = _segmentor("random-tiny")
    assert not _backbone_warnings(record) and seg.config == get_preset("open_vocab").replace(templates=TEMPLATES)
    with pytest.warns(UserWarning, match="adapt_backbone=false"):
        off = _segmentor("random-tiny-l-14", overrides=["adapt_backbone=false"])
    assert off.config.fuse_blocks == get_preset("open_vocab").fuse_blocks and off.config.crop == 224


def test_published_settings_win_over_rules_and_method_rules_apply(monkeypatch):
    monkeypatch.setitem(bb.PUBLISHED, "sclip", {"vit-l-14": bb.BackboneSetting({"stride": 56, "crop": 336},
                                                                               source="a test table")})
    monkeypatch.setitem(bb.METHOD_RULES, "sclip", {"pamr_steps": lambda value, s, t: value + t.layers})
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        seg = _segmentor("random-tiny-l-14", preset="sclip_voc20")
    assert seg.config.stride == 56 and seg.config.crop == 336 and seg.config.pamr_steps == 24
    published = {c.name for c in seg.backbone_fit.choices if c.published}
    assert published == {"crop", "stride"}
    message = _backbone_warnings(record)[0]
    assert "pamr_steps" in message and "stride" not in message.split("derived by rule")[0].split("setting for")[1]


def test_register_published_checks_the_backbone():
    with pytest.raises(ValueError, match="tuned_on"):
        bb.register_published("sclip", "resnet", {}, source="x")


def test_settings_table_marks_the_origin():
    rows = bb.settings_table("itaclip", get_preset("itaclip_voc21"))
    assert rows[0]["origin"] == "as tuned" and rows[0]["fuse_blocks"] == (7, 8, 10)
    assert rows[1]["backbone"] == "vit-l-14" and rows[1]["origin"] == "rule (not published)"
    assert rows[1]["crop"] == 196


BACKBONES = ["random-tiny", "random-tiny-l-14", "random-open_clip:ViT-B-16-quickgelu", "random-open_clip:ViT-H-14"]


@pytest.mark.parametrize("weights", BACKBONES)
def test_every_attention_variant_and_dense_method_runs(weights):
    if weights.startswith("random-open_clip"):
        pytest.importorskip("open_clip", reason="open_clip_torch (extra `openclip`) is not installed")
    model = load_clip(weights, device="cpu")
    depth = model.config.vision_layers
    images = torch.randn(1, 3, 2 * model.config.patch_size * 3, 2 * model.config.patch_size * 4)
    grid = model.visual.grid_size(images.shape[-2], images.shape[-1])
    source, dest = bb.parse_backbone("vit-b-16"), bb.backbone_of(model.config)
    configs = [DenseConfig(variant=name) for name in ATTENTION_VARIANTS]
    configs += [dataclasses.replace(c, fuse_blocks=bb.relative_blocks(c.fuse_blocks, source, dest))
                for c in DENSE_METHODS.values()]
    with torch.no_grad():
        for config in configs:
            tokens = dense_tokens(model.visual, images, config)
            assert tokens.shape == (1, 1 + grid[0] * grid[1], model.config.embed_dim)
            assert torch.isfinite(tokens).all()
    assert depth == dest.layers


@pytest.mark.parametrize("weights", BACKBONES)
@pytest.mark.parametrize("preset", ["open_vocab", "sclip_voc20"])
def test_every_method_predicts_on_every_backbone(weights, preset):
    if weights.startswith("random-open_clip"):
        pytest.importorskip("open_clip", reason="open_clip_torch (extra `openclip`) is not installed")
    image = (np.random.default_rng(0).random((60, 84, 3)) * 255).astype(np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        seg = _segmentor(weights, preset=preset, overrides=["short_side=112"])
    prediction = seg.predict(image)
    assert prediction.labels.shape == (60, 84) and prediction.probs.shape == (2, 60, 84)
    assert np.isfinite(prediction.probs).all()


def test_wrong_tuned_on_fails_before_loading(monkeypatch):
    import itaclip_core.segmentor as segmentor_module

    def no_loading(*args, **kwargs):
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr(segmentor_module, "load_clip", no_loading)
    with pytest.raises(ValueError, match="tuned_on='vit-x'"):
        Segmentor.from_preset("open_vocab", weights="random-tiny", overrides=["tuned_on=vit-x"], classes="a, b")
