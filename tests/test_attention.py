"""Attention variants and the dense readout: golden parity, fast vs explicit paths, registry."""

from __future__ import annotations

import pytest
import torch

from itaclip_core.attention import (
    ATTENTION_VARIANTS,
    DENSE_METHODS,
    AttentionContext,
    AttentionVariant,
    DenseConfig,
    attention_maps,
    dense_tokens,
    get_attention,
    register_attention,
)

ITACLIP_QK = DenseConfig(variant="qk", fuse_blocks=(7, 8, 10), fuse_weight=0.5, last_mlp=False)

GOLDEN_CASES = [
    ("itaclip_dense_selfself_224", "image_224", DENSE_METHODS["itaclip"]),
    ("itaclip_dense_selfself_240x320", "image_240x320", DENSE_METHODS["itaclip"]),
    ("itaclip_dense_qk_224", "image_224", ITACLIP_QK),
    ("sclip_dense_csa_224", "image_224", DENSE_METHODS["sclip"]),
    ("sclip_dense_csa_240x320", "image_240x320", DENSE_METHODS["sclip"]),
]


@pytest.mark.parametrize("explicit", [False, True], ids=["fused-kernels", "explicit-maps"])
@pytest.mark.parametrize("key,image,config", GOLDEN_CASES, ids=[c[0] for c in GOLDEN_CASES])
def test_dense_tokens_match_the_published_code(tiny_clip, golden_forward, key, image, config, explicit):
    with torch.no_grad():
        out = dense_tokens(tiny_clip.visual, golden_forward[image], config, explicit=explicit)
    expected = golden_forward[key]
    assert out.shape == expected.shape
    assert (out - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize("name", sorted(ATTENTION_VARIANTS))
def test_fast_path_equals_explicit_map(name):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 17, 8) for _ in range(3))
    # 17 tokens: the class token and a 4x4 grid; extras as a dense readout would provide them
    context = AttentionContext(rows=4, cols=4, extras={"sfr_affinity": torch.rand(2, 1, 17, 17)})
    cls = ATTENTION_VARIANTS[name]
    variant = get_attention(name, **{p: 0.7 for p in cls.settings})
    attention = variant.attention_map(q, k, context)
    assert attention.shape == (2, 3, 17, 17)
    assert torch.allclose(variant.apply(q, k, v, context), attention @ v, atol=1e-5)


def test_self_self_map_rows_sum_to_two_and_qk_to_one():
    torch.manual_seed(1)
    q, k = torch.randn(1, 2, 9, 4), torch.randn(1, 2, 9, 4)
    assert torch.allclose(get_attention("selfself").attention_map(q, k).sum(-1), torch.full((1, 2, 9), 2.0))
    assert torch.allclose(get_attention("qk").attention_map(q, k).sum(-1), torch.ones(1, 2, 9))


def test_plain_clip_readout_is_the_unmodified_tower(tiny_clip, golden_forward):
    images = golden_forward["image_224"]
    with torch.no_grad():
        dense = dense_tokens(tiny_clip.visual, images, DENSE_METHODS["clip"])
        cls = tiny_clip.encode_image(images)
    assert torch.allclose(dense[:, 0], cls, atol=1e-5)


def test_attention_maps_expose_the_fused_map(tiny_clip, golden_forward):
    with torch.no_grad():
        maps = attention_maps(tiny_clip.visual, golden_forward["image_224"][:1], DENSE_METHODS["itaclip"])
    assert set(maps) == {"block7", "block8", "block10", "last", "fused"}
    mean_blocks = (maps["block7"] + maps["block8"] + maps["block10"]) / 3
    assert torch.allclose(maps["fused"], 0.5 * maps["last"] + 0.5 * mean_blocks, atol=1e-6)
    assert maps["fused"].shape == (1, 2, 197, 197)


def test_adding_a_variant_is_one_class(tiny_clip, golden_forward):
    @register_attention("uniform-test")
    class Uniform(AttentionVariant):
        def attention_map(self, q, k):
            n = q.shape[-2]
            return torch.full((*q.shape[:-1], n), 1.0 / n, dtype=q.dtype)

    try:
        config = DenseConfig(variant="uniform-test", last_mlp=False)
        with torch.no_grad():
            out = dense_tokens(tiny_clip.visual, golden_forward["image_224"][:1], config)
        assert out.shape == (1, 197, 64)
        with pytest.raises(ValueError, match="already registered"):
            register_attention("uniform-test")(Uniform)
    finally:
        ATTENTION_VARIANTS.pop("uniform-test")


def test_earlier_blocks_can_use_another_variant(tiny_clip, golden_forward):
    images = golden_forward["image_224"][:1]
    base = DENSE_METHODS["sclip"]
    changed = DenseConfig(variant="selfself", block_variants=((11, "selfself"),))
    with torch.no_grad():
        a = dense_tokens(tiny_clip.visual, images, base)
        b = dense_tokens(tiny_clip.visual, images, changed)
    assert not torch.allclose(a, b, atol=1e-3)


def test_bad_configurations_are_refused(tiny_clip, golden_forward):
    images = golden_forward["image_224"][:1]
    with pytest.raises(ValueError, match="unknown attention variant 'nope'"):
        dense_tokens(tiny_clip.visual, images, DenseConfig(variant="nope"))
    with pytest.raises(ValueError, match="fuse_blocks must name blocks 1..11"):
        dense_tokens(tiny_clip.visual, images, DenseConfig(fuse_blocks=(12,)))
    with pytest.raises(ValueError, match="fuse_weight"):
        dense_tokens(tiny_clip.visual, images, DenseConfig(fuse_blocks=(7,), fuse_weight=1.5))
