"""The project's user-error type: a problem with what the caller gave, reported in one or two lines.

Every error a user can cause by a bad input, a bad setting, a missing file, missing weights, a missing device or a
missing optional extra derives from `UserError`. The `itaclip` command line catches it, prints `itaclip: error: ...`
without a traceback and exits with status 2; Python callers get an exception whose message names the parameter.

A message is written in Python's terms (`stride=0`, `weights='/path/to/file.pt'`). When the command line names
the same thing differently (`--set stride=0`, `--weights /path/to/file.pt`), the error carries that wording too
(`cli=`), and the command line prints it instead.

This module imports nothing heavy: the command line uses it before torch is loaded.
"""

from __future__ import annotations


class UserError(Exception):
    """A bad input, setting, file, device or missing extra: the caller can fix it (CLI exit status 2)."""

    def __init__(self, message: str = "", *, cli: str | None = None) -> None:
        """
        Args:
            message: what is wrong and how to fix it, in Python's terms.
            cli: the same message in the command line's terms (flags), when it differs.
        """
        super().__init__(message)
        self.cli_message = cli

    def for_cli(self) -> str:
        """The message in the command line's terms."""
        return self.cli_message or str(self)


class ConfigError(UserError, ValueError):
    """A setting is unknown, of the wrong type or out of its range."""


class DeviceError(UserError, RuntimeError):
    """The requested device does not exist or is not usable here."""


class MissingExtraError(UserError, ImportError):
    """An optional dependency is not installed."""

    def __init__(self, package: str, extra: str, what: str) -> None:
        """
        Args:
            package: the importable module that is missing (e.g. "open_clip").
            extra: the project's extra that installs it (e.g. "openclip").
            what: the feature that needs it, in words.
        """
        super().__init__(
            f"{what} needs the optional package {package!r}: pip install 'itaclip-core[{extra}]' (or make install)"
        )
        self.package = package
        self.extra = extra


def short(text: str, limit: int = 60) -> str:
    """`text` cut to at most `limit` characters (an ellipsis marks the cut), for quoting inputs in messages."""
    text = str(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."
