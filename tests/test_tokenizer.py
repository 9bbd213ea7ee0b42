"""The BPE tokenizer against the ids of OpenAI's tokenizer."""

from __future__ import annotations

import json

import pytest
import torch

from itaclip_core import tokenize
from itaclip_core.text.tokenizer import TokenizerError, get_tokenizer


@pytest.fixture(scope="module")
def golden(golden_dir):
    return json.loads((golden_dir / "tokenizer_golden.json").read_text())


def test_every_golden_case_is_reproduced(golden):
    texts = [case["text"] for case in golden["cases"]]
    tokens = tokenize(texts, context_length=golden["context_length"])
    assert tokens.shape == (len(texts), 77) and tokens.dtype == torch.long
    mismatches = []
    for row, case in zip(tokens, golden["cases"]):
        ids = row[: int((row != 0).sum())].tolist()
        if ids != case["ids"]:
            mismatches.append((case["text"], ids, case["ids"]))
        assert row[len(case["ids"]) :].eq(0).all(), "padding must be zeros"
    assert not mismatches, mismatches[:3]


def test_truncated_case(golden):
    case = golden["truncated"]
    tokens = tokenize(case["text"], truncate=True)[0].tolist()
    assert tokens == case["ids"]
    assert tokens[-1] == get_tokenizer().end_id


def test_too_long_text_is_refused_with_its_text(golden):
    text = golden["truncated"]["text"]
    with pytest.raises(TokenizerError, match="segmentation segmentation"):
        tokenize(["a cat", text])


def test_single_string_and_decode_round_trip():
    tokens = tokenize("A photo of a Dog.")
    assert tokens.shape == (1, 77)
    assert get_tokenizer().decode(tokens[0].tolist()) == "a photo of a dog ."
