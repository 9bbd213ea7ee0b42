"""Every shipped definition and synonym list fits CLIP's 77-token context inside every prompt template, so the
presets never need truncation (a text that does not fit is refused when the classifier is built)."""

from __future__ import annotations

import pytest

from itaclip_core.resources import texts_dir
from itaclip_core.text.classes import read_aux_file
from itaclip_core.text.classifier import fill_template, load_templates
from itaclip_core.text.tokenizer import get_tokenizer

AUX_FILES = sorted(p.relative_to(texts_dir()) for kind in ("definitions", "synonyms")
                   for p in (texts_dir() / kind).glob("*.txt"))


def test_every_benchmark_has_definitions_and_synonyms():
    names = {p.stem for p in AUX_FILES}
    for benchmark in ("voc20", "voc21", "context59", "context60", "coco_object", "coco_stuff", "cityscapes", "ade20k"):
        assert benchmark in names
    assert len(AUX_FILES) == 2 * len(names)


@pytest.mark.parametrize("relative", AUX_FILES, ids=str)
def test_aux_texts_fit_in_every_template(relative):
    tokenizer = get_tokenizer()
    templates = load_templates()
    too_long = []
    for name, text in read_aux_file(texts_dir() / relative):
        longest = max(len(tokenizer.encode(fill_template(t, text))) + 2 for t in templates)  # + start and end
        if longest > 77:
            too_long.append((name, longest))
    assert not too_long, f"{relative}: prompts longer than 77 tokens: {too_long}"
