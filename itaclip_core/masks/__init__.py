"""Mask proposals (superpixels, SAM, SAM 2, precomputed folders), their disk cache, and their uses: the vote of
the dense prediction inside each mask, mask-scoped attention (CorrCLIP style) and proxy attention (ProxyCLIP)."""

from itaclip_core.masks.cache import MaskCache
from itaclip_core.masks.config import GENERATOR_PRESETS, SamGeneratorConfig, SuperpixelConfig, generator_config
from itaclip_core.masks.extras import ExtraNotInstalledError
from itaclip_core.masks.maskset import MaskError, MaskSet, as_mask_set
from itaclip_core.masks.sources import (
    MASK_SOURCES,
    MaskSource,
    build_mask_source,
    mask_source_names,
    read_mask_file,
    register_mask_source,
)
from itaclip_core.masks.voting import (
    PAINT_ORDERS,
    VOTE_RULES,
    partition,
    vote_features,
    vote_logits,
    vote_mode,
    vote_probs,
)

__all__ = [
    "GENERATOR_PRESETS", "MASK_SOURCES", "PAINT_ORDERS", "VOTE_RULES", "ExtraNotInstalledError", "MaskCache",
    "MaskError", "MaskSet", "MaskSource", "SamGeneratorConfig", "SuperpixelConfig", "as_mask_set",
    "build_mask_source", "generator_config", "mask_source_names", "partition", "read_mask_file",
    "register_mask_source", "vote_features", "vote_logits", "vote_mode", "vote_probs",
]
