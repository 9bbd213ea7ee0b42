"""The straightforward algorithm of the dense methods (NACLIP, ClearCLIP, ResCLIP, and any `tokens` readout):
one window at a time, every attention map built explicitly and kept as the official code keeps it (ResCLIP: the
maps of all earlier blocks), ResCLIP's first pass once per window with the full-tensor PAMR, windows padded into a
full canvas. It is the baseline `python -m itaclip_core.benchmark --methods ...` times the batched engine against,
and a second route to the same numbers in the tests.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from itaclip_core import reference
from itaclip_core.attention.dense import dense_tokens, last_variant
from itaclip_core.attention.variants import AttentionContext
from itaclip_core.inference.sliding import Window, sliding_windows
from itaclip_core.methods.base import patch_padding
from itaclip_core.methods.resclip import affinity_for_attention, sfr_matrix
from itaclip_core.model.clip import CLIP
from itaclip_core.presets import SegmentorConfig
from itaclip_core.refinement.features import RefineContext, build_refinements
from itaclip_core.text.classifier import TextClassifier


def _explicit_maps(visual, image: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Blocks 1..L-1 with explicit query-key maps; returns the tokens before the last block and every map."""
    x = visual.embed(image)
    maps = []
    for block in visual.blocks[:-1]:
        q, k, v = block.qkv(x)
        attn = torch.softmax((q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2), dim=-1)
        maps.append(attn)
        x = block.attend(x, attn @ v)
    return x, maps


def _resclip_tokens(model: CLIP, crop: torch.Tensor, text: torch.Tensor, config: SegmentorConfig) -> torch.Tensor:
    """ResCLIP's dense patch tokens of one crop (1, 3, h, w), as its official forward computes them."""
    visual = model.visual
    dense = config.dense_config()
    x, maps = _explicit_maps(visual, crop)
    rcs = torch.stack([maps[b - 1] for b in dense.fuse_blocks]).mean(dim=0)
    rows, cols = visual.grid_size(*crop.shape[-2:])
    context = AttentionContext(rows, cols)
    variant = last_variant(dense)
    last = visual.blocks[-1]
    q, k, v = last.qkv(x)

    def finish(attention: torch.Tensor) -> torch.Tensor:
        mixed = dense.attention_scale * (dense.fuse_weight * attention + (1 - dense.fuse_weight) * rcs)
        return visual.head(last.attend(x, mixed @ v, residual=dense.last_residual, mlp=dense.last_mlp))[:, 1:]

    first = F.normalize(finish(variant.attention_map(q, k, context)).float(), dim=-1)
    logits = (first @ text.T).permute(0, 2, 1).reshape(1, -1, rows, cols)
    logits = F.interpolate(logits, size=crop.shape[-2:], mode="bilinear")
    if config.sfr_pamr_steps > 0:
        logits = reference.pamr(crop.float(), logits, config.sfr_pamr_steps, config.sfr_pamr_dilations)
    probs = torch.softmax(logits[0] * config.logit_scale, dim=0)
    labels = probs.argmax(dim=0)
    labels[probs.max(dim=0)[0] < config.sfr_temp_thd] = 0
    p = visual.patch_size
    patch_labels = torch.zeros(rows, cols, dtype=torch.long)
    for r in range(rows):
        for c in range(cols):
            patch_labels[r, c] = torch.mode(labels[r * p : (r + 1) * p, c * p : (c + 1) * p].reshape(-1))[0]
    matrix = sfr_matrix(patch_labels, config.sfr_sigma, config.sfr_delete_same_entity)
    affinity = affinity_for_attention(matrix, config.sfr_affinity_dtype, crop.dtype)[None, None]
    context.extras["sfr_affinity"] = affinity
    return finish(variant.attention_map(q, k, context))


@torch.no_grad()
def window_logits(model: CLIP, crop: torch.Tensor, text: torch.Tensor, config: SegmentorConfig) -> torch.Tensor:
    """(1, Q, h, w) logits of one window (1, 3, h, w) at the window's size."""
    if config.image_engineering:
        raise ValueError("the straightforward dense-method route has no image engineering: set image_engineering=false")
    size = crop.shape[-2:]
    pad = patch_padding(*size, model.visual.patch_size) if config.pad_to_patch else None
    if pad:  # ClearCLIP: pad, run, upsample to the padded size, cut back
        padded = window_logits(model, F.pad(crop, pad), text, config.replace(pad_to_patch=False))
        left, _, top, _ = pad
        return padded[:, :, top : top + size[0], left : left + size[1]]
    if config.readout == "resclip":
        tokens = _resclip_tokens(model, crop, text, config)
    elif config.readout == "tokens":
        tokens = dense_tokens(model.visual, crop, config.dense_config(), explicit=True)[:, 1:]
    else:
        raise ValueError(f"readout={config.readout!r}: the straightforward route covers readout=tokens and resclip")
    rows, cols = model.visual.grid_size(*crop.shape[-2:])
    features = F.normalize(tokens.float(), dim=-1).view(1, rows, cols, -1)
    refinements = build_refinements(config)
    if refinements:
        refine_context = RefineContext(crop, text, config, model.visual.patch_size)
        for refinement in refinements:
            features = refinement.refine(features, refine_context)
    logits = (features @ text.T).permute(0, 3, 1, 2)
    return F.interpolate(logits, size=crop.shape[-2:], mode="bilinear")


@torch.no_grad()
def predict(
    model: CLIP, image: torch.Tensor, original_size: tuple[int, int], text: TextClassifier, config: SegmentorConfig
) -> tuple[torch.Tensor, np.ndarray]:
    """The whole straightforward pipeline on a normalised image (3, h, w): (probabilities, labels)."""
    if config.readout in ("scclip", "cliptrase"):  # whole-image steps of their own (CLIPtrase's vote)
        from itaclip_core.methods import straightforward_scclip_cliptrase as own

        return (own.scclip_predict if config.readout == "scclip" else own.cliptrase_predict)(
            model, image, original_size, text, config)
    image = image[None].to(model.device)
    _, _, height, width = image.shape
    features = text.features.to(model.device, torch.float32)
    windows = ([Window(0, height, 0, width)] if config.crop == 0
               else sliding_windows(height, width, config.crop, config.stride))
    canvas = torch.zeros(1, features.shape[0], height, width, device=model.device)
    count = torch.zeros(1, 1, height, width, device=model.device)
    for w in windows:
        crop = image[:, :, w.y1 : w.y2, w.x1 : w.x2].to(model.dtype)
        canvas += F.pad(window_logits(model, crop, features, config).float(),
                        (w.x1, width - w.x2, w.y1, height - w.y2))
        count[:, :, w.y1 : w.y2, w.x1 : w.x2] += 1
    logits = F.interpolate(canvas / count, size=original_size, mode="bilinear")
    if config.pamr_steps > 0:
        guide = F.interpolate(image.float(), size=original_size, mode="bilinear")
        logits = reference.pamr(guide, logits, config.pamr_steps, config.pamr_dilations)
    probs, labels = reference.postprocess(logits[0], text.query_to_class.to(logits.device), config)
    if config.renormalize:
        probs = probs / probs.sum(dim=0, keepdim=True)
    return probs, labels
