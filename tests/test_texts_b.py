"""The auxiliary texts (definitions and synonyms) of COCO-Stuff 164k and COCO-Object against their class files."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from itaclip_core.text.classes import ClassVocabulary, check_aux_matches, read_aux_file, read_class_file

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ROOT / "texts"

MAX_DEFINITION_WORDS = 40  # hard limit: the text is put into prompt templates and must fit CLIP's 77 tokens
DEFINITION_WORDS = (12, 30)  # the range the definitions are written to
MAX_SYNONYMS = 4

# (aux file, class file, whether the class file's first line is the background)
CASES = [
    ("definitions/coco_stuff.txt", "class_names/itaclip/cls_coco_stuff.txt", False),
    ("synonyms/coco_stuff.txt", "class_names/itaclip/cls_coco_stuff.txt", False),
    ("definitions/coco_object.txt", "class_names/itaclip/cls_coco_object.txt", True),
    ("synonyms/coco_object.txt", "class_names/itaclip/cls_coco_object.txt", True),
    # The SCLIP class files have the same first names in the same order, so the same auxiliary files serve them.
    ("definitions/coco_stuff.txt", "class_names/sclip/cls_coco_stuff.txt", False),
    ("synonyms/coco_stuff.txt", "class_names/sclip/cls_coco_stuff.txt", False),
    ("definitions/coco_object.txt", "class_names/sclip/cls_coco_object.txt", True),
    ("synonyms/coco_object.txt", "class_names/sclip/cls_coco_object.txt", True),
]
AUX_FILES = sorted({aux for aux, _, _ in CASES})
IDS = [f"{aux}:{cls.split('/')[1]}" for aux, cls, _ in CASES]


def _norm(text: str) -> str:
    """Lower case, letters and digits only: `traffic light`, `trafficlight` and `Traffic-Light` compare equal."""
    return re.sub(r"[^a-z0-9]", "", text.lower())


def check_layout(aux: list[tuple[str, str]], vocab: ClassVocabulary, background: bool) -> None:
    """One line per non-background class, in class order, named by the class's first variant, with a text."""
    expected = vocab.class_names[1:] if background else vocab.class_names
    assert len(aux) == len(expected), f"{len(aux)} lines for {len(expected)} classes"
    for number, ((name, text), want) in enumerate(zip(aux, expected), start=1):
        assert name == want, f"line {number} names {name!r}, class is {want!r}"
        assert text.strip(), f"line {number} ({name}) has no text"
        assert text == text.strip(), f"line {number} ({name}): text must follow '>=' directly, without padding"


def check_raw(raw: str) -> None:
    """Plain ASCII, one `name >=text` per line, no tabs, no trailing spaces, no blank or repeated lines."""
    assert raw.isascii(), "non-ASCII characters"
    assert raw.endswith("\n") and not raw.endswith("\n\n"), "the file must end with exactly one newline"
    lines = raw[:-1].split("\n")
    for number, line in enumerate(lines, start=1):
        assert "\t" not in line and "\r" not in line, f"line {number}: tab or carriage return"
        assert line == line.rstrip(), f"line {number}: trailing space"
        assert line.count(">=") == 1 and " >=" in line, f"line {number}: expected `name >=text`"
    assert len(set(lines)) == len(lines), "a line is repeated"


def check_definition(name: str, text: str) -> None:
    """Dictionary style: lower-case start, no final period, word count within the limits."""
    words = len(text.split())
    assert words <= MAX_DEFINITION_WORDS, f"{name}: {words} words, more than {MAX_DEFINITION_WORDS}"
    low, high = DEFINITION_WORDS
    assert low <= words <= high, f"{name}: {words} words, outside {low}..{high}"
    assert text[0].islower(), f"{name}: must start in lower case"
    assert not text.endswith("."), f"{name}: no final period"


