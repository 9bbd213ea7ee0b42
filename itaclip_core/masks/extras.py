"""Lazy imports of the optional packages the mask sources need, with an error naming the extra that installs them."""

from __future__ import annotations

import importlib
from types import ModuleType

from itaclip_core.errors import UserError

# extra name -> (modules it provides, install hint)
EXTRAS = {
    "sam": ("segment_anything", "pip install 'itaclip-core[sam]' (or make install)"),
    "sam2": ("sam2", "SAM2_BUILD_CUDA=0 pip install --no-build-isolation 'itaclip-core[sam2]' (or make install)"),
    "dino": ("timm", "pip install 'itaclip-core[dino]' (or make install)"),
}


class ExtraNotInstalledError(UserError, ImportError):
    """An optional dependency is missing; the message says which install fixes it."""


def require(extra: str, module: str | None = None, what: str = "") -> ModuleType:
    """Import `module` (default: the extra's package), or raise `ExtraNotInstalledError` naming the extra."""
    package, hint = EXTRAS[extra]
    name = module or package
    try:
        return importlib.import_module(name)
    except ImportError as error:
        raise ExtraNotInstalledError(
            f"{what or name} needs the optional extra '{extra}' ({package}), which is not installed "
            f"({error}): {hint}"
        ) from error
