"""Auxiliary texts (definitions or synonyms) written by a local chat model, one `name >=text` line per class.

Each class name is sent on its own, as the user turn `name >=`, after a system turn that asks for a brief
definition (or a short list of synonyms) written like two examples. Answers are cleaned to one line and
validated; an invalid answer is asked again with sampling and another seed. Decoding is greedy unless sampling
is asked for, and every seed is derived from the class's position, so a run is reproducible and a resumed run
writes what an uninterrupted one would have written.

The output file grows one flushed, synced line per finished class; running the same call again keeps the lines
already there and generates only the rest. The chat model is loaded through Hugging Face transformers, an
optional dependency (`pip install itaclip-core[llm]`), imported only when a model is needed.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from itaclip_core.text.chat_model import (
    LLM_INSTALL_HINT,
    AnswerGenerator,
    ChatModelGenerator,
    Decoding,
    GenerationError,
    MissingLLMDependencyError,
    import_transformers,
    plain_prompt,
    render_prompt,
)
from itaclip_core.text.classes import (
    ClassVocabulary,
    TextFileError,
    aux_class_variants,
    aux_name_matches,
    format_aux_line,
    split_aux_line,
)

__all__ = [
    "KINDS", "MAX_DEFINITION_WORDS", "MAX_SYNONYMS", "LLM_INSTALL_HINT", "AnswerGenerator", "AuxProblem",
    "ChatModelGenerator", "Decoding", "GenerationError", "GenerationReport", "MissingLLMDependencyError",
    "attempt_seed", "aux_class_names", "build_messages", "check_aux_file", "check_kind", "clean_answer",
    "generate_aux_texts", "import_transformers", "plain_prompt", "render_prompt", "validate_answer",
]

KINDS = ("definitions", "synonyms")
MAX_DEFINITION_WORDS = 50  # a definition longer than this is rejected
MAX_SYNONYMS = 8  # a synonym list with more comma-separated items than this is rejected

# Instructions and examples of each kind; the examples use the auxiliary file's own `word >= text` format.
_INSTRUCTIONS = {
    "definitions": (
        "You write dictionary definitions. Give a brief definition of the word in the user's message, written "
        f"like the example definitions below, in no more than {MAX_DEFINITION_WORDS} words. Reply with the "
        "definition only, on one line, with no other words."
    ),
    "synonyms": (
        "You list synonyms. Give synonyms of the word in the user's message, written like the examples below: "
        f"a comma-separated list of at most {MAX_SYNONYMS} words or short phrases naming the same thing. Reply "
        "with the list only, on one line, with no other words."
    ),
}
_EXAMPLES = {
    "definitions": (
        ("house", "a building in which people live, usually one family or household"),
        ("car", "a road vehicle with an engine and four wheels, built to carry a small number of people"),
    ),
    "synonyms": (
        ("house", "home, dwelling, residence, abode, homestead"),
        ("car", "automobile, motorcar, auto, vehicle, sedan"),
    ),
}
_QUOTE_PAIRS = {'"': '"', "'": "'", "`": "`", "\u201c": "\u201d", "\u2018": "\u2019", "\u00ab": "\u00bb"}
_MARKUP = set("*#`<>{}[]|\\")  # characters of markup or chat syntax, never part of a plain definition


def check_kind(kind: str) -> str:
    """Return `kind` if it is one of `KINDS`, else raise a `ValueError` naming the choices.

    Args:
        kind: `"definitions"` or `"synonyms"`.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown auxiliary-text kind {kind!r}; choose one of {', '.join(KINDS)}")
    return kind


def build_messages(name: str, kind: str) -> list[dict[str, str]]:
    """The chat turns that ask for one class's text: a system turn (instructions and two examples) and the
    user turn `name >=`.

    Args:
        name: the class's display name.
        kind: `"definitions"` or `"synonyms"`.
    """
    check_kind(kind)
    if not name.strip():
        raise ValueError("class name is empty; every class needs a name to ask about")
    examples = "\n".join(f"{word} >= {text}" for word, text in _EXAMPLES[kind])
    system = f"{_INSTRUCTIONS[kind]}\n\nExamples:\n{examples}"
    return [{"role": "system", "content": system}, {"role": "user", "content": f"{name.strip()} >="}]


