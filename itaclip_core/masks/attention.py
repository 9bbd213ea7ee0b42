"""Mask-scoped attention (CorrCLIP style) and proxy attention (ProxyCLIP): pure functions and the dense readouts
of CLIP's image tower built on them.

Pure functions (tested on hand-built inputs):
- `scoped_attention(similarity, regions, tau)`: CorrCLIP's scope reconstruction. Patch i may attend to patch j when
  both lie in the same mask region (region id > 0), or when one of them is uncovered (id 0) and their similarity
  is above the mean similarity of the window; the weights are softmax(tau * S) over the allowed pairs (tau = 4).
  The diagonal is always allowed, so that no row is empty (it is allowed in every non-degenerate case anyway).
- `proxy_attention(features, beta, gamma)`: ProxyCLIP's attention from a vision foundation model's features:
  S = cosine similarities, softmax over gamma * (S - beta * mean(S)) with the negative entries removed (beta 1.2,
  gamma 3.0; the mean is one scalar per window). The diagonal is kept even when it is negative (a window of
  nearly identical features), where ProxyCLIP's code would produce an empty row.

Readouts (`MaskAttentionReadout`, `ProxyAttentionReadout`) replace the last block of CLIP's image tower for one
batch of window views: values V = W_v LN_1(x) + b_v of the last block, one attention map shared by all heads,
out_proj(A V), no residual and no MLP, then `ln_post` and the projection. Mask attention adds CorrCLIP's two extra
branches: a spatial branch (the same attention applied to the values of the mean output of blocks L-2-n .. L-3,
n = 5 for 12 blocks) and a semantic branch of per-mask class tokens (one copy of the class token per region, which
attends only to the class token and to its region's patches in every block; each patch takes its region's token
through the whole last block), fused as ln_post(main) + w_s ln_post(spatial) + w_m ln_post(semantic).
The similarity comes from CLIP itself (normalised q + k of the last block, heads concatenated) or from DINO
(`vit_base_patch8_224.dino` through timm: normalised q + k of its last block, on its own 8-px grid).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from itaclip_core.model.clip import VisionTransformer


def scoped_attention(similarity: torch.Tensor, regions: torch.Tensor, tau: float = 4.0) -> torch.Tensor:
    """CorrCLIP's mask-scoped attention weights.

    Args:
        similarity: (B, N, N) cosine similarities of the patches.
        regions: (B, N) integer region id of each patch (0 = no mask covers it).
        tau: softmax temperature.
    Returns:
        (B, N, N) attention weights, rows summing to 1.
    """
    if similarity.ndim != 3 or regions.shape != similarity.shape[:2] or similarity.shape[1] != similarity.shape[2]:
        raise ValueError(f"similarity {tuple(similarity.shape)} must be (B, N, N) and regions (B, N), got "
                         f"{tuple(regions.shape)}")
    regions = regions.to(similarity.device)
    same = (regions[:, :, None] == regions[:, None, :]) & (regions[:, :, None] != 0)
    uncovered = regions == 0
    above = similarity > similarity.mean(dim=(1, 2), keepdim=True)
    allowed = same | ((uncovered[:, :, None] | uncovered[:, None, :]) & above)
    allowed |= torch.eye(similarity.shape[1], dtype=torch.bool, device=similarity.device)
    logits = (tau * similarity.float()).masked_fill(~allowed, float("-inf"))
    return logits.softmax(dim=-1)


def proxy_attention(features: torch.Tensor, beta: float = 1.2, gamma: float = 3.0) -> torch.Tensor:
    """ProxyCLIP's attention from proxy features (B, N, C): (B, N, N) weights, rows summing to 1."""
    if features.ndim != 3:
        raise ValueError(f"proxy features must be (B, N, C), got {tuple(features.shape)}")
    normalised = F.normalize(features.float(), dim=-1)
    similarity = normalised @ normalised.transpose(1, 2)  # (B, N, N)
    logits = gamma * (similarity - beta * similarity.mean(dim=(1, 2), keepdim=True))
    removed = logits < 0
    removed &= ~torch.eye(logits.shape[1], dtype=torch.bool, device=logits.device)
    return logits.masked_fill(removed, float("-inf")).softmax(dim=-1)


