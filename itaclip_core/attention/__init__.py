"""Attention variants (registry) and the dense readout of CLIP's image tower built on them."""

from itaclip_core.attention.dense import (
    DENSE_METHODS,
    DenseConfig,
    TowerState,
    advance,
    attention_maps,
    dense_tokens,
    last_block,
    run_trunk,
)
from itaclip_core.attention.variants import (
    ATTENTION_VARIANTS,
    AttentionContext,
    AttentionVariant,
    attention_class,
    get_attention,
    neighbourhood_bias,
    register_attention,
)

__all__ = ["ATTENTION_VARIANTS", "AttentionContext", "AttentionVariant", "DENSE_METHODS", "DenseConfig", "TowerState",
           "advance", "attention_class", "attention_maps", "dense_tokens", "get_attention", "last_block",
           "neighbourhood_bias", "register_attention", "run_trunk"]