def clean_answer(raw: str, name: str) -> str:
    """One line of text from a model's raw answer.

    Keeps the first non-empty line, collapses whitespace, and removes (repeatedly, in any order) surrounding
    whitespace, a pair of quotes around the whole answer, a leading `name >=` (or a bare `>=`) repeated from the
    prompt, and trailing periods.

    Args:
        raw: the decoded answer.
        name: the class name the answer is for.
    """
    lines = [line for line in raw.splitlines() if line.strip()]
    text = re.sub(r"\s+", " ", lines[0]).strip() if lines else ""
    echo = re.compile(rf"^(?:{re.escape(name.strip())}\s*)?>=\s*", re.IGNORECASE)
    previous = None
    while text != previous:
        previous = text
        text = echo.sub("", text).strip()
        if len(text) >= 2 and _QUOTE_PAIRS.get(text[0]) == text[-1]:
            text = text[1:-1].strip()
        text = text.rstrip(".").rstrip()
    return text


def validate_answer(text: str, kind: str | None) -> str | None:
    """Why a cleaned text is not a usable auxiliary text, or `None` when it is.

    Every text must be non-empty, one line, plain (printable, no markup characters, no `>=`) and at most
    `MAX_DEFINITION_WORDS` words; synonyms must be at most `MAX_SYNONYMS` non-empty comma-separated items.

    Args:
        text: the text after cleaning (see `clean_answer`).
        kind: `"definitions"`, `"synonyms"`, or `None` for the checks common to both.
    """
    if kind is not None:
        check_kind(kind)
    if not text.strip():
        return "the text is empty"
    if "\n" in text or "\r" in text:
        return "the text spans several lines"
    if ">=" in text:
        return "the text contains '>='"
    if not text.isprintable():
        return "the text contains control characters"
    markup = sorted(_MARKUP & set(text))
    if markup:
        return f"the text contains markup characters {''.join(markup)!r}; plain text only"
    words = len(text.split())
    if words > MAX_DEFINITION_WORDS:
        return f"the text has {words} words, more than {MAX_DEFINITION_WORDS}"
    if kind == "synonyms":
        items = [item.strip() for item in text.split(",")]
        if not all(items):
            return "the synonym list has an empty item (doubled or trailing comma)"
        if len(items) > MAX_SYNONYMS:
            return f"the synonym list has {len(items)} items, more than {MAX_SYNONYMS}"
    return None


