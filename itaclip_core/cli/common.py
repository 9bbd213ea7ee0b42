"""What every `itaclip` sub-command shares: the common flags, their help wording, and checks of paths and numbers.

Flags (add them with these functions so that every command spells and explains them the same way):

- `add_weights_argument`: `--weights` with every accepted form and the default;
- `add_device_argument`: `--device` (cpu, cuda, cuda:N; default CUDA when available);
- `add_dtype_argument`: `--dtype` (float32, float16, bfloat16; default float16 on CUDA, float32 on CPU);
- `add_progress_argument`: `--no-progress` (also spelt `-q` / `--quiet`), read back as `args.no_progress`;
- `add_set_argument`: `--set KEY=VALUE` (repeatable), read back as `args.overrides`.

Errors: raise `itaclip_core.errors.UserError` (or a subclass) from a command; `itaclip_core.cli.main` prints
`itaclip COMMAND: error: MESSAGE` and exits with status 2, without a traceback. `CliError` is the plain form.
Number flags use `positive_int`, `non_negative_int`, `positive_float`, `probability` as argparse types.

Nothing here imports torch: `itaclip --help` stays fast.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Iterable, Sequence

from itaclip_core.errors import UserError

# The names `load_clip` downloads (itaclip_core.model.weights.REGISTRY; a test keeps the two in step).
MODEL_NAMES = ("ViT-B/16", "ViT-B/32", "ViT-L/14", "ViT-L/14@336px")
DEFAULT_WEIGHTS = "ViT-B/16"
WEIGHTS_FORMS = (
    f"a model name ({', '.join(MODEL_NAMES)}; downloaded once into the verified cache ~/.cache/itaclip or "
    "$ITACLIP_CACHE), a checkpoint file (TorchScript or OpenAI-layout state dict), or random-tiny / "
    "random-vit-b-16 (optionally :SEED) for a random test model"
)
DTYPE_NAMES = ("float32", "float16", "bfloat16")


class CliError(UserError):
    """A bad command-line input found by a command itself (exit status 2)."""


# ------------------------------------------------------------------------------------------------ flags
def add_weights_argument(parser: argparse.ArgumentParser, default: str = DEFAULT_WEIGHTS) -> None:
    parser.add_argument("--weights", default=default, metavar="WEIGHTS",
                        help=f"CLIP weights: {WEIGHTS_FORMS} (default: {default})")  # fmt: skip


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, metavar="DEVICE",
                        help="cpu, cuda or cuda:N (default: cuda when a GPU is usable, else cpu)")  # fmt: skip


def add_dtype_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", default=None, choices=DTYPE_NAMES,
                        help="model precision (default: float16 on CUDA, float32 on the CPU)")  # fmt: skip


def add_progress_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-progress", "-q", "--quiet", dest="no_progress", action="store_true",
                        help="hide progress bars")  # fmt: skip


def add_set_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="change a setting of the preset (repeatable), e.g. --set stride=56; "
                        "lists as --set fuse_blocks=7,8,10; none as --set area_thd=none")  # fmt: skip


# ------------------------------------------------------------------------------------------------ argparse types
def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {value}")
    return value


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    value = _float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {value:g}")
    return value


def probability(text: str) -> float:
    """argparse type: a number in (0, 1]."""
    value = _float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value:g}")
    return value


# ------------------------------------------------------------------------------------------------ path checks
def check_output_dir(path: str | Path, flag: str) -> Path:
    """An output folder that can be created or written to (it is not created here).

    Raises:
        CliError: the path is a file, or neither it nor its nearest existing parent is writable.
    """
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise CliError(f"{flag} {path} is a file; give a folder for the outputs")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise CliError(f"{flag} {path}: {existing} is a file, so the folder cannot be created")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CliError(f"{flag} {path}: {existing} is not writable")
    return path


def check_output_file(path: str | Path, flag: str) -> Path:
    """An output file whose folder can be created or written to."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise CliError(f"{flag} {path} is a folder; give a file name")
    check_output_dir(path.parent, flag)
    return path


def check_input_file(path: str | Path, flag: str, what: str = "file") -> Path:
    """An existing file (not a folder)."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise CliError(f"{flag} {path} is a folder; give the {what}")
    if not path.is_file():
        raise CliError(f"{flag} {path}: {what} not found")
    return path


def check_input_files(paths: Sequence[str | Path], what: str = "image") -> list[Path]:
    """Existing files for positional arguments: one error naming every missing path or folder (the first few)."""
    bad: list[str] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_dir():
            bad.append(f"{path} is a folder (give the {what} files inside it, e.g. {path}/*.jpg)")
        elif not path.is_file():
            bad.append(f"{path} does not exist")
    if bad:
        shown = "; ".join(bad[:3]) + (f"; and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise CliError(f"{len(bad)} of {len(paths)} {what} path(s) cannot be used: {shown}")
    return [Path(p).expanduser() for p in paths]


def check_overrides(items: Iterable[str]) -> list[str]:
    """`--set` values have the KEY=VALUE form (the keys and values are checked with the preset)."""
    items = list(items)
    for item in items:
        if "=" not in item:
            raise CliError(f"--set {item}: expected KEY=VALUE, e.g. --set stride=56")
    return items
