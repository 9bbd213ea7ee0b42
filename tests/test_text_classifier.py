"""The text classifier: equal to the straightforward construction, cached on disk, clear errors."""

from __future__ import annotations

import pytest
import torch

from itaclip_core import reference
from itaclip_core.text import classifier as classifier_module
from itaclip_core.text.classes import parse_class_list, read_aux_file, read_class_file
from itaclip_core.text.classifier import build_classifier, encode_texts, load_templates
from itaclip_core.text.tokenizer import TokenizerError


@pytest.fixture(scope="module")
def templates():
    return load_templates()


def test_templates_are_the_80_published_ones(templates):
    assert len(templates) == 80
    assert templates[0] == "a bad photo of a {}." and all(t.count("{}") == 1 for t in templates)


def test_batched_trimmed_encoding_equals_one_full_length_batch_per_text(tiny_clip, templates):
    texts = ["cat", "television monitor", "a winged machine that flies through the air carrying passengers"]
    fast = encode_texts(tiny_clip, texts, templates, batch_size=37)
    slow = reference.text_features(tiny_clip, texts, templates)
    assert fast.shape == (3, 64)
    assert (fast - slow).abs().max().item() < 1e-5


def test_background_variants_are_not_mixed_and_others_are(tiny_clip, templates, golden_dir):
    vocab = read_class_file(golden_dir.parent.parent / "texts" / "class_names" / "itaclip" / "cls_voc21.txt")
    aux = [text for _, text in read_aux_file(golden_dir / "voc20_definitions_sample.txt")]
    sub = parse_class_list([list(vocab.variants[0][:3]), list(vocab.variants[1]), list(vocab.variants[3])])
    sub_aux = [aux[0], aux[2]]
    fast = build_classifier(tiny_clip, sub, templates, sub_aux, aux_coef=0.3, background=True)
    slow = reference.classifier(tiny_clip, sub, templates, sub_aux, aux_coef=0.3, background=True)
    assert torch.equal(fast.query_to_class, slow.query_to_class)
    assert (fast.features - slow.features).abs().max().item() < 1e-5
    names = encode_texts(tiny_clip, sub.queries, templates)
    assert torch.allclose(fast.features[:3], names[:3], atol=1e-6)  # background kept
    assert not torch.allclose(fast.features[3], names[3], atol=1e-3)  # mixed
    assert fast.features[3].norm().item() < 1.0  # the mix is not renormalised


def test_disk_cache_makes_a_second_build_encode_nothing(tiny_clip, templates, tmp_path, monkeypatch):
    vocab = parse_class_list("cat, dog|puppy, sky")
    first = build_classifier(tiny_clip, vocab, templates, cache_dir=tmp_path)
    calls = []
    original = classifier_module._encode_uncached
    monkeypatch.setattr(classifier_module, "_encode_uncached", lambda *a, **k: calls.append(a[1]) or original(*a, **k))
    second = build_classifier(tiny_clip, vocab, templates, cache_dir=tmp_path)
    assert calls == []
    assert torch.equal(first.features, second.features)
    build_classifier(tiny_clip, parse_class_list("cat, tree"), templates, cache_dir=tmp_path)
    assert calls == [["tree"]]  # only the new text is encoded


def test_cache_is_keyed_by_the_weights(tiny_clip, templates, tmp_path):
    from itaclip_core import load_clip

    other = load_clip("random-tiny", device="cpu")
    a = encode_texts(tiny_clip, ["cat"], templates, cache_dir=tmp_path)
    b = encode_texts(other, ["cat"], templates, cache_dir=tmp_path)
    assert not torch.allclose(a, b, atol=1e-3)


def test_damaged_cache_file_is_recomputed(tiny_clip, templates, tmp_path):
    a = encode_texts(tiny_clip, ["cat"], templates, cache_dir=tmp_path)
    for path in (tmp_path / "text_features").iterdir():
        path.write_bytes(b"broken")
    b = encode_texts(tiny_clip, ["cat"], templates, cache_dir=tmp_path)
    assert torch.equal(a, b)


def test_text_too_long_for_the_templates_is_named(tiny_clip, templates):
    long_name = "very " * 70 + "long class"
    with pytest.raises(TokenizerError, match="the class text 'very very"):
        encode_texts(tiny_clip, ["cat", long_name], templates)
    truncated = encode_texts(tiny_clip, [long_name], templates, truncate=True)
    assert truncated.shape == (1, 64)


@pytest.mark.parametrize("strategy", ["_encode_per_template", "_encode_sorted"])
def test_both_batching_strategies_equal_the_straightforward_encoding(tiny_clip, templates, strategy):
    from itaclip_core.text.tokenizer import tokenize as tok

    texts = ["cat", "a winged machine that flies through the air", "sky", "television monitor", "Cat"]
    tokens = tok([classifier_module.fill_template(t, x) for x in texts for t in templates]).view(5, 80, -1)
    encode = getattr(classifier_module, strategy)
    per_prompt = encode(tiny_clip, tokens, 3, False)  # (texts, templates, D)
    ours = torch.nn.functional.normalize(per_prompt.mean(dim=1), dim=-1)
    assert (ours - reference.text_features(tiny_clip, texts, templates)).abs().max().item() < 1e-5
