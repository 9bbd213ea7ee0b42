"""The shipped definition and synonym files for Pascal VOC, Pascal Context, Cityscapes and ADE20K.

Each auxiliary file must line up with the class file it is used with: one `name >=text` line per non-background
class, in class order, named by the class's first variant.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from itaclip_core.resources import texts_dir
from itaclip_core.text.classes import ClassVocabulary, read_aux_file, read_class_file

MAX_DEFINITION_WORDS = 40
MIN_DEFINITION_WORDS = 12
MAX_SYNONYMS = 4

# (auxiliary file, class file it is read with, whether class 0 of that file is background)
TABLE: list[tuple[str, str, bool]] = []
for _kind in ("definitions", "synonyms"):
    TABLE += [
        (f"{_kind}/voc20.txt", "class_names/sclip/cls_voc20.txt", False),
        (f"{_kind}/voc21.txt", "class_names/itaclip/cls_voc21.txt", True),
        (f"{_kind}/voc21.txt", "class_names/sclip/cls_voc21.txt", True),
        (f"{_kind}/context59.txt", "class_names/sclip/cls_context59.txt", False),
        (f"{_kind}/context60.txt", "class_names/itaclip/cls_context60.txt", True),
        (f"{_kind}/context60.txt", "class_names/sclip/cls_context60.txt", True),
        (f"{_kind}/cityscapes.txt", "class_names/itaclip/cls_cityscapes.txt", False),
        (f"{_kind}/cityscapes.txt", "class_names/sclip/cls_city_scapes.txt", False),
        (f"{_kind}/ade20k.txt", "class_names/sclip/cls_ade20k.txt", False),
    ]

AUX_FILES = sorted({aux for aux, _, _ in TABLE})


def _load(aux: str, classes: str, background: bool) -> tuple[list[tuple[str, str]], ClassVocabulary, int]:
    root = texts_dir()
    vocab = read_class_file(root / classes)
    first = 1 if background else 0
    return read_aux_file(root / aux), vocab, first


def _words(text: str) -> list[str]:
    return text.split()


def _synonyms(text: str) -> list[str]:
    return [item.strip() for item in text.split(",")]


@pytest.mark.parametrize(("aux", "classes", "background"), TABLE)
def test_one_line_per_class_in_order(aux: str, classes: str, background: bool) -> None:
    entries, vocab, first = _load(aux, classes, background)
    expected = [variants[0].strip() for variants in vocab.variants[first:]]
    assert len(entries) == len(expected), f"{aux}: {len(entries)} lines for {len(expected)} classes of {classes}"
    for number, ((name, _), want) in enumerate(zip(entries, expected), start=1):
        assert name == want, f"{aux}, line {number}: named {name!r}, but class {number + first} of {classes} is {want!r}"


@pytest.mark.parametrize(("aux", "classes", "background"), TABLE)
def test_texts_follow_the_content_rules(aux: str, classes: str, background: bool) -> None:
    entries, vocab, first = _load(aux, classes, background)
    own_names = [variants[0].strip().lower() for variants in vocab.variants[first:]]
    all_names = {v.strip().lower(): index for index, variants in enumerate(vocab.variants) for v in variants}
    for number, ((name, text), own) in enumerate(zip(entries, own_names), start=1):
        where = f"{aux}, line {number} ({name})"
        assert text.strip(), f"{where}: empty text"
        assert text == text.strip(), f"{where}: leading or trailing blanks after '>='"
        if aux.startswith("definitions/"):
            count = len(_words(text))
            assert MIN_DEFINITION_WORDS <= count <= MAX_DEFINITION_WORDS, f"{where}: {count} words"
            assert text[0].islower(), f"{where}: a definition starts in lowercase"
            assert not text.endswith("."), f"{where}: a definition has no final period"
        else:
            items = _synonyms(text)
            assert 1 <= len(items) <= MAX_SYNONYMS, f"{where}: {len(items)} synonyms"
            assert all(items), f"{where}: an empty synonym (doubled or trailing comma)"
            assert len(set(items)) == len(items), f"{where}: a synonym is repeated"
            assert text == text.lower(), f"{where}: synonyms are lowercase"
            for item in items:
                # Other variants of the same class may appear (SCLIP's files lack them): only the name itself may not.
                assert item != own, f"{where}: {item!r} repeats the class name"
                other = all_names.get(item)
                assert other is None or other == number - 1 + first, (
                    f"{where}: {item!r} is the name of another class of {classes}"
                )


@pytest.mark.parametrize("aux", AUX_FILES)
def test_file_is_plain_ascii_without_duplicates(aux: str) -> None:
    raw = (texts_dir() / aux).read_bytes()
    assert raw.isascii(), f"{aux}: non-ASCII bytes"
    text = raw.decode("ascii")
    assert text.endswith("\n") and not text.endswith("\n\n"), f"{aux}: must end with exactly one newline"
    assert "\r" not in text and "\t" not in text, f"{aux}: carriage returns or tabs"
    lines = text.splitlines()
    for number, line in enumerate(lines, start=1):
        assert line == line.rstrip(), f"{aux}, line {number}: trailing blanks"
        assert line.count(">=") == 1, f"{aux}, line {number}: exactly one '>=' separator expected"
    assert len(set(lines)) == len(lines), f"{aux}: duplicate lines"
    names = [line.partition(">=")[0].strip() for line in lines]
    assert len(set(names)) == len(names), f"{aux}: a class name appears on two lines"


def _first_names(relative: str, background: bool) -> list[str]:
    vocab = read_class_file(texts_dir() / relative)
    return [variants[0].strip() for variants in vocab.variants[1 if background else 0 :]]


@pytest.mark.parametrize(
    "files",
    [
        [
            ("class_names/sclip/cls_voc20.txt", False),
            ("class_names/itaclip/cls_voc21.txt", True),
            ("class_names/sclip/cls_voc21.txt", True),
        ],
        [
            ("class_names/sclip/cls_context59.txt", False),
            ("class_names/itaclip/cls_context60.txt", True),
            ("class_names/sclip/cls_context60.txt", True),
        ],
        [("class_names/itaclip/cls_cityscapes.txt", False), ("class_names/sclip/cls_city_scapes.txt", False)],
    ],
)
def test_class_files_of_one_benchmark_agree(files: list[tuple[str, bool]]) -> None:
    """The aux files with and without background are shared between methods, so the class orders must agree."""
    reference = _first_names(*files[0])
    for relative, background in files[1:]:
        assert _first_names(relative, background) == reference, f"{relative} differs from {files[0][0]}"


@pytest.mark.parametrize(("kind", "with_bg", "without_bg"), [
    (kind, pair[0], pair[1]) for kind in ("definitions", "synonyms")
    for pair in (("voc21.txt", "voc20.txt"), ("context60.txt", "context59.txt"))
])
def test_background_and_plain_variants_carry_the_same_texts(kind: str, with_bg: str, without_bg: str) -> None:
    a = read_aux_file(Path(texts_dir()) / kind / with_bg)
    b = read_aux_file(Path(texts_dir()) / kind / without_bg)
    assert a == b
