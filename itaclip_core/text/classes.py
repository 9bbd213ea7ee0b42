"""Class-name files and auxiliary-text files, in the formats of the published ITACLIP and SCLIP code.

Class file: one line per class, the class's name variants separated by `", "` (e.g. `cat, feline`). The first
variant is the class's display name. Every variant becomes one text query; a class's score is the maximum over
its variants.

Auxiliary file (definitions or synonyms): one line per non-background class, `name >=text`; the text after `>=`
is used verbatim.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence


class TextFileError(ValueError):
    """A class-name or auxiliary-text file (or list) is malformed."""


@dataclass(frozen=True)
class ClassVocabulary:
    """Classes with their name variants, flattened into the query list the text classifier encodes."""

    variants: tuple[tuple[str, ...], ...]  # per class, its name variants (first = display name)

    @property
    def class_names(self) -> list[str]:
        """Display name of each class (its first variant)."""
        return [v[0] for v in self.variants]

    @property
    def num_classes(self) -> int:
        return len(self.variants)

    @property
    def queries(self) -> list[str]:
        """All name variants in order: the texts that are encoded."""
        return [name for names in self.variants for name in names]

    @property
    def query_to_class(self) -> list[int]:
        """For each query, the index of its class."""
        return [c for c, names in enumerate(self.variants) for _ in names]

    @property
    def num_queries(self) -> int:
        return sum(len(v) for v in self.variants)


def _check_vocabulary(variants: list[list[str]], source: str, unique: bool) -> ClassVocabulary:
    if not variants:
        raise TextFileError(f"{source}: the class list is empty; give at least one class name")
    seen: dict[str, int] = {}
    for index, names in enumerate(variants):
        for name in names:
            if not name.strip():
                raise TextFileError(
                    f"{source}: class {index + 1} has an empty name (check for a blank line or a doubled comma)"
                )
            key = name.strip().lower()
            if unique and key in seen and seen[key] != index:
                raise TextFileError(
                    f"{source}: the name {name!r} is given for class {seen[key] + 1} and class {index + 1}; "
                    "each name may belong to one class only"
                )
            seen[key] = index
    return ClassVocabulary(tuple(tuple(names) for names in variants))


def read_class_file(path: str | Path, separator: str = ", ") -> ClassVocabulary:
    """Parse a class-name file exactly as the published code does (`line.split(', ')`; ClearCLIP splits on `,`,
    which `separator=","` reproduces: the names are stripped either way)."""
    path = Path(path)
    if not path.is_file():
        raise TextFileError(f"class-name file not found: {path}")
    lines = path.read_text(encoding="utf-8").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    # Names are stripped (the Context60 files end with "wood "); the tokenizer strips whitespace anyway, so the
    # encoded queries are the same as the published code's.
    if not separator:
        raise ValueError("class_separator must not be empty (the published files use ', '; ClearCLIP's ',')")
    variants = [[name.strip() for name in line.rstrip("\r").split(separator)] for line in lines]
    # The published files repeat some names across classes (COCO-Object lists "bed" as background and as a
    # class): they are kept as they are.
    return _check_vocabulary(variants, str(path), unique=False)


def parse_class_list(classes: str | Sequence[str] | Sequence[Sequence[str]]) -> ClassVocabulary:
    """Classes given directly.

    - a string: classes separated by commas, variants of one class separated by `|` (`"cat|kitten, dog, sky"`);
    - a sequence of strings: one class each (variants again separated by `|`);
    - a sequence of sequences: the variants of each class.
    """
    if isinstance(classes, str):
        if not classes.strip().strip(","):
            raise TextFileError("class list: the class list is empty; give at least one class name")
        items: list = [c.strip() for c in classes.split(",")]
        if items and items[-1] == "" and len(items) > 1:
            items.pop()
    else:
        items = list(classes)
    variants: list[list[str]] = []
    for item in items:
        if isinstance(item, str):
            variants.append([v.strip() for v in item.split("|")])
        else:
            variants.append([str(v).strip() for v in item])
    return _check_vocabulary(variants, "class list", unique=True)


def read_aux_file(path: str | Path) -> list[tuple[str, str]]:
    """Parse an auxiliary-text file: a `(name, text)` pair per line (`name >=text`)."""
    path = Path(path)
    if not path.is_file():
        raise TextFileError(f"auxiliary-text file not found: {path}")
    entries = []
    lines = path.read_text(encoding="utf-8").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    for number, line in enumerate(lines, start=1):
        parsed = split_aux_line(line)
        if parsed is None:
            raise TextFileError(f"{path}, line {number}: expected `name >=text`, got {line!r}")
        name, text = parsed
        if not text.strip():
            raise TextFileError(f"{path}, line {number}: the text after '>=' is empty for {name!r}")
        entries.append((name, text))
    return entries


def split_aux_line(line: str) -> tuple[str, str] | None:
    """Split one auxiliary-file line into `(name, text)` at its first `>=`; `None` when it has no `>=`.

    Args:
        line: one line of an auxiliary file, with or without its line ending.

    The name is stripped; the text is returned verbatim (it is used as it is).
    """
    name, sep, text = line.rstrip("\r\n").partition(">=")
    if not sep:
        return None
    return name.strip(), text


def format_aux_line(name: str, text: str) -> str:
    """The auxiliary-file line `name >=text` (no line ending), the format `read_aux_file` reads back.

    Args:
        name: the class's display name.
        text: the class's auxiliary text (a single line).
    """
    if "\n" in text or "\r" in text:
        raise TextFileError(f"auxiliary text for {name!r} spans several lines; give a single line")
    return f"{name} >={text}"


def aux_class_variants(vocab: ClassVocabulary, background: bool) -> list[tuple[str, ...]]:
    """Name variants of the classes an auxiliary file has lines for: all classes, or all but the first
    (background) one when `background` is true.

    Args:
        vocab: the class list.
        background: whether the first class is a background class without an auxiliary line.
    """
    if background and vocab.num_classes < 2:
        raise TextFileError(
            "the class list has only a background class; an auxiliary file needs at least one other class"
        )
    return list(vocab.variants[1:] if background else vocab.variants)


def aux_name_matches(name: str, variants: Sequence[str]) -> bool:
    """Whether an auxiliary line's name belongs to a class: it equals one of its variants, ignoring case.

    Args:
        name: the name written before `>=`.
        variants: the class's name variants.
    """
    return name.strip().lower() in {v.lower() for v in variants}


def check_aux_matches(
    aux: list[tuple[str, str]], vocab: ClassVocabulary, background: bool, source: str, strict_names: bool = True
) -> list[str]:
    """An auxiliary file has one line per non-background class, in class order.

    A wrong line count is always an error (lines are matched to classes by position). A line whose name is none of
    its class's variants is an error when `strict_names`, else it is returned as a warning: the published code
    matches by position only, and its own files name some classes differently (e.g. `tvmonitor`).
    """
    expected = vocab.class_names[1:] if background else vocab.class_names
    if len(aux) != len(expected):
        raise TextFileError(
            f"{source}: {len(aux)} lines, but the class list has {len(expected)} "
            f"{'non-background ' if background else ''}classes; write one line per class, in class order"
        )
    warnings: list[str] = []
    for number, ((name, _), want) in enumerate(zip(aux, expected), start=1):
        variants = vocab.variants[number if background else number - 1]
        if not aux_name_matches(name, variants):
            message = f"{source}, line {number}: names {name!r} but class {number} is {want!r}"
            if strict_names:
                raise TextFileError(message + "; lines must follow class order")
            warnings.append(message)
    return warnings
