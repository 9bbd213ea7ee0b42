"""Dense CLIP features: the image tower with its last block(s) re-wired for segmentation.

A `DenseConfig` says which attention variant each block uses and how the last block is built:
- plain CLIP: query-key attention everywhere, last block unchanged;
- SCLIP: self-self attention in the last block, residual and MLP kept;
- ITACLIP: the attention maps of intermediate blocks (7, 8, 10 of 12, 1-based; self-self) are averaged and fused
  with the last block's own map (weight 0.5 each), applied to the last block's values; the last block keeps its
  residual and drops its MLP;
- NACLIP: key-key attention with a Gaussian neighbourhood bias (variant `naclip`), no residual, no MLP;
- ClearCLIP: query-query attention, no residual, no MLP;
- ResCLIP: NACLIP's attention with RCS (the mean query-key map of blocks 6-9 fused in, `fuse_weight` = 1 - lambda,
  the result scaled by `attention_scale` = tau) and SFR (variant `resclip`, fed by the `resclip` dense readout).

The output is every token (class token first) through `ln_post` and the projection, not normalised.

Fusion is linear in the maps, so instead of storing intermediate N x N maps the queries and keys of the fused blocks
are kept and each map is applied to the last block's values with fused attention kernels:
`(w A_last + (1 - w) mean_i A_i) v = w A_last v + (1 - w) mean_i (A_i v)`. `explicit=True` computes the maps and
mixes them as written, for inspection and to test the fast path.

The tower in stages (for dense readouts that need more than one last block, see `itaclip_core.methods`):
- `run_trunk(visual, images, config, stop=None) -> TowerState` runs the blocks before the last (or up to `stop`),
  keeping the (q, k) of `fuse_blocks` and `keep_blocks` and the output tokens of `keep_tokens`;
- `advance(visual, state, config, stop)` runs further blocks on a state (after a readout changed `state.x`);
- `last_block(visual, state, config, variant=None, extras=None)` finishes a state with the last block, optionally
  with another variant or extra context (a state can be finished several times: ResCLIP's two passes share blocks
  1-11);
- `dense_tokens` = `last_block(run_trunk(...))`.
Every variant call gets an `AttentionContext` (grid, block number, kept q/k, kept tokens, extras).
Block numbers are 1-based and checked against the tower's depth, so the same config works on deeper towers as
long as the blocks it names exist.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from itaclip_core.attention.variants import AttentionContext, AttentionVariant, get_attention
from itaclip_core.model.clip import VisionTransformer
from itaclip_core.model.kernels import attention
from itaclip_core.timing import timed


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
    # --- dense-method interface ---
    variant_params: tuple[tuple[str, Any], ...] = ()  # keyword parameters of the last block's variant
    attention_scale: float = 1.0  # factor on the last block's (fused) attention map (ResCLIP's RCS tau)
    keep_blocks: tuple[int, ...] = ()  # further blocks whose (q, k) go into the context
    keep_tokens: tuple[int, ...] = ()  # blocks whose output tokens go into the state / context

    def to_dict(self) -> dict:
        return asdict(self)


DENSE_METHODS: dict[str, DenseConfig] = {
    "clip": DenseConfig(variant="qk"),
    "sclip": DenseConfig(variant="selfself"),
    "itaclip": DenseConfig(variant="selfself", fuse_blocks=(7, 8, 10), fuse_weight=0.5, last_mlp=False),
    "clearclip": DenseConfig(variant="qq", last_residual=False, last_mlp=False),
    "naclip": DenseConfig(variant="naclip", last_residual=False, last_mlp=False, variant_params=(("sigma", 5.0),)),
}


@dataclass
class TowerState:
    """The token stream part-way through the tower, with what the config asked to keep."""

    x: torch.Tensor  # (B, 1 + rows * cols, width) tokens entering block `next_block`
    next_block: int  # 1-based number of the next block to run
    rows: int
    cols: int
    kept: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # block -> (q, k)
    tokens: dict[int, torch.Tensor] = field(default_factory=dict)  # block -> output tokens

    def context(self, block: int, num_blocks: int, extras: dict[str, Any] | None = None) -> AttentionContext:
        return AttentionContext(self.rows, self.cols, block, num_blocks, self.kept, self.tokens, dict(extras or {}))


def _check(config: DenseConfig, num_blocks: int) -> None:
    for block in config.fuse_blocks:
        if not 1 <= block < num_blocks:
            raise ValueError(
                f"fuse_blocks must name blocks 1..{num_blocks - 1} (1-based, before the last); got {block}"
            )
    for block, _ in config.block_variants:
        if not 1 <= block < num_blocks:
            raise ValueError(f"block_variants must name blocks 1..{num_blocks - 1}; got {block}")
    for name, blocks in (("keep_blocks", config.keep_blocks), ("keep_tokens", config.keep_tokens)):
        for block in blocks:
            if not 1 <= block <= num_blocks:
                raise ValueError(f"{name} must name blocks 1..{num_blocks}; got {block}")
    if not 0.0 <= config.fuse_weight <= 1.0:
        raise ValueError(f"fuse_weight must be in [0, 1], got {config.fuse_weight}")


def last_variant(config: DenseConfig) -> AttentionVariant:
    """The last block's variant with its parameters."""
    return get_attention(config.variant, **dict(config.variant_params))


