"""Attention variants for dense CLIP features, in a registry.

A variant turns one block's queries and keys into an attention map, (B, H, N, N), rows summing to the variant's
mass (1 for query-key attention, 2 for self-self attention, which adds two softmax maps). `apply` computes
`attention_map(q, k) @ v` without materialising the map where PyTorch's fused attention can do it; a test holds the
two paths equal.

Adding a variant is one class:

    @register_attention("my-variant")
    class MyAttention(AttentionVariant):
        def attention_map(self, q, k, context=None):
            ...

The interface a variant sees (the only one; the engine has no per-method branches):
- `attention_map(q, k, context)` and `apply(q, k, v, context)`. `q`, `k`, `v` are (B, H, N, hd), N = 1 + rows *
  cols with the class token first. `context` is an `AttentionContext` (or None when a caller has none):
  - `rows`, `cols`: the patch grid of these tokens (NACLIP's Gaussian needs it);
  - `block`, `num_blocks`: which block (1-based) this is, of how many;
  - `kept`: {block: (q, k)} of the earlier blocks the dense config keeps (`DenseConfig.fuse_blocks` and
    `DenseConfig.keep_blocks`), from which a variant can rebuild those blocks' maps;
  - `tokens`: {block: output tokens (B, N, width)} of the blocks in `DenseConfig.keep_tokens`;
  - `extras`: whatever a dense readout (`itaclip_core.methods`) computed for this batch, e.g. ResCLIP's SFR matrix
    under `"sfr_affinity"` ((B, 1, N, N)).
  A variant that needs a context entry says so in `requires` ("grid", "extras:<key>"); `require` raises a clear
  error when it is missing.
- Settings: a variant's constructor takes keyword parameters; `settings` maps each parameter to the
  `SegmentorConfig` field it is read from (e.g. NACLIP's `sigma` from `neighbourhood_sigma`), so presets and
  `--set` reach them without the engine knowing the variant.
"""

from __future__ import annotations

import functools
import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, TypeVar

import torch
import torch.nn.functional as F

from itaclip_core.model.kernels import attention

ATTENTION_VARIANTS: dict[str, type["AttentionVariant"]] = {}

_V = TypeVar("_V", bound=type["AttentionVariant"])


def register_attention(name: str) -> Callable[[_V], _V]:
    """Class decorator adding an attention variant to `ATTENTION_VARIANTS` under `name`."""

    def decorator(cls: _V) -> _V:
        if name in ATTENTION_VARIANTS:
            raise ValueError(f"attention variant {name!r} is already registered")
        _accept_context(cls)
        cls.name = name
        ATTENTION_VARIANTS[name] = cls
        return cls

    return decorator


def _accept_context(cls: type) -> None:
    """Let a variant written before the context existed (`attention_map(self, q, k)`) be called with one."""
    for method in ("attention_map", "apply"):
        function = cls.__dict__.get(method)
        if function is None or "context" in inspect.signature(function).parameters:
            continue

        count = len(inspect.signature(function).parameters) - 1  # q, k (and v) after self

        def wrapped(self, *args, context=None, _function=function, _count=count):  # noqa: ANN001
            return _function(self, *args[:_count])

        setattr(cls, method, functools.wraps(function)(wrapped))


def attention_class(name: str) -> type["AttentionVariant"]:
    """The class registered as `name` (a ValueError listing the registered names if there is none)."""
    try:
        return ATTENTION_VARIANTS[name]
    except KeyError:
        raise ValueError(
            f"unknown attention variant {name!r}; registered: {', '.join(sorted(ATTENTION_VARIANTS))}"
        ) from None


def get_attention(name: str, **params: Any) -> "AttentionVariant":
    """An instance of the variant registered as `name`, with its keyword parameters."""
    cls = attention_class(name)
    unknown = set(params) - set(cls.settings)
    if unknown:
        allowed = ", ".join(sorted(cls.settings)) or "none"
        raise ValueError(f"attention variant {name!r} takes no parameter(s) {', '.join(sorted(unknown))}; "
                         f"its parameters: {allowed}")
    return cls(**params)


