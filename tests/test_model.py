"""CLIP model: parity with OpenAI's outputs, architecture from shapes, dtypes, positional embeddings."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from itaclip_core import create_random_clip, load_clip, random_clip_state_dict
from itaclip_core.model import config_from_state_dict
from itaclip_core.model.random import RANDOM_SIZES


def test_encode_text_matches_openai(tiny_clip, golden_forward):
    with torch.no_grad():
        out = tiny_clip.encode_text(golden_forward["text_tokens"])
    assert out.shape == golden_forward["encode_text"].shape
    assert (out - golden_forward["encode_text"]).abs().max().item() < 1e-5


def test_trimmed_text_encoding_equals_full_length(tiny_clip, golden_forward):
    with torch.no_grad():
        trimmed = tiny_clip.encode_text(golden_forward["text_tokens"], trim=True)
        full = tiny_clip.encode_text(golden_forward["text_tokens"], trim=False)
    assert (trimmed - full).abs().max().item() < 1e-5


def test_encode_image_matches_openai(tiny_clip, golden_forward):
    with torch.no_grad():
        out = tiny_clip.encode_image(golden_forward["image_224"])
    assert out.shape == golden_forward["encode_image_cls_224"].shape
    assert (out - golden_forward["encode_image_cls_224"]).abs().max().item() < 1e-5


def test_logit_scale_and_architecture_are_read_from_shapes(tiny_clip, golden_forward):
    assert tiny_clip.logit_scale.item() == pytest.approx(golden_forward["logit_scale"].item())
    config = tiny_clip.config
    assert (config.vision_width, config.vision_layers, config.vision_heads, config.patch_size) == (128, 12, 2, 16)
    assert (config.text_width, config.text_layers, config.text_heads, config.embed_dim) == (64, 12, 1, 64)
    assert config.image_size == 224 and config.context_length == 77 and config.vocab_size == 49408


@pytest.mark.parametrize("size", ["tiny", "vit-b-16", "vit-b-32"])
def test_random_sizes_round_trip_through_shape_inference(size):
    state = random_clip_state_dict(size, seed=0)
    assert config_from_state_dict(state) == RANDOM_SIZES[size]


def test_random_clip_is_seeded():
    a = random_clip_state_dict("tiny", seed=3)
    b = random_clip_state_dict("tiny", seed=3)
    c = random_clip_state_dict("tiny", seed=4)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["visual.conv1.weight"], c["visual.conv1.weight"])
    model = load_clip("random-tiny:3", device="cpu")
    assert model.weights_id == "random-tiny:3"
    assert torch.equal(model.visual.conv1.weight, a["visual.conv1.weight"])


def test_positional_embedding_is_resized_for_other_grids(tiny_clip):
    visual = tiny_clip.visual
    assert visual.positional_embedding_for(14, 14) is visual.positional_embedding
    resized = visual.positional_embedding_for(15, 20)
    assert resized.shape == (1 + 15 * 20, 128)
    assert torch.equal(resized[0], visual.positional_embedding[0])  # class position kept
    # Bicubic resizing of a constant grid keeps it constant (a property an index mix-up would break).
    with torch.no_grad():
        saved = visual.positional_embedding.clone()
        visual.positional_embedding[1:] = 0.25
        try:
            assert torch.allclose(visual.positional_embedding_for(9, 31)[1:], torch.full((279, 128), 0.25))
        finally:
            visual.positional_embedding.copy_(saved)


def test_non_square_and_small_images_run(tiny_clip):
    with torch.no_grad():
        tokens, _ = tiny_clip.visual.forward_intermediates(torch.randn(1, 3, 100, 80))
    assert tokens.shape == (1, 1 + 6 * 5, 128)
    with pytest.raises(ValueError, match="smaller than one 16-px patch"):
        tiny_clip.visual.embed(torch.randn(1, 3, 10, 40))


def test_forward_intermediates_returns_requested_blocks(tiny_clip, golden_forward):
    images = golden_forward["image_224"]
    with torch.no_grad():
        last, outs = tiny_clip.visual.forward_intermediates(images, indices=(0, 11))
        x = tiny_clip.visual.embed(images)
        first = tiny_clip.visual.blocks[0](x)
    assert len(outs) == 2
    assert torch.allclose(outs[0], first, atol=1e-6)
    assert torch.equal(outs[1], last)


def test_half_precision_casts_like_openai():
    model = create_random_clip("tiny", dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    assert model.visual.ln_pre.weight.dtype == torch.float32  # layer norms stay float32, as in OpenAI's fp16 models
    assert model.token_embedding.weight.dtype == torch.float32
    reference = create_random_clip("tiny")
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        low = model.encode_image(images).float()
        high = reference.encode_image(images)
    cosine = F.cosine_similarity(low, high, dim=-1)
    assert cosine.min().item() > 0.99


def test_forward_gives_scaled_cosine_logits(tiny_clip, golden_forward):
    with torch.no_grad():
        per_image, per_text = tiny_clip(golden_forward["image_224"], golden_forward["text_tokens"])
    image = F.normalize(golden_forward["encode_image_cls_224"], dim=-1)
    text = F.normalize(golden_forward["encode_text"], dim=-1)
    expected = math.exp(golden_forward["logit_scale"].item()) * image @ text.T
    assert torch.allclose(per_image, expected, atol=1e-3)
    assert torch.equal(per_text, per_image.T)


def test_shared_prefix_encoding_equals_plain_encoding(tiny_clip):
    from itaclip_core import tokenize

    prompts = [f"a bad photo of a {name}." for name in ["cat", "television monitor", "dog that runs in the park", "x"]]
    tokens = tokenize(prompts)
    assert torch.equal(tokens[:, :6], tokens[:1, :6].expand(4, -1))  # <start> a bad photo of a
    with torch.no_grad():
        plain = tiny_clip.encode_text(tokens)
        for prefix in (1, 3, 6):
            shared = tiny_clip.encode_text_shared_prefix(tokens, prefix)
            assert (shared - plain).abs().max().item() < 1e-5
        # A prefix that would swallow an end-of-text token falls back to the plain path.
        assert torch.allclose(tiny_clip.encode_text_shared_prefix(tokens, 9), plain, atol=1e-5)


def test_quick_gelu_inference_form_is_bit_identical():
    from itaclip_core.model.clip import QuickGELU

    x = torch.randn(64, 512, generator=torch.Generator().manual_seed(0)) * 4
    original = x.clone()
    expected = x * torch.sigmoid(1.702 * x)
    with torch.no_grad():
        assert torch.equal(QuickGELU()(x), expected)
    assert torch.equal(x, original)  # the input is left as it was
    trained = x.clone().requires_grad_(True)
    out = QuickGELU()(trained)
    assert torch.equal(out.detach(), expected) and out.requires_grad
