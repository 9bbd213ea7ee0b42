"""Mask-scoped and proxy attention: hand-computed weights, the readouts' structure, and the Segmentor paths."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from itaclip_core.masks import MaskError
from itaclip_core.masks.attention import MaskAttentionReadout, proxy_attention, region_grid, scoped_attention
from itaclip_core.masks.readouts import side_views
from itaclip_core.presets import apply_overrides, get_preset
from itaclip_core.segmentor import Segmentor

FAST = ["short_side=112", "stride=112", "pamr_steps=0", "templates=notebooks/ci_templates.txt"]


def _softmax(values):
    exps = [math.exp(v) for v in values]
    return [e / sum(exps) for e in exps]


def test_scoped_attention_by_hand():
    # Regions: patches 0, 1 in mask 1, patch 2 in mask 2, patch 3 uncovered. mean(S) = 8 / 16 = 0.5.
    similarity = torch.tensor([[1.0, 0.5, 0.2, 0.9],
                               [0.5, 1.0, 0.1, 0.0],
                               [0.2, 0.1, 1.0, 0.3],
                               [0.9, 0.0, 0.3, 1.0]])[None]
    regions = torch.tensor([[1, 1, 2, 0]])
    weights = scoped_attention(similarity, regions, tau=4.0)[0]
    # Row 0: its mask (0, 1) and the uncovered patch 3 (0.9 > mean); row 1: its mask only (S13 = 0 < mean);
    # row 2: alone in its mask (S23 = 0.3 < mean); row 3 (uncovered): patches with S > mean, i.e. 0 and itself.
    expected = torch.zeros(4, 4)
    expected[0, [0, 1, 3]] = torch.tensor(_softmax([4.0, 2.0, 3.6]))
    expected[1, [0, 1]] = torch.tensor(_softmax([2.0, 4.0]))
    expected[2, 2] = 1.0
    expected[3, [0, 3]] = torch.tensor(_softmax([3.6, 4.0]))
    assert torch.allclose(weights, expected, atol=1e-6)


def test_scoped_attention_with_one_mask_everywhere_is_plain_softmax():
    similarity = torch.rand(2, 5, 5)
    weights = scoped_attention(similarity, torch.ones(2, 5, dtype=torch.long), tau=4.0)
    assert torch.allclose(weights, (4.0 * similarity).softmax(dim=-1), atol=1e-6)


def test_proxy_attention_by_hand():
    # Cosines of (1, 0), (0.6, 0.8), (0, 1): S = [[1, .6, 0], [.6, 1, .8], [0, .8, 1]], mean 5.8 / 9.
    features = torch.tensor([[[2.0, 0.0], [0.6, 0.8], [0.0, 3.0]]])  # lengths do not matter (normalised)
    weights = proxy_attention(features, beta=1.2, gamma=3.0)[0]
    shift = 1.2 * 5.8 / 9
    expected = torch.zeros(3, 3)
    expected[0, 0] = 1.0  # 0.6 and 0 are below beta x mean: removed
    expected[1, [1, 2]] = torch.tensor(_softmax([3 * (1 - shift), 3 * (0.8 - shift)]))
    expected[2, [1, 2]] = torch.tensor(_softmax([3 * (0.8 - shift), 3 * (1 - shift)]))
    assert torch.allclose(weights, expected, atol=1e-6)
    # Identical features: every entry is 1 - 1.2 < 0; the diagonal is kept, so no row is empty.
    same = proxy_attention(torch.ones(1, 4, 3))[0]
    assert torch.allclose(same, torch.eye(4))


def test_region_grid_and_side_views():
    pixels = torch.tensor([[[1, 1, 2, 2], [1, 1, 2, 2], [0, 0, 3, 3], [0, 0, 3, 3]]])
    assert region_grid(pixels, 2, 2).tolist() == [[1, 2, 0, 3]]
    views = side_views(pixels, True)
    assert views.shape == (5, 4, 4)
    assert torch.equal(views[3], torch.flip(pixels[0], dims=[0])) and torch.equal(views[4], pixels[0].flip(1))
    assert torch.equal(side_views(pixels, False), pixels)


def _images(tiny_clip):
    torch.manual_seed(0)
    return torch.randn(2, 3, 64, 64)


def test_main_branch_is_scoped_attention_of_the_last_block(tiny_clip):
    visual = tiny_clip.visual
    images = _images(tiny_clip)
    regions = torch.zeros(2, 64, 64, dtype=torch.long)
    regions[:, :, :32] = 1
    regions[:, :32, 32:] = 2  # bottom right quarter uncovered
    out, grid = MaskAttentionReadout(4.0, spatial_weight=0.0, semantic_weight=0.0)(visual, images, regions)
    # The straightforward computation, written out.
    x, _ = visual.forward_intermediates(images, stop=len(visual.blocks) - 1)
    last = visual.blocks[-1]
    q, k, v = last.qkv(x)
    feats = F.normalize((q + k)[:, :, 1:].transpose(1, 2).flatten(2), dim=-1)
    weights = scoped_attention(feats @ feats.transpose(1, 2), region_grid(regions, *grid), 4.0)
    expected = visual.head(last.attn.out_proj(torch.matmul(weights[:, None], v[:, :, 1:]).transpose(1, 2).flatten(2)))
    assert grid == visual.grid_size(64, 64)
    assert torch.allclose(out, expected, atol=1e-5)


def test_mask_class_tokens_add_one_vector_per_region(tiny_clip):
    visual = tiny_clip.visual
    images = _images(tiny_clip)
    regions = torch.zeros(2, 64, 64, dtype=torch.long)
    regions[:, :, :32] = 1
    regions[:, :32, 32:] = 2
    without, grid = MaskAttentionReadout(4.0, 1.0, 0.0)(visual, images, regions)
    with_tokens, _ = MaskAttentionReadout(4.0, 1.0, 0.5)(visual, images, regions)
    difference = (with_tokens - without)[0]  # (N, D)
    ids = region_grid(regions, *grid)[0]
    per_region = []
    for region in (0, 1, 2):
        rows = difference[ids == region]
        assert torch.allclose(rows, rows[:1].expand_as(rows), atol=1e-5)  # constant inside a region: the main
        per_region.append(rows[0])  # and spatial branches are unchanged by the extra tokens
    assert not torch.allclose(per_region[1], per_region[2], atol=1e-4)
    # The tokens as CorrCLIP builds them: one class-token copy per region prepended to the sequence, attending to
    # the class token and their region's patches (a boolean mask) in every block, the whole last block included.
    x = visual.embed(images)
    count = 3
    tokens = torch.cat([x[:, :1].expand(-1, count, -1), x], dim=1)
    size = tokens.shape[1]
    allowed = torch.zeros(size, size, dtype=torch.bool)
    allowed[count:, count:] = True
    allowed[:count, count] = True
    allowed[:count, count + 1:] = torch.arange(count)[:, None] == ids[None, :]
    for block in visual.blocks:
        q, k, v = block.qkv(tokens)
        tokens = block.attend(tokens, F.scaled_dot_product_attention(q, k, v, attn_mask=allowed))
    explicit = visual.head(tokens[0, :count])  # (3, D)
    assert torch.allclose(torch.stack(per_region), 0.5 * explicit, atol=1e-5)


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(1)
    return (rng.random((96, 128, 3)) * 255).astype(np.uint8)


def _segmentor(tiny_clip, *overrides, **kwargs):
    config = apply_overrides(get_preset("open_vocab"), FAST + list(overrides))
    return Segmentor(tiny_clip, config, classes="cat, blanket, wall", cache_dir=None, **kwargs)


def test_vote_with_user_masks_makes_labels_constant_in_each_mask(tiny_clip, image):
    masks = np.zeros((2, 96, 128), dtype=bool)
    masks[0, :, :64] = True
    masks[1, 20:60, 20:50] = True  # inside mask 0: on top with small_on_top
    dense = _segmentor(tiny_clip).predict(image)
    seg = _segmentor(tiny_clip, "mask_use=vote")
    voted = seg.predict(image, masks=masks)
    inner = masks[1]
    outer = masks[0] & ~masks[1]
    assert len(np.unique(voted.labels[inner])) == 1 and len(np.unique(voted.labels[outer])) == 1
    assert np.array_equal(voted.labels[:, 64:], dense.labels[:, 64:])  # uncovered pixels keep their label
    counts = np.bincount(dense.labels[inner], minlength=3)
    assert voted.labels[inner][0] == counts.argmax()
    label_map = np.zeros((96, 128), dtype=np.int64)
    label_map[:, :64] = 5
    label_map[20:60, 20:50] = 9
    from_map = seg.predict(image, masks=label_map)
    assert np.array_equal(from_map.labels, voted.labels)  # the same partition from a label map
    with pytest.raises(MaskError, match="image is 96x128"):
        seg.predict(image, masks=masks[:, :50])


def test_attention_and_proxy_paths_run_through_the_segmentor(tiny_clip, image):
    masks = np.zeros((2, 96, 128), dtype=bool)
    masks[0, :, :64] = True
    masks[1, :, 64:100] = True
    attention = _segmentor(tiny_clip, "mask_use=attention", "mask_final_vote=false")
    scoped = attention.predict(image, masks=masks)
    assert scoped.labels.shape == (96, 128) and np.isfinite(scoped.probs).all()
    assert attention.engine.readout.name == "mask_attention"
    with pytest.raises(MaskError, match="needs masks"):
        attention.predict(image)
    voted = _segmentor(tiny_clip, "mask_use=attention").predict(image, masks=masks)
    assert len(np.unique(voted.labels[masks[0]])) == 1
    pytest.importorskip("timm", reason="the dino extra (timm) is not installed")
    dino = _segmentor(tiny_clip, "mask_use=attention", "mask_correlation=dino", "proxy_checkpoint=random-tiny")
    assert dino.predict(image, masks=masks).labels.shape == (96, 128)
    proxy = _segmentor(tiny_clip, "mask_use=proxy", "proxy_checkpoint=random-tiny")
    result = proxy.predict(image)
    assert proxy.engine.readout.name == "proxy" and np.isfinite(result.probs).all()
    tower = proxy.engine.readout.tower(proxy.engine)
    assert not tower.proxy.model.blocks[-1].attn.qkv._forward_hooks  # no hooks left behind


def test_sam_encoder_proxy_and_bad_settings(tiny_clip, image):
    pytest.importorskip("segment_anything", reason="the sam extra (segment-anything) is not installed")
    proxy = _segmentor(tiny_clip, "mask_use=proxy", "proxy_model=sam_vit_b", "proxy_checkpoint=random-tiny")
    assert np.isfinite(proxy.predict(image).probs).all()
    for setting, message in [("mask_use=both", "mask_use 'both'"), ("mask_order=big", "mask_order"),
                             ("mask_vote=max", "mask_vote"), ("mask_correlation=mae", "mask_correlation"),
                             ("mask_generator=x", "mask_generator"), ("proxy_model=mae", "proxy_model")]:
        with pytest.raises(MaskError, match=message):
            _segmentor(tiny_clip, setting)


def test_segmentor_mask_source_and_its_cache(tiny_clip, image, tmp_path):
    seg = Segmentor(tiny_clip, apply_overrides(get_preset("open_vocab"), FAST), classes="cat, blanket, wall",
                    cache_dir=tmp_path, masks="superpixels")
    assert seg.config.masks == "superpixels"
    first = seg.predict(image)
    assert first.masks is not None and first.regions.shape == (96, 128)
    for region in np.unique(first.regions):
        assert len(np.unique(first.labels[first.regions == region])) == 1  # a partition: every pixel voted
    second = seg.predict(image)
    assert seg.mask_stage.cache.generated == 1 and seg.mask_stage.cache.loaded == 1
    assert np.array_equal(first.labels, second.labels)
    prepared = seg.prepare(image)
    from_prepared = seg.predict_prepared(prepared)  # the source sees the protocol-resized image
    assert from_prepared.masks.size == (96, 128)


def test_dino_proxy_matches_timm_on_the_training_grid_and_resizes_like_dino():
    pytest.importorskip("timm", reason="the dino extra (timm) is not installed")
    from itaclip_core.masks.proxy import DinoProxy, _imagenet

    proxy = DinoProxy("dino_vitb8", "random-tiny:3")
    torch.manual_seed(0)
    images = torch.randn(2, 3, 224, 224)
    features, grid = proxy.features(images)
    assert grid == (28, 28)
    assert torch.allclose(features, proxy.model.forward_features(_imagenet(images, 8))[:, 1:], atol=1e-5)
    captured = []
    handle = proxy.model.blocks[-1].attn.qkv.register_forward_hook(lambda _m, _i, out: captured.append(out))
    proxy.model.forward_features(_imagenet(images, 8))
    handle.remove()
    correlation, _ = proxy.correlation(images)
    width = correlation.shape[-1]
    assert torch.allclose(correlation, captured[0][:, 1:, :width] + captured[0][:, 1:, width: 2 * width], atol=1e-5)
    # Off the training grid: DINO's bicubic resize with the +0.1 offset, not timm's exact-size resampling.
    pos = proxy.positional_embedding(15, 12)
    base = proxy.model.pos_embed[:, 1:].reshape(1, 28, 28, -1).permute(0, 3, 1, 2)
    expected = F.interpolate(base, scale_factor=(15.1 / 28, 12.1 / 28), mode="bicubic")
    assert torch.allclose(pos[0, 1:], expected[0].flatten(1).T, atol=1e-6)
    assert proxy.features(torch.randn(1, 3, 120, 100))[0].shape == (1, 15 * 12, 64)
