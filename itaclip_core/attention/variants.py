"""Attention variants for dense CLIP features, in a registry.

A variant turns one block's queries and keys into an attention map, (B, H, N, N), rows summing to the variant's
mass (1 for query-key attention, 2 for self-self attention, which adds two softmax maps). `apply` computes
`attention_map(q, k) @ v` without materialising the map where PyTorch's fused attention can do it; a test holds the
two paths equal.

Adding a variant is one class:

    @register_attention("my-variant")
    class MyAttention(AttentionVariant):
        def attention_map(self, q, k):
            ...
"""

from __future__ import annotations

from typing import Callable, ClassVar, TypeVar

import torch
import torch.nn.functional as F

ATTENTION_VARIANTS: dict[str, type["AttentionVariant"]] = {}

_V = TypeVar("_V", bound=type["AttentionVariant"])


def register_attention(name: str) -> Callable[[_V], _V]:
    """Class decorator adding an attention variant to `ATTENTION_VARIANTS` under `name`."""

    def decorator(cls: _V) -> _V:
        if name in ATTENTION_VARIANTS:
            raise ValueError(f"attention variant {name!r} is already registered")
        cls.name = name
        ATTENTION_VARIANTS[name] = cls
        return cls

    return decorator


def get_attention(name: str) -> "AttentionVariant":
    """An instance of the variant registered as `name`."""
    try:
        return ATTENTION_VARIANTS[name]()
    except KeyError:
        raise ValueError(
            f"unknown attention variant {name!r}; registered: {', '.join(sorted(ATTENTION_VARIANTS))}"
        ) from None


def _softmax_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """softmax(a b^T / sqrt(head_dim)) over the last axis; a, b: (B, H, N, hd) -> (B, H, N, N)."""
    scale = a.shape[-1] ** -0.5
    return F.softmax(torch.matmul(a, b.transpose(-1, -2)) * scale, dim=-1)


class AttentionVariant:
    """Base class: an attention map from queries and keys, applied to values."""

    name: ClassVar[str] = ""

    def attention_map(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """(B, H, N, hd) queries and keys -> (B, H, N, N) attention weights."""
        raise NotImplementedError

    def apply(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention output (B, H, N, hd); the default multiplies the explicit map with the values."""
        return torch.matmul(self.attention_map(q, k), v)


@register_attention("qk")
class QueryKeyAttention(AttentionVariant):
    """Ordinary attention, softmax(q k^T / sqrt(d))."""

    def attention_map(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return _softmax_similarity(q, k)

    def apply(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v)


@register_attention("selfself")
class SelfSelfAttention(AttentionVariant):
    """SCLIP's correlative self-attention as used by ITACLIP: softmax(q q^T / sqrt(d)) + softmax(k k^T / sqrt(d))."""

    def attention_map(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return _softmax_similarity(q, q) + _softmax_similarity(k, k)

    def apply(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # (A + B) v = A v + B v: two fused attention calls instead of two N x N maps.
        return F.scaled_dot_product_attention(q, q, v) + F.scaled_dot_product_attention(k, k, v)


@register_attention("qq")
class QueryQueryAttention(AttentionVariant):
    """Query-query attention, softmax(q q^T / sqrt(d)) (ClearCLIP's choice)."""

    def attention_map(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return _softmax_similarity(q, q)

    def apply(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, q, v)


@register_attention("kk")
class KeyKeyAttention(AttentionVariant):
    """Key-key attention, softmax(k k^T / sqrt(d))."""

    def attention_map(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return _softmax_similarity(k, k)

    def apply(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(k, k, v)