def check_synonyms(name: str, text: str, variants: tuple[str, ...]) -> None:
    """1 to MAX_SYNONYMS lower-case items, none of them a name variant of the class itself."""
    items = text.split(", ")
    assert 1 <= len(items) <= MAX_SYNONYMS, f"{name}: {len(items)} synonyms"
    assert all(item and item == item.strip() and "," not in item for item in items), f"{name}: malformed list"
    assert all(item == item.lower() for item in items), f"{name}: synonyms are lower case"
    assert len(set(items)) == len(items), f"{name}: a synonym is repeated"
    names = {_norm(v) for v in variants}
    repeated = [item for item in items if _norm(item) in names]
    assert not repeated, f"{name}: {repeated} repeat the class's own name"


@pytest.mark.parametrize("aux_path, class_path, background", CASES, ids=IDS)
def test_lines_follow_class_file(aux_path: str, class_path: str, background: bool) -> None:
    vocab = read_class_file(TEXTS / class_path)
    aux = read_aux_file(TEXTS / aux_path)
    check_layout(aux, vocab, background)
    check_aux_matches(aux, vocab, background, aux_path)


@pytest.mark.parametrize("aux_path", AUX_FILES)
def test_file_is_plain_and_well_formed(aux_path: str) -> None:
    check_raw((TEXTS / aux_path).read_text(encoding="utf-8"))


@pytest.mark.parametrize("aux_path, class_path, background", [c for c in CASES if "itaclip" in c[1]])
def test_texts_follow_style(aux_path: str, class_path: str, background: bool) -> None:
    vocab = read_class_file(TEXTS / class_path)
    variants = vocab.variants[1:] if background else vocab.variants
    for (name, text), names in zip(read_aux_file(TEXTS / aux_path), variants):
        if aux_path.startswith("definitions/"):
            check_definition(name, text)
        else:
            check_synonyms(name, text, names)


@pytest.mark.parametrize("aux_path", [a for a in AUX_FILES if a.startswith("synonyms/")])
def test_no_synonym_shared_between_classes(aux_path: str) -> None:
    owner: dict[str, str] = {}
    for name, text in read_aux_file(TEXTS / aux_path):
        for item in text.split(", "):
            assert owner.setdefault(item, name) == name, f"{item!r} is given for {owner[item]!r} and {name!r}"


@pytest.mark.parametrize("kind", ["definitions", "synonyms"])
def test_coco_object_texts_equal_coco_stuff_texts(kind: str) -> None:
    stuff = read_aux_file(TEXTS / kind / "coco_stuff.txt")
    obj = read_aux_file(TEXTS / kind / "coco_object.txt")
    assert len(obj) == 80
    # COCO-Stuff lists the 80 thing classes first, in COCO-Object's order; COCO-Object spells some names with spaces.
    for (obj_name, obj_text), (stuff_name, stuff_text) in zip(obj, stuff[:80]):
        assert _norm(obj_name) == _norm(stuff_name)
        assert obj_text == stuff_text, f"{obj_name}: COCO-Object text differs from COCO-Stuff's {stuff_name}"


def test_checks_reject_broken_texts() -> None:
    vocab = ClassVocabulary((("background",), ("cat", "feline"), ("dog",)))
    with pytest.raises(AssertionError, match="names 'dog'"):
        check_layout([("dog", "a canine"), ("cat", "a feline")], vocab, background=True)
    with pytest.raises(AssertionError, match="2 lines for 3"):
        check_layout([("background", "x"), ("cat", "y")], vocab, background=False)
    with pytest.raises(AssertionError, match="trailing space"):
        check_raw("cat >=a pet \n")
    with pytest.raises(AssertionError, match="repeated"):
        check_raw("cat >=a pet\ncat >=a pet\n")
    with pytest.raises(AssertionError, match="non-ASCII"):
        check_raw("cat >=a pet caf\u00e9\n")
    with pytest.raises(AssertionError, match="more than 40"):
        check_definition("cat", " ".join(["word"] * 41))
    with pytest.raises(AssertionError, match="final period"):
        check_definition("cat", "a small furry domestic animal with whiskers, often kept as a pet in homes.")
    with pytest.raises(AssertionError, match="repeat the class's own name"):
        check_synonyms("cat", "kitten, Feline".lower(), ("cat", "feline"))
    with pytest.raises(AssertionError, match="5 synonyms"):
        check_synonyms("dog", "a, b, c, d, e", ("dog",))
