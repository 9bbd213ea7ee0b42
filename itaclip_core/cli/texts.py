"""`itaclip texts generate` (auxiliary texts from a local chat model) and `itaclip texts check` (validate a file)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from itaclip_core.cli.common import (
    add_device_argument,
    add_progress_argument,
    check_input_file,
    check_output_file,
    non_negative_int,
    positive_float,
    positive_int,
    probability,
)
from itaclip_core.text.classes import read_class_file
from itaclip_core.text.generate import (
    KINDS,
    MAX_DEFINITION_WORDS,
    MAX_SYNONYMS,
    aux_class_names,
    check_aux_file,
    generate_aux_texts,
)


def register(subparsers: Any) -> None:
    """Add `texts` and its actions to the `itaclip` parser.

    Args:
        subparsers: the object returned by the main parser's `add_subparsers`.
    """
    texts = subparsers.add_parser(
        "texts", help="auxiliary texts (definitions, synonyms): generate with a local chat model, or check a file"
    )
    texts.set_defaults(func=lambda args: _print_help(texts))
    actions = texts.add_subparsers(dest="texts_action", metavar="ACTION")

    generate = actions.add_parser(
        "generate",
        help="write one `name >=text` line per class with a local chat model (resumable)",
        description=(
            "Ask a local chat model (through Hugging Face transformers) for a brief definition or a list of "
            "synonyms of each class and write them as `name >=text` lines. Lines are written as classes finish; "
            "running the same command again keeps them and generates only the missing ones."
        ),
    )
    generate.add_argument(
        "--classes", required=True, metavar="FILE", help="class-name file (one class a line; the first name is used)"
    )
    generate.add_argument("--kind", required=True, choices=KINDS, help="what to generate")
    generate.add_argument(
        "--model", required=True, metavar="MODEL", help="Hugging Face model id or local model directory"
    )
    generate.add_argument("--out", required=True, metavar="FILE", help="output auxiliary-text file")
    generate.add_argument(
        "--background", action="store_true", help="the first class is background and gets no line"
    )
    generate.add_argument(
        "--max-new-tokens", type=positive_int, default=128, metavar="N", help="most tokens per answer (default 128)"
    )
    generate.add_argument(
        "--max-retries", type=non_negative_int, default=3, metavar="N",
        help="sampled re-tries after an invalid answer (default 3)",
    )
    generate.add_argument("--sample", action="store_true", help="sample the first answers too (default: greedy)")
    generate.add_argument(
        "--temperature", type=positive_float, default=0.6, metavar="T", help="sampling temperature (default 0.6)"
    )
    generate.add_argument("--top-p", type=probability, default=0.9, metavar="P",
                          help="nucleus-sampling mass, in (0, 1] (default 0.9)")  # fmt: skip
    generate.add_argument("--seed", type=int, default=0, metavar="S", help="seed of every sampled answer (default 0)")
    add_device_argument(generate)
    add_progress_argument(generate)
    generate.set_defaults(func=_run_generate)

    check = actions.add_parser(
        "check",
        help="check an auxiliary-text file against its class list",
        description=(
            "Report every problem of an auxiliary-text file: line count, lines out of class order, malformed "
            f"lines, empty texts, texts over {MAX_DEFINITION_WORDS} words (or, with --kind synonyms, over "
            f"{MAX_SYNONYMS} items). Exits with status 1 when there is any."
        ),
    )
    check.add_argument("--classes", required=True, metavar="FILE", help="class-name file")
    check.add_argument("--aux", required=True, metavar="FILE", help="auxiliary-text file to check")
    check.add_argument("--background", action="store_true", help="the first class is background and has no line")
    check.add_argument("--kind", choices=KINDS, default=None, help="also check this kind's own limit")
    check.set_defaults(func=_run_check)


def _print_help(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def _run_generate(args: argparse.Namespace) -> int:
    """Generate; status 0 when every class has its line, 1 when a class failed, 2 on bad input."""
    from itaclip_core.validation import resolve_device

    check_input_file(args.classes, "--classes", "class-name file")
    check_output_file(args.out, "--out")
    names = aux_class_names(read_class_file(args.classes), args.background)
    if args.device is not None:
        resolve_device(args.device)
    report = generate_aux_texts(
        names,
        args.kind,
        args.model,
        args.out,
        max_new_tokens=args.max_new_tokens,
        max_retries=args.max_retries,
        sample=args.sample,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        device=args.device,
        progress=not args.no_progress,
    )
    print(report.summary())
    return 0 if report.ok else 1


def _run_check(args: argparse.Namespace) -> int:
    """Check; status 0 when the file is valid, 1 when it has problems, 2 on bad input."""
    check_input_file(args.classes, "--classes", "class-name file")
    check_input_file(args.aux, "--aux", "auxiliary-text file")
    vocab = read_class_file(args.classes)
    problems = check_aux_file(args.aux, vocab, background=args.background, kind=args.kind)
    count = len(aux_class_names(vocab, args.background))
    if problems:
        for problem in problems:
            print(f"{args.aux}: {problem}")
        print(f"{len(problems)} problem(s) in {args.aux}")
        return 1
    print(f"{args.aux}: OK, {count} lines match the classes of {args.classes}")
    return 0
