"""Dense readouts ("dense methods"): the stage that turns windows into patch logits (see `base`), and the presets
of the method zoo (`presets`). The readout names are imported on first use, so that reading the presets does not
load torch."""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["DENSE_READOUTS", "DenseReadout", "TokensReadout", "get_readout", "readout_class", "register_readout"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        value = getattr(importlib.import_module("itaclip_core.methods.base"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'itaclip_core.methods' has no attribute {name!r}")
