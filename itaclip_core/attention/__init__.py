"""Attention variants (registry) and the dense readout of CLIP's image tower built on them."""

from itaclip_core.attention.dense import DENSE_METHODS, DenseConfig, attention_maps, dense_tokens
from itaclip_core.attention.variants import ATTENTION_VARIANTS, AttentionVariant, get_attention, register_attention

__all__ = ["ATTENTION_VARIANTS", "AttentionVariant", "DENSE_METHODS", "DenseConfig", "attention_maps",
           "dense_tokens", "get_attention", "register_attention"]
