"""Mask proposals (superpixels, SAM, SAM 2, precomputed folders), their disk cache, and their uses: the vote of
the dense prediction inside each mask, mask-scoped attention (CorrCLIP style) and proxy attention (ProxyCLIP)."""

from __future__ import annotations

import importlib
from typing import Any

# Each public name and the module that defines it; imported on first use, so that reading the presets (and
# `itaclip --help`) does not load torch.
_EXPORTS = {
    "ExtraNotInstalledError": "itaclip_core.masks.extras",
    "GENERATOR_PRESETS": "itaclip_core.masks.config",
    "MASK_SOURCES": "itaclip_core.masks.sources",
    "MaskCache": "itaclip_core.masks.cache",
    "MaskError": "itaclip_core.masks.maskset",
    "MaskSet": "itaclip_core.masks.maskset",
    "MaskSource": "itaclip_core.masks.sources",
    "PAINT_ORDERS": "itaclip_core.masks.voting",
    "SamGeneratorConfig": "itaclip_core.masks.config",
    "SuperpixelConfig": "itaclip_core.masks.config",
    "VOTE_RULES": "itaclip_core.masks.voting",
    "as_mask_set": "itaclip_core.masks.maskset",
    "build_mask_source": "itaclip_core.masks.sources",
    "generator_config": "itaclip_core.masks.config",
    "mask_source_names": "itaclip_core.masks.sources",
    "partition": "itaclip_core.masks.voting",
    "read_mask_file": "itaclip_core.masks.sources",
    "register_mask_source": "itaclip_core.masks.sources",
    "vote_features": "itaclip_core.masks.voting",
    "vote_logits": "itaclip_core.masks.voting",
    "vote_mode": "itaclip_core.masks.voting",
    "vote_probs": "itaclip_core.masks.voting",
}

__all__ = [
    "GENERATOR_PRESETS", "MASK_SOURCES", "PAINT_ORDERS", "VOTE_RULES", "ExtraNotInstalledError", "MaskCache",
    "MaskError", "MaskSet", "MaskSource", "SamGeneratorConfig", "SuperpixelConfig", "as_mask_set",
    "build_mask_source", "generator_config", "mask_source_names", "partition", "read_mask_file",
    "register_mask_source", "vote_features", "vote_logits", "vote_mode", "vote_probs",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'itaclip_core.masks' has no attribute {name!r}")
