"""CLIP's byte-pair-encoding tokenizer.

Text is cleaned (ftfy, HTML entities, whitespace), lower-cased, split into words by a regular expression, each
word's UTF-8 bytes are mapped to printable characters, and byte pairs are merged in the order of the merge list
shipped with CLIP (`bpe_simple_vocab_16e6.txt.gz`). Ids 49406 and 49407 are the start and end tokens.
"""

from __future__ import annotations

import gzip
import html
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

import ftfy
import regex
import torch

from itaclip_core.resources import bpe_vocab_path
from itaclip_core.errors import UserError

START_TOKEN = "<|startoftext|>"
END_TOKEN = "<|endoftext|>"
# The merge list holds 49152 - 256 - 2 merges after its header line.
NUM_MERGES = 49152 - 256 - 2
_NO_RANK = float("inf")

_WORD_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)


class TokenizerError(UserError, ValueError):
    """A text cannot be tokenised as asked (for example it is longer than the context)."""


@lru_cache(maxsize=1)
def byte_to_char() -> dict[int, str]:
    """A reversible map from the 256 byte values to printable unicode characters.

    Printable Latin-1 bytes map to themselves; the others take code points from 256 upwards, in byte order.
    The dict's order (printable bytes first) is the order of the first 256 vocabulary entries.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\u00a1"), ord("\u00ac") + 1))
        + list(range(ord("\u00ae"), ord("\u00ff") + 1))
    )
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _clean(text: str) -> str:
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    return regex.sub(r"\s+", " ", text.strip()).strip()


class SimpleTokenizer:
    """Byte-level BPE with CLIP's vocabulary."""

    def __init__(self, vocab_path: str | Path | None = None) -> None:
        path = Path(vocab_path) if vocab_path is not None else bpe_vocab_path()
        with gzip.open(path, "rt", encoding="utf-8") as handle:
            lines = handle.read().split("\n")
        merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
        byte_chars = list(byte_to_char().values())
        vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
        vocab += [START_TOKEN, END_TOKEN]
        self.encoder: dict[str, int] = {token: i for i, token in enumerate(vocab)}
        self.decoder: dict[int, str] = {i: token for token, i in self.encoder.items()}
        self.merge_rank: dict[tuple[str, str], int] = {pair: i for i, pair in enumerate(merges)}
        self.byte_encoder = byte_to_char()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.start_id = self.encoder[START_TOKEN]
        self.end_id = self.encoder[END_TOKEN]
        self._cache: dict[str, list[str]] = {START_TOKEN: [START_TOKEN], END_TOKEN: [END_TOKEN]}

    def _bpe(self, word: str) -> list[str]:
        """Merge the characters of one (byte-mapped) word into vocabulary tokens."""
        cached = self._cache.get(word)
        if cached is not None:
            return cached
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:
            pairs = set(zip(symbols, symbols[1:]))
            best = min(pairs, key=lambda pair: self.merge_rank.get(pair, _NO_RANK))
            if best not in self.merge_rank:
                break
            first, second = best
            merged: list[str] = []
            i = 0
            while i < len(symbols):
                if i < len(symbols) - 1 and symbols[i] == first and symbols[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        self._cache[word] = symbols
        return symbols

    def encode(self, text: str) -> list[int]:
        """Token ids of a text, without start and end tokens."""
        ids: list[int] = []
        for word in _WORD_PATTERN.findall(_clean(text).lower()):
            mapped = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
            ids.extend(self.encoder[token] for token in self._bpe(mapped))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of token ids (start, end and padding ids are dropped)."""
        tokens = [self.decoder[int(i)] for i in ids if int(i) not in (0, self.start_id, self.end_id)]
        text = "".join(tokens)
        data = bytearray(self.byte_decoder[c] for c in text)
        return data.decode("utf-8", errors="replace").replace("</w>", " ").strip()


@lru_cache(maxsize=1)
def get_tokenizer() -> SimpleTokenizer:
    """The shared tokenizer (the vocabulary is read once per process)."""
    return SimpleTokenizer()


def tokenize(texts: str | Sequence[str], context_length: int = 77, truncate: bool = False) -> torch.Tensor:
    """Token ids of `texts` as a (N, context_length) int64 tensor, zero-padded.

    Args:
        texts: one text or a sequence of texts.
        context_length: the model's context (77 for every OpenAI CLIP).
        truncate: cut texts that are too long, keeping the end token as the last id; otherwise such a text raises
            `TokenizerError` naming it.
    """
    if isinstance(texts, str):
        texts = [texts]
    tokenizer = get_tokenizer()
    result = torch.zeros(len(texts), context_length, dtype=torch.long)
    for row, text in enumerate(texts):
        ids = [tokenizer.start_id] + tokenizer.encode(text) + [tokenizer.end_id]
        if len(ids) > context_length:
            if not truncate:
                shown = text if len(text) <= 120 else text[:117] + "..."
                raise TokenizerError(
                    f"the text {shown!r} is {len(ids)} tokens long, more than the context of {context_length}; "
                    "shorten it (or tokenize with truncate=True)"
                )
            ids = ids[:context_length]
            ids[-1] = tokenizer.end_id
        result[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return result