@dataclass
class AttentionContext:
    """What a variant may know besides its block's q, k, v (see the module docstring)."""

    rows: int  # patch-grid rows of the tokens
    cols: int  # patch-grid columns
    block: int = 0  # 1-based number of the block being computed (0: unknown)
    num_blocks: int = 0  # blocks in the tower
    kept: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # block -> (q, k)
    tokens: dict[int, torch.Tensor] = field(default_factory=dict)  # block -> output tokens (B, N, width)
    extras: dict[str, Any] = field(default_factory=dict)  # per-batch inputs computed by a dense readout

    @property
    def num_patches(self) -> int:
        return self.rows * self.cols


def _softmax_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """softmax(a b^T / sqrt(head_dim)) over the last axis; a, b: (B, H, N, hd) -> (B, H, N, N)."""
    scale = a.shape[-1] ** -0.5
    return F.softmax(torch.matmul(a, b.transpose(-1, -2)) * scale, dim=-1)


class AttentionVariant:
    """Base class: an attention map from queries and keys, applied to values."""

    name: ClassVar[str] = ""
    # constructor parameter -> SegmentorConfig field it is read from
    settings: ClassVar[dict[str, str]] = {}
    # context entries the variant needs: "grid" (rows and cols), "extras:<key>"
    requires: ClassVar[tuple[str, ...]] = ()

    def require(self, context: AttentionContext | None, num_tokens: int) -> AttentionContext:
        """The context, checked against `requires` and the token count (1 + rows * cols)."""
        if context is None:
            raise ValueError(f"attention variant {self.name!r} needs an AttentionContext ({', '.join(self.requires)})")
        if "grid" in self.requires and 1 + context.rows * context.cols != num_tokens:
            raise ValueError(f"attention variant {self.name!r}: the context's grid {context.rows}x{context.cols} does "
                             f"not match {num_tokens} tokens (expected 1 + rows * cols, class token first)")
        for need in self.requires:
            if need.startswith("extras:") and need[len("extras:"):] not in context.extras:
                raise ValueError(f"attention variant {self.name!r} needs context.extras[{need[7:]!r}], which only "
                                 "its dense readout provides (see itaclip_core.methods)")
        return context

    def attention_map(
        self, q: torch.Tensor, k: torch.Tensor, context: AttentionContext | None = None
    ) -> torch.Tensor:
        """(B, H, N, hd) queries and keys -> (B, H, N, N) attention weights."""
        raise NotImplementedError

    def apply(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, context: AttentionContext | None = None
    ) -> torch.Tensor:
        """Attention output (B, H, N, hd); the default multiplies the explicit map with the values."""
        return torch.matmul(self.attention_map(q, k, context), v)


@register_attention("qk")
class QueryKeyAttention(AttentionVariant):
    """Ordinary attention, softmax(q k^T / sqrt(d))."""

    def attention_map(
        self, q: torch.Tensor, k: torch.Tensor, context: AttentionContext | None = None
    ) -> torch.Tensor:
        return _softmax_similarity(q, k)

    def apply(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, context: AttentionContext | None = None
    ) -> torch.Tensor:
        return attention(q, k, v)


@register_attention("selfself")
class SelfSelfAttention(AttentionVariant):
    """SCLIP's correlative self-attention as used by ITACLIP: softmax(q q^T / sqrt(d)) + softmax(k k^T / sqrt(d))."""

    def attention_map(
        self, q: torch.Tensor, k: torch.Tensor, context: AttentionContext | None = None
    ) -> torch.Tensor:
        return _softmax_similarity(q, q) + _softmax_similarity(k, k)

    def apply(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, context: AttentionContext | None = None
    ) -> torch.Tensor:
        # (A + B) v = A v + B v: two fused attention calls instead of two N x N maps.
        return attention(q, q, v) + attention(k, k, v)


