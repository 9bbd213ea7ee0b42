"""Where the project's data files live: the BPE vocabulary and the `texts/` tree.

In a wheel install `texts/` is shipped inside the package as `itaclip_core/texts/`; in a source checkout
(the editable install `make` uses) it is the `texts/` folder at the repository root.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent


def texts_dir() -> Path:
    """The folder holding `class_names/`, `definitions/`, `synonyms/` and `templates/`."""
    for candidate in (_PACKAGE_DIR / "texts", _PACKAGE_DIR.parent / "texts"):
        if (candidate / "templates").is_dir():
            return candidate
    raise FileNotFoundError(
        f"the texts folder was not found next to {_PACKAGE_DIR}: reinstall itaclip-core "
        "(`pip install -e .` in a checkout) so that texts/ is available"
    )


def text_file(relative: str | Path) -> Path:
    """A file under `texts/`, e.g. `text_file("class_names/itaclip/cls_voc21.txt")`."""
    path = texts_dir() / relative
    if not path.is_file():
        raise FileNotFoundError(f"texts/{relative} does not exist under {texts_dir()}")
    return path


def bpe_vocab_path() -> Path:
    """CLIP's byte-pair-encoding merges, shipped as package data."""
    return _PACKAGE_DIR / "text" / "bpe_simple_vocab_16e6.txt.gz"


def asset_path(name: str) -> Path:
    """A file under `itaclip_core/assets/` (the sample images)."""
    return _PACKAGE_DIR / "assets" / name