def attempt_seed(seed: int, index: int, attempt: int) -> int:
    """The sampling seed of one attempt for one class, derived from the run's seed, the class's position in the
    output and the attempt number only (so a resumed run samples what an uninterrupted one would).

    Args:
        seed: the run's seed.
        index: the class's 0-based line number in the output file.
        attempt: 0 for the first answer, 1, 2, ... for retries.
    """
    digest = hashlib.sha256(f"{seed}/{index}/{attempt}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


@dataclass
class GenerationReport:
    """What one `generate_aux_texts` call did."""

    out: Path  # the output file
    kind: str  # "definitions" or "synonyms"
    total: int  # classes the file is for (one line each)
    kept: int = 0  # lines already present from an earlier run, kept
    generated: list[str] = field(default_factory=list)  # classes written by this run, in order
    retried: dict[str, int] = field(default_factory=dict)  # class written after retries -> attempts it took
    failed: dict[str, list[str]] = field(default_factory=dict)  # class without a valid answer -> each attempt's problem
    not_attempted: list[str] = field(default_factory=list)  # classes after a failed one (their lines must follow it)
    seconds: float = 0.0  # wall time of the call

    @property
    def written(self) -> int:
        """Lines now in the file."""
        return self.kept + len(self.generated)

    @property
    def ok(self) -> bool:
        """Whether the file now has a valid line for every class."""
        return not self.failed and self.written == self.total

    def summary(self) -> str:
        """A few lines for a person: lines written, classes retried and failed, time."""
        lines = [
            f"{self.out}: {self.written}/{self.total} {self.kind} lines ({self.kept} kept from an earlier run, "
            f"{len(self.generated)} generated) in {self.seconds:.1f} s"
        ]
        if self.retried:
            retried = ", ".join(f"{name} ({count} attempts)" for name, count in self.retried.items())
            lines.append(f"retried: {len(self.retried)} class(es): {retried}")
        for name, problems in self.failed.items():
            lines.append(f"failed: {name!r} got no valid answer in {len(problems)} attempt(s):")
            lines.extend(f"  {problem}" for problem in problems)
        if self.not_attempted:
            lines.append(
                f"not generated: {len(self.not_attempted)} class(es) after the failed one. Raise --max-retries, "
                "change --seed, or write the failed class's line by hand, then run the same command again to go on"
            )
        return "\n".join(lines)


def aux_class_names(vocab: ClassVocabulary, background: bool = False) -> list[str]:
    """The display names an auxiliary file has lines for, in order (the background class skipped if asked).

    Args:
        vocab: the class list (e.g. from `read_class_file`).
        background: whether the first class is a background class without an auxiliary line.
    """
    return [variants[0] for variants in aux_class_variants(vocab, background)]


def _read_lines(path: Path) -> tuple[str, list[str]]:
    """A text file's content and its lines, trailing blank lines dropped."""
    content = path.read_text(encoding="utf-8")
    lines = content.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    return content, lines


def _resume_lines(out: Path, class_names: Sequence[str], kind: str) -> list[str]:
    """The lines of an earlier run to keep; raises `TextFileError` at the first line that does not belong."""
    if not out.exists():
        return []
    if not out.is_file():
        raise TextFileError(f"output {out} exists and is not a file; give a file path with --out")
    content, lines = _read_lines(out)
    fix = "give another output file, or delete or fix this one (it is never overwritten)"
    if len(lines) > len(class_names):
        raise TextFileError(
            f"{out}: has {len(lines)} lines but there are only {len(class_names)} classes; "
            f"line {len(class_names) + 1} belongs to no class; {fix}"
        )
    for number, (line, name) in enumerate(zip(lines, class_names), start=1):
        parsed = split_aux_line(line)
        if parsed is None:
            raise TextFileError(f"{out}, line {number}: expected `name >=text`, got {line!r}; {fix}")
        if not aux_name_matches(parsed[0], [name]):
            raise TextFileError(
                f"{out}, line {number}: names {parsed[0]!r} but class {number} is {name!r}, so the file was "
                f"written for another class list or order; {fix}"
            )
        problem = validate_answer(parsed[1].strip(), kind)
        if problem is not None:
            raise TextFileError(f"{out}, line {number} ({name!r}): {problem}; {fix}")
    canonical = "".join(f"{line}\n" for line in lines)
    if content != canonical:  # normalise line endings and drop trailing blank lines before appending
        partial = out.with_name(out.name + ".partial")
        partial.write_text(canonical, encoding="utf-8", newline="\n")
        os.replace(partial, out)
    return lines


def generate_aux_texts(
    class_names: Sequence[str],
    kind: str,
    model: str | Path | AnswerGenerator,
    out: str | Path,
    *,
    max_new_tokens: int = 128,
    max_retries: int = 3,
    sample: bool = False,
    temperature: float = 0.6,
    top_p: float = 0.9,
    seed: int = 0,
    device: str | None = None,
    progress: bool = True,
) -> GenerationReport:
    """Write one `name >=text` line per class to `out`, asking a chat model for each class's text.

    Lines already in `out` from an earlier call with the same classes are kept and only the rest are generated;
    a file whose lines do not match the classes raises `TextFileError` and is left untouched. Generation stops at
    the first class without a valid answer after all retries (the lines before it stay written); the report
    says which class failed and why.

    Args:
        class_names: the classes' display names, one output line each, in order (see `aux_class_names`).
        kind: `"definitions"` or `"synonyms"`.
        model: a Hugging Face model id or local directory (loaded with transformers only if a line is missing),
            or an `AnswerGenerator` to use as it is.
        out: the output file (created with its folder if missing).
        max_new_tokens: most tokens the model may write per answer.
        max_retries: further attempts, each sampled with its own seed, after an invalid answer.
        sample: sample the first attempt too (greedy decoding otherwise).
        temperature: sampling temperature (sampled attempts).
        top_p: nucleus-sampling mass (sampled attempts).
        seed: the run's seed; each attempt's seed is derived from it (see `attempt_seed`).
        device: torch device for a model loaded here; `None` picks CUDA when available.
        progress: show a progress bar over the classes.
    """
    check_kind(kind)
    names = [str(name) for name in class_names]
    if not names:
        raise ValueError("class_names is empty; give at least one class")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if max_retries < 0:
        raise ValueError(f"max_retries must be 0 or more, got {max_retries}")
    if temperature <= 0 or not 0 < top_p <= 1:
        raise ValueError(f"temperature must be > 0 and top_p in (0, 1], got {temperature} and {top_p}")
    start = time.perf_counter()
    out = Path(out)
    kept = _resume_lines(out, names, kind)
    report = GenerationReport(out=out, kind=kind, total=len(names), kept=len(kept))
    if len(kept) == len(names):
        report.seconds = time.perf_counter() - start
        return report
    generator = model if callable(model) else ChatModelGenerator(model, device)
    out.parent.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(names), initial=len(kept), desc=kind, unit="class", disable=not progress)
    with open(out, "a", encoding="utf-8", newline="\n") as handle, bar:
        for index in range(len(kept), len(names)):
            name = names[index]
            bar.set_postfix_str(name)
            messages = build_messages(name, kind)
            problems: list[str] = []
            text = None
            for attempt in range(max_retries + 1):
                decoding = Decoding(
                    max_new_tokens, sample or attempt > 0, temperature, top_p, attempt_seed(seed, index, attempt)
                )
                raw = generator(messages, decoding)
                cleaned = clean_answer(raw, name)
                problem = validate_answer(cleaned, kind)
                if problem is None:
                    text = cleaned
                    break
                shown = raw.strip().replace("\n", " ")
                shown = shown if len(shown) <= 80 else shown[:77] + "..."
                problems.append(f"attempt {attempt + 1}: {problem} (answer: {shown!r})")
            if text is None:
                report.failed[name] = problems
                report.not_attempted = names[index + 1 :]
                break
            if problems:
                report.retried[name] = len(problems) + 1
            handle.write(format_aux_line(name, text) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
            report.generated.append(name)
            bar.update(1)
    report.seconds = time.perf_counter() - start
    return report


@dataclass(frozen=True)
class AuxProblem:
    """One problem found in an auxiliary file."""

    line: int | None  # 1-based line number, or None for a problem of the whole file
    message: str  # what is wrong

    def __str__(self) -> str:
        return self.message if self.line is None else f"line {self.line}: {self.message}"


def check_aux_file(
    aux: str | Path, vocab: ClassVocabulary, *, background: bool = False, kind: str | None = None
) -> list[AuxProblem]:
    """Every problem of an auxiliary file against its class list (an empty list when it is valid).

    Finds a wrong line count, malformed lines, lines naming another class than the one at their position, and
    texts that `validate_answer` rejects (empty, too long, markup, ...).

    Args:
        aux: the auxiliary file.
        vocab: the class list (e.g. from `read_class_file`).
        background: whether the first class is a background class without an auxiliary line.
        kind: `"definitions"` or `"synonyms"` to check that kind's limit too, `None` for the common checks.
    """
    aux = Path(aux)
    if not aux.is_file():
        raise TextFileError(f"auxiliary-text file not found: {aux}")
    variants = aux_class_variants(vocab, background)
    _, lines = _read_lines(aux)
    problems = []
    if len(lines) != len(variants):
        which = "non-background " if background else ""
        problems.append(AuxProblem(None, f"{len(lines)} lines, but the class list has {len(variants)} {which}classes"))
    for number, line in enumerate(lines, start=1):
        if number > len(variants):
            problems.append(AuxProblem(number, "no class is left for this line"))
            continue
        parsed = split_aux_line(line)
        if parsed is None:
            problems.append(AuxProblem(number, f"expected `name >=text`, got {line!r}"))
            continue
        name, text = parsed
        if not aux_name_matches(name, variants[number - 1]):
            problems.append(
                AuxProblem(number, f"names {name!r} but class {number} is {variants[number - 1][0]!r} (wrong order?)")
            )
        problem = validate_answer(text.strip(), kind)
        if problem is not None:
            problems.append(AuxProblem(number, f"{name!r}: {problem}"))
    return problems