@register_attention("qq")
class QueryQueryAttention(AttentionVariant):
    """Query-query attention, softmax(q q^T / sqrt(d)) (ClearCLIP's choice)."""

    def attention_map(
        self, q: torch.Tensor, k: torch.Tensor, context: AttentionContext | None = None
    ) -> torch.Tensor:
        return _softmax_similarity(q, q)

    def apply(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, context: AttentionContext | None = None
    ) -> torch.Tensor:
        return attention(q, q, v)


@register_attention("kk")
class KeyKeyAttention(AttentionVariant):
    """Key-key attention, softmax(k k^T / sqrt(d))."""

    def attention_map(
        self, q: torch.Tensor, k: torch.Tensor, context: AttentionContext | None = None
    ) -> torch.Tensor:
        return _softmax_similarity(k, k)

    def apply(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, context: AttentionContext | None = None
    ) -> torch.Tensor:
        return attention(k, k, v)


# ------------------------------------------------------------------------------------------------ NACLIP, ResCLIP
_BIAS_CACHE: dict[tuple, torch.Tensor] = {}


def neighbourhood_bias(rows: int, cols: int, sigma: float, device: torch.device | str = "cpu",
                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """NACLIP's additive attention bias Omega, (1 + P, 1 + P), P = rows * cols, class token first.

    `Omega[(i, j), (k, l)] = exp(-((i - k)^2 + (j - l)^2) / (2 sigma^2))` between patches (1 on the diagonal), 0 on
    the class token's row and column. The Gaussian is evaluated as NACLIP does (a (2 rows - 1) x (2 cols - 1) window
    on `linspace` coordinates scaled by 1 / (sigma sqrt 2)), so the values are the published ones bit for bit.
    Cached per grid, sigma, device and dtype (it is small: (1 + P)^2).
    """
    if sigma <= 0:
        raise ValueError(f"neighbourhood_sigma must be > 0 (in patches), got {sigma}")
    key = (rows, cols, float(sigma), str(device), dtype)
    cached = _BIAS_CACHE.get(key)
    if cached is not None:
        return cached
    constant = 1.0 / (sigma * math.sqrt(2.0))
    axes = []
    for size in (2 * rows - 1, 2 * cols - 1):
        start = -(size - 1) / 2.0
        axes.append(torch.linspace(start * constant, (start + (size - 1)) * constant, steps=size, dtype=torch.float))
    window = torch.exp(-(axes[0][:, None] ** 2 + axes[1][None, :] ** 2))  # (2 rows - 1, 2 cols - 1)
    r = torch.arange(rows)
    c = torch.arange(cols)
    # Omega[(i, j), (k, l)] = window[i - k + rows - 1, j - l + cols - 1]
    dr = (r[:, None, None, None] - r[None, None, :, None] + rows - 1).expand(rows, cols, rows, cols)
    dc = (c[None, :, None, None] - c[None, None, None, :] + cols - 1).expand(rows, cols, rows, cols)
    patches = window[dr, dc].reshape(rows * cols, rows * cols)
    bias = torch.zeros(1 + rows * cols, 1 + rows * cols)
    bias[1:, 1:] = patches
    bias = bias.to(device=device, dtype=dtype)
    if len(_BIAS_CACHE) > 64:
        _BIAS_CACHE.clear()
    _BIAS_CACHE[key] = bias
    return bias


@register_attention("naclip")
class NeighbourhoodAttention(AttentionVariant):
    """NACLIP's neighbourhood-aware attention: softmax(k k^T / sqrt(d) + Omega), Omega a Gaussian of the patch
    distance (`neighbourhood_bias`, sigma in patches), the same for all heads. Needs the patch grid."""

    settings = {"sigma": "neighbourhood_sigma"}
    requires = ("grid",)

    def __init__(self, sigma: float = 5.0) -> None:
        if not sigma > 0:
            raise ValueError(f"neighbourhood_sigma must be > 0 (in patches), got {sigma}")
        self.sigma = float(sigma)

    def _bias(self, k: torch.Tensor, context: AttentionContext | None) -> torch.Tensor:
        context = self.require(context, k.shape[-2])
        return neighbourhood_bias(context.rows, context.cols, self.sigma, k.device, k.dtype)

    def attention_map(
        self, q: torch.Tensor, k: torch.Tensor, context: AttentionContext | None = None
    ) -> torch.Tensor:
        scale = k.shape[-1] ** -0.5
        return F.softmax(torch.matmul(k, k.transpose(-1, -2)) * scale + self._bias(k, context), dim=-1)

    def apply(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, context: AttentionContext | None = None
    ) -> torch.Tensor:
        return F.scaled_dot_product_attention(k, k, v, attn_mask=self._bias(k, context))


@register_attention("resclip")
class SemanticFeedbackAttention(AttentionVariant):
    """ResCLIP's last-block attention: softmax(tau [(1 - lam) k k^T / sqrt(d) + lam S] + Omega).

    `S` is the SFR matrix of this batch, `context.extras["sfr_affinity"]` ((B, 1, N, N), divided by its maximum and
    cast as the readout decides; see `itaclip_core.methods.resclip`; `lam S` is computed in S's dtype, as the
    official code's float16 S does); without it (ResCLIP's first pass) this is
    NACLIP's attention. Omega is NACLIP's bias, not scaled by tau. RCS (the mean query-key map of earlier blocks) is
    mixed in by the dense config's fusion (`fuse_blocks`, `fuse_weight` = 1 - lambda_rcs, `attention_scale` = tau_rcs).
    """

    settings = {"sigma": "neighbourhood_sigma", "tau": "sfr_tau", "lam": "sfr_lambda"}
    requires = ("grid",)

    def __init__(self, sigma: float = 5.0, tau: float = 1.0, lam: float = 0.0) -> None:
        if not sigma > 0:
            raise ValueError(f"neighbourhood_sigma must be > 0 (in patches), got {sigma}")
        self.sigma = float(sigma)
        self.tau = float(tau)
        self.lam = float(lam)

    def _parts(self, k: torch.Tensor, context: AttentionContext | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        context = self.require(context, k.shape[-2])
        bias = neighbourhood_bias(context.rows, context.cols, self.sigma, k.device, k.dtype)
        return bias, context.extras.get("sfr_affinity")

    def attention_map(
        self, q: torch.Tensor, k: torch.Tensor, context: AttentionContext | None = None
    ) -> torch.Tensor:
        bias, affinity = self._parts(k, context)
        logits = torch.matmul(k, k.transpose(-1, -2)) * (k.shape[-1] ** -0.5)
        if affinity is not None:
            logits = self.tau * ((1 - self.lam) * logits + (self.lam * affinity).to(logits.dtype))
        return F.softmax(logits + bias, dim=-1)

    def apply(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, context: AttentionContext | None = None
    ) -> torch.Tensor:
        bias, affinity = self._parts(k, context)
        if affinity is None:
            return F.scaled_dot_product_attention(k, k, v, attn_mask=bias)
        # lambda S is formed in the affinity's own dtype (float16 in ResCLIP's code, which rounds the product too)
        mask = self.tau * (self.lam * affinity).to(k.dtype) + bias  # (B, 1, N, N), one map per batch item
        scale = self.tau * (1 - self.lam) * k.shape[-1] ** -0.5
        if scale == 0.0:  # the key-key term is switched off: the map is softmax(mask), built explicitly
            return torch.matmul(F.softmax(mask, dim=-1).expand(*k.shape[:2], -1, -1), v)
        return F.scaled_dot_product_attention(k, k, v, attn_mask=mask, scale=scale)
