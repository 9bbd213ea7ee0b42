"""`itaclip` command line: `itaclip segment`, `itaclip eval`, `itaclip compare`, `itaclip data ...`,
`itaclip texts ...`, `itaclip masks ...`.

Each sub-command lives in its own module in this package and exposes `register(subparsers)`, which adds its
parser and sets `func` (called with the parsed arguments, returning an exit status). Registering must not import
torch (so that `itaclip --help` is fast): import heavy modules inside `func`. Shared flags and checks are in
`itaclip_core.cli.common`.

Exit status: 0 when the work was done; 1 when part of it failed or a check found problems (said by each
command); 2 for a bad invocation or input: `main` catches the project's `UserError` (bad input, setting, file,
weights, device or missing extra) and prints `itaclip COMMAND: error: MESSAGE` in one or two lines, without a
traceback; 130 when interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Sequence

from itaclip_core.errors import UserError

_COMMAND_MODULES = ("segment", "eval", "compare", "data", "texts", "masks")

# Callers that name the flags differently (e.g. `make demo`) list their spellings in this variable, as
# `--weights=WEIGHTS=;--out=DEMO_OUT=`: error messages then say `WEIGHTS=...` where they would say `--weights ...`.
FLAG_NAMES_VARIABLE = "ITACLIP_FLAG_NAMES"


def _version() -> str:
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("itaclip-core")
    except PackageNotFoundError:  # a source tree that is not installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="itaclip", description="Training-free open-vocabulary semantic segmentation with CLIP (ITACLIP, SCLIP).",
        epilog="Bad inputs give a one- or two-line error and exit status 2; see README 'When something is wrong'.",
    )
    parser.add_argument("--version", action="version", version=f"itaclip-core {_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as error:
            if error.name == f"{__name__}.{name}":
                continue
            raise
        module.register(subparsers)
    return parser


def in_caller_terms(message: str) -> str:
    """`message` with the flags renamed as the caller spells them (`FLAG_NAMES_VARIABLE`)."""
    spec = os.environ.get(FLAG_NAMES_VARIABLE, "")
    for item in filter(None, spec.split(";")):
        flag, sep, name = item.partition("=")
        if sep and flag.startswith("--"):
            message = message.replace(f"{flag} ", name).replace(flag, name.rstrip("="))
    return message


def report_error(prog: str, error: UserError) -> None:
    """Print a user error the command-line way: `PROG: error: MESSAGE` on stderr."""
    print(f"{prog}: error: {in_caller_terms(error.for_cli())}", file=sys.stderr)


def note(prog: str, message: str) -> None:
    """Print a note (a changed setting, a warning about an input) on stderr."""
    print(f"{prog}: note: {in_caller_terms(message)}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help, --version, or a usage error (argparse printed it)
        return int(stop.code or 0) if not isinstance(stop.code, str) else 2
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    prog = " ".join(["itaclip"] + [p for p in (args.command, getattr(args, "data_command", None),
                                               getattr(args, "texts_action", None)) if p])  # fmt: skip
    try:
        return int(args.func(args) or 0)
    except UserError as error:
        report_error(prog, error)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; finished work is kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
