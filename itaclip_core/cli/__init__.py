"""`itaclip` command line: `itaclip segment`, `itaclip eval`, `itaclip data ...`, `itaclip texts ...`.

Each sub-command lives in its own module in this package and exposes `register(subparsers)`, which adds its
parser and sets `func` (called with the parsed arguments, returning an exit status).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

_COMMAND_MODULES = ("segment", "eval", "data", "texts", "masks")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="itaclip", description="Training-free open-vocabulary semantic segmentation with CLIP (ITACLIP, SCLIP)."
    )
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