@timed("image tower")
def run_trunk(
    visual: VisionTransformer, images: torch.Tensor, config: DenseConfig, stop: int | None = None
) -> TowerState:
    """Embed `images` (B, 3, H, W) and run blocks 1 .. `stop` (default: all but the last)."""
    _check(config, len(visual.blocks))
    rows, cols = visual.grid_size(images.shape[-2], images.shape[-1])
    state = TowerState(visual.embed(images), 1, rows, cols)
    return advance(visual, state, config, len(visual.blocks) - 1 if stop is None else stop)


@timed("image tower")
def advance(visual: VisionTransformer, state: TowerState, config: DenseConfig, stop: int) -> TowerState:
    """Run blocks `state.next_block` .. `stop` (1-based, inclusive; never the last block) on `state`, in place."""
    blocks = visual.blocks
    if not state.next_block - 1 <= stop < len(blocks):
        raise ValueError(f"can run blocks {state.next_block}..{len(blocks) - 1} of this state, not up to {stop}")
    keep = set(config.fuse_blocks) | set(config.keep_blocks)
    replaced = dict(config.block_variants)
    x = state.x
    for number in range(state.next_block, stop + 1):
        block = blocks[number - 1]
        q, k, v = block.qkv(x)  # each (B, H, 1 + N, hd)
        if number in keep:
            state.kept[number] = (q, k)
        if number in replaced:
            out = get_attention(replaced[number]).apply(q, k, v, state.context(number, len(blocks)))
        else:
            out = attention(q, k, v)
        x = block.attend(x, out)
        if number in config.keep_tokens:
            state.tokens[number] = x
    state.x = x
    state.next_block = stop + 1
    return state


@timed("image tower")
def last_block(
    visual: VisionTransformer,
    state: TowerState,
    config: DenseConfig,
    variant: AttentionVariant | None = None,
    extras: dict[str, Any] | None = None,
    explicit: bool = False,
) -> torch.Tensor:
    """Finish `state` (which must stand before the last block) with the last block and the head.

    Returns (B, 1 + rows * cols, output_dim) tokens, not normalised. `variant` replaces the config's last-block
    variant; `extras` go into the variant's context. The state is not changed.
    """
    blocks = visual.blocks
    if state.next_block != len(blocks):
        raise ValueError(f"the state stands before block {state.next_block}, not the last block {len(blocks)}")
    variant = variant or last_variant(config)
    fuse_variant = get_attention(config.fuse_variant) if config.fuse_variant else variant
    kept = [state.kept[b] for b in config.fuse_blocks]
    number = len(blocks)
    context = state.context(number, number, extras)
    last = blocks[-1]
    q, k, v = last.qkv(state.x)
    if explicit:
        attn = variant.attention_map(q, k, context)  # (B, H, 1 + N, 1 + N)
        if kept:
            mean_map = torch.stack([fuse_variant.attention_map(qi, ki, context) for qi, ki in kept]).mean(dim=0)
            attn = config.fuse_weight * attn + (1.0 - config.fuse_weight) * mean_map
        out = torch.matmul(attn * config.attention_scale if config.attention_scale != 1.0 else attn, v)
    else:
        out = variant.apply(q, k, v, context)
        if kept:
            fused = sum(fuse_variant.apply(qi, ki, v, context) for qi, ki in kept) / len(kept)
            out = config.fuse_weight * out + (1.0 - config.fuse_weight) * fused
        if config.attention_scale != 1.0:
            out = out * config.attention_scale
    x = last.attend(state.x, out, residual=config.last_residual, mlp=config.last_mlp)
    return visual.head(x)


def dense_tokens(
    visual: VisionTransformer,
    images: torch.Tensor,
    config: DenseConfig,
    explicit: bool = False,
    extras: dict[str, Any] | None = None,
) -> torch.Tensor:
    """Dense features (B, 1 + rows * cols, output_dim) of images (B, 3, H, W) under `config`."""
    variant = last_variant(config)  # unknown names fail before any work
    return last_block(visual, run_trunk(visual, images, config), config, variant, extras, explicit)


def attention_maps(
    visual: VisionTransformer, images: torch.Tensor, config: DenseConfig, extras: dict[str, Any] | None = None
) -> dict[str, torch.Tensor]:
    """The attention maps `dense_tokens` uses, for inspection: `last` (the last block's own map), `block<N>` for
    each fused block, and `fused` (what is applied to the values). Each (B, H, 1 + N, 1 + N), float32."""
    variant = last_variant(config)
    fuse_variant = get_attention(config.fuse_variant) if config.fuse_variant else variant
    state = run_trunk(visual, images, config)
    number = len(visual.blocks)
    context = state.context(number, number, extras)
    maps: dict[str, torch.Tensor] = {}
    for block in config.fuse_blocks:
        qi, ki = state.kept[block]
        maps[f"block{block}"] = fuse_variant.attention_map(qi, ki, context).float()
    q, k, _ = visual.blocks[-1].qkv(state.x)
    maps["last"] = variant.attention_map(q, k, context).float()
    fused = maps["last"]
    if config.fuse_blocks:
        mean_map = torch.stack([maps[f"block{b}"] for b in config.fuse_blocks]).mean(dim=0)
        fused = config.fuse_weight * fused + (1.0 - config.fuse_weight) * mean_map
    maps["fused"] = fused * config.attention_scale if config.attention_scale != 1.0 else fused
    return maps
