"""Dense CLIP features: the image tower with its last block(s) re-wired for segmentation.

A `DenseConfig` says which attention variant each block uses and how the last block is built:
- plain CLIP: query-key attention everywhere, last block unchanged;
- SCLIP: self-self attention in the last block, residual and MLP kept;
- ITACLIP: the attention maps of intermediate blocks (7, 8, 10 of 12, 1-based; self-self) are averaged and fused
  with the last block's own map (weight 0.5 each), applied to the last block's values; the last block keeps its
  residual and drops its MLP.

The output is every token (class token first) through `ln_post` and the projection, not normalised.

Fusion is linear in the maps, so instead of storing intermediate N x N maps the queries and keys of the fused blocks
are kept and each map is applied to the last block's values with fused attention kernels:
`(w A_last + (1 - w) mean_i A_i) v = w A_last v + (1 - w) mean_i (A_i v)`. `explicit=True` computes the maps and
mixes them as written, for inspection and to test the fast path.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from itaclip_core.attention.variants import get_attention
from itaclip_core.model.clip import VisionTransformer


@dataclass(frozen=True)
class DenseConfig:
    """How the image tower is run for dense features. Block numbers are 1-based, as in the papers."""

    variant: str = "selfself"  # attention variant of the last block (a name in ATTENTION_VARIANTS)
    fuse_blocks: tuple[int, ...] = ()  # intermediate blocks whose attention maps are fused into the last block's
    fuse_variant: str | None = None  # variant used for the fused blocks' maps (None: same as `variant`)
    fuse_weight: float = 0.5  # weight of the last block's own map; the fused blocks' mean gets 1 - fuse_weight
    last_residual: bool = True  # keep the last block's residual connection around attention
    last_mlp: bool = True  # keep the last block's MLP
    block_variants: tuple[tuple[int, str], ...] = field(default=())  # (block, variant) for earlier blocks

    def to_dict(self) -> dict:
        return asdict(self)


DENSE_METHODS: dict[str, DenseConfig] = {
    "clip": DenseConfig(variant="qk"),
    "sclip": DenseConfig(variant="selfself"),
    "itaclip": DenseConfig(variant="selfself", fuse_blocks=(7, 8, 10), fuse_weight=0.5, last_mlp=False),
    "clearclip": DenseConfig(variant="qq", last_residual=False, last_mlp=False),
}


def _check(config: DenseConfig, num_blocks: int) -> None:
    for block in config.fuse_blocks:
        if not 1 <= block < num_blocks:
            raise ValueError(
                f"fuse_blocks must name blocks 1..{num_blocks - 1} (1-based, before the last); got {block}"
            )
    for block, _ in config.block_variants:
        if not 1 <= block < num_blocks:
            raise ValueError(f"block_variants must name blocks 1..{num_blocks - 1}; got {block}")
    if not 0.0 <= config.fuse_weight <= 1.0:
        raise ValueError(f"fuse_weight must be in [0, 1], got {config.fuse_weight}")


def dense_tokens(
    visual: VisionTransformer, images: torch.Tensor, config: DenseConfig, explicit: bool = False
) -> torch.Tensor:
    """Dense features (B, 1 + rows * cols, output_dim) of images (B, 3, H, W) under `config`."""
    blocks = visual.blocks
    _check(config, len(blocks))
    fuse = set(config.fuse_blocks)
    replaced = {block: get_attention(name) for block, name in config.block_variants}
    last_variant = get_attention(config.variant)
    fuse_variant = get_attention(config.fuse_variant or config.variant)

    x = visual.embed(images)  # (B, 1 + N, width)
    kept: list[tuple[torch.Tensor, torch.Tensor]] = []  # (q, k) of the fused blocks
    for number, block in enumerate(blocks[:-1], start=1):
        q, k, v = block.qkv(x)  # each (B, H, 1 + N, hd)
        if number in fuse:
            kept.append((q, k))
        variant = replaced.get(number)
        out = variant.apply(q, k, v) if variant else F.scaled_dot_product_attention(q, k, v)
        x = block.attend(x, out)

    last = blocks[-1]
    q, k, v = last.qkv(x)
    if explicit:
        attn = last_variant.attention_map(q, k)  # (B, H, 1 + N, 1 + N)
        if kept:
            mean_map = torch.stack([fuse_variant.attention_map(qi, ki) for qi, ki in kept]).mean(dim=0)
            attn = config.fuse_weight * attn + (1.0 - config.fuse_weight) * mean_map
        out = torch.matmul(attn, v)
    else:
        out = last_variant.apply(q, k, v)
        if kept:
            fused = sum(fuse_variant.apply(qi, ki, v) for qi, ki in kept) / len(kept)
            out = config.fuse_weight * out + (1.0 - config.fuse_weight) * fused
    x = last.attend(x, out, residual=config.last_residual, mlp=config.last_mlp)
    return visual.head(x)


def attention_maps(
    visual: VisionTransformer, images: torch.Tensor, config: DenseConfig
) -> dict[str, torch.Tensor]:
    """The attention maps `dense_tokens` uses, for inspection: `last` (the last block's own map), `block<N>` for
    each fused block, and `fused` (what is applied to the values). Each (B, H, 1 + N, 1 + N), float32."""
    blocks = visual.blocks
    _check(config, len(blocks))
    replaced = {block: get_attention(name) for block, name in config.block_variants}
    fuse_variant = get_attention(config.fuse_variant or config.variant)
    maps: dict[str, torch.Tensor] = {}
    x = visual.embed(images)
    for number, block in enumerate(blocks[:-1], start=1):
        q, k, v = block.qkv(x)
        if number in config.fuse_blocks:
            maps[f"block{number}"] = fuse_variant.attention_map(q, k).float()
        variant = replaced.get(number)
        x = block.attend(x, variant.apply(q, k, v) if variant else F.scaled_dot_product_attention(q, k, v))
    q, k, _ = blocks[-1].qkv(x)
    maps["last"] = get_attention(config.variant).attention_map(q, k).float()
    fused = maps["last"]
    if config.fuse_blocks:
        mean_map = torch.stack([maps[f"block{b}"] for b in config.fuse_blocks]).mean(dim=0)
        fused = config.fuse_weight * fused + (1.0 - config.fuse_weight) * mean_map
    maps["fused"] = fused
    return maps
