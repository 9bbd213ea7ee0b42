"""The text classifier: one embedding per class-name variant, optionally mixed with auxiliary texts.

Each text (a name variant, or a definition / synonym list) is put into every prompt template; the prompts are encoded,
each embedding L2-normalised, averaged over the templates and normalised again. With auxiliary texts, every variant
of a non-background class becomes `(1 - c) * name + c * aux` (not renormalised); background variants keep their own
embedding. This is the published ITACLIP / SCLIP construction.

Speed without changing the result (both rest on the text tower's causal mask):
- prompts are batched by length and each batch is run only up to its longest end-of-text token: nothing after a
  prompt's end token can reach it;
- on the CPU, prompts are also grouped by template: the tokens a template puts before the text
  (`<start> a photo of a`) are the same for every text, so they are run once per batch and their keys and values
  reused (`CLIP.encode_text_shared_prefix`). On a GPU, where launches rather than arithmetic set the pace, all
  prompts go in a few large batches instead;
- embeddings are cached on disk per text, keyed by the weights' identity, the dtype and the templates, so a second
  run with the same texts encodes nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from itaclip_core.errors import short
from itaclip_core.model.clip import CLIP
from itaclip_core.text.classes import ClassVocabulary, TextFileError, display_names
from itaclip_core.text.tokenizer import TokenizerError, get_tokenizer, tokenize
from itaclip_core.timing import timed

DEFAULT_TEMPLATES = "templates/openai_imagenet_templates.txt"


def load_templates(path: str | Path | None = None) -> list[str]:
    """Prompt templates, one per line with `{}` where the text goes (default: OpenAI's 80 ImageNet templates)."""
    from itaclip_core.validation import find_text_file

    source = find_text_file(path or DEFAULT_TEMPLATES)
    if source is None:
        raise TextFileError(f"template file {str(path)!r} not found (neither as a path nor under the texts/ folder)",
                            cli=f"--set templates={path}: no such file (neither as a path nor under texts/)")
    templates = [line for line in source.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    bad = [t for t in templates if t.count("{}") != 1]
    if not templates or bad:
        raise TextFileError(f"{source}: every template needs exactly one '{{}}' (offending: {bad[:3]})")
    return templates


def fill_template(template: str, text: str) -> str:
    return template.replace("{}", text)


@dataclass
class TextClassifier:
    """What the image side is compared with: one row per query (name variant)."""

    features: torch.Tensor  # (Q, D) float32, the (mixed) query embeddings
    query_to_class: torch.Tensor  # (Q,) int64, the class of each query
    class_names: list[str]  # display name per class
    queries: list[str]  # the name variant of each row

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to(self, device: torch.device | str) -> "TextClassifier":
        return TextClassifier(self.features.to(device), self.query_to_class.to(device), self.class_names, self.queries)


def _bank_path(cache_dir: Path, model: CLIP, templates: Sequence[str]) -> Path:
    key = json.dumps({"weights": model.weights_id, "dtype": str(model.dtype), "templates": list(templates)})
    return cache_dir / "text_features" / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.pt"


def _load_bank(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        return {}
    try:
        bank = torch.load(path, map_location="cpu", weights_only=True)
        return bank if isinstance(bank, dict) else {}
    except Exception:  # a damaged cache file is recomputed, never trusted
        return {}


def _save_bank(path: Path, bank: dict[str, torch.Tensor]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, suffix=".part")
    os.close(handle)
    try:
        torch.save(bank, tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _length_batches(tokens: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Row indices of `tokens` (N, context) sorted by end-of-text position, in batches of at most `batch_size`.

    Sorting keeps each batch's attention padding small; the per-token work does not depend on the batching
    (`CLIP.encode_text_shared_prefix` packs the rows' real tokens).
    """
    order = torch.argsort(tokens.argmax(dim=-1), stable=True)
    return list(order.split(batch_size))


def _encode_per_template(model: CLIP, tokens: torch.Tensor, batch_size: int, progress: bool) -> torch.Tensor:
    """(T, templates, D) normalised prompt embeddings, computed per template with the shared prefix run once and
    each prompt run only to its own end-of-text token.

    Fewest operations: suited to the CPU, where time follows the amount of arithmetic.
    """
    texts, templates, _ = tokens.shape
    embeddings = torch.empty(texts, templates, model.config.embed_dim, dtype=torch.float32)
    batches = [(t, rows) for t in range(templates) for rows in _length_batches(tokens[:, t], batch_size)]
    for template, rows in tqdm(batches, desc="text prompts", disable=not progress, leave=False):
        group = tokens[rows, template]  # (n, context): one template, several texts, similar lengths
        differs = (group != group[:1]).any(dim=0)
        shared = int(differs.float().argmax()) if differs.any() else group.shape[1]
        shared = min(shared, int(group.argmax(dim=-1).min()))  # every end-of-text token stays in the suffix
        out = model.encode_text_shared_prefix(group.to(model.device), shared).float()
        embeddings[rows, template] = F.normalize(out, dim=-1).cpu()
    return embeddings


def _encode_sorted(model: CLIP, tokens: torch.Tensor, batch_size: int, progress: bool) -> torch.Tensor:
    """(T, templates, D) normalised prompt embeddings from large batches of all prompts sorted by length, each run
    to its longest end-of-text token rounded up to a multiple of 16.

    Fewest and most regular launches: suited to GPUs, where many small, differently shaped batches cost more than
    the arithmetic they save.
    """
    texts, templates, context = tokens.shape
    flat = tokens.view(texts * templates, context)
    order = torch.argsort(flat.argmax(dim=-1), stable=True)
    embeddings = torch.empty(flat.shape[0], model.config.embed_dim, dtype=torch.float32, device=model.device)
    for start in tqdm(range(0, len(order), batch_size), desc="text prompts", disable=not progress, leave=False):
        index = order[start : start + batch_size]
        batch = flat[index]
        length = min(context, -(-int(batch.argmax(dim=-1).max() + 1) // 16) * 16)
        out = model.encode_text(batch[:, :length].to(model.device), trim=False).float()
        embeddings[index.to(model.device)] = F.normalize(out, dim=-1)
    return embeddings.cpu().view(texts, templates, -1)


@torch.no_grad()
def _encode_uncached(
    model: CLIP, texts: list[str], templates: Sequence[str], batch_size: int, truncate: bool, progress: bool
) -> torch.Tensor:
    """Template-averaged, normalised embeddings (T, D) float32 of `texts`."""
    prompts = [fill_template(t, text) for text in texts for t in templates]
    try:
        tokens = tokenize(prompts, context_length=model.context_length, truncate=truncate)
    except TokenizerError:
        for text in texts:  # name the offending class text, not just one of its prompts
            try:
                tokenize([fill_template(t, text) for t in templates], model.context_length, truncate=truncate)
            except TokenizerError:
                longest = max(_prompt_length(fill_template(t, text)) for t in templates)
                raise _too_long(text, longest, model.context_length) from None
        raise
    grouped = tokens.view(len(texts), len(templates), -1)  # (T, templates, context)
    if model.device.type == "cuda":
        embeddings = _encode_sorted(model, grouped, batch_size, progress)
    else:
        embeddings = _encode_per_template(model, grouped, batch_size, progress)
    per_text = embeddings.mean(dim=1)  # (T, D)
    return F.normalize(per_text, dim=-1)


def encode_texts(
    model: CLIP,
    texts: Sequence[str],
    templates: Sequence[str],
    batch_size: int | None = None,
    truncate: bool = False,
    cache_dir: str | Path | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Template-averaged, L2-normalised embeddings (T, D) float32 of `texts`, on the CPU.

    Args:
        model: the CLIP whose text tower encodes the prompts.
        texts: class-name variants or auxiliary texts.
        templates: prompt templates with `{}`.
        batch_size: prompts (texts of one template) per forward pass; None: 256 on CPU, 1024 on GPU.
        truncate: cut prompts longer than the context instead of raising an error naming the text.
        cache_dir: where embeddings are cached (`None`: no cache).
        progress: show a progress bar over prompt batches.
    """
    unique = list(dict.fromkeys(texts))
    bank: dict[str, torch.Tensor] = {}
    bank_file = None
    if cache_dir is not None and model.weights_id != "unknown":
        bank_file = _bank_path(Path(cache_dir), model, templates)
        bank = _load_bank(bank_file)
        if truncate:
            bank = {}  # truncated embeddings are not cached under the plain key
    if batch_size is None:
        batch_size = 1024 if model.device.type == "cuda" else 256
    missing = [text for text in unique if text not in bank]
    if missing:
        fresh = _encode_uncached(model, missing, templates, batch_size, truncate, progress)
        bank.update({text: fresh[i].clone() for i, text in enumerate(missing)})
        if bank_file is not None and not truncate:
            _save_bank(bank_file, {**_load_bank(bank_file), **bank})
    return torch.stack([bank[text] for text in texts]) if texts else torch.empty(0, model.config.embed_dim)


@timed("text classifier")
def build_classifier(
    model: CLIP,
    vocab: ClassVocabulary,
    templates: Sequence[str],
    aux_texts: Sequence[str] | None = None,
    aux_coef: float = 0.0,
    background: bool = False,
    batch_size: int | None = None,
    truncate: bool = False,
    cache_dir: str | Path | None = None,
    progress: bool = False,
) -> TextClassifier:
    """The text classifier of a class vocabulary.

    Args:
        aux_texts: one auxiliary text per non-background class, in class order (or None).
        aux_coef: weight of the auxiliary embedding in `(1 - c) * name + c * aux`.
        background: class 0 is background; its variants are not mixed and `aux_texts` skips it.
        (other arguments as in `encode_texts`)
    """
    queries = vocab.queries
    query_to_class = vocab.query_to_class
    if aux_texts is not None:
        expected = vocab.num_classes - (1 if background else 0)
        if len(aux_texts) != expected:
            raise TextFileError(
                f"{len(aux_texts)} auxiliary texts for {expected} {'non-background ' if background else ''}classes"
            )
    texts = list(queries) + (list(aux_texts) if aux_texts is not None else [])
    embeddings = encode_texts(model, texts, templates, batch_size, truncate, cache_dir, progress)
    features = embeddings[: len(queries)].clone()
    if aux_texts is not None:
        aux = embeddings[len(queries) :]
        for row, cls in enumerate(query_to_class):
            if background and cls == 0:
                continue
            features[row] = (1.0 - aux_coef) * features[row] + aux_coef * aux[cls - 1 if background else cls]
    return TextClassifier(features, torch.tensor(query_to_class, dtype=torch.long), display_names(vocab, background),
                          list(queries))  # fmt: skip


def _prompt_length(prompt: str) -> int:
    """Tokens of one prompt, with its start and end tokens."""
    return len(get_tokenizer().encode(prompt)) + 2


def _too_long(text: str, tokens: int, context_length: int) -> TokenizerError:
    message = (f"the class text {short(text, 50)!r} makes prompts of {tokens} tokens, more than CLIP's "
               f"{context_length}-token context: shorten it")  # fmt: skip
    return TokenizerError(message + ", or cut such prompts with truncate_texts=True",
                          cli=message + ", or cut such prompts with --set truncate_texts=true")


def check_prompt_lengths(texts: Sequence[str], templates: Sequence[str], context_length: int = 77) -> None:
    """Refuse texts whose prompts would not fit the context, before any model is loaded (cheap: each text is
    tokenised once, inside the template that adds the most tokens).

    Raises:
        TokenizerError: naming the first such text and the `truncate_texts` setting that cuts it instead.
    """
    if not templates:
        return
    widest = max(templates, key=lambda t: _prompt_length(fill_template(t, "x")))
    for text in texts:
        tokens = _prompt_length(fill_template(widest, text))
        if tokens > context_length:
            raise _too_long(text, tokens, context_length)