def region_grid(regions: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """(B, h, w) pixel region ids -> (B, rows * cols) ids on a patch grid (nearest, as CorrCLIP resizes)."""
    grid = F.interpolate(regions[:, None].float(), size=(rows, cols), mode="nearest")
    return grid[:, 0].round().long().reshape(regions.shape[0], rows * cols)


def _heads_concat(t: torch.Tensor) -> torch.Tensor:
    """(B, H, N, hd) -> (B, N, H * hd)."""
    return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], -1)


def _resize_tokens(tokens: torch.Tensor, grid: tuple[int, int], target: tuple[int, int]) -> torch.Tensor:
    """(B, H, rows * cols, hd) bilinearly resized on the patch grid to `target`: (B, H, R * C, hd)."""
    if grid == target:
        return tokens
    batch, heads, _, dim = tokens.shape
    x = tokens.permute(0, 1, 3, 2).reshape(batch, heads * dim, *grid)
    x = F.interpolate(x.float(), size=target, mode="bilinear").to(tokens.dtype)
    return x.reshape(batch, heads, dim, -1).permute(0, 1, 3, 2)


def _queries(block: Any, tokens: torch.Tensor) -> torch.Tensor:
    """Only the queries of `block` for tokens (B, R, width): (B, H, R, hd)."""
    width = tokens.shape[-1]
    q = F.linear(block.ln_1(tokens), block.attn.in_proj_weight[:width], block.attn.in_proj_bias[:width])
    return q.view(tokens.shape[0], tokens.shape[1], block.heads, width // block.heads).transpose(1, 2)


def _apply_shared(block: Any, attention: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """out_proj(A V) with one map for all heads: A (B, N, N), V (B, H, N, hd) -> (B, N, width)."""
    out = torch.matmul(attention[:, None].to(values.dtype), values)  # (B, H, N, hd)
    return block.project(out)


def spatial_blocks(num_blocks: int) -> range:
    """0-based blocks whose outputs make CorrCLIP's spatial branch: L-2-n .. L-3 (n = 5 / 12 / 28 for 12 / 24 /
    32 blocks; for other depths n = round(5 * L / 12)), clipped at block 0."""
    spatial = {12: 5, 24: 12, 32: 28}.get(num_blocks, max(1, round(5 * num_blocks / 12)))
    return range(max(0, num_blocks - 2 - spatial), max(0, num_blocks - 2))


class MaskAttentionReadout:
    """CorrCLIP-style dense features of window views with mask-scoped last-block attention."""

    def __init__(self, tau: float = 4.0, spatial_weight: float = 1.0, semantic_weight: float = 0.5,
                 correlation: Any = None) -> None:
        """
        Args:
            tau: softmax temperature of the scoped similarities.
            spatial_weight, semantic_weight: weights of the spatial branch and the per-mask class tokens (0: off).
            correlation: None for CLIP's own q + k, or a `ProxyModel` whose `correlation(images)` gives
                (B, N', C) features on its grid (`grid(h, w)`), e.g. DINO's q + k.
        """
        self.tau = tau
        self.spatial_weight = spatial_weight
        self.semantic_weight = semantic_weight
        self.correlation = correlation

    def __call__(self, visual: VisionTransformer, images: torch.Tensor, regions: torch.Tensor
                 ) -> tuple[torch.Tensor, tuple[int, int]]:
        """Dense features (B, rows' * cols', output_dim) of images (B, 3, h, w) whose pixel region ids are
        `regions` (B, h, w), and the output grid (rows', cols')."""
        blocks = visual.blocks
        clip_grid = visual.grid_size(images.shape[-2], images.shape[-1])
        clip_regions = region_grid(regions, *clip_grid)  # (B, N)
        x = visual.embed(images)  # (B, 1 + N, width)
        batch, tokens, _ = x.shape
        use_semantic = self.semantic_weight != 0.0
        count = 0
        if use_semantic:
            # One class-token copy per region id of each window (padding copies see the class token only). Region
            # tokens attend to the class token and their region's patches and nothing attends to them, so they are
            # queries only: the main path runs unchanged and each block updates them from its keys and values.
            ids = [torch.unique(r) for r in clip_regions]
            count = max(len(i) for i in ids)
            slot = torch.full((batch, count), -1, dtype=torch.long, device=x.device)
            for b, i in enumerate(ids):
                slot[b, : len(i)] = i.to(x.device)
            sees = torch.zeros(batch, count, tokens, dtype=torch.bool, device=x.device)
            sees[:, :, 0] = True
            sees[:, :, 1:] = slot[:, :, None] == clip_regions.to(x.device)[:, None, :]
            mask = sees[:, None]  # (B, 1, R, 1 + N)
            region_tokens = x[:, :1].expand(batch, count, -1)
        spatial_range = set(spatial_blocks(len(blocks)))
        spatial_sum, spatial_n = None, 0
        for number, block in enumerate(blocks[:-1]):
            q, k, v = block.qkv(x)
            if use_semantic:
                out = F.scaled_dot_product_attention(_queries(block, region_tokens), k, v, attn_mask=mask)
                region_tokens = block.attend(region_tokens, out)
            x = block.attend(x, F.scaled_dot_product_attention(q, k, v))
            if number in spatial_range and self.spatial_weight != 0.0:
                spatial_sum = x if spatial_sum is None else spatial_sum + x
                spatial_n += 1
        last = blocks[-1]
        q, k, v = last.qkv(x)  # (B, H, 1 + N, hd)
        patches = slice(1, None)
        if self.correlation is None:
            grid = clip_grid
            feats = F.normalize(_heads_concat(q[:, :, patches] + k[:, :, patches]).float(), dim=-1)
            out_regions = clip_regions
        else:
            feats, grid = self.correlation.correlation(images)
            feats = F.normalize(feats.float(), dim=-1)
            out_regions = region_grid(regions, *grid)
        similarity = feats @ feats.transpose(1, 2)  # (B, N', N')
        attention = scoped_attention(similarity, out_regions, self.tau)
        values = _resize_tokens(v[:, :, patches], clip_grid, grid)
        fused = visual.head(_apply_shared(last, attention, values))  # (B, N', output_dim)
        if spatial_sum is not None:
            _, _, v_spatial = last.qkv(spatial_sum / spatial_n)
            values = _resize_tokens(v_spatial[:, :, patches], clip_grid, grid)
            fused = fused + self.spatial_weight * visual.head(_apply_shared(last, attention, values))
        if use_semantic:
            out = F.scaled_dot_product_attention(_queries(last, region_tokens), k, v, attn_mask=mask)
            semantic = visual.head(last.attend(region_tokens, out))  # (B, R, output_dim): the whole last block
            # Each output patch takes its region's token (none when its region is too small for the CLIP grid).
            match = out_regions.to(slot.device)[:, :, None] == slot[:, None, :]  # (B, N', R)
            index = match.float().argmax(dim=-1)
            per_patch = torch.gather(semantic, 1, index[:, :, None].expand(-1, -1, semantic.shape[-1]))
            fused = fused + self.semantic_weight * per_patch * match.any(dim=-1, keepdim=True).to(per_patch.dtype)
        return fused, grid


class ProxyAttentionReadout:
    """ProxyCLIP's dense features: the last block's values under attention from a proxy model's features."""

    def __init__(self, proxy: Any, beta: float = 1.2, gamma: float = 3.0) -> None:
        self.proxy = proxy
        self.beta = beta
        self.gamma = gamma

    def __call__(self, visual: VisionTransformer, images: torch.Tensor, regions: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, tuple[int, int]]:
        clip_grid = visual.grid_size(images.shape[-2], images.shape[-1])
        x = visual.embed(images)
        for block in visual.blocks[:-1]:
            x = block(x)
        last = visual.blocks[-1]
        _, _, v = last.qkv(x)
        feats, grid = self.proxy.features(images)  # (B, N', C) on the proxy's grid
        attention = proxy_attention(feats, self.beta, self.gamma)
        values = _resize_tokens(v[:, :, 1:], clip_grid, grid)
        return visual.head(_apply_shared(last, attention, values)), grid


def grid_of(length: int, height: int, width: int) -> tuple[int, int]:
    """The (rows, cols) grid of `length` tokens for an image of height x width (square patches)."""
    patch = math.sqrt(height * width / length)
    rows, cols = round(height / patch), round(width / patch)
    if rows * cols != length:
        raise ValueError(f"{length} tokens do not tile a {height}x{width} image")
    return rows, cols
