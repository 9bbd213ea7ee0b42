"""A local chat model run through Hugging Face transformers (an optional dependency, imported only here and
only when a model is loaded), answering one prompt at a time.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from itaclip_core.errors import UserError

LLM_INSTALL_HINT = "pip install itaclip-core[llm]"


class GenerationError(UserError, RuntimeError):
    """The chat model could not be loaded or run."""


class MissingLLMDependencyError(UserError, ImportError):
    """transformers, needed to run a chat model, is not installed."""


@dataclass(frozen=True)
class Decoding:
    """How one answer is decoded."""

    max_new_tokens: int  # most tokens the model may write
    sample: bool  # sample (True) or decode greedily (False)
    temperature: float  # sampling temperature (sampling only)
    top_p: float  # nucleus-sampling mass (sampling only)
    seed: int  # seed of the sampling random generator


# A function that answers the chat turns of `build_messages` with raw text.
AnswerGenerator = Callable[[list[dict[str, str]], Decoding], str]


def plain_prompt(messages: Sequence[dict[str, str]]) -> str:
    """A plain-text prompt for a model without a chat template: the turns' texts, one paragraph each; the
    last turn (`name >=`) is left open for the model to continue.

    Args:
        messages: turns as returned by `build_messages`.
    """
    return "\n\n".join(message["content"] for message in messages)


def render_prompt(tokenizer: Any, messages: Sequence[dict[str, str]]) -> tuple[str, bool]:
    """The prompt text for `tokenizer`'s model, and whether it came from the tokenizer's chat template.

    Args:
        tokenizer: a transformers tokenizer. With a `chat_template`, the turns are rendered with it (a template
            that refuses a system turn gets the instructions at the start of the user turn instead); without
            one, `plain_prompt` is used.
        messages: turns as returned by `build_messages`.
    """
    if not getattr(tokenizer, "chat_template", None):
        return plain_prompt(messages), False
    from jinja2.exceptions import TemplateError

    turns = [dict(message) for message in messages]
    try:
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True), True
    except TemplateError:
        if len(turns) < 2 or turns[0]["role"] != "system":
            raise
        merged = [{"role": "user", "content": f"{turns[0]['content']}\n\n{turns[1]['content']}"}, *turns[2:]]
        return tokenizer.apply_chat_template(merged, tokenize=False, add_generation_prompt=True), True


def import_transformers() -> Any:
    """Import transformers, or raise `MissingLLMDependencyError` saying how to install it."""
    try:
        import transformers
    except ImportError as error:
        raise MissingLLMDependencyError(
            f"generating auxiliary texts needs Hugging Face transformers, which is not installed ({error}); "
            f"install it with `{LLM_INSTALL_HINT}`"
        ) from error
    return transformers


class ChatModelGenerator:
    """A local chat model (a Hugging Face model id or directory) loaded with transformers, answering one prompt
    at a time."""

    def __init__(self, model: str | Path, device: str | None = None) -> None:
        """Load the tokenizer and model.

        Args:
            model: a Hugging Face model id or a local directory holding the model and its tokenizer.
            device: a torch device (`"cuda"`, `"cuda:1"`, `"cpu"`, ...); `None` picks CUDA when available.
        """
        transformers = import_transformers()
        import torch

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        major, minor = (int(part) for part in re.findall(r"\d+", transformers.__version__)[:2])
        dtype_key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"  # the keyword's name changed in 4.56
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(model))
            self.model = transformers.AutoModelForCausalLM.from_pretrained(str(model), **{dtype_key: "auto"})
        except (OSError, ValueError) as error:
            raise GenerationError(
                f"could not load the chat model {str(model)!r}: {error}\nGive a local model directory (with its "
                "config, weights and tokenizer files) or a Hugging Face model id; an id not yet in the local cache "
                "needs network access (and HF_HUB_OFFLINE unset)"
            ) from error
        self.model.to(self.device).eval()
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else self.tokenizer.eos_token_id

    def __call__(self, messages: list[dict[str, str]], decoding: Decoding) -> str:
        """The model's raw answer to `messages` (special tokens removed).

        Args:
            messages: turns as returned by `build_messages`.
            decoding: how to decode.
        """
        import torch

        text, templated = render_prompt(self.tokenizer, messages)
        # A chat template writes its own special tokens (a start token included); a plain prompt needs them added.
        encoded = self.tokenizer(text, return_tensors="pt", add_special_tokens=not templated).to(self.device)
        options: dict[str, Any] = {"max_new_tokens": decoding.max_new_tokens, "do_sample": decoding.sample}
        if decoding.sample:
            options.update(temperature=decoding.temperature, top_p=decoding.top_p)
        if self.pad_token_id is not None:
            options["pad_token_id"] = self.pad_token_id
        cuda = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda), torch.inference_mode():
            torch.manual_seed(decoding.seed)
            output = self.model.generate(**encoded, **options)  # (1, prompt length + new tokens)
        new_tokens = output[0, encoded["input_ids"].shape[1] :]
        return self.tokenizer.decode(new_tokens, skip_special_tokens=True)
