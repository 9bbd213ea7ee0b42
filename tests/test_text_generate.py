"""Auxiliary-text generation: pure helpers, the generation loop with scripted answers (retries, failures, resume),
the file checker, and the real transformers path on a tiny random chat model built here (no download)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"


from itaclip_core.cli import main
from itaclip_core.text.classes import (
    TextFileError,
    check_aux_matches,
    format_aux_line,
    parse_class_list,
    read_aux_file,
    read_class_file,
    split_aux_line,
)
from itaclip_core.text.generate import (
    LLM_INSTALL_HINT,
    MAX_DEFINITION_WORDS,
    MAX_SYNONYMS,
    ChatModelGenerator,
    Decoding,
    GenerationError,
    MissingLLMDependencyError,
    attempt_seed,
    aux_class_names,
    build_messages,
    check_aux_file,
    clean_answer,
    generate_aux_texts,
    import_transformers,
    plain_prompt,
    render_prompt,
    validate_answer,
)

CLASS_LINES = ["background, bg", "cat, feline", "dog", "traffic light, signal"]
NAMES = ["cat", "dog", "traffic light"]


@pytest.fixture()
def class_file(tmp_path: Path) -> Path:
    path = tmp_path / "classes.txt"
    path.write_text("\n".join(CLASS_LINES) + "\n", encoding="utf-8")
    return path


class Scripted:
    """An answer generator that replays scripted answers per class and records every call."""

    def __init__(self, answers: dict[str, list[str]]) -> None:
        self.answers = {name: list(texts) for name, texts in answers.items()}
        self.calls: list[tuple[str, Decoding]] = []

    def __call__(self, messages: list[dict[str, str]], decoding: Decoding) -> str:
        name = messages[-1]["content"].removesuffix(" >=")
        self.calls.append((name, decoding))
        return self.answers[name].pop(0)


# --- pure helpers -------------------------------------------------------------------------------------------------


def test_build_messages_asks_for_one_class_with_two_examples() -> None:
    messages = build_messages(" traffic light ", "definitions")
    assert [m["role"] for m in messages] == ["system", "user"]
    assert messages[1]["content"] == "traffic light >="
    system = messages[0]["content"]
    assert "house >= " in system and "car >= " in system
    assert f"no more than {MAX_DEFINITION_WORDS} words" in system and "definition" in system
    synonyms = build_messages("cat", "synonyms")[0]["content"]
    assert "synonyms" in synonyms and f"at most {MAX_SYNONYMS}" in synonyms and "house >= " in synonyms
    assert synonyms != system


def test_build_messages_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="definitions, synonyms"):
        build_messages("cat", "antonyms")
    with pytest.raises(ValueError, match="empty"):
        build_messages("  ", "definitions")


def test_plain_prompt_ends_with_the_open_class_line() -> None:
    messages = build_messages("cat", "synonyms")
    prompt = plain_prompt(messages)
    assert prompt.startswith(messages[0]["content"]) and prompt.endswith("\n\ncat >=")


@pytest.mark.parametrize(
    ("raw", "cleaned"),
    [
        ("  a small pet animal.  ", "a small pet animal"),
        ('"A small pet animal."', "A small pet animal"),
        ("\u201ca small pet\u201d.", "a small pet"),
        ("cat >= a small pet", "a small pet"),
        ("Cat>=  CAT >= 'a small pet'", "a small pet"),
        (">= a small pet", "a small pet"),
        ("\n\n  a small\t pet \nNote: I hope this helps.", "a small pet"),
        ("the cat's toy", "the cat's toy"),
        ("a pet...", "a pet"),
        ("   \n ", ""),
    ],
)
def test_clean_answer(raw: str, cleaned: str) -> None:
    assert clean_answer(raw, "cat") == cleaned


def test_clean_answer_escapes_the_name() -> None:
    assert clean_answer("t-shirt (top) >= a garment", "t-shirt (top)") == "a garment"
    assert clean_answer("tXshirt >= a garment", "t.shirt") == "tXshirt >= a garment"


def test_validate_answer_limits() -> None:
    words = " ".join(["word"] * MAX_DEFINITION_WORDS)
    assert validate_answer(words, "definitions") is None
    assert "51 words" in validate_answer(words + " more", "definitions")
    assert "51 words" in validate_answer(words + " more", None)
    items = ", ".join(f"name{i}" for i in range(MAX_SYNONYMS))
    assert validate_answer(items, "synonyms") is None
    assert "9 items" in validate_answer(items + ", extra", "synonyms")
    assert validate_answer(items + ", extra", "definitions") is None  # commas are fine in a definition
    assert "empty item" in validate_answer("home,, house", "synonyms")


@pytest.mark.parametrize(
    ("text", "problem"),
    [("", "empty"), ("a >= b", ">="), ("a\nb", "several lines"), ("a\x07b", "control"), ("**a pet**", "markup")],
)
def test_validate_answer_rejects(text: str, problem: str) -> None:
    assert problem in validate_answer(text, "definitions")


def test_attempt_seed_depends_on_seed_class_and_attempt_only() -> None:
    seeds = {attempt_seed(s, i, a) for s in range(3) for i in range(3) for a in range(3)}
    assert len(seeds) == 27
    assert attempt_seed(5, 2, 1) == attempt_seed(5, 2, 1)


def test_aux_line_helpers_round_trip(tmp_path: Path) -> None:
    assert split_aux_line("cat >=a pet >= b\r\n") == ("cat", "a pet >= b")
    assert split_aux_line("no separator") is None
    path = tmp_path / "aux.txt"
    path.write_text(format_aux_line("cat", "a pet") + "\n", encoding="utf-8")
    assert read_aux_file(path) == [("cat", "a pet")]
    with pytest.raises(TextFileError, match="several lines"):
        format_aux_line("cat", "a\npet")


def test_aux_class_names(class_file: Path) -> None:
    vocab = read_class_file(class_file)
    assert aux_class_names(vocab, background=True) == NAMES
    assert aux_class_names(vocab) == ["background", *NAMES]
    with pytest.raises(TextFileError, match="only a background class"):
        aux_class_names(parse_class_list(["background"]), background=True)


# --- generation loop with scripted answers ---------------------------------------------------------------------------


def test_generate_writes_lines_and_retries_invalid_answers(tmp_path: Path) -> None:
    out = tmp_path / "sub" / "aux.txt"
    script = Scripted({"cat": ["cat >= a small pet."], "dog": ["", "**x**", "a loyal pet"], "traffic light": ["lamp"]})
    report = generate_aux_texts(NAMES, "definitions", script, out, max_retries=3, seed=7, progress=False)
    assert out.read_text(encoding="utf-8") == "cat >=a small pet\ndog >=a loyal pet\ntraffic light >=lamp\n"
    assert report.ok and report.generated == NAMES and report.kept == 0
    assert report.retried == {"dog": 3} and not report.failed
    dog = [d for name, d in script.calls if name == "dog"]
    assert [d.sample for d in dog] == [False, True, True]  # greedy first, sampled retries
    assert [d.seed for d in dog] == [attempt_seed(7, 1, a) for a in range(3)]
    assert "retried: 1 class(es): dog (3 attempts)" in report.summary()


def test_generate_sample_samples_the_first_attempt(tmp_path: Path) -> None:
    script = Scripted({name: ["fine"] for name in NAMES})
    generate_aux_texts(NAMES, "synonyms", script, tmp_path / "a.txt", sample=True, temperature=0.9, top_p=0.5,
                       max_new_tokens=12, progress=False)
    assert {(d.sample, d.temperature, d.top_p, d.max_new_tokens) for _, d in script.calls} == {(True, 0.9, 0.5, 12)}


def test_generate_stops_at_a_failing_class_and_resumes_later(tmp_path: Path) -> None:
    out = tmp_path / "aux.txt"
    too_long = ", ".join(["x"] * (MAX_SYNONYMS + 1))
    failing = Scripted({"cat": ["pet, kitty"], "dog": ["", too_long, "dog >="], "traffic light": ["signal"]})
    report = generate_aux_texts(NAMES, "synonyms", failing, out, max_retries=2, progress=False)
    assert not report.ok and report.generated == ["cat"] and report.not_attempted == ["traffic light"]
    assert list(report.failed) == ["dog"] and len(report.failed["dog"]) == 3
    assert "9 items" in report.failed["dog"][1] and "failed: 'dog'" in report.summary()
    assert out.read_text(encoding="utf-8") == "cat >=pet, kitty\n"
    working = Scripted({"dog": ["hound, canine"], "traffic light": ["signal, stoplight"]})
    report = generate_aux_texts(NAMES, "synonyms", working, out, progress=False)
    assert report.ok and report.kept == 1 and report.generated == ["dog", "traffic light"]
    assert [name for name, _ in working.calls] == ["dog", "traffic light"]
    expected = "cat >=pet, kitty\ndog >=hound, canine\ntraffic light >=signal, stoplight\n"
    assert out.read_text(encoding="utf-8") == expected


def test_resume_keeps_existing_lines_and_normalises_endings(tmp_path: Path) -> None:
    out = tmp_path / "aux.txt"
    out.write_bytes(b"Cat >= my own words\r\ndog >=a hound")  # no final line end
    script = Scripted({"traffic light": ["a signal"]})
    report = generate_aux_texts(NAMES, "definitions", script, out, progress=False)
    assert report.kept == 2 and [name for name, _ in script.calls] == ["traffic light"]
    assert out.read_text(encoding="utf-8") == "Cat >= my own words\ndog >=a hound\ntraffic light >=a signal\n"
    # A complete file needs no model: a model path that does not exist is never loaded.
    again = generate_aux_texts(NAMES, "definitions", tmp_path / "no-model", out, progress=False)
    assert again.ok and again.kept == 3 and not again.generated


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("cat >=a pet\nhorse >=an animal\n", "line 2: names 'horse' but class 2 is 'dog'"),
        ("cat >=a pet\ndog a hound\n", "line 2: expected `name >=text`"),
        ("cat >=\n", r"line 1 \('cat'\): the text is empty"),
        ("cat >=a\ndog >=b\ntraffic light >=c\nextra >=d\n", "only 3 classes; line 4 belongs to no class"),
    ],
)
def test_resume_refuses_a_file_for_other_classes(tmp_path: Path, content: str, message: str) -> None:
    out = tmp_path / "aux.txt"
    out.write_text(content, encoding="utf-8")
    with pytest.raises(TextFileError, match=message):
        generate_aux_texts(NAMES, "definitions", Scripted({}), out, progress=False)
    assert out.read_text(encoding="utf-8") == content


def test_generate_rejects_bad_settings(tmp_path: Path) -> None:
    for kwargs in ({"max_new_tokens": 0}, {"max_retries": -1}, {"temperature": 0.0}, {"top_p": 1.5}):
        with pytest.raises(ValueError):
            generate_aux_texts(NAMES, "definitions", Scripted({}), tmp_path / "a.txt", progress=False, **kwargs)
    with pytest.raises(ValueError, match="choose one of"):
        generate_aux_texts(NAMES, "words", Scripted({}), tmp_path / "a.txt", progress=False)
    assert not (tmp_path / "a.txt").exists()


def test_missing_transformers_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, class_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(MissingLLMDependencyError, match=r"pip install itaclip-core\[llm\]"):
        import_transformers()
    with pytest.raises(MissingLLMDependencyError):
        generate_aux_texts(NAMES, "definitions", "some/model", tmp_path / "a.txt", progress=False)
    argv = ["texts", "generate", "--classes", str(class_file), "--kind", "definitions", "--model", "m",
            "--out", str(tmp_path / "b.txt"), "--background"]
    assert main(argv) == 2
    assert LLM_INSTALL_HINT in capsys.readouterr().err


# --- checker -------------------------------------------------------------------------------------------------------


def test_check_aux_file_reports_every_problem(tmp_path: Path, class_file: Path) -> None:
    vocab = read_class_file(class_file)
    good = tmp_path / "good.txt"
    good.write_text("feline >=a pet\ndog >=a hound\nsignal >=a lamp\n", encoding="utf-8")
    assert check_aux_file(good, vocab, background=True) == []
    bad = tmp_path / "bad.txt"
    long_text = " ".join(["w"] * (MAX_DEFINITION_WORDS + 1))
    bad.write_text(f"dog >=a hound\ncat >=\ntraffic light >={long_text}\nextra >=x\n", encoding="utf-8")
    problems = [str(p) for p in check_aux_file(bad, vocab, background=True)]
    assert problems == [
        "4 lines, but the class list has 3 non-background classes",
        "line 1: names 'dog' but class 1 is 'cat' (wrong order?)",
        "line 2: names 'cat' but class 2 is 'dog' (wrong order?)",
        "line 2: 'cat': the text is empty",
        f"line 3: 'traffic light': the text has {MAX_DEFINITION_WORDS + 1} words, more than {MAX_DEFINITION_WORDS}",
        "line 4: no class is left for this line",
    ]
    synonyms = tmp_path / "syn.txt"
    synonyms.write_text("cat >=a, b, c, d, e, f, g, h, i\ndog >=hound\ntraffic light >=signal\n", encoding="utf-8")
    assert check_aux_file(synonyms, vocab, background=True) == []
    assert "9 items" in str(check_aux_file(synonyms, vocab, background=True, kind="synonyms")[0])


def test_texts_check_command(tmp_path: Path, class_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    aux = tmp_path / "aux.txt"
    aux.write_text("cat >=a pet\ndog >=\n", encoding="utf-8")
    argv = ["texts", "check", "--classes", str(class_file), "--aux", str(aux), "--background"]
    assert main(argv) == 1
    out = capsys.readouterr().out
    assert "line 2: 'dog': the text is empty" in out and "2 lines, but the class list has 3" in out
    aux.write_text("cat >=a pet\ndog >=a hound\ntraffic light >=a lamp\n", encoding="utf-8")
    assert main(argv) == 0 and "OK, 3 lines" in capsys.readouterr().out
    assert main([*argv[:-1], "--kind", "synonyms"]) == 1  # without --background the counts differ
    assert main(["texts", "check", "--classes", str(class_file), "--aux", str(tmp_path / "none.txt")]) == 2
    assert "not found" in capsys.readouterr().err


# --- the real transformers path on a tiny random chat model ---------------------------------------------------------

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]
WORDS = ("a an the of and or with for to in is that which thing animal building vehicle water sky road tree person "
         "small large house car cat dog plant flying living light traffic").split()
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def tiny_chat_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised two-layer Llama with a word-level tokenizer and a chat template, saved locally."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIALS + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(SPECIALS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # special tokens get logit 0: greedy decoding then writes words, never an early end
        model.lm_head.weight[: len(SPECIALS)] = 0
    path = tmp_path_factory.mktemp("tiny-chat-model")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_render_prompt_uses_the_chat_template_or_falls_back(tiny_chat_model: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_model)
    messages = build_messages("cat", "definitions")
    text, templated = render_prompt(tokenizer, messages)
    assert templated and text.startswith("<|system|> You write") and text.endswith("<|user|> cat >= </s> <|assistant|>")
    tokenizer.chat_template = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system turn') }}{% endif %}" + CHAT_TEMPLATE
    )
    text, templated = render_prompt(tokenizer, messages)
    assert templated and text.startswith("<|user|> You write") and "<|system|>" not in text
    assert text.endswith("\n\ncat >= </s> <|assistant|>")
    tokenizer.chat_template = None
    assert render_prompt(tokenizer, messages) == (plain_prompt(messages), False)


def test_chat_model_generator_decodes_deterministically(tiny_chat_model: Path) -> None:
    generator = ChatModelGenerator(tiny_chat_model, device="cpu")
    messages = build_messages("dog", "synonyms")
    greedy = Decoding(max_new_tokens=6, sample=False, temperature=0.6, top_p=0.9, seed=0)
    first = generator(messages, greedy)
    assert first == generator(messages, Decoding(6, False, 0.6, 0.9, seed=123))  # greedy ignores the seed
    assert 1 <= len(first.split()) <= 6 and set(first.split()) <= set(WORDS)
    sampled = [generator(messages, Decoding(6, True, 1.0, 1.0, seed=s)) for s in (1, 1, 2)]
    assert sampled[0] == sampled[1] != sampled[2]


def test_chat_model_generator_names_a_missing_model(tmp_path: Path) -> None:
    with pytest.raises(GenerationError, match="could not load the chat model"):
        ChatModelGenerator(tmp_path / "missing-model", device="cpu")


def test_texts_generate_end_to_end(
    tiny_chat_model: Path, class_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def run(out: Path, *extra: str) -> int:
        return main(["texts", "generate", "--classes", str(class_file), "--kind", "definitions", "--model",
                     str(tiny_chat_model), "--out", str(out), "--background", "--max-new-tokens", "8",
                     "--device", "cpu", "--no-progress", *extra])

    first, second = tmp_path / "first.txt", tmp_path / "second.txt"
    assert run(first) == 0 and run(second) == 0
    assert first.read_bytes() == second.read_bytes()
    vocab = read_class_file(class_file)
    aux = read_aux_file(first)
    check_aux_matches(aux, vocab, background=True, source=str(first))
    assert [name for name, _ in aux] == NAMES
    for _, text in aux:
        assert text == text.strip() and 1 <= len(text.split()) <= 8 and set(text.split()) <= set(WORDS)
    assert "3/3 definitions lines (0 kept from an earlier run, 3 generated)" in capsys.readouterr().out
    assert main(["texts", "check", "--classes", str(class_file), "--aux", str(first), "--background"]) == 0

    # Sampling with a seed: reproducible, and a resumed run writes what an uninterrupted one wrote.
    sampled, resumed = tmp_path / "sampled.txt", tmp_path / "resumed.txt"
    assert run(sampled, "--sample", "--seed", "3") == 0
    lines = sampled.read_text(encoding="utf-8").splitlines(keepends=True)
    assert len(lines) == 3 and sampled.read_bytes() != first.read_bytes()
    resumed.write_text(lines[0], encoding="utf-8")
    capsys.readouterr()
    assert run(resumed, "--sample", "--seed", "3") == 0
    assert resumed.read_bytes() == sampled.read_bytes()
    assert "(1 kept from an earlier run, 2 generated)" in capsys.readouterr().out
